"""Batch create (issue 18): `POST /api/keys/batch` and `portmeter keys import`.

In-process (tests/inprocess.py) for the answers, validation, the clashes and all-or-nothing; the
file parser (daemon/keyfile.py) as pure code; the real daemon in a namespace for a batch whose
ports count real bytes and for the CLI import over the socket.
"""

from __future__ import annotations

import errno
import io
import json
import os
import socket
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from daemon import bounds, cli, keyfile, names
from daemon.allocator import PortRange
from daemon.kernel import NftError
from tests.conftest import Daemon
from tests.inprocess import FIRST_PORT, PORTS, InProcessDaemon, inprocess_daemon
from tests.netlab import Lab
from tests.pgserver import Database
from tests.test_api_input import memory_snapshot, real_snapshot
from tests.test_counting import UDP_OVERHEAD, tcp_transfer, udp_exchange
from tests.test_fleet_keys import fleet, on_every, settings_of

BATCH = "/api/keys/batch"


def batch(*names: str, **fields: Any) -> dict[str, Any]:
    return {"json": {"keys": [{"name": name, **fields} for name in names]}}


def refused(inproc: InProcessDaemon, expect: int, body: dict[str, Any], path: str = BATCH) -> str:
    """The refusal's detail; the keys, the saved bytes and the table are as they were."""
    before = memory_snapshot(inproc)
    detail = inproc.api("POST", path, expect=expect, **body)["detail"]
    assert memory_snapshot(inproc) == before
    return str(detail)


# --- the API, in-process ----------------------------------------------------------------------


def test_a_batch_answers_201_with_every_key_as_a_single_create_does(
    inproc: InProcessDaemon,
) -> None:
    single = inproc.create("single", data_limit_bytes="1GB")
    generation = inproc.service.state.generation
    made = inproc.api("POST", BATCH, expect=201, **batch("a", "b", "c", data_limit_bytes="1GB"))
    keys = made["keys"]
    assert list(made) == ["keys"]
    assert [key["name"] for key in keys] == ["a", "b", "c"]
    assert [key["port"] for key in keys] == [FIRST_PORT + 1, FIRST_PORT + 2, FIRST_PORT + 3]
    assert [list(key) for key in keys] == [list(single)] * 3
    assert {key["data_limit_bytes"] for key in keys} == {10**9}
    assert all(key["link"].startswith("vless://") for key in keys)
    assert inproc.service.state.generation == generation + 1  # one save for the batch
    saved = inproc.saved_state()["keys"]
    assert {saved[key["id"]]["port"] for key in keys} == {key["port"] for key in keys}
    assert set(inproc.kernel.contents()[1]) == {FIRST_PORT + i for i in range(4)}
    listed = inproc.api("GET", "/api/keys")["keys"]
    assert [key["name"] for key in listed] == ["single", "a", "b", "c"]


def test_requested_ports_are_kept_and_the_rest_take_the_lowest_free(
    inproc: InProcessDaemon,
) -> None:
    body = {"json": {"keys": [{"name": "x"}, {"name": "p", "port": FIRST_PORT}, {"name": "y"}]}}
    keys = inproc.api("POST", BATCH, expect=201, **body)["keys"]
    assert [key["port"] for key in keys] == [FIRST_PORT + 1, FIRST_PORT, FIRST_PORT + 2]


def test_ports_bound_by_other_processes_are_skipped(inproc: InProcessDaemon) -> None:
    inproc.rig.host.bound = {FIRST_PORT + 1, FIRST_PORT + 3}
    keys = inproc.api("POST", BATCH, expect=201, **batch("a", "b", "c"))["keys"]
    assert [key["port"] for key in keys] == [FIRST_PORT, FIRST_PORT + 2, FIRST_PORT + 4]


BAD_ITEMS: list[tuple[dict[str, Any], int, str]] = [
    ({"json": {"keys": []}}, 422, "keys: List should have at least 1 item"),
    ({"json": {}}, 422, "keys: Field required"),
    ({"json": {"keys": [{"name": "a"}], "more": 1}}, 422, "more: Extra inputs"),
    ({"json": [{"name": "a"}]}, 422, "body"),
    (batch(*(f"k{i}" for i in range(bounds.MAX_BATCH_KEYS + 1))), 422, "at most 1000 items"),
    (batch("ok", "semi;colon"), 422, "keys.1.name: may not contain ';'"),
    (batch("ok", "x" * 65), 422, "keys.1.name: must be"),
    ({"json": {"keys": [{"name": "a"}, {"name": "b", "colour": "red"}]}}, 422, "keys.1.colour"),
    ({"json": {"keys": [{"name": "a"}, {"name": "b", "port": "1"}]}}, 422, "keys.1.port"),
    ({"json": {"keys": [{"name": "a"}, {"name": "b", "port": 1}]}}, 422, "keys[1]: port 1 is out"),
    (batch("a", "b", expire_at="2001-01-01"), 422, "keys[0]: expire_at: 2001-01-01"),
    (batch("a", "taken"), 409, "keys[1]: a key named 'taken' already exists"),
    (batch("a", "b", "A"), 409, "keys[2]: 'A' has the same name as keys[0]"),
    (batch("ｗｉｄｅ", "wide"), 409, "keys[1]: 'wide' has the same name as keys[0]"),
    ({"content": b'{"keys": [{"name": "a"}'}, 400, "not valid JSON"),
]


@pytest.mark.parametrize(("body", "status", "detail"), BAD_ITEMS)
def test_a_bad_batch_is_refused_naming_the_item_and_changes_nothing(
    inproc: InProcessDaemon, body: dict[str, Any], status: int, detail: str
) -> None:
    inproc.create("taken")
    assert detail in refused(inproc, status, body)


def test_the_same_requested_port_twice_is_a_conflict(inproc: InProcessDaemon) -> None:
    body = {"json": {"keys": [{"name": "a", "port": 20010}, {"name": "b", "port": 20010}]}}
    assert refused(inproc, 409, body) == "keys[1]: port 20010 is already assigned to another key"


def test_a_range_too_small_for_the_batch_creates_nothing(inproc: InProcessDaemon) -> None:
    for name in ("one", "two"):
        inproc.create(name)
    names = [f"k{i}" for i in range(PORTS - 1)]  # one more than the free ports
    detail = refused(inproc, 409, batch(*names))
    assert detail == (
        f"keys[{PORTS - 2}]: no free port in {FIRST_PORT}-{FIRST_PORT + PORTS - 1}: "
        f"{PORTS} held by keys, 0 in use by other processes"
    )
    assert inproc.service.key_count() == 2
    assert inproc.api("POST", BATCH, expect=201, **batch(*names[:-1]))["keys"][-1]["port"] == (
        FIRST_PORT + PORTS - 1
    )


def test_a_kernel_refusal_midway_takes_back_the_keys_installed_before_it(
    inproc: InProcessDaemon,
) -> None:
    """The third key's counters fail after two were installed: all three are gone from the
    kernel, the state and Xray's config, and the next batch gets the same ports."""
    inproc.create("first")
    xray_before = inproc.rig.xray_config.read_bytes()
    inproc.kernel.refuse[("install", FIRST_PORT + 3)] = NftError("netlink: busy", errno.EBUSY)
    detail = refused(inproc, 503, batch("a", "b", "c", "d"))
    assert detail == "nftables refused to install counters: netlink: busy"
    assert inproc.rig.xray_config.read_bytes() == xray_before
    inproc.kernel.refuse.clear()
    keys = inproc.api("POST", BATCH, expect=201, **batch("a", "b", "c", "d"))["keys"]
    assert [key["port"] for key in keys] == [FIRST_PORT + i for i in range(1, 5)]


def test_a_batch_at_its_largest_fits_and_a_larger_body_is_413() -> None:
    with inprocess_daemon(port_range=PortRange(FIRST_PORT, FIRST_PORT + 1099)) as inproc:
        largest_batch_and_beyond(inproc)


def largest_batch_and_beyond(inproc: InProcessDaemon) -> None:
    note = "n" * bounds.MAX_NOTE_CHARS
    names = [f"key-{i}-{'x' * 40}" for i in range(bounds.MAX_BATCH_KEYS)]
    largest = batch(*names, note=note)
    assert len(json.dumps(largest["json"])) > bounds.MAX_BODY_BYTES  # only the batch bound fits
    assert len(inproc.api("POST", BATCH, expect=201, **largest)["keys"]) == 1000
    too_large = {"content": b'{"keys": [' + b" " * bounds.MAX_BATCH_BODY_BYTES + b"]}"}
    assert refused(inproc, 413, too_large) == (
        f"request body larger than {bounds.MAX_BATCH_BODY_BYTES} bytes"
    )
    single = {"json": {"name": "n" + " " * bounds.MAX_BODY_BYTES}}
    assert "larger than 65536" in refused(inproc, 413, single, path="/api/keys")


# --- the file the CLI reads --------------------------------------------------------------------


def read(text: str, form: keyfile.Format) -> list[keyfile.Row]:
    """The file's keys as the import reads them: parsed line by line, then checked."""
    lines = text.encode().splitlines(keepends=True)
    keyfile.check(keyfile.rows(lines, form))
    return list(keyfile.rows(lines, form))


def test_csv_and_json_lines_become_request_bodies_with_their_lines() -> None:
    text = 'name,port,data_limit_bytes,enabled,groups,note\nalice,20001,50GB,false,"eu, us",\n\n'
    text += "bob,,,,,hello\n"
    rows = read(text, keyfile.format_of("keys.csv", text.encode(), None))
    assert [(row.line, row.body) for row in rows] == [
        (
            2,
            {
                "name": "alice",
                "port": 20001,
                "data_limit_bytes": "50GB",
                "enabled": False,
                "groups": ["eu", "us"],
            },
        ),
        (4, {"name": "bob", "note": "hello"}),
    ]
    lines = '{"name": "carol"}\n\n{"name": "dave", "max_ips": 3}\n'
    assert keyfile.format_of("-", lines.encode(), None) == "jsonl"
    assert keyfile.format_of("-", b'\xef\xbb\xbf \n {"name": "x"}', None) == "jsonl"
    rows = read(lines, "jsonl")
    assert [(row.line, row.body) for row in rows] == [
        (1, {"name": "carol"}),
        (3, {"name": "dave", "max_ips": 3}),
    ]


DIGITS = "1" * 5000  # past Python's own limit of 4,300 digits for int()
BAD_FILES: list[tuple[str, keyfile.Format, str]] = [
    ("", "csv", "line 1: the file holds no keys"),
    ("port\n20001\n", "csv", "line 1: the header row must name the columns, `name` among them"),
    ("name,port\na,1\nb,x\n", "csv", "line 3: port: 'x' is not a whole number"),
    ("name,port\na,1\nb,\u0665\n", "csv", "line 3: port: '\u0665' is not a whole number"),
    (f"name,port\na,1\nb,{DIGITS}\n", "csv", "line 3: port: a number of 5000 digits: no field"),
    ("name,port\na,1,2\n", "csv", "line 2: 3 cells, but the header names 2"),
    ("name,enabled\na,maybe\n", "csv", "line 2: enabled: 'maybe' is not true or false"),
    ("name,colour\na,red\n", "csv", "line 2: colour: Extra inputs are not permitted"),
    ("name\na\nA\n", "csv", "line 3: 'A' has the same name as line 2"),
    ("name\nok\nsemi;colon\n", "csv", "line 3: name: may not contain ';'"),
    ('name\n"open\n', "csv", "line 2: not CSV"),
    ('{"name": "a"}\n{"name": \n', "jsonl", "line 2: not JSON"),
    ('{"name": "a"}\n\n["b"]\n', "jsonl", "line 3: each line must be one JSON object"),
    ('{"name": "a", "port": "1"}\n', "jsonl", "line 1: port: must be a whole number"),
    ('{"port": 20001}\n', "jsonl", "line 1: name: Field required"),
    (f'{{"name": "a"}}\n{{"name": "b", "port": {DIGITS}}}\n', "jsonl",
     "line 2: a number of 5000 digits: no field takes more than 20"),
    (f'{{"name": "a", "data_limit_bytes": -{DIGITS}}}\n', "jsonl",
     "line 1: a number of 5000 digits: no field takes more than 20"),
]


@pytest.mark.parametrize(("text", "form", "problem"), BAD_FILES)
def test_a_bad_line_is_named(text: str, form: keyfile.Format, problem: str) -> None:
    with pytest.raises(keyfile.KeyFileError) as refusal:
        read(text, form)
    assert str(refusal.value).startswith(problem)


def test_lines_end_at_a_newline_alone() -> None:
    """A JSON string may hold U+2028, U+2029 and U+0085 (NEL) raw, a CSV cell also a form feed
    or a vertical tab: they are part of their line (str.splitlines() split there, and the line
    was not JSON)."""
    separators = "\u2028\u2029\x85"  # what JSON allows raw in a string, of str.splitlines()'s
    text = f'{{"name": "a", "note": "x{separators}y"}}\r\n{{"name": "b"}}\n'
    rows = read(text, "jsonl")
    assert [(row.line, row.body) for row in rows] == [
        (1, {"name": "a", "note": f"x{separators}y"}),
        (2, {"name": "b"}),
    ]
    in_cells = separators + "\x0c\x0b\x1c"
    csv_text = f'name,note\r\na,"x{in_cells}y"\r\nb,"two\nlines"\nc,\n'
    rows = read(csv_text, "csv")
    assert [(row.line, row.body.get("note")) for row in rows] == [
        (2, f"x{in_cells}y"),
        (3, "two\nlines"),
        (5, None),
    ]


def test_a_line_that_is_not_utf8_is_named() -> None:
    lines = [b'{"name": "a"}\n', b'{"name": "b\xff"}\n']
    with pytest.raises(keyfile.KeyFileError, match=r"^line 2: not UTF-8 text$"):
        keyfile.check(keyfile.rows(lines, "jsonl"))


def test_the_import_holds_no_more_than_the_names_of_a_large_file() -> None:
    """Checking and batching 20,000 keys of 273 bytes each (5.5 MB of CSV) allocate 2.2 MB at
    most: the folded names (to find a name the file holds twice) and one batch. Read as one text
    into a list of rows (before), the same file took 41 MB."""
    note = "n" * 256
    lines = [b"name,note,data_limit_bytes\n"]
    lines += [f"user{i:06},{note},50GB\n".encode() for i in range(20_000)]
    size = sum(map(len, lines))
    tracemalloc.start()
    try:
        assert keyfile.check(keyfile.rows(lines, "csv")) == 20_000
        sent = sum(len(chunk) for chunk in keyfile.batches(keyfile.rows(lines, "csv")))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert sent == 20_000
    assert size > 5_000_000 and peak < 4_000_000, peak


# --- the real daemon ---------------------------------------------------------------------------


def test_a_batch_of_200_keys_counts_real_bytes_on_each_port(
    net: Lab, make_daemon: Callable[..., Daemon]
) -> None:
    daemon = make_daemon(size=250, PORTMETER_POLL_INTERVAL="3600")
    first = daemon.port_range[0]
    keys = daemon.api("POST", BATCH, expect=201, **batch(*(f"user{i:03}" for i in range(200))))
    ports = [key["port"] for key in keys["keys"]]
    assert ports == list(range(first, first + 200))
    table = net.nft("list", "table", "inet", daemon.table).stdout
    assert all(f"rx_{port}" in table and f"tx_{port}" in table for port in ports)
    udp_exchange(net, socket.AF_INET, ports[0], 11, 500, echo=True)
    udp_exchange(net, socket.AF_INET6, ports[199], 7, 300, echo=False)
    tcp_transfer(net, ports[100], 40_000, 0)
    first_key = daemon.traffic("user000")
    wire = 500 + UDP_OVERHEAD[socket.AF_INET]
    assert (first_key["rx_bytes"], first_key["tx_bytes"]) == (11 * wire, 11 * wire)
    last = daemon.traffic("user199")
    assert (last["rx_bytes"], last["rx_packets"], last["tx_bytes"]) == (7 * 348, 7, 0)
    middle = daemon.traffic("user100")
    assert middle["rx_bytes"] > 40_000 and middle["tx_bytes"] > 0
    assert daemon.traffic("user050")["total_bytes"] == 0
    assert len(daemon.saved_state()["keys"]) == 200


def test_cli_import_of_csv_and_json_lines_and_a_bad_file_changes_nothing(
    net: Lab, make_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    daemon = make_daemon(PORTMETER_POLL_INTERVAL="3600")  # no poll rewrites the state meanwhile
    csv_file = tmp_path / "keys.csv"
    csv_file.write_text("name,data_limit_bytes,note\nalice,50GB,first\nbob,,\n")
    done = daemon.cli("keys", "import", str(csv_file))
    assert (done.returncode, done.stderr) == (0, "")
    first = daemon.port_range[0]
    assert done.stdout == f"created 2 keys from {csv_file} (ports {first}-{first + 1})\n"
    lines = tmp_path / "more.jsonl"
    lines.write_text('{"name": "carol", "max_ips": 2}\n{"name": "dave"}\n')
    done = daemon.cli("--json", "keys", "import", str(lines))
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)["keys"]
    assert [(key["name"], key["max_ips"]) for key in answer] == [("carol", 2), ("dave", None)]
    alice = daemon.api("GET", "/api/keys/alice")
    assert (alice["data_limit_bytes"], alice["note"]) == (50 * 10**9, "first")

    before = real_snapshot(daemon, net)
    bad = tmp_path / "bad.csv"
    bad.write_text("name\nerin\nfrank\nfr;ank\n")
    done = daemon.cli("keys", "import", str(bad))
    assert done.returncode == 1
    assert done.stderr.startswith(f"portmeter: {bad}: line 4: name: may not contain ';'")
    assert done.stderr.endswith("; nothing was created\n")
    assert done.stderr.count("\n") == 1
    clash = tmp_path / "clash.jsonl"
    clash.write_text('{"name": "erin"}\n{"name": "Alice"}\n')
    done = daemon.cli("keys", "import", str(clash))
    assert done.returncode == 1
    assert done.stderr.startswith("portmeter: line 2: a key named 'alice' already exists")
    assert done.stderr.endswith(
        "; the batch of lines 1-2 created nothing, 0 keys were created before it\n"
    )
    assert real_snapshot(daemon, net) == before


def test_cli_import_of_more_than_one_batch_says_what_a_refused_later_batch_left(
    tmp_path: Path,
) -> None:
    """1,001 keys are two requests; the second clashes: the first's 1,000 keys stay, the one line
    says so, names the file's line and exits 1 (the CLI over the in-process app)."""
    with inprocess_daemon(port_range=PortRange(FIRST_PORT, FIRST_PORT + 1099)) as inproc:
        inproc.create("taken")
        rows = [f"user{i}" for i in range(bounds.MAX_BATCH_KEYS)] + ["Taken"]
        keys = tmp_path / "keys.csv"
        keys.write_text("name\n" + "\n".join(rows) + "\n")
        args = cli.build_parser().parse_args(["keys", "import", str(keys)])
        with pytest.raises(cli.CliError) as refusal:
            cli.keys_import(inprocess_client(inproc), args)
        assert str(refusal.value) == (
            "line 1002: a key named 'taken' already exists (the same name: "
            f"{names.SAME}); nothing was created; the batch of lines 1002-1002 created nothing, "
            "1000 keys were created before it"
        )
        assert inproc.service.key_count() == 1001


def test_a_fleet_batch_reaches_the_other_node_and_a_refused_one_nowhere(
    fleet_db: Database, workdir: Path
) -> None:
    """One transaction writes the batch: the other node follows every key of it; a batch the
    database refuses (a name only the fleet has) leaves this node and the database as before."""
    with fleet(fleet_db, workdir, count=2) as (a, b):
        names_sent = {f"fleet{i:02}" for i in range(30)}
        made = a.daemon.api("POST", BATCH, expect=201, **batch(*sorted(names_sent)))["keys"]
        assert {key["fleet"] for key in made} == {True}
        on_every([b], lambda node: node.names() == names_sent, "the batch on B", timeout=5)
        assert fleet_db.sql("SELECT count(*) FROM portmeter.keys") == "30"
        fleet_db.sql(
            "INSERT INTO portmeter.keys (id, name, same_name, uuid, sub_token, short_id, enabled,"
            " reset_strategy, note, groups, created_at) VALUES ('other', 'olga', 'olga',"
            " gen_random_uuid(), 'tok', 'ab', true, 'no_reset', '', '{us}', now())"
        )
        before, counters = settings_of(a), a.counters()
        detail = a.daemon.api("POST", BATCH, expect=409, **batch("x1", "x2", "olga"))["detail"]
        assert detail.startswith("keys[2]: a key named 'olga' already exists in the fleet")
        assert detail.endswith("nothing was created")
        assert (settings_of(a), a.counters()) == (before, counters)
        assert fleet_db.sql("SELECT count(*) FROM portmeter.keys") == "31"
        assert b.names() == names_sent


def test_cli_import_reads_stdin(inproc: InProcessDaemon, monkeypatch: pytest.MonkeyPatch) -> None:
    lines = '{"name": "alice", "note": "from stdin"}\n{"name": "bob"}\n'
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(lines.encode())))
    args = cli.build_parser().parse_args(["keys", "import", "-", "--format", "jsonl", "--json"])
    answer, _ = cli.keys_import(inprocess_client(inproc), args)
    assert [(key["name"], key["note"]) for key in answer["keys"]] == [
        ("alice", "from stdin"),
        ("bob", ""),
    ]
    assert inproc.service.key_count() == 2


def test_cli_import_reads_a_pipe_twice(
    inproc: InProcessDaemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The import reads the file twice (check, then send); a pipe is copied aside first."""
    lines = "name,note\nalice,from a pipe\nbob,\n"
    read_end, write_end = os.pipe()
    os.write(write_end, lines.encode())
    os.close(write_end)
    with open(read_end, "rb") as pipe:
        assert not pipe.seekable()
        monkeypatch.setattr("sys.stdin", io.TextIOWrapper(pipe))
        args = cli.build_parser().parse_args(["keys", "import", "-", "--json"])
        answer, _ = cli.keys_import(inprocess_client(inproc), args)
    assert [(key["name"], key["note"]) for key in answer["keys"]] == [
        ("alice", "from a pipe"),
        ("bob", ""),
    ]


def test_cli_import_refuses_thousands_of_digits_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Python's int() refuses a number of more than 4,300 digits with an error of its own: that
    was a traceback; now it is the line's refusal, before the daemon is asked anything."""
    keys = tmp_path / "keys.csv"
    keys.write_text(f"name,max_ips\nalice,1\nbob,{DIGITS}\n")
    code = cli.main(["--socket", "/nonexistent/pm.sock", "keys", "import", str(keys)])
    assert code == 1
    assert capsys.readouterr().err == (
        f"portmeter: {keys}: line 3: max_ips: a number of 5000 digits: no field takes more than"
        " 20; nothing was created\n"
    )


def inprocess_client(inproc: InProcessDaemon) -> cli.Client:
    """The CLI's client of the socket, over the in-process app instead."""
    client = cli.Client.__new__(cli.Client)
    client.socket_path, client._http = "in-process", inproc.http  # type: ignore[assignment]
    return client
