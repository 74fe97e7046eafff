"""Prometheus metrics: `GET /metrics` and the node_exporter textfile.

The metrics must equal the API's exact numbers, and `promtool check metrics` (Debian package
`prometheus`) must accept them without a lint remark. The in-process layer (tests/inprocess.py)
scrapes the app over the in-memory kernel; the kernel layer keeps what needs the real daemon: the
textfile its poll loop writes after real traffic, and a real Prometheus server (same package, our
own process and config, never the system service) scraping its TCP listener as a fleet is watched.
"""

from __future__ import annotations

import json
import shutil
import socket
import stat
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Daemon
from tests.inprocess import InProcessDaemon, inprocess_daemon
from tests.netlab import SERVER_V4, Lab, inside
from tests.test_counting import UDP_OVERHEAD, udp_exchange
from tests.test_limits import WIRE

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
STATUSES = ("active", "limited", "expired", "disabled")
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
AnyDaemon = Daemon | InProcessDaemon


def scrape(daemon: AnyDaemon) -> str:
    response = daemon.http.get("/metrics")
    assert response.status_code == 200, f"/metrics: {response.status_code} {response.text}"
    assert response.headers["content-type"] == CONTENT_TYPE
    return response.text


def parse(text: str) -> tuple[dict[str, str], Samples]:
    """Family name -> type, and every sample by name and labels (each exactly once)."""
    types: dict[str, str] = {}
    found: Samples = {}
    for family in text_string_to_metric_families(text):
        types[family.name] = family.type
        for sample in family.samples:
            where = (sample.name, tuple(sorted(sample.labels.items())))
            assert where not in found, f"duplicate series {where}"
            found[where] = sample.value
    return types, found


def value(found: Samples, name: str, **labels: str) -> float | None:
    return found.get((name, tuple(sorted(labels.items()))))


def prometheus_tool(name: str) -> str:
    tool = shutil.which(name)
    if tool is None:
        pytest.fail(
            f"{name} is missing: install the Debian package `prometheus` (scripts/setup.sh)"
        )
    return tool


def promtool(text: str) -> None:
    tool = prometheus_tool("promtool")
    result = subprocess.run(
        [tool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60,
        check=False,
    )
    said = result.stdout + result.stderr
    assert result.returncode == 0, f"promtool: exit {result.returncode}\n{said}"
    assert not said.strip(), f"promtool:\n{said}"


def labels_of(key: dict[str, Any]) -> dict[str, str]:
    return {"key": key["name"], "port": str(key["port"])}


def assert_status(found: Samples, key: dict[str, Any], expected: str) -> None:
    for status in STATUSES:
        want = 1 if status == expected else 0
        got = value(found, "portmeter_key_status", **labels_of(key), status=status)
        assert got == want, (key["name"], status, got)


def assert_equals_api(found: Samples, daemon: AnyDaemon, key: dict[str, Any]) -> dict[str, Any]:
    t = daemon.traffic(key["id"])
    labels = labels_of(key)
    assert value(found, "portmeter_key_rx_bytes_total", **labels) == t["rx_bytes"]
    assert value(found, "portmeter_key_tx_bytes_total", **labels) == t["tx_bytes"]
    assert value(found, "portmeter_key_dropped_bytes_total", **labels) == t["dropped_bytes"]
    assert value(found, "portmeter_key_limit_bytes", **labels) == t["data_limit_bytes"]
    assert_status(found, key, t["status"])
    return t


def test_metrics_equal_the_api_after_traffic_and_pass_promtool(inproc: InProcessDaemon) -> None:
    alice = inproc.create("alice")
    bob = inproc.create("bob smith")  # a label value with a space
    capped = inproc.create("capped", data_limit_bytes=10 * WIRE)
    inproc.datagrams(alice["port"], 37, 700 + UDP_OVERHEAD[socket.AF_INET], echo=True)
    inproc.datagrams(bob["port"], 5, 300 + UDP_OVERHEAD[socket.AF_INET6])
    assert inproc.datagrams(capped["port"], 12, WIRE) == 10  # the kernel drops the last two

    before = time.time()
    text = scrape(inproc)
    after = time.time()
    promtool(text)
    types, found = parse(text)
    assert types == {
        "portmeter_key_rx_bytes": "counter",
        "portmeter_key_tx_bytes": "counter",
        "portmeter_key_dropped_bytes": "counter",
        "portmeter_key_limit_bytes": "gauge",
        "portmeter_key_status": "gauge",
        "portmeter_keys": "gauge",
        "portmeter_poll_duration_seconds": "gauge",
        "portmeter_last_poll_timestamp_seconds": "gauge",
        "portmeter_xray_in_sync": "gauge",
    }

    # The metrics are the API's numbers, and those are what the kernel counted.
    a = assert_equals_api(found, inproc, alice)
    assert (a["rx_bytes"], a["tx_bytes"], a["dropped_bytes"]) == (37 * 728, 37 * 728, 0)
    b = assert_equals_api(found, inproc, bob)
    assert (b["rx_bytes"], b["tx_bytes"]) == (5 * 348, 0)
    c = assert_equals_api(found, inproc, capped)
    assert (c["rx_bytes"], c["dropped_bytes"], c["status"]) == (10 * WIRE, 2 * WIRE, "limited")

    # Only the limited key has a limit; each key has exactly one status set to 1.
    assert value(found, "portmeter_key_limit_bytes", **labels_of(capped)) == 10 * WIRE
    assert value(found, "portmeter_key_limit_bytes", **labels_of(alice)) is None
    assert_status(found, capped, "limited")
    assert_status(found, alice, "active")
    assert sum(v for (name, _), v in found.items() if name == "portmeter_key_status") == 3
    assert value(found, "portmeter_keys") == 3

    # The scrape read the kernel itself: the last poll is that reading.
    polled = value(found, "portmeter_last_poll_timestamp_seconds")
    assert polled is not None and before - 0.5 <= polled <= after + 0.5
    seconds = value(found, "portmeter_poll_duration_seconds")
    assert seconds is not None and 0 < seconds < 5
    assert value(found, "portmeter_xray_in_sync") == 1

    # A status change shows at the next scrape; the counters keep their values.
    inproc.api("POST", f"/api/keys/{alice['id']}/disable")
    _, found = parse(scrape(inproc))
    assert_status(found, alice, "disabled")
    assert value(found, "portmeter_key_rx_bytes_total", **labels_of(alice)) == 37 * 728


def test_xray_in_sync_follows_drift_and_repair(inproc: InProcessDaemon) -> None:
    # No Xray binary (tests/inprocess.py): nothing runs `xray -test`.
    inproc.create("kept")
    lost = inproc.create("lost")
    _, found = parse(scrape(inproc))
    assert value(found, "portmeter_xray_in_sync") == 1

    xray_config = inproc.rig.xray_config
    config = json.loads(xray_config.read_text(encoding="utf-8"))
    lost_tag = f"inbound-{lost['uuid']}"
    config["inbounds"] = [i for i in config["inbounds"] if i.get("tag") != lost_tag]
    xray_config.write_text(json.dumps(config), encoding="utf-8")
    text = scrape(inproc)
    promtool(text)
    assert value(parse(text)[1], "portmeter_xray_in_sync") == 0

    xray_config.write_text("{ not json", encoding="utf-8")
    assert value(parse(scrape(inproc))[1], "portmeter_xray_in_sync") == 0

    xray_config.write_text(json.dumps(config), encoding="utf-8")
    inproc.api("POST", "/api/system/xray/sync-config")
    assert value(parse(scrape(inproc))[1], "portmeter_xray_in_sync") == 1


def test_without_xray_there_is_no_sync_metric() -> None:
    with inprocess_daemon(xray=False) as inproc:
        text = scrape(inproc)  # no keys yet: still valid
        promtool(text)
        types, found = parse(text)
        assert "portmeter_xray_in_sync" not in types
        assert value(found, "portmeter_keys") == 0
        inproc.create("solo")
        types, found = parse(scrape(inproc))
        assert "portmeter_xray_in_sync" not in types
        assert value(found, "portmeter_keys") == 1


def test_textfile_for_node_exporter_follows_the_poll_loop(
    net: Lab, make_daemon: Any, workdir: Path
) -> None:
    directory = workdir / "textfile"
    directory.mkdir()
    path = directory / "portmeter.prom"
    daemon: Daemon = make_daemon(PORTMETER_METRICS_TEXTFILE=str(path))
    key = daemon.create("filed", data_limit_bytes="1MB")
    udp_exchange(net, socket.AF_INET, key["port"], 20, 500, echo=True)
    expected = 20 * 528

    # Written by the poll loop (every second here), without anyone asking.
    deadline = time.monotonic() + 15
    found: Samples = {}
    while time.monotonic() < deadline:
        if path.exists():
            _, found = parse(path.read_text(encoding="utf-8"))
            if value(found, "portmeter_key_tx_bytes_total", **labels_of(key)) == expected:
                break
        time.sleep(0.2)
    else:
        pytest.fail(f"the textfile never showed the traffic:\n{found}\n{daemon.log()}")

    text = path.read_text(encoding="utf-8")
    promtool(text)
    _, found = parse(text)
    t = assert_equals_api(found, daemon, key)
    assert (t["rx_bytes"], t["tx_bytes"]) == (expected, expected)
    assert value(found, "portmeter_key_limit_bytes", **labels_of(key)) == 1_000_000
    polled = value(found, "portmeter_last_poll_timestamp_seconds")
    assert polled is not None and time.time() - 5 < polled <= time.time()
    # Readable by node_exporter's user whatever the daemon's umask; no temporary file left.
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert daemon.stop() == 0
    assert sorted(p.name for p in directory.iterdir()) == ["portmeter.prom"]


def test_a_prometheus_server_scrapes_the_tcp_listener(
    net: Lab, make_daemon: Any, workdir: Path
) -> None:
    api_key, port, web = "m" * 24, 18081, "127.0.0.1:19090"
    daemon: Daemon = make_daemon(
        PORTMETER_HTTP_LISTEN=f"{SERVER_V4}:{port}", PORTMETER_API_KEY=api_key
    )
    key = daemon.create("watched")
    udp_exchange(net, socket.AF_INET, key["port"], 9, 400, echo=True)
    expected = 9 * 428

    # Prometheus 2.x sends no custom headers: it authenticates with `Authorization: Bearer`.
    config = workdir / "prometheus.yml"
    config.write_text(json.dumps({  # JSON is YAML
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s"},
        "scrape_configs": [{
            "job_name": "portmeter",
            "authorization": {"credentials": api_key},
            "static_configs": [{"targets": [f"{SERVER_V4}:{port}"]}],
        }],
    }))
    with open(workdir / "prometheus.log", "wb") as log:
        server = subprocess.Popen(
            ["ip", "netns", "exec", net.client, prometheus_tool("prometheus"),
             f"--config.file={config}", f"--storage.tsdb.path={workdir / 'tsdb'}",
             f"--web.listen-address={web}"],
            stdout=log, stderr=subprocess.STDOUT,
        )

    def query(expression: str) -> list[dict[str, Any]]:
        with inside(net.client), httpx.Client(timeout=5) as client:
            answer = client.get(f"http://{web}/api/v1/query", params={"query": expression})
        answer.raise_for_status()
        return answer.json()["data"]["result"]

    try:
        deadline = time.monotonic() + 30
        result: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            assert server.poll() is None, (workdir / "prometheus.log").read_text(errors="replace")
            try:
                result = query('portmeter_key_rx_bytes_total{key="watched"}')
            except httpx.HTTPError:
                result = []  # not listening yet
            if result:
                break
            time.sleep(0.3)
        else:
            said = (workdir / "prometheus.log").read_text()
            pytest.fail(f"Prometheus never scraped the daemon:\n{said}")
        assert float(result[0]["value"][1]) == expected == daemon.traffic(key["id"])["rx_bytes"]
        assert result[0]["metric"]["port"] == str(key["port"])
        up = query('up{job="portmeter"}')
        assert [float(r["value"][1]) for r in up] == [1.0]
        active = query('portmeter_key_status{key="watched",status="active"}')
        assert float(active[0]["value"][1]) == 1
    finally:
        server.terminate()
        server.wait(15)
