#!/usr/bin/env bash
# Browser end-to-end tests: headless Chromium (Debian's) driven by playwright-core, and nginx in
# front of the gateway. Installs what is missing (apt: chromium, nginx, node; npm ci here),
# builds the gateway, runs `node --test`, and ends with one line "e2e: N passed, N failed".
#
#   tests/e2e/run.sh                      # from anywhere
#   UPDATE_SCREENSHOT=1 tests/e2e/run.sh  # also rewrites docs/dashboard.png
#   SSE_GATEWAY_BIN=target/release/sse-gateway tests/e2e/run.sh   # test another build
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
cd "$repo"

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }
apt_updated=
apt_install() {
  [ -n "$apt_updated" ] || { as_root apt-get update -qq; apt_updated=1; }
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@"
}
have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ] || [ -x "/usr/bin/$1" ]; }

missing=()
[ -x "${CHROMIUM_BIN:-/usr/bin/chromium}" ] || missing+=(chromium fonts-dejavu-core)
have node || missing+=(nodejs)
have npm || missing+=(npm)
if [ ${#missing[@]} -gt 0 ]; then
  echo "== e2e: installing ${missing[*]}"
  apt_install "${missing[@]}"
fi
if ! have nginx && [ -z "${NGINX_BIN:-}" ]; then
  echo "== e2e: installing nginx"
  # nginx-light where the release still has it, else nginx. Debian's package would start a
  # system nginx on port 80 unless policy-rc.d forbids it (containers): the tests never use it.
  apt_install nginx-light || apt_install nginx
fi

echo "== e2e: npm ci (tests/e2e)"
(cd "$here" && npm ci --no-audit --no-fund --loglevel=error)

if [ -n "${SSE_GATEWAY_BIN:-}" ]; then
  bin="$SSE_GATEWAY_BIN"; case "$bin" in /*) ;; *) bin="$repo/$bin" ;; esac
  [ -x "$bin" ] || { echo "e2e: SSE_GATEWAY_BIN=$SSE_GATEWAY_BIN is not an executable" >&2; exit 2; }
else
  # Always (a no-op when up to date): the page, app.js and client.js are embedded in the
  # binary, so a stale build would test stale web files.
  echo "== e2e: cargo build"
  cargo build --quiet --bin sse-gateway
fi

echo "== e2e: node --test"
tap="$(mktemp)"
trap 'rm -f "$tap"' EXIT
status=0
(cd "$here" && node --test --test-concurrency=1 \
  --test-reporter=spec --test-reporter-destination=stdout \
  --test-reporter=tap --test-reporter-destination="$tap" \
  dashboard.test.js reconnect.test.js limits.test.js nginx.test.js) || status=$?
pass="$(sed -n 's/^# pass \([0-9]*\)$/\1/p' "$tap" | tail -1)"
fail="$(sed -n 's/^# fail \([0-9]*\)$/\1/p' "$tap" | tail -1)"
cancelled="$(sed -n 's/^# cancelled \([0-9]*\)$/\1/p' "$tap" | tail -1)"
fail=$(( ${fail:-0} + ${cancelled:-0} ))
if [ "$status" -ne 0 ] && [ "$fail" -eq 0 ]; then fail=1; fi
echo "e2e: ${pass:-0} passed, ${fail} failed"
exit "$status"
