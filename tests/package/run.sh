#!/usr/bin/env bash
# The .deb (issue 14): packages the release build that ./scripts/test has
# just made (`cargo deb --no-build`, so nothing is compiled twice), checks
# what is inside (binary, unit, environment file as a conffile, dashboard,
# alert rules) and has systemd verify the installed unit.
#
# systemd-analyze runs offline: there is no systemd as PID 1 in a container
# or on CI, so the package is unpacked into a scratch root and verified with
# `--root` (unit and binary looked up inside it) and `--man=no` (no man pages
# to look for `Documentation=`).
set -euo pipefail
cd "$(dirname "$0")/../.."

fail() { echo "package test: $*" >&2; exit 1; }

[ -x target/release/sse-gateway ] || fail "no release build (cargo build --release first)"
rm -f target/debian/sse-gateway_*.deb
cargo deb --no-build --quiet >/dev/null
deb=$(ls target/debian/sse-gateway_*.deb)
[ -f "$deb" ] || fail "cargo deb made no package"

contents=$(dpkg-deb -c "$deb")
for path in \
  ./usr/bin/sse-gateway \
  ./etc/default/sse-gateway \
  ./usr/share/doc/sse-gateway/README.md \
  ./usr/share/sse-gateway/grafana/sse-gateway.json \
  ./usr/share/sse-gateway/prometheus/alerts.yml \
  ./usr/share/sse-gateway/nginx/sse-gateway.conf; do
  grep -q " $path\$" <<<"$contents" || fail "$path missing from $deb:"$'\n'"$contents"
done
grep -Eq " \./(usr/)?lib/systemd/system/sse-gateway\.service\$" <<<"$contents" \
  || fail "no systemd unit in $deb:"$'\n'"$contents"
grep -Eq '^-rwxr-xr-x (root/root|0/0) .* \./usr/bin/sse-gateway$' <<<"$contents" \
  || fail "the binary is not root-owned 0755"
grep -Eq '^-rw------- (root/root|0/0) .* \./etc/default/sse-gateway$' <<<"$contents" \
  || fail "/etc/default/sse-gateway is not root-only (it may hold secrets)"

info=$(dpkg-deb -I "$deb")
grep -q '^ Package: sse-gateway$' <<<"$info" || fail "bad control:"$'\n'"$info"
grep -q '^ Section: net$' <<<"$info" || fail "no section:"$'\n'"$info"
grep -q '^ Depends: .*libc6' <<<"$info" || fail "no libc dependency:"$'\n'"$info"
[ "$(dpkg-deb -f "$deb" Version)" = "$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -1)-1" ] \
  || fail "the package version is not the crate's"
conffiles=$(dpkg-deb --ctrl-tarfile "$deb" | tar -xOf - ./conffiles)
[ "$conffiles" = "/etc/default/sse-gateway" ] || fail "conffiles: $conffiles"
# Installed, not enabled or started: the operator configures a secret first;
# an upgrade restarts a running gateway.
postinst=$(dpkg-deb --ctrl-tarfile "$deb" | tar -xOf - ./postinst)
grep -q 'try-restart sse-gateway.service' <<<"$postinst" || fail "postinst: $postinst"
if grep -q 'deb-systemd-invoke start\|systemctl.* start' <<<"$postinst"; then
  fail "postinst starts the service before it is configured"
fi

root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
dpkg-deb -x "$deb" "$root"
unit=$(find "$root" -path '*/systemd/system/sse-gateway.service' | head -1)
[ -n "$unit" ] || fail "unit not unpacked"
cmp -s "$unit" deploy/systemd/sse-gateway.service || fail "the packaged unit differs from deploy/systemd"
"$root/usr/bin/sse-gateway" --version >/dev/null || fail "the packaged binary does not run"
# The scratch root gets the host's own units too (sysinit.target and the
# like, which verify resolves the dependencies against); ours is not replaced.
host_units=/usr/lib/systemd/system
[ -d "$host_units" ] || host_units=/lib/systemd/system
mkdir -p "$root/etc/systemd/system" "$root/usr/lib/systemd/system"
cp -rn "$host_units/." "$root/usr/lib/systemd/system/"
if ! out=$(systemd-analyze verify --man=no --root="$root" sse-gateway.service 2>&1); then
  fail "systemd-analyze verify:"$'\n'"$out"
fi
[ -z "$out" ] || fail "systemd-analyze verify warns:"$'\n'"$out"
# The sandbox stays tight: systemd's exposure score (0 best, 10 worst) <= 2.0.
if ! security=$(systemd-analyze security --offline=yes --threshold=20 --root="$root" sse-gateway.service 2>&1); then
  fail "systemd-analyze security:"$'\n'"$security"
fi
echo "package ok: $deb ($(du -h "$deb" | cut -f1)), $(tail -1 <<<"$security")"
