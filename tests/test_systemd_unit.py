"""The shipped unit passes `systemd-analyze verify` and keeps its promises to the operator."""

from __future__ import annotations

import configparser
import subprocess
from pathlib import Path

from tests.conftest import REPO

UNIT = REPO / "systemd" / "portmeter.service"


def test_unit_verifies(tmp_path: Path) -> None:
    # verify checks that ExecStart exists: point it at this checkout's venv.
    text = UNIT.read_text().replace(
        "/opt/portmeter/venv/bin/portmeter", str(REPO / ".venv/bin/portmeter")
    )
    unit = tmp_path / "portmeter.service"
    unit.write_text(text)
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(unit)],
        capture_output=True,
        text=True,
        check=False,
    )
    problems = [line for line in result.stderr.splitlines() if "portmeter.service" in line]
    assert result.returncode == 0 and not problems, result.stderr


def test_unit_is_notify_watched_and_least_privileged() -> None:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(UNIT)
    service = parser["Service"]
    assert service["Type"] == "notify"
    assert int(service["WatchdogSec"]) > 0
    assert service["Restart"] == "on-failure"
    assert service["CapabilityBoundingSet"] == "CAP_NET_ADMIN"
    assert service["ProtectSystem"] == "strict"
    assert service["NoNewPrivileges"] == "yes" and service["PrivateTmp"] == "yes"
    assert service["StateDirectory"] == "portmeter" and service["RuntimeDirectory"] == "portmeter"
