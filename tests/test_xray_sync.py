"""xray_sync: rendering, REALITY keys, links, files, applying, drift and migration."""

from __future__ import annotations

import base64
import copy
import json
import os
import shlex
import stat
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import anyio
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from daemon.allocator import PortRange
from daemon.bounds import XRAY_API_BATCH
from daemon.xray.drift import check_config, drift, drift_report
from daemon.xray.links import subscription, url_host, vless_link
from daemon.xray.migration import MigrationPlan, apply_migration, plan_migration
from daemon.xray.model import (
    Reality,
    XrayApplyError,
    XrayConfigError,
    XrayKey,
    XrayOptions,
    is_portmeter_inbound,
    parse_keys,
    tag_uuid,
    xray_uuid,
)
from daemon.xray.reality import (
    decode_key,
    generate_reality,
    new_short_id,
    public_key,
    reality_from_private,
)
from daemon.xray.render import (
    InboundChanges,
    api_problems,
    inbound_changes,
    minimal_base,
    render_config,
    render_inbound,
    with_api,
)
from daemon.xray_sync import (
    LiveConfig,
    XrayApplier,
    XrayFiles,
    api_add_command,
    api_remove_command,
    config_status,
    failure_line,
    read_source,
    validate_command,
)
from tests.xray_harness import link_fields

# RFC 7748 section 6.1 (X25519 Diffie-Hellman), the keys re-encoded as base64url without padding.
RFC7748 = [
    (
        "77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a",
        "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a",
        "dwdtCnMYpX08FsFyUbJmRd9ML4frwJkqsXf7pR25LCo",
        "hSDwCYkwp1R0i33ctD73Wg2_Og0mOBr066SpjqqbTmo",
    ),
    (
        "5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb",
        "de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f",
        "XasIfmJKikt54X-Lg4AO5m87sSkmGLb9HC-LJ_-I4Os",
        "3p7bfXt9wbTTW2HC7OQ1Nz-DQ8hbeGdNrfx-FG-IK08",
    ),
]
REALITY = Reality(RFC7748[0][2], RFC7748[0][3])
U1 = "7f1c2b1e-1b2a-4c3d-9e8f-0123456789ab"
U2 = "0b6c1f7a-95a1-4e0e-8d7e-5a3c2d1e0f9b"
U3 = "c3a4e5f6-0718-4293-a4b5-c6d7e8f90a1b"
U4 = "5d2e8a90-3b4c-4d5e-8f60-718293a4b5c6"


def opts_for(tmp_path: Path | None = None, **overrides: Any) -> XrayOptions:
    base = Path("/nonexistent") if tmp_path is None else tmp_path
    values: dict[str, Any] = {
        "config_path": base / "xray" / "config.json",
        "xray_bin": base / "no-xray-here",
        "reality_dest": "dest.example:443",
        "reality_server_names": ("dest.example", "www.dest.example"),
        "public_host": "vpn.example.net",
    }
    values.update(overrides)
    return XrayOptions(**values)


def key(u: str = U1, port: int = 10001, name: str = "alice", **extra: Any) -> XrayKey:
    return XrayKey(id=f"id-{port}", name=name, uuid=u, port=port, short_id="0123abcd", **extra)


# --- rendering -----------------------------------------------------------------------------


def test_inbound_has_the_seed_shape() -> None:
    assert render_inbound(key(), opts_for(), REALITY) == {
        "port": 10001,
        "protocol": "vless",
        "settings": {
            "clients": [{"id": U1, "flow": "xtls-rprx-vision", "email": "alice"}],
            "decryption": "none",
        },
        "streamSettings": {
            "network": "tcp",
            "security": "reality",
            "realitySettings": {
                "show": False,
                "dest": "dest.example:443",
                "xver": 0,
                "serverNames": ["dest.example", "www.dest.example"],
                "privateKey": REALITY.private_key,
                "shortIds": ["0123abcd"],
                "maxTimeDiff": 0,
            },
        },
        "tag": f"inbound-{U1}",
    }


def test_plain_inbound_for_tests_has_no_flow_and_no_reality() -> None:
    inbound = render_inbound(key(), opts_for(security="none"))
    assert inbound["streamSettings"] == {"network": "tcp", "security": "none"}
    assert inbound["settings"]["clients"][0]["flow"] == ""


def test_listen_only_when_configured_and_per_key_overrides() -> None:
    assert "listen" not in render_inbound(key(), opts_for(), REALITY)
    own = Reality(RFC7748[1][2], RFC7748[1][3])
    inbound = render_inbound(
        key(reality=own, flow="", extra_short_ids=("ff",)), opts_for(listen="::"), REALITY
    )
    assert inbound["listen"] == "::"
    assert inbound["settings"]["clients"][0]["flow"] == ""
    assert inbound["streamSettings"]["realitySettings"]["privateKey"] == own.private_key
    assert inbound["streamSettings"]["realitySettings"]["shortIds"] == ["0123abcd", "ff"]


def test_server_names_default_to_the_dest_host() -> None:
    opts = opts_for(reality_server_names=())
    names = render_inbound(key(), opts, REALITY)["streamSettings"]["realitySettings"]["serverNames"]
    assert names == ["dest.example"]


def test_rendering_needs_dest_and_a_key_pair() -> None:
    with pytest.raises(XrayConfigError, match="PORTMETER_REALITY_DEST"):
        render_inbound(key(), opts_for(reality_dest=""), REALITY)
    with pytest.raises(XrayConfigError, match="no REALITY key pair"):
        render_inbound(key(), opts_for())


def test_key_validates_uuid_port_and_short_id() -> None:
    assert key(U1.upper()).uuid == U1
    assert key(uuid.UUID(U1)).tag == f"inbound-{U1}"  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        key("not-a-uuid")
    with pytest.raises(ValueError):
        key(port=0)
    with pytest.raises(ValueError, match="short id"):
        XrayKey("x", "x", U1, 10001, short_id="abc")


def test_render_config_replaces_only_portmeter_inbounds() -> None:
    lookalike = {  # right tag, but two clients: the operator's, kept as is
        "port": 443,
        "protocol": "vless",
        "tag": f"inbound-{U3}",
        "settings": {"clients": [{"id": U3}, {"id": U2}], "decryption": "none"},
    }
    stale = render_inbound(key(U2, 10005, "gone"), opts_for(), REALITY)
    base = {
        "log": {"loglevel": "info", "access": "/var/log/xray/access.log"},
        "api": {"tag": "api", "services": ["StatsService"]},
        "inbounds": [{"tag": "socks", "port": 1080, "protocol": "socks"}, stale, lookalike],
        "outbounds": [{"protocol": "freedom"}],
        "routing": {"rules": [{"type": "field", "ip": ["geoip:private"], "outboundTag": "block"}]},
        "policy": {"levels": {"0": {"statsUserUplink": True}}},
    }
    before = copy.deepcopy(base)
    keys = [key(U1, 10002), key(U3, 10001, "carol")]
    config = render_config(base, keys, opts_for(), REALITY)
    assert base == before  # the input is not mutated
    assert [i.get("tag") for i in config["inbounds"]] == [
        "socks",
        f"inbound-{U3}",
        f"inbound-{U3}",
        f"inbound-{U1}",
    ]
    assert config["inbounds"][1] is not lookalike and config["inbounds"][1] == lookalike
    assert parse_keys(config) == {U3: 10001, U1: 10002}
    assert {k: v for k, v in config.items() if k != "inbounds"} == {
        k: v for k, v in base.items() if k != "inbounds"
    }
    assert list(config) == list(base)  # sections keep their order
    # the look-alike collides with carol's tag: validation refuses instead of deleting it
    assert any("used by 2 inbounds" in p for p in check_config(config, opts_for()))


def test_render_config_on_missing_file_uses_the_minimal_base() -> None:
    config = render_config(minimal_base(), [key()], opts_for(), REALITY)
    assert config["log"] == {"loglevel": "warning"}
    assert [o["protocol"] for o in config["outbounds"]] == ["freedom", "blackhole"]
    assert parse_keys(config) == {U1: 10001}
    assert render_config({"outbounds": []}, [], opts_for(), REALITY) == {"outbounds": []}


def test_render_config_rejects_keys_sharing_a_port_or_uuid() -> None:
    with pytest.raises(XrayConfigError, match="port 10001"):
        render_config({}, [key(U1), key(U2)], opts_for(), REALITY)
    with pytest.raises(XrayConfigError, match="uuid"):
        render_config({}, [key(U1, 10001), key(U1, 10002)], opts_for(), REALITY)
    with pytest.raises(XrayConfigError, match="not a list"):
        render_config({"inbounds": {}}, [key()], opts_for(), REALITY)


@pytest.mark.parametrize(
    ("inbound", "ours"),
    [
        (
            {"protocol": "vless", "tag": f"inbound-{U1}", "settings": {"clients": [{"id": U1}]}},
            True,
        ),
        (
            {
                "protocol": "vless",
                "tag": f"inbound-{U1.upper()}",
                "settings": {"clients": [{"id": U1}]},
            },
            False,
        ),
        (
            {"protocol": "vmess", "tag": f"inbound-{U1}", "settings": {"clients": [{"id": U1}]}},
            False,
        ),
        (
            {"protocol": "vless", "tag": f"inbound-{U1}", "settings": {"clients": [{"id": U2}]}},
            False,
        ),
        ({"protocol": "vless", "tag": f"inbound-{U1}", "settings": {"clients": []}}, False),
        ({"protocol": "vless", "tag": "inbound-1", "settings": {"clients": [{"id": U1}]}}, False),
        ({"protocol": "vless", "tag": f"inbound-{U1}", "settings": None}, False),
        ("not an object", False),
    ],
)
def test_which_inbounds_are_portmeters(inbound: Any, ours: bool) -> None:
    assert is_portmeter_inbound(inbound) is ours


def test_tag_uuid() -> None:
    assert tag_uuid(f"inbound-{U1}") == U1
    assert tag_uuid(f"inbound-{U1.replace('-', '')}") is None
    assert tag_uuid(None) is None


def test_api_mode_adds_only_what_is_missing() -> None:
    opts = opts_for(apply="api", api_address="127.0.0.1:62789")
    config = render_config(minimal_base(), [key()], opts, REALITY)
    assert config["api"] == {"tag": "api", "services": ["HandlerService"]}
    assert config["inbounds"][0] == {
        "listen": "127.0.0.1",
        "port": 62789,
        "protocol": "dokodemo-door",
        "settings": {"address": "127.0.0.1"},
        "tag": "api",
    }
    assert config["routing"]["rules"][0] == {
        "type": "field",
        "inboundTag": ["api"],
        "outboundTag": "api",
    }
    assert api_problems(config, opts) == []
    assert render_config(config, [key()], opts, REALITY) == config  # idempotent
    listening = {"api": {"tag": "x", "listen": "127.0.0.1:1", "services": ["HandlerService"]}}
    assert with_api(listening, opts) == listening
    assert len(api_problems({}, opts)) == 1
    assert len(api_problems({"api": {"tag": "api", "services": []}}, opts)) == 3


def test_inbound_changes() -> None:
    opts = opts_for()
    old = render_config({}, [key(U1, 10001), key(U2, 10002)], opts, REALITY)
    new = render_config({}, [key(U1, 10001), key(U2, 10003), key(U3, 10004)], opts, REALITY)
    changes = inbound_changes(old, new)
    assert changes.removed == (f"inbound-{U2}",)
    assert [i["tag"] for i in changes.added] == [f"inbound-{U2}", f"inbound-{U3}"]
    assert not inbound_changes(new, copy.deepcopy(new))


# --- property tests ------------------------------------------------------------------------

json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-(2**31), 2**31), st.text(max_size=8))
json_value = st.recursive(
    json_leaf,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)
uuids = st.uuids().map(str)


@st.composite
def foreign_inbound(draw: st.DrawFn) -> dict[str, Any]:
    kind = draw(st.sampled_from(["plain", "lookalike", "shared"]))
    inbound: dict[str, Any] = {
        "port": draw(st.integers(1, 65535)),
        "protocol": draw(st.sampled_from(["vless", "vmess", "trojan", "socks", "dokodemo-door"])),
        "tag": draw(st.text(max_size=12)),
    }
    if kind == "lookalike":  # the tag of a portmeter inbound, but not its client
        inbound.update(protocol="vless", tag=f"inbound-{draw(uuids)}")
        inbound["settings"] = {"clients": [{"id": draw(uuids)}]}
    elif kind == "shared":
        inbound["settings"] = {
            "clients": draw(st.lists(st.builds(lambda u: {"id": u}, uuids), max_size=4))
        }
    extra = draw(
        st.dictionaries(st.sampled_from(["sniffing", "allocate", "x"]), json_value, max_size=2)
    )
    return {**inbound, **extra}


@st.composite
def key_sets(draw: st.DrawFn) -> list[XrayKey]:
    ports = draw(st.lists(st.integers(1, 65535), unique=True, max_size=8))
    ids = draw(st.lists(uuids, unique=True, min_size=len(ports), max_size=len(ports)))
    names = draw(
        st.lists(st.text(min_size=1, max_size=10), min_size=len(ports), max_size=len(ports))
    )
    short = st.sampled_from(["", "ab", "0123456789abcdef"])
    return [
        XrayKey(f"k{n}", name, u, port, short_id=draw(short))
        for n, (port, u, name) in enumerate(zip(ports, ids, names, strict=True))
    ]


@st.composite
def base_configs(draw: st.DrawFn) -> dict[str, Any]:
    sections = draw(
        st.dictionaries(
            st.sampled_from(
                ["log", "api", "dns", "routing", "policy", "stats", "outbounds", "x-mine"]
            ),
            json_value,
            max_size=5,
        )
    )
    stale = [
        render_inbound(k, opts_for(), REALITY) for k in draw(key_sets())
    ]  # earlier portmeter inbounds
    inbounds = draw(st.lists(foreign_inbound(), max_size=5)) + stale
    draw(st.randoms()).shuffle(inbounds)
    return {**sections, "inbounds": inbounds}


@given(base=base_configs(), keys=key_sets(), security=st.sampled_from(["reality", "none"]))
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_render_parse_round_trip_and_the_rest_untouched(
    base: dict[str, Any], keys: list[XrayKey], security: str
) -> None:
    opts = opts_for(security=security)
    before = copy.deepcopy(base)
    config = render_config(base, keys, opts, REALITY)
    assert base == before
    assert parse_keys(config) == {k.uuid: k.port for k in keys}
    foreign = [i for i in base["inbounds"] if not is_portmeter_inbound(i)]
    assert config["inbounds"][: len(foreign)] == foreign
    ours = config["inbounds"][len(foreign) :]
    assert [i["port"] for i in ours] == sorted(k.port for k in keys)
    assert {k: v for k, v in config.items() if k != "inbounds"} == {
        k: v for k, v in base.items() if k != "inbounds"
    }
    assert render_config(config, keys, opts, REALITY) == config
    assert json.loads(json.dumps(config)) == config
    # the only possible drift comes from the random operator inbounds themselves
    assert {p.kind for p in drift_report(config, keys, opts)} <= {"duplicate"}


@given(keys=key_sets())
@settings(max_examples=100, deadline=None)
def test_a_rendered_config_has_no_drift(keys: list[XrayKey]) -> None:
    opts = opts_for()
    config = render_config(minimal_base(), keys, opts, REALITY)
    assert drift(config, keys, opts, PortRange(1, 65535), REALITY) == []
    assert check_config(config, opts, keys) == []


# --- REALITY keys --------------------------------------------------------------------------


@pytest.mark.parametrize(("private_hex", "public_hex", "private_b64", "public_b64"), RFC7748)
def test_rfc7748_vectors(
    private_hex: str, public_hex: str, private_b64: str, public_b64: str
) -> None:
    assert base64.urlsafe_b64encode(bytes.fromhex(private_hex)).rstrip(b"=").decode() == private_b64
    assert decode_key(private_b64) == bytes.fromhex(private_hex)
    assert public_key(private_b64) == public_b64
    assert decode_key(public_b64) == bytes.fromhex(public_hex)
    assert public_key(private_b64 + "=") == public_b64  # padding tolerated


def test_generated_pairs_match_and_are_clamped_like_xray() -> None:
    pairs = {generate_reality() for _ in range(20)}
    assert len(pairs) == 20
    for pair in pairs:
        assert len(pair.private_key) == 43 and "=" not in pair.private_key
        raw = decode_key(pair.private_key)
        assert raw[0] & 7 == 0 and raw[31] & 128 == 0 and raw[31] & 64 == 64
        derived = X25519PrivateKey.from_private_bytes(raw).public_key().public_bytes_raw()
        assert decode_key(pair.public_key) == derived
        assert reality_from_private(pair.private_key) == pair


@pytest.mark.parametrize("bad", ["", "abc", "A" * 42, "A" * 44, "+" * 43, None])
def test_bad_keys_are_rejected(bad: Any) -> None:
    with pytest.raises(ValueError):
        public_key(bad)


def test_short_ids() -> None:
    ids = {new_short_id() for _ in range(50)}
    assert len(ids) == 50
    assert all(len(i) == 16 and int(i, 16) >= 0 for i in ids)
    assert len(new_short_id(2)) == 2
    for bad in (0, 3, 18):
        with pytest.raises(ValueError):
            new_short_id(bad)


# --- links ---------------------------------------------------------------------------------


def parse_link(link: str) -> tuple[Any, dict[str, str]]:
    parts = urlsplit(link)
    query = parse_qs(parts.query, keep_blank_values=True, strict_parsing=True)
    assert all(len(v) == 1 for v in query.values())
    return parts, {k: v[0] for k, v in query.items()}


def test_reality_link_fields() -> None:
    k = key(name="Алиса & Bob #1")
    parts, query = parse_link(vless_link(k, opts_for(), REALITY))
    assert parts.scheme == "vless"
    assert unquote(parts.username) == U1
    assert parts.hostname == "vpn.example.net"
    assert parts.port == 10001
    assert unquote(parts.fragment) == "Алиса & Bob #1"
    assert query == {
        "type": "tcp",
        "headerType": "none",
        "encryption": "none",
        "security": "reality",
        "pbk": REALITY.public_key,
        "fp": "chrome",
        "sni": "dest.example",
        "sid": "0123abcd",
        "flow": "xtls-rprx-vision",
    }


def test_link_uses_the_keys_own_pair_and_flow() -> None:
    own = Reality(RFC7748[1][2], RFC7748[1][3])
    _, query = parse_link(vless_link(key(reality=own, flow=""), opts_for(), REALITY))
    assert query["pbk"] == own.public_key
    assert "flow" not in query


def test_plain_link_and_ipv6_host() -> None:
    link = vless_link(key(), opts_for(security="none", public_host="2001:db8::1"))
    assert link.startswith(f"vless://{U1}@[2001:db8::1]:10001?")
    parts, query = parse_link(link)
    assert parts.hostname == "2001:db8::1" and parts.port == 10001
    assert query == {"type": "tcp", "headerType": "none", "encryption": "none", "security": "none"}
    assert url_host("[2001:db8::1]") == "[2001:db8::1]"
    assert url_host("198.51.100.7") == "198.51.100.7"


def test_link_needs_a_public_host() -> None:
    with pytest.raises(XrayConfigError, match="PORTMETER_PUBLIC_HOST"):
        vless_link(key(), opts_for(public_host=""), REALITY)


@given(name=st.text(min_size=1, max_size=30), port=st.integers(1, 65535), u=uuids)
@settings(max_examples=100, deadline=None)
def test_any_name_survives_the_link(name: str, port: int, u: str) -> None:
    parts, query = parse_link(vless_link(XrayKey("k", name, u, port), opts_for(), REALITY))
    assert unquote(parts.fragment) == name
    assert (parts.username, parts.port, query["pbk"]) == (u, port, REALITY.public_key)


def test_subscription_is_base64_of_the_links() -> None:
    links = [
        vless_link(key(U1, 10001), opts_for(), REALITY),
        vless_link(key(U2, 10002), opts_for(), REALITY),
    ]
    assert base64.b64decode(subscription(links)).decode().split("\n") == links
    assert subscription([]) == ""


# --- files ---------------------------------------------------------------------------------


def fake_bin(
    tmp_path: Path,
    name: str = "xray",
    exit_code: int = 0,
    stdout: str = "",
    stderr: str = "",
    sleep: float = 0,
) -> tuple[Path, Path]:
    """A stand-in for xray/systemctl: records its argv (tab-separated, one call per line) and the
    content of every *.json argument, prints what it is told and exits with `exit_code`."""
    directory = tmp_path / f"bin-{name}-{exit_code}"
    directory.mkdir(exist_ok=True)
    record = directory / "calls"
    script = directory / name
    script.write_text(
        "#!/bin/sh\n"
        f'{{ for a in "$@"; do printf "%s\\t" "$a"; done; printf "\\n"; }} '
        f">> {shlex.quote(str(record))}\n"
        'for a in "$@"; do case "$a" in *.json) '
        f'cat "$a" >> {shlex.quote(str(record))}.files;; esac; done\n'
        + (f"sleep {sleep}\n" if sleep else "")
        + f"printf '%s\\n' {shlex.quote(stdout)}\n"
        + f"printf '%s\\n' {shlex.quote(stderr)} >&2\n"
        + f"exit {exit_code}\n"
    )
    script.chmod(0o755)
    return script, record


def calls(record: Path) -> list[list[str]]:
    if not record.exists():
        return []
    return [line.rstrip("\t").split("\t") for line in record.read_text().splitlines()]


def test_read_missing_invalid_and_non_object(tmp_path: Path) -> None:
    files = XrayFiles(opts_for(tmp_path))
    assert files.read() == minimal_base()
    files.path.parent.mkdir(parents=True)
    files.path.write_text('{"log": {}, // a comment, as Xray allows\n}')
    with pytest.raises(XrayConfigError, match=f"{files.path} is not valid JSON at line 2, col"):
        files.read()
    files.path.write_text("[1, 2]")
    with pytest.raises(XrayConfigError, match="not a JSON object"):
        files.read()


def test_write_creates_a_private_file_and_skips_identical_writes(tmp_path: Path) -> None:
    files = XrayFiles(opts_for(tmp_path))
    config = render_config(files.read(), [key()], files.opts, REALITY)
    assert files.write(config, expected=[key()]) is None  # nothing to back up yet
    assert stat.S_IMODE(files.path.stat().st_mode) == 0o640
    assert files.read() == config
    assert files.path.read_text().endswith("}\n")
    assert files.write(config) is None and files.backups() == []
    assert [p.name for p in files.path.parent.iterdir()] == ["config.json"]  # no temp left


def test_replacing_keeps_mode_and_owner(tmp_path: Path) -> None:
    files = XrayFiles(opts_for(tmp_path))
    files.path.parent.mkdir(parents=True)
    files.path.write_text("{}")
    files.path.chmod(0o644)
    os.chown(files.path, 65534, 65534)
    before = files.path.stat()
    files.write(render_config(files.read(), [key()], files.opts, REALITY))
    info = files.path.stat()
    assert (stat.S_IMODE(info.st_mode), info.st_uid, info.st_gid) == (0o644, 65534, 65534)
    (backup,) = files.backups()
    # The backup is the previous file itself (a hard link), in a directory only root enters.
    assert backup.read_text() == "{}" and backup.stat().st_ino == before.st_ino
    assert stat.S_IMODE(files.backup_dir.stat().st_mode) == 0o700


@pytest.mark.parametrize(
    ("mutate", "expected", "message"),
    [
        (lambda c: c["inbounds"].append({"port": 10001, "protocol": "socks"}), None, "port 10001"),
        (lambda c: c["inbounds"].append({"tag": "api"}), None, "tag 'api'"),
        (lambda c: c["inbounds"].pop(), "keys", "has no inbound"),
        (
            lambda c: c["inbounds"][-1]["streamSettings"]["realitySettings"].pop("privateKey"),
            None,
            "privateKey",
        ),
        (
            lambda c: c["inbounds"][-1]["streamSettings"]["realitySettings"].update(shortIds=[]),
            None,
            "shortIds",
        ),
        (lambda c: c["inbounds"].append("junk"), None, "not an object"),
        (lambda c: c.update(inbounds={}), None, "not a list"),
        (lambda c: c.update(stats={1, 2}), None, "as JSON"),
    ],
)
def test_invalid_config_never_replaces_the_live_file(
    tmp_path: Path, mutate: Any, expected: Any, message: str
) -> None:
    files = XrayFiles(opts_for(tmp_path, apply="api"))
    keys = [key(U1, 10001), key(U2, 10002)]
    files.write(render_config(files.read(), keys, files.opts, REALITY))
    live = files.path.read_bytes()
    candidate = render_config(files.read(), keys, files.opts, REALITY)
    mutate(candidate)
    with pytest.raises(XrayConfigError, match=message) as caught:
        files.write(candidate, expected=keys if expected else None)
    assert "\n" not in str(caught.value)
    assert files.path.read_bytes() == live
    assert files.backups() == []
    assert sorted(p.name for p in files.path.parent.iterdir()) == ["config.json"]


def test_backups_are_rotated_to_the_newest_n(tmp_path: Path) -> None:
    files = XrayFiles(opts_for(tmp_path, backups=3))
    written = []
    for port in range(10001, 10008):
        config = render_config(files.read(), [key(port=port)], files.opts, REALITY)
        files.write(config)
        written.append(files.path.read_bytes())
    backups = files.backups()
    assert len(backups) == 3
    assert [b.read_bytes() for b in backups] == written[-4:-1]  # the versions before the live one
    assert all(b.parent == files.path.parent / "backups" for b in backups)
    assert XrayFiles(opts_for(tmp_path, backups=0))._backup(b"x") is None


def test_restore_puts_back_the_exact_bytes(tmp_path: Path) -> None:
    files = XrayFiles(opts_for(tmp_path))
    assert files.read_bytes() is None
    files.write(render_config(files.read(), [key()], files.opts, REALITY))
    before = files.read_bytes()
    files.write(render_config(files.read(), [key(), key(U2, 10002)], files.opts, REALITY))
    files.restore(before)
    assert files.read_bytes() == before
    files.restore(None)
    assert not files.path.exists()


def test_labelled_copy_survives_rotation_and_restores_byte_identical(tmp_path: Path) -> None:
    files = XrayFiles(opts_for(tmp_path, backups=1))
    files.path.parent.mkdir(parents=True)
    original = b'{ "inbounds": [],\n  "note": "hand-written, odd spacing" }'
    files.path.write_bytes(original)
    copy_path = files.keep_copy("pre-migration")
    for port in (10001, 10002, 10003):
        files.write(render_config(files.read(), [key(port=port)], files.opts, REALITY))
    assert copy_path.exists() and files.latest_copy("pre-migration") == copy_path
    assert copy_path not in files.backups()
    files.restore_from(copy_path)
    assert files.path.read_bytes() == original
    assert files.latest_copy("other") is None


def test_binary_validation_runs_xray_run_test_on_the_candidate(tmp_path: Path) -> None:
    xray, record = fake_bin(tmp_path, "xray", stdout="Configuration OK.")
    files = XrayFiles(opts_for(tmp_path, xray_bin=xray))
    config = render_config(files.read(), [key()], files.opts, REALITY)
    files.write(config)
    ((argv),) = calls(record)
    assert argv[:3] == ["run", "-test", "-c"]  # "$@": the arguments after the program
    assert argv[3].endswith("/config.json") and argv[3] != str(files.path)
    assert json.loads(Path(f"{record}.files").read_text()) == config


def test_binary_rejection_keeps_the_live_file(tmp_path: Path) -> None:
    files = XrayFiles(opts_for(tmp_path))
    files.write(render_config(files.read(), [key()], files.opts, REALITY))
    live = files.path.read_bytes()
    xray, _ = fake_bin(
        tmp_path,
        "xray",
        exit_code=23,
        stdout=(
            "Xray 1.8.24\n[Info] reading config\n"
            "Failed to start: main: failed to load config files: bad thing"
        ),
    )
    files = XrayFiles(opts_for(tmp_path, xray_bin=xray))
    with pytest.raises(
        XrayConfigError, match="rejected the new config.*Failed to start: .*bad thing"
    ):
        files.write(render_config(files.read(), [key(), key(U2, 10002)], files.opts, REALITY))
    assert files.path.read_bytes() == live and files.backups() == []


def test_binary_validation_timeout(tmp_path: Path) -> None:
    xray, _ = fake_bin(tmp_path, "xray", sleep=5)
    files = XrayFiles(opts_for(tmp_path, xray_bin=xray, command_timeout=0.3))
    with pytest.raises(XrayConfigError, match="did not finish"):
        files.write(render_config(files.read(), [key()], files.opts, REALITY))
    assert not files.path.exists()


def test_validate_command_by_binary_name() -> None:
    assert validate_command(Path("/usr/bin/v2ray"), Path("/t/c.json")) == [
        "/usr/bin/v2ray",
        "-test",
        "-config",
        "/t/c.json",
    ]
    assert validate_command(Path("/usr/local/bin/xray"), Path("/t/c.json")) == [
        "/usr/local/bin/xray",
        "run",
        "-test",
        "-c",
        "/t/c.json",
    ]


def test_config_status(tmp_path: Path) -> None:
    files = XrayFiles(opts_for(tmp_path, apply="restart"))
    status = config_status(files, [key()])
    assert status["exists"] is False and status["last_write"] is None and status["in_sync"] is False
    files.write(render_config(files.read(), [key()], files.opts, REALITY))
    files.write(render_config(files.read(), [key(), key(U2, 10002)], files.opts, REALITY))
    status = config_status(files, [key(), key(U2, 10002)])
    assert status["exists"] is True and status["last_write"].endswith("+00:00")
    assert (status["backup_count"], status["inbound_count"], status["portmeter_inbound_count"]) == (
        1,
        2,
        2,
    )
    assert (status["key_count"], status["in_sync"], status["apply_mode"]) == (2, True, "restart")
    assert status["xray_bin_found"] is False and status["error"] is None
    files.path.write_text("{")
    assert "not valid JSON" in config_status(files, [])["error"]


# --- applying ------------------------------------------------------------------------------


def run(coro_fn: Any, *args: Any, **kwargs: Any) -> Any:
    return anyio.run(lambda: coro_fn(*args, **kwargs))


def test_apply_none_does_nothing(tmp_path: Path) -> None:
    xray, record = fake_bin(tmp_path)
    applier = XrayApplier(opts_for(tmp_path, xray_bin=xray, restart_command=(str(xray),)))
    result = run(applier.apply, InboundChanges(removed=("inbound-x",)), force_restart=True)
    assert (result.mode, result.commands) == ("none", ())
    assert calls(record) == []


def test_restart_runs_the_command_and_reports_time(tmp_path: Path) -> None:
    systemctl, record = fake_bin(tmp_path, "systemctl")
    opts = opts_for(tmp_path, apply="restart", restart_command=(str(systemctl), "restart", "xray"))
    applier = XrayApplier(opts)
    assert run(applier.apply, InboundChanges()).commands == ()  # nothing changed: no restart
    result = run(applier.apply, InboundChanges(removed=("inbound-x",)))
    assert result.mode == "restart" and result.seconds >= 0
    assert calls(record) == [["restart", "xray"]]
    assert run(applier.restart) >= 0


def test_failed_restart_reports_stderr(tmp_path: Path) -> None:
    systemctl, _ = fake_bin(
        tmp_path,
        "systemctl",
        exit_code=1,
        stderr="Job for xray.service failed because the control process exited with error code.\n"
        'See "systemctl status xray.service" for details.',
    )
    applier = XrayApplier(opts_for(tmp_path, apply="restart", restart_command=(str(systemctl),)))
    with pytest.raises(XrayApplyError, match=r"exit 1\): Job for xray.service failed"):
        run(applier.apply, InboundChanges(), force_restart=True)


def test_api_commands_match_xrays_cli() -> None:
    opts = opts_for(xray_bin=Path("/usr/local/bin/xray"), api_address="127.0.0.1:62789")
    assert api_add_command(opts, [Path("/tmp/a.json")]) == [
        "/usr/local/bin/xray",
        "api",
        "adi",
        "--server=127.0.0.1:62789",
        "/tmp/a.json",
    ]
    assert api_remove_command(opts, [f"inbound-{U1}"]) == [
        "/usr/local/bin/xray",
        "api",
        "rmi",
        "--server=127.0.0.1:62789",
        f"inbound-{U1}",
    ]


def test_api_mode_removes_then_adds_single_inbounds(tmp_path: Path) -> None:
    xray, record = fake_bin(tmp_path, "xray")
    opts = opts_for(tmp_path, apply="api", xray_bin=xray)
    old = render_config({}, [key(U1, 10001), key(U2, 10002)], opts, REALITY)
    new = render_config({}, [key(U1, 10001), key(U3, 10003)], opts, REALITY)
    result = run(XrayApplier(opts).apply, inbound_changes(old, new))
    assert result.mode == "api" and len(result.commands) == 2
    rmi, adi = calls(record)
    assert rmi == ["api", "rmi", f"--server={opts.api_address}", f"inbound-{U2}"]
    assert adi[:3] == ["api", "adi", f"--server={opts.api_address}"] and adi[3].endswith(".json")
    sent = json.loads(Path(f"{record}.files").read_text())
    assert sent == {"inbounds": [render_inbound(key(U3, 10003), opts, REALITY)]}


def test_api_mode_adds_many_inbounds_a_few_hundred_per_command(tmp_path: Path) -> None:
    """One process per inbound made a batch of 1,000 keys take 12 s in apply mode api."""
    xray, record = fake_bin(tmp_path, "xray")
    opts = opts_for(tmp_path, apply="api", xray_bin=xray)
    keys = [key(f"00000000-0000-4000-8000-{n:012d}", 10001 + n) for n in range(450)]
    inbounds = [render_inbound(k, opts, REALITY) for k in keys]
    commands = run(XrayApplier(opts).add_inbounds, inbounds)
    made = calls(record)
    assert [len(c) - 3 for c in made] == [XRAY_API_BATCH, XRAY_API_BATCH, 50]
    head = ["api", "adi", f"--server={opts.api_address}"]
    assert len(commands) == 3 and all(c[:3] == head for c in made)
    text, decoder, sent, at = Path(f"{record}.files").read_text(), json.JSONDecoder(), [], 0
    while text[at:].strip():
        at += len(text[at:]) - len(text[at:].lstrip())
        one, at = decoder.raw_decode(text, at)
        sent.append(one["inbounds"])
    assert sent == [[inbound] for inbound in inbounds]  # each file one inbound, in order


def test_api_failure_is_an_apply_error(tmp_path: Path) -> None:
    xray, _ = fake_bin(
        tmp_path, "xray", exit_code=1, stderr="failed to add inbound: existing tag found"
    )
    applier = XrayApplier(opts_for(tmp_path, apply="api", xray_bin=xray))
    inbound = render_inbound(key(), applier.opts, REALITY)
    with pytest.raises(XrayApplyError, match="adding inbound .*existing tag found"):
        run(applier.add_inbounds, [inbound])


def test_removing_an_inbound_xray_does_not_have_is_fine(tmp_path: Path) -> None:
    xray, record = fake_bin(
        tmp_path,
        "xray",
        exit_code=1,
        stderr="failed to remove inbound: rpc error: code = Unknown desc = "
        "not enough information for making a decision",
    )
    applier = XrayApplier(opts_for(tmp_path, apply="api", xray_bin=xray))
    run(applier.remove_inbounds, [f"inbound-{U1}"])
    assert len(calls(record)) == 1


def test_api_not_enabled_gives_a_hint(tmp_path: Path) -> None:
    xray, _ = fake_bin(tmp_path, "xray", exit_code=1, stderr="failed to dial 127.0.0.1:62789")
    applier = XrayApplier(opts_for(tmp_path, apply="api", xray_bin=xray))
    with pytest.raises(XrayApplyError, match="failed to dial .*API enabled"):
        run(applier.apply, InboundChanges(removed=(f"inbound-{U1}",)))


def test_api_mode_refuses_v2ray_and_missing_binaries(tmp_path: Path) -> None:
    applier = XrayApplier(opts_for(tmp_path, apply="api", xray_bin=Path("/usr/bin/v2ray")))
    with pytest.raises(XrayApplyError, match="v2ray"):
        run(applier.remove_inbounds, ["x"])
    applier = XrayApplier(opts_for(tmp_path, apply="api", xray_bin=tmp_path / "missing" / "xray"))
    with pytest.raises(XrayApplyError, match="cannot run"):
        run(applier.remove_inbounds, ["x"])


def test_a_hanging_command_times_out(tmp_path: Path) -> None:
    systemctl, _ = fake_bin(tmp_path, "systemctl", sleep=10)
    opts = opts_for(
        tmp_path, apply="restart", restart_command=(str(systemctl),), command_timeout=0.3
    )
    with pytest.raises(XrayApplyError, match="did not finish within 0.3s"):
        run(XrayApplier(opts).restart)


def test_reachable_checks_the_api_port(tmp_path: Path) -> None:
    assert run(XrayApplier(opts_for(tmp_path)).reachable) is None

    async def probe() -> tuple[bool | None, bool | None]:
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
        port = listener.extra(anyio.abc.SocketAttribute.local_port)
        up = await XrayApplier(
            opts_for(tmp_path, apply="api", api_address=f"127.0.0.1:{port}")
        ).reachable()
        await listener.aclose()
        down = await XrayApplier(
            opts_for(tmp_path, apply="api", api_address=f"127.0.0.1:{port}")
        ).reachable()
        return up, down

    assert run(probe) == (True, False)


def test_failure_line_finds_the_reason() -> None:
    v2ray_panic = (
        b"panic: v2ray.com/core/infra/conf/serial: failed to read config file > invalid port\n\n"
        b"goroutine 1 [running]:\nv2ray.com/core/common.Must(...)\n"
    )
    assert failure_line(b"V2Ray 4.34.0\n", v2ray_panic, 2).startswith("panic: v2ray.com")
    assert failure_line(b"", b"first\nlast\n", 1) == "last"
    assert failure_line(b"out\n", b"", 1) == "out"
    assert failure_line(None, None, 3) == "exit status 3"


# --- drift ---------------------------------------------------------------------------------


def kinds(
    config: dict[str, Any], keys: list[XrayKey], opts: XrayOptions, **kw: Any
) -> list[tuple[str, Any]]:
    return [(p.kind, p.key_id) for p in drift_report(config, keys, opts, **kw)]


def test_drift_finds_each_kind_of_problem() -> None:
    opts = opts_for()
    a, b, c = key(U1, 10001), key(U2, 10002), key(U3, 10003)
    config = render_config({}, [a, b, c], opts, REALITY)
    assert drift(config, [a, b, c], opts, PortRange(10001, 10100), REALITY) == []

    missing = copy.deepcopy(config)
    missing["inbounds"].pop()
    assert kinds(missing, [a, b, c], opts) == [("missing", c.id)]

    moved = render_config({}, [a, key(U2, 10009), c], opts, REALITY)
    assert kinds(moved, [a, b, c], opts) == [("port_mismatch", b.id)]

    other_uuid = render_config({}, [a, b, key(str(uuid.uuid4()), 10003)], opts, REALITY)
    assert kinds(other_uuid, [a, b, c], opts) == [("uuid_mismatch", c.id), ("stale", None)]

    wrong_client = copy.deepcopy(config)
    wrong_client["inbounds"][0]["settings"]["clients"][0]["id"] = U2
    found = kinds(wrong_client, [a, b, c], opts)
    assert found == [("uuid_mismatch", a.id)]

    foreign = copy.deepcopy(config)
    foreign["inbounds"].append({"port": 10050, "protocol": "socks", "tag": "mine"})
    foreign["inbounds"].append({"port": 9000, "protocol": "socks", "tag": "outside"})
    assert kinds(foreign, [a, b, c], opts, port_range=PortRange(10001, 10100)) == [
        ("foreign", None)
    ]

    taken = copy.deepcopy(missing)
    taken["inbounds"].append({"port": 10003, "protocol": "socks", "tag": "squatter"})
    assert kinds(taken, [a, b, c], opts, port_range=PortRange(10001, 10100)) == [("foreign", c.id)]

    assert kinds(config, [a, b], opts) == [("stale", None)]

    no_reality = copy.deepcopy(config)
    del no_reality["inbounds"][1]["streamSettings"]["realitySettings"]["serverNames"]
    no_reality["inbounds"][2]["streamSettings"] = {"network": "tcp", "security": "none"}
    assert kinds(no_reality, [a, b, c], opts) == [("security", b.id), ("security", c.id)]

    other_pair = Reality(RFC7748[1][2], RFC7748[1][3])
    assert kinds(config, [a], opts, reality=other_pair)[0] == ("outdated", a.id)
    message = drift(config, [a], opts, reality=other_pair)[0]
    assert message.endswith(
        "differs from the rendered one in streamSettings.realitySettings.privateKey"
    )
    renamed = opts_for(reality_dest="new.example:443", flow="")
    (problem,) = drift_report(config, [a], renamed, reality=REALITY)[:1]
    assert problem.kind == "outdated" and problem.message.endswith(
        "in settings.clients[0].flow, streamSettings.realitySettings.dest"
    )

    assert kinds(config, [a, b, c], opts_for(apply="api")) == [("api", None)]

    doubled = copy.deepcopy(config)
    doubled["inbounds"].append({"port": 10001, "listen": "127.0.0.1", "protocol": "socks"})
    assert ("duplicate", None) in kinds(doubled, [a, b, c], opts)
    fine = copy.deepcopy(config)
    fine["inbounds"].append({"port": 20001, "listen": "127.0.0.1", "protocol": "socks"})
    fine["inbounds"].append({"port": 20001, "listen": "127.0.0.2", "protocol": "socks"})
    assert kinds(fine, [a, b, c], opts) == []


# --- migration -----------------------------------------------------------------------------

CLIENTS = [
    (str(uuid.UUID(int=n + 1, version=4)), email, flow)
    for n, (email, flow) in enumerate(
        [
            ("anna", "xtls-rprx-vision"),
            ("boris", "xtls-rprx-vision"),
            ("anna", "xtls-rprx-vision"),
            ("", ""),
            ("dmitry@home", "xtls-rprx-vision"),
        ]
    )
]


def shared_config() -> dict[str, Any]:
    """A typical hand-made server: five clients on one VLESS+REALITY inbound on 443."""
    return {
        "log": {"loglevel": "warning"},
        "inbounds": [
            {"tag": "api", "port": 62789, "listen": "127.0.0.1", "protocol": "dokodemo-door"},
            {
                "tag": "vless-reality",
                "port": 443,
                "protocol": "vless",
                "settings": {
                    "clients": [{"id": u, "email": e, "flow": f} for u, e, f in CLIENTS],
                    "decryption": "none",
                },
                "streamSettings": {
                    "network": "tcp",
                    "security": "reality",
                    "realitySettings": {
                        "show": False,
                        "dest": "dest.example:443",
                        "xver": 0,
                        "serverNames": ["dest.example"],
                        "privateKey": REALITY.private_key,
                        "shortIds": ["", "6ba85179e30d4fc2"],
                    },
                },
                "sniffing": {"enabled": True, "destOverride": ["http", "tls"]},
            },
            {
                "tag": "vmess-old",
                "port": 8443,
                "protocol": "vmess",
                "settings": {"clients": [{"id": U1}]},
            },
        ],
        "outbounds": [{"protocol": "freedom", "tag": "direct"}],
        "routing": {"rules": [{"type": "field", "inboundTag": ["api"], "outboundTag": "api"}]},
    }


def migrate(
    config: dict[str, Any], plan: MigrationPlan, opts: XrayOptions
) -> tuple[dict[str, Any], list[XrayKey]]:
    keys = [move.key(f"m{n}") for n, move in enumerate(plan.moves)]
    return render_config(apply_migration(config, plan), keys, opts, generate_reality()), keys


def test_migration_gives_each_client_its_own_port() -> None:
    opts = opts_for()
    source = shared_config()
    before = copy.deepcopy(source)
    plan = plan_migration(source, PortRange(10001, 10100), {10002}, opts)
    assert source == before
    assert [m.uuid for m in plan.moves] == [u for u, _, _ in CLIENTS]
    assert [m.port for m in plan.moves] == [10001, 10003, 10004, 10005, 10006]
    assert [m.name for m in plan.moves] == [
        "anna",
        "boris",
        "anna-2",
        f"client-{CLIENTS[3][0][:8]}",
        "dmitry@home",
    ]
    assert [m.email for m in plan.moves][3] == ""
    assert plan.emptied == (1,) and plan.dropped == () and plan.unplaced == ()
    assert plan.warnings == ()
    assert all(m.reality == REALITY for m in plan.moves)

    config, keys = migrate(source, plan, opts)
    assert parse_keys(config) == {m.uuid: m.port for m in plan.moves}
    assert [i.get("tag") for i in config["inbounds"][:2]] == ["api", "vmess-old"]
    assert config["inbounds"][:2] == [before["inbounds"][0], before["inbounds"][2]]
    assert {k: v for k, v in config.items() if k != "inbounds"} == {
        k: v for k, v in before.items() if k != "inbounds"
    }
    for inbound, (u, email, flow) in zip(config["inbounds"][2:], CLIENTS, strict=True):
        client = inbound["settings"]["clients"][0]
        assert (client["id"], client["flow"]) == (u, flow)
        reality = inbound["streamSettings"]["realitySettings"]
        assert reality["privateKey"] == REALITY.private_key  # existing clients keep pbk
        assert reality["shortIds"] == ["", "6ba85179e30d4fc2"]  # and their short ids, in order
    assert keys[0].short_id == "6ba85179e30d4fc2"
    assert drift(config, keys, opts, PortRange(10001, 10100)) == []
    # idempotent: a second run finds nothing to do
    again = plan_migration(config, PortRange(10001, 10100), {10002}, opts)
    assert again.is_empty and again.lines()[0].startswith("nothing to migrate")


def test_dry_run_lines_describe_the_plan() -> None:
    plan = plan_migration(shared_config(), PortRange(10001, 10100), set(), opts_for())
    lines = plan.lines()
    assert lines[0] == f"move {CLIENTS[0][0]} (anna) from vless-reality port 443 to port 10001"
    assert lines[5] == "remove inbound #1: all its clients moved"
    assert lines[6:] == [
        (
            "skip inbound 'api' (dokodemo-door, port 62789): protocol 'dokodemo-door'; "
            "only VLESS clients get keys; left as it is"
        ),
        (
            "skip inbound 'vmess-old' (vmess, port 8443): protocol 'vmess'; only VLESS clients get "
            "keys; left as it is"
        ),
        (
            f"note: client {CLIENTS[2][0]} of inbound 'vless-reality' (vless, port 443): the name "
            "'anna' is taken (another key or client), so its key is named 'anna-2'"
        ),
    ]


def test_clients_that_already_have_keys_are_dropped_not_moved() -> None:
    known = CLIENTS[1][0]
    plan = plan_migration(
        shared_config(), PortRange(10001, 10100), set(), known_uuids=[known.upper()]
    )
    assert known not in [m.uuid for m in plan.moves]
    assert plan.dropped == ((1, known),) and plan.emptied == (1,)


def test_a_full_range_leaves_the_rest_in_the_shared_inbound() -> None:
    source = shared_config()
    plan = plan_migration(source, PortRange(10001, 10003), {10002}, taken_names={"anna"})
    assert [m.port for m in plan.moves] == [10001, 10003]
    assert [m.name for m in plan.moves] == ["anna-2", "boris"]
    assert plan.unplaced == tuple(u for u, _, _ in CLIENTS[2:]) and plan.emptied == ()
    assert [line for line in plan.lines() if "no free port" in line] == [
        f"cannot move {u}: no free port left in the range" for u, _, _ in CLIENTS[2:]
    ]
    config, _ = migrate(source, plan, opts_for())
    shared = next(i for i in config["inbounds"] if i.get("tag") == "vless-reality")
    assert [c["id"] for c in shared["settings"]["clients"]] == list(plan.unplaced)
    assert plan_migration(config, PortRange(10001, 10003), {10002}).unplaced == plan.unplaced


def test_inbounds_that_are_not_vless_reality_are_skipped_with_the_reason() -> None:
    source = shared_config()
    source["inbounds"][1]["streamSettings"] = {"network": "ws", "security": "tls"}
    plan = plan_migration(source, PortRange(10001, 10100), set(), opts_for())
    assert plan.is_empty and plan.moves == ()
    assert plan.skipped[1] == (
        "skip inbound 'vless-reality' (vless, port 443): VLESS with security 'tls' with "
        "certificates; portmeter's keys use REALITY; left as it is"
    )
    assert plan_migration(source, PortRange(10001, 10100), set(), tags={"other"}).is_empty
    incomplete = shared_config()
    del incomplete["inbounds"][1]["streamSettings"]["realitySettings"]["serverNames"]
    plan = plan_migration(incomplete, PortRange(10001, 10100), set(), opts_for())
    assert plan.is_empty and plan.skipped[1].endswith(
        ': Xray refuses its REALITY settings (empty "serverNames"); left as it is'
    )


def test_apply_migration_refuses_a_changed_config() -> None:
    plan = plan_migration(shared_config(), PortRange(10001, 10100), set())
    with pytest.raises(XrayConfigError, match="changed since"):
        apply_migration({"inbounds": []}, plan)


# --- ids, templates, links for every transport ------------------------------------------------


def test_client_ids_are_read_as_xray_reads_them() -> None:
    # The example of Xray's documentation ("xray uuid -i"), and the forms of a uuid it accepts.
    assert xray_uuid("我爱🍉老师1314") == "5783a3e7-e373-51cd-8642-c83782b807c5"
    assert xray_uuid(U1.upper()) == U1 and xray_uuid(U1.replace("-", "")) == U1
    assert xray_uuid("a" * 30) == str(uuid.uuid5(uuid.UUID(int=0), "a" * 30))
    for refused in ("", "a" * 31, "x" * 36, U1[:-1] + "g", 7, None):
        assert xray_uuid(refused) is None, refused


def template_key(stream: dict[str, Any], client_id: str = "alice-phone", **client: Any) -> XrayKey:
    inbound = {
        "listen": "0.0.0.0",
        "port": 443,
        "protocol": "vless",
        "tag": "shared",
        "settings": {"clients": [{"id": client_id, **client}], "decryption": "none"},
        "streamSettings": stream,
        "sniffing": {"enabled": True, "routeOnly": True},
    }
    return XrayKey("k1", "alice", str(xray_uuid(client_id)), 10001, template=json.dumps(inbound))


REALITY_STREAM = {
    "security": "reality",
    "realitySettings": {
        "target": "www.example.org:443",
        "serverNames": ["www.example.org", "example.org"],
        "privateKey": RFC7748[1][2],
        "shortIds": ["", "ab12"],
        "spiderX": "/a b",
    },
}


def test_a_template_key_renders_its_source_inbound_with_port_and_tag() -> None:
    k = template_key({"network": "raw", **REALITY_STREAM}, flow="xtls-rprx-vision", level=1)
    inbound = render_inbound(k, opts_for(), REALITY)
    source = json.loads(k.template)
    assert list(inbound) == list(source)  # fields in the source's order, port and tag in place
    assert {**inbound, "port": 443, "tag": "shared"} == source
    assert (inbound["port"], inbound["tag"]) == (10001, f"inbound-{k.uuid}")
    assert is_portmeter_inbound(inbound) and parse_keys({"inbounds": [inbound]}) == {k.uuid: 10001}
    assert drift({"inbounds": [inbound]}, [k], opts_for()) == []
    with pytest.raises(ValueError, match="one client, of uuid"):
        XrayKey("k2", "x", U1, 10002, template=k.template)


@pytest.mark.parametrize(
    ("stream", "transport"),
    [
        ({"network": "raw"}, {"type": "tcp", "headerType": "none"}),
        (
            {
                "network": "tcp",
                "tcpSettings": {
                    "header": {
                        "type": "http",
                        "request": {
                            "path": ["/index.html", "/x"],
                            "headers": {"Host": ["a.example.com", "b.example"]},
                        },
                    }
                },
            },
            {
                "type": "tcp",
                "headerType": "http",
                "host": "a.example.com,b.example",
                "path": "/index.html",
            },
        ),
        (
            {"network": "grpc", "grpcSettings": {"serviceName": "svc.Name"}},
            {"type": "grpc", "serviceName": "svc.Name", "mode": "gun"},
        ),
        (
            {
                "network": "grpc",
                "grpcSettings": {"serviceName": "s", "multiMode": True, "authority": "a.example"},
            },
            {"type": "grpc", "serviceName": "s", "mode": "multi", "authority": "a.example"},
        ),
        (
            {
                "network": "xhttp",
                "xhttpSettings": {"path": "/up", "mode": "stream-one", "host": "h.example.com"},
            },
            {"type": "xhttp", "path": "/up", "mode": "stream-one", "host": "h.example.com"},
        ),
        (
            {"network": "splithttp", "splithttpSettings": {"extra": {"noGRPCHeader": True}}},
            {"type": "xhttp", "path": "/", "mode": "auto", "extra": '{"noGRPCHeader":true}'},
        ),
        (
            {
                "network": "ws",
                "wsSettings": {"path": "/ws?ed=2048", "headers": {"Host": "w.example"}},
            },
            {"type": "ws", "path": "/ws?ed=2048", "host": "w.example"},
        ),
        (
            {
                "network": "httpupgrade",
                "httpupgradeSettings": {"path": "/u", "host": "u.example.com"},
            },
            {"type": "httpupgrade", "path": "/u", "host": "u.example.com"},
        ),
    ],
    ids=["raw", "tcp-http", "grpc-gun", "grpc-multi", "xhttp", "splithttp", "ws", "httpupgrade"],
)
def test_links_read_back_into_the_inbounds_fields(
    stream: dict[str, Any], transport: dict[str, str]
) -> None:
    flow = {"flow": "xtls-rprx-vision"} if stream["network"] in ("raw", "tcp") else {}
    k = template_key({**stream, **REALITY_STREAM}, client_id="bob laptop", email="b@x", **flow)
    assert link_fields(vless_link(k, opts_for(fingerprint="safari"), REALITY)) == {
        "id": "bob laptop",
        "host": "vpn.example.net",
        "port": "10001",
        "name": "alice",
        **transport,
        "encryption": "none",
        "security": "reality",
        "pbk": RFC7748[1][3],
        "fp": "safari",
        "sni": "www.example.org",
        "sid": "ab12",
        "spx": "/a b",
        **flow,
    }
    plain = template_key({**stream, "security": "none"}, client_id=U2)
    assert link_fields(vless_link(plain, opts_for(security="none"))) == {
        "id": U2,
        "host": "vpn.example.net",
        "port": "10001",
        "name": "alice",
        **transport,
        "encryption": "none",
        "security": "none",
    }


def test_a_panels_client_side_reality_fields_go_into_the_link() -> None:
    stream = copy.deepcopy({"network": "tcp", **REALITY_STREAM})
    del stream["realitySettings"]["spiderX"]
    stream["realitySettings"]["settings"] = {"fingerprint": "firefox", "spiderX": "/news/"}
    fields = link_fields(vless_link(template_key(stream), opts_for(), REALITY))
    assert (fields["fp"], fields["spx"], "flow" in fields) == ("firefox", "/news/", False)


def test_migration_keeps_ids_names_and_every_field(tmp_path: Path) -> None:
    source = shared_config()
    shared = source["inbounds"][1]
    shared["settings"]["clients"] = [
        {"id": "мама", "flow": "xtls-rprx-vision", "level": 2},
        {"id": U3.upper(), "email": "anna"},
        {"id": U4.replace("-", ""), "email": "boris"},
    ]
    shared["settings"]["fallbacks"] = [{"dest": 8080, "xver": 1}]
    shared["listen"] = "198.51.100.7"
    plan = plan_migration(source, PortRange(10001, 10100), set(), opts_for(), taken_names={"ANNA"})
    assert [(m.client_id, m.uuid, m.name) for m in plan.moves] == [
        ("мама", xray_uuid("мама"), "мама"),
        (U3.upper(), U3, "anna-2"),  # a uuid in another spelling stays as written (issue 24)
        (U4.replace("-", ""), U4, "boris"),
    ]
    assert (
        "the name 'anna' is taken (another key or client), so its key is named 'anna-2'"
        in (plan.notes[0])
    )
    config, keys = migrate(source, plan, opts_for())
    for move, k in zip(plan.moves, keys, strict=True):
        inbound = next(i for i in config["inbounds"] if i.get("tag") == k.tag)
        same = {"port": 443, "tag": "vless-reality", "settings": shared["settings"]}
        assert {**inbound, **same} == shared
        clients = shared["settings"]["clients"]
        assert inbound["settings"]["clients"] == [
            {**c, "id": move.client_id} for c in clients if xray_uuid(c["id"]) == k.uuid
        ]
    assert drift(config, keys, opts_for(), PortRange(10001, 10100)) == []
    commented = plan_migration(source, PortRange(10001, 10100), set(), commented=["/etc/x.json"])
    assert commented.notes[-1].startswith("/etc/x.json has comments: the rewritten config")
    assert plan_migration(config, PortRange(10001, 10100), set(), commented=["/c"]).notes == ()


def test_rewriting_a_file_with_comments_says_so_and_backs_it_up(tmp_path: Path) -> None:
    opts = opts_for(tmp_path)
    opts.config_path.parent.mkdir(parents=True)
    original = b'{"log": {"loglevel": "warning"}, # keep me\n "inbounds": []}\n'
    opts.config_path.write_bytes(original)
    live = LiveConfig(XrayFiles(opts))
    written = live.push([key()], REALITY)
    assert written.comments_dropped and written.backup is not None
    assert written.backup.read_bytes() == original
    assert live.push([key(), key(U2, 10002)], REALITY).comments_dropped is False


def test_sources_and_the_live_file_are_read_only_as_regular_files(tmp_path: Path) -> None:
    """A symbolic link is refused, not followed; a FIFO is refused at once, not read for ever."""
    real = tmp_path / "real.json"
    real.write_bytes(b"{}")
    link, fifo = tmp_path / "link.json", tmp_path / "fifo.json"
    link.symlink_to(real)
    os.mkfifo(fifo)
    opts = opts_for(tmp_path)
    with pytest.raises(XrayConfigError, match=f"^{link} is a symbolic link; portmeter never"):
        read_source(opts, link)
    with pytest.raises(XrayConfigError, match=f"^{fifo} is not a regular file$"):
        XrayFiles(opts_for(tmp_path, config_path=fifo)).read_signed()
    assert read_source(opts, real).config == {}


def test_a_client_in_two_reality_inbounds_keeps_the_second_one() -> None:
    """One key serves one inbound: the user's second inbound (gRPC on 8443) stays as it was,
    its client is not dropped, and a second run leaves it alone too."""
    opts = opts_for()
    source = shared_config()
    grpc = copy.deepcopy(source["inbounds"][1])
    grpc.update(tag="vless-grpc", port=8444)
    grpc["settings"]["clients"] = [{"id": CLIENTS[0][0], "email": "anna-grpc"}]
    grpc["streamSettings"]["network"] = "grpc"
    source["inbounds"].append(grpc)
    plan = plan_migration(source, PortRange(10001, 10100), set(), opts)
    assert [m.uuid for m in plan.moves] == [u for u, _, _ in CLIENTS]
    assert plan.emptied == (1,) and plan.dropped == ()
    assert plan.skipped[-1] == (
        f"skip client {CLIENTS[0][0]} of inbound 'vless-grpc' (vless, port 8444): uuid "
        f"{CLIENTS[0][0]} is already migrated from inbound #1; a key serves one inbound: "
        "left as it was"
    )
    config, _ = migrate(source, plan, opts)
    assert [i for i in config["inbounds"] if i.get("tag") == "vless-grpc"] == [grpc]
    again = plan_migration(config, PortRange(10001, 10100), set(), opts)
    assert again.is_empty and again.skipped[-1] == plan.skipped[-1].replace(
        "inbound #1", "another inbound"
    )
