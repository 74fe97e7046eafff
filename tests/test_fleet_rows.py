"""Rows of the fleet database are input (README "The database is input too"): a key's row passes
the checks of a new key through the API, and a server's row the rules of a link's host and key.
Pure: no database here (tests/test_fleet_hostile_rows.py puts the values in a real one)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from daemon import names
from daemon.fleet.rows import RowRefused, Unreadable, key_row, server_row, shown
from daemon.xray.reality import generate_reality


def good_row(**changes: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "id": "0badcafe",
        "version": 7,
        "name": "Alice",
        "uuid": uuid.UUID("3014594c-1a4c-4472-87bc-0a5826be09d8"),
        "sub_token": "A" * 32,
        "short_id": "ab12",
        "created_at": datetime(2026, 5, 1, tzinfo=UTC),
        "data_limit_bytes": 10**9,
        "expire_at": None,
        "enabled": True,
        "reset_strategy": "month",
        "note": "family",
        "groups": ["eu"],
        "speed_limit_bps": None,
        "max_connections": 5,
        "max_ips": None,
    }
    return {**row, **changes}


def test_a_good_row_is_taken_as_it_is() -> None:
    row = key_row(good_row())
    assert (row.id, row.name, row.version, row.groups) == ("0badcafe", "Alice", 7, ["eu"])
    assert row.reset_strategy is not None and row.reset_strategy.value == "month"


BAD_KEY_VALUES = [
    ("reset_strategy", "yearly"),
    ("reset_strategy", ""),
    ("expire_at", Unreadable("infinity")),
    ("expire_at", datetime(1999, 12, 31, tzinfo=UTC)),
    ("created_at", Unreadable("infinity")),
    ("created_at", Unreadable("-infinity")),
    ("name", "evil\x1b[2J\nname"),
    ("name", ""),
    ("name", "x" * 10_000),
    ("name", "3014594c-1a4c-4472-87bc-0a5826be09d8"),
    ("name", "0badcafe"),
    ("id", "x" * 1000),
    ("id", "ZZZZZZZZ"),
    ("id", "race5"),
    ("note", "n" * 1_000_000),
    ("groups", [None]),
    ("groups", ["EU"]),
    ("groups", [f"g{n}" for n in range(17)]),
    ("data_limit_bytes", -1),
    ("data_limit_bytes", 2**63 - 1),
    ("speed_limit_bps", 1),
    ("max_connections", 0),
    ("max_ips", 10**6),
    ("short_id", "XYZ"),
    ("sub_token", "short"),
]


@pytest.mark.parametrize(("field", "value"), BAD_KEY_VALUES, ids=[f for f, _ in BAD_KEY_VALUES])
def test_a_bad_value_in_a_key_row_is_refused_naming_its_field(field: str, value: Any) -> None:
    with pytest.raises(RowRefused) as refused:
        key_row(good_row(**{field: value}))
    assert refused.value.field == field
    assert len(str(refused.value)) < 400  # a 1 MB note is not repeated in the log


@given(st.text(max_size=80))
def test_a_row_name_is_taken_exactly_when_the_api_would_take_it(name: str) -> None:
    try:
        expected: str | None = names.validate(name)
    except names.NameRefused:
        expected = None
    try:
        taken: str | None = key_row(good_row(name=name)).name
    except RowRefused as exc:
        assert exc.field == "name"
        taken = None
    assert taken == expected


def good_server(**changes: Any) -> dict[str, Any]:
    pbk = generate_reality().public_key
    row = {"server": "node1", "port": 20001, "status": "active", "public_host": "n1.example.net"}
    return {**row, "reality_public_key": pbk, **changes}


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("port", 99999),
        ("port", 0),
        ("status", "yearly"),
        ("public_host", "n1.example.net\nvless://evil@203.0.113.9:443"),
        ("public_host", "a b"),
        ("public_host", "x" * 254),
        ("reality_public_key", "not-a-key"),
        ("server", "node\x1b[2J"),
    ],
)
def test_a_bad_server_row_is_refused_naming_its_field(field: str, value: Any) -> None:
    with pytest.raises(RowRefused) as refused:
        server_row(good_server(**{field: value}))
    assert refused.value.field == field


def test_a_good_server_row_is_taken_and_ipv6_hosts_too() -> None:
    assert server_row(good_server()).port == 20001
    assert server_row(good_server(public_host="2001:db8::1")).public_host == "2001:db8::1"


def test_a_refused_value_is_shown_short_and_printable() -> None:
    assert len(shown("x" * 10_000)) == 64
    assert shown(Unreadable("infinity")) == "'infinity'"
    assert "\x1b" not in shown("\x1b[2J")
