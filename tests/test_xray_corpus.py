"""Operators' own Xray configs migrate with nothing of theirs dropped, end to end.

Each config of tests/xray_corpus (written for these tests in the styles operators use: `#`,
`//` and `/* */` comments, REALITY over raw, gRPC and XHTTP, `target` for `dest`, ids that are
not UUIDs, fallbacks, sniffing with routeOnly, API inbounds, VMess, Trojan and VLESS+TLS next to
REALITY) goes through the real daemon: the dry run, the migration, `portmeter xray validate`,
every key's inbound and link against its source inbound, and `migrate --rollback`.

The expected values come from the config as Xray's own reader sees it (tests.test_xray_text's
transliteration of it), not from portmeter's reader.
"""

from __future__ import annotations

import base64
import copy
import json
import uuid
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from tests.conftest import Daemon
from tests.test_xray_text import xray_reader
from tests.xray_harness import link_fields

pytestmark = pytest.mark.kernel

CORPUS = Path(__file__).parent / "xray_corpus"
NO_XRAY = "/nonexistent/portmeter-test/xray"  # validation is the structural check here
PUBLIC_HOST = "vpn.example.net"  # the Daemon fixture's
# Per config: the names of the keys it gives, and the tags of the inbounds left as they are.
EXPECTED: dict[str, tuple[list[str], list[str]]] = {
    "01-vision-hash-comments.jsonc": (["dad@home", "mum@home", "kostya"], ["api"]),
    "02-grpc-target-slashes.jsonc": (["laptop@office", "phone@office"], []),
    "03-xhttp-block-comments.jsonc": (["tv@livingroom", "tablet@livingroom"], []),
    "04-mixed-inbounds.jsonc": (
        ["ivan@vpn", "olga@vpn", "ivan@vpn-2"],
        ["api", "vmess-ws", "trojan-tls", "vless-tls"],
    ),
    "05-string-ids.jsonc": (["alice", "bob laptop", "бабушка", "carol"], []),
    "06-fallbacks.jsonc": (["owner@edge"], []),
    "07-panel-export.jsonc": (["u1x9k2", "u7p3m1"], ["api"]),
    # Names from emails that break the name rule: refused characters become one dash.
    "08-comment-chars-in-strings.jsonc": (["o-brien-not a comment", "quoted-tag"], []),
}


def as_xray_reads(text: str) -> dict[str, Any]:
    config: dict[str, Any] = json.loads(xray_reader(text)[0])
    return config


def mapped_uuid(client_id: str) -> str:
    """Xray's reading of a client id: a uuid, or the UUIDv5 of a string of 1-30 bytes."""
    if len(client_id.encode()) <= 30:
        return str(uuid.uuid5(uuid.UUID(int=0), client_id))
    return str(uuid.UUID(client_id))


def is_reality_vless(inbound: dict[str, Any]) -> bool:
    stream = inbound.get("streamSettings") or {}
    return inbound.get("protocol") == "vless" and stream.get("security") == "reality"


def without_own_parts(inbound: dict[str, Any]) -> dict[str, Any]:
    """An inbound less what a key's inbound may change: port, tag and the client list."""
    rest = copy.deepcopy(inbound)
    rest.pop("port", None)
    rest.pop("tag", None)
    rest["settings"].pop("clients")
    return rest


def public_key(private_key: str) -> str:
    raw = base64.urlsafe_b64decode(private_key + "=" * (-len(private_key) % 4))
    public = X25519PrivateKey.from_private_bytes(raw).public_key().public_bytes_raw()
    return base64.urlsafe_b64encode(public).rstrip(b"=").decode()


def expected_link(inbound: dict[str, Any], name: str, host: str = PUBLIC_HOST) -> dict[str, str]:
    """The fields v2rayN and Hiddify need to reach `inbound` (a key's, one client)."""
    client = inbound["settings"]["clients"][0]
    stream = inbound.get("streamSettings") or {}
    network = stream.get("network", "tcp")
    fields = {
        "id": client["id"], "host": host, "port": str(inbound["port"]), "name": name,
        "encryption": "none", "security": stream.get("security", "none"),
    }
    if network in ("raw", "tcp"):
        fields |= {"type": "tcp", "headerType": "none"}
    elif network == "grpc":
        grpc = stream["grpcSettings"]
        fields |= {"type": "grpc", "serviceName": grpc["serviceName"]}
        fields["mode"] = "multi" if grpc.get("multiMode") else "gun"
    elif network == "xhttp":
        xhttp = stream["xhttpSettings"]
        fields |= {"type": "xhttp", "path": xhttp["path"], "mode": xhttp.get("mode", "auto")}
        fields |= {"host": xhttp["host"]} if "host" in xhttp else {}
        if "extra" in xhttp:
            fields["extra"] = json.dumps(xhttp["extra"], separators=(",", ":"))
    if fields["security"] == "reality":
        reality = stream["realitySettings"]
        client_side = {**reality.get("settings", {}), **reality}
        fields |= {
            "pbk": public_key(reality["privateKey"]),
            "sni": reality["serverNames"][0],
            "sid": next((s for s in reality["shortIds"] if s), ""),
            "fp": client_side.get("fingerprint") or "chrome",
        }
        fields |= {"spx": client_side["spiderX"]} if client_side.get("spiderX") else {}
    fields |= {"flow": client["flow"]} if client.get("flow") else {}
    return fields


def routed(
    source: dict[str, Any], created: dict[str, Any], by_tag: dict[str, Any]
) -> dict[str, Any]:
    """`source` as migration leaves it outside the inbounds: every routing rule that names a
    shared REALITY inbound names its clients' key inbounds too, by port (README "Xray")."""
    result = copy.deepcopy(source)
    moved: dict[str, list[tuple[int, str]]] = {}
    for shared in filter(is_reality_vless, source["inbounds"]):
        for client in shared["settings"]["clients"]:
            key = created[mapped_uuid(client["id"])]
            tag = f"inbound-{key['uuid']}"
            moved.setdefault(shared.get("tag"), []).append((by_tag[tag]["port"], tag))
    for rule in (result.get("routing") or {}).get("rules", []):
        named = rule.get("inboundTag")
        named = [named] if isinstance(named, str) else named or []
        keys = sorted(k for tag in named for k in moved.get(tag, []))
        if keys:
            rule["inboundTag"] = [*named, *(tag for _, tag in keys)]
    return result


@pytest.fixture(params=sorted(EXPECTED))
def corpus_daemon(request: pytest.FixtureRequest, make_daemon: Any) -> tuple[Daemon, str]:
    daemon: Daemon = make_daemon(start=False, PORTMETER_XRAY_BIN=NO_XRAY)
    daemon.xray_config.parent.mkdir(parents=True)
    daemon.xray_config.write_bytes((CORPUS / request.param).read_bytes())
    daemon.start()
    return daemon, request.param


def test_corpus_config_migrates_keeping_everything(corpus_daemon: tuple[Daemon, str]) -> None:
    d, name = corpus_daemon
    original = d.xray_config.read_bytes()
    source = as_xray_reads(original.decode())
    names, skipped = EXPECTED[name]
    has_comments = xray_reader(original.decode())[0] != original.decode()

    # The dry run: one move per client, each other inbound skipped with its reason, and the
    # comments a rewrite would drop; nothing changes.
    dry = d.cli("migrate", str(d.xray_config), "--dry-run")
    assert dry.returncode == 0, dry.stderr
    lines = dry.stdout.splitlines()
    assert lines[0] == "plan (dry run, nothing changed):"
    moves = [line for line in lines if line.startswith("  move ")]
    assert [line.split(" (")[1].split(")")[0] for line in moves] == names
    assert [line.split("'")[1] for line in lines if line.startswith("  skip inbound ")] == skipped
    assert all(line.endswith("; left as it is") for line in lines if "  skip " in line)
    note = f"  note: {d.xray_config} has comments: the rewritten config will not keep them"
    assert any(line.startswith(note) for line in lines) == has_comments
    assert d.xray_config.read_bytes() == original and d.api("GET", "/api/keys")["total"] == 0

    done = d.cli("--json", "migrate", str(d.xray_config))
    assert done.returncode == 0, done.stderr
    created = {key["uuid"]: key for key in json.loads(done.stdout)["created"]}
    assert sorted(key["name"] for key in created.values()) == sorted(names)
    config = json.loads(d.xray_config.read_text())

    # Every client of a REALITY inbound has a key whose inbound is its source inbound but for
    # port, tag and the other clients; the client is kept whole, its id as it was written.
    by_tag = {inbound.get("tag"): inbound for inbound in config["inbounds"]}
    migrated = 0
    for shared in filter(is_reality_vless, source["inbounds"]):
        for client in shared["settings"]["clients"]:
            key = created[mapped_uuid(client["id"])]
            inbound = by_tag[f"inbound-{key['uuid']}"]
            assert without_own_parts(inbound) == without_own_parts(shared)
            assert inbound["settings"]["clients"] == [client]
            assert inbound["port"] == key["port"]
            assert link_fields(key["link"]) == expected_link(inbound, key["name"])
            migrated += 1
        assert shared.get("tag") not in by_tag  # its clients all moved: the shared inbound is gone
    assert migrated == len(created) == len(names)

    # Everything else is exactly as it was: the other inbounds, in order, and every section.
    kept = [i for i in source["inbounds"] if not is_reality_vless(i)]
    assert [i for i in config["inbounds"] if i.get("tag") in skipped] == kept
    assert [json.dumps(i) for i in kept] == [json.dumps(by_tag[i.get("tag")]) for i in kept]
    assert {k: v for k, v in config.items() if k != "inbounds"} == {
        k: v for k, v in routed(source, created, by_tag).items() if k != "inbounds"
    }
    assert list(config) == list(source)

    validated = d.cli("xray", "validate")
    assert validated.stdout.strip() == f"in sync: {len(names)} inbounds as expected"
    again = d.cli("migrate", str(d.xray_config), "--dry-run")
    assert "nothing to migrate" in again.stdout

    rolled = d.cli("migrate", "--rollback")
    assert rolled.returncode == 0, rolled.stderr
    assert d.xray_config.read_bytes() == original
    assert d.api("GET", "/api/keys")["total"] == 0
