"""Bad input gets a clear 4xx/exit code and changes nothing; concurrency never shares a port.

Two layers. The API's answers to bad input, the bounds, names and strict types are checked
in-process (`inproc`, tests/inprocess.py): the app exactly as the Unix socket serves it, over the
in-memory kernel, whose contents must not change either. The real daemon in a namespace keeps what
only it proves: the CLI over the socket, curl over the socket, concurrent clients of the socket,
and the real nftables table left as it was.
"""

from __future__ import annotations

import grp
import json
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from daemon import cli
from daemon.store.state import StateStore
from tests.conftest import REPO, Daemon
from tests.inprocess import InProcessDaemon, inprocess_daemon
from tests.netlab import Lab


@pytest.fixture
def daemon(make_daemon: Callable[..., Daemon]) -> Daemon:
    """A daemon whose background poll never rewrites the state file during a test."""
    return make_daemon(PORTMETER_POLL_INTERVAL="3600")


def snapshot(daemon: Daemon | InProcessDaemon, table: object) -> tuple[Any, bytes, object]:
    """What a refused request must leave as it was: the keys, the saved bytes and the table."""
    return daemon.api("GET", "/api/keys")["keys"], daemon.state_bytes(), table


def nft_table(daemon: Daemon, net: Lab) -> str:
    return net.nft("list", "table", "inet", daemon.table).stdout


def real_snapshot(daemon: Daemon, net: Lab) -> tuple[Any, bytes, object]:
    return snapshot(daemon, nft_table(daemon, net))


def memory_snapshot(inproc: InProcessDaemon) -> tuple[Any, bytes, object]:
    return snapshot(inproc, inproc.kernel.contents())


UNCLOSED = {"content": b'{"name": "x"', "headers": {"content-type": "application/json"}}
BAD_REQUESTS: list[tuple[str, str, dict[str, Any], int, str]] = [
    ("POST", "/api/keys", {}, 422, "a JSON body is required"),
    ("POST", "/api/keys", {"json": {}}, 422, "name: Field required"),
    ("POST", "/api/keys", {"content": b"{not json"}, 400, "not valid JSON"),
    ("POST", "/api/keys", UNCLOSED, 400, "not valid JSON"),
    ("POST", "/api/keys", {"json": []}, 422, "body"),
    ("POST", "/api/keys", {"json": {"name": ""}}, 422, "name: must be"),
    ("POST", "/api/keys", {"json": {"name": "x" * 65}}, 422, "name: must be"),
    ("POST", "/api/keys", {"json": {"name": "semi;colon"}}, 422, "name: may not contain ';'"),
    ("POST", "/api/keys", {"json": {"name": " padded"}}, 422, "name: must start with"),
    ("POST", "/api/keys", {"json": {"name": "ok", "port": 0}}, 422, "port"),
    ("POST", "/api/keys", {"json": {"name": "ok", "port": 70000}}, 422, "port"),
    ("POST", "/api/keys", {"json": {"name": "ok", "port": "abc"}}, 422, "port"),
    ("POST", "/api/keys", {"json": {"name": "ok", "port": 1}}, 422, "outside the range"),
    ("POST", "/api/keys", {"json": {"name": "ok", "colour": "red"}}, 422, "colour"),
    ("POST", "/api/keys", {"json": {"name": "taken"}}, 409, "already exists"),
    ("GET", "/api/keys/nope", {}, 404, "no key"),
    ("GET", "/api/keys/" + "x" * 257, {}, 422, "key_id"),
    ("DELETE", "/api/keys/nope", {}, 404, "no key"),
    ("GET", "/api/keys/nope/traffic/port/exact", {}, 404, "no key"),
    ("POST", "/api/keys/nope/traffic/port/reset", {}, 404, "no key"),
    ("GET", "/api/no/such/route", {}, 404, "Not Found"),
    ("PUT", "/api/keys", {}, 405, "Method Not Allowed"),
]


def test_every_bad_request_is_a_clear_4xx_and_changes_nothing(inproc: InProcessDaemon) -> None:
    inproc.create("taken")
    before = memory_snapshot(inproc)
    for method, path, kwargs, status, words in BAD_REQUESTS:
        response = inproc.http.request(method, path, **kwargs)
        assert response.status_code == status, (method, path, kwargs, response.text)
        detail = response.json()["detail"]
        assert isinstance(detail, str) and words in detail, (method, path, detail)
    assert memory_snapshot(inproc) == before


def test_taken_port_is_a_conflict(inproc: InProcessDaemon) -> None:
    first = inproc.create("first")
    body = {"name": "second", "port": first["port"]}
    clash = inproc.api("POST", "/api/keys", expect=409, json=body)
    assert "already assigned" in clash["detail"]


def test_cli_without_a_daemon_says_so() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "daemon", "--socket", "/nonexistent/pm.sock", "keys", "list"],
        capture_output=True, text=True, cwd=REPO, check=False,
    )
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "portmeter: cannot reach the portmeter daemon at /nonexistent/pm.sock "
        "(is it running? try: systemctl status portmeter)"
    )


# --- issue 17: bounds, strict types and names --------------------------------------------------

LIMIT_BOUND = "data_limit_bytes: at most 1000000000000000000 bytes (1 EB)"
LIMIT_TYPE = "data_limit_bytes: must be a whole number of bytes or a size such as 50GB"
NOT_A_SIZE = "is not a size: use e.g. 50GB, 512MiB or a number of bytes"
BOOLEAN = "must be true or false (a JSON boolean)"
WHOLE = "must be a whole number (a JSON number without quotes)"
SAME_NAME = "already exists (the same name: case, width and Unicode normal form do not count)"
NOT_A_DATE = "is not a date: use 2027-01-31, 2027-01-31T12:00:00+00:00 or +30d"
DATES = "is not between 2000-01-01 and 9998-12-31"
LATE = "9999-12-31T23:59:59-05:00"
FULLWIDTH_ALICE = "\uff41\uff4c\uff49\uff43\uff45"
PAGES = "/api/traffic/ports/exact"


def attacks(alice: dict[str, Any]) -> list[tuple[str, str, Any, int, str]]:
    """Each attack of issue 17 on input and names, with the status and the exact detail it gets.
    `alice` exists with a 10 GB limit; a key named café (NFC) exists too."""
    at_alice = f"/api/keys/{alice['id']}"
    patch = [
        ({"data_limit_bytes": "20000PB"}, LIMIT_BOUND),
        ({"data_limit_bytes": 2**64}, LIMIT_BOUND),
        ({"data_limit_bytes": str(2**64)}, LIMIT_BOUND),
        ({"data_limit_bytes": 2**63 + 5}, LIMIT_BOUND),
        ({"data_limit_bytes": 10**18 + 1}, LIMIT_BOUND),
        ({"data_limit_bytes": "1.1EB"}, LIMIT_BOUND),
        ({"data_limit_bytes": -1}, "data_limit_bytes: must not be negative"),
        ({"data_limit_bytes": True}, LIMIT_TYPE),
        ({"data_limit_bytes": 5e9}, LIMIT_TYPE),
        ({"data_limit_bytes": "\u0665GB"}, f"data_limit_bytes: '\u0665GB' {NOT_A_SIZE}"),
        ({"enabled": "yes"}, f"enabled: {BOOLEAN}"),
        ({"enabled": 1}, f"enabled: {BOOLEAN}"),
        ({"expire_at": "+99999999d"}, f"expire_at: '+99999999d' {DATES}"),
        ({"expire_at": LATE}, f"expire_at: {LATE} {DATES}"),
        ({"expire_at": "+\u0665d"}, f"expire_at: '+\u0665d' {NOT_A_DATE}"),
    ]
    create = [
        ({"name": "bob", "data_limit_bytes": "20000PB"}, 422, LIMIT_BOUND),
        ({"name": "bob", "enabled": "yes"}, 422, f"enabled: {BOOLEAN}"),
        ({"name": "bob", "port": True}, 422, f"port: {WHOLE}"),
        ({"name": "bob", "port": "20001"}, 422, f"port: {WHOLE}"),
        ({"name": "Alice"}, 409, f"a key named 'alice' {SAME_NAME}"),
        ({"name": "ALICE"}, 409, f"a key named 'alice' {SAME_NAME}"),
        ({"name": FULLWIDTH_ALICE}, 409, f"a key named 'alice' {SAME_NAME}"),
        ({"name": "cafe\u0301"}, 409, f"a key named 'caf\u00e9' {SAME_NAME}"),  # NFD
        ({"name": "ali\u200dce"}, 422,
         "name: may not contain invisible or control characters (U+200D)"),
        ({"name": "\u0430lice"}, 422,  # Cyrillic a
         "name: mixes letters of several scripts (CYRILLIC, LATIN): use letters of one script"),
        ({"name": alice["id"]}, 422, "name: may not look like a key id (8 hex digits)"),
        ({"name": alice["uuid"]}, 422, "name: may not look like a uuid (32 hex digits)"),
        ({"name": alice["uuid"].upper()}, 422, "name: may not look like a uuid (32 hex digits)"),
    ]
    query = [
        ("offset=65536", "query.offset: Input should be less than or equal to 65535"),
        ("limit=10001", "query.limit: Input should be less than or equal to 10000"),
        ("limit=\u0665",
         "query.limit: Input should be a valid integer, unable to parse string as an integer"),
    ]
    return [
        *(("PATCH", at_alice, body, 422, detail) for body, detail in patch),
        *(("POST", "/api/keys", body, status, detail) for body, status, detail in create),
        *(("GET", f"{PAGES}?{q}", None, 422, detail) for q, detail in query),
    ]


def test_issue_17_input_attacks_answer_clearly_and_change_nothing(inproc: InProcessDaemon) -> None:
    """Each used to be taken (a 1-byte limit from `true`, 5 GB from "٥GB", alice and Alice as two
    keys, ...) or to break the daemon (a 500 and a state it could not start from again)."""
    alice = inproc.create("alice", data_limit_bytes="10GB")
    inproc.create("caf\u00e9")
    before = memory_snapshot(inproc)
    for method, path, body, status, detail in attacks(alice):
        response = inproc.http.request(method, path, json=body)
        answer = (response.status_code, response.json())
        assert answer == (status, {"detail": detail}), (method, body)
    assert memory_snapshot(inproc) == before
    assert inproc.api("GET", f"/api/keys/{alice['id']}") == inproc.api("GET", "/api/keys/alice")
    assert inproc.api("GET", f"/api/keys/{alice['id']}")["data_limit_bytes"] == 10**10


def test_issue_17_the_bounds_themselves_are_taken(inproc: InProcessDaemon) -> None:
    """The edges are inside: 1 EB as a number and as "1EB", a date before the last day, the
    largest page and offset."""
    key = inproc.create("edge", data_limit_bytes=10**18)
    assert key["data_limit_bytes"] == 10**18
    last = "9998-12-30T00:00:00+00:00"
    body = {"data_limit_bytes": "1EB", "expire_at": last}
    changed = inproc.api("PATCH", "/api/keys/edge", json=body)
    assert (changed["data_limit_bytes"], changed["expire_at"]) == (10**18, last)
    page = inproc.api("GET", f"{PAGES}?limit=10000&offset=65535")
    assert page["ports_traffic"]["total_ports"] == 0


HALF_A_BYTE = "data_limit_bytes: '0.5B' is 0.5 bytes: a size must be a whole number of bytes"
HALF_A_BIT = (
    "speed_limit_bps: '8000.5' is 8000.5 bit/s: a speed must be a whole number of bits per second"
)


def test_issue_23_a_fraction_of_a_byte_is_refused_everywhere(
    inproc: InProcessDaemon, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """"0.5B" was a limit of 0 (rounded down): the key was limited from its creation. Now the
    API, the CLI and the import refuse it; "1.5KiB" is 1,536 bytes and stays fine."""
    inproc.create("alice")
    before = memory_snapshot(inproc)
    for method, path, body, detail in (
        ("POST", "/api/keys", {"name": "bob", "data_limit_bytes": "0.5B"}, HALF_A_BYTE),
        ("PATCH", "/api/keys/alice", {"data_limit_bytes": "0.5B"}, HALF_A_BYTE),
        ("POST", "/api/keys/batch", {"keys": [{"name": "bob", "data_limit_bytes": "0.5B"}]},
         f"keys.0.{HALF_A_BYTE}"),
        ("POST", "/api/keys", {"name": "bob", "speed_limit_bps": "8000.5"}, HALF_A_BIT),
    ):
        answer = inproc.http.request(method, path, json=body)
        assert (answer.status_code, answer.json()) == (422, {"detail": detail}), body
    assert memory_snapshot(inproc) == before
    made = inproc.create("carol", data_limit_bytes="1.5KiB", speed_limit_bps="1.5Mbit")
    assert (made["data_limit_bytes"], made["speed_limit_bps"], made["status"]) == (
        1536, 1_500_000, "active"
    )
    for argv in (["keys", "add", "x", "--limit", "0.5B"], ["keys", "set", "x", "--limit", "0.5"]):
        assert cli.main(["--socket", "/nonexistent/pm.sock", *argv]) == 1
        assert capsys.readouterr().err == (
            f"portmeter: --limit: '{argv[-1]}' is 0.5 bytes: a size must be a whole number of"
            " bytes\n"
        )
    keys = tmp_path / "keys.csv"
    keys.write_text("name,data_limit_bytes\nbob,1.5KiB\ncarl,0.5B\n")
    assert cli.main(["--socket", "/nonexistent/pm.sock", "keys", "import", str(keys)]) == 1
    assert capsys.readouterr().err == (
        f"portmeter: {keys}: line 3: {HALF_A_BYTE}; nothing was created\n"
    )


def test_issue_23_a_409_names_the_key_that_has_the_name(inproc: InProcessDaemon) -> None:
    """The existing key's spelling, not the request's: `alice` asked for, `Alice` exists."""
    inproc.create("Alice")
    before = memory_snapshot(inproc)
    single = inproc.api("POST", "/api/keys", expect=409, json={"name": "alice"})
    assert single["detail"] == f"a key named 'Alice' {SAME_NAME}"
    batched = inproc.api("POST", "/api/keys/batch", expect=409, json={"keys": [{"name": "ALICE"}]})
    assert batched["detail"] == f"keys[0]: a key named 'Alice' {SAME_NAME}; nothing was created"
    assert memory_snapshot(inproc) == before


def test_issue_17_names_saved_before_the_rule_still_load_and_are_found(tmp_path: Path) -> None:
    """A state may hold names the rule now refuses (alice and Alice, a zero-width joiner, an
    id-shaped name): the daemon starts with them, and each is found by its own spelling."""
    with inprocess_daemon(state_dir=tmp_path) as before:
        made = {name: before.create(name) for name in ("first", "second", "third", "fourth")}
    first_id = made["first"]["id"]
    store = StateStore(tmp_path / "state.json")
    state = store.load()
    legacy = {"first": "alice", "second": "Alice", "third": "ali\u200dce", "fourth": first_id}
    for old, new in legacy.items():
        state.keys[made[old]["id"]].name = new
    store.save(state)
    with inprocess_daemon(state_dir=tmp_path) as daemon:
        for old in ("first", "second", "third"):
            found = daemon.api("GET", f"/api/keys/{quote(legacy[old], safe='')}")
            assert found["id"] == made[old]["id"]
        # The id wins, as before.
        assert daemon.api("GET", f"/api/keys/{first_id}")["name"] == "alice"
        assert daemon.http.get("/api/keys/ALICE").status_code == 404  # two keys have that name
        assert daemon.api("PATCH", "/api/keys/Alice", json={"note": "kept"})["note"] == "kept"
        clash = daemon.api("POST", "/api/keys", expect=409, json={"name": "ALICE"})
        assert clash["detail"] == f"a key named 'alice' {SAME_NAME}"
        assert daemon.api("GET", "/api/keys")["total"] == 4


# --- the kernel layer: the CLI and clients over the real socket, the real table ---------------

CLI_FAILURES = [
    (["keys", "add", "bad!name"], "name: may not contain '!'"),
    (["keys", "add", "taken"], "already exists"),
    (["keys", "add", "x", "--port", "abc"], "'abc' is not a number from 1 to 65535"),
    (["keys", "add", "x", "--port", "\u0665"], "'\u0665' is not a number from 1 to 65535"),
    (["keys", "add", "x", "--port", "65536"], "'65536' is not a number from 1 to 65535"),
    (["traffic", "--watch", "--interval", "0"], "'0' is not a number from 0.1 to 3600"),
    (["traffic", "--watch", "--interval", "nan"], "'nan' is not a number from 0.1 to 3600"),
    (["traffic", "--watch", "--count", "-1"], "'-1' is not a number from 0 to 1000000"),
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
    before = real_snapshot(daemon, net)
    for args, words in CLI_FAILURES:
        result = daemon.cli(*args)
        assert result.returncode != 0, args
        assert result.stdout == "", args
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and words in lines[0], (args, result.stderr)
        assert "Traceback" not in result.stderr
    assert real_snapshot(daemon, net) == before


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
    # The group is made by `make setup`.
    assert (stat.st_uid, grp.getgrgid(stat.st_gid).gr_name) == (0, "portmeter")


def test_200_concurrent_creates_then_deletes_never_share_a_port(
    net: Lab, make_daemon: Callable[..., Daemon]
) -> None:
    daemon = make_daemon(size=300)

    def client() -> httpx.Client:
        return httpx.Client(transport=httpx.HTTPTransport(uds=str(daemon.socket)), timeout=60)

    def create(i: int) -> dict[str, Any]:
        with client() as c:
            response = c.post("http://portmeter/api/keys", json={"name": f"c{i}"})
            assert response.status_code == 201, response.text
            return dict(response.json())

    with ThreadPoolExecutor(max_workers=32) as pool:
        keys = list(pool.map(create, range(200)))
    ports = [k["port"] for k in keys]
    assert len(set(ports)) == 200
    assert set(ports) == set(range(daemon.port_range[0], daemon.port_range[0] + 200))
    assert daemon.api("GET", "/api/system/ports/status")["valid"]

    def delete(key: dict[str, Any]) -> int:
        with client() as c:
            return c.delete(f"http://portmeter/api/keys/{key['id']}").status_code

    with ThreadPoolExecutor(max_workers=32) as pool:
        assert set(pool.map(delete, keys)) == {200}
    assert daemon.api("GET", "/api/keys")["total"] == 0
    assert "counter rx_" not in nft_table(daemon, net)


CLI_REFUSALS = [
    (["keys", "add", "x", "--limit", "20000PB"], "--limit: at most 1000000000000000000 bytes"),
    (["keys", "set", "taken", "--limit", str(2**64)], "--limit: at most 1000000000000000000 bytes"),
    (["keys", "set", "taken", "--limit", "\u0665GB"], f"--limit: '\u0665GB' {NOT_A_SIZE}"),
    (["keys", "set", "taken", "--expire", "+99999999d"], f"expire_at: '+99999999d' {DATES}"),
    (["keys", "add", "TAKEN"], f"a key named 'taken' {SAME_NAME}"),
    (["keys", "add", "ta\u200dken"], "name: may not contain invisible or control characters"),
]


def test_issue_17_cli_refuses_the_same_with_one_line_and_exit_1(net: Lab, daemon: Daemon) -> None:
    daemon.create("taken")
    before = real_snapshot(daemon, net)
    for args, words in CLI_REFUSALS:
        result = daemon.cli(*args)
        assert (result.returncode, result.stdout) == (1, ""), (args, result.stderr)
        assert result.stderr.count("\n") == 1 and words in result.stderr, (args, result.stderr)
    assert real_snapshot(daemon, net) == before
