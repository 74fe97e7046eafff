"""LiveConfig: a push after a few key changes splices the file instead of rendering every key.

The property test is the contract: whatever the sequence of changes, undos and writes by others,
the bytes written are exactly those of the full render on the live file, the same errors are
raised, and Xray is told the same inbound changes.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import pytest
import structlog
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from daemon import xray_sync as xs
from daemon.errors import XrayRefused
from daemon.service.xray_side import XraySide
from daemon.settings import Settings
from daemon.store.state import KeyRecord, State
from daemon.xray import render
from daemon.xray.drift import check_config
from daemon.xray.model import XrayConfigError, XrayKey
from daemon.xray.render import inbound_changes, render_config
from daemon.xray_io import files as xray_files
from daemon.xray_sync import LiveConfig, XrayFiles, serialize
from tests.test_xray_sync import REALITY, U1, U2, U3, base_configs, key, opts_for


def full_render(files: XrayFiles, keys: list[XrayKey]) -> tuple[bytes | None, str | None]:
    """What the full path gives on the live file: (bytes, None), or (None, the error)."""
    try:
        config = render_config(files.read(), keys, files.opts, REALITY)
        data = serialize(config)
        problems = [] if data == files.read_bytes() else check_config(config, files.opts, keys)
    except XrayConfigError as exc:
        return None, str(exc)
    return (None, problems[0]) if problems else (data, None)


operations = st.lists(
    st.tuples(
        st.sampled_from(
            ["add", "add", "remove", "port", "name", "short_id", "flow", "undo", "touch"]
        ),
        st.integers(0, 1000),
    ),
    min_size=1,
    max_size=25,
)


@given(
    base=base_configs(),
    ops=operations,
    apply=st.sampled_from(["none", "api"]),
    security=st.sampled_from(["reality", "none"]),
)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_incremental_pushes_write_exactly_the_full_render(
    base: dict[str, Any], ops: list[tuple[str, int]], apply: str, security: str
) -> None:
    # Ports from a small pool, some of them the operator's: conflicts happen.
    ports = sorted({10001 + n for n in range(6)} | {i["port"] for i in base["inbounds"][:2]})
    with tempfile.TemporaryDirectory() as tmp:
        files = XrayFiles(opts_for(Path(tmp), apply=apply, security=security))
        files.path.parent.mkdir(parents=True)
        files.path.write_bytes(serialize(base))
        live = LiveConfig(files)
        keys: list[XrayKey] = []
        history: list[tuple[xs.Written, list[XrayKey]]] = []
        for step, (op, n) in enumerate(ops):
            if op == "undo":
                if history:
                    written, keys = history.pop()
                    live.undo(written)
                    assert files.read_bytes() == written.previous
                continue
            if op == "touch":  # someone else rewrites the file (a new inode), maybe changing it
                data = files.path.read_bytes()
                if n % 2:
                    config = json.loads(data)
                    config.setdefault("inbounds", []).append(
                        {"port": 1000 + n, "protocol": "socks"}
                    )
                    data = serialize(config)
                files.path.with_name("other").write_bytes(data)
                os.replace(files.path.with_name("other"), files.path)
                history.clear()
                continue
            if op == "add" or not keys:
                new = XrayKey(
                    f"k{step}",
                    f"key {n}",
                    f"00000000-0000-4000-8000-{n % 9:012d}",
                    ports[n % len(ports)],
                    short_id="ab",
                )
                keys = [*keys, new]
            else:
                at = n % len(keys)
                old = keys[at]
                if op == "remove":
                    keys = keys[:at] + keys[at + 1 :]
                else:
                    value = {
                        "port": ports[n % len(ports)],
                        "name": f"renamed {n}",
                        "short_id": "cd" * (n % 3),
                        "flow": ["", None, "x"][n % 3],
                    }[op]
                    keys = [*keys[:at], dataclasses.replace(old, **{op: value}), *keys[at + 1 :]]
            previous = files.read_bytes()
            old_config = files.read()
            expected, error = full_render(files, keys)
            if error is not None:
                with pytest.raises(XrayConfigError) as caught:
                    live.push(keys, REALITY)
                assert str(caught.value).endswith(error) or error in str(caught.value)
                assert files.read_bytes() == previous
                continue
            written = live.push(keys, REALITY)
            assert files.read_bytes() == expected
            new_config = files.read()
            assert written.changes == inbound_changes(old_config, new_config)
            assert written.reverse() == inbound_changes(new_config, old_config)
            assert written.wrote == (expected != previous)
            history.append((written, keys))


# --- the live file's model -----------------------------------------------------------------


def three_keys() -> list[XrayKey]:
    return [key(U1, 10001), key(U2, 10002, "bob"), key(U3, 10003, "carol")]


def test_one_changed_key_is_rendered_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    live = LiveConfig(XrayFiles(opts_for(tmp_path)))
    keys = three_keys()
    live.push(keys, REALITY)
    rendered: list[XrayKey] = []
    real = render.render_inbound
    monkeypatch.setattr(render, "render_inbound", lambda k, *a: rendered.append(k) or real(k, *a))
    monkeypatch.setattr(xs.XrayFiles, "read_signed", None)  # the file is not even read
    moved = dataclasses.replace(keys[1], port=10009)
    written = live.push([keys[0], moved, keys[2]], REALITY)
    assert rendered == [moved]
    assert written.changes.removed == (keys[1].tag,)
    assert [i["port"] for i in written.changes.added] == [10009]


def test_a_file_changed_behind_our_back_takes_the_full_path(tmp_path: Path) -> None:
    files = XrayFiles(opts_for(tmp_path))
    live = LiveConfig(files)
    keys = three_keys()
    live.push(keys[:2], REALITY)
    config = files.read()
    config["inbounds"].insert(0, {"port": 2080, "protocol": "socks", "tag": "mine"})
    files.path.write_text(json.dumps(config))  # in place: same inode, new size and mtime
    written = live.push(keys, REALITY)
    assert files.read_bytes() == serialize(render_config(config, keys, files.opts, REALITY))
    assert files.read()["inbounds"][0]["tag"] == "mine"
    assert [i["tag"] for i in written.changes.added] == [keys[2].tag]
    # The operator's new inbound is now part of the model: a port clash with it is refused.
    with pytest.raises(XrayConfigError, match="port 2080 is used by more than one inbound"):
        live.push([*keys, key("5f0b3a4c-1d2e-4f60-8a9b-0c1d2e3f4a5b", 2080, "dave")], REALITY)


def test_a_refused_change_leaves_file_model_and_backups_alone(tmp_path: Path) -> None:
    files = XrayFiles(opts_for(tmp_path))
    live = LiveConfig(files)
    keys = three_keys()
    live.push(keys, REALITY)
    live.push(keys[:2], REALITY)
    before, backups = files.read_bytes(), files.backups()
    with pytest.raises(XrayConfigError, match="two keys share the port 10002"):
        live.push([*keys[:2], key(U3, 10002, "carol")], REALITY)
    assert files.read_bytes() == before and files.backups() == backups
    live.push(keys, REALITY)  # the model still matches the file
    assert files.read_bytes() == serialize(render_config(files.read(), keys, files.opts, REALITY))


def test_backup_is_a_hard_link_to_the_previous_file(tmp_path: Path) -> None:
    files = XrayFiles(opts_for(tmp_path))
    live = LiveConfig(files)
    keys = three_keys()
    live.push(keys[:1], REALITY)
    previous, inode = files.read_bytes(), files.path.stat().st_ino
    written = live.push(keys, REALITY)
    assert written.backup == files.backups()[-1]
    assert written.backup.read_bytes() == previous == written.previous
    assert written.backup.stat().st_ino == inode


def test_backup_is_copied_where_hard_links_fail(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = XrayFiles(opts_for(tmp_path))
    live = LiveConfig(files)
    keys = three_keys()
    live.push(keys[:1], REALITY)
    previous = files.read_bytes()

    def cross_device(*_: Any, **__: Any) -> None:
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(xray_files.os, "link", cross_device)
    written = live.push(keys, REALITY)
    assert written.backup is not None and written.backup.read_bytes() == previous


def test_undo_restores_bytes_backups_and_model(tmp_path: Path) -> None:
    files = XrayFiles(opts_for(tmp_path, backups=2))
    live = LiveConfig(files)
    keys = three_keys()
    for n in range(1, 4):
        live.push(keys[:n], REALITY)
    before, backups = files.read_bytes(), files.backups()
    written = live.push(keys[1:], REALITY)
    assert len(files.backups()) == 2 and files.backups() != backups  # rotated
    live.undo(written)
    assert files.read_bytes() == before
    assert set(files.backups()) < set(backups) | {written.backup}
    assert written.backup not in files.backups()
    assert written.reverse().added[0]["tag"] == keys[0].tag
    # Pushing again after the undo splices on the restored file.
    live.push(keys[1:], REALITY)
    assert files.read_bytes() == serialize(
        render_config(files.parse(before), keys[1:], files.opts, REALITY)
    )


# --- through the bridge --------------------------------------------------------------------


def bridge_for(tmp_path: Path, **overrides: Any) -> XraySide:
    values: dict[str, Any] = {
        "state_dir": tmp_path / "state",
        "xray_config": tmp_path / "xray" / "config.json",
        "xray_bin": tmp_path / "no-xray-here",
        "reality_dest": "dest.example:443",
        "public_host": "vpn.example.net",
    }
    return XraySide(Settings(**{**values, **overrides}), structlog.get_logger())


def add_key(bridge: XraySide, state: State, n: int) -> KeyRecord:
    record = KeyRecord(
        id=f"k{n}",
        name=f"key{n}",
        uuid=f"00000000-0000-4000-8000-{n:012d}",
        port=10001 + n,
        created_at=datetime.now(UTC),
    )
    bridge.prepare(state, record)
    state.keys[record.id] = record
    return record


def test_undo_after_a_failed_apply_restores_bytes_and_backups(tmp_path: Path) -> None:
    bridge = bridge_for(tmp_path, xray_apply="restart", xray_restart_command="/bin/true")
    state = State()
    for n in range(3):
        add_key(bridge, state, n)
        anyio.run(bridge.push, state)
    before, backups = bridge.files.read_bytes(), bridge.files.backups()
    bridge.applier.opts = dataclasses.replace(bridge.options, restart_command=("/bin/false",))
    add_key(bridge, state, 3)
    with pytest.raises(XrayRefused, match="previous Xray config was restored"):
        anyio.run(bridge.push, state)
    assert bridge.files.read_bytes() == before and bridge.files.backups() == backups
    bridge.applier.opts = bridge.options
    del state.keys["k3"]
    pushed = anyio.run(bridge.push, state)  # nothing to change: the file is as before
    assert pushed.backup is None and bridge.files.read_bytes() == before


def test_served_keys_are_cached_until_their_record_changes(tmp_path: Path) -> None:
    bridge = bridge_for(tmp_path)
    state = State()
    records = [add_key(bridge, state, n) for n in range(3)]
    first = bridge.served(state)
    assert all(a is b for a, b in zip(first, bridge.served(state), strict=True))
    records[1].extra_short_ids.append("ef")  # changed in place
    records[2].port = 10099
    second = bridge.served(state)
    assert second[0] is first[0]
    assert second[1].extra_short_ids == ("ef",) and second[2].port == 10099
    del state.keys["k0"]
    assert bridge.served(state) == second[1:]
