"""Tests for daemon.state: the state file, atomic writes, damaged files, backups."""

from __future__ import annotations

import json
import os
import stat
from datetime import UTC, datetime
from pathlib import Path
from uuid import UUID

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from daemon.accounting import Account, Reading, Usage
from daemon.state import (
    SCHEMA_VERSION,
    DirectionModel,
    KeyRecord,
    State,
    StateError,
    StateStore,
    StorageError,
    write_atomic,
)


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
    assert loaded.keys["k1"].rx.account() == Account(
        Usage(12, 3400), Reading(7, 3, 20, 5000))
    assert loaded.keys["k1"].tx.account() == Account(Usage(5, 600), None)
    assert loaded.keys["k2"].rx.account() == Account()
    assert loaded.keys["k2"].enabled is False
    raw = json.loads((tmp_path / "state.json").read_text())
    assert raw["schema_version"] == 1
    assert raw["keys"]["k1"]["rx"]["reading"] == {
        "table_handle": 7, "handle": 3, "packets": 20, "bytes": 5000}


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
    total=st.builds(Usage, st.integers(0, 2**63), st.integers(0, 2**70)),
    reading=st.none() | st.builds(Reading, st.integers(0, 2**40), st.integers(0, 2**40),
                                  st.integers(0, 2**63), st.integers(0, 2**70)),
)


@given(accounts, accounts)
@settings(max_examples=60, deadline=None)
def test_accounts_round_trip_through_json(rx: Account, tx: Account) -> None:
    key = KeyRecord(id="k", name="n", uuid=UUID(int=5), port=1,
                    created_at=datetime(2024, 1, 1, tzinfo=UTC),
                    rx=DirectionModel.of(rx), tx=DirectionModel.of(tx))
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
    "bad_port": (b'{"schema_version": 1, "keys": {"k": {"id": "k", "name": "n", '
                 b'"uuid": "00000000-0000-4000-8000-000000000001", "port": 70000, '
                 b'"created_at": "2024-01-01T00:00:00Z"}}}'),
    "negative_bytes": (b'{"schema_version": 1, "keys": {"k": {"id": "k", "name": "n", '
                       b'"uuid": "00000000-0000-4000-8000-000000000001", "port": 10001, '
                       b'"created_at": "2024-01-01T00:00:00Z", "rx": {"bytes": -1}}}}'),
    "bad_uuid": (b'{"schema_version": 1, "keys": {"k": {"id": "k", "name": "n", '
                 b'"uuid": "not-a-uuid", "port": 10001, "created_at": "2024-01-01T00:00:00Z"}}}'),
    "deeply_nested": b"[" * 200_000,
    "huge_number": b"9" * 5000,
    "version_true": b'{"schema_version": true, "keys": {}}',
    "version_float": b'{"schema_version": 1.0, "keys": {}}',
    "id_mismatch": (b'{"schema_version": 1, "keys": {"a": {"id": "b", "name": "n", '
                    b'"uuid": "00000000-0000-4000-8000-000000000001", "port": 10001, '
                    b'"created_at": "2024-01-01T00:00:00Z"}}}'),
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
        before.st_ino, before.st_mode, before.st_mtime_ns)
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
    assert store.backup() is None
    assert not store.backup_dir.exists()


def test_backup_disabled(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state.json", backups=0)
    store.save(State())
    assert store.backup() is None
    assert not store.backup_dir.exists()


def test_backup_copies_current_file(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state.json", backups=3)
    store.save(sample_state())
    target = store.backup()
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
        target = store.backup()
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
    store.backup()
    store.backup()
    names = listing(store.backup_dir)
    assert "notes.txt" in names
    assert len([n for n in names if n.startswith("state-")]) == 1
