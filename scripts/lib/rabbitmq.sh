# Sourced by scripts/test.sh: installs RabbitMQ if missing and starts a private, throwaway node on loopback
# with scripts/rabbitmq-node (state under a temp dir, node iothub<port>@localhost). Sets AMQP_URL (guest is
# allowed on loopback) and RABBITMQ_NODE_SCRIPT (absolute path of scripts/rabbitmq-node, for tests that run
# their own disposable node), and defines rabbitmq_cleanup (stops only this node; the caller registers it on
# EXIT). Ignores any system node the package may have started (rabbit@<host> on 5672).
# Tunable: AMQP_PORT (default 55672).

if [ ! -x /usr/lib/rabbitmq/bin/rabbitmq-server ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends rabbitmq-server >/dev/null
fi

RABBITMQ_NODE_SCRIPT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/rabbitmq-node"
amqp_port=${AMQP_PORT:-55672}
rabbitmq_dir=$(mktemp -d /tmp/iothub-rabbitmq.XXXXXX)
rabbitmq_cleanup() {
  "$RABBITMQ_NODE_SCRIPT" stop "$rabbitmq_dir" >/dev/null 2>&1 || true
  rm -rf "$rabbitmq_dir"
}
# Prints the node log's tail and exits non-zero on failure (the caller's set -e stops the script).
"$RABBITMQ_NODE_SCRIPT" start "$rabbitmq_dir" "$amqp_port" >/dev/null || { rm -rf "$rabbitmq_dir"; exit 1; }
export AMQP_URL="amqp://guest:guest@127.0.0.1:$amqp_port/%2f" RABBITMQ_NODE_SCRIPT
