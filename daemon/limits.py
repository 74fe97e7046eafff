"""Limits and lifecycle, pure: status of a key, what the kernel must enforce, reset boundaries,
and parsing of sizes and dates as operators type them.

The kernel is the enforcer (a quota per port); these functions only decide what it should be.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta, tzinfo
from decimal import Decimal
from enum import StrEnum

from daemon import bounds


class Status(StrEnum):
    ACTIVE = "active"
    LIMITED = "limited"
    EXPIRED = "expired"
    DISABLED = "disabled"


class ResetStrategy(StrEnum):
    NO_RESET = "no_reset"
    DAY = "day"
    WEEK = "week"
    MONTH = "month"


@dataclass(frozen=True, slots=True)
class Quota:
    """A kernel quota: packets are dropped once `used` would pass `limit` bytes."""

    limit: int
    used: int


@dataclass(frozen=True, slots=True)
class Guard:
    """What the kernel enforces on a key's port beyond its quota (README "Speed, connection and
    device limits"): a rate per direction in bytes per second, concurrent TCP connections, and
    distinct client addresses remembered for `window` seconds."""

    rate: int | None
    connections: int | None
    addresses: int | None
    window: int

    @property
    def chain(self) -> bool:
        """Connections or addresses are limited: the port needs its own chain."""
        return self.connections is not None or self.addresses is not None


def kernel_guard(
    speed_bps: int | None, connections: int | None, addresses: int | None, window: int
) -> Guard | None:
    """The guard a key's limits need, or None when it has none (it then costs nothing)."""
    if speed_bps is None and connections is None and addresses is None:
        return None
    rate = None if speed_bps is None else speed_bps // 8
    return Guard(rate, connections, addresses, window if addresses is not None else 0)


def status(
    *,
    enabled: bool,
    expire_at: datetime | None,
    limit: int | None,
    used: int,
    kernel_over: bool,
    now: datetime,
) -> Status:
    """Disabled beats expired beats limited. `kernel_over`: the quota has started dropping."""
    if not enabled:
        return Status.DISABLED
    if expire_at is not None and now >= expire_at:
        return Status.EXPIRED
    if limit is not None and (used >= limit or kernel_over):
        return Status.LIMITED
    return Status.ACTIVE


def allowance(limit: int | None, remote: int) -> int | None:
    """What a key may use here when a fleet's other servers used `remote` of its limit."""
    return None if limit is None else max(limit - remote, 0)


def kernel_quota(state: Status, limit: int | None, used: int) -> Quota | None:
    """What the kernel must enforce for a key: nothing, its allowance, or a full stop (limit 0)."""
    if state in (Status.DISABLED, Status.EXPIRED):
        return Quota(limit=0, used=0)
    if limit is None:
        return None
    return Quota(limit=limit, used=min(used, limit))


def next_boundary(after: datetime, strategy: ResetStrategy, zone: tzinfo) -> datetime | None:
    """The first reset boundary strictly after `after`: local midnight of the next day, Monday or
    first of the month in `zone`. Local midnight that a DST change skips becomes the first valid
    instant after it (fold handled by zoneinfo)."""
    if strategy is ResetStrategy.NO_RESET:
        return None
    local = after.astimezone(zone)
    day = local.date()
    while True:
        day = _next_start(day, strategy)
        boundary = _local_midnight(day, zone)
        if boundary > after:
            return boundary


def _next_start(day: date, strategy: ResetStrategy) -> date:
    if strategy is ResetStrategy.DAY:
        return day + timedelta(days=1)
    if strategy is ResetStrategy.WEEK:
        return day + timedelta(days=7 - day.weekday())
    if day.month == 12:
        return date(day.year + 1, 1, 1)
    return date(day.year, day.month + 1, 1)


def _local_midnight(day: date, zone: tzinfo) -> datetime:
    # A midnight skipped by DST does not exist: the round trip through UTC gives the real instant
    # as a wall time that does (astimezone to the same zone would be a no-op).
    return datetime.combine(day, time(0, 0)).replace(tzinfo=zone).astimezone(UTC).astimezone(zone)


# --- operator input -------------------------------------------------------------------------

# ASCII digits and spaces only (re.ASCII): "٥GB" is not five gigabytes.
SIZE = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([kmgtpe]?i?b?)\s*", re.IGNORECASE | re.ASCII)
SIZE_FACTORS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "kb": 10**3,
    "kib": 2**10,
    "ki": 2**10,
    "m": 10**6,
    "mb": 10**6,
    "mib": 2**20,
    "mi": 2**20,
    "g": 10**9,
    "gb": 10**9,
    "gib": 2**30,
    "gi": 2**30,
    "t": 10**12,
    "tb": 10**12,
    "tib": 2**40,
    "ti": 2**40,
    "p": 10**15,
    "pb": 10**15,
    "pib": 2**50,
    "pi": 2**50,
    "e": 10**18,
    "eb": 10**18,
    "eib": 2**60,
    "ei": 2**60,
}
RELATIVE = re.compile(r"\+([0-9]+)([mhdw])")
RELATIVE_UNITS = {"m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
ISO_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")


def parse_size(text: str) -> int:
    """'50GB' (10^9), '50GiB' (2^30), '1.5 TB', '1000' (bytes) -> bytes. Units B, KB ... EB and
    KiB ... EiB in any case (the B may be left out); ASCII digits only; a whole number of bytes
    ("0.5B" is refused). No bounds: parse_limit."""
    match = SIZE.fullmatch(text)
    unit = (match.group(2) or "").lower() if match else ""
    if not match or unit not in SIZE_FACTORS:
        raise ValueError(f"{text!r} is not a size: use e.g. 50GB, 512MiB or a number of bytes")
    return _whole(text, Decimal(match.group(1)) * SIZE_FACTORS[unit], "bytes", "a size", "bytes")


def _whole(text: str, exact: Decimal, unit: str, what: str, whole: str) -> int:
    """`exact` (Decimal: no float rounding) as an int, or ValueError if it has a fraction: a
    fraction of a byte rounded down made "0.5B" a limit of 0; "1.5KiB" is 1,536 bytes."""
    if exact != exact.to_integral_value():
        raise ValueError(
            f"{text.strip()!r} is {exact.normalize():f} {unit}: {what} must be a whole number"
            f" of {whole}"
        )
    return int(exact)


def parse_limit(text: str) -> int:
    """A data limit as typed ("50GB", "1000"): a size within `bounds.limit_bytes`."""
    if len(text) > bounds.MAX_SIZE_CHARS:
        raise ValueError(f"a size is at most {bounds.MAX_SIZE_CHARS} characters")
    return bounds.limit_bytes(parse_size(text))


RATE = re.compile(
    r"\s*([0-9]+(?:\.[0-9]+)?)\s*([kmg]?)(?:bit|bps)?(?:/s)?\s*", re.IGNORECASE | re.ASCII
)
RATE_FACTORS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9}


def parse_rate(text: str) -> int:
    """'20Mbit', '1Gbit', '500kbit', '8000' (bits per second, decimal units) -> bits per second
    within the bounds; ValueError saying what is wrong otherwise."""
    match = RATE.fullmatch(text) if len(text) <= bounds.MAX_SIZE_CHARS else None
    if match is None:
        raise ValueError(f"{text!r} is not a speed: use e.g. 20Mbit, 500kbit, 1Gbit or bits/s")
    exact = Decimal(match.group(1)) * RATE_FACTORS[match.group(2).lower()]
    return bounds.speed_bps(_whole(text, exact, "bit/s", "a speed", "bits per second"))


def parse_moment(text: str, now: datetime, zone: tzinfo) -> datetime:
    """'+30d' / '+12h' / '+2w' from now, an ISO date (start of that day in `zone`) or an ISO
    date-time (in `zone` unless it names its own offset); within the bounds of `bounds.moment`,
    so later arithmetic on it never leaves what datetime holds."""
    try:
        return bounds.moment(_moment(text.strip(string.whitespace), now, zone))
    except OverflowError:
        raise ValueError(f"{text!r} is {bounds.MOMENT_RANGE}") from None


def _moment(text: str, now: datetime, zone: tzinfo) -> datetime:
    relative = RELATIVE.fullmatch(text)
    if relative:
        amount, unit = int(relative.group(1)), RELATIVE_UNITS[relative.group(2)]
        return now + timedelta(**{unit: amount})
    try:
        if ISO_DATE.fullmatch(text):
            return _local_midnight(date.fromisoformat(text), zone)
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(
            f"{text!r} is not a date: use 2027-01-31, 2027-01-31T12:00:00+00:00 or +30d"
        ) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=zone)
