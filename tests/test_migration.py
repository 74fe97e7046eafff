"""Migration from one shared VLESS inbound to a key, port and inbound per client."""

from __future__ import annotations

import json
import os
from typing import Any

import pytest

from tests.conftest import Daemon

pytestmark = pytest.mark.kernel

CLIENTS = [
    ("0f5f9bce-5e1d-4c1e-8f2a-6f0a9b1c2d01", "anna@panel"),
    ("1f5f9bce-5e1d-4c1e-8f2a-6f0a9b1c2d02", "boris@panel"),
    ("2f5f9bce-5e1d-4c1e-8f2a-6f0a9b1c2d03", "clara@panel"),
    ("3f5f9bce-5e1d-4c1e-8f2a-6f0a9b1c2d04", "dmitri@panel"),
    ("4f5f9bce-5e1d-4c1e-8f2a-6f0a9b1c2d05", "eva@panel"),
]


def shared_config() -> dict[str, Any]:
    return {
        "log": {"loglevel": "warning"},
        "inbounds": [
            {
                "tag": "socks-local",
                "port": 1080,
                "listen": "127.0.0.1",
                "protocol": "socks",
                "settings": {},
            },
            {
                "tag": "vless-shared",
                "port": 443,
                "protocol": "vless",
                "settings": {
                    "clients": [
                        {"id": u, "flow": "xtls-rprx-vision", "email": e} for u, e in CLIENTS
                    ],
                    "decryption": "none",
                },
                "streamSettings": {
                    "network": "tcp",
                    "security": "reality",
                    "realitySettings": {
                        "show": False,
                        "dest": "www.example.org:443",
                        "xver": 0,
                        "serverNames": ["www.example.org"],
                        "privateKey": "MGz3NCoBZ2NOdjpLW0h1Ik51kW9zYb4G0xxHJ0ABvn0",
                        "shortIds": ["a1b2c3d4"],
                    },
                },
            },
        ],
        "outbounds": [{"protocol": "freedom", "tag": "direct"}],
        "routing": {"rules": [{"type": "field", "ip": ["geoip:private"], "outboundTag": "direct"}]},
    }


@pytest.fixture
def migrating(make_daemon: Any) -> Daemon:
    daemon: Daemon = make_daemon(start=False)
    daemon.xray_config.parent.mkdir(parents=True)
    daemon.xray_config.write_text(json.dumps(shared_config(), indent=2))
    daemon.start()
    return daemon


def test_dry_run_then_migrate_then_noop_then_rollback(migrating: Daemon) -> None:
    daemon = migrating
    original = daemon.xray_config.read_bytes()
    dry = daemon.cli("migrate", str(daemon.xray_config), "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.count("\n  move ") == 5 and "dry run" in dry.stdout
    assert daemon.xray_config.read_bytes() == original
    assert daemon.api("GET", "/api/keys")["total"] == 0

    done = daemon.cli("--json", "migrate", str(daemon.xray_config))
    assert done.returncode == 0, done.stderr + daemon.log()
    created = json.loads(done.stdout)["created"]
    assert sorted((k["uuid"], k["name"]) for k in created) == sorted(CLIENTS)
    ports = [k["port"] for k in created]
    assert len(set(ports)) == 5 and all(
        p in range(daemon.port_range[0], daemon.port_range[1] + 1) for p in ports
    )
    config = json.loads(daemon.xray_config.read_text())
    tags = [i.get("tag") for i in config["inbounds"]]
    assert "vless-shared" not in tags and "socks-local" in tags
    ours = {
        i["settings"]["clients"][0]["id"]: i for i in config["inbounds"] if i["protocol"] == "vless"
    }
    assert set(ours) == {u for u, _ in CLIENTS}
    for inbound in ours.values():
        reality = inbound["streamSettings"]["realitySettings"]
        # clients keep pbk
        assert reality["privateKey"] == "MGz3NCoBZ2NOdjpLW0h1Ik51kW9zYb4G0xxHJ0ABvn0"
        assert "a1b2c3d4" in reality["shortIds"]
        assert inbound["settings"]["clients"][0]["flow"] == "xtls-rprx-vision"
    assert (
        config["routing"] == shared_config()["routing"]
        and config["outbounds"] == shared_config()["outbounds"]
    )
    assert daemon.api("GET", "/api/system/ports/status")["valid"]
    assert daemon.api("GET", "/api/system/xray/validate-sync")["in_sync"]

    after = daemon.xray_config.read_bytes()
    again = daemon.cli("migrate", str(daemon.xray_config))
    assert "nothing to migrate" in again.stdout
    assert daemon.xray_config.read_bytes() == after and daemon.api("GET", "/api/keys")["total"] == 5

    rolled = daemon.cli("migrate", "--rollback")
    assert rolled.returncode == 0, rolled.stderr
    assert daemon.xray_config.read_bytes() == original
    assert daemon.api("GET", "/api/keys")["total"] == 0
    table = daemon.http.get("/api/system/ports/status").json()
    assert table["valid"], table


def test_migrate_errors_are_clear(migrating: Daemon) -> None:
    missing = migrating.cli("migrate", "/nonexistent/config.json")
    assert missing.returncode == 1 and "no such file" in missing.stderr
    nothing = migrating.cli("migrate", "--rollback")
    assert nothing.returncode == 1 and "no pre-migration copy" in nothing.stderr
    bare = migrating.cli("migrate")
    assert bare.returncode == 1 and "usage: portmeter migrate" in bare.stderr
    other = migrating.workdir / "other.json"
    other.write_text(json.dumps({**shared_config(), "routing": {}}))
    refused = migrating.cli("migrate", str(other), "--dry-run")
    assert refused.returncode == 1 and refused.stderr.count("\n") == 1
    assert refused.stderr.startswith(f"portmeter: {other} is not the live Xray config")
    replacing = migrating.cli("migrate", str(other), "--dry-run", "--replace")
    assert replacing.returncode == 0, replacing.stderr
    assert replacing.stdout.count("\n  move ") == 5
    assert f"  replace {migrating.xray_config}: its section 'routing' goes for the source's\n" in (
        replacing.stdout
    )


def test_xray_commands_and_qr(daemon: Daemon) -> None:
    daemon.create("alice")
    status = daemon.cli("xray", "status")
    assert status.returncode == 0 and "in sync" in status.stdout and "NOT" not in status.stdout
    assert "in sync: 1 inbounds as expected" in daemon.cli("xray", "validate").stdout
    assert "synced: 0 inbounds added" in daemon.cli("xray", "sync").stdout
    shown = daemon.cli("keys", "show", "alice", "--qr")
    assert shown.returncode == 0, shown.stderr
    assert "vless://" in shown.stdout and "█" in shown.stdout


def test_usage_and_watch_commands(daemon: Daemon) -> None:
    daemon.create("watcher")
    plain = daemon.cli("usage", "watcher")
    assert plain.returncode == 0 and "watcher: 0 B on 1 servers" in plain.stdout, plain.stderr
    detailed = daemon.cli("usage", "watcher", "--detailed")
    assert detailed.returncode == 0 and "local" in detailed.stdout, detailed.stderr
    overall = daemon.cli("usage")
    assert overall.returncode == 0 and '"users"' in overall.stdout, overall.stdout
    watched = daemon.cli("traffic", "--watch", "--interval", "0.2", "--count", "2")
    assert watched.returncode == 0, watched.stderr
    assert "watcher" in watched.stdout and "rx/s" in watched.stdout


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (
            b'{"inbounds": [ {"port": 443,, } ]}',
            "is not valid JSON at line 1, column 29: Expecting property name",
        ),
        (
            b'{\n  // the API\n  "api": {"tag": "api"} /* never closed\n}\n',
            "the comment opened at line 3, column 25 never closes",
        ),
        (b"\xff\xfe{}", "is not UTF-8 text (line 1, column 1)"),
        (None, "has 50000000 bytes; portmeter reads at most 40000000"),
        ("directory", "is a directory, not an Xray config file"),
        ("fifo", "is not a regular file"),
        ("missing", "no such file"),
    ],
    ids=["not-json", "unclosed-comment", "not-utf8", "50-mb", "directory", "fifo", "missing"],
)
def test_bad_sources_get_one_clear_line_and_change_nothing(
    migrating: Daemon, content: bytes | str | None, message: str
) -> None:
    source = migrating.workdir / "source.json"
    if content is None:
        with source.open("wb") as handle:  # sparse: 50 MB on no disk
            handle.truncate(50 * 10**6)
    elif content == "directory":
        source.mkdir()
    elif content == "fifo":
        os.mkfifo(source)
    elif isinstance(content, bytes):
        source.write_bytes(content)
    live, state = migrating.xray_config.read_bytes(), migrating.state_bytes()
    for dry in ((), ("--dry-run",)):
        refused = migrating.cli("migrate", str(source), *dry)
        assert refused.returncode == 1 and refused.stdout == ""
        assert refused.stderr.count("\n") == 1 and message in refused.stderr, refused.stderr
        assert str(source) in refused.stderr
    assert migrating.xray_config.read_bytes() == live and migrating.state_bytes() == state
    assert migrating.api("GET", "/api/keys")["total"] == 0
    assert not (migrating.xray_config.parent / "backups").exists()


def test_thousands_of_clients_migrate_through_the_cli_that_waits(make_daemon: Any) -> None:
    """Issue 24: at 2,500 clients the CLI gave up after 30 s ("cannot reach the portmeter
    daemon") while the daemon went on. Now the planner is linear and the CLI waits, printing
    on stderr what the daemon is doing whenever it takes more than two seconds."""
    daemon: Daemon = make_daemon(size=3000, start=False)
    config = shared_config()
    shared = config["inbounds"][1]
    shared["settings"]["clients"] = [
        {"id": f"00000000-0000-4000-8000-{n:012d}", "flow": "xtls-rprx-vision", "email": f"u{n}"}
        for n in range(2500)
    ]
    daemon.xray_config.parent.mkdir(parents=True)
    daemon.xray_config.write_text(json.dumps(config))
    daemon.start()
    original = daemon.xray_config.read_bytes()
    dry = daemon.cli("migrate", str(daemon.xray_config), "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.count("\n  move ") == 2500
    done = daemon.cli("--json", "migrate", str(daemon.xray_config))
    assert done.returncode == 0, done.stderr
    assert len(json.loads(done.stdout)["created"]) == 2500
    assert all(line.startswith("portmeter: migrate: ") for line in done.stderr.splitlines())
    assert daemon.cli("xray", "validate").stdout.strip() == "in sync: 2500 inbounds as expected"
    assert daemon.api("GET", "/api/system/operation")["operation"] is None
    rolled = daemon.cli("migrate", "--rollback")
    assert rolled.returncode == 0, rolled.stderr
    assert daemon.xray_config.read_bytes() == original
