"""Start-up and memory (README "Start-up and memory"): what READY waits for and what comes after
it, before any operation; how much a loaded key and the in-memory Xray file cost. Memory is
measured with tracemalloc around real objects (the bounds sit between what the lean layout
takes and what the former one took); the order of a real daemon's start-up from its log.
"""

from __future__ import annotations

import gc
import json
import tracemalloc
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from daemon.store.state import KeyRecord, State, StateError, StateStore, snapshot_bytes
from daemon.xray.model import XrayKey
from daemon.xray_sync import LiveConfig, XrayFiles, serialize
from tests.conftest import Daemon
from tests.test_xray_daemon import NO_XRAY, portmeter_inbounds, read_config, tag, write_json
from tests.test_xray_sync import REALITY, opts_for

KEYS = 2000
MOMENT = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
# Measured at 2,000 keys: 1.5 KB per loaded key (2.8 KB with five direction records of its own,
# 6.2 KB when each model also kept its own set of field names), 1.9 KB per key of the Xray file
# held in memory (4.0 KB with every inbound's dict and a second copy of the file).
KEY_BYTES = 2200
XRAY_BYTES_PER_KEY = 2600


def retained(make: Callable[[], object]) -> int:
    """Bytes still allocated once `make` returned (what its result holds), after a collection."""
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        kept = make()
        gc.collect()
        size = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert kept is not None
    return size


def saved_state(path: Path, count: int) -> State:
    state = State(reality_private_key=REALITY.private_key)
    for n in range(count):
        key = KeyRecord(
            id=f"{n:08x}",
            name=f"key {n}",
            uuid=uuid.UUID(int=n + 1, version=4),
            port=20001 + n,
            created_at=MOMENT,
            short_id=f"{n:04x}",
            sub_token=f"token-{n:020d}",
        )
        state.keys[key.id] = key
    StateStore(path).save(state)
    return state


# --- the state ---------------------------------------------------------------------------


def test_a_loaded_key_takes_less_than_its_bound(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    saved_state(path, KEYS)
    size = retained(StateStore(path).load)
    assert size < KEYS * KEY_BYTES, f"{size / KEYS:.0f} bytes per key"


def test_the_quick_load_gives_what_the_careful_one_gives(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    saved = saved_state(path, 50)
    quick = StateStore(path).load()
    careful = State.model_validate(json.loads(path.read_bytes()))
    assert quick == careful == saved
    assert snapshot_bytes(quick) == path.read_bytes()
    # Another layout of the same JSON (not how portmeter writes it) takes the careful path.
    path.write_text(json.dumps(json.loads(path.read_bytes()), indent=3))
    assert StateStore(path).load() == saved


def test_a_snapshot_in_the_written_layout_is_still_checked_in_full(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    saved_state(path, 3)
    written = path.read_bytes()
    path.write_bytes(written.replace(b'"port": 20002', b'"port": 70000', 1))
    with pytest.raises(StateError, match=r"keys\.00000001\.port"):
        StateStore(path).load()
    path.write_bytes(written.replace(b'"port": 20003', b'"port": 20001', 1))
    with pytest.raises(StateError, match="have the same port 20001"):
        StateStore(path).load()
    path.write_bytes(written.replace(b'"schema_version": 1,', b'"schema_version": true,', 1))
    with pytest.raises(StateError, match="has schema version True"):
        StateStore(path).load()


# --- the Xray file in memory -------------------------------------------------------------


def test_the_xray_file_in_memory_takes_less_than_its_bound(tmp_path: Path) -> None:
    files = XrayFiles(opts_for(tmp_path))
    files.path.parent.mkdir(parents=True)
    files.path.write_bytes(serialize({"log": {"loglevel": "warning"}}))
    keys = [
        XrayKey(f"{n:08x}", f"key {n}", str(uuid.UUID(int=n + 1, version=4)), 20001 + n)
        for n in range(KEYS)
    ]
    assert LiveConfig(files).push(keys, REALITY).wrote  # the file gets every key
    # What a start leaves in memory: a first push that finds the file as it should be.
    live = LiveConfig(files)
    size = retained(lambda: live.push(keys, REALITY) and live)
    assert size < KEYS * XRAY_BYTES_PER_KEY, f"{size / KEYS:.0f} bytes per key"
    # The model still splices: one key more is one inbound more, with its changes for Xray.
    more = XrayKey("ffffffff", "late", str(uuid.UUID(int=99999, version=4)), 30000)
    written = live.push([*keys, more], REALITY)
    assert [i["tag"] for i in written.changes.added] == [more.tag]
    assert len(portmeter_tags(files)) == KEYS + 1
    live.undo(written)
    assert len(portmeter_tags(files)) == KEYS


def portmeter_tags(files: XrayFiles) -> list[str]:
    return [i["tag"] for i in files.read()["inbounds"] if i["tag"].startswith("inbound-")]


# --- a real daemon's start-up ------------------------------------------------------------


def events(daemon: Daemon, since: int) -> list[str]:
    """The event names the daemon logged after the first `since` characters of its log."""
    return [
        word.removeprefix("event=")
        for line in daemon.log()[since:].splitlines()
        for word in line.split()
        if word.startswith("event=")
    ]


def test_ready_comes_before_the_backup_and_xray_repair_which_come_before_any_operation(
    make_daemon: Any,
) -> None:
    d: Daemon = make_daemon(PORTMETER_XRAY_BIN=NO_XRAY, PORTMETER_XRAY_AUTOSYNC="true")
    alice, bob = d.create("alice"), d.create("bob")
    assert d.stop() == 0
    config = read_config(d)
    config["inbounds"] = [i for i in config["inbounds"] if i["tag"] != tag(alice)]
    write_json(d.xray_config, config)  # drift: alice's inbound is gone
    since = len(d.log())

    d.start()
    carol = d.create("carol")  # waits for the repair: it comes after it, not before
    assert set(portmeter_inbounds(read_config(d))) == {tag(alice), tag(bob), tag(carol)}
    order = events(d, since)
    ready = order.index("daemon_ready")
    assert ready < order.index("state_backup_written")
    assert ready < order.index("xray_drift") < order.index("xray_drift_repaired")
    assert order.index("xray_drift_repaired") < order.index("key_created")
