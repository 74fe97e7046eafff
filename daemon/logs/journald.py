"""Structured events for systemd's journal, sent with the journal's native protocol.

Under systemd, stdout goes to the journal as plain lines: `journalctl -o json` then shows only
MESSAGE. When stdout *is* the journal (systemd sets JOURNAL_STREAM to the device and inode of the
stream it connected, see systemd.exec(5)), the renderer here sends each event as one datagram to
/run/systemd/journal/socket instead (systemd.journal-fields(7), the protocol sd_journal_send(3)
speaks). MESSAGE is the same key=value line as before, so `journalctl -u portmeter` reads as it
did, and every field also becomes a journal field of its own, upper-cased: EVENT=key_created,
KEY_ID=…, PORT=10001, plus PRIORITY from the level, so `journalctl -u portmeter EVENT=table_missing`
and `journalctl -p err` work.

Hand-written for the same reason as sdnotify.py: python-systemd needs a C build. If a datagram
cannot be sent (journald gone, a full queue, a message too large even for a memfd), the event is
printed on stdout as before: no event is lost, it just loses its separate fields.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import socket
import struct
import sys
from collections.abc import Callable, Mapping
from typing import Any, TextIO

import structlog

JOURNAL_SOCKET = "/run/systemd/journal/socket"
IDENTIFIER = "portmeter"

# syslog priorities (journal PRIORITY=) of structlog's level names.
PRIORITIES = {
    "critical": 2,
    "fatal": 2,
    "exception": 3,
    "error": 3,
    "warning": 4,
    "warn": 4,
    "notice": 5,
    "info": 6,
    "debug": 7,
    "notset": 7,
}

# Fields journald or journalctl give a meaning of their own: an event's field of the same name is
# stored with a PORTMETER_ prefix instead (e.g. an event field `message` → PORTMETER_MESSAGE).
RESERVED = frozenset(
    {
        "MESSAGE",
        "MESSAGE_ID",
        "PRIORITY",
        "SYSLOG_IDENTIFIER",
        "SYSLOG_FACILITY",
        "SYSLOG_PID",
        "SYSLOG_TIMESTAMP",
        "SYSLOG_RAW",
        "CODE_FILE",
        "CODE_LINE",
        "CODE_FUNC",
        "ERRNO",
        "INVOCATION_ID",
        "USER_INVOCATION_ID",
        "USER_UNIT",
        "UNIT",
        "DOCUMENTATION",
        "TID",
        "OBJECT_PID",
        "COREDUMP_UNIT",
        "COREDUMP_USER_UNIT",
        "OBJECT_SYSTEMD_UNIT",
    }
)
_NOT_NAME = re.compile(r"[^A-Z0-9_]")
_SEALS = (
    getattr(fcntl, "F_SEAL_SHRINK", 2)
    | getattr(fcntl, "F_SEAL_GROW", 4)
    | getattr(fcntl, "F_SEAL_WRITE", 8)
    | getattr(fcntl, "F_SEAL_SEAL", 1)
)

Renderer = Callable[[Any, str, Any], Any]


def stream_is_journal(environ: Mapping[str, str], stream: TextIO) -> bool:
    """True if `stream` is the journal stream systemd connected (JOURNAL_STREAM=dev:inode)."""
    device, _, inode = environ.get("JOURNAL_STREAM", "").partition(":")
    if not (device.isdigit() and inode.isdigit()):
        return False
    try:
        status = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return (status.st_dev, status.st_ino) == (int(device), int(inode))


def field_name(key: str) -> str:
    """A journal field name for an event key: A–Z, 0–9 and _, no leading _ or digit, ≤ 64."""
    name = _NOT_NAME.sub("_", key.upper()).lstrip("_")
    if not name or name[0].isdigit():
        name = "F_" + name
    if name in RESERVED:
        name = "PORTMETER_" + name
    return name[:64]


def field_value(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def encode(fields: Mapping[str, str]) -> bytes:
    """The native protocol: NAME=value lines; a value holding a newline goes length-prefixed."""
    out = bytearray()
    for name, value in fields.items():
        data = value.encode("utf-8", "replace")
        if b"\n" in data:
            out += name.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
        else:
            out += name.encode() + b"=" + data + b"\n"
    return bytes(out)


def journal_fields(
    event_dict: Mapping[str, Any], message: str, method_name: str, identifier: str = IDENTIFIER
) -> dict[str, str]:
    level = str(event_dict.get("level") or method_name).lower()
    fields = {
        "MESSAGE": message,
        "PRIORITY": str(PRIORITIES.get(level, 6)),
        "SYSLOG_IDENTIFIER": identifier,
    }
    for key, value in event_dict.items():
        name = field_name(str(key))
        if name not in fields:  # first spelling wins when two keys map to one name
            fields[name] = field_value(value)
    return fields


class JournalSender:
    """One datagram per event to journald; a memfd for one too large for a datagram."""

    def __init__(self, path: str = JOURNAL_SOCKET, timeout: float = 2.0) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.sock.settimeout(timeout)  # a stuck journald must not stall the daemon for long

    def send(self, payload: bytes) -> bool:
        try:
            self.sock.sendto(payload, self.path)
            return True
        except OSError as exc:
            if exc.errno not in (errno.EMSGSIZE, errno.ENOBUFS):
                return False
        return self._send_memfd(payload)

    def _send_memfd(self, payload: bytes) -> bool:
        try:
            fd = os.memfd_create("journal-message", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        except (OSError, AttributeError):
            return False
        try:
            os.write(fd, payload)
            fcntl.fcntl(fd, getattr(fcntl, "F_ADD_SEALS", 1033), _SEALS)
            rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", fd))]
            self.sock.sendmsg([], rights, 0, self.path)
            return True
        except OSError:
            return False
        finally:
            os.close(fd)

    def close(self) -> None:
        self.sock.close()


class JournalRenderer:
    """structlog's last processor: the event goes to the journal with its fields.

    `line_renderer` makes MESSAGE (the key=value line). After a send the event is dropped
    (nothing printed); if the journal cannot be reached the line is returned, and the logger
    prints it on stdout as without this renderer.
    """

    def __init__(
        self,
        line_renderer: Renderer,
        sender: JournalSender | None = None,
        identifier: str = IDENTIFIER,
    ) -> None:
        self.line_renderer = line_renderer
        self.sender = sender or JournalSender()
        self.identifier = identifier

    def __call__(self, logger: Any, method_name: str, event_dict: Any) -> Any:
        line = self.line_renderer(logger, method_name, dict(event_dict))
        message = line.decode("utf-8", "replace") if isinstance(line, bytes) else str(line)
        fields = journal_fields(event_dict, message, method_name, self.identifier)
        if self.sender.send(encode(fields)):
            raise structlog.DropEvent
        return line


def renderer(
    line_renderer: Renderer, environ: Mapping[str, str] | None = None, stream: TextIO | None = None
) -> Renderer:
    """JournalRenderer when stdout is systemd's journal stream, else `line_renderer` itself."""
    environ = os.environ if environ is None else environ
    stream = sys.stdout if stream is None else stream
    if stream_is_journal(environ, stream):
        return JournalRenderer(line_renderer)
    return line_renderer
