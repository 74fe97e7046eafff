"""structlog set-up: one event per line, key=value fields, on stdout for journald."""

from __future__ import annotations

import logging
import sys

import structlog

from daemon import journal


def configure(level: str = "info") -> None:
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)  # journald should see each event at once
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            # Under systemd, straight to the journal, each field a journal field of its own
            # (journalctl -u portmeter EVENT=table_missing); otherwise key=value lines on stdout.
            journal.renderer(structlog.processors.LogfmtRenderer(key_order=["timestamp", "level", "event"])),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(sys.stdout),
        cache_logger_on_first_use=False,
    )


def get_logger(**bound: object) -> structlog.typing.FilteringBoundLogger:
    return structlog.get_logger(**bound)
