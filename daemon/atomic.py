"""Atomic file replacement, shared by every module that owns a file (state, Xray config, outboxes).

Readers see the old or the new content, never a mix: a temporary file beside the target (whose
name never ends in .json, so an Xray reading a directory with -confdir skips it), written,
given its mode and owner, fsynced, renamed over the target, and the directory fsynced.
"""

from __future__ import annotations

import os
from pathlib import Path


def write_atomic(path: Path, data: bytes, mode: int = 0o600, owner: tuple[int, int] | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "wb") as handle:
            if owner is not None and os.geteuid() == 0:
                os.fchown(handle.fileno(), *owner)
            os.fchmod(handle.fileno(), mode)  # a stale temp file keeps its old mode otherwise
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)


def fsync_directory(directory: Path) -> None:
    """Make a file's creation, rename or removal in `directory` survive a power loss."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def failure_reason(exc: BaseException) -> str:
    """What went wrong, in the system's words ("No space left on device"), for one-line errors."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc)
