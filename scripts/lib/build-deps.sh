# Sourced by the scripts: installs the Debian packages iothub's build needs when missing.
# protoc: RMQTT's http-api plugin compiles gRPC stubs; libssl-dev/pkg-config: its HTTP client links OpenSSL.
need_apt=()
command -v protoc >/dev/null || need_apt+=(protobuf-compiler)
command -v pkg-config >/dev/null || need_apt+=(pkg-config)
dpkg -s libssl-dev >/dev/null 2>&1 || need_apt+=(libssl-dev)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "installing: ${need_apt[*]}"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi
