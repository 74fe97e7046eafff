"""Bad input gets a clear 4xx/exit code and changes nothing; concurrency never shares a port."""

from __future__ import annotations

import grp
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from tests.conftest import REPO, Daemon
from tests.netlab import Lab

pytestmark = pytest.mark.kernel


@pytest.fixture
def daemon(make_daemon: Any) -> Daemon:
    """A daemon whose background poll never rewrites the state file during a test."""
    return make_daemon(PORTMETER_POLL_INTERVAL="3600")


def snapshot(daemon: Daemon, net: Lab) -> tuple[Any, bytes, str]:
    keys = daemon.api("GET", "/api/keys")["keys"]
    table = net.nft("list", "table", "inet", daemon.table).stdout
    return keys, daemon.state_bytes(), table


BAD_REQUESTS: list[tuple[str, str, dict[str, Any], int, str]] = [
    ("POST", "/api/keys", {}, 422, "a JSON body is required"),
    ("POST", "/api/keys", {"json": {}}, 422, "name: Field required"),
    ("POST", "/api/keys", {"content": b"{not json"}, 400, "not valid JSON"),
    ("POST", "/api/keys", {"content": b'{"name": "x"', "headers": {"content-type": "application/json"}}, 400, "not valid JSON"),
    ("POST", "/api/keys", {"json": []}, 422, "body"),
    ("POST", "/api/keys", {"json": {"name": ""}}, 422, "name: must be"),
    ("POST", "/api/keys", {"json": {"name": "x" * 65}}, 422, "name: must be"),
    ("POST", "/api/keys", {"json": {"name": "semi;colon"}}, 422, "name: must be"),
    ("POST", "/api/keys", {"json": {"name": " padded"}}, 422, "name: must be"),
    ("POST", "/api/keys", {"json": {"name": "ok", "port": 0}}, 422, "port"),
    ("POST", "/api/keys", {"json": {"name": "ok", "port": 70000}}, 422, "port"),
    ("POST", "/api/keys", {"json": {"name": "ok", "port": "abc"}}, 422, "port"),
    ("POST", "/api/keys", {"json": {"name": "ok", "port": 1}}, 422, "outside the range"),
    ("POST", "/api/keys", {"json": {"name": "ok", "colour": "red"}}, 422, "colour"),
    ("POST", "/api/keys", {"json": {"name": "taken"}}, 409, "already exists"),
    ("GET", "/api/keys/nope", {}, 404, "no key"),
    ("GET", "/api/keys/" + "x" * 65, {}, 422, "key_id"),
    ("DELETE", "/api/keys/nope", {}, 404, "no key"),
    ("GET", "/api/keys/nope/traffic/port/exact", {}, 404, "no key"),
    ("POST", "/api/keys/nope/traffic/port/reset", {}, 404, "no key"),
    ("GET", "/api/no/such/route", {}, 404, "Not Found"),
    ("PUT", "/api/keys", {}, 405, "Method Not Allowed"),
]


def test_every_bad_request_is_a_clear_4xx_and_changes_nothing(net: Lab, daemon: Daemon) -> None:
    daemon.create("taken")
    before = snapshot(daemon, net)
    for method, path, kwargs, status, words in BAD_REQUESTS:
        response = daemon.http.request(method, path, **kwargs)
        assert response.status_code == status, (method, path, kwargs, response.text)
        detail = response.json()["detail"]
        assert isinstance(detail, str) and words in detail, (method, path, detail)
    assert snapshot(daemon, net) == before


def test_taken_port_is_a_conflict(daemon: Daemon) -> None:
    first = daemon.create("first")
    clash = daemon.api("POST", "/api/keys", expect=409, json={"name": "second", "port": first["port"]})
    assert "already assigned" in clash["detail"]


CLI_FAILURES = [
    (["keys", "add", "bad!name"], "name: must be"),
    (["keys", "add", "taken"], "already exists"),
    (["keys", "add", "x", "--port", "abc"], "invalid int value"),
    (["keys", "add"], "required: name"),
    (["keys", "rm", "nope"], "no key"),
    (["keys", "show", "nope"], "no key"),
    (["traffic", "nope"], "no key"),
    (["traffic", "reset", "nope"], "no key"),
    (["traffic", "a", "b", "c"], "usage: portmeter traffic"),
    (["frobnicate"], "invalid choice"),
]


def test_cli_errors_are_one_line_with_nonzero_exit(net: Lab, daemon: Daemon) -> None:
    daemon.create("taken")
    before = snapshot(daemon, net)
    for args, words in CLI_FAILURES:
        result = daemon.cli(*args)
        assert result.returncode != 0, args
        assert result.stdout == "", args
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and words in lines[0], (args, result.stderr)
        assert "Traceback" not in result.stderr
    assert snapshot(daemon, net) == before


def test_cli_without_a_daemon_says_so(daemon: Daemon) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "daemon", "--socket", "/nonexistent/pm.sock", "keys", "list"],
        capture_output=True, text=True, cwd=REPO, env=daemon.env,
    )
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "portmeter: cannot reach the portmeter daemon at /nonexistent/pm.sock "
        "(is it running? try: systemctl status portmeter)"
    )


def test_cli_happy_path_and_json(net: Lab, daemon: Daemon) -> None:
    added = daemon.cli("--json", "keys", "add", "carol")
    assert added.returncode == 0, added.stderr
    key = json.loads(added.stdout)
    assert key["name"] == "carol" and key["port"] == daemon.port_range[0]
    listed = daemon.cli("keys", "list")
    assert "carol" in listed.stdout and str(key["port"]) in listed.stdout
    shown = daemon.cli("keys", "show", key["uuid"], "--json")
    assert json.loads(shown.stdout)["id"] == key["id"]
    assert "carol" in daemon.cli("traffic").stdout
    assert "reset to 0" in daemon.cli("traffic", "reset", "carol").stdout
    assert "1 used" in daemon.cli("ports").stdout
    assert "is free" in daemon.cli("keys", "rm", "carol").stdout
    assert daemon.api("GET", "/api/keys")["total"] == 0


def test_curl_over_the_unix_socket(daemon: Daemon) -> None:
    daemon.create("curly")
    result = subprocess.run(
        ["curl", "-sf", "--unix-socket", str(daemon.socket), "http://localhost/api/keys"],
        capture_output=True, text=True, check=True,
    )
    assert json.loads(result.stdout)["keys"][0]["name"] == "curly"
    posted = subprocess.run(  # curl -d sends no JSON content type: still understood
        ["curl", "-s", "--unix-socket", str(daemon.socket), "-d", '{"name": "plain"}',
         "http://localhost/api/keys"], capture_output=True, text=True, check=True,
    )
    assert json.loads(posted.stdout)["name"] == "plain"
    assert oct(daemon.socket.stat().st_mode & 0o777) == "0o660"
    stat = daemon.socket.stat()
    assert (stat.st_uid, grp.getgrgid(stat.st_gid).gr_name) == (0, "portmeter")  # made by `make setup`


def test_200_concurrent_creates_then_deletes_never_share_a_port(net: Lab, make_daemon) -> None:  # type: ignore[no-untyped-def]
    daemon: Daemon = make_daemon(size=300)

    def create(i: int) -> dict[str, Any]:
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(daemon.socket)), timeout=60) as c:
            response = c.post("http://portmeter/api/keys", json={"name": f"c{i}"})
            assert response.status_code == 201, response.text
            return response.json()

    with ThreadPoolExecutor(max_workers=32) as pool:
        keys = list(pool.map(create, range(200)))
    ports = [k["port"] for k in keys]
    assert len(set(ports)) == 200
    assert set(ports) == set(range(daemon.port_range[0], daemon.port_range[0] + 200))
    assert daemon.api("GET", "/api/system/ports/status")["valid"]

    def delete(key: dict[str, Any]) -> int:
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(daemon.socket)), timeout=60) as c:
            return c.delete(f"http://portmeter/api/keys/{key['id']}").status_code

    with ThreadPoolExecutor(max_workers=32) as pool:
        assert set(pool.map(delete, keys)) == {200}
    assert daemon.api("GET", "/api/keys")["total"] == 0
    assert "counter rx_" not in net.nft("list", "table", "inet", daemon.table).stdout
