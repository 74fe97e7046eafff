"""Atomic file replacement, private directories and rotated backups, shared by every module that
owns a file (state, Xray config, outboxes).

Readers see the old or the new content, never a mix: a temporary file beside the target (whose
name never ends in .json, so an Xray reading a directory with -confdir skips it), written,
given its mode and owner, fsynced, renamed over the target, and the directory fsynced.

The rules of README "Faults and their remedies" (Security): a temporary file is created
exclusively under a random name and never through a symbolic link; a target that is a symbolic
link is refused, not written through; modes are set explicitly, so they never depend on the
process umask; a directory portmeter creates gets exactly the mode it asks for.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import stat
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO

CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
BACKUP_STAMP = "%Y%m%dT%H%M%S%fZ"  # UTC to the microsecond: backup names sort as they were made


class LinkRefused(OSError):
    """A path portmeter writes or reads is a symbolic link it did not make (errno ELOOP)."""

    def __init__(self, path: Path) -> None:
        super().__init__(
            errno.ELOOP,
            f"{path} is a symbolic link; portmeter never writes or reads through a link it did not "
            "make (name the real path instead)",
        )

    def __str__(self) -> str:
        return str(self.strerror)


def write_atomic(
    path: Path,
    data: bytes,
    mode: int = 0o600,
    owner: tuple[int, int] | None = None,
    dir_mode: int = 0o700,
    sweep: bool = True,
    durable: bool = True,
) -> None:
    """Replace `path` by a file holding `data`, with exactly `mode` (and `owner` when root).

    A missing directory is created with `dir_mode` (and the owner's group). Raises OSError,
    LinkRefused when `path` is a symbolic link. `sweep=False` skips looking for temporaries a
    crash left, which reads the whole directory: for a directory of thousands of files whose
    owner sweeps them itself (`remove_stale_temporaries`). `durable=False` skips the fsyncs:
    for a batch of thousands of files made durable at once afterwards (`os.sync`).
    """
    make_dirs(path.parent, dir_mode, None if owner is None else owner[1])
    refuse_link(path)
    if sweep:
        remove_stale_temporaries(path.parent, re.escape(path.name))
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, CREATE_FLAGS, 0o600)
    try:
        with os.fdopen(fd, "wb") as handle:
            if owner is not None and os.geteuid() == 0:
                os.fchown(handle.fileno(), *owner)
            os.fchmod(handle.fileno(), mode)
            handle.write(data)
            handle.flush()
            if durable:
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_directory(path.parent)


def remove_stale_temporaries(directory: Path, name: str) -> None:
    """Temporary files a crash left in `directory` (or the fixed name older versions used) of
    the files whose names match `name`, a regular expression.

    Unlinking removes a planted link itself, never what it points to.
    """
    shape = re.compile(rf"\.({name})(\.[0-9a-f]{{16}})?\.tmp")
    with os.scandir(directory) as entries:
        stale = [entry.name for entry in entries if shape.fullmatch(entry.name)]
    for found in stale:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(directory / found)


def backup_stamp() -> str:
    """Now, as a backup's name carries it (BACKUP_STAMP)."""
    return datetime.now(UTC).strftime(BACKUP_STAMP)


def rotate(copies: Sequence[Path], keep: int) -> None:
    """Delete all but the newest `keep` (at least 1) of `copies`, which are sorted oldest first."""
    for old in copies[:-keep]:
        old.unlink(missing_ok=True)


def make_dirs(path: Path, mode: int = 0o700, gid: int | None = None) -> None:
    """Create `path` and its missing parents, each with exactly `mode` (and group `gid` when
    root), whatever the umask. Directories that exist are the operator's: left as they are."""
    missing = []
    probe = path
    while not os.path.lexists(probe):
        missing.append(probe)
        probe = probe.parent
    for directory in reversed(missing):
        try:
            os.mkdir(directory, 0o700)
        except FileExistsError:
            continue  # made meanwhile by someone else: theirs
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            if gid is not None and os.geteuid() == 0:
                os.fchown(fd, -1, gid)
            os.fchmod(fd, mode)
        finally:
            os.close(fd)


def own_dir(path: Path, mode: int = 0o700, gid: int | None = None) -> None:
    """A directory portmeter names itself (backups/, outbox/, reports/): created as `make_dirs`
    does; a symbolic link (or anything but a directory) there is refused."""
    make_dirs(path, mode, gid)
    refuse_link(path)
    if not path.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, f"{path} is not a directory", str(path))


def refuse_link(path: Path) -> None:
    """Raise LinkRefused if `path` is a symbolic link."""
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISLNK(os.lstat(path).st_mode):
            raise LinkRefused(path)


class NotRegular(OSError):
    """A path portmeter reads is a FIFO, a device or a socket (errno EINVAL)."""

    def __init__(self, path: Path) -> None:
        super().__init__(errno.EINVAL, f"{path} is not a regular file", str(path))


@contextlib.contextmanager
def open_regular(path: Path) -> Iterator[BinaryIO]:
    """`path` open for reading if it is a regular file: never through a symbolic link
    (LinkRefused), never blocking on a FIFO (NotRegular); IsADirectoryError for a directory."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise LinkRefused(path) from None
        raise
    with os.fdopen(fd, "rb") as handle:
        mode = os.fstat(handle.fileno()).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(errno.EISDIR, f"{path} is a directory", str(path))
        if not stat.S_ISREG(mode):
            raise NotRegular(path)
        yield handle


def read_regular(path: Path) -> bytes:
    """The bytes of `path`, which must be a regular file, never read through a symbolic link."""
    with open_regular(path) as handle:
        return handle.read()


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


def disk_full(exc: BaseException) -> bool:
    """The file system is full or the quota used up: the one failure that answers 507."""
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)
