"""structlog set-up: one event per line, key=value fields, on stdout for journald.

Every field of every event passes `escape_controls` before it is rendered, so nothing a client
sends (a request path, a key's note, a report field) can put a terminal escape, a bell, a NUL or
a line break into the log or a journal field. Events that a client can make repeat thousands of
times a second go through `RepeatedEvents`: one line per interval, with a count.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import dataclass, field
from typing import Any

import structlog

from daemon.logs import journald

Processor = Callable[[Any, str, MutableMapping[str, Any]], Any]
Scheduler = Callable[[float, Callable[[], None]], object]

# C0 controls, DEL, C1 controls (NEL included), the Unicode line and paragraph separators, and the
# bidirectional embeddings, overrides and isolates (they reorder what a terminal shows).
_CONTROLS = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
_SHORT = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def escape_text(text: str) -> str:
    r"""`text` with each control character written as Python writes it in a literal (\x1b, \n,
    \u2028): printable, one line, and still telling which byte was there."""
    return _CONTROLS.sub(_escaped, text)


def _escaped(match: re.Match[str]) -> str:
    char = match.group()
    code = ord(char)
    return _SHORT.get(char) or (f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}")


def escape_controls(_: Any, __: str, event_dict: MutableMapping[str, Any]) -> dict[str, Any]:
    """structlog processor: every key and every value that is not a number, a bool or None
    becomes text with its control characters escaped (bytes are decoded first)."""
    return {escape_text(str(key)): _escaped_value(value) for key, value in event_dict.items()}


def _escaped_value(value: object) -> object:
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, bytes | bytearray):
        return escape_text(bytes(value).decode("utf-8", "backslashreplace"))
    return escape_text(str(value))


def processors(renderer: Processor) -> list[Processor]:
    """The chain every event takes; `renderer` last (key=value lines, or the journal)."""
    return [
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
        escape_controls,
        renderer,
    ]


def line_renderer() -> Processor:
    return structlog.processors.LogfmtRenderer(key_order=["timestamp", "level", "event"])


def configure(level: str = "info") -> None:
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)  # journald should see each event at once
    structlog.configure(
        # Under systemd, straight to the journal, each field a journal field of its own
        # (journalctl -u portmeter EVENT=table_missing); otherwise key=value lines on stdout.
        processors=processors(journald.renderer(line_renderer())),
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(sys.stdout),
        cache_logger_on_first_use=False,
    )


def get_logger(**bound: object) -> structlog.typing.FilteringBoundLogger:
    logger: structlog.typing.FilteringBoundLogger = structlog.get_logger(**bound)
    return logger


@dataclass
class _Pending:
    level: int
    count: int = 0
    fields: Mapping[str, object] = field(default_factory=dict)


class RepeatedEvents:
    """Events of one kind are logged at most once per `interval` seconds: the first at once
    (count=1), the rest when the interval ends, as one event with how many there were and the
    fields of the last one. A kind quiet for a whole interval is forgotten.

    `call_later(delay, callback)` is the event loop's timer: every call happens on the loop.
    """

    def __init__(
        self, log: structlog.typing.FilteringBoundLogger, interval: float, call_later: Scheduler
    ) -> None:
        self.log = log
        self.interval = interval
        self.call_later = call_later
        self._pending: dict[tuple[str, str], _Pending] = {}

    def happened(
        self, event: str, kind: str = "", level: int = logging.WARNING, **fields: object
    ) -> None:
        """One more `event` of `kind` (events of one name but different kinds count apart)."""
        key = (event, kind)
        pending = self._pending.get(key)
        if pending is None:
            self.log.log(level, event, count=1, **fields)
            self._open_window(key, level)
            return
        pending.count += 1
        pending.fields = fields

    def flush(self) -> None:
        """Log what is still counted (at shutdown: no count is lost)."""
        for key in list(self._pending):
            self._close_window(key, reopen=False)

    def _open_window(self, key: tuple[str, str], level: int) -> None:
        self._pending[key] = _Pending(level)
        self.call_later(self.interval, lambda: self._close_window(key, reopen=True))

    def _close_window(self, key: tuple[str, str], reopen: bool) -> None:
        pending = self._pending.pop(key, None)
        if pending is None or not pending.count:
            return
        self.log.log(pending.level, key[0], count=pending.count, **pending.fields)
        if reopen:
            self._open_window(key, pending.level)


class RepeatedRecords(logging.Handler):
    """A stdlib logging handler (for uvicorn's and asyncio's loggers) that sends each record to
    `RepeatedEvents` as event `server_message`, one kind per message template: a flood of
    "Invalid HTTP request received." is one line per interval, not one per request."""

    def __init__(self, events: RepeatedEvents, level: int = logging.WARNING) -> None:
        super().__init__(level)
        self.events = events

    def emit(self, record: logging.LogRecord) -> None:
        fields: dict[str, object] = {"logger": record.name, "message": record.getMessage()}
        if record.exc_info and record.exc_info[1] is not None:
            fields["error"] = repr(record.exc_info[1])
        self.events.happened("server_message", str(record.msg), record.levelno, **fields)
