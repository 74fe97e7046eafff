"""The journal's native protocol, against a stand-in journald socket (no systemd needed)."""

from __future__ import annotations

import array
import io
import os
import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from daemon.logs import journald


class FakeJournald:
    """A datagram socket that decodes what journald would receive, memfd messages included."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(2)

    def receive(self) -> dict[str, str]:
        fds = array.array("i")
        data, ancillary, _, _ = self.sock.recvmsg(1 << 20, socket.CMSG_SPACE(fds.itemsize))
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
        if fds:
            assert data == b""
            fd = fds[0]
            try:
                data = os.pread(fd, os.fstat(fd).st_size, 0)
            finally:
                os.close(fd)
        return parse(data)

    def close(self) -> None:
        self.sock.close()


def parse(data: bytes) -> dict[str, str]:
    fields: dict[str, str] = {}
    at = 0
    while at < len(data):
        end = data.index(b"\n", at)
        line = data[at:end]
        if b"=" in line:
            name, _, value = line.partition(b"=")
            at = end + 1
        else:  # NAME\n, 64-bit little-endian length, the bytes, \n
            name = line
            (size,) = struct.unpack("<Q", data[end + 1 : end + 9])
            value = data[end + 9 : end + 9 + size]
            assert data[end + 9 + size : end + 10 + size] == b"\n"
            at = end + 10 + size
        fields[name.decode()] = value.decode()
    return fields


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[FakeJournald]:
    fake = FakeJournald(tmp_path / "journal.sock")
    yield fake
    fake.close()


LOGFMT = structlog.processors.LogfmtRenderer(key_order=["level", "event"])


def configured(renderer: object, out: io.StringIO) -> structlog.typing.FilteringBoundLogger:
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.format_exc_info,
            renderer,
        ],
        logger_factory=structlog.PrintLoggerFactory(out),
        cache_logger_on_first_use=False,
    )
    return structlog.get_logger()


@pytest.fixture(autouse=True)
def _reset_structlog() -> Iterator[None]:
    yield
    structlog.reset_defaults()


def test_fields_are_upper_cased_and_message_is_the_logfmt_line(receiver: FakeJournald) -> None:
    out = io.StringIO()
    sender = journald.JournalSender(str(receiver.path))
    log = configured(journald.JournalRenderer(LOGFMT, sender), out)
    log.info("key_created", key_id="k1", name="alice", port=10001, limit=None, enabled=True)
    fields = receiver.receive()
    assert out.getvalue() == ""  # sent, so not printed as well
    assert (
        fields["MESSAGE"]
        == "level=info event=key_created key_id=k1 name=alice port=10001 limit= enabled"
    )
    assert fields["EVENT"] == "key_created" and fields["LEVEL"] == "info"
    assert fields["KEY_ID"] == "k1" and fields["NAME"] == "alice" and fields["PORT"] == "10001"
    assert fields["LIMIT"] == "" and fields["ENABLED"] == "true"
    assert fields["PRIORITY"] == "6" and fields["SYSLOG_IDENTIFIER"] == "portmeter"


@pytest.mark.parametrize(
    ("method", "priority"),
    [("debug", "7"), ("info", "6"), ("warning", "4"), ("error", "3"), ("critical", "2")],
)
def test_priority_follows_the_level(receiver: FakeJournald, method: str, priority: str) -> None:
    log = configured(
        journald.JournalRenderer(LOGFMT, journald.JournalSender(str(receiver.path))), io.StringIO()
    )
    getattr(log, method)("table_missing")
    assert receiver.receive()["PRIORITY"] == priority


def test_multi_line_values_and_odd_names_survive(receiver: FakeJournald) -> None:
    log = configured(
        journald.JournalRenderer(LOGFMT, journald.JournalSender(str(receiver.path))), io.StringIO()
    )
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        log.exception("poll_failed", **{"message": "x", "2fa": 1, "_private": "p", "a-b.c": "d"})
    fields = receiver.receive()
    assert (
        "Traceback" in fields["EXCEPTION"] and "RuntimeError: boom\n" in fields["EXCEPTION"] + "\n"
    )
    assert fields["PRIORITY"] == "3"
    assert fields["PORTMETER_MESSAGE"] == "x"  # MESSAGE stays the whole line
    assert fields["F_2FA"] == "1" and fields["PRIVATE"] == "p" and fields["A_B_C"] == "d"
    assert fields["MESSAGE"].startswith("level=error event=poll_failed")


def test_field_names_are_valid_journal_names() -> None:
    for key in (
        "event",
        "key_id",
        "ÄÖ",
        "",
        "9",
        "x" * 100,
        "_source_realtime_timestamp",
        "syslog_pid",
    ):
        name = journald.field_name(key)
        assert 0 < len(name) <= 64 and name.replace("_", "").isalnum() and name.isascii()
        assert not name.startswith("_") and not name[0].isdigit()
        assert name not in journald.RESERVED


def test_an_event_too_large_for_a_datagram_goes_through_a_memfd(receiver: FakeJournald) -> None:
    big = "x" * 400_000  # above the default datagram size limit
    sender = journald.JournalSender(str(receiver.path))
    log = configured(journald.JournalRenderer(LOGFMT, sender), io.StringIO())
    log.info("big", payload=big)
    fields = receiver.receive()
    assert fields["PAYLOAD"] == big and fields["EVENT"] == "big"


def test_without_a_journal_the_line_is_printed(tmp_path: Path) -> None:
    out = io.StringIO()
    sender = journald.JournalSender(str(tmp_path / "no-such-socket"))
    log = configured(journald.JournalRenderer(LOGFMT, sender), out)
    log.error("table_missing", table="portmeter")
    assert out.getvalue() == "level=error event=table_missing table=portmeter\n"


def test_journal_stream_is_recognised_by_device_and_inode(tmp_path: Path) -> None:
    with open(tmp_path / "stream", "w") as stream:
        status = os.fstat(stream.fileno())
        mine = {"JOURNAL_STREAM": f"{status.st_dev}:{status.st_ino}"}
        assert journald.stream_is_journal(mine, stream)
        assert not journald.stream_is_journal(
            {"JOURNAL_STREAM": f"{status.st_dev}:{status.st_ino + 1}"}, stream
        )
        assert not journald.stream_is_journal({}, stream)
        assert not journald.stream_is_journal({"JOURNAL_STREAM": "garbage"}, stream)
        assert isinstance(journald.renderer(LOGFMT, mine, stream), journald.JournalRenderer)
        assert journald.renderer(LOGFMT, {}, stream) is LOGFMT
    assert not journald.stream_is_journal(mine, io.StringIO())  # no file descriptor
