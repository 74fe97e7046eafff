#!/usr/bin/env bash
# Production install on Debian bookworm: Debian packages, /opt/portmeter/venv, the systemd unit,
# the portmeter group (members may use the socket). Idempotent; start with
# `systemctl enable --now portmeter`.
set -euo pipefail
cd "$(dirname "$0")/.."
PREFIX=${PREFIX:-/opt/portmeter}

export DEBIAN_FRONTEND=noninteractive
need=()
for pkg in nftables libnftables1 iproute2 python3 python3-venv; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need+=("$pkg")
done
if ((${#need[@]})); then
    apt-get update -qq && apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
getent group portmeter >/dev/null || groupadd --system portmeter
[[ -x $PREFIX/venv/bin/python ]] || python3 -m venv "$PREFIX/venv"
"$PREFIX/venv/bin/pip" install -q --disable-pip-version-check --upgrade .
install -d -m 0755 /etc/portmeter
install -m 0644 systemd/portmeter.service /etc/systemd/system/portmeter.service
ln -sf "$PREFIX/venv/bin/portmeter" /usr/local/bin/portmeter
systemctl daemon-reload 2>/dev/null || true
echo "installed: systemctl enable --now portmeter; settings go in /etc/portmeter/portmeter.env"
