# Sourced by scripts/test.sh and scripts/bench.sh: installs PostgreSQL if missing and starts a private,
# throwaway cluster on loopback. Sets PG_URL (admin URL) and registers cleanup on EXIT.
# Tunables: PG_PORT (default 55432), PG_FAST=1 (fsync off: test data only), PG_EXTRA_OPTS (more -c settings,
# e.g. "-c log_min_duration_statement=0" to see statement timings in $pg_dir/log), PG_STATS=1 (see below).

pg_bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n1 || true)
if [ -z "$pg_bin" ] || [ ! -x "$pg_bin/initdb" ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends postgresql >/dev/null
  pg_bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n1)
fi

pg_dir=$(mktemp -d /tmp/iothub-pg.XXXXXX)
pg_port=${PG_PORT:-55432}
run_pg() { if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
[ "$(id -u)" -eq 0 ] && chown postgres "$pg_dir"
run_pg "$pg_bin/initdb" -D "$pg_dir/data" -U postgres -A trust >/dev/null
pg_opts="-h 127.0.0.1 -p $pg_port -k $pg_dir -c max_connections=300 -c shared_buffers=512MB ${PG_EXTRA_OPTS:-}"
# PG_PRELOAD adds preloaded libraries, e.g. PG_PRELOAD=auto_explain with PG_EXTRA_OPTS="-c auto_explain.…".
preload="${PG_PRELOAD:-}"
[ "${PG_STATS:-0}" = "1" ] && preload="pg_stat_statements${preload:+,$preload}" \
  && pg_opts="$pg_opts -c pg_stat_statements.track_utility=off -c pg_stat_statements.track_planning=on"
[ -n "$preload" ] && pg_opts="$pg_opts -c shared_preload_libraries=$preload"
if [ "${PG_FAST:-1}" = "1" ]; then
  pg_opts="$pg_opts -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
fi
run_pg "$pg_bin/pg_ctl" -D "$pg_dir/data" -l "$pg_dir/log" -w start -o "$pg_opts" >/dev/null
pg_cleanup() { run_pg "$pg_bin/pg_ctl" -D "$pg_dir/data" -m immediate stop >/dev/null 2>&1 || true; rm -rf "$pg_dir"; }
PG_URL="postgres://postgres@127.0.0.1:$pg_port/postgres"

# Benchmarks: PG_STATS=1 loads pg_stat_statements; pg_stats_dump FILE writes the statements that used the most
# database time (total, calls, mean, rows) so a run says where PostgreSQL's time went.
if [ "${PG_STATS:-0}" = "1" ]; then
  run_pg "$pg_bin/psql" -h 127.0.0.1 -p "$pg_port" -U postgres -qAt -c "CREATE EXTENSION IF NOT EXISTS pg_stat_statements" >/dev/null
fi
pg_stats_dump() {
  [ "${PG_STATS:-0}" = "1" ] || return 0
  run_pg "$pg_bin/psql" -h 127.0.0.1 -p "$pg_port" -U postgres -q -P pager=off -c "
    SELECT round(total_exec_time::numeric, 0) AS total_ms, calls, round(mean_exec_time::numeric, 3) AS mean_ms,
           plans, round(mean_plan_time::numeric, 3) AS plan_ms, rows,
           round((100 * total_exec_time / sum(total_exec_time) OVER ())::numeric, 1) AS pct,
           left(regexp_replace(query, '\s+', ' ', 'g'), 160) AS statement
    FROM pg_stat_statements ORDER BY total_exec_time DESC LIMIT 25" > "$1"
  cp "$pg_dir/log" "${1%.txt}.log"
}
