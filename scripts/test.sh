#!/usr/bin/env bash
# The whole test suite, from a fresh Debian machine: installs what the tests need (PostgreSQL, Redis, RabbitMQ,
# protoc, mosquitto-clients; docker-compose, haproxy and hadolint for the deployment checks), starts throwaway PostgreSQL, Redis
# and RabbitMQ servers on loopback, then runs fmt, the deployment checks, clippy and every test. The MQTT broker needs no install: the tests start RMQTT (compiled into iothub) themselves.
set -euo pipefail
cd "$(dirname "$0")/.."

# shellcheck source=lib/build-deps.sh
. scripts/lib/build-deps.sh

# Stock third-party clients the tests attack and use iothub with: mosquitto's MQTT clients.
if ! command -v mosquitto_sub >/dev/null; then
  echo "installing: mosquitto-clients"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends mosquitto-clients >/dev/null
fi

# A private PostgreSQL cluster (fsync off: throwaway data), trust auth on loopback only.
# shellcheck source=lib/postgres.sh
. scripts/lib/postgres.sh
services_cleanup() {
  set +e
  declare -F rabbitmq_cleanup >/dev/null && rabbitmq_cleanup
  declare -F redis_cleanup >/dev/null && redis_cleanup
  pg_cleanup
}
trap services_cleanup EXIT
export TEST_POSTGRES_URL="$PG_URL"

# A private Redis (no persistence) and a private RabbitMQ node, both on loopback only. Tests that need to stop
# and restart a broker start their own disposable node with scripts/rabbitmq-node (TEST_RABBITMQ_NODE_SCRIPT).
# shellcheck source=lib/redis.sh
. scripts/lib/redis.sh
export TEST_REDIS_URL="$REDIS_URL"
# shellcheck source=lib/rabbitmq.sh
. scripts/lib/rabbitmq.sh
export TEST_AMQP_URL="$AMQP_URL" TEST_RABBITMQ_NODE_SCRIPT="$RABBITMQ_NODE_SCRIPT"

cargo fmt --all -- --check
# Static checks of the deployment files (compose config, hadolint, haproxy -c, the EMQX config renderer).
bash deploy/check.sh
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo test --workspace --locked "$@"
