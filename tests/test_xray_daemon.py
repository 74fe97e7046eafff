"""The real daemon owns the per-key part of Xray's config, end to end.

Every test runs `portmeter run` in its own network namespace (the `make_daemon` fixture) and
checks what it writes and answers: one inbound per key, share links and subscriptions, drift
reports and repair, rotated backups, rollback when applying fails, and per-key counting through
a real VLESS proxy (Debian's v2ray 4.34, serving the config the daemon wrote, REALITY off).
Traffic only goes between the test's namespaces and over their loopback.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import os
import re
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import pytest

from daemon.xray.reality import decode_key, public_key
from tests.conftest import Daemon
from tests.netlab import SERVER_V4, Lab
from tests.xray_harness import (
    V2RAY,
    ClientRoute,
    client_config,
    http_get_via_socks,
    http_post_via_socks,
    http_server,
    proxy_process,
    wait_port,
)

pytestmark = pytest.mark.kernel

# A path that never exists: validation is the structural check, whatever the host has installed.
NO_XRAY = "/nonexistent/portmeter-test/xray"
REALITY_DEST = "www.example.org:443"  # from the Daemon fixture's environment
FLOW = "xtls-rprx-vision"

# What an operator had before portmeter: their own inbounds (one a shared VLESS inbound),
# outbounds, routing, api/stats/policy. Written with 4-space indents and non-ASCII text, so
# "kept" must mean semantically equal, not merely "the same bytes portmeter would write".
OPERATOR_CONFIG: dict[str, Any] = {
    "log": {"loglevel": "info", "access": "/var/log/xray/access.log"},
    "api": {"tag": "api", "services": ["StatsService"]},
    "stats": {},
    "policy": {"levels": {"0": {"statsUserUplink": True, "statsUserDownlink": True}}},
    "inbounds": [
        {
            "tag": "operator-socks",
            "listen": "127.0.0.1",
            "port": 1080,
            "protocol": "socks",
            "settings": {"auth": "noauth", "udp": True},
        },
        {
            "tag": "shared-vless",
            "port": 8443,
            "protocol": "vless",
            "settings": {
                "clients": [
                    {"id": "6a3e2b1c-0f5d-4e8a-9b7c-1d2e3f4a5b6c", "email": "алиса@пример.рф"},
                    {"id": "0b1c2d3e-4f5a-4b6c-8d7e-9f0a1b2c3d4e", "email": "bob@example.net"},
                ],
                "decryption": "none",
            },
            "streamSettings": {"network": "tcp", "security": "none"},
        },
    ],
    "outbounds": [
        {"protocol": "freedom", "tag": "direct", "settings": {"domainStrategy": "UseIPv4"}},
        {"protocol": "blackhole", "tag": "block"},
        {
            "protocol": "socks",
            "tag": "upstream",
            "settings": {"servers": [{"address": "192.0.2.1", "port": 1081}]},
        },
    ],
    "routing": {
        "domainStrategy": "IPIfNonMatch",
        "rules": [
            {"type": "field", "ip": ["geoip:private"], "outboundTag": "block"},
            {"type": "field", "domain": ["geosite:category-ads"], "outboundTag": "block"},
            {"type": "field", "inboundTag": ["operator-socks"], "outboundTag": "upstream"},
        ],
    },
}


# --- helpers -------------------------------------------------------------------------------


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=4, ensure_ascii=False) + "\n", encoding="utf-8")


def read_config(daemon: Daemon) -> dict[str, Any]:
    return json.loads(daemon.xray_config.read_text(encoding="utf-8"))


def tag(key: dict[str, Any]) -> str:
    return f"inbound-{key['uuid']}"


def portmeter_inbounds(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        i["tag"]: i
        for i in config.get("inbounds", [])
        if str(i.get("tag", "")).startswith("inbound-")
    }


def operator_part(config: dict[str, Any]) -> dict[str, Any]:
    """Everything that is not a portmeter inbound."""
    part = {k: v for k, v in config.items() if k != "inbounds"}
    part["inbounds"] = [
        i for i in config.get("inbounds", []) if not str(i.get("tag", "")).startswith("inbound-")
    ]
    return part


def link_parts(link: str) -> tuple[Any, dict[str, str]]:
    parts = urlsplit(link)
    query = {
        name: values[0] for name, values in parse_qs(parts.query, keep_blank_values=True).items()
    }
    return parts, query


def table_ports(net: Lab, table: str) -> set[int]:
    """Every port that has any object (counter, quota, map element) in the daemon's nft table."""
    listing = net.nft("list", "table", "inet", table).stdout
    return {int(p) for p in re.findall(r"\b(?:rx|tx|drop|q)_(\d+)\b", listing)}


def backups(daemon: Daemon) -> list[Path]:
    """The rotated backups, named as XrayFiles.backups() finds them: <stem>-<timestamp><suffix>."""
    path = daemon.xray_config
    return sorted((path.parent / "backups").glob(f"{path.stem}-[0-9]*{path.suffix}"))


def validate(daemon: Daemon) -> dict[str, Any]:
    return daemon.api("GET", "/api/system/xray/validate-sync")


def status(daemon: Daemon) -> dict[str, Any]:
    return daemon.api("GET", "/api/system/xray/config-status")


def listening(ns: str, port: int) -> bool:
    """Whether a TCP socket listens on `port` in `ns`, asked of `ss` (no connection is made,
    so nothing is counted on the port)."""
    done = subprocess.run(
        ["ip", "netns", "exec", ns, "ss", "-Hltn", f"sport = :{port}"],
        capture_output=True,
        text=True,
        check=True,
    )
    return bool(done.stdout.strip())


def wait_listening(ns: str, port: int, proc: subprocess.Popen[bytes], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not listening(ns, port):
        if proc.poll() is not None:
            raise AssertionError(
                f"{proc.args} exited with {proc.returncode} before port {port} opened"
            )
        if time.monotonic() > deadline:
            raise AssertionError(f"nothing listens on port {port} in {ns} after {timeout}s")
        time.sleep(0.05)


def wait_state_settled(daemon: Daemon, timeout: float = 10) -> None:
    """Wait until the poll loop has saved a kernel reading for every key: from then on, with no
    traffic, nothing changes in the state file unless an operation changes it."""
    deadline = time.monotonic() + timeout
    while True:
        keys = json.loads(daemon.state_file.read_text())["keys"]
        if all(key[d]["reading"] is not None for key in keys.values() for d in ("rx", "tx")):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"no reading saved for every key after {timeout}s")
        time.sleep(0.1)


def log_events(daemon: Daemon, event: str) -> list[dict[str, str]]:
    """The logfmt lines of one event, as dicts of their fields."""
    found = []
    for line in daemon.log().splitlines():
        if f"event={event}" not in line:
            continue
        found.append(dict(re.findall(r'(\w+)=("(?:[^"\\]|\\.)*"|\S+)', line)))
    return found


# --- 1. inbounds, links, subscriptions, the operator's config kept -------------------------


def test_keys_get_inbounds_links_and_subscriptions(make_daemon: Any) -> None:
    d = make_daemon(start=False, PORTMETER_XRAY_BIN=NO_XRAY)
    write_json(d.xray_config, OPERATOR_CONFIG)
    d.start()

    alice = d.create("alice")
    bob = d.create("bob smith")
    config = read_config(d)
    assert operator_part(config) == OPERATOR_CONFIG, "the operator's sections changed"
    # The operator's inbounds come first, in their order; portmeter's follow.
    assert config["inbounds"][: len(OPERATOR_CONFIG["inbounds"])] == OPERATOR_CONFIG["inbounds"]
    ours = portmeter_inbounds(config)
    assert set(ours) == {tag(alice), tag(bob)}

    public_keys = set()
    for key in (alice, bob):
        inbound = ours[tag(key)]
        assert inbound["port"] == key["port"]
        assert inbound["protocol"] == "vless"
        assert inbound["settings"]["clients"] == [
            {"id": key["uuid"], "flow": FLOW, "email": key["name"]}
        ]
        assert inbound["settings"]["decryption"] == "none"
        stream = inbound["streamSettings"]
        assert stream["network"] == "tcp" and stream["security"] == "reality"
        reality = stream["realitySettings"]
        assert reality["dest"] == REALITY_DEST
        assert reality["serverNames"] == ["www.example.org"]
        assert len(decode_key(reality["privateKey"])) == 32
        assert reality["shortIds"] and all(
            re.fullmatch(r"(?:[0-9a-f]{2}){1,8}", s) for s in reality["shortIds"]
        )
        assert {"show", "xver", "maxTimeDiff"} <= set(reality)

        parts, query = link_parts(key["link"])
        assert parts.scheme == "vless"
        assert parts.username == key["uuid"]
        assert parts.hostname == "vpn.example.net"
        assert parts.port == key["port"]
        assert unquote(parts.fragment) == key["name"]
        assert query["type"] == "tcp" and query["security"] == "reality"
        assert query["pbk"] == public_key(reality["privateKey"])
        assert query["sid"] == reality["shortIds"][0]
        assert query["sni"] in reality["serverNames"]
        assert query["flow"] == FLOW and query["fp"]
        public_keys.add(query["pbk"])

        shown = d.api("GET", f"/api/keys/{key['id']}/link")
        assert shown["link"] == key["link"]
        assert shown["subscription_url"] == key["subscription_url"]
        assert key["subscription_url"].startswith("/sub/")

        sub = d.http.get(key["subscription_url"])
        assert sub.status_code == 200, sub.text
        assert base64.b64decode(sub.text, validate=True).decode() == key["link"]

    # Different keys, different short ids and tokens; one server key pair (the default).
    assert alice["subscription_url"] != bob["subscription_url"]
    assert (
        ours[tag(alice)]["streamSettings"]["realitySettings"]["shortIds"]
        != (ours[tag(bob)]["streamSettings"]["realitySettings"]["shortIds"])
    )
    report = status(d)
    assert report["in_sync"] is True and report["key_count"] == 2
    assert report["portmeter_inbound_count"] == 2
    assert report["inbound_count"] == 2 + len(OPERATOR_CONFIG["inbounds"])
    assert public_keys == {report["reality_public_key"]}

    unknown = d.http.get("/sub/" + "A" * 32)
    assert unknown.status_code == 404
    assert unknown.headers["content-type"].startswith("application/json")
    assert unknown.json()["detail"]

    d.api("DELETE", f"/api/keys/{alice['id']}")
    config = read_config(d)
    assert set(portmeter_inbounds(config)) == {tag(bob)}
    assert operator_part(config) == OPERATOR_CONFIG
    gone = d.http.get(alice["subscription_url"])
    assert gone.status_code == 404 and gone.json()["detail"]
    assert d.http.get(bob["subscription_url"]).status_code == 200
    assert validate(d)["in_sync"] is True


# --- 2. drift reports, repair, backups -----------------------------------------------------


def test_validate_sync_reports_hand_edits_and_sync_repairs_them(make_daemon: Any) -> None:
    d = make_daemon(PORTMETER_XRAY_BIN=NO_XRAY)
    k1, k2, k3 = (d.create(name) for name in ("k1", "k2", "k3"))

    before = status(d)
    assert before["exists"] is True and before["last_write"]
    assert before["in_sync"] is True
    assert before["key_count"] == before["portmeter_inbound_count"] == 3
    assert before["apply_mode"] == "none" and before["security"] == "reality"
    # The first create wrote a new file (nothing to back up); each later one kept a backup.
    assert before["backup_count"] == 2 == len(backups(d))
    clean = validate(d)
    assert clean["in_sync"] is True and clean["problems"] == [] and clean["expected_inbounds"] == 3

    # An operator edits the file by hand: k1's inbound deleted, k2's port changed, and an
    # inbound in portmeter's shape for a uuid no key has (stale).
    config = read_config(d)
    high = d.port_range[1]
    moved_port = high
    stale_port = high - 1
    stale_uuid = str(uuid.uuid4())
    stale = copy.deepcopy(portmeter_inbounds(config)[tag(k3)])
    stale.update(port=stale_port, tag=f"inbound-{stale_uuid}")
    stale["settings"]["clients"][0]["id"] = stale_uuid
    config["inbounds"] = [i for i in config["inbounds"] if i["tag"] != tag(k1)] + [stale]
    for inbound in config["inbounds"]:
        if inbound["tag"] == tag(k2):
            inbound["port"] = moved_port
    write_json(d.xray_config, config)

    drifted = validate(d)
    assert drifted["in_sync"] is False
    kinds = {(p["kind"], p["key_id"]) for p in drifted["problems"]}
    assert ("missing", k1["id"]) in kinds
    assert ("port_mismatch", k2["id"]) in kinds
    assert ("stale", None) in kinds
    assert all(p["message"] for p in drifted["problems"])
    assert len(drifted["problems"]) == 3, drifted["problems"]
    assert status(d)["in_sync"] is False

    synced = d.api("POST", "/api/system/xray/sync-config")
    assert synced["synced"] is True
    assert set(synced["added_inbounds"]) == {tag(k1), tag(k2)}
    assert set(synced["removed_inbounds"]) == {tag(k2), f"inbound-{stale_uuid}"}
    assert synced["backup"] and Path(synced["backup"]).exists()
    # The backup is the hand-edited file, exactly as it was.
    assert json.loads(Path(synced["backup"]).read_text()) == config

    repaired = validate(d)
    assert repaired["in_sync"] is True and repaired["problems"] == []
    after = status(d)
    assert after["in_sync"] is True
    assert after["backup_count"] == before["backup_count"] + 1
    ours = portmeter_inbounds(read_config(d))
    assert {t: i["port"] for t, i in ours.items()} == {tag(k): k["port"] for k in (k1, k2, k3)}

    # A sync with nothing to change writes nothing (no new backup).
    d.api("POST", "/api/system/xray/sync-config")
    assert status(d)["backup_count"] == after["backup_count"]

    # An inbound that only looks like k3's (its tag, another client) is the operator's: sync
    # refuses to delete it and the file stays as it is.
    config = read_config(d)
    for inbound in config["inbounds"]:
        if inbound["tag"] == tag(k3):
            inbound["settings"]["clients"][0]["id"] = str(uuid.uuid4())
    write_json(d.xray_config, config)
    hand_made = d.xray_config.read_bytes()
    problems = validate(d)["problems"]
    assert [(p["kind"], p["key_id"]) for p in problems] == [("uuid_mismatch", k3["id"])]
    refused = d.http.post("/api/system/xray/sync-config")
    assert refused.status_code == 503, refused.text
    assert str(d.xray_config) in refused.json()["detail"]
    assert d.xray_config.read_bytes() == hand_made


def test_backups_are_rotated(make_daemon: Any) -> None:
    d = make_daemon(PORTMETER_XRAY_BIN=NO_XRAY, PORTMETER_XRAY_BACKUPS="2")
    keys = [d.create(f"user{n}") for n in range(5)]
    kept = backups(d)
    assert len(kept) == 2, kept
    assert status(d)["backup_count"] == 2
    # Oldest first: the configs as they were before the 4th and the 5th create.
    assert [len(portmeter_inbounds(json.loads(p.read_text()))) for p in kept] == [3, 4]
    assert set(portmeter_inbounds(read_config(d))) == {tag(k) for k in keys}
    # Only rotated backups live there (no stray temporary files).
    assert sorted((d.xray_config.parent / "backups").iterdir()) == kept
    assert not [p for p in d.xray_config.parent.iterdir() if p.name.endswith(".tmp")]


# --- 3. rollback when applying or reading fails --------------------------------------------


RESTART_SCRIPT = """#!/bin/sh
# Stands in for `systemctl restart xray`: records each call, takes a moment, fails on demand.
echo "$$ $*" >> {calls}
sleep {delay}
if [ -e {fail_flag} ]; then
    echo "Job for xray.service failed because the control process exited with error code." >&2
    exit 1
fi
exit 0
"""
RESTART_DELAY = 0.2


def test_apply_failure_rolls_everything_back(make_daemon: Any, net: Lab, workdir: Path) -> None:
    calls, fail_flag, script = workdir / "calls.log", workdir / "fail", workdir / "restart-xray.sh"
    script.write_text(RESTART_SCRIPT.format(calls=calls, delay=RESTART_DELAY, fail_flag=fail_flag))
    script.chmod(0o755)
    d = make_daemon(
        start=False,
        PORTMETER_XRAY_BIN=NO_XRAY,
        PORTMETER_XRAY_APPLY="restart",
        PORTMETER_XRAY_RESTART_COMMAND=str(script),
    )
    write_json(d.xray_config, OPERATOR_CONFIG)
    d.start()

    def invocations() -> int:
        return len(calls.read_text().splitlines()) if calls.exists() else 0

    # Restart succeeds: exactly one restart per create, timed and logged.
    started = time.monotonic()
    alice = d.create("alice")
    took = time.monotonic() - started
    assert invocations() == 1
    assert RESTART_DELAY <= took < 10
    applied = log_events(d, "xray_applied")
    assert len(applied) == 1, d.log()
    assert applied[0]["mode"] == "restart"
    assert RESTART_DELAY <= float(applied[0]["seconds"]) < took
    assert tag(alice) in portmeter_inbounds(read_config(d))
    assert status(d)["apply_mode"] == "restart"

    # Restart fails: the create is refused and leaves nothing behind.
    fail_flag.touch()
    wait_state_settled(d)
    config_before = d.xray_config.read_bytes()
    state_before = d.state_file.read_bytes()
    backups_before = sorted(backups(d))
    calls_before = invocations()
    refused = d.http.post("/api/keys", json={"name": "bob"})
    assert refused.status_code == 503, refused.text
    assert refused.headers["content-type"].startswith("application/json")
    detail = refused.json()["detail"]
    assert "restart command failed (exit 1)" in detail
    assert "xray.service failed" in detail
    assert "restored" in detail
    assert invocations() > calls_before
    time.sleep(1.5)  # a poll or two: nothing may write the refused key afterwards either
    listed = d.api("GET", "/api/keys")
    assert [k["name"] for k in listed["keys"]] == ["alice"]
    assert table_ports(net, d.table) == {alice["port"]}
    assert d.xray_config.read_bytes() == config_before
    assert d.state_file.read_bytes() == state_before
    assert sorted(backups(d)) == backups_before  # a refused change leaves no backup behind
    assert d.api("GET", "/api/system/ports/status")["valid"] is True
    assert validate(d)["in_sync"] is True

    # A delete that cannot be applied is refused too, and alice stays whole.
    refused = d.http.delete(f"/api/keys/{alice['id']}")
    assert refused.status_code == 503, refused.text
    assert "restart command failed" in refused.json()["detail"]
    assert [k["id"] for k in d.api("GET", "/api/keys")["keys"]] == [alice["id"]]
    assert table_ports(net, d.table) == {alice["port"]}
    assert d.xray_config.read_bytes() == config_before
    assert d.http.get(alice["subscription_url"]).status_code == 200

    # Restart works again: the name and the lowest free port were released by the rollback.
    fail_flag.unlink()
    calls_before = invocations()
    bob = d.create("bob")
    assert invocations() == calls_before + 1
    assert bob["port"] == alice["port"] + 1
    assert table_ports(net, d.table) == {alice["port"], bob["port"]}
    assert set(portmeter_inbounds(read_config(d))) == {tag(alice), tag(bob)}
    assert operator_part(read_config(d)) == OPERATOR_CONFIG


def test_disable_that_cannot_be_applied_is_rolled_back(
    make_daemon: Any, net: Lab, workdir: Path
) -> None:
    calls, fail_flag, script = workdir / "calls.log", workdir / "fail", workdir / "restart-xray.sh"
    script.write_text(RESTART_SCRIPT.format(calls=calls, delay=0, fail_flag=fail_flag))
    script.chmod(0o755)
    d = make_daemon(
        PORTMETER_XRAY_BIN=NO_XRAY,
        PORTMETER_XRAY_APPLY="restart",
        PORTMETER_XRAY_RESTART_COMMAND=str(script),
        PORTMETER_XRAY_REMOVE_INACTIVE="true",
    )
    a = d.create("alice")
    fail_flag.touch()
    config_before = d.xray_config.read_bytes()
    refused = d.http.post(f"/api/keys/{a['id']}/disable")
    assert refused.status_code == 503, refused.text
    assert "restart command failed" in refused.json()["detail"]
    shown = d.api("GET", f"/api/keys/{a['id']}")
    assert shown["enabled"] is True and shown["status"] == "active"
    assert d.xray_config.read_bytes() == config_before
    assert table_ports(net, d.table) == {a["port"]}
    assert d.api("GET", "/api/system/ports/status")["valid"] is True
    time.sleep(1.5)  # the poll loop must not push the refused change on its own
    assert d.xray_config.read_bytes() == config_before
    assert d.api("GET", f"/api/keys/{a['id']}")["status"] == "active"


def test_autosync_repairs_drift_at_start(make_daemon: Any) -> None:
    d = make_daemon(PORTMETER_XRAY_BIN=NO_XRAY, PORTMETER_XRAY_AUTOSYNC="false")
    a = d.create("alice")
    b = d.create("bob")
    assert d.stop() == 0
    config = read_config(d)
    config["inbounds"] = [i for i in config["inbounds"] if i["tag"] != tag(a)]
    write_json(d.xray_config, config)

    d.start()  # without autosync: drift is reported in the log, the file is left alone
    assert [p["kind"] for p in validate(d)["problems"]] == ["missing"]
    assert [e["kind"] for e in log_events(d, "xray_drift")] == ["missing"]
    assert set(portmeter_inbounds(read_config(d))) == {tag(b)}
    assert d.stop() == 0

    d.env["PORTMETER_XRAY_AUTOSYNC"] = "true"
    d.start()
    assert validate(d)["in_sync"] is True
    assert set(portmeter_inbounds(read_config(d))) == {tag(a), tag(b)}
    assert log_events(d, "xray_drift_repaired")


def test_unreadable_operator_config_refuses_create(make_daemon: Any, net: Lab) -> None:
    d = make_daemon(start=False, PORTMETER_XRAY_BIN=NO_XRAY)
    d.xray_config.parent.mkdir(parents=True)
    broken = b'{\n  "inbounds": [\n    {"port": 1080, "protocol": "socks",}\n  ]\n'
    d.xray_config.write_bytes(broken)
    d.start()

    refused = d.http.post("/api/keys", json={"name": "alice"})
    assert refused.status_code == 503, refused.text
    assert refused.headers["content-type"].startswith("application/json")
    detail = refused.json()["detail"]
    assert str(d.xray_config) in detail and "not valid JSON" in detail
    assert d.xray_config.read_bytes() == broken
    assert d.api("GET", "/api/keys")["keys"] == []
    assert table_ports(net, d.table) == set()
    assert not (d.xray_config.parent / "backups").exists() or backups(d) == []
    report = status(d)
    assert report["error"] and str(d.xray_config) in report["error"]
    broken_validate = d.http.get("/api/system/xray/validate-sync")
    assert (
        broken_validate.status_code == 503
        and str(d.xray_config) in broken_validate.json()["detail"]
    )

    # Once the operator fixes the file, the same create works.
    write_json(d.xray_config, OPERATOR_CONFIG)
    alice = d.create("alice")
    assert set(portmeter_inbounds(read_config(d))) == {tag(alice)}
    assert table_ports(net, d.table) == {alice["port"]}


# --- 4. counting through a real proxy ------------------------------------------------------


DOWNLOAD = 2 * 1024 * 1024
UPLOAD = 1024 * 1024
SOCKS_A = 11001


@pytest.mark.skipif(not V2RAY.exists(), reason="needs Debian's v2ray (apt-get install v2ray)")
def test_traffic_through_the_proxy_is_counted_on_its_key_only(make_daemon: Any, net: Lab) -> None:
    d = make_daemon(
        PORTMETER_XRAY_SECURITY="none",
        PORTMETER_XRAY_APPLY="none",
        PORTMETER_XRAY_BIN=str(V2RAY),  # every write is checked by `v2ray -test` first
        PORTMETER_PUBLIC_HOST=SERVER_V4,
    )
    a = d.create("alice")
    b = d.create("bob")
    config = read_config(d)
    assert {t: i["port"] for t, i in portmeter_inbounds(config).items()} == {
        tag(a): a["port"],
        tag(b): b["port"],
    }
    assert all(
        i["streamSettings"]["security"] == "none" for i in portmeter_inbounds(config).values()
    )

    route = ClientRoute.from_link(a["link"], socks_port=SOCKS_A)
    assert (route.server, route.server_port, route.uuid) == (SERVER_V4, a["port"], a["uuid"])
    download = os.urandom(DOWNLOAD)
    upload = os.urandom(UPLOAD)
    proxy_dir = d.workdir / "proxies"
    proxy_dir.mkdir()

    with (
        http_server(net.server, download) as http_port,
        # The server proxy runs on the very file the daemon wrote, unchanged.
        proxy_process(net.server, d.xray_config, proxy_dir, "server") as server,
    ):
        low, high = d.port_range
        assert not low <= http_port <= high, "the HTTP server must not sit on a key port"
        # Checked with `ss`, not by connecting: a probe would be counted on the port.
        wait_listening(net.server, a["port"], server)
        wait_listening(net.server, b["port"], server)
        with proxy_process(net.client, client_config([route]), proxy_dir, "client") as client:
            wait_port(net.client, SOCKS_A, proc=client)  # the client's own loopback: not counted
            got = http_get_via_socks(net.client, SOCKS_A, "127.0.0.1", http_port)
            assert hashlib.sha256(got).digest() == hashlib.sha256(download).digest()
            answer = http_post_via_socks(net.client, SOCKS_A, "127.0.0.1", http_port, upload)
            assert answer == hashlib.sha256(upload).hexdigest().encode()
        assert server.poll() is None, "the server proxy died during the test"

        ta = d.traffic(a["id"])
        tb = d.traffic(b["id"])
    slack = 100_000
    # Key A: server -> client carried the download, client -> server the upload (layer 3).
    assert DOWNLOAD <= ta["tx_bytes"] < DOWNLOAD * 1.2 + slack, ta
    assert UPLOAD <= ta["rx_bytes"] < UPLOAD * 1.2 + slack, ta
    assert ta["rx_packets"] > 0 and ta["tx_packets"] > 0
    assert ta["total_bytes"] == ta["rx_bytes"] + ta["tx_bytes"]
    # Key B: served by the same proxy, never used: exactly nothing.
    assert (tb["rx_bytes"], tb["tx_bytes"], tb["rx_packets"], tb["tx_packets"]) == (0, 0, 0, 0), tb
    # The same numbers in the all-keys report.
    everything = d.api("GET", "/api/traffic/ports/exact")["ports_traffic"]["ports_traffic"]
    assert everything[b["uuid"]]["traffic"]["total_bytes"] == 0
    assert everything[a["uuid"]]["traffic"]["tx_bytes"] >= ta["tx_bytes"]
    server_log = (proxy_dir / "server.log").read_text(errors="replace")
    assert "panic" not in server_log


# --- 5. inactive keys leave Xray ------------------------------------------------------------


def test_remove_inactive_follows_disable_and_enable(make_daemon: Any) -> None:
    d = make_daemon(PORTMETER_XRAY_BIN=NO_XRAY, PORTMETER_XRAY_REMOVE_INACTIVE="true")
    a = d.create("alice")
    b = d.create("bob")
    assert set(portmeter_inbounds(read_config(d))) == {tag(a), tag(b)}

    disabled = d.api("POST", f"/api/keys/{a['id']}/disable")
    assert disabled["status"] == "disabled" and disabled["is_active"] is False
    assert set(portmeter_inbounds(read_config(d))) == {tag(b)}
    report = validate(d)
    assert report["in_sync"] is True, report["problems"]
    assert report["expected_inbounds"] == 1 and report["remove_inactive"] is True
    assert status(d)["in_sync"] is True
    # A disabled key's subscription answers, with no links in it.
    sub = d.http.get(a["subscription_url"])
    assert sub.status_code == 200 and base64.b64decode(sub.text) == b""
    time.sleep(1.5)  # the poll loop must not put it back either
    assert set(portmeter_inbounds(read_config(d))) == {tag(b)}

    enabled = d.api("POST", f"/api/keys/{a['id']}/enable")
    assert enabled["status"] == "active" and enabled["is_active"] is True
    ours = portmeter_inbounds(read_config(d))
    assert set(ours) == {tag(a), tag(b)}
    assert ours[tag(a)]["port"] == a["port"]
    report = validate(d)
    assert report["in_sync"] is True and report["expected_inbounds"] == 2
    assert base64.b64decode(d.http.get(a["subscription_url"]).text).decode() == a["link"]


def test_without_remove_inactive_disabled_keys_keep_their_inbound(make_daemon: Any) -> None:
    d = make_daemon(PORTMETER_XRAY_BIN=NO_XRAY)
    a = d.create("alice")
    d.api("POST", f"/api/keys/{a['id']}/disable")
    assert set(portmeter_inbounds(read_config(d))) == {tag(a)}
    report = validate(d)
    assert report["in_sync"] is True and report["expected_inbounds"] == 1
