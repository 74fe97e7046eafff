"""Text every store can hold (issue 23): PostgreSQL's `text` cannot hold U+0000 (NUL) and no
UTF-8 store holds a lone surrogate, so every text value of every request body is refused with
422 at the API's edge, on every node, fleet or not, by one rule (`bounds.stored_text`, applied
to every field of every request model by `keyfields.RequestBody`); `portmeter keys import`
applies the same rule to each row and names the line.

In-process for the answers and the file; a fleet node on a real PostgreSQL 15 (the in-process
service with the fleet's keys attached) for the 422 where the database would have refused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import structlog
from fastapi.routing import APIRoute
from hypothesis import given
from hypothesis import strategies as st

from daemon import bounds, cli, keyfile
from daemon.fleet.keys import FleetKeys
from daemon.http.app import create_app, served_app
from daemon.http.keyfields import RequestBody
from daemon.http.schemas import Report, ReportBatch
from tests.fleetrig import ready_fleet_db
from tests.inprocess import InProcessDaemon, started
from tests.pgserver import Database
from tests.test_api_input import memory_snapshot
from tests.test_batch_create import inprocess_client

NUL = "a\x00b"
NUL_REFUSED = "may not contain U+0000 (NUL)"
REPORT = {
    "report_id": "r1",
    "user_token": "someone",
    "server": "other-node",
    "port": 20001,
    "protocol": "tcp",
    "bytes_uploaded": 1,
    "bytes_downloaded": 2,
}

# Every text field of every request body: (method, path, body, the detail's start).
BAD_TEXT: list[tuple[str, str, dict[str, Any], str]] = [
    ("POST", "/api/keys", {"name": "n1", "note": NUL}, "note: "),
    ("POST", "/api/keys", {"name": "n\x00"}, "name: "),
    ("POST", "/api/keys", {"name": "n1", "expire_at": "+30d\x00"}, "expire_at: "),
    ("POST", "/api/keys", {"name": "n1", "data_limit_bytes": "5GB\x00"}, "data_limit_bytes: "),
    ("POST", "/api/keys", {"name": "n1", "speed_limit_bps": "5Mbit\x00"}, "speed_limit_bps: "),
    ("POST", "/api/keys", {"name": "n1", "reset_strategy": "day\x00"}, "reset_strategy: "),
    ("POST", "/api/keys", {"name": "n1", "groups": ["eu", "u\x00s"]}, "groups: "),
    ("PATCH", "/api/keys/held", {"note": NUL}, "note: "),
    (
        "POST",
        "/api/keys/batch",
        {"keys": [{"name": "n1"}, {"name": "n2", "note": NUL}]},
        "keys.1.note: ",
    ),
    ("POST", "/api/traffic/webhook", {**REPORT, "user_token": NUL}, "user_token: "),
    (
        "POST",
        "/api/xpert/traffic-webhook",
        {"reports": [{**REPORT, "server": NUL}]},
        "reports.0.server: ",
    ),
    ("POST", "/api/system/xray/migrate", {"config_path": "/etc/x\x00"}, "config_path: "),
]


@pytest.mark.parametrize(("method", "path", "body", "field"), BAD_TEXT)
def test_a_nul_in_any_text_field_is_422_and_changes_nothing(
    inproc: InProcessDaemon, method: str, path: str, body: dict[str, Any], field: str
) -> None:
    inproc.create("held", note="as it was")
    before = memory_snapshot(inproc)
    detail = inproc.api(method, path, expect=422, json=body)["detail"]
    assert detail == f"{field}{NUL_REFUSED}: no store can hold it"
    assert memory_snapshot(inproc) == before
    assert inproc.api("GET", "/api/keys/held")["note"] == "as it was"


def test_every_request_body_is_checked_by_the_one_rule(inproc: InProcessDaemon) -> None:
    """Every route that takes a body takes a RequestBody, or (the report intake) parses it into
    RequestBodies itself: a route added later cannot skip the rule unnoticed."""
    app = create_app(inproc.service)
    bodies = {
        route.path: route.body_field.field_info.annotation
        for route in app.routes
        if isinstance(route, APIRoute) and route.body_field is not None
    }
    parsed_by_parse_reports = {"/api/traffic/webhook", "/api/xpert/traffic-webhook"}
    assert set(bodies) >= parsed_by_parse_reports
    for path, model in bodies.items():
        if path in parsed_by_parse_reports:
            assert model is Any
        else:
            assert issubclass(model, RequestBody), path
    assert issubclass(Report, RequestBody) and issubclass(ReportBatch, RequestBody)


def test_a_lone_surrogate_is_422_like_a_nul(inproc: InProcessDaemon) -> None:
    """JSON may spell a lone surrogate (`"\\ud800"`), which is no Unicode text: no UTF-8 store
    (the state file, SQLite, PostgreSQL) holds it."""
    inproc.create("held")
    before = memory_snapshot(inproc)
    for path, body in (
        ("/api/keys", b'{"name": "n1", "note": "a\\ud800b"}'),
        ("/api/keys/batch", b'{"keys": [{"name": "n1", "note": "\\udfff"}]}'),
    ):
        inproc.api("POST", path, expect=422, content=body)
    inproc.api("PATCH", "/api/keys/held", expect=422, content=b'{"note": "\\ud83d"}')
    assert memory_snapshot(inproc) == before


def test_other_control_characters_in_a_note_are_kept(inproc: InProcessDaemon) -> None:
    """Only what no store holds is refused: a note is free text (tabs, newlines, emoji)."""
    note = "line one\nline\ttwo \U0001f600"
    assert inproc.create("held", note=note)["note"] == note
    assert inproc.api("GET", "/api/keys/held")["note"] == note


@given(st.text(max_size=40))
def test_stored_text_refuses_exactly_nul_and_lone_surrogates(text: str) -> None:
    unstorable = "\x00" in text or any(0xD800 <= ord(char) <= 0xDFFF for char in text)
    if unstorable:
        with pytest.raises(ValueError, match="no store can hold it"):
            bounds.stored_text(text)
    else:
        assert bounds.stored_text(text) == text
        text.encode("utf-8")  # what SQLite and PostgreSQL are given


# --- portmeter keys import ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "form", "problem"),
    [
        ("name,note\nalice,fine\nbob,a\x00b\n", "csv", f"line 3: note: {NUL_REFUSED}"),
        (
            '{"name": "alice"}\n{"name": "bob", "note": "a\\u0000b"}\n',
            "jsonl",
            f"line 2: note: {NUL_REFUSED}",
        ),
        ('{"name": "alice", "note": "\\ud800"}\n', "jsonl", "line 1: note: may not contain U+D800"),
        ("name,groups\nalice,eu\x00\n", "csv", f"line 2: groups: {NUL_REFUSED}"),
    ],
)
def test_import_refuses_what_no_store_holds_with_its_line(
    text: str, form: keyfile.Format, problem: str
) -> None:
    with pytest.raises(keyfile.KeyFileError) as refusal:
        keyfile.check(keyfile.rows(text.encode().splitlines(keepends=True), form))
    assert str(refusal.value).startswith(problem)


def test_cli_import_of_a_csv_with_a_nul_creates_nothing(
    inproc: InProcessDaemon, tmp_path: Path
) -> None:
    keys = tmp_path / "keys.csv"
    keys.write_bytes(b"name,note\nalice,fine\nbob,a\x00b\n")
    args = cli.build_parser().parse_args(["keys", "import", str(keys)])
    with pytest.raises(cli.CliError) as refusal:
        cli.keys_import(inprocess_client(inproc), args)
    assert str(refusal.value) == (
        f"{keys}: line 3: note: {NUL_REFUSED}: no store can hold it; nothing was created"
    )
    assert inproc.service.key_count() == 0


# --- a fleet node ------------------------------------------------------------------------------


def test_a_fleet_node_answers_422_too_and_the_database_is_untouched(fleet_db: Database) -> None:
    """Before: the fleet write failed in PostgreSQL ("text fields cannot contain NUL"), 503 with
    a hint to use --local. Now the edge refuses it, as on a node without a fleet."""

    async def main() -> list[tuple[int, str]]:
        async with ready_fleet_db(fleet_db.dsn) as db, started(xray=False) as rig:
            rig.service.fleet_keys = FleetKeys(db, rig.service, structlog.get_logger())
            app = served_app(rig.service, rig.service.log)
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://pm") as client:
                made = await client.post("/api/keys", json={"name": "held"})
                assert made.status_code == 201 and made.json()["fleet"] is True, made.text
                answers = [
                    await client.post("/api/keys", json={"name": "n1", "note": NUL}),
                    await client.patch("/api/keys/held", json={"note": NUL}),
                    await client.post(
                        "/api/keys/batch", json={"keys": [{"name": "n2", "note": NUL}]}
                    ),
                ]
            return [(answer.status_code, answer.json()["detail"]) for answer in answers]

    answers = anyio.run(main)
    assert answers == [
        (422, f"note: {NUL_REFUSED}: no store can hold it"),
        (422, f"note: {NUL_REFUSED}: no store can hold it"),
        (422, f"keys.0.note: {NUL_REFUSED}: no store can hold it"),
    ]
    assert fleet_db.sql("SELECT name, note FROM portmeter.keys") == "held|"
