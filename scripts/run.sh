#!/usr/bin/env bash
# Runs iothub on the embedded default profile (SQLite + bundled MQTT broker), installing the few build
# prerequisites a fresh Debian machine lacks. Data goes to ./iothub-data.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=lib/build-deps.sh
. scripts/lib/build-deps.sh
exec cargo run --release --locked -p iothub -- serve "$@"
