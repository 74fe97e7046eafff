"""Migration (README "Xray", issue 24): one shared VLESS+REALITY inbound of 1,000 and of 5,000
clients, planned (`portmeter migrate --dry-run`) and carried out (`portmeter migrate`) by a real
daemon, and the pure planner alone. Targets at 5,000 clients: dry run within 10 s, migration
within 60 s.

Each size runs in a daemon of its own (apply mode none, no Xray binary: the structural check
validates), its live config the shared inbound; the dry run and the migration go through the
API (`POST /api/system/xray/migrate`), as the CLI sends them, then `--rollback` puts the file
back. The planner's time is `plan_migration` of the same config in this process.
Usage: .venv/bin/python -m bench.migration [--quick]
"""

from __future__ import annotations

import json
import time
from typing import Any

from bench.common import (
    SCALE_RANGE,
    append_results,
    interruptible,
    parse_quick,
    print_table,
    running,
)
from daemon.allocator import PortRange
from daemon.xray.migration import plan_migration

DRY_RUN_TARGET, MIGRATION_TARGET = 10.0, 60.0  # seconds at 5,000 clients (issue 24)
PRIVATE_KEY = "MGz3NCoBZ2NOdjpLW0h1Ik51kW9zYb4G0xxHJ0ABvn0"


def shared_config(clients: int) -> dict[str, Any]:
    """A typical server: one VLESS+REALITY inbound on 443 with `clients` clients, a rule for it."""
    return {
        "log": {"loglevel": "warning"},
        "inbounds": [
            {
                "tag": "vless-reality",
                "port": 443,
                "protocol": "vless",
                "settings": {
                    "clients": [
                        {
                            "id": f"00000000-0000-4000-8000-{n:012d}",
                            "flow": "xtls-rprx-vision",
                            "email": f"user{n}@example",
                        }
                        for n in range(clients)
                    ],
                    "decryption": "none",
                },
                "streamSettings": {
                    "network": "raw",
                    "security": "reality",
                    "realitySettings": {
                        "dest": "www.example.org:443",
                        "serverNames": ["www.example.org"],
                        "privateKey": PRIVATE_KEY,
                        "shortIds": ["", "a1b2c3d4"],
                    },
                },
                "sniffing": {"enabled": True, "destOverride": ["http", "tls"]},
            }
        ],
        "outbounds": [{"protocol": "freedom", "tag": "direct"}],
        "routing": {"rules": [{"inboundTag": ["vless-reality"], "outboundTag": "direct"}]},
    }


def planner_seconds(config: dict[str, Any]) -> float:
    started = time.perf_counter()
    plan_migration(config, PortRange(*SCALE_RANGE), set())
    return time.perf_counter() - started


def daemon_seconds(clients: int, config: dict[str, Any]) -> tuple[float, float]:
    """Seconds of the dry run and of the migration of `config` by a fresh daemon."""
    with running(0, SCALE_RANGE, xray_base=config) as run:
        daemon = run.daemon
        body = {"config_path": str(daemon.xray_config), "dry_run": True}
        started = time.perf_counter()
        planned = daemon.api("POST", "/api/system/xray/migrate", json=body)
        dry = time.perf_counter() - started
        assert sum(line.startswith("move ") for line in planned["plan"]) == clients
        started = time.perf_counter()
        done = daemon.api("POST", "/api/system/xray/migrate", json={**body, "dry_run": False})
        migration = time.perf_counter() - started
        assert len(done["created"]) == clients
        migrated = json.loads(daemon.xray_config.read_text())
        assert len(migrated["inbounds"]) == clients
        daemon.api("POST", "/api/system/xray/migrate/rollback")
    return dry, migration


def main(quick: bool = False) -> None:
    sizes = (200, 1000) if quick else (1000, 5000)
    rows = []
    for clients in sizes:
        config = shared_config(clients)
        planner = planner_seconds(config)
        dry, migration = daemon_seconds(clients, config)
        rows.append((clients, planner, dry, migration))
    table = [
        (
            f"{clients:,}",
            f"{planner:.2f}",
            f"{dry:.2f}",
            f"{migration:.2f}",
            "yes" if dry <= DRY_RUN_TARGET and migration <= MIGRATION_TARGET else "NO",
        )
        for clients, planner, dry, migration in rows
    ]
    headers = ["clients", "planner", "dry run", "migration", "within 10 s / 60 s"]
    print_table("migration of one shared inbound (seconds)", headers, table)
    append_results(
        "migration",
        [
            (f"{c} clients", f"planner {p} s, dry run {d} s, migration {m} s")
            for c, p, d, m, _ in table
        ],
        quick,
    )


if __name__ == "__main__":
    interruptible()
    main(parse_quick(__doc__))
