#!/usr/bin/env bash
# The whole test suite, from a fresh Debian machine: installs what the tests need (PostgreSQL, protoc),
# starts a throwaway PostgreSQL on loopback, then runs fmt, clippy and every test. The MQTT broker needs no
# install: the tests start RMQTT (compiled into iothub) themselves.
set -euo pipefail
cd "$(dirname "$0")/.."

# shellcheck source=lib/build-deps.sh
. scripts/lib/build-deps.sh

# A private PostgreSQL cluster (fsync off: throwaway data), trust auth on loopback only.
# shellcheck source=lib/postgres.sh
. scripts/lib/postgres.sh
trap pg_cleanup EXIT
export TEST_POSTGRES_URL="$PG_URL"

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo test --workspace --locked "$@"
