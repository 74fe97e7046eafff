#!/usr/bin/env bash
# Install what portmeter and its tests need on Debian bookworm, idempotently and quickly when done:
# the Debian packages (only those missing) and a virtualenv with the project (only when
# pyproject.toml changed since the last install). `--test` adds what only the test suite needs:
# PostgreSQL 15 (the fleet tests start their own cluster; the daemon itself never needs it).
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(nftables libnftables1 iproute2 python3 python3-venv v2ray iperf3 systemd curl
              chromium chromium-driver debootstrap systemd-container prometheus)
if [[ ${1:-} == --test ]]; then
    # PostgreSQL for the fleet tests; a C compiler for the data path bench's sender (bench/blast.c);
    # libfaketime for a fleet node whose clock runs a day off.
    APT_PACKAGES+=(postgresql-15 gcc libc6-dev faketime)
fi
VENV=.venv
STAMP="$VENV/.installed"

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
    if [[ $(id -u) -ne 0 ]]; then
        echo "setup: run as root to install ${missing[*]}" >&2
        exit 1
    fi
    echo "setup: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    # Debian's postgresql-common would create and start a system cluster: the tests run their own.
    mkdir -p /etc/postgresql-common/createcluster.d
    echo "create_main_cluster = false" >/etc/postgresql-common/createcluster.d/portmeter.conf
    apt-get update -qq
    # policy-rc.d keeps Debian from starting the v2ray service: the tests run their own.
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    # Packages that bring a service (prometheus): the tests run their own; never a system one.
    if command -v systemctl >/dev/null && [[ -d /run/systemd/system ]]; then
        systemctl disable --now prometheus 2>/dev/null || true
    fi
fi

if ! getent group portmeter >/dev/null; then
    groupadd --system portmeter
fi

want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [[ ! -x $VENV/bin/python || ! -f $STAMP || $(cat "$STAMP") != "$want" ]]; then
    echo "setup: creating $VENV"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q --disable-pip-version-check -e '.[test]'
    echo "$want" >"$STAMP"
fi
