"""daemon/limits.py without a kernel: reset boundaries, key status, kernel quotas, sizes, dates.

Boundaries are checked against an independent reference: the start of a local day is the first
instant whose local date (in zoneinfo's view) is that day, found without `next_boundary`'s code.
Every comparison of instants is made in UTC: two aware datetimes with the same tzinfo compare
by wall clock, and PEP 495 makes a datetime in a gap or fold unequal to any other zone's.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from datetime import UTC, date, datetime, time, timedelta, timezone
from decimal import Decimal
from zoneinfo import ZoneInfo

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from daemon.bounds import EARLIEST_MOMENT
from daemon.limits import (
    Quota,
    ResetStrategy,
    Status,
    kernel_quota,
    next_boundary,
    parse_moment,
    parse_size,
    status,
)

ZONE_NAMES = [
    "UTC",
    "Europe/Moscow",
    "Europe/Berlin",
    "America/New_York",
    "Australia/Lord_Howe",  # DST shift of 30 minutes
    "America/Santiago",  # DST changes at midnight: a skipped midnight every September
    "America/Havana",  # DST starts at midnight (skipped), ends at 01:00 (midnight twice)
    "Asia/Kathmandu",  # +05:45
]
ZONES = [ZoneInfo(name) for name in ZONE_NAMES]
PERIODIC = [ResetStrategy.DAY, ResetStrategy.WEEK, ResetStrategy.MONTH]
US = timedelta(microseconds=1)

fast = settings(max_examples=150, deadline=None, database=None)
slow = settings(
    max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)

zones = st.sampled_from(ZONES)
strategies = st.sampled_from(PERIODIC)
moments = st.datetimes(
    min_value=datetime(2000, 1, 1),
    max_value=datetime(2100, 12, 31),
    timezones=st.sampled_from([*ZONES, UTC]),
    allow_imaginary=False,
)


# --- an independent reference for boundaries ------------------------------------------------


def utc(moment: datetime) -> datetime:
    return moment.astimezone(UTC)


def local_date(instant: datetime, zone: ZoneInfo) -> date:
    return instant.astimezone(UTC).astimezone(zone).date()


def start_of_day(day: date, zone: ZoneInfo) -> datetime:
    """The first instant (UTC) whose local date in `zone` is `day` or later."""
    guess = datetime.combine(day, time(0)).replace(tzinfo=zone).astimezone(UTC)
    if local_date(guess, zone) == day and local_date(guess - US, zone) < day:
        return guess
    # Midnight does not exist (or zoneinfo's guess is not the first instant): bisect whole
    # seconds, transitions are on whole seconds.
    low = datetime.combine(day, time(0), UTC) - timedelta(hours=30)
    high = datetime.combine(day, time(0), UTC) + timedelta(hours=30)
    assert local_date(low, zone) < day <= local_date(high, zone)
    while high - low > timedelta(seconds=1):
        middle = low + (high - low) // 2
        middle = middle.replace(microsecond=0)
        if local_date(middle, zone) >= day:
            high = middle
        else:
            low = middle
    return high


def is_period_start(day: date, strategy: ResetStrategy) -> bool:
    if strategy is ResetStrategy.DAY:
        return True
    if strategy is ResetStrategy.WEEK:
        return day.weekday() == 0
    return day.day == 1


def previous_period_start(day: date, strategy: ResetStrategy) -> date:
    if strategy is ResetStrategy.DAY:
        return day - timedelta(days=1)
    if strategy is ResetStrategy.WEEK:
        return day - timedelta(days=7)
    if day.month == 1:
        return date(day.year - 1, 12, 1)
    return date(day.year, day.month - 1, 1)


def boundaries_between(
    start: datetime, end: datetime, strategy: ResetStrategy, zone: ZoneInfo
) -> Iterator[datetime]:
    """Every boundary instant b with start < b <= end, by enumerating local dates."""
    day = local_date(start, zone)
    last = local_date(end, zone) + timedelta(days=1)
    while day <= last:
        if is_period_start(day, strategy):
            instant = start_of_day(day, zone)
            if utc(start) < instant <= utc(end):
                yield instant
        day += timedelta(days=1)


def midnight_exists(day: date, zone: ZoneInfo) -> bool:
    naive = datetime.combine(day, time(0))
    return utc(naive.replace(tzinfo=zone)).astimezone(zone).replace(tzinfo=None) == naive


def transition_days(zone: ZoneInfo, first: int = 2000, last: int = 2100) -> list[date]:
    """Local dates on which the UTC offset changes (compared noon to noon)."""
    days = []
    day = date(first, 1, 1)
    previous = datetime.combine(day, time(12), zone).utcoffset()
    while day.year <= last:
        day += timedelta(days=1)
        offset = datetime.combine(day, time(12), zone).utcoffset()
        if offset != previous:
            days.append(day)
        previous = offset
    return days


SANTIAGO = ZoneInfo("America/Santiago")
HAVANA = ZoneInfo("America/Havana")
# (zone, transition day) pairs where the change happens at or around local midnight.
MIDNIGHT_DST = [(zone, day) for zone in (SANTIAGO, HAVANA) for day in transition_days(zone)]


def test_reference_sees_skipped_and_doubled_midnights() -> None:
    """The zones chosen really exercise the edge: skipped midnights exist in the test range."""
    skipped = [(z, d) for z, d in MIDNIGHT_DST if not midnight_exists(d, z)]
    assert len(skipped) > 100
    assert not midnight_exists(date(2024, 9, 8), SANTIAGO)
    assert not midnight_exists(date(2024, 3, 10), HAVANA)
    assert start_of_day(date(2024, 9, 8), SANTIAGO) == datetime(2024, 9, 8, 4, tzinfo=UTC)


# --- next_boundary: exact cases -------------------------------------------------------------


def nb(after: datetime, strategy: ResetStrategy, zone: ZoneInfo | str) -> datetime:
    zone = ZoneInfo(zone) if isinstance(zone, str) else zone
    result = next_boundary(after, strategy, zone)
    assert result is not None
    return result


def at(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)  # type: ignore[misc]


D, W, M = ResetStrategy.DAY, ResetStrategy.WEEK, ResetStrategy.MONTH


@pytest.mark.parametrize(
    ("after", "strategy", "zone", "expected"),
    [
        # month lengths
        (at(2024, 1, 31, 12), M, "UTC", at(2024, 2, 1)),
        (at(2024, 1, 31, 12), D, "UTC", at(2024, 2, 1)),
        (at(2024, 2, 28, 12), D, "UTC", at(2024, 2, 29)),  # leap year
        (at(2024, 2, 29, 12), D, "UTC", at(2024, 3, 1)),
        (at(2023, 2, 28, 12), D, "UTC", at(2023, 3, 1)),
        (at(2100, 2, 28, 12), D, "UTC", at(2100, 3, 1)),  # 2100 is not a leap year
        (at(2000, 2, 28, 12), D, "UTC", at(2000, 2, 29)),  # 2000 is
        (at(2024, 2, 15), M, "UTC", at(2024, 3, 1)),
        (at(2023, 2, 15), M, "UTC", at(2023, 3, 1)),
        (at(2024, 4, 30, 23, 59, 59), M, "UTC", at(2024, 5, 1)),
        (at(2024, 12, 15), M, "UTC", at(2025, 1, 1)),
        (at(2024, 12, 31, 23, 59, 59, 999999), D, "UTC", at(2025, 1, 1)),
        (at(2100, 12, 31, 12), M, "UTC", at(2101, 1, 1)),
        # strictly after: exactly at a boundary gives the next one
        (at(2024, 3, 1), M, "UTC", at(2024, 4, 1)),
        (at(2024, 3, 1), D, "UTC", at(2024, 3, 2)),
        (at(2024, 3, 1) - US, M, "UTC", at(2024, 3, 1)),
        # weeks: 2024-01-01 is a Monday
        (at(2024, 1, 1), W, "UTC", at(2024, 1, 8)),
        (at(2024, 1, 7, 23, 59, 59, 999999), W, "UTC", at(2024, 1, 8)),
        (at(2024, 1, 3, 12), W, "UTC", at(2024, 1, 8)),
        (at(2024, 12, 31), W, "UTC", at(2025, 1, 6)),
        # zones: boundaries are local midnights
        (at(2024, 3, 31, 20, 59, 59), M, "Europe/Moscow", at(2024, 3, 31, 21)),
        (at(2024, 3, 31, 21), M, "Europe/Moscow", at(2024, 4, 30, 21)),
        (at(2024, 3, 31, 21), D, "Europe/Moscow", at(2024, 4, 1, 21)),
        (at(2024, 5, 31, 12), D, "Asia/Kathmandu", at(2024, 5, 31, 18, 15)),
        (at(2024, 5, 15), M, "Asia/Kathmandu", at(2024, 5, 31, 18, 15)),
        # Berlin, DST starts 2024-03-31 02:00 -> 03:00, ends 2024-10-27 03:00 -> 02:00
        (at(2024, 3, 30, 12), D, "Europe/Berlin", at(2024, 3, 30, 23)),
        (at(2024, 3, 30, 23), D, "Europe/Berlin", at(2024, 3, 31, 22)),
        (at(2024, 3, 15), M, "Europe/Berlin", at(2024, 3, 31, 22)),
        (at(2024, 10, 27, 12), D, "Europe/Berlin", at(2024, 10, 27, 23)),
        # New York, DST ends 2024-11-03 02:00 -> 01:00
        (at(2024, 11, 2, 12), D, "America/New_York", at(2024, 11, 3, 4)),
        (at(2024, 11, 3, 4), D, "America/New_York", at(2024, 11, 4, 5)),
        (at(2024, 10, 28), W, "America/New_York", at(2024, 10, 28, 4)),  # still Sunday in NY
        (at(2024, 10, 28, 4), W, "America/New_York", at(2024, 11, 4, 5)),
        # Lord Howe: +10:30 until 2024-10-06 02:00, then +11
        (at(2024, 10, 5, 0), D, "Australia/Lord_Howe", at(2024, 10, 5, 13, 30)),
        (at(2024, 10, 5, 13, 30), D, "Australia/Lord_Howe", at(2024, 10, 6, 13)),
        # Santiago: 2024-09-08 00:00 -04 does not exist (-> 01:00 -03): boundary at the jump
        (at(2024, 9, 7, 12), D, "America/Santiago", at(2024, 9, 8, 4)),
        (at(2024, 9, 8, 4) - US, D, "America/Santiago", at(2024, 9, 8, 4)),
        (at(2024, 9, 8, 4), D, "America/Santiago", at(2024, 9, 9, 3)),
        (at(2024, 9, 3), W, "America/Santiago", at(2024, 9, 9, 3)),
        # Santiago: 2024-04-06 23:00-24:00 happens twice; Sunday midnight once, at -04
        (at(2024, 4, 7, 2, 30), D, "America/Santiago", at(2024, 4, 7, 4)),
        (at(2024, 4, 7, 3, 30), D, "America/Santiago", at(2024, 4, 7, 4)),
        (at(2024, 4, 7, 4), D, "America/Santiago", at(2024, 4, 8, 4)),
        # Havana: 2024-03-10 00:00 does not exist (-> 01:00 CDT)
        (at(2024, 3, 9, 12), D, "America/Havana", at(2024, 3, 10, 5)),
        # Havana: 2024-11-03 00:00 happens twice (01:00 CDT -> 00:00 CST): the first counts
        (at(2024, 11, 2, 12), D, "America/Havana", at(2024, 11, 3, 4)),
        (at(2024, 11, 3, 4), D, "America/Havana", at(2024, 11, 4, 5)),
        (at(2024, 11, 3, 4, 30), D, "America/Havana", at(2024, 11, 4, 5)),
        (at(2024, 11, 3, 5), D, "America/Havana", at(2024, 11, 4, 5)),
        (at(2024, 10, 15), M, "America/Havana", at(2024, 11, 1, 4)),
        (at(2024, 11, 1, 4), M, "America/Havana", at(2024, 12, 1, 5)),
    ],
)
def test_next_boundary_exact(
    after: datetime, strategy: ResetStrategy, zone: str, expected: datetime
) -> None:
    result = nb(after, strategy, zone)
    assert result.tzinfo is not None
    assert utc(result) == expected


def test_next_boundary_accepts_after_in_any_zone() -> None:
    moscow = ZoneInfo("Europe/Moscow")
    after = datetime(2024, 4, 1, 0, 0, tzinfo=moscow)  # a boundary itself
    assert utc(nb(after, M, moscow)) == at(2024, 4, 30, 21)
    assert utc(nb(after.astimezone(ZoneInfo("America/New_York")), M, moscow)) == at(2024, 4, 30, 21)
    assert utc(nb(after - US, M, moscow)) == utc(after)


@pytest.mark.parametrize("zone", ZONES, ids=ZONE_NAMES)
def test_no_reset_has_no_boundary(zone: ZoneInfo) -> None:
    assert next_boundary(at(2024, 1, 31, 12), ResetStrategy.NO_RESET, zone) is None


@pytest.mark.parametrize(
    ("after", "zone", "wall"),
    [
        (at(2024, 9, 7, 12), SANTIAGO, (2024, 9, 8, 1, 0, timedelta(hours=-3))),
        (at(2024, 3, 9, 12), HAVANA, (2024, 3, 10, 1, 0, timedelta(hours=-4))),
    ],
    ids=["Santiago-2024-09-08", "Havana-2024-03-10"],
)
def test_skipped_midnight_is_returned_as_a_wall_time_that_exists(
    after: datetime, zone: ZoneInfo, wall: tuple[object, ...]
) -> None:
    """The docstring: a skipped midnight "becomes the first valid instant after it", and the
    code's comment relies on "the round trip through UTC". The instant is right, but the
    datetime must also read as that instant's wall clock in the zone (01:00 at the new offset),
    not as the nonexistent 00:00 at the old offset: otherwise it is unequal (PEP 495) to the same
    instant in any other form and shows operators a time their clocks never showed."""
    result = nb(after, D, zone)
    assert (
        result.year,
        result.month,
        result.day,
        result.hour,
        result.minute,
        result.utcoffset(),
    ) == wall
    assert result == utc(result)


# --- next_boundary: properties --------------------------------------------------------------


def check_boundary(after: datetime, strategy: ResetStrategy, zone: ZoneInfo) -> datetime:
    """All that defines the boundary after `after`; returns it (in UTC)."""
    result = next_boundary(after, strategy, zone)
    assert result is not None
    assert result.tzinfo is not None and result.utcoffset() is not None
    instant = utc(result)
    # strictly after
    assert instant > utc(after)
    # in local time: midnight, or the end of the gap when midnight was skipped
    local = instant.astimezone(zone)
    day = local.date()
    if midnight_exists(day, zone):
        assert local.time() == time(0), local
    else:
        assert local.time() > time(0)
        assert local_date(instant - US, zone) < day  # first instant of the day: the gap's end
    assert instant == start_of_day(day, zone)
    # the right kind of day
    if strategy is ResetStrategy.WEEK:
        assert day.weekday() == 0
    if strategy is ResetStrategy.MONTH:
        assert day.day == 1
    # none skipped: the previous boundary is not after `after`
    assert start_of_day(previous_period_start(day, strategy), zone) <= utc(after)
    assert list(boundaries_between(after, instant - US, strategy, zone)) == []
    # one microsecond before it, the boundary is still ahead and the same
    assert utc(nb(instant - US, strategy, zone)) == instant
    return instant


@fast
@given(after=moments, strategy=strategies, zone=zones)
def test_boundary_properties(after: datetime, strategy: ResetStrategy, zone: ZoneInfo) -> None:
    check_boundary(after, strategy, zone)


@fast
@given(
    pair=st.sampled_from(MIDNIGHT_DST),
    shift=st.integers(min_value=-30 * 3600, max_value=30 * 3600),
    strategy=strategies,
    view=st.sampled_from([UTC, SANTIAGO, HAVANA, timezone(timedelta(hours=-3))]),
)
def test_boundary_properties_around_midnight_dst_changes(
    pair: tuple[ZoneInfo, date], shift: int, strategy: ResetStrategy, view: timezone
) -> None:
    """Santiago and Havana change DST at midnight; `after` within 30 h of such a change."""
    zone, day = pair
    after = (start_of_day(day, zone) + timedelta(seconds=shift)).astimezone(view)
    check_boundary(after, strategy, zone)


@fast
@given(
    after=moments,
    later=st.timedeltas(min_value=timedelta(0), max_value=timedelta(days=400)),
    strategy=strategies,
    zone=zones,
)
def test_boundary_is_monotonic(
    after: datetime, later: timedelta, strategy: ResetStrategy, zone: ZoneInfo
) -> None:
    x = utc(after) + later
    assert utc(nb(after, strategy, zone)) <= utc(nb(x, strategy, zone))


@fast
@given(after=moments, zone=zones)
def test_coarser_boundaries_are_finer_ones(after: datetime, zone: ZoneInfo) -> None:
    """Every week or month boundary is a day boundary; the next day boundary comes first."""
    day = utc(nb(after, D, zone))
    for coarse in (W, M):
        boundary = utc(nb(after, coarse, zone))
        assert day <= boundary
        assert utc(nb(boundary - US, D, zone)) == boundary


@fast
@given(after=moments, zone=zones)
def test_no_reset_is_none(after: datetime, zone: ZoneInfo) -> None:
    assert next_boundary(after, ResetStrategy.NO_RESET, zone) is None


# --- applied once: a daemon that sleeps through boundaries ----------------------------------


def run_daemon(
    start: datetime, wakes: list[datetime], strategy: ResetStrategy, zone: ZoneInfo
) -> list[int]:
    """The service's rule: at each wake-up, reset when now >= next_reset_at, then
    next_reset_at = next_boundary(now). next_reset_at is persisted (ISO text) between wake-ups;
    each wake-up checks twice, as a poll loop does. Returns the resets per wake-up."""
    persisted = nb(start, strategy, zone).isoformat()
    resets = []
    for now in wakes:
        applied = 0
        for _check in range(2):
            next_reset_at = datetime.fromisoformat(persisted)
            if now >= next_reset_at:
                applied += 1
                next_reset_at = nb(now, strategy, zone)
                persisted = next_reset_at.isoformat()
        assert datetime.fromisoformat(persisted) > now
        resets.append(applied)
    return resets


gaps = st.one_of(
    st.integers(min_value=1, max_value=6 * 3600),  # a poll interval to hours
    st.integers(min_value=1, max_value=120 * 86400),  # down across several boundaries
).map(lambda seconds: timedelta(seconds=seconds))


@slow
@given(
    start=moments,
    steps=st.lists(gaps, min_size=1, max_size=12),
    strategy=strategies,
    zone=zones,
)
def test_boundaries_passed_while_down_are_applied_once(
    start: datetime, steps: list[timedelta], strategy: ResetStrategy, zone: ZoneInfo
) -> None:
    start = utc(start)
    wakes = []
    now = start
    for step in steps:
        now += step
        wakes.append(now)
    resets = run_daemon(start, wakes, strategy, zone)
    previous = start
    for now, applied in zip(wakes, resets, strict=True):
        passed = list(boundaries_between(previous, now, strategy, zone))
        assert applied == (1 if passed else 0), (previous, now, passed)
        previous = now


def test_three_months_down_is_one_monthly_reset() -> None:
    moscow = ZoneInfo("Europe/Moscow")
    start = at(2024, 1, 15)
    wakes = [at(2024, 1, 20), at(2024, 4, 10), at(2024, 4, 10, 0, 0, 5), at(2024, 4, 30, 21)]
    assert len(list(boundaries_between(wakes[0], wakes[1], M, moscow))) == 3
    assert run_daemon(start, wakes, M, moscow) == [0, 1, 0, 1]


def test_wake_exactly_at_the_boundary_resets_once() -> None:
    wakes = [at(2024, 9, 8, 4), at(2024, 9, 8, 4), at(2024, 9, 9, 3) - US, at(2024, 9, 9, 3)]
    assert run_daemon(at(2024, 9, 7, 12), wakes, D, SANTIAGO) == [1, 0, 0, 1]


def test_wake_in_the_doubled_hour_resets_once() -> None:
    """Havana 2024-11-03: midnight happens at 04:00Z and again at 05:00Z; one reset."""
    wakes = [at(2024, 11, 3, 4), at(2024, 11, 3, 4, 30), at(2024, 11, 3, 5), at(2024, 11, 3, 6)]
    assert run_daemon(at(2024, 11, 2, 12), wakes, D, HAVANA) == [1, 0, 0, 0]


# --- status and kernel quota ----------------------------------------------------------------

NOW = at(2026, 5, 1, 12)


def key_status(**overrides: object) -> Status:
    fields: dict = {
        "enabled": True,
        "expire_at": None,
        "limit": None,
        "used": 0,
        "kernel_over": False,
        "now": NOW,
    }
    fields.update(overrides)
    return status(**fields)


def test_status_exact() -> None:
    assert key_status() is Status.ACTIVE
    assert key_status(limit=100, used=99) is Status.ACTIVE
    assert key_status(limit=100, used=100) is Status.LIMITED
    assert key_status(limit=100, used=101) is Status.LIMITED
    assert key_status(limit=100, used=0, kernel_over=True) is Status.LIMITED
    assert key_status(limit=0, used=0) is Status.LIMITED
    assert key_status(limit=None, used=10**18, kernel_over=True) is Status.ACTIVE
    assert key_status(expire_at=NOW) is Status.EXPIRED
    assert key_status(expire_at=NOW + US) is Status.ACTIVE
    assert key_status(expire_at=NOW - US) is Status.EXPIRED
    assert key_status(expire_at=NOW.astimezone(ZoneInfo("Asia/Kathmandu"))) is Status.EXPIRED
    assert key_status(expire_at=NOW, limit=1, used=5) is Status.EXPIRED
    assert key_status(enabled=False, expire_at=NOW, limit=1, used=5) is Status.DISABLED
    assert key_status(enabled=False) is Status.DISABLED


@fast
@given(
    enabled=st.booleans(),
    expire_in=st.none() | st.integers(min_value=-(10**6), max_value=10**6),
    limit=st.none() | st.integers(min_value=0, max_value=10**15),
    used=st.integers(min_value=0, max_value=10**15),
    kernel_over=st.booleans(),
)
def test_status_precedence(
    enabled: bool, expire_in: int | None, limit: int | None, used: int, kernel_over: bool
) -> None:
    expire_at = None if expire_in is None else NOW + timedelta(microseconds=expire_in)
    result = key_status(
        enabled=enabled, expire_at=expire_at, limit=limit, used=used, kernel_over=kernel_over
    )
    if not enabled:
        expected = Status.DISABLED
    elif expire_in is not None and expire_in <= 0:
        expected = Status.EXPIRED
    elif limit is not None and (used >= limit or kernel_over):
        expected = Status.LIMITED
    else:
        expected = Status.ACTIVE
    assert result is expected


def test_kernel_quota_exact() -> None:
    assert kernel_quota(Status.DISABLED, 100, 50) == Quota(0, 0)
    assert kernel_quota(Status.EXPIRED, None, 50) == Quota(0, 0)
    assert kernel_quota(Status.ACTIVE, None, 50) is None
    assert kernel_quota(Status.LIMITED, None, 50) is None
    assert kernel_quota(Status.ACTIVE, 100, 50) == Quota(100, 50)
    assert kernel_quota(Status.LIMITED, 100, 150) == Quota(100, 100)
    assert kernel_quota(Status.LIMITED, 0, 0) == Quota(0, 0)


@fast
@given(
    state=st.sampled_from(list(Status)),
    limit=st.none() | st.integers(min_value=0, max_value=10**16),
    used=st.integers(min_value=0, max_value=10**16),
)
def test_kernel_quota(state: Status, limit: int | None, used: int) -> None:
    result = kernel_quota(state, limit, used)
    if state in (Status.DISABLED, Status.EXPIRED):
        assert result == Quota(limit=0, used=0)
    elif limit is None:
        assert result is None
    else:
        assert result == Quota(limit=limit, used=min(used, limit))
        assert result.used <= result.limit


# --- parse_size -----------------------------------------------------------------------------

UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "PB": 10**15,
    "KiB": 2**10,
    "MiB": 2**20,
    "GiB": 2**30,
    "TiB": 2**40,
    "PiB": 2**50,
}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("50GB", 50 * 10**9),
        ("50GiB", 50 * 2**30),
        ("512MiB", 512 * 2**20),
        ("1.5 TB", 1_500_000_000_000),
        ("1.5TiB", 3 * 2**39),
        ("1000", 1000),
        ("0", 0),
        ("0GB", 0),
        ("50gb", 50 * 10**9),
        ("50gib", 50 * 2**30),
        ("50 Gb", 50 * 10**9),
        ("  50  GB  ", 50 * 10**9),
        ("7B", 7),
        ("1 kb", 1000),
        ("1KiB", 1024),
        ("2PB", 2 * 10**15),
        ("1EB", 10**18),
        ("1 EiB", 2**60),
    ],
)
def test_parse_size_exact(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    "text",
    ["lots", "-5GB", "5XB", "", "GB", " ", "5 G B", "1e9", "5GBs", "\u0665GB", "\uff15GB",
     "5\u00a0GB", "5\u3000GB", "1.5.5GB", ".5GB", "5.GB", "1_000", "+5GB", "5ZB"],
)
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="is not a size"):
        parse_size(text)


def vary(text: str, rng: random.Random) -> str:
    return "".join(c.upper() if rng.random() < 0.5 else c.lower() for c in text)


@fast
@given(
    number=st.integers(min_value=0, max_value=10**6),
    unit=st.sampled_from(sorted(UNITS)),
    before=st.sampled_from(["", " ", "  ", "\t"]),
    between=st.sampled_from(["", " ", "  "]),
    after=st.sampled_from(["", " ", "\t"]),
    seed=st.integers(min_value=0, max_value=2**32),
)
def test_parse_size_units_any_case_and_spacing(
    number: int, unit: str, before: str, between: str, after: str, seed: int
) -> None:
    number %= 2**53 // UNITS[unit] + 1  # beyond 2**53 bytes: test_parse_size_large_byte_counts
    text = f"{before}{number}{between}{vary(unit, random.Random(seed))}{after}"
    assert parse_size(text) == number * UNITS[unit]


def test_parse_size_decimal_is_exact() -> None:
    """'2.01GB' is exactly 2,010,000,000 bytes; a float product truncates it to 2,009,999,999."""
    assert parse_size("2.01GB") == 2_010_000_000
    assert parse_size("2.01KB") == 2010


@example(hundredths=201, unit="GB")
@fast
@given(
    hundredths=st.integers(min_value=0, max_value=10**5),
    unit=st.sampled_from(["KB", "MB", "GB", "TB", "PB"]),
)
def test_parse_size_decimals_with_whole_byte_results_are_exact(hundredths: int, unit: str) -> None:
    text = f"{hundredths // 100}.{hundredths % 100:02d}{unit}"
    exact = Decimal(text[: -len(unit)]) * UNITS[unit]
    assert exact == int(exact)
    assert parse_size(text) == int(exact), text


@pytest.mark.parametrize(
    ("text", "bytes_"),
    [("0.5B", "0.5"), ("0.5", "0.5"), ("1.5", "1.5"), ("0.0001KB", "0.1"), ("1.0001 kB", "1000.1"),
     ("0.3KiB", "307.2"), ("1.1 EiB", "1268213655067531673.6")],
)
def test_parse_size_refuses_a_fraction_of_a_byte(text: str, bytes_: str) -> None:
    """'0.5B' was a limit of 0 bytes (rounded down), so the key was limited from its creation."""
    with pytest.raises(ValueError) as refused:
        parse_size(text)
    assert str(refused.value) == (
        f"{text.strip()!r} is {bytes_} bytes: a size must be a whole number of bytes"
    )


@fast
@given(
    whole=st.integers(min_value=0, max_value=10**6),
    decimals=st.text("0123456789", min_size=1, max_size=6),
    unit=st.sampled_from(sorted(UNITS)),
)
def test_parse_size_is_the_exact_size_or_refused(whole: int, decimals: str, unit: str) -> None:
    """Whatever is typed, the size is the exact number it names, or a refusal saying it is not
    a whole number of bytes: never a rounded one ("1.5KiB" is 1536 bytes, "0.5B" nothing)."""
    text = f"{whole}.{decimals}{unit}"
    exact = Decimal(f"{whole}.{decimals}") * UNITS[unit]
    if exact == int(exact):
        assert parse_size(text) == exact
    else:
        with pytest.raises(ValueError, match="a size must be a whole number of bytes"):
            parse_size(text)


def test_parse_size_large_byte_counts_are_exact() -> None:
    """Integers beyond 2**53 bytes (9 PB) lose their last digits through float()."""
    assert parse_size(str(2**53 + 1)) == 2**53 + 1
    assert parse_size("295149PB") == 295149 * 10**15


# --- parse_moment ---------------------------------------------------------------------------

MOSCOW = ZoneInfo("Europe/Moscow")


@pytest.mark.parametrize(
    ("text", "delta"),
    [
        ("+30d", timedelta(days=30)),
        ("+12h", timedelta(hours=12)),
        ("+2w", timedelta(weeks=2)),
        ("+90m", timedelta(minutes=90)),
        ("+0d", timedelta(0)),
        (" +30d ", timedelta(days=30)),
    ],
)
def test_parse_moment_relative(text: str, delta: timedelta) -> None:
    assert parse_moment(text, NOW, MOSCOW) == NOW + delta


@fast
@given(
    amount=st.integers(min_value=0, max_value=99999),
    unit=st.sampled_from(["m", "h", "d", "w"]),
    now=moments.filter(lambda moment: moment >= EARLIEST_MOMENT),
    zone=zones,
)
def test_parse_moment_relative_property(
    amount: int, unit: str, now: datetime, zone: ZoneInfo
) -> None:
    now = utc(now)  # the service passes datetime.now(UTC)
    delta = {
        "m": timedelta(minutes=1),
        "h": timedelta(hours=1),
        "d": timedelta(days=1),
        "w": timedelta(weeks=1),
    }[unit] * amount
    result = parse_moment(f"+{amount}{unit}", now, zone)
    assert result == now + delta
    assert result.utcoffset() == timedelta(0)


@pytest.mark.parametrize(
    ("text", "zone", "expected"),
    [
        ("2027-01-31", "Europe/Moscow", at(2027, 1, 30, 21)),
        ("2027-01-31", "UTC", at(2027, 1, 31)),
        ("2027-01-31", "Asia/Kathmandu", at(2027, 1, 30, 18, 15)),
        ("2027-01-31", "America/New_York", at(2027, 1, 31, 5)),
        ("2027-07-01", "Australia/Lord_Howe", at(2027, 6, 30, 13, 30)),
        ("2024-09-08", "America/Santiago", at(2024, 9, 8, 4)),  # midnight skipped
        ("2024-11-03", "America/Havana", at(2024, 11, 3, 4)),  # first of two midnights
    ],
)
def test_parse_moment_date_is_local_midnight(text: str, zone: str, expected: datetime) -> None:
    result = parse_moment(text, NOW, ZoneInfo(zone))
    assert result.tzinfo is not None
    assert utc(result) == expected


@fast
@given(day=st.dates(min_value=date(2000, 1, 1), max_value=date(2100, 12, 31)), zone=zones)
def test_parse_moment_date_property(day: date, zone: ZoneInfo) -> None:
    assert utc(parse_moment(day.isoformat(), NOW, zone)) == start_of_day(day, zone)


def test_parse_moment_datetime_keeps_its_offset() -> None:
    result = parse_moment("2027-01-31T12:00:00+00:00", NOW, MOSCOW)
    assert result.utcoffset() == timedelta(0)
    assert utc(result) == at(2027, 1, 31, 12)
    result = parse_moment("2027-01-31T12:00:00+05:45", NOW, MOSCOW)
    assert result.utcoffset() == timedelta(hours=5, minutes=45)
    assert (result.hour, result.minute) == (12, 0)
    assert utc(result) == at(2027, 1, 31, 6, 15)
    assert utc(parse_moment("2027-01-31T12:00:00Z", NOW, MOSCOW)) == at(2027, 1, 31, 12)


def test_parse_moment_naive_datetime_gets_the_zone() -> None:
    result = parse_moment("2027-01-31T12:00:00", NOW, MOSCOW)
    assert result.tzinfo is MOSCOW
    assert (result.year, result.month, result.day, result.hour, result.minute) == (
        2027,
        1,
        31,
        12,
        0,
    )
    assert utc(result) == at(2027, 1, 31, 9)
    assert utc(parse_moment("2027-07-01 08:30", NOW, ZoneInfo("Europe/Berlin"))) == at(
        2027, 7, 1, 6, 30
    )


@pytest.mark.parametrize(
    "text",
    ["someday", "+30y", "2027-13-01", "2027-02-30", "", "+d", "30d", "+-3d", "tomorrow"],
)
def test_parse_moment_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="is not a date"):
        parse_moment(text, NOW, MOSCOW)


@pytest.mark.parametrize(
    "text",
    ["+99999999d", "+" + "9" * 40 + "d", "9999-12-31", "1999-12-31", "0001-01-01T00:00:00+05:00",
     "9999-12-31T23:59:59-05:00"],
)
def test_parse_moment_refuses_dates_outside_the_bounds(text: str) -> None:
    """Beyond them, "+Nd" and time zone arithmetic overflow datetime (an OverflowError, a 500)."""
    with pytest.raises(ValueError, match="is not between 2000-01-01 and 9998-12-31"):
        parse_moment(text, NOW, MOSCOW)


@pytest.mark.parametrize("text", ["+\u0665d", "\u0662\u0660\u0662\u0667-01-31", "+\uff13d"])
def test_parse_moment_takes_ascii_digits_only(text: str) -> None:
    with pytest.raises(ValueError, match="is not a date"):
        parse_moment(text, NOW, MOSCOW)
