#!/bin/sh
# Entrypoint of the EMQX containers of deploy/docker-compose.yml (image emqx/emqx:5.8.9, which runs as user
# emqx and owns /opt/emqx). It renders iothub's EMQX configuration templates (emqx-config/, mounted read-only)
# with the secrets from /run/secrets, makes etc/emqx.conf include them, then hands over to the image's own
# entrypoint. Rendering follows emqx-config/README.md sections 1-2:
#   * only the placeholders HUB_BROKER_TOKEN, HUB_JWT_SECRET, HUB_API_SECRET are replaced (sed with an explicit
#     list, no envsubst): EMQX's own ${username}, ${clientid}, ${.} and the $events/... topics stay;
#   * every secret must match [A-Za-z0-9._~-]+, so it is safe in a quoted HOCON string, in the colon-separated
#     api_key.bootstrap, and as a sed replacement;
#   * iothub's base URL http://iothub:8080 becomes $HUB_URL (default http://lb:8080, the load balancer);
#   * the include is `include required(...)`: a missing file stops EMQX instead of leaving it wide open.
#
# Environment (the HUB_ prefix keeps them apart from EMQX_*, which EMQX reads as configuration):
#   HUB_URL          iothub base URL as EMQX reaches it (default http://lb:8080; http only, no trailing /)
#   HUB_EMQX_ETC     EMQX's etc directory (default /opt/emqx/etc); output goes to $HUB_EMQX_ETC/iothub/
#   HUB_TEMPLATES    directory of emqx-http.hocon and api_key.bootstrap (default /opt/iothub/emqx-config)
#   HUB_SECRETS_DIR  directory of the secret files (default /run/secrets): hook_token, jwt_secret,
#                    emqx_api_secret, emqx_dashboard_password
#   HUB_RENDER_ONLY  1: render and stop (dry run, used by deploy/check.sh); otherwise exec the EMQX entrypoint
# Arguments: the EMQX command (default: /opt/emqx/bin/emqx foreground, the image's CMD).
set -eu

die() {
  echo "emqx-entrypoint: $*" >&2
  exit 1
}

etc=${HUB_EMQX_ETC:-/opt/emqx/etc}
templates=${HUB_TEMPLATES:-/opt/iothub/emqx-config}
secrets=${HUB_SECRETS_DIR:-/run/secrets}
hub_url=${HUB_URL:-http://lb:8080}
hub_url=${hub_url%/}
out=$etc/iothub

# Paths and the URL end up in sed replacements and in HOCON strings: keep them to a harmless charset.
for path in "$etc" "$templates" "$secrets"; do
  case $path in
    /*) ;;
    *) die "path must be absolute: $path" ;;
  esac
  case $path in
    *[!A-Za-z0-9._/-]*) die "path has characters outside [A-Za-z0-9._/-]: $path" ;;
  esac
done
case $hub_url in
  http://?*) ;;
  *) die "HUB_URL must be an http:// URL (https needs ssl blocks in the template, see emqx-config/README.md): $hub_url" ;;
esac
case $hub_url in
  *[!A-Za-z0-9._~:/-]*) die "HUB_URL has characters outside [A-Za-z0-9._~:/-]: $hub_url" ;;
esac

# read_secret NAME: the content of $secrets/NAME without trailing line breaks. Refuses a missing or empty
# file and any character outside [A-Za-z0-9._~-] (emqx-config/README.md, "Characters allowed in secrets").
read_secret() {
  file=$secrets/$1
  [ -r "$file" ] || die "$file is missing or not readable by uid $(id -u) (see deploy/secrets/README.md)"
  value=$(cat "$file")
  [ -n "$value" ] || die "$file is empty"
  case $value in
    *[!A-Za-z0-9._~-]*) die "$file has characters outside [A-Za-z0-9._~-] (generate it with: openssl rand -hex 32)" ;;
  esac
  printf '%s' "$value"
}

hook_token=$(read_secret hook_token)
jwt_secret=$(read_secret jwt_secret)
api_secret=$(read_secret emqx_api_secret)
dashboard_password=$(read_secret emqx_dashboard_password)
[ "${#jwt_secret}" -ge 32 ] || die "$secrets/jwt_secret is shorter than 32 bytes (iothub refuses it)"
[ "${#hook_token}" -ge 32 ] || die "$secrets/hook_token is shorter than 32 bytes (iothub refuses it)"

for t in emqx-http.hocon api_key.bootstrap; do
  [ -r "$templates/$t" ] || die "template $templates/$t is missing (mount emqx-config/ there)"
done

umask 077
mkdir -p "$out"
hocon=$out/emqx-iothub.hocon
bootstrap=$out/api_key.bootstrap
dashboard=$out/emqx-dashboard.hocon

# Only the listed placeholders; the bootstrap file path inside the hocon follows $out.
sed -e 's#[$][{]HUB_BROKER_TOKEN[}]#'"$hook_token"'#g' \
    -e 's#[$][{]HUB_JWT_SECRET[}]#'"$jwt_secret"'#g' \
    -e 's#http://iothub:8080#'"$hub_url"'#g' \
    -e 's#"/opt/emqx/etc/iothub/api_key.bootstrap"#"'"$bootstrap"'"#g' \
    "$templates/emqx-http.hocon" > "$hocon.tmp"
sed -e 's#[$][{]HUB_API_SECRET[}]#'"$api_secret"'#g' "$templates/api_key.bootstrap" > "$bootstrap.tmp"
# The dashboard's `admin` user gets this password when it is first created (default would be "public").
printf 'dashboard {\n  default_password = "%s"\n}\n' "$dashboard_password" > "$dashboard.tmp"

# Checks (README section 1): every placeholder rendered, EMQX's own templates and topics intact.
if grep -n '[$][{]HUB_' "$hocon.tmp" "$bootstrap.tmp" >&2; then
  die "unrendered \${HUB_...} placeholder (see above)"
fi
grep -q 'cmd/[$][{]username[}]/' "$hocon.tmp" || die "cmd/\${username}/ vanished from the rendered file"
grep -q '[$]events/client_connected' "$hocon.tmp" || die "\$events/client_connected vanished from the rendered file"
grep -qF "\"$hub_url/broker/emqx5/authn\"" "$hocon.tmp" || die "the iothub URL was not replaced"
grep -qF "\"$bootstrap\"" "$hocon.tmp" || die "api_key.bootstrap_file was not pointed at $bootstrap"
[ "$(cat "$bootstrap.tmp")" = "iothub:$api_secret:administrator" ] || die "api_key.bootstrap is not one line iothub:<secret>:administrator"

for f in "$hocon" "$bootstrap" "$dashboard"; do
  chmod 600 "$f.tmp"
  mv -f "$f.tmp" "$f"
done

# Include both files from emqx.conf once (the container's filesystem survives restarts).
conf=$etc/emqx.conf
[ -w "$conf" ] || die "$conf is missing or not writable by uid $(id -u)"
for f in "$hocon" "$dashboard"; do
  line="include required(\"$f\")"
  if ! grep -qxF "$line" "$conf"; then
    # emqx.conf may lack a final line break; HOCON needs the include on a line of its own.
    if [ -s "$conf" ] && [ -n "$(tail -c 1 "$conf")" ]; then
      echo >> "$conf"
    fi
    printf '%s\n' "$line" >> "$conf"
  fi
done

echo "emqx-entrypoint: rendered $hocon, $bootstrap, $dashboard (iothub at $hub_url); included from $conf"

if [ "${HUB_RENDER_ONLY:-0}" = 1 ]; then
  exit 0
fi
if [ "$#" -eq 0 ]; then
  set -- /opt/emqx/bin/emqx foreground
fi
# The entrypoint of emqx/emqx:5.8.9 (deploy/docker/Dockerfile at tag v5.8.9): derives the node name if unset
# and sets EMQX_RPC__PORT_DISCOVERY, then execs its arguments.
exec /usr/bin/docker-entrypoint.sh "$@"
