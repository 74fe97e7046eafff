"""Keeping Xray in sync: the entry point of Xray's files and process.

The package `daemon/xray_io/` is the only code that touches Xray's files and processes; what a
config should hold is decided by the pure modules of `daemon.xray`. This module names what the
service uses, so it need not know the package's layout:

- `xray_io/files.py`: `XrayFiles`, the config file (read as Xray reads it, validated, written
  atomically with hard-linked rotated backups, restored, copied before a migration);
  `read_source` (a migration's source file), `serialize` (the exact bytes of a config),
  `config_status` and `inbound_status` (what `portmeter xray status` shows).
- `xray_io/writer.py`: `XrayWriter`, the protocol the service drives to put the keys into
  Xray's files, `Written` (what one push did, for its undo), and `IncrementalWriter`, the model,
  push and undo both writers share.
- `xray_io/live.py`: `LiveConfig`, every key in the one config file, spliced at the cost of
  what changed. `xray_io/confdir.py`: `ConfDir`, one file per key in PORTMETER_XRAY_CONFDIR.
  `xray_io/inbounds.py`: the key inbounds as written, kept in memory by both (pure).
- `xray_io/apply.py`: `XrayApplier`, making the running Xray serve what was written (nothing,
  a restart, or `xray api adi/rmi`). `xray_io/binary.py`: the Xray binary's command lines and
  how to read its failures.
"""

from __future__ import annotations

from daemon.xray_io.apply import ApplyResult, XrayApplier
from daemon.xray_io.binary import (
    api_add_command,
    api_remove_command,
    failure_line,
    is_v2ray,
    validate_command,
)
from daemon.xray_io.confdir import NO_MIGRATION, ConfDir, key_file_bytes
from daemon.xray_io.files import XrayFiles, config_status, inbound_status, read_source, serialize
from daemon.xray_io.live import LiveConfig
from daemon.xray_io.writer import Written, XrayWriter

__all__ = [
    "NO_MIGRATION",
    "ApplyResult",
    "ConfDir",
    "LiveConfig",
    "Written",
    "XrayApplier",
    "XrayFiles",
    "XrayWriter",
    "api_add_command",
    "api_remove_command",
    "config_status",
    "failure_line",
    "inbound_status",
    "is_v2ray",
    "key_file_bytes",
    "read_source",
    "serialize",
    "validate_command",
]
