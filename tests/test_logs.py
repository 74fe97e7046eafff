"""Log hygiene in-process: control characters escaped in every field (key=value lines and
journal fields), and repeated events counted instead of logged one by one."""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast
from unittest.mock import ANY

import anyio
import pytest
import structlog
from hypothesis import given
from hypothesis import strategies as st

from daemon import logs
from daemon.logs import journald
from daemon.logs.repeats import RepeatedFailure
from daemon.main import _textfile_writer
from daemon.store.state import StorageError
from tests.inprocess import started
from tests.test_atomic_ops import FailingStore

HOSTILE = "a\x1b[2J\x07\x00\x7f\x85\x9b\u2028\u2029\u202e\t\r\nz"
ESCAPED = r"a\x1b[2J\x07\x00\x7f\x85\x9b\u2028\u2029\u202e\t\r\nz"
CONTROLS = [chr(c) for c in [*range(0x20), *range(0x7F, 0xA0), 0x2028, 0x2029, 0x202A, 0x2066]]


def test_every_control_character_is_escaped() -> None:
    assert logs.escape_text(HOSTILE) == ESCAPED
    plain = "plain café, ünïcode and \\ stay"
    assert logs.escape_text(plain) == plain


@given(st.text(alphabet=st.sampled_from([*CONTROLS, "a", " ", "é", "\\"])))
def test_escaped_text_holds_no_control_character(text: str) -> None:
    escaped = logs.escape_text(text)
    assert not any(char in escaped for char in CONTROLS)
    assert escaped.isprintable()


def test_the_processor_escapes_keys_and_values_of_any_type() -> None:
    event = {"event": "e", HOSTILE: 1, "path": HOSTILE, "raw": HOSTILE.encode(), "list": [HOSTILE]}
    out = logs.escape_controls(None, "info", {**event, "n": 7, "ok": True, "none": None})
    assert out == {
        "event": "e", ESCAPED: 1, "path": ESCAPED, "raw": ESCAPED, "list": str([HOSTILE]),
        "n": 7, "ok": True, "none": None,
    }
    assert not any(char in out["list"] for char in CONTROLS)  # repr() escaped them already


def render(renderer: logs.Processor, **fields: Any) -> Any:
    """One event through the daemon's processor chain, ending in `renderer`."""
    event: Any = {"event": "api_call", **fields}
    for processor in logs.processors(renderer):
        event = processor(None, "info", event)
    return event


def test_a_line_holds_no_control_character() -> None:
    line = render(logs.line_renderer(), path="/a" + HOSTILE, note=HOSTILE)
    assert isinstance(line, str) and "\n" not in line
    assert not any(char in line for char in CONTROLS)
    assert f"path=/a{ESCAPED}" in line


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[socket.socket]:
    """A datagram socket standing in for /run/systemd/journal/socket."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "journal.sock"))
    sock.settimeout(5)
    try:
        yield sock
    finally:
        sock.close()


def test_journal_fields_hold_no_control_character(receiver: socket.socket) -> None:
    sender = journald.JournalSender(path=receiver.getsockname())
    renderer = journald.JournalRenderer(logs.line_renderer(), sender)
    try:
        with pytest.raises(structlog.DropEvent):
            render(renderer, path=HOSTILE, note=HOSTILE)
    finally:
        sender.close()
    datagram = receiver.recv(65536)
    fields = dict(line.split(b"=", 1) for line in datagram.split(b"\n") if line)
    assert fields[b"PATH"].decode() == ESCAPED and fields[b"NOTE"].decode() == ESCAPED
    assert fields[b"EVENT"] == b"api_call"
    assert not any(char.encode() in datagram for char in CONTROLS if char != "\n")


class Timers:
    """The event loop's call_later, run by hand: `elapse()` fires what is due."""

    def __init__(self) -> None:
        self.due: list[Callable[[], None]] = []

    def call_later(self, _: float, callback: Callable[[], None]) -> None:
        self.due.append(callback)

    def elapse(self) -> None:
        due, self.due = self.due, []
        for callback in due:
            callback()


def test_repeated_events_are_one_line_per_interval_with_a_count() -> None:
    timers = Timers()
    with structlog.testing.capture_logs() as captured:
        events = logs.RepeatedEvents(structlog.get_logger(), 10, timers.call_later)
        for number in range(1000):
            events.happened("request_refused", peer=f"10.0.0.{number % 7}", n=number)
        events.happened("request_refused", kind="other", peer="x")
        assert [(e["event"], e["count"]) for e in captured] == [
            ("request_refused", 1), ("request_refused", 1)
        ]
        timers.elapse()  # the interval ends: the 999 others in one line, with the last fields
        assert captured[2] == {
            "event": "request_refused", "count": 999, "peer": "10.0.0.5", "n": 999,
            "log_level": "warning",
        }
        timers.elapse()  # a quiet interval: nothing logged, the kind is forgotten
        events.happened("request_refused", peer="y")
        assert len(captured) == 4 and captured[3]["count"] == 1
        events.happened("request_refused", peer="z")
        events.flush()  # at shutdown the count left is logged
        assert captured[4]["count"] == 1 and captured[4]["peer"] == "z"


def test_uvicorn_records_go_through_the_counter() -> None:
    timers = Timers()
    with structlog.testing.capture_logs() as captured:
        events = logs.RepeatedEvents(structlog.get_logger(), 10, timers.call_later)
        logger = logging.getLogger("test.repeated")
        logger.propagate = False
        logger.addHandler(logs.RepeatedRecords(events))
        try:
            for _ in range(500):
                logger.warning("Invalid HTTP request received.")
            logger.info("below the handler's level")
            timers.elapse()
        finally:
            logger.handlers.clear()
    assert [(e["event"], e["count"], e["message"]) for e in captured] == [
        ("server_message", 1, "Invalid HTTP request received."),
        ("server_message", 499, "Invalid HTTP request received."),
    ]


# --- a failure that repeats at every attempt (issue 23) -------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_repeated_failure_is_one_line_per_interval_with_a_count() -> None:
    clock = Clock()
    with structlog.testing.capture_logs() as captured:
        writes = RepeatedFailure(
            structlog.get_logger(), "state_write_failed", "state_write_recovered", clock=clock
        )
        writes.succeeded()  # nothing failed: nothing to say
        for second in range(0, 150, 10):  # a save every 10 s for 150 s, each failing
            clock.now = 1000.0 + second
            writes.failed(error=f"disk full {second}")
        clock.now = 1155.0
        writes.succeeded()
        writes.succeeded()  # once only
        clock.now = 2000.0
        writes.failed(error="again")  # a new failure: at once
    assert captured == [
        {"event": "state_write_failed", "error": "disk full 0", "log_level": "error"},
        {"event": "state_write_failed", "error": "disk full 60", "repeats": 6,
         "log_level": "error"},
        {"event": "state_write_failed", "error": "disk full 120", "repeats": 6,
         "log_level": "error"},
        {"event": "state_write_recovered", "failures": 15, "seconds": 155.0, "log_level": "info"},
        {"event": "state_write_failed", "error": "again", "log_level": "error"},
    ]


def test_a_level_and_interval_of_ones_own() -> None:
    clock = Clock()
    with structlog.testing.capture_logs() as captured:
        lost = RepeatedFailure(
            structlog.get_logger(), "fleet_keys_listen_lost", "fleet_keys_listen_recovered",
            level=logging.WARNING, interval=5, clock=clock,
        )
        for second in range(12):  # a retry every second
            clock.now = 1000.0 + second
            lost.failed(retry_in=1.0)
        assert lost.failing and lost.failures == 12
        lost.succeeded(channel="portmeter_keys")
    assert [(e["event"], e["log_level"], e.get("repeats")) for e in captured] == [
        ("fleet_keys_listen_lost", "warning", None),
        ("fleet_keys_listen_lost", "warning", 5),
        ("fleet_keys_listen_lost", "warning", 5),
        ("fleet_keys_listen_recovered", "info", None),
    ]
    assert captured[-1] == {
        "event": "fleet_keys_listen_recovered", "failures": 12, "seconds": 11.0,
        "channel": "portmeter_keys", "log_level": "info",
    }
    assert not lost.failing


def test_a_full_disk_at_every_poll_is_logged_once_and_its_end_too() -> None:
    """`state_write_failed` was logged at every poll while the disk was full; now once (then at
    most a line a minute, with a count), and `state_write_recovered` once it works again."""

    async def run() -> list[dict[str, Any]]:
        async with started(store=FailingStore) as rig:
            key = await rig.service.create_key("alice")
            store = cast(FailingStore, rig.store)
            store.refuse = StorageError("cannot write: No space left on device", disk_full=True)
            with structlog.testing.capture_logs() as captured:
                for _ in range(5):
                    rig.kernel.add_traffic(key.port, rx=1000)
                    await rig.service.poll_once()
                store.refuse = None
                rig.kernel.add_traffic(key.port, rx=1000)
                await rig.service.poll_once()
                await rig.service.poll_once()
            return [e for e in captured if e["event"].startswith("state_write")]

    assert anyio.run(run) == [
        {"event": "state_write_failed", "error": "cannot write: No space left on device",
         "log_level": "error"},
        {"event": "state_write_recovered", "failures": 5, "seconds": ANY, "log_level": "info"},
    ]


def test_a_textfile_that_cannot_be_written_is_logged_once_too(tmp_path: Path) -> None:
    """The node_exporter textfile is written after every poll: a directory that is not one
    failed every poll, and said so every poll."""
    directory = tmp_path / "textfile"
    directory.write_text("a file where the directory should be")

    async def run() -> list[tuple[str, object]]:
        async with started() as rig:
            settings = rig.service.settings.model_copy(
                update={"metrics_textfile": directory / "portmeter.prom"}
            )
            write = _textfile_writer(rig.service, settings, rig.service.log)
            assert write is not None
            with structlog.testing.capture_logs() as captured:
                for _ in range(4):
                    await write()
                directory.unlink()
                directory.mkdir()
                await write()
                await write()
            return [(e["event"], e.get("failures")) for e in captured]

    assert anyio.run(run) == [
        ("metrics_textfile_failed", None),
        ("metrics_textfile_recovered", 4),
    ]
    assert (directory / "portmeter.prom").exists()
