"""Byte counts and moments as text, the one place each format is made.

Moments (`iso`) are ISO 8601 with their UTC offset, as the API and the events carry them.
Byte counts come in two systems.

`human_bytes` is the documented format of the API's `*_formatted` fields (1048576 -> "1.0 MB",
powers of 1024 under the labels KB, MB, GB); scripts that parse those fields keep working.
`display_bytes` is what people read in the CLI and on the page: powers of 1000, the system
sizes are entered in ("50GB" is 50 * 10^9 bytes and shows "50 GB"). README, section "Limits".
"""

from __future__ import annotations

from datetime import datetime

UNITS = ("B", "KB", "MB", "GB", "TB", "PB")
DISPLAY_UNITS = ("B", "kB", "MB", "GB", "TB", "PB", "EB")


def human_bytes(count: int) -> str:
    value = float(count)
    for unit in UNITS:
        # Compare what will be printed, so 1048575 reads "1.0 MB", not "1024.0 KB".
        if abs(round(value, 1)) < 1024 or unit == UNITS[-1]:
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def display_bytes(count: int) -> str:
    """A non-negative byte count in decimal units with at most two decimals, trailing zeros
    dropped: 50_000_000_000 -> "50 GB", 1_536_000 -> "1.54 MB", 999 -> "999 B".

    Integer arithmetic (round half to even on the exact value), so the page's copy of this
    function, using BigInt, prints the very same text.
    """
    hundredths, unit = 0, DISPLAY_UNITS[0]
    for power, unit in enumerate(DISPLAY_UNITS):
        hundredths = _round_half_even(count * 100, 1000**power)
        # Compare what will be printed, so 999_999 reads "1 MB", not "1000 kB".
        if hundredths < 100_000:
            break
    whole, cents = divmod(hundredths, 100)
    number = f"{whole}.{cents:02d}".rstrip("0").rstrip(".")
    return f"{number} {unit}"


def _round_half_even(numerator: int, denominator: int) -> int:
    quotient, remainder = divmod(numerator, denominator)
    if 2 * remainder > denominator or (2 * remainder == denominator and quotient % 2):
        quotient += 1
    return quotient


def iso(moment: datetime | None) -> str | None:
    """A moment as the API answers it (null stays null)."""
    return None if moment is None else moment.isoformat()
