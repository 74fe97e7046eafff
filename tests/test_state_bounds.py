"""The state file means what it says: values outside daemon/bounds.py, naive dates and two keys on
one port are refused at load with the file, key and field named; backups never repeat a state."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest

from daemon.bounds import MAX_EPOCH, MAX_GENERATION, MAX_LIMIT_BYTES, MAX_U64, MAX_USAGE_BYTES
from daemon.store.state import State, StateError, StateStore, snapshot_bytes
from daemon.xray.reality import generate_reality
from tests.test_state_store import count_traffic, many_keys, snapshotted

# field path inside key k1 -> a value just past its bound, and the words of the refusal
OUT_OF_BOUNDS: dict[str, tuple[Any, str]] = {
    "data_limit_bytes": (MAX_LIMIT_BYTES + 1, "less than or equal to 1000000000000000000"),
    "data_limit_bytes=2^64": (2**64, "less than or equal to 1000000000000000000"),
    "epoch": (MAX_EPOCH + 1, "less than or equal to 1000000000"),
    "used_before_reset": (-1, "greater than or equal to 0"),
    "rx.bytes": (MAX_USAGE_BYTES + 1, "less than or equal to 1000000000000000000"),
    "tx.packets": (MAX_USAGE_BYTES + 1, "less than or equal to 1000000000000000000"),
    "expire_at": ("1970-01-01T00:00:00Z", "greater than or equal to 2000-01-01"),
    "expire_at=9999": ("9999-06-01T00:00:00Z", "less than or equal to 9998-12-31"),
    "next_reset_at": ("2030-01-01T00:00:00", "timezone info"),
    "port": (0, "greater than or equal to 1"),
}


def poisoned_key(raw: dict[str, Any], case: str) -> str:
    """Put the out-of-bounds value of `case` into key k1 of `raw`; the field's dotted path."""
    field = case.split("=")[0]
    target = raw["keys"]["k1"]
    *parents, leaf = field.split(".")
    for parent in parents:
        target = target[parent]
    target[leaf] = OUT_OF_BOUNDS[case][0]
    return field


@pytest.mark.parametrize("case", sorted(OUT_OF_BOUNDS))
def test_a_snapshot_value_out_of_bounds_is_refused_naming_file_key_and_field(
    tmp_path: Path, case: str
) -> None:
    path, _, state = snapshotted(tmp_path)
    raw = json.loads(snapshot_bytes(state))
    field = poisoned_key(raw, case)
    path.write_text(json.dumps(raw))
    with pytest.raises(StateError) as refused:
        StateStore(path).load()
    message = str(refused.value)
    assert message.startswith(f"state file {path} does not match the schema (keys.k1.{field}: ")
    assert OUT_OF_BOUNDS[case][1] in message and "it was left untouched" in message


@pytest.mark.parametrize("case", ["data_limit_bytes=2^64", "epoch", "expire_at"])
def test_a_journal_value_out_of_bounds_is_refused_naming_line_key_and_field(
    tmp_path: Path, case: str
) -> None:
    path, store, state = snapshotted(tmp_path)
    state.generation += 1
    store.save(state, {"k1"})
    record = json.loads(store.journal.read_bytes())
    field = poisoned_key(record, case)
    store.journal.write_text(json.dumps(record) + "\n")
    with pytest.raises(StateError) as refused:
        StateStore(path).load()
    assert str(refused.value).startswith(
        f"state journal {store.journal} line 1 does not match the schema (keys.k1.{field}: "
    )


@pytest.mark.parametrize(
    ("where", "value"),
    [("generation", MAX_GENERATION + 1), ("table_handle", MAX_U64 + 1), ("table_handle", -1)],
)
def test_top_level_numbers_out_of_bounds_are_refused(
    tmp_path: Path, where: str, value: int
) -> None:
    path, _, state = snapshotted(tmp_path)
    raw = json.loads(snapshot_bytes(state))
    raw[where] = value
    path.write_text(json.dumps(raw))
    with pytest.raises(StateError, match=f"does not match the schema \\({where}: "):
        StateStore(path).load()


def test_values_at_the_bounds_load() -> None:
    state = many_keys(2)
    key = state.keys["k1"]
    raw = json.loads(snapshot_bytes(state))
    raw["generation"] = MAX_GENERATION
    raw["keys"]["k1"].update(
        data_limit_bytes=MAX_LIMIT_BYTES, epoch=MAX_EPOCH, used_before_reset=2 * MAX_USAGE_BYTES,
        expire_at="9998-12-31T00:00:00Z", last_reset_at="2000-01-01T00:00:00+00:00",
        rx={"packets": MAX_USAGE_BYTES, "bytes": MAX_USAGE_BYTES,
            "reading": dict.fromkeys(("table_handle", "handle", "packets", "bytes"), MAX_U64)},
    )
    loaded = State.model_validate(raw)
    assert loaded.keys["k1"].data_limit_bytes == MAX_LIMIT_BYTES and loaded.keys["k1"].id == key.id


def test_two_keys_on_one_port_are_refused_in_the_snapshot_and_through_the_journal(
    tmp_path: Path,
) -> None:
    path, store, state = snapshotted(tmp_path)
    raw = json.loads(snapshot_bytes(state))
    raw["keys"]["k2"]["port"] = raw["keys"]["k1"]["port"]
    path.write_text(json.dumps(raw))
    with pytest.raises(StateError, match="keys 'k1' and 'k2' have the same port 10002"):
        StateStore(path).load()

    path, store, state = snapshotted(tmp_path / "journal")
    state.generation += 1
    state.keys["k2"].port = state.keys["k1"].port
    store.save(state, {"k2"})
    with pytest.raises(StateError) as refused:
        StateStore(path).load()
    assert str(refused.value).startswith(
        f"state journal {store.journal} makes keys 'k1' and 'k2' have the same port 10002"
    )


def test_a_backup_is_written_only_when_the_state_differs_from_the_newest(tmp_path: Path) -> None:
    _, store, state = snapshotted(tmp_path)
    first = store.backup(state)
    assert first is not None
    state.generation += 5  # every start saves once: the same keys are the same state
    assert store.backup(state) is None
    count_traffic(state, "k1", 100)
    second = store.backup(state)
    assert second is not None and second != first
    assert store.backup(state) is None
    assert sorted(p.name for p in store.backup_dir.iterdir()) == sorted([first.name, second.name])


def test_a_backup_out_of_bounds_is_not_offered_for_restore(tmp_path: Path) -> None:
    _, store, state = snapshotted(tmp_path)
    good = store.backup(state)
    count_traffic(state, "k1", 1)
    newest = store.backup(state)
    assert good is not None and newest is not None
    raw = json.loads(newest.read_bytes())
    poisoned_key(raw, "data_limit_bytes=2^64")
    newest.write_text(json.dumps(raw))
    assert store.valid_backups() == [good]


GOOD_KEY = generate_reality().private_key
K1 = UUID(int=2)  # key k1's uuid in many_keys
XRAY_KEY_FIELDS: dict[str, tuple[str, Any, str]] = {
    # case -> (field, bad value, the location and words of the refusal)
    "short_id": ("short_id", "zz", "short_id: Value error, short id 'zz' must be 0-16"),
    "short_id odd": ("short_id", "abc", "short_id: Value error, short id 'abc' must be 0-16"),
    "short_id newline": ("short_id", "ab\n", "short_id: Value error, short id 'ab\\n' must be"),
    "extra_short_ids": (
        "extra_short_ids",
        ["ab", "0123456789abcdef01"],
        "extra_short_ids.1: Value error, short id '0123456789abcdef01' must be 0-16",
    ),
    "reality_private_key": (
        "reality_private_key",
        GOOD_KEY[:-1],
        "reality_private_key: Value error, an X25519 key must be 32 bytes",
    ),
    "xray_inbound": (
        "xray_inbound",
        {"protocol": "vless", "settings": {"clients": [{"id": str(UUID(int=99))}]}},
        (
            "xray_inbound: Value error, key k1: its inbound template must hold one client, "
            f"of uuid {K1}"
        ),
    ),
}


@pytest.mark.parametrize("case", sorted(XRAY_KEY_FIELDS))
def test_a_key_xray_field_xray_would_refuse_is_refused_at_load(tmp_path: Path, case: str) -> None:
    """Accepted, it would stop Xray's start and every later create or update of any key."""
    path, _, state = snapshotted(tmp_path)
    raw = json.loads(snapshot_bytes(state))
    field, value, words = XRAY_KEY_FIELDS[case]
    raw["keys"]["k1"][field] = value
    path.write_text(json.dumps(raw))
    with pytest.raises(StateError) as refused:
        StateStore(path).load()
    assert str(refused.value).startswith(
        f"state file {path} does not match the schema (keys.k1.{words}"
    )


@pytest.mark.parametrize(
    ("tags", "words"),
    [
        (["vless-reality", "vless-reality"], "route_sources: Value error, a tag is listed twice"),
        ([""], "route_sources.0: String should have at least 1 character"),
    ],
    ids=["twice", "empty"],
)
@pytest.mark.parametrize("where", ["state", "key"])
def test_route_sources_out_of_shape_are_refused_at_load(
    tmp_path: Path, tags: list[str], words: str, where: str
) -> None:
    """The shared inbounds whose routing rules keys join (README "Xray"): tags, each once."""
    path, _, state = snapshotted(tmp_path)
    raw = json.loads(snapshot_bytes(state))
    (raw if where == "state" else raw["keys"]["k1"])["route_sources"] = tags
    path.write_text(json.dumps(raw))
    with pytest.raises(StateError) as refused:
        StateStore(path).load()
    at = "" if where == "state" else "keys.k1."
    assert str(refused.value).startswith(
        f"state file {path} does not match the schema ({at}{words}"
    )


def test_a_bad_server_private_key_is_refused_in_the_snapshot_and_the_journal(
    tmp_path: Path,
) -> None:
    path, store, state = snapshotted(tmp_path)
    raw = json.loads(snapshot_bytes(state))
    raw["reality_private_key"] = "not a key"
    path.write_text(json.dumps(raw))
    with pytest.raises(StateError) as refused:
        StateStore(path).load()
    assert str(refused.value).startswith(
        f"state file {path} does not match the schema (reality_private_key: Value error, an "
        "X25519 key must be 32 bytes"
    )

    path, store, state = snapshotted(tmp_path / "journal")
    state.generation += 1
    store.save(state, {"k1"})
    record = json.loads(store.journal.read_bytes())
    record["reality_private_key"] = GOOD_KEY + "A"
    store.journal.write_text(json.dumps(record) + "\n")
    with pytest.raises(StateError) as refused:
        StateStore(path).load()
    assert str(refused.value).startswith(
        f"state journal {store.journal} line 1 does not match the schema (reality_private_key: "
    )


def test_good_xray_fields_load(tmp_path: Path) -> None:
    path, _, state = snapshotted(tmp_path)
    raw = json.loads(snapshot_bytes(state))
    uuid = raw["keys"]["k1"]["uuid"]
    inbound = {"protocol": "vless", "settings": {"clients": [{"id": uuid, "flow": ""}]}}
    raw["reality_private_key"] = GOOD_KEY
    raw["keys"]["k1"].update(
        short_id="0123456789abcdef",
        extra_short_ids=["", "ab"],
        reality_private_key=GOOD_KEY + "=",
        xray_inbound=inbound,
    )
    path.write_text(json.dumps(raw))
    loaded = StateStore(path).load()
    key = loaded.keys["k1"]
    assert (key.short_id, key.extra_short_ids) == ("0123456789abcdef", ["", "ab"])
    assert (key.reality_private_key, loaded.reality_private_key) == (GOOD_KEY + "=", GOOD_KEY)
    assert key.xray_inbound == inbound
