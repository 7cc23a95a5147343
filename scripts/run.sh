#!/usr/bin/env bash
# Runs iothub on the embedded default profile (SQLite + bundled MQTT broker), installing the few build
# prerequisites a fresh Debian machine lacks. Data goes to ./iothub-data.
set -euo pipefail
cd "$(dirname "$0")/.."
need_apt=()
command -v protoc >/dev/null || need_apt+=(protobuf-compiler)
command -v pkg-config >/dev/null || need_apt+=(pkg-config)
dpkg -s libssl-dev >/dev/null 2>&1 || need_apt+=(libssl-dev)
if [ ${#need_apt[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi
exec cargo run --release --locked -p iothub -- serve "$@"
