"""Human-readable byte counts, in the seed's style: 1048576 -> "1.0 MB" (powers of 1024)."""

from __future__ import annotations

UNITS = ("B", "KB", "MB", "GB", "TB", "PB")


def human_bytes(count: int) -> str:
    value = float(count)
    for unit in UNITS:
        # Compare what will be printed, so 1048575 reads "1.0 MB", not "1024.0 KB".
        if abs(round(value, 1)) < 1024 or unit == UNITS[-1]:
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")
