"""Many keys (issue 18): the paged API the page reads (`limit`, `offset`, `search`), the page in
headless Chromium with a daemon holding 30,000 keys, and /metrics written without
prometheus-client's per-sample overhead.

The API's paging is checked in the in-process layer (tests/inprocess.py); the page with a real
daemon whose generated state holds every key (bench/common.py's generate_state), in a browser in
the client namespace as tests/test_web.py runs it.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import anyio
import pytest
from prometheus_client.parser import text_string_to_metric_families

from bench.common import generate_state
from daemon.http.metrics import Snapshot
from daemon.limits import Status
from daemon.store.state import DirectionModel, KeyRecord
from tests.conftest import Daemon
from tests.inprocess import InProcessDaemon
from tests.netlab import SERVER_V4, Lab
from tests.test_web import (  # noqa: F401 - `browser` is a fixture
    API_KEY,
    PAGE,
    PORT,
    WIRE,
    browser,
    click,
    console,
    report,
    text,
    wait_for,
)

BROWSER_KEYS = 30_000
PAGE_SIZE = 100  # daemon/web/app.js PAGE_SIZE
FIRST_PAGE_SECONDS = 10.0  # from the API key's submit to the first page drawn
TURN_SECONDS = 5.0  # from a click (or the filter) to the new page drawn
RENDER_KEYS, RENDER_SECONDS = 30_000, 1.0  # /metrics text of 30,000 keys, written in 1 s at most


# --- the API's pages -----------------------------------------------------------------------


def test_key_list_pages_by_port(inproc: InProcessDaemon) -> None:
    made = [inproc.create(f"key{n}") for n in range(5)]
    ports = sorted(k["port"] for k in made)
    page = inproc.api("GET", "/api/keys?limit=2&offset=1")
    assert [k["port"] for k in page["keys"]] == ports[1:3]
    assert (page["total"], page["offset"], page["limit"]) == (5, 1, 2)
    last = inproc.api("GET", "/api/keys?limit=100&offset=4")
    assert [k["port"] for k in last["keys"]] == ports[4:]
    everything = inproc.api("GET", "/api/keys")
    assert [k["port"] for k in everything["keys"]] == ports
    assert (everything["total"], everything["offset"], everything["limit"]) == (5, 0, None)


def test_overview_pages_users_by_name_with_their_keys(inproc: InProcessDaemon) -> None:
    keys = {name: inproc.create(name) for name in ("carol", "alicia", "bob", "alice")}
    inproc.datagrams(keys["alice"]["port"], 3, WIRE, echo=True)
    report(inproc, "r1", "dave", "vpn2.example.net", 700, 900)

    page = inproc.api("GET", "/api/admin/usage?limit=2&offset=0")
    assert [u["username"] for u in page["users"]] == ["alice", "alicia"]
    assert (page["total_users"], page["users_matched"], page["offset"], page["limit"]) == (
        5,
        5,
        0,
        2,
    )
    [alice, alicia] = page["users"]
    assert (alice["bytes_uploaded"], alice["bytes_downloaded"]) == (3 * WIRE, 3 * WIRE)
    key = alice["key"]
    assert (key["id"], key["port"], key["status"], key["connections"]) == (
        keys["alice"]["id"],
        keys["alice"]["port"],
        "active",
        0,
    )
    assert (key["rx_bytes"], key["tx_bytes"], key["used_bytes"]) == (3 * WIRE, 3 * WIRE, 6 * WIRE)
    assert alicia["key"]["id"] == keys["alicia"]["id"]

    rest = inproc.api("GET", "/api/admin/usage?limit=2&offset=2")
    assert [(u["username"], u["key"] is None) for u in rest["users"]] == [
        ("bob", False),
        ("carol", False),
    ]
    remote = inproc.api("GET", "/api/admin/usage?limit=2&offset=4")["users"]
    assert [(u["username"], u["key"], u["bytes_uploaded"]) for u in remote] == [("dave", None, 700)]

    found = inproc.api("GET", "/api/admin/usage?limit=10&search=ALI")
    assert [u["username"] for u in found["users"]] == ["alice", "alicia"]
    assert (found["users_matched"], found["total_users"]) == (2, 5)
    # The global numbers stay the whole server's, whatever the page or the filter.
    assert found["traffic_used"] == page["traffic_used"] == 6 * WIRE + 1600
    none = inproc.api("GET", "/api/admin/usage?limit=10&search=zed")
    assert (none["users"], none["users_matched"]) == ([], 0)

    # Without a limit: every user, as before, and no key objects.
    whole = inproc.api("GET", "/api/admin/usage")
    assert [u["username"] for u in whole["users"]] == ["alice", "alicia", "bob", "carol", "dave"]
    assert all("key" not in u for u in whole["users"])
    assert (whole["users_matched"], whole["limit"]) == (5, None)


@pytest.mark.parametrize(
    ("query", "detail"),
    [
        ("limit=0", "query.limit: Input should be greater than or equal to 1"),
        ("limit=10001", "query.limit: Input should be less than or equal to 10000"),
        ("offset=-1", "query.offset: Input should be greater than or equal to 0"),
        ("offset=10000001", "query.offset: Input should be less than or equal to 10000000"),
        ("search=", "query.search: String should have at least 1 character"),
        ("search=" + "a" * 65, "query.search: String should have at most 64 characters"),
        ("search=a%01b", "query.search: String should match pattern '^[^\\x00-\\x1f\\x7f]+$'"),
    ],
)
def test_bad_overview_pages_are_refused(inproc: InProcessDaemon, query: str, detail: str) -> None:
    inproc.create("alice")
    body = inproc.api("GET", f"/api/admin/usage?{query}", expect=422)
    assert body == {"detail": detail}


# --- /metrics --------------------------------------------------------------------------------


def key_record(n: int, name: str | None = None) -> KeyRecord:
    return KeyRecord(
        id=f"{n:08x}"[-8:],
        name=name or f"k{n}",
        uuid=uuid.UUID(int=n + 1),
        port=1 + n % 65535,
        created_at=datetime.now(UTC),
        data_limit_bytes=None if n % 2 else 10**9 + n,
        status=Status.LIMITED if n % 3 == 0 else Status.ACTIVE,
        rx=DirectionModel(packets=n, bytes=2**53 - n),
        tx=DirectionModel(packets=n, bytes=n * 1000),
        dropped=DirectionModel(packets=1, bytes=n % 7),
    )


class FixedSource:
    """A metrics source over fixed keys (daemon.http.metrics.MetricsSource)."""

    def __init__(self, keys: Sequence[KeyRecord]) -> None:
        self.keys = list(keys)

    def keys_by_port(self) -> Sequence[KeyRecord]:
        return self.keys

    def polled_at(self) -> float | None:
        return 1_790_000_000.25

    def poll_seconds(self) -> float | None:
        return 0.125

    def xray_enabled(self) -> bool:
        return False

    async def xray_drift(self) -> Sequence[object]:
        return []

    async def refresh(self) -> object:
        return None


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_metrics_text_is_exact_and_escapes_labels() -> None:
    odd = key_record(3, name='a"b\\c\nd')  # a name saved before the name rules
    keys = [key_record(1), key_record(2), odd]
    snapshot = anyio.run(Snapshot.take, FixedSource(keys))
    found = samples(snapshot.render().decode())
    for key in keys:
        at = (("key", key.name), ("port", str(key.port)))
        assert found[("portmeter_key_rx_bytes_total", at)] == key.rx.bytes
        assert found[("portmeter_key_tx_bytes_total", at)] == key.tx.bytes
        assert found[("portmeter_key_dropped_bytes_total", at)] == key.dropped.bytes
        assert found.get(("portmeter_key_limit_bytes", at)) == key.data_limit_bytes
        for status in Status:
            state = (*at, ("status", status.value))
            assert found[("portmeter_key_status", tuple(sorted(state)))] == (key.status is status)
    assert found[("portmeter_keys", ())] == 3
    assert found[("portmeter_poll_duration_seconds", ())] == 0.125
    assert found[("portmeter_last_poll_timestamp_seconds", ())] == 1_790_000_000.25
    assert ("portmeter_xray_in_sync", ()) not in found
    assert len(found) == 3 * 3 + 1 + 3 * 4 + 3  # rx, tx, dropped; one limit; states; gauges


def test_metrics_text_of_30000_keys_takes_a_fraction_of_a_second() -> None:
    """prometheus-client's generate_latest took 1.5-2 s for these on this machine."""
    source = FixedSource([key_record(n) for n in range(RENDER_KEYS)])
    snapshot = anyio.run(Snapshot.take, source)
    started = time.perf_counter()
    text = snapshot.render()
    elapsed = time.perf_counter() - started
    assert text.count(b"\nportmeter_key_status{") == 4 * RENDER_KEYS
    assert elapsed < RENDER_SECONDS, f"{elapsed:.2f} s"


# --- the page with 30,000 keys -----------------------------------------------------------


def page_info(driver: Any) -> str:
    return text(driver, "#page-info")


def names_shown(driver: Any) -> list[str]:
    return list(
        driver.execute_script(
            "return [...document.querySelectorAll('tr.user')].map((r) => r.dataset.user)"
        )
    )


def drawn(driver: Any, info: str, names: list[str], seconds: float) -> float:
    """Wait until the page shows `info` and exactly the rows `names`; seconds it took."""
    started = time.monotonic()
    wait_for(
        lambda: page_info(driver) == info and names_shown(driver) == names,
        f"{info!r} with {names[:2]}…",
        timeout=seconds,
    )
    return time.monotonic() - started


@pytest.mark.browser
def test_page_pages_through_30000_keys(net: Lab, make_daemon: Any, browser: Any) -> None:  # noqa: F811
    from selenium.webdriver.common.by import By

    driver = browser
    daemon: Daemon = make_daemon(
        size=BROWSER_KEYS,
        start=False,
        PORTMETER_HTTP_LISTEN=f"{SERVER_V4}:{PORT}",
        PORTMETER_API_KEY=API_KEY,
        PORTMETER_POLL_INTERVAL="3600",
    )
    made = generate_state(daemon, BROWSER_KEYS)
    daemon.start(wait=False)
    daemon.wait_ready(180)
    # Xray's config for every key is written after READY (README "30,000 keys"): the first
    # answer waits for it, and the page is timed from then on.
    daemon.api("GET", "/api/admin/usage?limit=1")
    port_of = {k.name: k.port for k in made}
    ordered = sorted(port_of)  # the page lists users by name
    pages = -(-BROWSER_KEYS // PAGE_SIZE)

    driver.get(PAGE)
    wait_for(lambda: "API key" in text(driver, "#message"), "the API key message")
    driver.find_element(By.ID, "api-key").send_keys(API_KEY)
    click(driver, "#save-key")
    first = drawn(
        driver,
        f"Page 1 of {pages}: users 1–100 of {BROWSER_KEYS}",
        ordered[:PAGE_SIZE],
        FIRST_PAGE_SECONDS,
    )
    assert text(driver, "#stat-users") == str(BROWSER_KEYS)
    row = driver.find_element(By.CSS_SELECTOR, f'tr.user[data-user="{ordered[0]}"]')
    assert row.find_element(By.CSS_SELECTOR, ".c-port").text == str(port_of[ordered[0]])

    click(driver, "#next")
    drawn(
        driver,
        f"Page 2 of {pages}: users 101–200 of {BROWSER_KEYS}",
        ordered[PAGE_SIZE : 2 * PAGE_SIZE],
        TURN_SECONDS,
    )
    click(driver, "#last")
    last_from = (pages - 1) * PAGE_SIZE
    drawn(
        driver,
        f"Page {pages} of {pages}: users {last_from + 1}–{BROWSER_KEYS} of {BROWSER_KEYS}",
        ordered[last_from:],
        TURN_SECONDS,
    )
    assert driver.find_element(By.ID, "next").get_attribute("disabled") is not None

    wanted = f"k{BROWSER_KEYS - 1}"
    driver.find_element(By.ID, "search").send_keys(wanted.upper())  # any letter case
    drawn(driver, "Page 1 of 1: users 1–1 of 1", [wanted], TURN_SECONDS)
    row = driver.find_element(By.CSS_SELECTOR, f'tr.user[data-user="{wanted}"]')
    assert row.find_element(By.CSS_SELECTOR, ".c-port").text == str(port_of[wanted])
    severe = [e for e in console(driver) if e["level"] in ("SEVERE", "WARNING")]
    assert not [e for e in severe if "401" not in e["message"]], severe
    print(f"first page drawn {first:.2f} s after the key was entered ({BROWSER_KEYS} keys)")
