# Sourced by scripts/test.sh: installs Redis if missing and starts a private, throwaway redis-server on
# loopback (no persistence). Sets REDIS_URL and defines redis_cleanup (stops only this instance; the caller
# registers it on EXIT). Ignores any system redis the package may have started (that one uses port 6379).
# Tunable: REDIS_PORT (default 56379).

if ! command -v redis-server >/dev/null || ! command -v redis-cli >/dev/null; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends redis-server redis-tools >/dev/null
fi

redis_port=${REDIS_PORT:-56379}
if (exec 3<>"/dev/tcp/127.0.0.1/$redis_port") 2>/dev/null; then
  echo "redis: 127.0.0.1:$redis_port is already in use (set REDIS_PORT)" >&2
  exit 1
fi
redis_dir=$(mktemp -d /tmp/iothub-redis.XXXXXX)
redis-server --bind 127.0.0.1 --port "$redis_port" --protected-mode yes --save "" --appendonly no \
  --dir "$redis_dir" --pidfile "$redis_dir/redis.pid" --logfile "$redis_dir/redis.log" --daemonize yes
redis_cleanup() {
  local pid
  pid=$(cat "$redis_dir/redis.pid" 2>/dev/null || true)
  if [ -n "$pid" ] && kill "$pid" 2>/dev/null; then
    # gone, or a zombie (daemonized: init reaps it, maybe late)
    for _ in $(seq 50); do grep -qs '^State:[[:space:]]*[^Z]' "/proc/$pid/status" || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -rf "$redis_dir"
}
for _ in $(seq 100); do
  [ "$(redis-cli -h 127.0.0.1 -p "$redis_port" ping 2>/dev/null)" = "PONG" ] && break
  sleep 0.1
done
if [ "$(redis-cli -h 127.0.0.1 -p "$redis_port" ping 2>/dev/null)" != "PONG" ]; then
  echo "redis: no PONG from 127.0.0.1:$redis_port within 10s" >&2
  tail -n 20 "$redis_dir/redis.log" >&2 || true
  redis_cleanup
  exit 1
fi
export REDIS_URL="redis://127.0.0.1:$redis_port"
