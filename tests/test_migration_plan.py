"""Migration, second pass (issue 24): what public Xray configs broke, each case pinned down.

Pure planner and rendering cases first, then the in-process service (the real Service, Xray side
and files over the in-memory kernel): ports of ranges and lists, unix sockets and front
proxies, routing rules, the live config and another file, ids as written, a uuid listed twice.
"""

from __future__ import annotations

import base64
import copy
import http.server
import json
import socketserver
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from cryptography.hazmat.primitives.asymmetric import mlkem
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from hypothesis import given, settings
from hypothesis import strategies as st

from daemon import cli
from daemon.allocator import PortRange
from daemon.service.xray_side import XraySide
from daemon.xray.drift import check_config, drift, drift_report
from daemon.xray.links import vless_link
from daemon.xray.migration import MigrationPlan, apply_migration, plan_migration
from daemon.xray.model import XrayConfigError, XrayKey, is_portmeter_inbound, xray_uuid
from daemon.xray.render import render_config, route_keys
from daemon.xray.vlessenc import client_encryption
from daemon.xray_sync import LiveConfig, XrayFiles
from tests.inprocess import FIRST_PORT, InProcessDaemon, inprocess_daemon
from tests.test_xray_sync import (
    CLIENTS,
    REALITY,
    RFC7748,
    U1,
    U2,
    U3,
    opts_for,
    shared_config,
)
from tests.xray_harness import link_fields

RANGE = PortRange(10001, 10100)


def migrate(config: dict[str, Any], plan: MigrationPlan) -> tuple[dict[str, Any], list[XrayKey]]:
    keys = [move.key(f"m{n}") for n, move in enumerate(plan.moves)]
    return render_config(apply_migration(config, plan), keys, opts_for(), REALITY), keys


def with_inbound(**inbound: Any) -> dict[str, Any]:
    """The shared config of test_xray_sync with one more inbound of the operator's."""
    config = shared_config()
    config["inbounds"].insert(0, {"protocol": "socks", "settings": {}, **inbound})
    return config


# --- 1. ports of ranges and lists are taken -------------------------------------------------


@pytest.mark.parametrize(
    ("port", "expected"),
    [
        ("10001-10003", [10004, 10005, 10006, 10007, 10008]),
        ("10001,10003", [10002, 10004, 10005, 10006, 10007]),
        ("10002, 10004-10005 ,10008", [10001, 10003, 10006, 10007, 10009]),
        ("1-65535", []),
        (10002, [10001, 10003, 10004, 10005, 10006]),
        ("10003", [10001, 10002, 10004, 10005, 10006]),
    ],
    ids=["range", "list", "list-of-ranges", "every-port", "number", "string-number"],
)
def test_migration_takes_no_port_of_another_inbounds_range_or_list(
    port: Any, expected: list[int]
) -> None:
    plan = plan_migration(with_inbound(port=port, tag="socks-range"), RANGE, set(), opts_for())
    assert [m.port for m in plan.moves] == expected
    if not expected:
        assert len(plan.unplaced) == len(CLIENTS)


def test_drift_sees_a_key_on_a_port_of_another_inbounds_range() -> None:
    key = XrayKey("k1", "alice", U1, 10003, short_id="ab")
    for port in ("10001-10005", "10002,10003"):
        config = render_config(
            with_inbound(port=port, tag="socks-range"), [key], opts_for(), REALITY
        )
        problems = drift_report(config, [key], opts_for(), RANGE, REALITY)
        assert [(p.kind, p.message) for p in problems if p.kind == "duplicate"] == [
            ("duplicate", "port 10003 is used by more than one inbound")
        ]
        assert "port 10003 is used by more than one inbound" in check_config(config, opts_for())
        foreign = [p.port for p in problems if p.kind == "foreign"]
        assert foreign == sorted({10001, 10002, 10004, 10005} & set(range(*_span(port))))


def _span(port: str) -> tuple[int, int]:
    numbers = [int(n) for n in port.replace("-", ",").split(",")]
    return min(numbers), max(numbers) + 1


def test_a_unix_socket_inbound_takes_no_port() -> None:
    config = with_inbound(listen="/run/xray/socks.sock", port=10001, tag="socks-unix")
    assert plan_migration(config, RANGE, set(), opts_for()).moves[0].port == 10001
    key = XrayKey("k1", "alice", U1, 10001, short_id="ab")
    rendered = render_config(config, [key], opts_for(), REALITY)
    assert check_config(rendered, opts_for()) == []


def test_a_splice_refuses_a_key_on_a_port_of_an_operators_range(tmp_path: Path) -> None:
    """The one-key path (LiveConfig's model) checks ranges too, not only the full write."""
    opts = opts_for(tmp_path)
    opts.config_path.parent.mkdir(parents=True)
    opts.config_path.write_text(json.dumps(with_inbound(port="10005-10010", tag="r")))
    live = LiveConfig(XrayFiles(opts))
    first = XrayKey("k1", "alice", U1, 10001, short_id="ab")
    live.push([first], REALITY)
    written = opts.config_path.read_bytes()
    assert live.operator_ports(RANGE) >= set(range(10005, 10011))
    with pytest.raises(XrayConfigError, match="port 10007 is used by more than one inbound"):
        live.push([first, XrayKey("k2", "bob", U2, 10007, short_id="cd")], REALITY)
    assert opts.config_path.read_bytes() == written


def test_new_keys_skip_ports_of_the_operators_ranges_and_lists() -> None:
    config = {
        "inbounds": [
            {"port": f"{FIRST_PORT}-{FIRST_PORT + 2}", "protocol": "socks", "tag": "socks-range"},
            {"port": f"{FIRST_PORT + 4},{FIRST_PORT + 5}", "protocol": "http", "tag": "http-list"},
            {"listen": "@@hidden", "port": FIRST_PORT + 3, "protocol": "socks", "tag": "abstract"},
        ]
    }
    with inprocess_daemon(xray_config=config) as daemon:
        ports = [daemon.create(name)["port"] for name in ("a", "b", "c")]
        assert ports == [FIRST_PORT + 3, FIRST_PORT + 6, FIRST_PORT + 7]
        refused = daemon.api(
            "POST", "/api/keys", expect=409, json={"name": "d", "port": FIRST_PORT + 1}
        )
        assert refused["detail"] == (
            f"port {FIRST_PORT + 1} is used by an inbound of Xray's config that is not portmeter's"
        )
        batch = daemon.api(
            "POST",
            "/api/keys/batch",
            expect=409,
            json={"keys": [{"name": "e"}, {"name": "f", "port": FIRST_PORT + 5}]},
        )
        assert batch["detail"].startswith(f"keys[1]: port {FIRST_PORT + 5} is used by an inbound")
        assert only_foreign(daemon.api("GET", "/api/system/xray/validate-sync")) == [
            FIRST_PORT,
            FIRST_PORT + 1,
            FIRST_PORT + 2,
            FIRST_PORT + 4,
            FIRST_PORT + 5,
        ]


def test_new_keys_skip_ports_held_by_the_operators_confdir_files(tmp_path: Path) -> None:
    directory = tmp_path / "conf.d"
    directory.mkdir()
    held = {
        "inbounds": [
            {
                "port": f"{FIRST_PORT},{FIRST_PORT + 1}-{FIRST_PORT + 2}",
                "protocol": "socks",
                "tag": "operator-socks",
            }
        ]
    }
    (directory / "10-operator.json").write_text(json.dumps(held))
    with inprocess_daemon(xray_config={"inbounds": []}, xray_confdir=directory) as daemon:
        assert daemon.create("alice")["port"] == FIRST_PORT + 3
        daemon.api("POST", "/api/keys", expect=409, json={"name": "bob", "port": FIRST_PORT})
        validated = daemon.api("GET", "/api/system/xray/validate-sync")
        assert only_foreign(validated) == [FIRST_PORT, FIRST_PORT + 1, FIRST_PORT + 2]


def only_foreign(validated: dict[str, Any]) -> list[int]:
    """The ports of the drift report, which holds only the operator's inbounds in the range:
    no key shares a port with them."""
    assert {p["kind"] for p in validated["problems"]} == {"foreign"}, validated
    return sorted(p["port"] for p in validated["problems"])


# --- 2 and 3. unix sockets and front proxies are left alone, with the reason -------------------


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        (
            {"listen": "@@realityin_2443"},
            (
                "it listens on the unix socket '@@realityin_2443', not on a port (a front proxy "
                "connects there); keys need ports of their own"
            ),
        ),
        (
            {"listen": "/dev/shm/reality.sock,0666"},
            (
                "it listens on the unix socket '/dev/shm/reality.sock,0666', not on a port "
                "(a front proxy connects there); keys need ports of their own"
            ),
        ),
        (
            {"listen": "127.0.0.1", "port": 12000, "sockopt": True},
            (
                "it listens on 127.0.0.1 port 12000 only and accepts the PROXY protocol: a front "
                "proxy (nginx, HAProxy) forwards its clients to that port and would not reach keys "
                "on ports of their own"
            ),
        ),
        (
            {"listen": "::1", "port": 12000},
            (
                "it listens on ::1 port 12000 only: a front proxy (nginx, HAProxy) forwards its "
                "clients to that port and would not reach keys on ports of their own"
            ),
        ),
        (
            {"raw": True},
            (
                "it accepts the PROXY protocol on port 443: a front proxy (nginx, HAProxy) "
                "forwards its clients to that port and would not reach keys on ports of their own"
            ),
        ),
    ],
    ids=["abstract", "path", "loopback-proxy-protocol", "loopback", "proxy-protocol"],
)
def test_inbounds_a_port_per_key_cannot_serve_are_skipped(
    fields: dict[str, Any], reason: str
) -> None:
    config = shared_config()
    shared = config["inbounds"][1]
    stream = shared["streamSettings"]
    if fields.pop("sockopt", False):
        stream["sockopt"] = {"acceptProxyProtocol": True}
    if fields.pop("raw", False):
        stream["rawSettings"] = {"acceptProxyProtocol": True}
    shared.update(fields)
    plan = plan_migration(config, RANGE, set(), opts_for())
    assert plan.is_empty and plan.moves == ()
    where = f"'vless-reality' (vless, port {shared['port']})"
    assert plan.skipped[1] == f"skip inbound {where}: {reason}; left as it is"


def test_a_public_inbound_without_the_proxy_protocol_still_moves() -> None:
    config = shared_config()
    config["inbounds"][1]["listen"] = "0.0.0.0"
    config["inbounds"][1]["streamSettings"]["sockopt"] = {"acceptProxyProtocol": False}
    assert len(plan_migration(config, RANGE, set(), opts_for()).moves) == len(CLIENTS)


# --- 4. routing rules that named the shared inbound ---------------------------------------------


def routed_config() -> dict[str, Any]:
    config = shared_config()
    config["routing"]["rules"] += [
        {"type": "field", "inboundTag": ["vless-reality"], "outboundTag": "warp"},
        {
            "type": "field",
            "inboundTag": "vless-reality",
            "protocol": ["bittorrent"],
            "outboundTag": "block",
        },
        {"type": "field", "inboundTag": ["vmess-old"], "outboundTag": "direct"},
    ]
    return config


def test_rules_naming_the_shared_inbound_name_every_moved_key() -> None:
    source = routed_config()
    plan = plan_migration(source, RANGE, set(), opts_for())
    assert plan.routes == (
        (
            "routing rule #1 (inboundTag 'vless-reality' -> 'warp') will also name the inbounds "
            "of the 5 keys moved from there, and of keys added later"
        ),
        (
            "routing rule #2 (inboundTag 'vless-reality' -> 'block') will also name the inbounds "
            "of the 5 keys moved from there, and of keys added later"
        ),
    )
    assert plan.routed == ("vless-reality",)
    assert [line for line in plan.lines() if line.startswith("routing rule")] == list(plan.routes)
    config, keys = migrate(source, plan)
    tags = [k.tag for k in sorted(keys, key=lambda k: k.port)]
    rules = config["routing"]["rules"]
    assert rules[0] == source["routing"]["rules"][0]
    assert rules[1] == {**source["routing"]["rules"][1], "inboundTag": ["vless-reality", *tags]}
    assert rules[2] == {**source["routing"]["rules"][2], "inboundTag": ["vless-reality", *tags]}
    assert rules[3] == source["routing"]["rules"][3]
    assert drift(config, keys, opts_for(), RANGE) == []
    # Rendering again (a later push) changes nothing; a key gone leaves the rules.
    assert render_config(config, keys, opts_for(), REALITY) == config
    fewer = render_config(config, keys[1:], opts_for(), REALITY)
    assert fewer["routing"]["rules"][1]["inboundTag"] == ["vless-reality", *tags[1:]]
    assert plan_migration(config, RANGE, set(), opts_for()).routes == ()


def migrated_tags(daemon: InProcessDaemon) -> list[str]:
    """Migrate the daemon's live config (routed_config): the tags of the keys made, by port."""
    rig = daemon.rig
    plan, created = daemon.run(lambda: rig.service.migrate(rig.xray_config, dry_run=False))
    assert len(created) == len(CLIENTS) and sum("routing rule #" in line for line in plan) == 2
    return [f"inbound-{k.uuid}" for k in sorted(created, key=lambda k: k.port)]


def live_rules(daemon: InProcessDaemon) -> list[dict[str, Any]]:
    return list(json.loads(daemon.rig.xray_config.read_text())["routing"]["rules"])


def backups(daemon: InProcessDaemon) -> set[bytes]:
    """What the rotated backups of Xray's config hold: a write adds the file before it."""
    return {path.read_bytes() for path in XrayFiles(daemon.rig.xray.options).backups()}


def test_a_key_added_after_the_migration_joins_its_rules_and_leaves_them_when_deleted() -> None:
    """A rule written for the shared inbound (to WARP, a BitTorrent block) holds for a user
    added later too: the new key's tag enters every rule the migration rewrote, in the write
    that adds its inbound, and leaves with the key; other rules are not touched."""
    with inprocess_daemon(xray_config=routed_config()) as daemon:
        tags = migrated_tags(daemon)
        rules = live_rules(daemon)
        assert [r["inboundTag"] for r in rules[1:3]] == [["vless-reality", *tags]] * 2
        before, kept = daemon.rig.xray_config.read_bytes(), backups(daemon)
        new = daemon.create("newcomer")
        tag = f"inbound-{new['uuid']}"
        assert backups(daemon) - kept == {before}  # one write: the inbound and the rules
        assert live_rules(daemon) == [
            rules[0],
            {**rules[1], "inboundTag": ["vless-reality", *tags, tag]},
            {**rules[2], "inboundTag": ["vless-reality", *tags, tag]},
            rules[3],
        ]
        saved = daemon.saved_state()
        assert saved["route_sources"] == ["vless-reality"]
        assert saved["keys"][new["id"]]["route_sources"] == ["vless-reality"]
        assert daemon.api("GET", "/api/system/xray/validate-sync")["in_sync"]
        daemon.api("PATCH", f"/api/keys/{new['id']}", json={"note": "still routed"})
        assert live_rules(daemon)[1]["inboundTag"] == ["vless-reality", *tags, tag]
        daemon.api("DELETE", f"/api/keys/{new['id']}")
        assert live_rules(daemon) == rules
        daemon.api("DELETE", f"/api/keys/{tags[1].removeprefix('inbound-')}")
        assert live_rules(daemon)[1]["inboundTag"] == ["vless-reality", tags[0], *tags[2:]]
        assert live_rules(daemon)[2]["inboundTag"] == ["vless-reality", tags[0], *tags[2:]]


def test_a_batch_after_the_migration_joins_its_rules() -> None:
    with inprocess_daemon(xray_config=routed_config()) as daemon:
        tags = migrated_tags(daemon)
        before, kept = daemon.rig.xray_config.read_bytes(), backups(daemon)
        body = {"keys": [{"name": "b1"}, {"name": "b2"}, {"name": "b3"}]}
        made = daemon.api("POST", "/api/keys/batch", expect=201, json=body)["keys"]
        added = [f"inbound-{key['uuid']}" for key in made]
        assert backups(daemon) - kept == {before}
        rules = live_rules(daemon)
        assert [r["inboundTag"] for r in rules[1:3]] == [["vless-reality", *tags, *added]] * 2
        assert rules[3]["inboundTag"] == ["vmess-old"]
        daemon.api("DELETE", f"/api/keys/{made[1]['id']}")
        rules = live_rules(daemon)
        assert [r["inboundTag"] for r in rules[1:3]] == [
            ["vless-reality", *tags, added[0], added[2]]
        ] * 2


def test_rules_the_operator_changed_by_hand_keep_the_operators_tags() -> None:
    """A rule that no longer names the shared inbound is the operator's alone: new keys stay
    out of it and its tags stay as written (a deleted key's tag still leaves). One that still
    names it keeps the operator's own tags and takes new keys."""
    with inprocess_daemon(xray_config=routed_config()) as daemon:
        tags = migrated_tags(daemon)
        config = json.loads(daemon.rig.xray_config.read_text())
        rules = config["routing"]["rules"]
        rules[1]["inboundTag"] = [tags[0], "vmess-old", tags[2]]  # WARP for two users and VMess
        rules[2]["inboundTag"] = ["socks-in", *rules[2]["inboundTag"]]
        daemon.rig.xray_config.write_text(json.dumps(config, indent=2))
        new = f"inbound-{daemon.create('newcomer')['uuid']}"
        assert live_rules(daemon) == [
            rules[0],
            rules[1],
            {**rules[2], "inboundTag": ["socks-in", "vless-reality", *tags, new]},
            rules[3],
        ]
        daemon.api("DELETE", f"/api/keys/{tags[2].removeprefix('inbound-')}")
        assert live_rules(daemon)[1]["inboundTag"] == [tags[0], "vmess-old"]
        assert live_rules(daemon)[2]["inboundTag"] == [
            "socks-in",
            "vless-reality",
            *tags[:2],
            *tags[3:],
            new,
        ]


def test_without_a_migration_new_keys_touch_no_rule() -> None:
    """Rules naming an inbound that was never migrated stay byte for byte, keys come and go."""
    with inprocess_daemon(xray_config=routed_config()) as daemon:
        daemon.create("first")
        routing = json.loads(daemon.rig.xray_config.read_text())["routing"]
        assert routing == routed_config()["routing"]
        made = daemon.api("POST", "/api/keys/batch", expect=201, json={"keys": [{"name": "b"}]})
        daemon.api("DELETE", f"/api/keys/{made['keys'][0]['id']}")
        assert json.loads(daemon.rig.xray_config.read_text())["routing"] == routing
        saved = daemon.saved_state()
        assert saved["route_sources"] == []
        assert [key["route_sources"] for key in saved["keys"].values()] == [[]]


def test_which_rules_new_keys_join_survives_a_restart(tmp_path: Path) -> None:
    """Saved with the migration (in the journal, with keys enough that a save is no
    compaction), read at the next start: a key made after the restart joins the rules too.
    Keys made before the migration never join them."""
    with inprocess_daemon(xray_config=routed_config(), directory=tmp_path) as daemon:
        older = [daemon.create(f"older{n}") for n in range(6)]
        tags = migrated_tags(daemon)
        assert (tmp_path / "state" / "state.journal").stat().st_size > 0
    with inprocess_daemon(directory=tmp_path) as daemon:
        assert daemon.service.state.route_sources == ("vless-reality",)
        new = f"inbound-{daemon.create('after-restart')['uuid']}"
        rules = live_rules(daemon)
        assert [r["inboundTag"] for r in rules[1:3]] == [["vless-reality", *tags, new]] * 2
        assert not any(f"inbound-{key['uuid']}" in json.dumps(rules) for key in older)


def test_with_a_confdir_the_base_and_its_rules_are_never_written(tmp_path: Path) -> None:
    """Migrated with the single file, then switched to PORTMETER_XRAY_CONFDIR as the README
    says (key inbounds taken out of the base): a new key gets its file and remembers the rules
    it joins, but the base, which holds them, stays byte for byte."""
    with inprocess_daemon(xray_config=routed_config(), directory=tmp_path) as daemon:
        tags = migrated_tags(daemon)
    base = tmp_path / "xray" / "config.json"
    config = json.loads(base.read_text())
    config["inbounds"] = [i for i in config["inbounds"] if not is_portmeter_inbound(i)]
    base.write_text(json.dumps(config, indent=2))
    before = base.read_bytes()
    directory = tmp_path / "conf.d"
    with inprocess_daemon(directory=tmp_path, xray_confdir=directory) as daemon:
        new = daemon.create("newcomer")
        assert (directory / f"pm-{new['uuid']}.json").exists()
        assert daemon.saved_state()["keys"][new["id"]]["route_sources"] == ["vless-reality"]
        daemon.api("DELETE", f"/api/keys/{tags[0].removeprefix('inbound-')}")
        assert base.read_bytes() == before


def test_a_rollback_restores_the_rules_and_new_keys_leave_them() -> None:
    """The original config comes back byte for byte, and keys made after the migration no
    longer join the rules of the inbound it brought back."""
    original = json.dumps(routed_config(), indent=2).encode()
    with inprocess_daemon(xray_config=routed_config()) as daemon:
        migrated_tags(daemon)
        new = daemon.create("newcomer")
        daemon.run(daemon.service.rollback_migration)
        assert daemon.rig.xray_config.read_bytes() == original
        saved = daemon.saved_state()
        assert saved["route_sources"] == [] and list(saved["keys"]) == [new["id"]]
        assert saved["keys"][new["id"]]["route_sources"] == []
        daemon.create("later")
        assert (
            json.loads(daemon.rig.xray_config.read_text())["routing"] == routed_config()["routing"]
        )


SOURCES = ("vless-reality", "vless-grpc")
OPERATOR_TAGS = (*SOURCES, "socks-in", "api")
ROUTE_UUIDS = [str(uuid.UUID(int=n + 1, version=4)) for n in range(6)]


@st.composite
def routed_keys(draw: st.DrawFn) -> tuple[list[dict[str, Any]], list[XrayKey]]:
    """Rules naming the operator's tags, shared inbounds and key tags (of keys that exist or
    not), and keys each joining the rules of some shared inbounds (or none)."""
    present = draw(st.sets(st.sampled_from(range(len(ROUTE_UUIDS)))))
    keys = [
        XrayKey(
            id=f"k{n}",
            name=f"k{n}",
            uuid=ROUTE_UUIDS[n],
            port=10001 + n,
            route_sources=tuple(draw(st.lists(st.sampled_from(SOURCES), unique=True))),
        )
        for n in sorted(present)
    ]
    tags = st.sampled_from([*OPERATOR_TAGS, *(f"inbound-{u}" for u in ROUTE_UUIDS)])
    rules = draw(
        st.lists(
            st.fixed_dictionaries(
                {"inboundTag": st.lists(tags, min_size=1, unique=True), "outboundTag": tags}
            ),
            max_size=4,
        )
    )
    return rules, keys


@given(routed_keys())
@settings(max_examples=200, deadline=None)
def test_rules_name_every_key_of_the_inbounds_they_name_and_keep_the_operators_tags(
    drawn: tuple[list[dict[str, Any]], list[XrayKey]],
) -> None:
    """Whatever the rules and keys: a rule that names a shared inbound names every key joining
    its rules; the operator's tags all stay, in their order; a key tag leaves with its key
    unless the rule would be left empty; a rule that needs nothing is left as it was; and
    routing again changes nothing."""
    rules, keys = drawn
    config = {"routing": {"rules": copy.deepcopy(rules)}}
    route_keys(config, keys, ())
    present = {key.tag for key in keys}
    for before, after in zip(rules, config["routing"]["rules"], strict=True):
        named, now = before["inboundTag"], after["inboundTag"]
        joining = {k.tag for k in keys if set(k.route_sources) & set(named)}
        assert joining <= set(now)
        assert [t for t in now if t in OPERATOR_TAGS] == [t for t in named if t in OPERATOR_TAGS]
        gone = {t for t in named if t not in OPERATOR_TAGS and t not in present}
        if gone and set(named) != gone:
            assert not gone & set(now)
        if not joining - set(named) and not (gone and set(named) != gone):
            assert after == before
        assert set(now) <= set(named) | joining
    again = copy.deepcopy(config)
    route_keys(again, keys, ())
    assert again == config


# --- 5. the planner is linear in the clients -------------------------------------------------


def test_planning_thousands_of_clients_is_linear() -> None:
    """3,000 clients took minutes when each client's template copied the whole shared inbound
    (23.6 s at 1,000); now a second or two, even on a loaded machine."""
    config = shared_config()
    config["inbounds"][1]["settings"]["clients"] = [
        {"id": f"00000000-0000-4000-8000-{n:012d}", "email": f"user{n}@x", "flow": ""}
        for n in range(3000)
    ]
    started = time.perf_counter()
    plan = plan_migration(config, PortRange(20001, 25000), set(), opts_for())
    migrate(config, plan)
    assert len(plan.moves) == 3000 and time.perf_counter() - started < 20
    assert all(len(m.inbound["settings"]["clients"]) == 1 for m in plan.moves)  # type: ignore[index]


# --- 9. ids stay as written -------------------------------------------------------------------


def test_ids_in_another_spelling_stay_as_written_in_the_inbound_and_the_link() -> None:
    source = shared_config()
    written = [U1.upper(), U2.replace("-", ""), "{" + U3 + "}"]
    source["inbounds"][1]["settings"]["clients"] = [{"id": i, "email": i} for i in written]
    plan = plan_migration(source, RANGE, set(), opts_for())
    assert [m.client_id for m in plan.moves] == written[:2]  # braces: Xray refuses the id
    assert plan.warnings == (
        (
            f"inbound #1: client id '{written[2]}' is neither a uuid nor a string of 1-30 bytes; "
            "left in place"
        ),
    )
    config, keys = migrate(source, plan)
    for move, key in zip(plan.moves, keys, strict=True):
        inbound = next(i for i in config["inbounds"] if i.get("tag") == key.tag)
        assert inbound["settings"]["clients"][0]["id"] == move.client_id
        assert is_portmeter_inbound(inbound) and key.uuid == xray_uuid(move.client_id)
        assert link_fields(vless_link(key, opts_for(), REALITY))["id"] == move.client_id
    assert drift(config, keys, opts_for(), RANGE) == []
    assert plan_migration(config, RANGE, set(), opts_for()).is_empty


# --- 10. a uuid listed twice in one inbound ---------------------------------------------------


def test_a_uuid_listed_twice_keeps_the_entry_xray_serves() -> None:
    source = shared_config()
    clients = [
        {"id": U1, "email": "first@x", "flow": ""},
        {"id": U2, "email": "other@x", "flow": "xtls-rprx-vision"},
        {"id": U1.upper(), "email": "last@x", "flow": "xtls-rprx-vision", "level": 1},
    ]
    source["inbounds"][1]["settings"]["clients"] = copy.deepcopy(clients)
    plan = plan_migration(source, RANGE, set(), opts_for())
    assert [(m.client_id, m.email, m.flow) for m in plan.moves] == [
        (U2, "other@x", "xtls-rprx-vision"),
        (U1.upper(), "last@x", "xtls-rprx-vision"),
    ]
    assert plan.emptied == (1,) and plan.dropped == ()
    assert plan.notes == (
        (
            f"client {U1.upper()} is listed 2 times in inbound 'vless-reality' (vless, port 443): "
            "Xray serves the last entry (email 'last@x', flow 'xtls-rprx-vision'), and its key "
            "keeps that one"
        ),
    )
    assert f"note: {plan.notes[0]}" in plan.lines()
    config, keys = migrate(source, plan)
    inbound = next(i for i in config["inbounds"] if i.get("tag") == keys[1].tag)
    assert inbound["settings"]["clients"] == [clients[2]]
    assert "vless-reality" not in [i.get("tag") for i in config["inbounds"]]


def test_a_uuid_listed_twice_stays_whole_when_its_client_cannot_move() -> None:
    source = shared_config()
    source["inbounds"][1]["settings"]["clients"] = [{"id": U1, "email": "a"}, {"id": U1}]
    plan = plan_migration(source, PortRange(10001, 10001), {10001}, opts_for())
    assert plan.unplaced == (U1,) and plan.emptied == ()
    config = apply_migration(source, plan)
    assert config["inbounds"][1]["settings"]["clients"] == [{"id": U1, "email": "a"}, {"id": U1}]


# --- 5. the CLI waits for a long operation and shows how far it got ----------------------------


class SlowDaemon(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    """A stand-in for a daemon busy with a long migration: the migration answers after
    `delay` seconds, any other request of the lock's after `delay` too, and the operation's
    progress at once (as the real daemon answers it without its lock)."""

    daemon_threads = True

    def __init__(self, path: str, delay: float) -> None:
        self.delay, self.asked = delay, 0
        super().__init__(path, SlowHandler)

    def handle_error(self, *_: Any) -> None:
        """A client that gave up closed its end (the busy call): nothing to report."""


class SlowHandler(http.server.BaseHTTPRequestHandler):
    server: SlowDaemon

    def do_GET(self) -> None:
        if self.path == "/api/system/operation":
            self.server.asked += 1
            done = min(5000, 1000 * self.server.asked)
            self.answer(
                {
                    "operation": "migrate",
                    "phase": "installing counters",
                    "done": done,
                    "total": 5000,
                    "seconds": 2.0 * self.server.asked,
                }
            )
        else:
            time.sleep(self.server.delay)
            self.answer({"keys": []})

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["content-length"] or 0))
        time.sleep(self.server.delay)
        self.answer(
            {
                "dry_run": False,
                "plan": ["move a (a) from x port 443 to port 20001"],
                "created": [],
                "timestamp": 0,
            }
        )

    def answer(self, payload: dict[str, Any]) -> None:
        body = json.dumps(payload).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_: Any) -> None:
        pass


@pytest.fixture
def slow_daemon(tmp_path: Path) -> Iterator[tuple[str, SlowDaemon]]:
    path = str(tmp_path / "pm.sock")
    server = SlowDaemon(path, delay=1.5)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield path, server
    finally:
        server.shutdown()
        server.server_close()


def test_a_busy_daemon_is_called_busy_with_what_it_does(
    slow_daemon: tuple[str, SlowDaemon],
) -> None:
    path, _ = slow_daemon
    with pytest.raises(cli.DaemonBusy) as caught:
        cli.Client(path, timeout=0.3).call("GET", "/api/keys")
    assert str(caught.value) == (
        f"the portmeter daemon at {path} is busy: no answer within 0.3 s (migrate: installing "
        "counters 1000/5000 (2 s)); it carries on with the request"
    )
    with pytest.raises(cli.CliError, match="^cannot reach the portmeter daemon at /nonexistent"):
        cli.Client("/nonexistent/pm.sock").call("GET", "/api/keys")


def test_migrate_waits_showing_progress_on_stderr(
    slow_daemon: tuple[str, SlowDaemon],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path, _ = slow_daemon
    monkeypatch.setattr(cli, "CALL_TIMEOUT", 0.3)  # what a 30-s answer was to a 5,000 migration
    monkeypatch.setattr(cli, "PROGRESS_AFTER", 0.4)
    monkeypatch.setattr(cli, "PROGRESS_EVERY", 0.4)
    assert cli.main(["--socket", path, "migrate", "/etc/xray/config.json"]) == 0
    out, err = capsys.readouterr()
    assert out == "migrated:\n  move a (a) from x port 443 to port 20001\n"
    lines = err.splitlines()
    assert 2 <= len(lines) <= 4, err
    assert lines[0] == "portmeter: migrate: installing counters 1000/5000 (2 s)"
    assert lines[1] == "portmeter: migrate: installing counters 2000/5000 (4 s)"
    assert cli.main(["--socket", path, "--json", "migrate", "/etc/xray/config.json"]) == 0
    assert json.loads(capsys.readouterr().out)["plan"] == [
        "move a (a) from x port 443 to port 20001"
    ]


# --- 6. another file than the live config -----------------------------------------------------


def test_another_file_replaces_the_live_config_only_when_asked(tmp_path: Path) -> None:
    other = tmp_path / "other.json"
    source = shared_config()
    source["inbounds"] = [source["inbounds"][1]]  # the shared inbound alone, no VMess, no API
    source["routing"] = {"rules": [{"type": "field", "ip": ["geoip:private"], "outboundTag": "x"}]}
    del source["log"]
    other.write_text(json.dumps(source))
    with inprocess_daemon(xray_config=shared_config()) as daemon:
        live = daemon.rig.xray_config
        original, state = live.read_bytes(), daemon.state_bytes()
        for dry in (True, False):
            body = {"config_path": str(other), "dry_run": dry}
            refused = daemon.api("POST", "/api/system/xray/migrate", expect=422, json=body)
            assert refused["detail"] == (
                f"{other} is not the live Xray config {live}: migrating it replaces that config "
                'entirely, with its own inbounds and routing; pass --replace (API: "replace": '
                "true) to do so, and --dry-run first to see what goes"
            )
        assert live.read_bytes() == original and daemon.state_bytes() == state
        body = {"config_path": str(other), "dry_run": True, "replace": True}
        plan = daemon.api("POST", "/api/system/xray/migrate", json=body)["plan"]
        assert [line for line in plan if line.startswith("replace ")] == [
            f"replace {live}: its inbound 'api' (dokodemo-door, port 62789) goes",
            f"replace {live}: its inbound 'vmess-old' (vmess, port 8443) goes",
            f"replace {live}: its section 'log' goes (the source has none)",
            f"replace {live}: its section 'routing' goes for the source's",
        ]
        assert sum(line.startswith("move ") for line in plan) == len(CLIENTS)
        assert live.read_bytes() == original
        done = daemon.api("POST", "/api/system/xray/migrate", json={**body, "dry_run": False})
        assert len(done["created"]) == len(CLIENTS)
        migrated = json.loads(live.read_text())
        assert migrated["routing"] == source["routing"] and "log" not in migrated
        daemon.api("POST", "/api/system/xray/migrate/rollback")
        assert live.read_bytes() == original
        # The live config under another name is the live config: no --replace needed.
        alias = tmp_path / "alias.json"
        alias.hardlink_to(live)
        body = {"config_path": str(alias), "dry_run": True}
        assert daemon.api("POST", "/api/system/xray/migrate", json=body)["plan"][0].startswith(
            "move "
        )


# --- 7. VLESS Encryption: the links carry the client half -------------------------------------


def b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def mlkem_pair(seed: bytes) -> tuple[str, str]:
    """An ML-KEM-768 seed and its encapsulation key, as `xray mlkem768` prints them."""
    public = mlkem.MLKEM768PrivateKey.from_seed_bytes(seed).public_key()
    return b64url(seed), b64url(public.public_bytes(Encoding.Raw, PublicFormat.Raw))


def test_the_client_encryption_is_the_public_half_of_the_decryption() -> None:
    seed, encapsulation = mlkem_pair(bytes(range(64)))
    x25519_private, x25519_public = RFC7748[1][2], RFC7748[1][3]  # RFC 7748 section 6.1
    decryption = f"mlkem768x25519plus.xorpub.600s.100-35-75.{x25519_private}.{seed}"
    assert client_encryption(decryption) == (
        f"mlkem768x25519plus.xorpub.0rtt.{x25519_public}.{encapsulation}"
    )
    assert client_encryption("none") == "none"
    refused = {
        None: 'VLESS settings: please add/set "decryption":"none" to every settings',
        ("none",): 'VLESS settings: please add/set "decryption":"none" to every settings',
        "": 'VLESS settings: please add/set "decryption":"none" to every settings',
        "None": 'VLESS settings: unsupported "decryption": None',
        "mlkem768x25519plus.native.600s": "",
        "mlkem768x25519plus.fast.600s." + x25519_private: "",
        "mlkem768x25519plus.native.ten." + x25519_private: "",
        "mlkem768x25519plus.native.0s." + b64url(bytes(33)): "",
        "mlkem768x25519plus.native.0s.100-35-75": "",
    }
    for value, message in refused.items():
        with pytest.raises(ValueError) as caught:
            client_encryption(value)
        assert str(caught.value) == (
            message or f'VLESS settings: unsupported "decryption": {value}'
        )


def encrypted_config(decryption: object) -> dict[str, Any]:
    config = shared_config()
    settings = config["inbounds"][1]["settings"]
    settings["clients"] = settings["clients"][:2]
    if decryption is None:
        del settings["decryption"]
    else:
        settings["decryption"] = decryption
    return config


def test_an_encrypted_inbound_migrates_and_its_links_carry_the_clients_encryption() -> None:
    seed, encapsulation = mlkem_pair(bytes(range(1, 65)))
    source = encrypted_config(f"mlkem768x25519plus.native.600s.{seed}")
    plan = plan_migration(source, RANGE, set(), opts_for())
    assert len(plan.moves) == 2 and plan.skipped[1:] == (plan.skipped[1],)
    config, keys = migrate(source, plan)
    for key in keys:
        fields = link_fields(vless_link(key, opts_for(), REALITY))
        assert fields["encryption"] == f"mlkem768x25519plus.native.0rtt.{encapsulation}"
        inbound = next(i for i in config["inbounds"] if i.get("tag") == key.tag)
        assert inbound["settings"]["decryption"] == source["inbounds"][1]["settings"]["decryption"]
    plain, _ = migrate(shared_config(), plan_migration(shared_config(), RANGE, set(), opts_for()))
    assert drift(config, keys, opts_for(), RANGE) == [] and plain


@pytest.mark.parametrize(
    ("decryption", "fallbacks", "reason"),
    [
        (None, False, 'VLESS settings: please add/set "decryption":"none" to every settings'),
        (
            "mlkem768x25519plus.native",
            False,
            'VLESS settings: unsupported "decryption": mlkem768x25519plus.native',
        ),
        (
            f"mlkem768x25519plus.random.0s.{RFC7748[0][2]}",
            True,
            'VLESS settings: "fallbacks" can not be used together with "decryption"',
        ),
    ],
    ids=["missing", "unsupported", "with-fallbacks"],
)
def test_vless_settings_xray_refuses_are_skipped_in_its_words(
    decryption: str | None, fallbacks: bool, reason: str
) -> None:
    source = encrypted_config(decryption)
    if fallbacks:
        source["inbounds"][1]["settings"]["fallbacks"] = [{"dest": 8080}]
    plan = plan_migration(source, RANGE, set(), opts_for())
    assert plan.is_empty and plan.skipped[1] == (
        f"skip inbound 'vless-reality' (vless, port 443): Xray refuses its VLESS settings "
        f"({reason}); left as it is"
    )


# --- 8. REALITY settings: what Xray accepts is accepted, what it refuses is named --------------


def reality_config(stream: dict[str, Any] | None = None, **reality: Any) -> dict[str, Any]:
    config = shared_config()
    inbound = config["inbounds"][1]
    inbound["settings"]["clients"] = inbound["settings"]["clients"][:1]
    settings = inbound["streamSettings"]["realitySettings"]
    for name, value in reality.items():
        if value is None:
            settings.pop(name, None)
        else:
            settings[name] = value
    inbound["streamSettings"].update(stream or {})
    return config


@pytest.mark.parametrize(
    ("stream", "reality"),
    [
        ({}, {"serverNames": [""]}),
        ({}, {"serverNames": ["", "www.example.org"]}),
        ({}, {"shortIds": ["AB12CD34", ""]}),
        ({"security": "Reality"}, {}),
        ({"security": "REALITY", "network": "RAW"}, {}),
        ({}, {"dest": None, "target": 8443}),
        ({}, {"dest": "8443"}),
        ({}, {"dest": "@@nginx-reality"}),
        ({}, {"dest": "[2001:db8::1]:443", "xver": 2}),
        ({"network": "grpc", "grpcSettings": {"serviceName": "g"}}, {"minClientVer": "25.1"}),
        ({"network": "xhttp"}, {"maxTimeDiff": 60000, "maxClientVer": "26.3.27"}),
    ],
    ids=[
        "no-sni-only",
        "no-sni-first",
        "upper-case-short-id",
        "security-Reality",
        "security-REALITY",
        "target-number",
        "dest-port",
        "dest-abstract-socket",
        "dest-ipv6",
        "grpc-min-version",
        "xhttp",
    ],
)
def test_reality_settings_xray_accepts_migrate(
    stream: dict[str, Any], reality: dict[str, Any]
) -> None:
    source = reality_config(stream, **reality)
    plan = plan_migration(source, RANGE, set(), opts_for())
    assert [m.uuid for m in plan.moves] == [CLIENTS[0][0]], plan.skipped
    config, keys = migrate(source, plan)
    assert drift(config, keys, opts_for(), RANGE) == [] and check_config(config, opts_for()) == []
    fields = link_fields(vless_link(keys[0], opts_for(), REALITY))
    names = source["inbounds"][1]["streamSettings"]["realitySettings"]["serverNames"]
    assert fields["security"] == "reality"
    assert fields["sni"] == next((n for n in names if n), "")
    short_ids = source["inbounds"][1]["streamSettings"]["realitySettings"]["shortIds"]
    assert fields["sid"] == next(s for s in short_ids if s).lower()


@pytest.mark.parametrize(
    ("stream", "reality", "reason"),
    [
        ({}, {"serverNames": []}, 'empty "serverNames"'),
        ({}, {"serverNames": None}, 'empty "serverNames"'),
        ({}, {"shortIds": []}, 'empty "shortIds"'),
        ({}, {"shortIds": ["abc"]}, 'invalid "shortIds[0]": abc'),
        (
            {},
            {"shortIds": ["", "0123456789abcdef01"]},
            'too long "shortIds[1]": 0123456789abcdef01',
        ),
        ({}, {"shortIds": ["zz"]}, 'invalid "shortIds[0]": zz'),
        ({}, {"privateKey": ""}, 'empty "privateKey"'),
        ({}, {"privateKey": RFC7748[0][2] + "="}, f'invalid "privateKey": {RFC7748[0][2]}='),
        ({}, {"dest": ""}, 'please fill in a valid value for "target"'),
        ({}, {"dest": "www.example.org"}, 'please fill in a valid value for "target"'),
        ({}, {"dest": None}, 'no "dest" (or "target"): Xray reads these settings as a client\'s'),
        ({}, {"xver": 3}, 'invalid PROXY protocol version, "xver" only accepts 0, 1, 2'),
        ({}, {"minClientVer": "1.2.3.4"}, 'invalid "minClientVer": 1.2.3.4'),
        (
            {},
            {"mldsa65Seed": RFC7748[0][2]},
            f'"mldsa65Seed" and "privateKey" can not be the same value: {RFC7748[0][2]}',
        ),
        ({"network": "ws"}, {}, "REALITY only supports RAW, XHTTP and gRPC for now."),
    ],
    ids=[
        "names-empty",
        "names-missing",
        "short-ids-empty",
        "short-id-odd",
        "short-id-long",
        "short-id-not-hex",
        "private-key-empty",
        "private-key-padded",
        "dest-empty",
        "dest-no-port",
        "no-dest",
        "xver",
        "client-version",
        "mldsa65-seed",
        "websocket",
    ],
)
def test_reality_settings_xray_refuses_are_skipped_in_its_words(
    stream: dict[str, Any], reality: dict[str, Any], reason: str
) -> None:
    source = reality_config(stream, **reality)
    source["inbounds"][1]["streamSettings"]["realitySettings"]["privateKey"] = reality.get(
        "privateKey", RFC7748[0][2]
    )
    plan = plan_migration(source, RANGE, set(), opts_for())
    assert plan.is_empty and plan.skipped[1] == (
        f"skip inbound 'vless-reality' (vless, port 443): Xray refuses its REALITY settings "
        f"({reason}); left as it is"
    )


# --- properties -----------------------------------------------------------------------------


@st.composite
def crowded_configs(draw: st.DrawFn) -> dict[str, Any]:
    """The shared config with operator inbounds on ports, ranges and lists of the key range (and
    on unix sockets), and clients whose ids come in any spelling, some listed twice."""
    config = shared_config()
    spans = draw(st.lists(st.tuples(st.integers(10001, 10030), st.integers(0, 4)), max_size=4))
    for n, (first, width) in enumerate(spans):
        port: Any = first if width == 0 else f"{first}-{first + width}"
        if draw(st.booleans()):
            port = f"{first},{first + width + 2}"
        inbound = {"tag": f"op{n}", "port": port, "protocol": "socks", "settings": {}}
        if draw(st.booleans()):
            inbound["listen"] = f"@op{n}"
        config["inbounds"].append(inbound)
    uuids = draw(st.lists(st.uuids(version=4).map(str), min_size=1, max_size=8, unique=True))
    listed = uuids + draw(st.lists(st.sampled_from(uuids), max_size=3))
    spell = [str, str.upper, lambda u: u.replace("-", "")]
    config["inbounds"][1]["settings"]["clients"] = [
        {"id": draw(st.sampled_from(spell))(u), "email": f"e{n}"} for n, u in enumerate(listed)
    ]
    return config


@given(crowded_configs())
@settings(max_examples=60, deadline=None)
def test_no_key_gets_a_port_another_inbound_listens_on(config: dict[str, Any]) -> None:
    plan = plan_migration(config, PortRange(10001, 10040), set(), opts_for())
    held = {
        p
        for inbound in config["inbounds"]
        if inbound["protocol"] == "socks" and "listen" not in inbound
        for part in str(inbound["port"]).split(",")
        for p in range(int(part.split("-")[0]), int(part.split("-")[-1]) + 1)
    }
    ports = [m.port for m in plan.moves]
    assert len(set(ports)) == len(ports) and not set(ports) & held
    clients = config["inbounds"][1]["settings"]["clients"]
    served = {xray_uuid(c["id"]): c for c in clients}  # the last entry of each uuid
    assert {m.uuid: m.inbound["settings"]["clients"] for m in plan.moves} == {  # type: ignore[index]
        u: [served[u]] for u in [m.uuid for m in plan.moves]
    }
    migrated, keys = migrate(config, plan)
    assert plan_migration(migrated, PortRange(10001, 10040), set(), opts_for()).is_empty
    shared = [p.message for p in drift_report(migrated, keys, opts_for()) if p.kind == "duplicate"]
    assert not [m for m in shared if int(m.split()[1]) in ports]  # the operator's own clash stays


class HeldSide(XraySide):
    """The Xray side, whose push waits for `release`: a migration held in its write step."""

    release: threading.Event

    async def push(self, state: Any, **options: Any) -> Any:
        await anyio.to_thread.run_sync(self.release.wait)
        return await super().push(state, **options)


def test_the_operation_under_way_is_answered_while_it_holds_the_daemon() -> None:
    HeldSide.release = threading.Event()
    with inprocess_daemon(xray_config=shared_config(), side=HeldSide) as daemon:
        rig = daemon.rig
        running = daemon.portal.start_task_soon(
            lambda: rig.service.migrate(rig.xray_config, dry_run=False)
        )
        try:
            writing = "writing and applying Xray's config, saving the keys"
            deadline = time.monotonic() + 10
            while (answer := daemon.api("GET", "/api/system/operation"))["phase"] != writing:
                assert time.monotonic() < deadline, answer
            assert answer["operation"] == "migrate" and answer["seconds"] >= 0
            assert rig.service.lock.locked()  # answered while the migration holds the lock
        finally:
            HeldSide.release.set()
        assert len(running.result(10)[1]) == len(CLIENTS)
        assert daemon.api("GET", "/api/system/operation")["operation"] is None
