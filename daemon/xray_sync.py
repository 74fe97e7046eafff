"""Keeping Xray in sync: its config file, the live config in memory, and the running process.

This is the only module that touches Xray's files and processes; what a config should hold is
decided by the pure modules of `daemon.xray`. `XrayFiles` does the file I/O (validated, atomic,
backed up), `read_source` reads a migration's source file, `LiveConfig` writes a set of keys at
the cost of what changed, and `XrayApplier` makes a running Xray pick the change up (restart, or
Xray's API for zero downtime).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import secrets
import stat
import subprocess
import tempfile
import time
import weakref
from bisect import bisect_left
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio

from daemon.allocator import PortRange
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
from daemon.bounds import MAX_XRAY_CONFIG_BYTES, XRAY_API_BATCH
from daemon.xray import render
from daemon.xray.drift import check_config, listens_overlap, security_problems
from daemon.xray.model import (
    ApplyMode,
    Config,
    Reality,
    XrayApplyError,
    XrayConfigError,
    XrayError,
    XrayKey,
    XrayOptions,
    XrayStorageError,
    inbounds_of,
    operator_ports,
    parse_keys,
    port_spans,
    ports_among,
    split_host_port,
    tag_uuid,
    unix_listen,
)
from daemon.xray.render import InboundChanges
from daemon.xray.text import ConfigText, read_config_text, too_large

# What identifies one version of the live file: inode, size, modification time (ns).
Signature = tuple[int, int, int]

# Xray answers RemoveInbound for an unknown tag with common.ErrNoClue.
ABSENT_INBOUND = "not enough information for making a decision"
FAILURE_LINE = re.compile(r"panic:|fail|error|invalid|denied|not found", re.IGNORECASE)
# How `serialize` separates the inbounds: each sits at depth two of the indented dump.
INBOUND_SEPARATOR = b",\n    "


# --- files ---------------------------------------------------------------------------------


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
        return _executable(self.opts.xray_bin)

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
    return _json_bytes(config, end="\n")


def _json_bytes(value: Mapping[str, Any], deeper: str = "", end: str = "") -> bytes:
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
        "xray_bin_found": _executable(opts.xray_bin),
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


# --- the live file, kept in memory ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Rendered:
    """One key's inbound as written: the key, the inbound, and its exact bytes in the file.

    The model of a whole file holds one per key and keeps only the bytes (`parsed` None): the
    inbound, needed only for the few keys a push changes, is parsed again from them, since
    they are its own JSON (`_fragment`). That halves what the model holds."""

    key: XrayKey
    parsed: Config | None
    text: bytes

    @property
    def inbound(self) -> Config:
        return json.loads(self.text) if self.parsed is None else self.parsed


def _rendered(
    key: XrayKey,
    opts: XrayOptions,
    reality: Reality | None,
    text_of: Callable[[Config], bytes],
) -> Rendered:
    inbound = render.render_inbound(key, opts, reality)
    return Rendered(key, inbound, text_of(inbound))


def _by_port(rendered: Iterable[Rendered]) -> list[Rendered]:
    """In the order the files list key inbounds."""
    return sorted(rendered, key=lambda r: r.key.port)


def _fragment(inbound: Mapping[str, Any]) -> bytes:
    """An inbound's bytes inside the written file.

    `serialize` nests every inbound at depth two and JSON strings hold no raw newline, so the
    inbound's own indented dump with four more spaces after each newline is exactly its text
    there, whatever else the file holds.
    """
    return _json_bytes(inbound, deeper="    ")


@dataclass(frozen=True, slots=True)
class Delta:
    """The key inbounds one push takes out of the live file and puts into it."""

    leaving: tuple[Rendered, ...] = ()
    arriving: tuple[Rendered, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.leaving or self.arriving)

    def changes(self) -> InboundChanges:
        """What `inbound_changes(old, new)` gives for the whole files, from the changed keys only
        (each key's inbound carries its tag; the files list them by port)."""
        return InboundChanges.between(
            {r.key.tag: r.inbound for r in _by_port(self.leaving)},
            {r.key.tag: r.inbound for r in _by_port(self.arriving)},
        )

    def reversed(self) -> Delta:
        return Delta(self.arriving, self.leaving)


class KeyInbounds:
    """The key inbounds as written, by port, each with its bytes (`text_of` its inbound), and
    the operator's tags and ports they must not collide with: what finds and checks the change
    a push makes, at the cost of the keys that changed.
    """

    def __init__(
        self,
        kept: Sequence[Any],
        rendered: Sequence[Rendered],
        reality: Reality | None,
        text_of: Callable[[Config], bytes],
        routed: Collection[str] = (),
    ) -> None:
        self.reality, self.text_of = reality, text_of
        self.routed = set(routed)  # the inbound tags routing rules name (render.route_keys)
        self.kept_tags = {
            tag for i in kept if isinstance(i, Mapping) and isinstance(tag := i.get("tag"), str)
        }
        # The operator's ports, each span with the listen address (unix sockets hold none).
        self.kept_spans = [
            (first, last, str(inbound.get("listen") or ""))
            for inbound in kept
            if isinstance(inbound, Mapping) and unix_listen(inbound) is None
            for first, last in port_spans(inbound)
        ]
        self.by_uuid = {r.key.uuid: r for r in rendered}
        # By id() of the XrayKey: the model holds each key, so no other object has its id.
        self.by_object = {id(r.key): r for r in rendered}
        self.ports = [r.key.port for r in rendered]
        self.texts = [r.text for r in rendered]

    def delta(
        self, keys: Sequence[XrayKey], opts: XrayOptions, reality: Reality | None
    ) -> Delta | None:
        """The change from the file's keys to `keys`, its new inbounds rendered and checked.

        None when only a full render can tell: another server key pair, no keys, keys sharing a
        uuid or port, an inbound that cannot be rendered or would be refused. The full path then
        raises the very error it always raised.

        Unchanged keys are the very XrayKey objects of the last push (the bridge caches them),
        so the changed ones are found by comparing sets of object ids, which never touches the
        keys themselves: set operations over a list, not a walk through 10,000 objects.
        """
        if reality != self.reality or not keys:
            return None
        objects = set(map(id, keys))
        if len(objects) != len(keys):
            return None
        arriving = [key for key in keys if id(key) not in self.by_object]
        leaving = []
        if len(self.by_object) != len(keys) - len(arriving):  # some keys of the file are gone
            leaving = [r for i, r in self.by_object.items() if i not in objects]
        freed = {r.key.uuid: r.key.port for r in leaving}
        uuids: set[str] = set()
        ports: set[int] = set()
        for key in arriving:
            if key.uuid in uuids or (key.uuid in self.by_uuid and key.uuid not in freed):
                return None
            if key.port in ports or (self._has_port(key.port) and key.port not in freed.values()):
                return None
            uuids.add(key.uuid)
            ports.add(key.port)
        if self.routed and self._reroutes(arriving, leaving):
            return None
        try:
            rendered = [_rendered(key, opts, reality, self.text_of) for key in arriving]
        except XrayConfigError:
            return None
        if any(self._refused(r, opts) for r in rendered):
            return None
        return Delta(tuple(leaving), tuple(rendered))

    def swap(self, delta: Delta) -> None:
        """Take the delta's leaving inbounds out and put its arriving ones in, by port."""
        for r in delta.leaving:
            at = bisect_left(self.ports, r.key.port)
            del self.ports[at], self.texts[at], self.by_uuid[r.key.uuid], self.by_object[id(r.key)]
        for r in delta.arriving:
            at = bisect_left(self.ports, r.key.port)
            self.ports.insert(at, r.key.port)
            self.texts.insert(at, r.text)
            self.by_uuid[r.key.uuid] = r
            self.by_object[id(r.key)] = r

    def _reroutes(self, arriving: Sequence[XrayKey], leaving: Sequence[Rendered]) -> bool:
        """Whether the change adds a key's tag to the routing rules or takes one out of them
        (render.route_keys): the rules are outside the spliced part, so it takes the full path."""
        staying = {key.tag for key in arriving}
        before = {r.key.tag: r.key.route_sources for r in leaving}  # a changed key: as it was
        return any(r.key.tag in self.routed and r.key.tag not in staying for r in leaving) or any(
            before.get(key.tag) != key.route_sources
            and not self.routed.isdisjoint(key.route_sources)
            for key in arriving
        )

    def _has_port(self, port: int) -> bool:
        at = bisect_left(self.ports, port)
        return at < len(self.ports) and self.ports[at] == port

    def _refused(self, rendered: Rendered, opts: XrayOptions) -> bool:
        """Whether `check_config` would object to this new inbound: its REALITY fields, or a tag
        or port (on an overlapping listen address) that one of the operator's inbounds has."""
        inbound = rendered.inbound
        if inbound["tag"] in self.kept_tags or security_problems(inbound, opts):
            return True
        listen, port = str(inbound.get("listen") or ""), rendered.key.port
        return any(
            a <= port <= b and listens_overlap(listen, other) for a, b, other in self.kept_spans
        )

    def operator_ports(self, port_range: PortRange) -> set[int]:
        """The ports of `port_range` the operator's inbounds listen on (ranges and lists too)."""
        spans = ((a, b) for a, b, _ in self.kept_spans)
        return ports_among(spans, port_range.first, port_range.last)


class _Model(KeyInbounds):
    """The live file as portmeter last wrote it, in pieces a one-key change can splice.

    The operator's part is fixed text around the list of key inbounds (`head`, `tail`); the key
    inbounds are one fragment each, kept in port order. Invariants while a model is in use: the
    file whose signature is `signature` holds exactly `data`, and `check_config` finds nothing
    wrong with it, so a change needs checking only where it can break something.
    """

    def __init__(
        self,
        head: bytes,
        tail: bytes,
        kept: Sequence[Any],
        rendered: Sequence[Rendered],
        reality: Reality | None,
        routed: Collection[str] = (),
    ) -> None:
        super().__init__(kept, rendered, reality, _fragment, routed)
        self.head, self.tail = head, tail
        self.data = self.assemble()
        self.signature: Signature | None = None

    @classmethod
    def build(
        cls,
        config: Config,
        rendered: Sequence[Rendered],
        opts: XrayOptions,
        reality: Reality | None,
    ) -> _Model | None:
        """The model of `config`, rendered from `rendered` (by port), or None where splicing
        would not give what `render_config` gives.

        That is without key inbounds (whether "inbounds" is written at all then depends on the
        file's history), and in api mode with an api tag shaped like a key's (a key inbound
        could then stand in for the API inbound).
        """
        if not rendered:
            return None
        if opts.apply == "api" and tag_uuid(config["api"].get("tag")) is not None:
            return None
        inbounds = config["inbounds"]
        kept = inbounds[: len(inbounds) - len(rendered)]
        marker = f"portmeter-key-inbounds-{secrets.token_hex(16)}"
        data = serialize({**config, "inbounds": [*kept, marker]})
        around = data.split(json.dumps(marker).encode())
        if len(around) != 2:
            return None
        return cls(around[0], around[1], kept, rendered, reality, render.routed_tags(config))

    def assemble(self) -> bytes:
        return b"".join((self.head, INBOUND_SEPARATOR.join(self.texts), self.tail))


@dataclass(frozen=True, slots=True, weakref_slot=True)
class Written:
    """What one `LiveConfig.push` did: the changes for Xray, and what `LiveConfig.undo` needs."""

    previous: bytes | None  # the file's bytes before (None: there was no file)
    backup: Path | None
    changes: InboundChanges
    # The changes that take a running Xray back; computed only when undoing.
    reverse: Callable[[], InboundChanges]
    wrote: bool
    delta: Delta | None = None  # set when the push spliced the model
    comments_dropped: bool = False  # the replaced file had comments (its backup keeps them)


class LiveConfig:
    """Xray's config for a set of keys, written at the cost of what changed, not of all keys.

    Keeps a model of the live file (see `_Model`). A push re-renders only keys whose XrayKey
    changed, checks only what they can break, splices their fragments into the file's bytes and
    replaces the file (with a hard-linked backup). The bytes are always exactly
    `serialize(render_config(live config, keys, ...))`. Whenever the model cannot vouch for
    that (no model yet, the file changed behind our back, a new `base`, anything unusual) the
    push takes the full path: read, render, validate and write everything, as before.
    """

    def __init__(self, files: XrayFiles) -> None:
        self.files = files
        self._model: _Model | None = None
        # The latest push, while its caller may still undo it: kept alive by the caller alone,
        # so the file's previous bytes it holds go once the operation is over.
        self._last: weakref.ref[Written] | None = None

    def stamp(self) -> Signature | None:
        """What changes whenever anyone writes the file (ConfDir.stamp's twin)."""
        return self.files.signature()

    def operator_ports(self, port_range: PortRange) -> set[int]:
        """The ports of `port_range` the operator's inbounds hold: from the model while the
        file is as portmeter left it, else read from the file."""
        model = self._model
        if model is not None and model.signature == self.files.signature():
            return model.operator_ports(port_range)
        return operator_ports(inbounds_of(self.files.read()), port_range.first, port_range.last)

    @property
    def opts(self) -> XrayOptions:
        return self.files.opts

    def push(
        self,
        keys: Sequence[XrayKey],
        reality: Reality | None,
        base: Mapping[str, Any] | None = None,
    ) -> Written:
        """Write the config for `keys` (on `base`, default: the live file); raise XrayError
        having left the live file as it was."""
        model, self._model = self._model, None  # until the file is known to match it again
        if model is not None and base is None and model.signature == self.files.signature():
            delta = model.delta(keys, self.opts, reality)
            if delta is not None:
                return self._latest(self._splice(model, delta))
        return self._latest(self._full(keys, reality, base))

    def _latest(self, written: Written) -> Written:
        self._last = weakref.ref(written)
        return written

    def undo(self, written: Written) -> None:
        """Put back the bytes `written` replaced and drop its backup; Xray is the caller's part.

        After the latest push the model is rolled back too; otherwise it is dropped and the
        next push takes the full path.
        """
        if not written.wrote:
            return
        model, self._model = self._model, None
        self.files.restore(written.previous)
        self.files.discard_backup(written.backup)
        latest = None if self._last is None else self._last()
        if model is not None and written is latest and written.delta is not None:
            model.swap(written.delta.reversed())
            model.data = model.assemble()
            model.signature = self.files.signature()
            self._model = model
        self._last = None

    def _splice(self, model: _Model, delta: Delta) -> Written:
        previous = model.data
        model.swap(delta)
        data = model.assemble() if delta else previous
        if data == previous:  # no key changed, or none in a way its inbound shows (e.g. its id)
            self._model = model
            return Written(previous, None, InboundChanges(), InboundChanges, False)
        try:
            self.files.binary_test(data)
            backup = self.files.replace(data, previous)
        except XrayError:
            model.swap(delta.reversed())  # the live file was not replaced
            self._model = model
            raise
        model.data, model.signature = data, self.files.signature()
        self._model = model
        return Written(previous, backup, delta.changes(), delta.reversed().changes, True, delta)

    def _full(
        self, keys: Sequence[XrayKey], reality: Reality | None, base: Mapping[str, Any] | None
    ) -> Written:
        previous, signature = self.files.read_signed()
        read = self.files.parse_text(previous)
        old = read.config
        by_port = sorted(keys, key=lambda k: k.port)
        render.check_keys_unique(by_port)
        ours = [render.render_inbound(key, self.opts, reality) for key in by_port]
        new = render.with_inbounds(old if base is None else base, ours, self.opts, by_port)
        try:
            rendered = [Rendered(k, None, _fragment(i)) for k, i in zip(by_port, ours, strict=True)]
            model = _Model.build(new, rendered, self.opts, reality)
        except XrayConfigError:
            model = None  # serialize raises the error for the whole config below
        data = serialize(new) if model is None else model.data
        if data == previous:
            if model is not None and not check_config(new, self.opts, keys):
                model.signature = signature
                self._model = model
            # The model's bytes, equal to those read: one copy of the file is kept, not two.
            return Written(data, None, InboundChanges(), InboundChanges, False)
        self.files.validate(new, keys, data)
        backup = self.files.replace(data, previous)
        if model is not None:
            model.signature = self.files.signature()
            self._model = model
        return Written(
            previous,
            backup,
            render.inbound_changes(old, new),
            lambda: render.inbound_changes(new, old),
            True,
            comments_dropped=read.comments,
        )


# --- applying ------------------------------------------------------------------------------


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


@dataclass(frozen=True, slots=True)
class ApplyResult:
    """How a change reached Xray: the mode, how long it took, the commands that ran."""

    mode: ApplyMode
    seconds: float = 0.0
    commands: tuple[tuple[str, ...], ...] = ()


class XrayApplier:
    """Makes the running Xray serve what was written: nothing, a restart, or API calls."""

    def __init__(self, opts: XrayOptions) -> None:
        self.opts = opts

    async def apply(self, changes: InboundChanges, *, force_restart: bool = False) -> ApplyResult:
        """Apply `changes` the configured way; in restart mode only if there are any (or forced).

        Write the file first: a restart reads it, and in api mode it keeps a later restart
        equal to what the API calls did. To undo after a failure, restore the file and apply
        `inbound_changes(new, old)`.
        """
        started = time.perf_counter()
        mode = self.opts.apply
        if mode == "none" or (mode == "restart" and not changes and not force_restart):
            return ApplyResult(mode)
        if mode == "restart":
            await self.restart()
            return ApplyResult(mode, time.perf_counter() - started, (self.opts.restart_command,))
        commands = [
            *await self.remove_inbounds(changes.removed),
            *await self.add_inbounds(changes.added),
        ]
        return ApplyResult(mode, time.perf_counter() - started, tuple(commands))

    async def restart(self) -> float:
        """Run the restart command; return how long it took."""
        if not self.opts.restart_command:
            raise XrayApplyError("no restart command is configured")
        started = time.perf_counter()
        await self._run(list(self.opts.restart_command), "restart command", cwd=Path("/"))
        return time.perf_counter() - started

    async def add_inbounds(self, inbounds: Sequence[Mapping[str, Any]]) -> list[tuple[str, ...]]:
        """Add the inbounds to the running Xray through its API (`xray api adi`), up to
        XRAY_API_BATCH per command: one process per inbound made a batch of 1,000 keys take 12 s.
        Xray stops at the first inbound it refuses and names it; the caller's undo removes the
        ones added before it."""
        self._require_xray_api()
        commands = []
        with tempfile.TemporaryDirectory(prefix="portmeter-adi-") as tmp:
            for first in range(0, len(inbounds), XRAY_API_BATCH):
                chunk = inbounds[first : first + XRAY_API_BATCH]
                paths = [Path(tmp) / f"inbound-{first + n}.json" for n in range(len(chunk))]
                for path, inbound in zip(paths, chunk, strict=True):
                    data = serialize({"inbounds": [inbound]})
                    write_atomic(path, data, sweep=False, durable=False)  # read once, then gone
                command = api_add_command(self.opts, paths)
                tags = ", ".join(str(inbound.get("tag")) for inbound in chunk[:3])
                more = f" and {len(chunk) - 3} more" if len(chunk) > 3 else ""
                await self._run(command, f"adding inbound {tags}{more}", cwd=Path(tmp))
                commands.append(tuple(command))
        return commands

    async def remove_inbounds(self, tags: Sequence[str]) -> list[tuple[str, ...]]:
        """Remove inbounds from the running Xray by tag; one Xray does not have is no error."""
        self._require_xray_api()
        commands = []
        with tempfile.TemporaryDirectory(prefix="portmeter-rmi-") as tmp:
            for tag in tags:
                command = api_remove_command(self.opts, [tag])
                # An empty working directory: rmi reads an argument naming a file as JSON.
                await self._run(command, f"removing inbound {tag}", cwd=Path(tmp), absent_ok=True)
                commands.append(tuple(command))
        return commands

    async def reachable(self, timeout: float = 1.0) -> bool | None:
        """Whether Xray's API port accepts connections (None when apply mode is not api)."""
        if self.opts.apply != "api":
            return None
        host, port = split_host_port(self.opts.api_address)
        try:
            with anyio.fail_after(timeout):
                stream = await anyio.connect_tcp(host, port)
        except (OSError, TimeoutError):
            return False
        await stream.aclose()
        return True

    def _require_xray_api(self) -> None:
        if is_v2ray(self.opts.xray_bin):
            raise XrayApplyError(
                f"apply mode api needs Xray's `xray api adi/rmi`; {self.opts.xray_bin} is v2ray "
                "(use apply mode restart)"
            )

    async def _run(self, command: list[str], what: str, cwd: Path, absent_ok: bool = False) -> None:
        try:
            with anyio.fail_after(self.opts.command_timeout):
                done = await anyio.run_process(
                    command, check=False, cwd=cwd, stdin=subprocess.DEVNULL
                )
        except TimeoutError:
            raise XrayApplyError(
                f"{what}: {command[0]} did not finish within {self.opts.command_timeout:g}s"
            ) from None
        except OSError as exc:
            reason = failure_reason(exc)
            raise XrayApplyError(f"{what}: cannot run {command[0]}: {reason}") from None
        if done.returncode == 0:
            return
        output = (done.stdout or b"") + (done.stderr or b"")
        if absent_ok and ABSENT_INBOUND.encode() in output:
            return
        reason = failure_line(done.stdout, done.stderr, done.returncode)
        if "failed to dial" in reason:
            reason += " (is Xray running with its API enabled? restart it once after enabling)"
        raise XrayApplyError(f"{what} failed (exit {done.returncode}): {reason}")


def _executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)
