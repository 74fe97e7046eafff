"""daemon.units: human_bytes (the API's seed format, powers of 1024) and display_bytes (the
CLI's and the page's, powers of 1000)."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from daemon.units import DISPLAY_UNITS, UNITS, display_bytes, human_bytes

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
        (524288, "512.0 KB"),  # half a MiB stays in KB
        (1048576, "1.0 MB"),  # the format scripts parse (README, "Limits")
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


# --- display_bytes: what the CLI and the page show (decimal, as sizes are entered) ------------


@pytest.mark.parametrize(
    ("count", "text"),
    [
        (0, "0 B"),
        (999, "999 B"),
        (1000, "1 kB"),
        (1005, "1 kB"),  # 1.005: half to even
        (1015, "1.02 kB"),
        (1536, "1.54 kB"),
        (999_994, "999.99 kB"),
        (999_995, "1 MB"),  # would print "1000 kB"
        (10**9, "1 GB"),  # --limit 1GB, not "953.7 MB"
        (50 * 10**9, "50 GB"),  # --limit 50GB
        (50 * 2**30, "53.69 GB"),  # --limit 50GiB, still decimal: never a binary value as GB
        (1_500_000_000_000, "1.5 TB"),
        (10**18, "1 EB"),
        (10**21, "1000 EB"),
    ],
)
def test_display_examples(count: int, text: str) -> None:
    assert display_bytes(count) == text


DISPLAY = re.compile(r"^(\d+)(?:\.(\d?[1-9]))? (B|kB|MB|GB|TB|PB|EB)$")


@given(st.integers(0, 10**22))
@settings(max_examples=500, deadline=None)
def test_display_format_and_accuracy(count: int) -> None:
    match = DISPLAY.match(display_bytes(count))
    assert match, display_bytes(count)
    whole, decimals, unit = match.groups()
    scale = 1000 ** DISPLAY_UNITS.index(unit)
    value = int(whole) * scale + int((decimals or "0").ljust(2, "0")) * scale // 100
    assert abs(value - count) <= scale // 200  # half a hundredth of the unit at most
    assert unit == "EB" or int(whole) < 1000
    assert unit == "B" or count >= 995
