"""Xray's config file: read, validated, written atomically with backups.

`XrayFiles` is the one file (PORTMETER_XRAY_CONFIG): read as Xray reads it (comments allowed),
checked (`daemon.xray.drift`, then `xray run -test` when Xray is installed), replaced by a rename
with a hard-linked rotated backup, restored, copied before a migration. `read_source` reads a
migration's source file, `serialize` gives the exact bytes written for a config, and
`config_status` what `portmeter xray status` shows of the file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import stat
import subprocess
import tempfile
from collections.abc import Collection, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from daemon.atomic import (
    LinkRefused,
    NotRegular,
    backup_stamp,
    failure_reason,
    open_regular,
    own_dir,
    refuse_link,
    rotate,
    write_atomic,
)
from daemon.bounds import MAX_XRAY_CONFIG_BYTES
from daemon.xray import render
from daemon.xray.drift import check_config
from daemon.xray.model import (
    Config,
    XrayConfigError,
    XrayKey,
    XrayOptions,
    XrayStorageError,
    inbounds_of,
    parse_keys,
)
from daemon.xray.text import ConfigText, read_config_text, too_large
from daemon.xray_io.binary import executable, failure_line, validate_command

# What identifies one version of the live file: inode, size, modification time (ns).
Signature = tuple[int, int, int]


class XrayFiles:
    """Xray's config file: read, validate, write atomically with rotated timestamped backups.

    The live file is only ever replaced by renaming a new file over it, never rewritten in
    place; that is what lets a backup be a hard link to the previous file instead of a copy.
    """

    def __init__(self, opts: XrayOptions) -> None:
        self.opts = opts

    @property
    def path(self) -> Path:
        return self.opts.config_path

    @property
    def backup_dir(self) -> Path:
        return self.path.parent / "backups"

    def read(self) -> Config:
        """The config as a dict; the minimal base when the file does not exist yet."""
        return self.parse(self.read_bytes())

    def parse(self, data: bytes | None) -> Config:
        """The live file's bytes (None: no file) as a config; the minimal base without a file."""
        return self.parse_text(data).config

    def parse_text(self, data: bytes | None) -> ConfigText:
        """`parse`, also telling whether the file has comments (Xray's `//`, `/* */`, `#`)."""
        if data is None:
            return ConfigText(render.minimal_base(), False, str(self.path))
        return read_config_text(data, str(self.path))

    def read_bytes(self) -> bytes | None:
        """The live file's exact bytes (None when it does not exist); keep it to `restore` later."""
        return self.read_signed()[0]

    def read_signed(self) -> tuple[bytes | None, Signature | None]:
        """The live file's bytes and the signature of that very file (None, None: no file). Read
        as `open_regular` reads: never through a symbolic link, never blocking on a FIFO."""
        try:
            with open_regular(self.path) as handle:
                info = os.fstat(handle.fileno())
                if info.st_size > MAX_XRAY_CONFIG_BYTES:
                    raise XrayConfigError(too_large(str(self.path), info.st_size))
                data = handle.read(MAX_XRAY_CONFIG_BYTES + 1)
        except FileNotFoundError:
            return None, None
        except IsADirectoryError:
            raise XrayConfigError(f"{self.path} is a directory, not an Xray config file") from None
        except (NotRegular, LinkRefused) as exc:
            raise XrayConfigError(failure_reason(exc)) from None
        except OSError as exc:
            reason = failure_reason(exc)
            raise XrayConfigError(f"cannot read Xray config {self.path}: {reason}") from None
        if len(data) > MAX_XRAY_CONFIG_BYTES:
            raise XrayConfigError(too_large(str(self.path), len(data)))
        return data, (info.st_ino, info.st_size, info.st_mtime_ns)

    def signature(self) -> Signature | None:
        """Inode, size and mtime of the live file: any write by anyone else changes one of them."""
        try:
            info = self.path.stat()
        except OSError:
            return None
        return info.st_ino, info.st_size, info.st_mtime_ns

    def validate(
        self,
        config: object,
        expected: Collection[XrayKey] | None = None,
        data: bytes | None = None,
    ) -> None:
        """Raise XrayConfigError unless the structure is sound and Xray (if installed) accepts it.

        `data` is the config's serialization when the caller has it already.
        """
        problems = check_config(config, self.opts, expected)
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise XrayConfigError(f"refusing to write {self.path}: {problems[0]}{more}")
        self.binary_test(serialize(config) if data is None else data)  # type: ignore[arg-type]

    def binary_test(self, data: bytes) -> None:
        """Have the installed Xray (`xray run -test`) accept `data`; nothing when none is installed.

        This costs time in proportion to the whole config, even after a one-key change: Xray
        has no way to test part of a config.
        """
        if self.has_binary():
            self._run_binary_test(data)

    def has_binary(self) -> bool:
        """Whether `binary_test` runs Xray (it is installed), so its bytes are worth making."""
        return executable(self.opts.xray_bin)

    def write(
        self, config: Mapping[str, Any], expected: Collection[XrayKey] | None = None
    ) -> Path | None:
        """Validate, back up the current file, then atomically replace it; return the backup path.

        A config equal to the live file is not written (None). A config that fails validation
        never replaces the live file.
        """
        data = serialize(config)
        previous = self.read_bytes()
        if previous == data:
            return None
        self.validate(config, expected, data)
        return self.replace(data, previous)

    def replace(self, data: bytes, previous: bytes | None) -> Path | None:
        """Back up the live file (its bytes: `previous`), then atomically replace it by `data`."""
        self._refuse_link()
        backup = self._backup(previous) if previous is not None else None
        self._replace(data)
        _seal(backup)
        return backup

    def restore(self, previous: bytes | None) -> None:
        """Put back what `read_bytes` returned earlier (None: the file did not exist)."""
        if previous is None:
            self.path.unlink(missing_ok=True)
            return
        self._replace(previous)

    def discard_backup(self, backup: Path | None) -> None:
        """Forget the backup a write made, when that write is being undone."""
        if backup is not None and backup.parent == self.backup_dir:
            backup.unlink(missing_ok=True)

    def keep_copy(self, label: str) -> Path:
        """A labelled copy of the live file (e.g. before a migration); rotation never deletes it."""
        data = self.read_bytes()
        if data is None:
            raise XrayConfigError(f"Xray config {self.path} does not exist; nothing to keep")
        target = self.backup_dir / f"{self.path.stem}.{label}-{backup_stamp()}{self.path.suffix}"
        self._write_backup(target, data)
        return target

    def latest_copy(self, label: str) -> Path | None:
        copies = sorted(self.backup_dir.glob(f"{self.path.stem}.{label}-*{self.path.suffix}"))
        return copies[-1] if copies else None

    def restore_from(self, backup: Path) -> Path | None:
        """Make a backup the live file again, byte for byte; the current file is backed up first."""
        try:
            data = backup.read_bytes()
        except OSError as exc:
            raise XrayConfigError(f"cannot read backup {backup}: {failure_reason(exc)}") from None
        previous = self.read_bytes()
        self._refuse_link()
        saved = self._backup(previous) if previous is not None and previous != data else None
        self._replace(data)
        _seal(saved)
        return saved

    def backups(self) -> list[Path]:
        """The rotated backups, oldest first."""
        return sorted(self.backup_dir.glob(f"{self.path.stem}-[0-9]*{self.path.suffix}"))

    def _backup(self, data: bytes) -> Path | None:
        """Keep the live file, whose bytes are `data`, as the newest rotated backup.

        A hard link, so backing up costs no copy of a config of many megabytes: the file is
        about to be replaced by a rename, which leaves the linked inode with the old bytes, made
        0600 root by `_seal` once it is no longer the live file. The link is made to whatever
        is at the path, never to what a symbolic link points to; anything but a regular file,
        or a failed link (another file system, hard links not allowed), gets a copy of `data`.
        """
        if self.opts.backups <= 0:
            return None
        target = self.backup_dir / f"{self.path.stem}-{backup_stamp()}{self.path.suffix}"
        try:
            own_dir(self.backup_dir)
            os.link(self.path, target, follow_symlinks=False)
            if not stat.S_ISREG(os.lstat(target).st_mode):
                target.unlink()
                raise LinkRefused(self.path)
        except OSError:
            self._write_backup(target, data)
        rotate(self.backups(), self.opts.backups)
        return target

    def _write_backup(self, target: Path, data: bytes) -> None:
        try:
            own_dir(self.backup_dir)
            write_atomic(target, data, mode=0o600)
        except OSError as exc:
            raise XrayStorageError(f"cannot write backup {target}: {failure_reason(exc)}") from None

    def _refuse_link(self) -> None:
        try:
            refuse_link(self.path)
        except LinkRefused as exc:
            raise XrayStorageError(f"cannot write Xray config: {failure_reason(exc)}") from None

    def _mode_and_owner(self) -> tuple[int, tuple[int, int]]:
        """0640 root:PORTMETER_XRAY_GROUP. Without that setting an existing file keeps its
        owner, group and read bits (Xray reads it that way today), a new one is 0640 root:root."""
        if self.opts.file_group is not None:
            return 0o640, (0, self.opts.file_group)
        try:
            info = os.lstat(self.path)
        except FileNotFoundError:
            return 0o640, (0, 0)
        return stat.S_IMODE(info.st_mode) & 0o644, (info.st_uid, info.st_gid)

    def _replace(self, data: bytes) -> None:
        mode, owner = self._mode_and_owner()
        try:
            write_atomic(self.path, data, mode=mode, owner=owner, dir_mode=0o750)
        except OSError as exc:
            raise XrayStorageError(
                f"cannot write Xray config {self.path}: {failure_reason(exc)}"
            ) from None

    def _run_binary_test(self, data: bytes) -> None:
        binary = self.opts.xray_bin
        name = self.path.name if self.path.suffix == ".json" else "config.json"
        with tempfile.TemporaryDirectory(prefix="portmeter-xray-") as tmp:
            candidate = Path(tmp) / name
            candidate.write_bytes(data)
            cwd = self.path.parent if self.path.parent.is_dir() else Path(tmp)
            try:
                done = subprocess.run(
                    validate_command(binary, candidate),
                    capture_output=True,
                    cwd=cwd,
                    timeout=self.opts.command_timeout,
                    stdin=subprocess.DEVNULL,
                    check=False,
                )
            except subprocess.TimeoutExpired:
                raise XrayConfigError(
                    f"{binary} did not finish testing the new config within "
                    f"{self.opts.command_timeout:g}s"
                ) from None
            except OSError as exc:
                raise XrayConfigError(
                    f"cannot run {binary} to test the config: {failure_reason(exc)}"
                ) from None
        if done.returncode != 0:
            reason = failure_line(done.stdout, done.stderr, done.returncode)
            raise XrayConfigError(f"{binary} rejected the new config for {self.path}: {reason}")


def _seal(backup: Path | None) -> None:
    """Make a hard-linked backup 0600 root, now that the live file is another inode. Left alone
    when the inode has other names (the live file after all, or a link the operator made)."""
    if backup is None:
        return
    try:
        fd = os.open(backup, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):  # it stays in the private backup directory anyway
            if os.fstat(fd).st_nlink == 1:
                if os.geteuid() == 0:
                    os.fchown(fd, 0, 0)
                os.fchmod(fd, 0o600)
    finally:
        os.close(fd)


def read_source(opts: XrayOptions, path: Path) -> ConfigText:
    """A migration source at `path`, read as Xray reads it (comments allowed) with the live
    file's size bound. XrayConfigError when it is missing, a directory, a symbolic link or not a
    regular file (checked on the file opened, so nothing can swap it in between); ValueError
    when the system refuses the name (a NUL byte)."""
    files = XrayFiles(dataclasses.replace(opts, config_path=path))
    data = files.read_bytes()
    if data is None:
        raise XrayConfigError(f"{path}: no such file")
    return files.parse_text(data)


def serialize(config: Mapping[str, Any]) -> bytes:
    """The bytes written for a config: stable, indented, UTF-8, ending in a newline."""
    return json_bytes(config, end="\n")


def json_bytes(value: Mapping[str, Any], deeper: str = "", end: str = "") -> bytes:
    """`value` dumped with two spaces a level, every line after the first `deeper` further in,
    then `end`, as UTF-8; XrayConfigError when it is not JSON (or not encodable)."""
    try:
        text = json.dumps(value, indent=2, ensure_ascii=False)
        return ((text.replace("\n", "\n" + deeper) if deeper else text) + end).encode()
    except (TypeError, ValueError) as exc:
        raise XrayConfigError(f"the config cannot be written as JSON ({exc})") from None


def config_status(files: XrayFiles, keys: Collection[XrayKey]) -> dict[str, Any]:
    """What `GET /api/system/xray/config-status` shows, except reachability (see XrayApplier)."""
    opts = files.opts
    status: dict[str, Any] = {
        "path": str(files.path),
        "exists": files.path.exists(),
        "last_write": None,
        "backup_dir": str(files.backup_dir),
        "backup_count": len(files.backups()),
        "inbound_count": 0,
        "portmeter_inbound_count": 0,
        "key_count": len(keys),
        "in_sync": False,
        "apply_mode": opts.apply,
        "security": opts.security,
        "xray_bin": str(opts.xray_bin),
        "xray_bin_found": executable(opts.xray_bin),
        "error": None,
    }
    if status["exists"]:
        mtime = files.path.stat().st_mtime
        status["last_write"] = datetime.fromtimestamp(mtime, UTC).isoformat()
    try:
        status.update(inbound_status(files.read(), keys))
    except XrayConfigError as exc:
        status["error"] = str(exc)
    return status


def inbound_status(config: Mapping[str, Any], keys: Collection[XrayKey]) -> dict[str, Any]:
    """The inbound counts of a status report, and whether the key inbounds are the keys'."""
    present = parse_keys(config)
    return {
        "inbound_count": len(inbounds_of(config)),
        "portmeter_inbound_count": len(present),
        "in_sync": present == {key.uuid: key.port for key in keys},
    }
