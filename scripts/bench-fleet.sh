#!/usr/bin/env bash
# Fleet benchmark: one iothub-sim process holds N devices (default 10,000) connected to a release iothub in the
# embedded profile (SQLite, bundled RMQTT) on this machine, publishing data at a steady rate. Records the
# connect storm (time until all are connected at once), the steady publish rate the simulator sent and iothub
# stored, and the RSS of both processes per device. Writes bench-results/fleet.md.
# Usage: scripts/bench-fleet.sh [devices] [connect_rate/s] [data_interval_ms] [steady_secs]
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=lib/build-deps.sh
. scripts/lib/build-deps.sh
cargo build --release --locked -p iothub -p iothub-sim

devices=${1:-10000}
rate=${2:-1000}
interval_ms=${3:-10000}
steady=${4:-60}
# Each process holds one socket per device (plus the broker's hook and database connections).
ulimit -n "$(ulimit -Hn)"
if [ "$(ulimit -n)" != unlimited ] && [ "$(ulimit -n)" -lt $((devices + 2000)) ]; then
  echo "open files limit $(ulimit -n) is too low for $devices devices (need $((devices + 2000)))" >&2
  exit 1
fi

work=$(mktemp -d /tmp/iothub-bench-fleet.XXXXXX)
hub_pid=""
cleanup() {
  set +e
  [ -n "$hub_pid" ] && kill "$hub_pid" 2>/dev/null && wait "$hub_pid" 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT

port=${BENCH_HTTP_PORT:-18390}
mqtt=127.0.0.1:$((port + 2))
IOTHUB_DATA_DIR="$work" IOTHUB_HTTP__LISTEN=127.0.0.1:$port IOTHUB_LOG__LEVEL=warn \
  IOTHUB_BROKER__EMBEDDED__MQTTS_LISTEN= IOTHUB_BROKER__EMBEDDED__MQTT_LISTEN=$mqtt IOTHUB_BROKER__EMBEDDED__API_LISTEN=127.0.0.1:$((port + 1)) \
  ./target/release/iothub serve & hub_pid=$!
for _ in $(seq 150); do
  ./target/release/iothub healthcheck --ready --url "http://127.0.0.1:$port" >/dev/null 2>&1 && break
  kill -0 "$hub_pid" 2>/dev/null || { echo "iothub exited during start" >&2; exit 1; }
  sleep 0.2
done

rss_kib() { awk '/VmRSS/{print $2}' "/proc/$1/status"; }
stored() {
  curl -fsS "http://127.0.0.1:$port/metrics" \
    | awk '/^iothub_ingest_messages_stored_total /{s+=$NF} END{printf "%d", s}'
}
hub_rss_before=$(rss_kib "$hub_pid")
./target/release/iothub-sim --api "http://127.0.0.1:$port" --api-key-file "$work/admin-api-key" --mqtt "$mqtt" \
  --register --devices-file "$work/devices.json" --devices "$devices" --connect-rate "$rate" \
  --data-interval-ms "$interval_ms" --status-interval-ms 0 --duration-secs $((devices / rate + 20 + steady)) \
  --json-summary > "$work/sim.log" 2>&1 &
sim_pid=$!
# Steady state: sample once everything is connected and the first publish round has passed.
sleep $((devices / rate + 20))
stored_before=$(stored); t0=$(date +%s.%N)
sleep "$steady"
stored_after=$(stored); t1=$(date +%s.%N)
hub_rss=$(rss_kib "$hub_pid")
wait "$sim_pid"
summary=$(tail -n 1 "$work/sim.log")
grep -q '"devices"' <<<"$summary" || { cat "$work/sim.log" >&2; exit 1; }

mkdir -p bench-results
python3 - "$summary" "$devices" "$rate" "$interval_ms" "$hub_rss_before" "$hub_rss" "$stored_before" "$stored_after" \
  "$t0" "$t1" "$(git rev-parse --short HEAD)" <<'EOF' | tee bench-results/fleet.md
import json, sys
s = json.loads(sys.argv[1])
devices, rate, interval = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
hub_before, hub_after = int(sys.argv[5]), int(sys.argv[6])
stored = (int(sys.argv[8]) - int(sys.argv[7])) / (float(sys.argv[10]) - float(sys.argv[9]))
print(f"## Fleet run at {sys.argv[11]}: {devices} devices, connects paced at {rate}/s, one data point per device every {interval} ms\n")
print("| measure | value |\n|---|---|")
print(f"| connected at the end | {s['connected']} of {s['devices']} (connect failures: {s['connect_failures']}) |")
print(f"| all connected after | {s['all_connected_secs']:.1f} s (pacing alone: {s['connect_spawn_secs']:.1f} s) |")
print(f"| published by the simulator | {s['data']} data points in {s['elapsed_secs']:.0f} s |")
print(f"| stored by iothub, steady state | {stored:.0f} messages/s (expected {devices * 1000 / interval:.0f}/s) |")
print(f"| simulator RSS | {s['rss_bytes'] / 1048576:.0f} MiB = {s['rss_per_connected_device_bytes'] / 1024:.1f} KiB per connected device |")
print(f"| iothub + bundled broker RSS | {hub_before / 1024:.0f} MiB idle → {hub_after / 1024:.0f} MiB with the fleet = {(hub_after - hub_before) / max(s['connected'], 1):.1f} KiB per device |")
print(f"| simulator errors | {s['errors']} |")
EOF
