"""Unit and property tests for daemon.allocator (pure port allocation)."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from daemon.allocator import (
    PortRange,
    PortUnavailable,
    allocate,
    available,
    check_request,
    lowest_free,
    problems,
)

FAST = settings(max_examples=150, deadline=None)


# --- PortRange.parse --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "first", "last"),
    [
        ("10001-10100", 10001, 10100),
        ("10001-20000", 10001, 20000),
        ("1-65535", 1, 65535),
        ("1-1", 1, 1),
        ("65535-65535", 65535, 65535),
        ("  10001 - 10100  ", 10001, 10100),
        ("00080-00090", 80, 90),
    ],
)
def test_parse_valid(text: str, first: int, last: int) -> None:
    port_range = PortRange.parse(text)
    assert port_range == PortRange(first, last)
    assert port_range.first == first
    assert port_range.last == last
    assert port_range.size == last - first + 1
    assert str(port_range) == f"{first}-{last}"


@pytest.mark.parametrize(
    "text",
    [
        "",
        "abc",
        "10001",
        "10001-",
        "-10100",
        "10001:10100",
        "10001 10100",
        "a-b",
        "1-2-3",
        "10001-10100x",
        "+1-5",
        "1.5-6",
        "123456-123457",
        "-1-5",
    ],
)
def test_parse_rejects_malformed(text: str) -> None:
    with pytest.raises(ValueError, match="must look like 10001-10100"):
        PortRange.parse(text)


@pytest.mark.parametrize(
    "text", ["0-5", "0-0", "1-65536", "1-70000", "65536-65536", "20000-10000", "2-1"]
)
def test_parse_rejects_out_of_bounds_or_reversed(text: str) -> None:
    with pytest.raises(ValueError, match=r"must satisfy 1 <= first <= last <= 65535"):
        PortRange.parse(text)


@pytest.mark.parametrize(("first", "last"), [(0, 1), (5, 4), (1, 65536), (-1, 10), (70000, 70001)])
def test_constructor_validates(first: int, last: int) -> None:
    with pytest.raises(ValueError):
        PortRange(first, last)


@given(st.integers(1, 65535), st.integers(1, 65535))
@FAST
def test_parse_property(a: int, b: int) -> None:
    text = f"{a}-{b}"
    if a <= b:
        port_range = PortRange.parse(text)
        assert (port_range.first, port_range.last) == (a, b)
        assert PortRange.parse(str(port_range)) == port_range
    else:
        with pytest.raises(ValueError):
            PortRange.parse(text)


def test_contains() -> None:
    port_range = PortRange(10, 20)
    assert 10 in port_range
    assert 20 in port_range
    assert 15 in port_range
    assert 9 not in port_range
    assert 21 not in port_range
    assert "15" not in port_range
    assert 15.0 not in port_range
    assert None not in port_range


# --- lowest_free ------------------------------------------------------------------------------


def test_lowest_free_empty() -> None:
    assert lowest_free(PortRange(10001, 10100), set(), set()) == 10001


def test_lowest_free_skips_assigned_and_busy() -> None:
    port_range = PortRange(10001, 10010)
    assert lowest_free(port_range, {10001, 10003}, {10002}) == 10004
    assert lowest_free(port_range, {10002}, set()) == 10001
    assert lowest_free(port_range, set(), {10001}) == 10002


def test_lowest_free_ignores_ports_outside_range() -> None:
    assert lowest_free(PortRange(100, 102), {1, 2, 99, 103}, {50, 1000}) == 100


def test_lowest_free_full_range_is_none() -> None:
    port_range = PortRange(100, 104)
    assert lowest_free(port_range, {100, 102, 104}, {101, 103}) is None
    assert lowest_free(PortRange(7, 7), {7}, set()) is None
    assert lowest_free(PortRange(7, 7), set(), {7}) is None


def test_lowest_free_last_port() -> None:
    port_range = PortRange(10001, 20000)
    taken = set(range(10001, 20000))
    assert lowest_free(port_range, taken, set()) == 20000
    assert lowest_free(port_range, set(), taken) == 20000


ports = st.integers(1, 200)


@given(
    st.integers(1, 150).flatmap(lambda f: st.tuples(st.just(f), st.integers(f, 200))),
    st.sets(ports),
    st.sets(ports),
)
@FAST
def test_lowest_free_property(bounds: tuple[int, int], assigned: set[int], busy: set[int]) -> None:
    port_range = PortRange(*bounds)
    free = [
        p
        for p in range(port_range.first, port_range.last + 1)
        if p not in assigned and p not in busy
    ]
    result = lowest_free(port_range, assigned, busy)
    if free:
        assert result == min(free)
    else:
        assert result is None


# --- allocate / check_request -----------------------------------------------------------------


def test_allocate_without_request_gives_lowest_free() -> None:
    assert allocate(PortRange(10001, 10100), {10001}, {10002}) == 10003


def test_allocate_requested_valid_port() -> None:
    port_range = PortRange(10001, 10100)
    assert allocate(port_range, {10001}, {10002}, requested=10050) == 10050
    assert allocate(port_range, set(), set(), requested=10001) == 10001
    assert allocate(port_range, set(), set(), requested=10100) == 10100
    assert check_request(port_range, 10077, set(), set()) == 10077


@pytest.mark.parametrize("port", [10000, 10101, 1, 65535, 0, -5])
def test_allocate_requested_outside_range(port: int) -> None:
    with pytest.raises(PortUnavailable) as info:
        allocate(PortRange(10001, 10100), set(), set(), requested=port)
    assert str(info.value) == f"port {port} is outside the range 10001-10100"


def test_allocate_requested_assigned() -> None:
    with pytest.raises(PortUnavailable) as info:
        allocate(PortRange(10001, 10100), {10005}, set(), requested=10005)
    assert str(info.value) == "port 10005 is already assigned to another key"


def test_allocate_requested_busy() -> None:
    with pytest.raises(PortUnavailable) as info:
        allocate(PortRange(10001, 10100), set(), {10005}, requested=10005)
    assert str(info.value) == "port 10005 is in use by another process on this host"


def test_allocate_requested_assigned_and_busy_reports_assigned() -> None:
    # A key's own port is bound by Xray, so it is both: "assigned" is the reason that matters.
    with pytest.raises(PortUnavailable, match="already assigned to another key"):
        allocate(PortRange(10001, 10100), {10005}, {10005}, requested=10005)


def test_allocate_requested_ignores_free_port_shortage() -> None:
    # A valid request works even when it is the only free port.
    port_range = PortRange(1, 3)
    assert allocate(port_range, {1}, {2}, requested=3) == 3


def test_allocate_full_range_message() -> None:
    port_range = PortRange(10001, 10005)
    with pytest.raises(PortUnavailable) as info:
        allocate(port_range, {10001, 10002, 10003}, {10004, 10005, 80})
    assert str(info.value) == (
        "no free port in 10001-10005: 3 held by keys, 2 in use by other processes"
    )


def test_allocate_full_range_message_counts_only_ports_in_range() -> None:
    # A key left outside the range (the operator narrowed PORTMETER_PORT_RANGE) does not hold a
    # port of the range; the message must add up to the size of the range.
    port_range = PortRange(10001, 10003)
    with pytest.raises(PortUnavailable) as info:
        allocate(port_range, {10001, 9000}, {10002, 10003})
    assert str(info.value) == (
        "no free port in 10001-10003: 1 held by keys, 2 in use by other processes"
    )


@pytest.mark.parametrize("size", [1, 2, 7, 100])
def test_capacity_small_ranges(size: int) -> None:
    port_range = PortRange(20000, 20000 + size - 1)
    assigned: set[int] = set()
    got = []
    for _ in range(size):
        port = allocate(port_range, assigned, set())
        assert port not in assigned
        assigned.add(port)
        got.append(port)
    assert got == list(range(20000, 20000 + size))
    assert available(port_range, assigned) == 0
    with pytest.raises(
        PortUnavailable,
        match=rf"no free port in 20000-{20000 + size - 1}: "
        rf"{size} held by keys, 0 in use",
    ):
        allocate(port_range, assigned, set())


def test_capacity_big_range_10001_20000() -> None:
    port_range = PortRange.parse("10001-20000")
    assert port_range.size == 10000
    busy = {10001, 15000, 20000}
    assigned: set[int] = set()
    # Fill with requests from the top down and lowest-free from the bottom up, alternating.
    top = 19999
    while True:
        try:
            port = allocate(port_range, assigned, busy)
        except PortUnavailable as exc:
            assert str(exc) == (
                "no free port in 10001-20000: 9997 held by keys, 3 in use by other processes"
            )
            break
        assert port in port_range and port not in busy and port not in assigned
        assigned.add(port)
        while top in assigned or top in busy:
            top -= 1
        if top >= port_range.first:
            assigned.add(allocate(port_range, assigned, busy, requested=top))
    assert len(assigned) == 9997
    assert assigned == set(range(10001, 20001)) - busy
    assert available(port_range, assigned) == 3


def test_capacity_big_range_lowest_free_only() -> None:
    port_range = PortRange(10001, 20000)
    assigned: set[int] = set()
    for expected in range(10001, 20001):
        assert allocate(port_range, assigned, set()) == expected
        assigned.add(expected)
    with pytest.raises(PortUnavailable):
        allocate(port_range, assigned, set())


# --- allocation properties --------------------------------------------------------------------


range_strategy = st.integers(1, 500).flatmap(
    lambda first: st.integers(first, min(first + 60, 65535)).map(
        lambda last: PortRange(first, last)
    )
)


@given(
    range_strategy,
    st.sets(st.integers(1, 600)),
    st.sets(st.integers(1, 600)),
    st.none() | st.integers(-5, 700),
)
@FAST
def test_allocate_property(
    port_range: PortRange, assigned: set[int], busy: set[int], requested: int | None
) -> None:
    try:
        port = allocate(port_range, assigned, busy, requested)
    except PortUnavailable as exc:
        message = str(exc)
        if requested is None:
            assert all(
                p in assigned or p in busy for p in range(port_range.first, port_range.last + 1)
            )
            assert message.startswith(f"no free port in {port_range}: ")
        else:
            assert requested not in port_range or requested in assigned or requested in busy
            assert message.startswith(f"port {requested} is ")
        return
    assert port in port_range
    assert port not in assigned
    assert port not in busy
    if requested is not None:
        assert port == requested
    else:
        assert port == lowest_free(port_range, assigned, busy)


operations = st.lists(
    st.one_of(
        st.tuples(st.just("alloc"), st.none()),
        st.tuples(st.just("request"), st.integers(1, 80)),
        st.tuples(st.just("release"), st.integers(0, 100)),
        st.tuples(st.just("busy"), st.integers(1, 80)),
        st.tuples(st.just("unbusy"), st.integers(1, 80)),
    ),
    max_size=120,
)


@given(
    st.integers(1, 40).flatmap(lambda f: st.integers(f, 60).map(lambda l: PortRange(f, l))),
    operations,
)
@FAST
def test_allocations_and_releases_never_duplicate(
    port_range: PortRange, ops: list[tuple[str, int | None]]
) -> None:
    keys: dict[str, int] = {}
    busy: set[int] = set()
    counter = 0
    for op, arg in ops:
        assigned = set(keys.values())
        if op in ("alloc", "request"):
            try:
                port = allocate(port_range, assigned, busy, arg)
            except PortUnavailable:
                if op == "alloc":
                    assert available(port_range, assigned) == len(
                        {p for p in busy if p in port_range} - assigned
                    )
                continue
            assert port not in assigned and port not in busy and port in port_range
            counter += 1
            keys[f"k{counter}"] = port
        elif op == "release" and keys:
            key = sorted(keys)[arg % len(keys)]
            del keys[key]
        elif op == "busy" and arg not in keys.values():
            busy.add(arg)
        elif op == "unbusy":
            busy.discard(arg)
        # Invariants after every step.
        held = list(keys.values())
        assert len(held) == len(set(held))
        assert problems(port_range, keys) == []
        assert available(port_range, held) == port_range.size - len(held)


# --- problems ---------------------------------------------------------------------------------


def test_problems_none() -> None:
    assert problems(PortRange(10001, 10100), {"a": 10001, "b": 10002}) == []
    assert problems(PortRange(10001, 10100), {}) == []


def test_problems_out_of_range() -> None:
    found = problems(PortRange(10001, 10100), {"b": 9000, "a": 10101, "c": 10050})
    assert found == [
        "key a holds port 10101 outside the range 10001-10100",
        "key b holds port 9000 outside the range 10001-10100",
    ]


def test_problems_duplicates() -> None:
    found = problems(
        PortRange(10001, 10100),
        {"z": 10005, "x": 10005, "y": 10002, "w": 10002, "v": 10005, "u": 10001},
    )
    assert found == [
        "port 10002 is held by 2 keys: w, y",
        "port 10005 is held by 3 keys: v, x, z",
    ]


def test_problems_out_of_range_and_duplicate() -> None:
    found = problems(PortRange(10001, 10100), {"a": 80, "b": 80})
    assert found == [
        "key a holds port 80 outside the range 10001-10100",
        "key b holds port 80 outside the range 10001-10100",
        "port 80 is held by 2 keys: a, b",
    ]


@given(st.dictionaries(st.text("abcdef", min_size=1, max_size=3), st.integers(1, 30), max_size=20))
@FAST
def test_problems_property(assignments: dict[str, int]) -> None:
    port_range = PortRange(5, 20)
    found = problems(port_range, assignments)
    outside = sum(1 for p in assignments.values() if p not in port_range)
    ports = list(assignments.values())
    duplicated = {p for p in ports if ports.count(p) > 1}
    assert len(found) == outside + len(duplicated)
    for port in duplicated:
        assert any(
            re.match(rf"port {port} is held by {ports.count(port)} keys: ", line) for line in found
        )


# --- available --------------------------------------------------------------------------------


def test_available() -> None:
    port_range = PortRange(10001, 10100)
    assert available(port_range, []) == 100
    assert available(port_range, [10001, 10002]) == 98
    assert available(port_range, [10001, 10001]) == 99  # a duplicate holds one port
    assert available(port_range, [80, 65535, 10100]) == 99  # outside the range does not count
    assert available(port_range, iter([10050])) == 99
    assert available(port_range, range(10001, 10101)) == 0
    assert available(PortRange(1, 65535), range(1, 65536)) == 0
    assert available(PortRange(1, 65535), []) == 65535


@given(range_strategy, st.lists(st.integers(1, 600)))
@FAST
def test_available_property(port_range: PortRange, assigned: list[int]) -> None:
    expected = len([p for p in range(port_range.first, port_range.last + 1) if p not in assigned])
    assert available(port_range, assigned) == expected
