"""The service's key index (daemon/service/index.py) answers every lookup exactly as a scan of
all keys would, through any sequence of creates, renames, port moves, deletes and rebuilds."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

from hypothesis import given, settings
from hypothesis import strategies as st

from daemon import names
from daemon.service.index import KeyIndex
from daemon.store.state import DirectionModel, KeyRecord

NAMES = ["alice", "Alice", "ALİCE", "bob", "b\u200bob", "ｂｏｂ", "carol", "k1", "0a1b2c3d"]
IDS = ["0a1b2c3d", "11111111", "22222222", "33333333", "44444444"]
UUIDS = [uuid.UUID(int=n) for n in range(1, 4)]
PORTS = [20003, 20001, 20002]
TOKENS = ["", "tok-a", "tok-b"]
MOMENT = datetime(2026, 1, 1, tzinfo=UTC)

steps = st.lists(
    st.one_of(
        st.tuples(
            st.just("put"),
            st.sampled_from(IDS),
            st.sampled_from(NAMES),
            st.sampled_from(UUIDS),
            st.sampled_from(PORTS),
            st.sampled_from(TOKENS),
        ),
        st.tuples(st.just("delete"), st.sampled_from(IDS)),
        st.tuples(st.just("rebuild")),
    ),
    max_size=40,
)


def scanned_finds(keys: dict[str, KeyRecord], ref: str) -> list[KeyRecord]:
    """What the lookup before the index could answer (a scan of every key): by id, else by
    uuid, else names.find's rule; several only where a damaged state repeats a uuid or name,
    when the scan's choice was dict order and any of them is as right."""
    if ref in keys:
        return [keys[ref]]
    levels = (
        [key for key in keys.values() if str(key.uuid) == ref.lower()],
        [key for key in keys.values() if key.name == ref],
        [key for key in keys.values() if names.fold(key.name) == names.fold(ref)],
    )
    for level, found in enumerate(levels):
        if found and (level < 2 or len(found) == 1):
            return found
    return []


def apply(keys: dict[str, KeyRecord], index: KeyIndex, step: tuple[object, ...]) -> None:
    if step[0] == "put":
        _, key_id, name, key_uuid, port, token = step
        assert isinstance(key_id, str) and isinstance(name, str) and isinstance(port, int)
        assert isinstance(key_uuid, uuid.UUID) and isinstance(token, str)
        keys[key_id] = KeyRecord(
            id=key_id, name=name, uuid=key_uuid, port=port, created_at=MOMENT, sub_token=token
        )
        index.follow(key_id)
    elif step[0] == "delete":
        assert isinstance(step[1], str)
        keys.pop(step[1], None)
        index.follow(step[1])
    else:
        index.rebuild()


@settings(max_examples=300, deadline=None)
@given(steps)
def test_index_answers_as_a_scan_of_every_key(sequence: list[tuple[object, ...]]) -> None:
    keys: dict[str, KeyRecord] = {}
    index = KeyIndex(keys)
    for step in sequence:
        apply(keys, index, step)
        assert set(index.ports()) == {key.port for key in keys.values()}
        ordered = sorted(keys.values(), key=lambda k: k.port)
        assert [k.port for k in index.in_port_order()] == [k.port for k in ordered]
        assert {k.id for k in index.in_port_order()} == set(keys)
        assert index.in_port_order(1, 1) == index.in_port_order()[1:2]
        for token in TOKENS:
            holders = [k for k in keys.values() if k.sub_token and k.sub_token == token]
            found = index.with_token(token)
            assert found in holders if holders else found is None, token
        for port in PORTS:
            on_port = [key for key in keys.values() if key.port == port]
            assert index.on_port(port) in on_port if on_port else index.on_port(port) is None
        refs = NAMES + IDS + [str(u) for u in UUIDS] + [str(UUIDS[0]).upper(), "nobody"]
        for ref in refs:
            could = scanned_finds(keys, ref)
            found = index.find(ref)
            assert found in could if could else found is None, ref
        for name in NAMES:
            exact = sorted(
                (k for k in keys.values() if k.name == name), key=lambda k: (k.port, k.id)
            )
            assert index.named(name) == exact
            same = names.same_as(name, (key.name for key in keys.values()))
            assert (index.same_name(name) is None) == (same is None)
            if same is not None:
                assert names.fold(index.same_name(name) or "") == names.fold(name)


def test_a_change_of_totals_leaves_the_index_as_it_was() -> None:
    key = KeyRecord(id="11111111", name="alice", uuid=UUIDS[0], port=20001, created_at=MOMENT)
    keys = {key.id: key}
    index = KeyIndex(keys)
    key.rx = DirectionModel(packets=1, bytes=1400)
    index.follow(key.id, status=True)
    assert index.find("ALICE") is key
    assert list(index.ports()) == [20001]
