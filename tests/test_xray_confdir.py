"""PORTMETER_XRAY_CONFDIR: one file per key in the directory Xray reads with -confdir.

In-process: the files written and removed, the operator's files never touched, no directory read
after one key operation, drift repaired, bad settings refused in one line. Kernel: Debian's v2ray
started with `-config BASE -confdir DIR` serves the keys from their files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
import structlog
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from daemon.errors import XrayRefused
from daemon.service.xray_side import XraySide
from daemon.settings import Settings, SettingsError, load_settings
from daemon.store.state import State
from daemon.xray.links import vless_link
from daemon.xray.model import XrayConfigError, XrayKey, XrayOptions, key_file_name
from daemon.xray.render import render_inbound
from daemon.xray_sync import ConfDir, XrayFiles, key_file_bytes
from tests.inprocess import inprocess_daemon
from tests.test_xray_incremental import add_key
from tests.test_xray_sync import REALITY, opts_for
from tests.test_xray_v2ray import needs_netns, needs_v2ray
from tests.xray_harness import (
    V2RAY,
    ClientRoute,
    SocksFetchError,
    client_config,
    http_get_via_socks,
    http_server,
    netns,
    proxy_process,
    stop_process,
    wait_port,
)

BASE = {
    "log": {"loglevel": "warning"},
    "outbounds": [{"protocol": "freedom", "tag": "direct"}],
}
OPERATOR = {"inbounds": [{"port": 1080, "listen": "127.0.0.1", "protocol": "socks", "tag": "op"}]}


def xkey(n: int, port: int | None = None) -> XrayKey:
    return XrayKey(f"k{n}", f"key {n}", f"00000000-0000-4000-8000-{n:012d}", port or 10001 + n)


def confdir_for(tmp_path: Path, **options: Any) -> ConfDir:
    """A ConfDir on tmp_path/conf.d with the base config 00-base.json and one operator file."""
    directory = tmp_path / "conf.d"
    directory.mkdir()
    (directory / "00-base.json").write_text(json.dumps(BASE))
    (directory / "10-operator.json").write_text(json.dumps(OPERATOR))
    (directory / "notes.txt").write_text("not a config")
    opts = opts_for(tmp_path, **options)
    return ConfDir(
        XrayFiles(dataclasses.replace(opts, config_path=directory / "00-base.json")), directory
    )


def listing(directory: Path) -> dict[str, tuple[bytes, int]]:
    """Every file of the directory: its bytes and inode (a rewrite is a new inode)."""
    return {p.name: (p.read_bytes(), p.stat().st_ino) for p in sorted(directory.iterdir())}


def expected_file(key: XrayKey, confdir: ConfDir) -> bytes:
    return key_file_bytes(render_inbound(key, confdir.opts, REALITY))


def test_each_key_gets_a_file_and_nothing_else_is_written(tmp_path: Path) -> None:
    confdir = confdir_for(tmp_path)
    operator = listing(confdir.directory)
    keys = [xkey(n) for n in range(3)]
    written = confdir.push(keys, REALITY)
    files = listing(confdir.directory)
    assert sorted(files) == sorted([*operator, *(key_file_name(k.uuid) for k in keys)])
    for key in keys:
        data = files[key_file_name(key.uuid)][0]
        assert data == expected_file(key, confdir)
        assert json.loads(data) == {"inbounds": [render_inbound(key, confdir.opts, REALITY)]}
        assert os.stat(confdir.directory / key_file_name(key.uuid)).st_mode & 0o777 == 0o640
    assert {name: files[name] for name in operator} == operator
    assert [i["tag"] for i in written.changes.added] == [k.tag for k in keys]

    # One more key, one gone: exactly those two files change; the others keep their inode.
    before = listing(confdir.directory)
    new = xkey(7)
    written = confdir.push([keys[0], keys[2], new], REALITY)
    after = listing(confdir.directory)
    assert key_file_name(keys[1].uuid) not in after
    assert after[key_file_name(new.uuid)][0] == expected_file(new, confdir)
    unchanged = set(before) - {key_file_name(keys[1].uuid)}
    assert {name: after[name] for name in unchanged} == {n: before[n] for n in unchanged}
    assert [i["tag"] for i in written.changes.added] == [new.tag]
    assert written.changes.removed == (keys[1].tag,)


def test_a_push_after_one_change_never_reads_the_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    confdir = confdir_for(tmp_path)
    keys = [xkey(n) for n in range(50)]
    confdir.push(keys, REALITY)

    def no_scan() -> None:
        raise AssertionError("the directory was read")

    monkeypatch.setattr(confdir, "scan", no_scan)
    confdir.push([*keys, xkey(60)], REALITY)
    confdir.push(keys[1:], REALITY)
    names = {p.name for p in confdir.directory.glob("pm-*.json")}
    assert names == {key_file_name(k.uuid) for k in keys[1:]}


def test_a_change_behind_portmeters_back_is_repaired_by_the_next_push(tmp_path: Path) -> None:
    confdir = confdir_for(tmp_path)
    keys = [xkey(n) for n in range(3)]
    confdir.push(keys, REALITY)
    gone = confdir.directory / key_file_name(keys[0].uuid)
    gone.unlink()  # the directory changes: the next push reads it again
    confdir.push([*keys, xkey(5)], REALITY)
    assert gone.read_bytes() == expected_file(keys[0], confdir)


def test_undo_puts_every_file_back(tmp_path: Path) -> None:
    confdir = confdir_for(tmp_path)
    keys = [xkey(n) for n in range(3)]
    confdir.push(keys, REALITY)
    before = listing(confdir.directory)
    renamed = dataclasses.replace(keys[1], name="renamed", port=10050)
    written = confdir.push([keys[0], renamed, xkey(9)], REALITY)
    assert listing(confdir.directory) != before
    confdir.undo(written)
    assert {n: d for n, (d, _) in listing(confdir.directory).items()} == {
        n: d for n, (d, _) in before.items()
    }
    confdir.push([keys[0], keys[2]], REALITY)  # the model was rolled back with the files
    assert not (confdir.directory / key_file_name(keys[1].uuid)).exists()


def test_a_refused_key_writes_nothing(tmp_path: Path) -> None:
    confdir = confdir_for(tmp_path)
    keys = [xkey(n) for n in range(2)]
    confdir.push(keys, REALITY)
    before = listing(confdir.directory)
    with pytest.raises(XrayConfigError, match="port 1080 is used by more than one inbound"):
        confdir.push([*keys, xkey(3, port=1080)], REALITY)  # the operator's socks port
    with pytest.raises(XrayConfigError, match="two keys share the port 10001"):
        confdir.push([*keys, xkey(4, port=10001)], REALITY)
    assert listing(confdir.directory) == before


def test_an_operator_file_with_a_key_inbound_is_refused_by_name(tmp_path: Path) -> None:
    confdir = confdir_for(tmp_path)
    key = xkey(1)
    leftover = {"inbounds": [render_inbound(key, confdir.opts, REALITY)]}
    (confdir.directory / "50-old.json").write_text(json.dumps(leftover))
    before = listing(confdir.directory)
    with pytest.raises(XrayConfigError) as caught:
        confdir.push([key], REALITY)
    assert str(caught.value) == (
        f"{confdir.directory}/50-old.json holds portmeter's inbound {key.tag}; with "
        f"PORTMETER_XRAY_CONFDIR key inbounds live in {confdir.directory}/pm-*.json only: "
        "remove it there"
    )
    assert listing(confdir.directory) == before


def test_api_mode_needs_the_api_in_the_base_config(tmp_path: Path) -> None:
    confdir = confdir_for(tmp_path, apply="api")
    with pytest.raises(XrayConfigError, match=r"no 'api' section \(add it to .*00-base.json\)"):
        confdir.push([xkey(1)], REALITY)
    assert not list(confdir.directory.glob("pm-*"))


def test_a_directory_that_became_a_file_is_refused_in_one_line(tmp_path: Path) -> None:
    confdir = confdir_for(tmp_path)
    confdir.push([xkey(1)], REALITY)
    moved = tmp_path / "moved"
    confdir.directory.rename(moved)
    confdir.directory.write_text("")
    with pytest.raises(XrayConfigError) as caught:
        confdir.push([xkey(1), xkey(2)], REALITY)
    assert str(caught.value) == f"PORTMETER_XRAY_CONFDIR {confdir.directory} is not a directory"
    assert confdir.directory.read_text() == ""


def test_a_planted_link_is_replaced_never_written_through(tmp_path: Path) -> None:
    confdir = confdir_for(tmp_path)
    key = xkey(1)
    target = tmp_path / "target"
    target.write_text("not portmeter's")
    path = confdir.directory / key_file_name(key.uuid)
    path.symlink_to(target)
    confdir.push([key], REALITY)
    assert not path.is_symlink() and path.read_bytes() == expected_file(key, confdir)
    assert target.read_text() == "not portmeter's"


def test_sync_sweeps_only_the_temporaries_of_key_files(tmp_path: Path) -> None:
    confdir = confdir_for(tmp_path)
    ours = confdir.directory / f".{key_file_name(xkey(1).uuid)}.0123456789abcdef.tmp"
    theirs = confdir.directory / ".10-operator.json.0123456789abcdef.tmp"
    ours.write_text("{")
    theirs.write_text("{")
    confdir.push([xkey(1)], REALITY)
    assert not ours.exists() and theirs.exists()


def pm_files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.glob("pm-*.json"))}


def full_outcome(confdir: ConfDir, keys: list[XrayKey]) -> tuple[dict[str, bytes] | None, str]:
    """What a fresh ConfDir (no model: the full path) makes of a copy of the directory."""
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "conf.d"
        shutil.copytree(confdir.directory, copy)
        files = XrayFiles(dataclasses.replace(confdir.opts, config_path=copy / "00-base.json"))
        fresh = ConfDir(files, copy)
        try:
            fresh.push(keys, REALITY)
        except XrayConfigError as exc:
            return None, str(exc).replace(str(copy), str(confdir.directory))
        return pm_files(copy), ""


@given(
    ops=st.lists(
        st.tuples(
            st.sampled_from(["add", "add", "remove", "port", "name", "undo", "touch"]),
            st.integers(0, 100),
        ),
        min_size=1,
        max_size=20,
    )
)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_pushes_write_exactly_what_the_full_path_writes(ops: list[tuple[str, int]]) -> None:
    ports = [1080, 10001, 10002, 10003, 10004]  # 1080: the operator's
    with tempfile.TemporaryDirectory() as tmp:
        confdir = confdir_for(Path(tmp))
        keys: list[XrayKey] = []
        history: list[tuple[Any, list[XrayKey], dict[str, bytes]]] = []
        for step, (op, n) in enumerate(ops):
            if op == "undo":
                if history:
                    written, keys, files = history.pop()
                    confdir.undo(written)
                    assert pm_files(confdir.directory) == files
                continue
            if op == "touch":  # someone else removes a key file
                for path in sorted(confdir.directory.glob("pm-*.json"))[:1]:
                    path.unlink()
                history.clear()
                continue
            if op == "add" or not keys:
                new = XrayKey(
                    f"k{step}",
                    f"key {n}",
                    f"00000000-0000-4000-8000-{n % 7:012d}",
                    ports[n % len(ports)],
                )
                keys = [*keys, new]
            else:
                at = n % len(keys)
                if op == "remove":
                    keys = keys[:at] + keys[at + 1 :]
                else:
                    value: Any = ports[n % len(ports)] if op == "port" else f"renamed {n}"
                    keys = [
                        *keys[:at],
                        dataclasses.replace(keys[at], **{op: value}),
                        *keys[at + 1 :],
                    ]
            before = pm_files(confdir.directory)
            expected, error = full_outcome(confdir, keys)
            if expected is None:
                with pytest.raises(XrayConfigError) as caught:
                    confdir.push(keys, REALITY)
                assert str(caught.value) == error
                assert pm_files(confdir.directory) == before
                continue
            written = confdir.push(keys, REALITY)
            assert pm_files(confdir.directory) == expected
            history.append((written, keys, before))


# --- through the service's Xray side -------------------------------------------------------


def side_for(tmp_path: Path, **overrides: Any) -> XraySide:
    directory = tmp_path / "conf.d"
    values: dict[str, Any] = {
        "state_dir": tmp_path / "state",
        "xray_config": tmp_path / "base.json",
        "xray_confdir": directory,
        "xray_bin": tmp_path / "no-xray-here",
        "reality_dest": "dest.example:443",
        "public_host": "vpn.example.net",
    }
    (tmp_path / "base.json").write_text(json.dumps(BASE))
    return XraySide(Settings(**{**values, **overrides}), structlog.get_logger())


def test_drift_is_reported_and_sync_repairs_only_portmeters_files(tmp_path: Path) -> None:
    side = side_for(tmp_path)
    state = State()
    records = [add_key(side, state, n) for n in range(3)]
    anyio.run(side.push, state)
    directory = tmp_path / "conf.d"
    assert directory.stat().st_mode & 0o777 == 0o750  # made by portmeter
    assert anyio.run(side.drift, state) == []
    good = {p.name: p.read_bytes() for p in directory.glob("pm-*.json")}
    missing = directory / key_file_name(str(records[0].uuid))
    broken = directory / key_file_name(str(records[1].uuid))
    stale_uuid = str(uuid.UUID(int=99, version=4))
    stale = directory / key_file_name(stale_uuid)
    missing.unlink()
    broken.write_text("{ not json")
    stale_key = XrayKey("gone", "gone", stale_uuid, 10090)
    stale.write_bytes(
        key_file_bytes(render_inbound(stale_key, side.options, side.server_reality(state)))
    )
    (directory / "20-mine.json").write_text(json.dumps(OPERATOR))
    (tmp_path / "base.json").touch()
    base_before = (tmp_path / "base.json").read_bytes()

    kinds = sorted(p.kind for p in anyio.run(side.drift, state))
    assert kinds == ["missing", "missing", "stale"]
    status = anyio.run(side.status, state)
    assert (status["confdir"], status["key_files"], status["in_sync"]) == (str(directory), 3, False)

    pushed = anyio.run(side.sync, state)
    assert sorted(pushed.removed) == [stale_key.tag]
    assert {p.name: p.read_bytes() for p in directory.glob("pm-*.json")} == good
    assert json.loads((directory / "20-mine.json").read_text()) == OPERATOR
    assert (tmp_path / "base.json").read_bytes() == base_before
    assert anyio.run(side.drift, state) == []
    status = anyio.run(side.status, state)
    assert (status["key_files"], status["in_sync"], status["inbound_count"]) == (3, True, 4)


def test_a_failed_restart_takes_the_new_file_back(tmp_path: Path) -> None:
    side = side_for(tmp_path, xray_apply="restart", xray_restart_command="/bin/false")
    state = State()
    add_key(side, state, 0)
    with pytest.raises(XrayRefused, match="previous Xray config was restored"):
        anyio.run(side.push, state)
    assert list((tmp_path / "conf.d").glob("pm-*")) == []


def test_create_and_delete_through_the_api_write_and_remove_one_file(tmp_path: Path) -> None:
    directory = tmp_path / "conf.d"
    with inprocess_daemon(xray_config=BASE, xray_confdir=directory) as daemon:
        key = daemon.create("alice")
        path = directory / key_file_name(key["uuid"])
        inbound = json.loads(path.read_text())["inbounds"][0]
        assert (inbound["port"], inbound["tag"]) == (key["port"], f"inbound-{key['uuid']}")
        status = daemon.api("GET", "/api/system/xray/config-status")
        assert (status["key_files"], status["in_sync"]) == (1, True)
        answer = daemon.api(
            "POST", "/api/system/xray/migrate", expect=422, json={"config_path": str(path)}
        )
        assert answer["detail"].startswith("migrate works on a single Xray config")
        answer = daemon.api("POST", "/api/system/xray/migrate/rollback", expect=422)
        assert answer["detail"].startswith("migrate works on a single Xray config")
        assert [k["id"] for k in daemon.api("GET", "/api/keys")["keys"]] == [key["id"]]
        daemon.api("DELETE", f"/api/keys/{key['id']}")
        assert not path.exists()
        assert list(directory.iterdir()) == []


# --- settings ------------------------------------------------------------------------------


def settings_line(monkeypatch: pytest.MonkeyPatch, **env: str) -> str:
    for name, value in {"PORTMETER_REALITY_DEST": "dest.example:443", **env}.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError) as caught:
        load_settings()
    return str(caught.value)


def test_bad_confdir_settings_are_refused_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PORTMETER_CONFIG", raising=False)
    a_file = tmp_path / "file"
    a_file.write_text("")
    assert settings_line(monkeypatch, PORTMETER_XRAY_CONFDIR=str(a_file)) == (
        f"PORTMETER_XRAY_CONFDIR: {a_file} must be a directory (not a file or a symbolic link)"
    )
    (tmp_path / "link").symlink_to(tmp_path)
    assert "must be a directory" in settings_line(
        monkeypatch, PORTMETER_XRAY_CONFDIR=str(tmp_path / "link")
    )
    line = settings_line(
        monkeypatch,
        PORTMETER_XRAY_CONFDIR=str(tmp_path),
        PORTMETER_XRAY_CONFIG=str(tmp_path / "pm-base.json"),
    )
    assert line.endswith(
        "has a name portmeter uses for key files in PORTMETER_XRAY_CONFDIR "
        "(pm-*.json); rename it, e.g. 00-base.json"
    )
    line = settings_line(
        monkeypatch, PORTMETER_XRAY_CONFDIR=str(tmp_path), PORTMETER_XRAY_CONFIG=""
    )
    assert "PORTMETER_XRAY_CONFDIR needs PORTMETER_XRAY_CONFIG" in line
    assert "\n" not in line


# --- a real proxy --------------------------------------------------------------------------


@contextlib.contextmanager
def v2ray_confdir(
    ns: str, base: Path, directory: Path, log: Path
) -> Iterator[subprocess.Popen[bytes]]:
    """v2ray run as README "One file per key" says: `-config BASE -confdir DIR`, in `ns`."""
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                ns,
                str(V2RAY),
                "-config",
                str(base),
                "-confdir",
                str(directory),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    try:
        yield proc
    finally:
        stop_process(proc)


@needs_v2ray
@needs_netns
@pytest.mark.kernel
def test_v2ray_serves_the_keys_from_their_files(tmp_path: Path) -> None:
    base = tmp_path / "base.json"
    base.write_text(json.dumps(BASE))
    directory = tmp_path / "conf.d"
    opts = XrayOptions(config_path=base, xray_bin=V2RAY, security="none", public_host="127.0.0.1")
    confdir = ConfDir(XrayFiles(opts), directory)
    alice, bob, carol = (
        XrayKey(name, name, str(uuid.uuid4()), port)
        for name, port in (("alice", 21011), ("bob", 21012), ("carol", 21013))
    )
    confdir.push([alice, bob], None)  # `v2ray -test` accepted the whole config
    routes = [
        ClientRoute.from_link(vless_link(key, opts), socks_port=socks)
        for key, socks in ((alice, 11011), (bob, 11012), (carol, 11013))
    ]
    payload = os.urandom(1024 * 1024)
    log = tmp_path / "server.log"
    with (
        netns() as ns,
        http_server(ns, payload) as http_port,
        proxy_process(ns, client_config(routes), tmp_path, "client") as client,
    ):
        for route in routes:
            wait_port(ns, route.socks_port, proc=client)
        with v2ray_confdir(ns, base, directory, log) as server:
            for port in (21011, 21012):
                wait_port(ns, port, proc=server)
            got = http_get_via_socks(ns, 11011, "127.0.0.1", http_port)
            assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()
            assert http_get_via_socks(ns, 11012, "127.0.0.1", http_port) == payload
        # bob deleted, carol created: two files; then Xray restarted (apply mode restart).
        confdir.push([alice, carol], None)
        assert sorted(p.name for p in directory.iterdir()) == sorted(
            key_file_name(k.uuid) for k in (alice, carol)
        )
        with v2ray_confdir(ns, base, directory, log) as server:
            for port in (21011, 21013):
                wait_port(ns, port, proc=server)
            assert http_get_via_socks(ns, 11013, "127.0.0.1", http_port) == payload
            assert http_get_via_socks(ns, 11011, "127.0.0.1", http_port) == payload
            with pytest.raises(SocksFetchError):
                http_get_via_socks(ns, 11012, "127.0.0.1", http_port, timeout=5)
            assert server.poll() is None
    text = log.read_text(errors="replace")
    assert "panic" not in text and text.count("started") == 2
