"""Tests for daemon.units.human_bytes (the seed's "1.0 MB" style, powers of 1024)."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from daemon.units import UNITS, human_bytes

KB = 1024
MB = KB**2
GB = KB**3
TB = KB**4
PB = KB**5


@pytest.mark.parametrize(
    ("count", "text"),
    [
        (0, "0 B"),
        (1, "1 B"),
        (1023, "1023 B"),
        (1024, "1.0 KB"),
        (1536, "1.5 KB"),
        (524288, "512.0 KB"),  # the seed's rx_formatted
        (1048576, "1.0 MB"),  # the seed's total_formatted
        (10485760, "10.0 MB"),
        (MB + MB // 2, "1.5 MB"),
        (GB, "1.0 GB"),
        (5 * GB + GB // 4, "5.2 GB"),  # 5.25 rounds half to even
        (TB, "1.0 TB"),
        (3 * TB, "3.0 TB"),
        (PB, "1.0 PB"),
        (1023 * PB, "1023.0 PB"),
        (1024 * PB, "1024.0 PB"),  # no unit above PB
        (10**21, "888178.4 PB"),
    ],
)
def test_examples(count: int, text: str) -> None:
    assert human_bytes(count) == text


def test_units_are_the_expected_ones() -> None:
    assert UNITS == ("B", "KB", "MB", "GB", "TB", "PB")


@pytest.mark.parametrize(
    ("count", "text"),
    [
        (KB * KB - 1, "1.0 MB"),
        (GB - 1, "1.0 GB"),
        (TB - 1, "1.0 TB"),
    ],
)
def test_just_below_a_unit_boundary_rounds_up_to_the_next_unit(count: int, text: str) -> None:
    # 1048575 bytes is 1023.999 KB: shown with one decimal that is "1024.0 KB", which no reader
    # expects in a powers-of-1024 scale; the next unit reads "1.0 MB".
    assert human_bytes(count) == text


FORMAT = re.compile(r"^(\d+(?:\.\d)?) (B|KB|MB|GB|TB|PB)$")


@given(st.integers(0, 2**70))
@settings(max_examples=300, deadline=None)
def test_format_and_accuracy(count: int) -> None:
    text = human_bytes(count)
    match = FORMAT.match(text)
    assert match, text
    number, unit = match.groups()
    scale = KB ** UNITS.index(unit)
    if unit == "B":
        assert number == str(count)
        assert count < KB
    else:
        assert "." in number
        assert count >= KB
        # one decimal: at most half a tenth of the unit off (plus float slack)
        assert abs(float(number) * scale - count) <= 0.05 * scale + 1e-6 * count
        if unit != "PB":
            assert float(number) < 1024, text
