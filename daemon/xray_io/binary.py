"""The Xray binary: which kind it is, the command lines portmeter runs, and how to read a failure.

Pure but for `executable` (a stat): building a command runs nothing. `files.py` runs the config
test, `apply.py` the restart and the API calls.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

from daemon.xray.model import XrayOptions

FAILURE_LINE = re.compile(r"panic:|fail|error|invalid|denied|not found", re.IGNORECASE)


def is_v2ray(binary: Path) -> bool:
    """Debian's v2ray 4.x takes `-test -config FILE`; Xray takes `run -test -c FILE`."""
    return binary.name.startswith(("v2ray", "v2ctl"))


def validate_command(binary: Path, config_file: Path) -> list[str]:
    if is_v2ray(binary):
        return [str(binary), "-test", "-config", str(config_file)]
    return [str(binary), "run", "-test", "-c", str(config_file)]


def api_add_command(opts: XrayOptions, inbound_files: Sequence[Path]) -> list[str]:
    """`xray api adi --server=ADDR FILE...`; each file is a config holding "inbounds": [...]."""
    return [
        str(opts.xray_bin),
        "api",
        "adi",
        f"--server={opts.api_address}",
        *map(str, inbound_files),
    ]


def api_remove_command(opts: XrayOptions, tags: Sequence[str]) -> list[str]:
    """`xray api rmi --server=ADDR TAG...` (an argument naming an existing file is read as JSON)."""
    return [str(opts.xray_bin), "api", "rmi", f"--server={opts.api_address}", *tags]


def failure_line(stdout: bytes | None, stderr: bytes | None, returncode: int) -> str:
    """The most telling line of a failed command: the first that names a failure, else the last."""
    texts = [(stream or b"").decode(errors="replace") for stream in (stderr, stdout)]
    for text in texts:
        for line in text.splitlines():
            if FAILURE_LINE.search(line):
                return line.strip()
    for text in texts:
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        if lines:
            return lines[-1]
    return f"exit status {returncode}"


def executable(path: Path) -> bool:
    """Whether `path` is a file this process may run (an installed Xray)."""
    return path.is_file() and os.access(path, os.X_OK)
