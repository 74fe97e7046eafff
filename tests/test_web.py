"""The Traffic Manager page: its files and the JSON it reads in the in-process layer
(tests/inprocess.py, the app as the Unix socket serves it), and in the kernel layer the TCP
listener serving it without a key and the page in a real headless browser (Debian's chromium +
chromium-driver, driven by selenium with the system binaries: nothing is downloaded).

For the browser the daemon runs in the server namespace with its TCP listener; the browser runs
in the client namespace (another host, as a person would use it) and reaches the listener over
the veth pair. chromedriver is started through `ip netns exec`, and the test process talks to it
from inside the client namespace too (its sockets are made there). The page's numbers are
compared with the API's, read over the Unix socket at the same moment.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

from daemon.units import display_bytes
from tests.conftest import REPO, Daemon
from tests.inprocess import InProcessDaemon
from tests.netlab import SERVER_V4, Lab, inside
from tests.test_counting import UDP_OVERHEAD, udp_exchange

API_KEY = "page-key-" + "k" * 16
PORT = 18080
PAGE = f"http://{SERVER_V4}:{PORT}/"
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
SCREENSHOT = REPO / "docs" / "traffic-manager.png"
LOCAL_SERVER = "vpn.example.net"  # PORTMETER_PUBLIC_HOST of the test daemon
WIRE = 1000 + UDP_OVERHEAD[socket.AF_INET]
STATIC = (("app.js", "javascript"), ("api.js", "javascript"), ("style.css", "text/css"))
T = TypeVar("T")
Get = Callable[[str], httpx.Response]


def listening_daemon(make_daemon: Any) -> Daemon:
    return make_daemon(PORTMETER_HTTP_LISTEN=f"{SERVER_V4}:{PORT}", PORTMETER_API_KEY=API_KEY)


def assert_static_files(get: Get) -> None:
    """The page's files as `get` fetches them: each with its type and `no-cache`, and no other."""
    for name, kind in STATIC:
        served = get(f"/static/{name}")
        assert served.status_code == 200 and kind in served.headers["content-type"], name
        assert served.headers["cache-control"] == "no-cache"
    assert get("/static/missing.js").status_code == 404


def test_page_and_static_files_are_served_without_a_key(inproc: InProcessDaemon) -> None:
    page = inproc.http.get("/")  # as the Unix socket serves it: no key anywhere
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "Traffic Manager" in page.text
    assert "default-src 'none'" in page.headers["content-security-policy"]
    assert_static_files(inproc.http.get)
    # Offline by construction: nothing the page loads comes from another host.
    for name in ("index.html", "app.js", "api.js", "style.css"):
        text = (REPO / "daemon" / "web" / name).read_text()
        remote = r"(src|href)=\"(https?:)?//|url\(\s*['\"]?(https?:)?//|@import"
        assert not re.search(remote, text), name
    total = sum(p.stat().st_size for p in (REPO / "daemon" / "web").iterdir())
    assert total < 40 * 1024


def test_the_tcp_listener_serves_the_page_without_a_key(net: Lab, make_daemon: Any) -> None:
    daemon = listening_daemon(make_daemon)
    page = daemon.http.get("/")
    with inside(net.client), httpx.Client(base_url=PAGE, timeout=10) as tcp:
        assert tcp.get("/").text == page.text
        assert_static_files(tcp.get)
        assert tcp.get("/api/keys").status_code == 401
        assert tcp.get("/api/admin/usage", headers={"X-API-Key": API_KEY}).status_code == 200


def test_the_api_answers_every_field_the_page_reads(inproc: InProcessDaemon) -> None:
    """daemon/web/api.js names every field the page reads: each is there, with the numbers."""
    alice = inproc.create("alice", data_limit_bytes=100_000)
    inproc.datagrams(alice["port"], 40, WIRE, echo=True)  # 82% of her limit
    up, down = 123_456, 654_321
    report(inproc, "r1", "dave", "vpn2.example.net", up, down)
    local = 40 * WIRE

    [key] = inproc.api("GET", "/api/keys")["keys"]
    fields = ("id", "name", "port", "status", "rx_bytes", "tx_bytes", "used_bytes")
    assert [key[f] for f in (*fields, "data_limit_bytes")] == [
        alice["id"], "alice", alice["port"], "active", local, local, 2 * local, 100_000
    ]
    summary = inproc.api("GET", "/api/traffic/ports/exact")["ports_traffic"]
    [t] = [entry["traffic"] for entry in summary["ports_traffic"].values()]
    assert (t["name"], t["connections"], t["rx_bytes"], t["tx_bytes"]) == ("alice", 0, local, local)
    assert (summary["total_traffic"], summary["total_connections"]) == (2 * local, 0)

    detailed = inproc.api("GET", "/api/admin/usage/alice/detailed")  # saves the history too
    [server] = detailed["servers"]
    assert [server[f] for f in ("server", "source", "port", "connections")] == [
        LOCAL_SERVER, "local", alice["port"], 0
    ]
    totals = ("bytes_uploaded", "bytes_downloaded", "total_bytes")
    assert [server[f] for f in totals] == [local, local, 2 * local]
    for series, points in (("hourly", 24), ("daily", 30)):
        assert len(detailed[series]) == points
        assert sum(p["bytes_uploaded"] for p in detailed[series]) == local
        assert sum(p["bytes_downloaded"] for p in detailed[series]) == local
        assert all(datetime.fromisoformat(p["start"]) for p in detailed[series])
    used = inproc.api("GET", "/api/admin/usage/alice")["local"]["keys"][0]["last_used"]
    assert used == server["last_used"] is not None
    [reported] = inproc.api("GET", "/api/admin/usage/dave")["reported"]
    assert datetime.now(UTC) - datetime.fromisoformat(reported["last_used"]) < timedelta(hours=1)

    overview = inproc.api("GET", "/api/admin/usage")
    numbers = ("total_users", "total_servers", "traffic_used", "bytes_uploaded",
               "bytes_downloaded", "total_connections")
    assert [overview[f] for f in numbers] == [
        2, 2, 2 * local + up + down, local + up, local + down, 0
    ]
    assert [
        (u["username"], u["bytes_uploaded"], u["bytes_downloaded"], u["total_bytes"], u["servers"])
        for u in overview["users"]
    ] == [("alice", local, local, 2 * local, 1), ("dave", up, down, up + down, 1)]
    db = overview["database"]
    assert (db["unique_users"], db["unique_servers"], db["retention_days"]) == (2, 2, 90)
    cleaned = inproc.api("POST", "/api/admin/usage/cleanup")
    assert (cleaned["removed"], cleaned["retention_days"]) == (0, 90)
    assert cleaned["records"] == db["records"] > 0  # nothing was old enough to go
    after = inproc.api("GET", "/api/admin/usage")["database"]
    assert cleaned["size_bytes"] == after["size_bytes"] >= db["size_bytes"] > 0
    reset = inproc.api("POST", "/api/admin/usage/reset")
    assert reset["users_reset"] == ["alice", "dave"]


# --- the browser ---------------------------------------------------------------------------


@pytest.fixture
def browser(net: Lab, workdir: Path) -> Iterator[Any]:
    """Chromium in the client namespace, driven by chromedriver in the same namespace."""
    with chromium(net, workdir) as driver:
        yield driver


@contextlib.contextmanager
def chromium(net: Lab, workdir: Path) -> Iterator[Any]:
    """Chromium in the client namespace, driven by chromedriver in the same namespace (also
    for bench/scale.py)."""
    for binary, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not binary.exists():
            pytest.fail(
                f"{binary} is missing: scripts/setup.sh installs the Debian package {package}"
            )
    try:
        from selenium import webdriver
    except ImportError:
        pytest.fail("selenium is missing: pip install selenium (the project's test extra)")
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    wrapper = workdir / "chromedriver-in-netns"
    wrapper.write_text(f'#!/bin/sh\nexec ip netns exec {net.client} {CHROMEDRIVER} "$@"\n')
    wrapper.chmod(0o755)
    options = Options()
    options.binary_location = str(CHROMIUM)
    for arg in (
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-dev-shm-usage", "--disable-extensions", "--disable-default-apps",
        "--force-color-profile=srgb", "--window-size=1440,1320", "--lang=en-US",
        f"--user-data-dir={workdir / 'chromium-profile'}",
    ):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # An explicit driver path: selenium-manager is never asked to find or download anything.
    service = Service(executable_path=str(wrapper), log_output=str(workdir / "chromedriver.log"))
    # The test's sockets to chromedriver must be made in the client namespace, where it listens:
    # the whole test runs there (udp_exchange and the Unix-socket API calls are unaffected).
    with inside(net.client):
        driver = webdriver.Chrome(service=service, options=options)
        try:
            driver.set_script_timeout(20)
            yield driver
        finally:
            driver.quit()


def wait_for(probe: Callable[[], T], what: str, timeout: float = 15) -> T:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = probe()
            if last:
                return last
        except Exception as exc:  # noqa: BLE001 - elements come and go while the page renders
            last = exc
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}; last: {last!r}")


def console(driver: Any) -> list[dict[str, Any]]:
    return driver.get_log("browser")


def text(driver: Any, css: str) -> str:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.CSS_SELECTOR, css).text


def row(driver: Any, user: str) -> dict[str, str]:
    from selenium.webdriver.common.by import By

    tr = driver.find_element(By.CSS_SELECTOR, f'tr.user[data-user="{user}"]')
    cells = ("name", "port", "status", "servers", "up", "down", "total", "conn", "last", "limit")
    values = {c: tr.find_element(By.CSS_SELECTOR, f".c-{c}").text for c in cells}
    values["fill"] = tr.find_element(By.CSS_SELECTOR, ".c-limit").get_attribute("innerHTML")
    return values


def message(driver: Any) -> tuple[str, str]:
    from selenium.webdriver.common.by import By

    box = driver.find_element(By.ID, "message")
    return (box.get_attribute("class") or "", box.text if box.is_displayed() else "")


def click(driver: Any, css: str) -> None:
    from selenium.webdriver.common.by import By

    driver.find_element(By.CSS_SELECTOR, css).click()


def refresh_and_wait(driver: Any) -> None:
    before = text(driver, "#updated")
    time.sleep(1.05)  # "Updated HH:MM:SS" changes at most once a second
    click(driver, "#refresh")
    wait_for(lambda: text(driver, "#updated") != before and not driver.execute_script(
        "return document.body.classList.contains('busy')"), "the refresh")


def expect_global(driver: Any, overview: dict[str, Any]) -> None:
    db = overview["database"]
    assert {
        "users": text(driver, "#stat-users"), "servers": text(driver, "#stat-servers"),
        "traffic": text(driver, "#stat-traffic"), "connections": text(driver, "#stat-connections"),
        "records": text(driver, "#db-records"), "unique_users": text(driver, "#db-users"),
        "unique_servers": text(driver, "#db-servers"), "size": text(driver, "#db-size"),
        "retention": text(driver, "#db-retention"),
    } == {
        "users": str(overview["total_users"]), "servers": str(overview["total_servers"]),
        "traffic": display_bytes(overview["traffic_used"]),
        "connections": str(overview["total_connections"]),
        "records": str(db["records"]), "unique_users": str(db["unique_users"]),
        "unique_servers": str(db["unique_servers"]), "size": display_bytes(db["size_bytes"]),
        "retention": f"{db['retention_days']} days",
    }


def settled(daemon: Daemon, driver: Any) -> dict[str, Any]:
    """Refresh the page until it and the API agree on the global numbers (the database grows
    while the poll loop writes, so one try may straddle a write); returns the overview."""
    for _ in range(5):
        refresh_and_wait(driver)
        overview = daemon.api("GET", "/api/admin/usage")
        try:
            expect_global(driver, overview)
            return overview
        except AssertionError:
            continue
    expect_global(driver, daemon.api("GET", "/api/admin/usage"))
    raise AssertionError("unreachable")


def expect_users(driver: Any, daemon: Daemon, overview: dict[str, Any]) -> None:
    keys = {k["name"]: k for k in daemon.api("GET", "/api/keys")["keys"]}
    exact = daemon.api("GET", "/api/traffic/ports/exact")["ports_traffic"]["ports_traffic"]
    connections = {t["key_name"]: t["traffic"]["connections"] for t in exact.values()}
    for user in overview["users"]:
        shown = row(driver, user["username"])
        assert (shown["up"], shown["down"], shown["total"], shown["servers"]) == (
            display_bytes(user["bytes_uploaded"]), display_bytes(user["bytes_downloaded"]),
            display_bytes(user["total_bytes"]), str(user["servers"]),
        ), user["username"]
        key = keys.get(user["username"])
        if key is None:
            assert (shown["port"], shown["status"]) == ("–", "remote")
            continue
        assert (shown["port"], shown["status"], shown["conn"]) == (
            str(key["port"]), key["status"], str(connections[key["name"]]))
        if key["data_limit_bytes"] is None:
            assert shown["limit"] == "no limit"
        else:
            used, limit = display_bytes(key["used_bytes"]), display_bytes(key["data_limit_bytes"])
            assert shown["limit"] == f"{used} / {limit}"
    assert len(driver.find_elements("css selector", "tr.user")) == len(overview["users"])


def report(daemon: Daemon | InProcessDaemon, report_id: str, user: str, server: str, up: int,
           down: int, at: datetime | None = None) -> None:
    body = {
        "report_id": report_id, "user_token": user, "server": server, "port": 443,
        "protocol": "vless", "bytes_uploaded": up, "bytes_downloaded": down,
    }
    if at is not None:
        body["timestamp"] = at.isoformat()
    assert daemon.api("POST", "/api/traffic/webhook", json=body)["accepted"] == 1


@pytest.mark.browser
def test_traffic_manager_page(net: Lab, make_daemon: Any, browser: Any) -> None:
    from selenium.webdriver.common.by import By

    driver = browser
    daemon = listening_daemon(make_daemon)
    alice = daemon.create("alice", data_limit_bytes=100_000)
    bob = daemon.create("bob")
    daemon.create("carol", data_limit_bytes="1GB")
    udp_exchange(net, socket.AF_INET, alice["port"], 40, 1000, echo=True)  # 82% of her limit
    udp_exchange(net, socket.AF_INET, bob["port"], 25, 1000, echo=False)
    assert daemon.traffic("alice")["total_bytes"] == 2 * 40 * WIRE  # the kernel's exact count
    # Other servers of the fleet report usage too: alice elsewhere, dave only elsewhere (once
    # 100 days ago, past the retention, for the cleanup to remove).
    report(daemon, "r1", "alice", "vpn2.example.net", 3 * 2**20, 7 * 2**20)
    report(daemon, "r2", "dave", "vpn2.example.net", 123_456, 654_321)
    long_ago = datetime.now(UTC) - timedelta(days=100)
    report(daemon, "r3", "dave", "vpn3.example.net", 5_000, 6_000, at=long_ago)

    # Over TCP without a key the page says what is missing instead of showing nothing.
    driver.get(PAGE)
    wait_for(lambda: "API key" in message(driver)[1], "the API key message")
    assert message(driver)[0] == "error"
    for entry in console(driver):  # only the refused API calls, nothing broken
        if entry["level"] == "SEVERE":
            assert "/api/" in entry["message"] and "401" in entry["message"], entry

    field = driver.find_element(By.ID, "api-key")
    field.send_keys(API_KEY)
    click(driver, "#save-key")
    wait_for(lambda: row(driver, "alice")["up"] != "", "the users table")
    assert driver.execute_script("return localStorage.getItem('portmeter.apiKey')") == API_KEY

    # The page shows bytes as the CLI does (display_bytes, decimal units), rounding ties included.
    samples = [0, 1, 999, 1000, 1005, 1015, 999_999, 1536, 1048576, 50 * 10**9, 2**40 + 3, 2**53]
    shown = driver.execute_script("return arguments[0].map(window.portmeter.displayBytes)", samples)
    assert shown == [
        display_bytes(n) for n in samples
    ]

    overview = settled(daemon, driver)
    assert overview["total_users"] == 4 and overview["total_servers"] == 3
    expect_users(driver, daemon, overview)
    wait_for(lambda: row(driver, "alice")["last"] in ("just now", "1 min ago"), "alice's last use")
    assert row(driver, "carol")["last"] == "never"
    assert "fill warn" in row(driver, "alice")["fill"] and "fill ok" in row(driver, "carol")["fill"]

    # Per-server details and the usage chart of alice.
    click(driver, 'button[aria-label="details of alice"]')
    servers_table = 'tr[data-details="alice"] table.servers'
    wait_for(lambda: driver.find_elements(By.CSS_SELECTOR, servers_table), "details")
    detailed = daemon.api("GET", "/api/admin/usage/alice/detailed")
    for server in detailed["servers"]:
        where = f'tr[data-details="alice"] tr[data-server="{server["server"]}"]'
        tr = driver.find_element(By.CSS_SELECTOR, where)
        cells = ("up", "down", "total")
        assert [tr.find_element(By.CSS_SELECTOR, f".s-{c}").text for c in cells] == [
            display_bytes(server["bytes_uploaded"]), display_bytes(server["bytes_downloaded"]),
            display_bytes(server["total_bytes"]),
        ]
    assert {s["server"] for s in detailed["servers"]} == {LOCAL_SERVER, "vpn2.example.net"}

    def bars(kind: str) -> list[str]:
        return [t.get_attribute("textContent") for t in driver.find_elements(
            By.CSS_SELECTOR, f'tr[data-details="alice"] svg.usage.{kind} g.bar title')]

    def expected(points: list[dict[str, Any]]) -> list[str]:
        return [f"↑ {display_bytes(p['bytes_uploaded'])}  ↓ {display_bytes(p['bytes_downloaded'])}"
                for p in points]

    hourly = bars("hourly")
    assert len(hourly) == 24
    assert [t.split("  ", 1)[1] for t in hourly] == expected(detailed["hourly"])
    assert sum(p["total_bytes"] for p in detailed["hourly"]) == detailed["total_bytes"]
    driver.save_screenshot(str(shot := Path(daemon.workdir) / "page.png"))
    click(driver, 'tr[data-details="alice"] .switch button[value="daily"]')
    daily = wait_for(lambda: bars("daily"), "the daily chart")
    assert len(daily) == 30 and [t.split("  ", 1)[1] for t in daily] == expected(detailed["daily"])
    SCREENSHOT.parent.mkdir(exist_ok=True)
    shutil.copyfile(shot, SCREENSHOT)

    # Refresh shows new traffic.
    udp_exchange(net, socket.AF_INET, bob["port"], 30, 1000, echo=True)
    assert daemon.traffic("bob")["rx_bytes"] == 55 * WIRE
    overview = settled(daemon, driver)
    expect_users(driver, daemon, overview)
    assert row(driver, "bob")["up"] == display_bytes(55 * WIRE)

    # Reset all asks first; Cancel changes nothing.
    def dialog_open() -> bool:
        return driver.find_element(By.ID, "confirm").get_attribute("open") is not None

    click(driver, "#reset-all")
    wait_for(dialog_open, "the dialog")
    assert "all 4 users" in text(driver, "#confirm-text")
    click(driver, "#confirm-cancel")
    wait_for(lambda: not dialog_open(), "the dialog to close")
    assert daemon.api("GET", "/api/admin/usage")["traffic_used"] == overview["traffic_used"] > 0
    click(driver, "#reset-all")
    wait_for(dialog_open, "the dialog")
    click(driver, "#confirm-ok")
    done_message = ("info", "Reset the traffic of 4 users.")
    wait_for(lambda: message(driver) == done_message, "the reset message")
    after = daemon.api("GET", "/api/admin/usage")
    assert after["traffic_used"] == 0 and all(u["total_bytes"] == 0 for u in after["users"])
    assert all(k["rx_bytes"] == k["tx_bytes"] == 0 for k in daemon.api("GET", "/api/keys")["keys"])
    expect_users(driver, daemon, after)
    assert text(driver, "#stat-traffic") == "0 B"

    # Cleanup calls the endpoint and shows its result.
    before = daemon.api("GET", "/api/admin/usage")["database"]
    click(driver, "#cleanup")
    done = wait_for(lambda: re.fullmatch(
        r"Cleanup done: removed (\d+) records older than (\d+) days; (\d+) records left \((.+)\)\.",
        message(driver)[1]), "the cleanup message")
    db = daemon.api("GET", "/api/admin/usage")["database"]
    removed, days, left = (int(done.group(i)) for i in (1, 2, 3))
    assert removed >= 1 and days == db["retention_days"]
    assert left == db["records"] < before["records"]
    assert re.search(r"method=POST path=/api/admin/usage/cleanup status=200", daemon.log())

    severe = [e for e in console(driver) if e["level"] in ("SEVERE", "WARNING")]
    assert not severe, severe
