# Sourced by scripts/test.sh and scripts/bench.sh: installs PostgreSQL if missing and starts a private,
# throwaway cluster on loopback. Sets PG_URL (admin URL) and registers cleanup on EXIT.
# Tunables: PG_PORT (default 55432), PG_FAST=1 (fsync off: test data only), PG_EXTRA_OPTS (more -c settings,
# e.g. "-c log_min_duration_statement=0" to see statement timings in $pg_dir/log).

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
if [ "${PG_FAST:-1}" = "1" ]; then
  pg_opts="$pg_opts -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
fi
run_pg "$pg_bin/pg_ctl" -D "$pg_dir/data" -l "$pg_dir/log" -w start -o "$pg_opts" >/dev/null
pg_cleanup() { run_pg "$pg_bin/pg_ctl" -D "$pg_dir/data" -m immediate stop >/dev/null 2>&1 || true; rm -rf "$pg_dir"; }
PG_URL="postgres://postgres@127.0.0.1:$pg_port/postgres"
