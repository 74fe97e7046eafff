"""Tests for daemon.store.state: the state file, its journal, atomic writes, damaged files,
backups."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from daemon.accounting import Account, Reading, Usage
from daemon.bounds import MAX_U64, MAX_USAGE_BYTES
from daemon.store.state import (
    SCHEMA_VERSION,
    DirectionModel,
    KeyRecord,
    State,
    StateError,
    StateStore,
    StorageError,
    write_atomic,
)
from daemon.xray.reality import generate_reality


def sample_state() -> State:
    rx = Account(Usage(12, 3400), Reading(table_handle=7, handle=3, packets=20, bytes=5000))
    tx = Account(Usage(5, 600), None)
    key = KeyRecord(
        id="k1",
        name="alice",
        uuid=UUID("6f1c2b8e-1111-4222-8333-444455556666"),
        port=10001,
        created_at=datetime(2024, 5, 1, 12, 30, tzinfo=UTC),
        last_reset_at=datetime(2024, 6, 1, tzinfo=UTC),
        rx=DirectionModel.of(rx),
        tx=DirectionModel.of(tx),
    )
    other = KeyRecord(
        id="k2",
        name="bob",
        uuid=UUID("00000000-0000-4000-8000-000000000002"),
        port=10002,
        created_at=datetime(2024, 5, 2, tzinfo=UTC),
        enabled=False,
    )
    return State(table_handle=7, keys={"k1": key, "k2": other})


def listing(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


# --- round trip -------------------------------------------------------------------------------


def test_round_trip(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state.json")
    state = sample_state()
    store.save(state)
    loaded = store.load()
    assert loaded == state
    assert loaded.schema_version == SCHEMA_VERSION == 1
    assert loaded.keys["k1"].rx.account() == Account(Usage(12, 3400), Reading(7, 3, 20, 5000))
    assert loaded.keys["k1"].tx.account() == Account(Usage(5, 600), None)
    assert loaded.keys["k2"].rx.account() == Account()
    assert loaded.keys["k2"].enabled is False
    raw = json.loads((tmp_path / "state.json").read_text())
    assert raw["schema_version"] == 1
    assert raw["keys"]["k1"]["rx"]["reading"] == {
        "table_handle": 7,
        "handle": 3,
        "packets": 20,
        "bytes": 5000,
    }


def test_save_replaces_previous(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state.json")
    store.save(sample_state())
    store.save(State())
    assert store.load() == State()
    assert listing(tmp_path) == ["state.json"]


def test_save_creates_directory(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "a" / "b" / "state.json")
    store.save(State(table_handle=3))
    assert store.load() == State(table_handle=3)


def test_missing_file_is_empty_state(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state.json")
    state = store.load()
    assert state == State()
    assert state.keys == {}
    assert state.table_handle is None
    assert listing(tmp_path) == []  # loading creates nothing


accounts = st.builds(
    Account,
    total=st.builds(Usage, st.integers(0, MAX_USAGE_BYTES), st.integers(0, MAX_USAGE_BYTES)),
    reading=st.none()
    | st.builds(
        Reading,
        st.integers(0, 2**40),
        st.integers(0, 2**40),
        st.integers(0, MAX_U64),
        st.integers(0, MAX_U64),
    ),
)


@given(accounts, accounts)
@settings(max_examples=60, deadline=None)
def test_accounts_round_trip_through_json(rx: Account, tx: Account) -> None:
    key = KeyRecord(
        id="k",
        name="n",
        uuid=UUID(int=5),
        port=1,
        created_at=datetime(2024, 1, 1, tzinfo=UTC),
        rx=DirectionModel.of(rx),
        tx=DirectionModel.of(tx),
    )
    state = State(keys={"k": key})
    again = State.model_validate(json.loads(state.model_dump_json(indent=1)))
    assert again == state
    assert again.keys["k"].rx.account() == rx
    assert again.keys["k"].tx.account() == tx


# --- damaged files ----------------------------------------------------------------------------


DAMAGED = {
    "truncated": b'{"schema_version": 1, "keys": {"k1": {"id": "k1", "na',
    "empty": b"",
    "garbage_binary": b"\xff\xfe\x00\x13\x80garbage\x00\x00",
    "garbage_text": b"this is not json at all",
    "nul_bytes": b"\x00" * 64,
    "wrong_version": b'{"schema_version": 2, "keys": {}}',
    "version_string": b'{"schema_version": "1", "keys": {}}',
    "no_version": b'{"keys": {}}',
    "json_list": b"[1, 2, 3]",
    "json_null": b"null",
    "keys_is_list": b'{"schema_version": 1, "keys": []}',
    "table_handle_string": b'{"schema_version": 1, "table_handle": "x"}',
    "unknown_field": b'{"schema_version": 1, "extra": 1}',
    "bad_port": (
        b'{"schema_version": 1, "keys": {"k": {"id": "k", "name": "n", '
        b'"uuid": "00000000-0000-4000-8000-000000000001", "port": 70000, '
        b'"created_at": "2024-01-01T00:00:00Z"}}}'
    ),
    "negative_bytes": (
        b'{"schema_version": 1, "keys": {"k": {"id": "k", "name": "n", '
        b'"uuid": "00000000-0000-4000-8000-000000000001", "port": 10001, '
        b'"created_at": "2024-01-01T00:00:00Z", "rx": {"bytes": -1}}}}'
    ),
    "bad_uuid": (
        b'{"schema_version": 1, "keys": {"k": {"id": "k", "name": "n", '
        b'"uuid": "not-a-uuid", "port": 10001, "created_at": "2024-01-01T00:00:00Z"}}}'
    ),
    "deeply_nested": b"[" * 200_000,
    "huge_number": b"9" * 5000,
    "version_true": b'{"schema_version": true, "keys": {}}',
    "version_float": b'{"schema_version": 1.0, "keys": {}}',
    "id_mismatch": (
        b'{"schema_version": 1, "keys": {"a": {"id": "b", "name": "n", '
        b'"uuid": "00000000-0000-4000-8000-000000000001", "port": 10001, '
        b'"created_at": "2024-01-01T00:00:00Z"}}}'
    ),
}


@pytest.mark.parametrize("name", sorted(DAMAGED))
def test_damaged_file_raises_and_is_left_untouched(tmp_path: Path, name: str) -> None:
    path = tmp_path / "state.json"
    data = DAMAGED[name]
    path.write_bytes(data)
    os.chmod(path, 0o640)
    before = path.stat()
    store = StateStore(path)
    with pytest.raises(StateError) as info:
        store.load()
    message = str(info.value)
    assert message.startswith(f"state file {path} ")
    assert "it was left untouched" in message
    assert f"{tmp_path / 'backups'}/" in message
    assert path.read_bytes() == data
    after = path.stat()
    assert (after.st_ino, after.st_mode, after.st_mtime_ns) == (
        before.st_ino,
        before.st_mode,
        before.st_mtime_ns,
    )
    assert listing(tmp_path) == ["state.json"]


def test_damaged_messages_say_what_is_wrong(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    store = StateStore(path)
    cases = {
        DAMAGED["truncated"]: "is not valid JSON",
        DAMAGED["garbage_binary"]: "cannot be read",
        DAMAGED["wrong_version"]: "has schema version 2, this portmeter reads 1",
        DAMAGED["no_version"]: "has schema version None",
        DAMAGED["keys_is_list"]: "does not match the schema (keys: ",
        DAMAGED["bad_port"]: "does not match the schema (keys.k.port: ",
    }
    for data, fragment in cases.items():
        path.write_bytes(data)
        with pytest.raises(StateError) as info:
            store.load()
        assert fragment in str(info.value)


def test_unreadable_state_path_is_a_directory(tmp_path: Path) -> None:
    # Tests run as root, so chmod 000 would not stop reading; a directory does.
    path = tmp_path / "state.json"
    path.mkdir()
    (path / "inside").write_bytes(b"x")
    with pytest.raises(StateError) as info:
        StateStore(path).load()
    message = str(info.value)
    assert message.startswith(f"state file {path} cannot be read (")
    assert "it was left untouched" in message
    assert path.is_dir()
    assert listing(path) == ["inside"]
    assert (path / "inside").read_bytes() == b"x"


# --- write_atomic / save ----------------------------------------------------------------------


def test_write_atomic_mode_and_no_temp_left(tmp_path: Path) -> None:
    target = tmp_path / "state.json"
    write_atomic(target, b"one")
    assert target.read_bytes() == b"one"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert listing(tmp_path) == ["state.json"]
    write_atomic(target, b"two")
    assert target.read_bytes() == b"two"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert listing(tmp_path) == ["state.json"]


def test_write_atomic_replaces_wider_permissions(tmp_path: Path) -> None:
    target = tmp_path / "state.json"
    target.write_bytes(b"old")
    os.chmod(target, 0o644)
    write_atomic(target, b"new")
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert target.read_bytes() == b"new"


def test_write_atomic_mode_with_stale_temp_file(tmp_path: Path) -> None:
    # A temp file left by a crash (or by hand) must not lend its permissions to the state file,
    # which holds the keys' VLESS uuids.
    target = tmp_path / "state.json"
    stale = tmp_path / ".state.json.tmp"
    stale.write_bytes(b"stale stale stale stale")
    os.chmod(stale, 0o644)
    write_atomic(target, b"new")
    assert target.read_bytes() == b"new"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert listing(tmp_path) == ["state.json"]


def test_write_atomic_custom_mode(tmp_path: Path) -> None:
    target = tmp_path / "x.json"
    old = os.umask(0o022)
    try:
        write_atomic(target, b"{}", mode=0o640)
    finally:
        os.umask(old)
    assert stat.S_IMODE(target.stat().st_mode) == 0o640


def test_save_mode_and_no_temp_left(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state.json")
    store.save(sample_state())
    store.save(sample_state())
    assert listing(tmp_path) == ["state.json"]
    assert stat.S_IMODE((tmp_path / "state.json").stat().st_mode) == 0o600


def test_save_failure_raises_storage_error_and_keeps_old_file(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    store = StateStore(path)
    store.save(sample_state())
    before = path.read_bytes()
    (tmp_path / ".state.json.tmp").mkdir()  # the temp file cannot be created
    with pytest.raises(StorageError) as info:
        store.save(State())
    assert str(info.value).startswith(f"cannot write {path}: ")
    assert path.read_bytes() == before
    assert store.load() == sample_state()


def test_save_into_a_file_instead_of_a_directory(tmp_path: Path) -> None:
    (tmp_path / "blocker").write_bytes(b"")
    store = StateStore(tmp_path / "blocker" / "state.json")
    with pytest.raises(StorageError, match=r"^cannot write .*blocker/state\.json: "):
        store.save(State())


# --- backups ----------------------------------------------------------------------------------


def test_backup_without_file(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state.json", backups=3)
    assert store.backup(State()) is None
    assert not store.backup_dir.exists()


def test_backup_disabled(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state.json", backups=0)
    store.save(State())
    assert store.backup(State()) is None
    assert not store.backup_dir.exists()


def test_backup_copies_current_file(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state.json", backups=3)
    store.save(sample_state())
    target = store.backup(sample_state())
    assert target is not None
    assert target.parent == tmp_path / "backups"
    assert target.name.startswith("state-") and target.name.endswith(".json")
    assert target.read_bytes() == (tmp_path / "state.json").read_bytes()
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert stat.S_IMODE(store.backup_dir.stat().st_mode) == 0o700
    assert listing(store.backup_dir) == [target.name]


@pytest.mark.parametrize(("keep", "made"), [(1, 4), (3, 7), (5, 5), (5, 2)])
def test_backup_keeps_newest_n(tmp_path: Path, keep: int, made: int) -> None:
    store = StateStore(tmp_path / "state.json", backups=keep)
    made_paths = []
    for i in range(made):
        store.save(State(table_handle=i))
        target = store.backup(State(table_handle=i))
        assert target is not None
        made_paths.append(target)
    assert len(set(made_paths)) == made  # every backup has its own name
    remaining = sorted(store.backup_dir.iterdir())
    assert [p.name for p in remaining] == sorted(p.name for p in made_paths[-keep:])
    kept_handles = [json.loads(p.read_text())["table_handle"] for p in remaining]
    assert kept_handles == list(range(max(0, made - keep), made))
    assert listing(store.backup_dir) == [p.name for p in remaining]
    assert listing(tmp_path) == ["backups", "state.json"]


def test_backup_leaves_foreign_files_alone(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state.json", backups=1)
    store.save(State())
    store.backup_dir.mkdir()
    (store.backup_dir / "notes.txt").write_text("mine")
    store.backup(State())
    store.backup(State())
    names = listing(store.backup_dir)
    assert "notes.txt" in names
    assert len([n for n in names if n.startswith("state-")]) == 1


# --- the journal ------------------------------------------------------------------------------


def many_keys(count: int = 8) -> State:
    """A state where one or two changed keys are few enough to be journalled, not snapshotted."""
    keys = {
        f"k{i}": KeyRecord(
            id=f"k{i}",
            name=f"user{i}",
            uuid=UUID(int=i + 1),
            port=10001 + i,
            created_at=datetime(2024, 5, 1, tzinfo=UTC),
        )
        for i in range(count)
    }
    return State(generation=1, instance="0a1b2c3d", table_handle=7, keys=keys)


def snapshotted(tmp_path: Path, count: int = 8) -> tuple[Path, StateStore, State]:
    """A state directory holding a snapshot of `many_keys(count)` and no journal yet."""
    path = tmp_path / "state.json"
    store = StateStore(path)
    state = many_keys(count)
    store.save(state)
    return path, store, state


def count_traffic(state: State, key_id: str, nbytes: int) -> None:
    key = state.keys[key_id]
    total = key.rx.account().total
    key.rx = DirectionModel.of(Account(Usage(total.packets + 1, total.bytes + nbytes), None))


def journal_lines(store: StateStore) -> list[dict[str, Any]]:
    return [json.loads(line) for line in store.journal.read_bytes().splitlines()]


def reloaded(path: Path) -> State:
    """What a restarted daemon would read: a new store, nothing cached."""
    return StateStore(path).load()


def test_journal_path_is_beside_the_state_file(tmp_path: Path) -> None:
    assert StateStore(tmp_path / "state.json").journal == tmp_path / "state.journal"


def test_journal_records_replay_in_order(tmp_path: Path) -> None:
    path, store, state = snapshotted(tmp_path)
    snapshot = path.read_bytes()
    for step in range(1, 6):
        state.generation += 1
        count_traffic(state, "k1", 100 * step)
        if step == 3:
            state.table_handle = 9
            count_traffic(state, "k2", 5)
        store.save(state, {"k1", "k2"} if step == 3 else {"k1"})
    assert path.read_bytes() == snapshot  # only the journal grew
    records = journal_lines(store)
    assert [r["generation"] for r in records] == [2, 3, 4, 5, 6]
    assert [sorted(r["keys"]) for r in records] == [["k1"], ["k1"], ["k1", "k2"], ["k1"], ["k1"]]
    loaded = reloaded(path)
    assert loaded == state
    assert loaded.keys["k1"].rx.bytes == 1500 and loaded.keys["k2"].rx.bytes == 5
    assert (loaded.generation, loaded.table_handle, loaded.instance) == (6, 9, "0a1b2c3d")


def test_journal_top_level_fields_replay(tmp_path: Path) -> None:
    path, store, state = snapshotted(tmp_path)
    server_key = generate_reality().private_key
    state.generation, state.reality_private_key, state.instance = 2, server_key, "ffffffff"
    store.save(state, set())
    assert journal_lines(store)[0]["keys"] == {}
    assert reloaded(path) == state


def test_journal_deleted_and_recreated_keys(tmp_path: Path) -> None:
    path, store, state = snapshotted(tmp_path)
    removed = state.keys.pop("k3")
    state.generation += 1
    store.save(state, {"k3"})
    assert journal_lines(store)[-1]["keys"] == {"k3": None}
    assert "k3" not in reloaded(path).keys
    state.keys["k3"] = removed.model_copy(update={"name": "again"})
    state.generation += 1
    store.save(state, {"k3"})
    assert reloaded(path).keys["k3"].name == "again"
    del state.keys["k3"]
    state.generation += 1
    store.save(state, {"k3", "never-existed"})  # an unknown id deleted: nothing to do on replay
    assert reloaded(path) == state


def test_torn_last_line_is_ignored_then_cut_off_by_the_next_append(tmp_path: Path) -> None:
    path, store, state = snapshotted(tmp_path)
    state.generation += 1
    count_traffic(state, "k1", 10)
    store.save(state, {"k1"})
    acknowledged = state.model_copy(deep=True)
    whole = store.journal.read_bytes()
    # A crash mid-append: part of the next record, no newline. It was never acknowledged.
    count_traffic(state, "k1", 999)
    state.generation += 1
    record = json.dumps({"generation": state.generation, "keys": {}}).encode()
    with store.journal.open("ab") as journal:
        journal.write(record[: len(record) // 2])
    torn = store.journal.read_bytes()
    restarted = StateStore(path)
    loaded = restarted.load()
    assert loaded == acknowledged
    assert store.journal.read_bytes() == torn  # loading writes nothing
    count_traffic(loaded, "k2", 20)
    loaded.generation += 1
    restarted.save(loaded, {"k2"})
    data = store.journal.read_bytes()
    assert data.startswith(whole) and data.endswith(b"\n")
    assert len(journal_lines(store)) == 2  # the torn part is gone, every line is whole
    assert reloaded(path) == loaded


def test_torn_tail_of_nul_bytes_is_ignored(tmp_path: Path) -> None:
    # A crash can leave the file longer than what was written, the rest zeros.
    path, store, state = snapshotted(tmp_path)
    state.generation += 1
    store.save(state, {"k0"})
    with store.journal.open("ab") as journal:
        journal.write(b"\0" * 4096)
    assert reloaded(path) == state


JOURNAL_DAMAGE = {
    "not json": (b"{this is not json\n", "line 2 is not valid JSON ("),
    "nul bytes with a newline": (b"\0\0\0\n", "line 2 is not valid JSON ("),
    "unknown field": (
        (
            b'{"generation": 5, "instance": "", "table_handle": null, "reality_private_key": null, '
            b'"keys": {}, "extra": 1}\n'
        ),
        "line 2 does not match the schema (extra: ",
    ),
    "bad port": (
        (
            b'{"generation": 5, "instance": "", "table_handle": null, "reality_private_key": null, '
            b'"keys": {"k": {"id": "k", "name": "n", '
            b'"uuid": "00000000-0000-4000-8000-000000000001", '
            b'"port": 70000, "created_at": "2024-01-01T00:00:00Z"}}}\n'
        ),
        "line 2 does not match the schema (keys.k.port: ",
    ),
    "id mismatch": (
        (
            b'{"generation": 5, "instance": "", "table_handle": null, "reality_private_key": null, '
            b'"keys": {"a": {"id": "b", "name": "n", '
            b'"uuid": "00000000-0000-4000-8000-000000000001", '
            b'"port": 10001, "created_at": "2024-01-01T00:00:00Z"}}}\n'
        ),
        "line 2 does not match the schema (Value error, key stored under 'a' has id 'b'",
    ),
    "a list": (b"[1, 2]\n", "line 2 does not match the schema (Input should be an object)"),
    "missing generation": (
        b'{"instance": "", "table_handle": null, "reality_private_key": null, "keys": {}}\n',
        "line 2 does not match the schema (generation: ",
    ),
}


@pytest.mark.parametrize("name", sorted(JOURNAL_DAMAGE))
def test_damaged_journal_line_raises_and_files_are_left_untouched(
    tmp_path: Path, name: str
) -> None:
    path, store, state = snapshotted(tmp_path)
    state.generation += 1
    store.save(state, {"k1"})
    state.generation += 1
    store.save(state, {"k2"})
    first, second = store.journal.read_bytes().splitlines(keepends=True)
    bad, fragment = JOURNAL_DAMAGE[name]
    damaged = first + bad + second  # damage in the middle: not a torn append
    store.journal.write_bytes(damaged)
    snapshot = path.read_bytes()
    before = (path.stat(), store.journal.stat())
    with pytest.raises(StateError) as info:
        StateStore(path).load()
    message = str(info.value)
    assert message.startswith(f"state journal {store.journal} {fragment}"), message
    assert f"it and {path} were left untouched" in message
    assert "portmeter state restore" in message and f"{tmp_path / 'backups'}/" in message
    assert (path.read_bytes(), store.journal.read_bytes()) == (snapshot, damaged)
    after = (path.stat(), store.journal.stat())
    assert [(s.st_ino, s.st_mtime_ns, s.st_size) for s in after] == [
        (s.st_ino, s.st_mtime_ns, s.st_size) for s in before
    ]
    assert listing(tmp_path) == ["state.journal", "state.json"]


def test_damaged_last_line_with_newline_is_damage_not_a_torn_append(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    store = StateStore(path)
    store.save(many_keys())
    store.journal.write_bytes(b'{"generation": 9, "keys": {\n')
    with pytest.raises(StateError, match="line 1 is not valid JSON"):
        StateStore(path).load()


def test_journal_without_snapshot_is_refused(tmp_path: Path) -> None:
    path, store, state = snapshotted(tmp_path)
    state.generation += 1
    store.save(state, {"k1"})
    path.unlink()  # as if an operator moved only the snapshot away
    with pytest.raises(
        StateError, match=r"^state journal .* holds changes to .*state\.json, which is gone"
    ):
        StateStore(path).load()


def test_records_not_newer_than_the_snapshot_are_skipped(tmp_path: Path) -> None:
    # A crash after compaction wrote the snapshot but before it dropped the journal.
    path, store, state = snapshotted(tmp_path)
    for _ in range(3):
        state.generation += 1
        count_traffic(state, "k1", 7)
        store.save(state, {"k1"})
    old_journal = store.journal.read_bytes()
    state.generation += 1
    store.save(state)  # compaction
    assert not store.journal.exists()
    store.journal.write_bytes(old_journal)
    restarted = StateStore(path)
    loaded = restarted.load()
    assert loaded == state and loaded.keys["k1"].rx.bytes == 21
    count_traffic(loaded, "k1", 1)
    loaded.generation += 1
    restarted.save(loaded, {"k1"})  # appended after the stale records, which stay harmless
    assert reloaded(path) == loaded


def test_a_store_that_never_loaded_writes_a_snapshot_first(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    StateStore(path).save(many_keys(), {"k1"})
    assert listing(tmp_path) == ["state.json"]
    assert reloaded(path) == many_keys()


def test_changes_to_most_keys_write_a_snapshot(tmp_path: Path) -> None:
    path, store, state = snapshotted(tmp_path)
    state.generation += 1
    store.save(state, {"k1"})
    assert store.journal.exists()
    state.generation += 1
    for key_id in state.keys:
        count_traffic(state, key_id, 1)
    store.save(state, set(state.keys))
    assert not store.journal.exists()
    assert json.loads(path.read_text())["generation"] == 3
    assert reloaded(path) == state


def test_journal_is_compacted_past_its_limit(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    store = StateStore(path, journal_min=0)  # the limit is then the snapshot's size
    state = many_keys()
    store.save(state)
    limit = path.stat().st_size
    sizes = []
    compactions = 0
    for _ in range(40):
        state.generation += 1
        count_traffic(state, "k1", 1)
        store.save(state, {"k1"})
        size = store.journal.stat().st_size if store.journal.exists() else 0
        if size == 0:
            compactions += 1
            assert json.loads(path.read_text())["generation"] == state.generation
            limit = path.stat().st_size
        assert size <= limit
        sizes.append(size)
        assert reloaded(path) == state
    assert compactions >= 2 and max(sizes) > limit // 2


def test_journal_min_defers_compaction_of_a_small_snapshot(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    store = StateStore(path)  # 1 MiB
    state = many_keys()
    store.save(state)
    snapshot = path.read_bytes()
    for _ in range(30):
        state.generation += 1
        count_traffic(state, "k1", 1)
        store.save(state, {"k1"})
    assert path.read_bytes() == snapshot
    assert store.journal.stat().st_size > len(snapshot)
    assert len(journal_lines(store)) == 30


def test_journal_mode_is_private(tmp_path: Path) -> None:
    _, store, state = snapshotted(tmp_path)
    state.generation += 1
    store.save(state, {"k1"})
    assert stat.S_IMODE(store.journal.stat().st_mode) == 0o600


FAILED_APPEND = """
import json, resource, signal, sys
from pathlib import Path
from daemon.store.state import StateStore, StorageError

path = Path(sys.argv[1])
store = StateStore(path)
state = store.load()
journal = store.journal.read_bytes()
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
resource.setrlimit(resource.RLIMIT_FSIZE, (len(journal) + 100, hard))
state.generation += 1
state.keys["k1"].note = "x" * 400  # the record cannot fit in 100 more bytes: a partial write
try:
    store.save(state, {"k1"})
except StorageError as exc:
    error = str(exc)
else:
    error = None
after = store.journal.read_bytes()
resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
state.keys["k1"].note = "fits now"
store.save(state, {"k1"})
print(json.dumps({"error": error, "identical": after == journal}))
"""


def test_failed_append_leaves_the_journal_byte_identical(tmp_path: Path) -> None:
    path, store, state = snapshotted(tmp_path)
    state.generation += 1
    count_traffic(state, "k1", 5)
    store.save(state, {"k1"})
    before = store.journal.read_bytes()
    child = subprocess.run(
        [sys.executable, "-c", FAILED_APPEND, str(path)],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).parent.parent,
    )
    result = json.loads(child.stdout)
    assert result["error"] == f"cannot write {store.journal}: File too large"
    assert result["identical"] is True
    # The same store retried the same generation after the failure: one record for it, whole.
    records = journal_lines(store)
    assert store.journal.read_bytes().startswith(before)
    assert [r["generation"] for r in records] == [2, 3]
    loaded = reloaded(path)
    assert loaded.generation == 3 and loaded.keys["k1"].note == "fits now"


@pytest.mark.root  # mounts a small tmpfs
def test_failed_append_on_a_full_file_system(tmp_path: Path) -> None:
    """ENOSPC as on a real full disk: a tiny tmpfs filled to its last block."""
    mount = tmp_path / "small"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], check=True)
    try:
        path = mount / "state.json"
        store = StateStore(path)
        state = many_keys()
        store.save(state)
        state.generation += 1
        store.save(state, {"k1"})
        before = store.journal.read_bytes()
        acknowledged = state.model_copy(deep=True)
        fd = os.open(mount / "filler", os.O_WRONLY | os.O_CREAT)
        try:
            with pytest.raises(OSError):
                while True:
                    os.write(fd, b"\0" * 512)
        finally:
            os.close(fd)
        state.generation += 1
        state.keys["k1"].note = "n" * 5000  # more than the journal's last block has room for
        with pytest.raises(StorageError, match="No space left on device"):
            store.save(state, {"k1"})
        assert store.journal.read_bytes() == before
        assert reloaded(path) == acknowledged
        (mount / "filler").unlink()
        store.save(state, {"k1"})
        assert reloaded(path) == state
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_backup_holds_the_journal_and_restore_moves_it_aside(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    store = StateStore(path, backups=3)
    state = many_keys()
    store.save(state)
    state.generation += 1
    count_traffic(state, "k1", 42)
    store.save(state, {"k1"})
    target = store.backup(state)
    assert target is not None
    backed_up = StateStore(target).load()
    assert backed_up == state and backed_up.keys["k1"].rx.bytes == 42  # not only the snapshot
    assert store.valid_backups() == [target]
    # Later saves, journalled only: restoring must not replay them onto the backup.
    state.generation += 1
    count_traffic(state, "k1", 1000)
    del state.keys["k2"]
    store.save(state, {"k1", "k2"})
    journal = store.journal.read_bytes()
    snapshot = path.read_bytes()
    used, aside = StateStore(path, backups=3).restore_newest_backup()
    assert used == target
    assert [p.name.split(".replaced-")[0] for p in aside] == ["state.json", "state.journal"]
    assert [p.read_bytes() for p in aside] == [snapshot, journal]
    assert not store.journal.exists()
    restored = reloaded(path)
    assert restored == backed_up.model_copy(update={"instance": ""})
    assert restored.keys["k1"].rx.bytes == 42 and "k2" in restored.keys


def test_restore_after_a_crash_between_its_two_moves(tmp_path: Path) -> None:
    # Only the journal is left (the snapshot was moved aside): load refuses, restore finishes.
    path = tmp_path / "state.json"
    store = StateStore(path, backups=3)
    state = many_keys()
    store.save(state)
    assert store.backup(state) is not None
    state.generation += 1
    store.save(state, {"k1"})
    path.unlink()
    with pytest.raises(StateError):
        StateStore(path).load()
    _, aside = StateStore(path).restore_newest_backup()
    assert [p.name.split(".replaced-")[0] for p in aside] == ["state.journal"]
    assert reloaded(path) == many_keys().model_copy(update={"instance": ""})


# A save of some keys: ("traffic" | "note" | "add" | "delete", key index, amount), then a
# journalled save of what changed or a full snapshot.
operations = st.lists(
    st.tuples(
        st.lists(
            st.tuples(
                st.sampled_from(["traffic", "note", "add", "delete"]),
                st.integers(0, 11),
                st.integers(0, 10**12),
            ),
            max_size=4,
        ),
        st.booleans(),  # a full snapshot instead of a journal record
        st.none() | st.integers(0, 50),  # a new table handle
    ),
    min_size=1,
    max_size=25,
)


@given(operations, st.sampled_from([0, 600, 3000, 1 << 20]))
@settings(max_examples=100, deadline=None)
def test_any_sequence_of_saves_loads_as_the_last_saved_state(
    ops: list[tuple[list[tuple[str, int, int]], bool, int | None]],
    journal_min: int,
) -> None:
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "state.json"
        store = StateStore(path, journal_min=journal_min)
        state = many_keys(6)
        store.save(state)
        for changes, full, handle in ops:
            changed = set()
            for kind, index, amount in changes:
                key_id = f"k{index}"
                if kind == "delete":
                    state.keys.pop(key_id, None)
                elif kind == "add" or key_id not in state.keys:
                    state.keys[key_id] = KeyRecord(
                        id=key_id,
                        name=f"n{amount}",
                        uuid=UUID(int=amount + 1),
                        port=10001 + index,
                        created_at=datetime(2024, 1, 1, tzinfo=UTC),
                    )
                elif kind == "traffic":
                    count_traffic(state, key_id, amount)
                else:
                    state.keys[key_id].note = str(amount)
                changed.add(key_id)
            if handle is not None:
                state.table_handle = handle
            state.generation += 1
            store.save(state, None if full else changed)
            assert reloaded(path) == state
        assert store.load() == state
