"""One file per key in the directory Xray reads with -confdir (PORTMETER_XRAY_CONFDIR).

Xray (and Debian's v2ray 4.34) started with `-config BASE -confdir DIR` reads BASE, then every
`*.json` in DIR in name order, and appends each file's inbounds (one whose tag was seen before
replaces it). So each key's inbound lives in a file of its own, `DIR/pm-<uuid>.json`: a create
writes one file, a delete removes one, whatever the number of keys. Every other file, and the
base config PORTMETER_XRAY_CONFIG, is the operator's: read to check collisions and drift, never
written (README "One file per key (PORTMETER_XRAY_CONFDIR)").

`ConfDir` is the other `XrayWriter` (writer.py): the service drives it as it drives the one-file
`LiveConfig`, and the model, push and undo logic both share lives in `IncrementalWriter`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from daemon.atomic import (
    LinkRefused,
    NotRegular,
    failure_reason,
    fsync_directory,
    make_dirs,
    open_regular,
    remove_stale_temporaries,
    write_atomic,
)
from daemon.bounds import MAX_XRAY_CONFIG_BYTES
from daemon.xray import render
from daemon.xray.drift import check_config
from daemon.xray.model import (
    Config,
    Reality,
    XrayConfigError,
    XrayKey,
    XrayStorageError,
    inbounds_of,
    is_key_file,
    is_portmeter_inbound,
    key_file_name,
)
from daemon.xray.render import InboundChanges, api_problems
from daemon.xray_io.files import Signature, XrayFiles, serialize
from daemon.xray_io.inbounds import Delta, KeyInbounds, Rendered, rendered_key
from daemon.xray_io.writer import IncrementalWriter, Written

KEY_FILES = r"pm-.*\.json"  # the temporaries of key files, for `remove_stale_temporaries`
FILE_MODE = 0o640
DIR_MODE = 0o750
DURABLE_WRITES = 16  # more key files than this in one push: one os.sync for all of them
# The directory's inode and mtime (a file added, removed or renamed there changes it) and the
# base config's signature: when both are as portmeter left them, its model still holds.
Stamp = tuple[int, int, Signature | None]


def key_file_bytes(inbound: Mapping[str, Any]) -> bytes:
    """A key file: a config holding the key's inbound alone, on one line (JSON's C encoder:
    a tenth of the time of an indented dump, which counts when thousands are written)."""
    try:
        return (json.dumps({"inbounds": [inbound]}, ensure_ascii=False) + "\n").encode()
    except (TypeError, ValueError) as exc:
        raise XrayConfigError(f"the inbound cannot be written as JSON ({exc})") from None


@dataclass(frozen=True, slots=True)
class Scan:
    """The directory as read: the operator's configs merged as Xray merges them (the base
    first, then the directory's other files by name) and portmeter's key files by name, with
    their bytes (None: not readable as a key file)."""

    operator: Config
    where: dict[str, str]  # tag of an operator inbound -> the file it is in
    ours: dict[str, bytes | None]

    def our_inbounds(self, known: Mapping[str, Rendered] | None = None) -> dict[str, Config]:
        """The key inbounds the key files hold, by tag (a file that is no key file: none).
        A file holding the bytes of a `known` rendering (by file name) is not parsed again."""
        found: dict[str, Config] = {}
        for name, data in self.ours.items():
            hit = None if known is None else known.get(name)
            if hit is not None and hit.text == data:
                found[hit.key.tag] = hit.inbound
                continue
            for inbound in _key_inbounds(data):
                found[inbound["tag"]] = inbound
        return found

    def merged(self) -> Config:
        """What Xray reads: the operator's config with the key files' inbounds appended."""
        inbounds = list(inbounds_of(self.operator))
        tags = {_tag(i): n for n, i in enumerate(inbounds) if _tag(i)}
        for tag, inbound in self.our_inbounds().items():
            if tag in tags:
                inbounds[tags[tag]] = inbound
            else:
                inbounds.append(inbound)
        return {**self.operator, "inbounds": inbounds}


class ConfDir(IncrementalWriter[KeyInbounds]):
    """The key files of one directory, written at the cost of what changed.

    After a full pass (the first push, `xray sync`, autosync at start, or whenever the
    directory or the base config changed behind portmeter's back) a model of the key files is
    kept; a push then renders, checks and writes only the keys that changed (KeyInbounds), and
    never reads the directory.
    """

    def __init__(self, files: XrayFiles, directory: Path) -> None:
        super().__init__(files)  # the base config: read, never written here
        self.directory = directory

    def push(
        self,
        keys: Sequence[XrayKey],
        reality: Reality | None,
        base: Mapping[str, Any] | None = None,
    ) -> Written:
        """Write the key files for `keys`; raise XrayError having left every file as it was.
        A migration's `base` is refused: migration works on a single config file."""
        if base is not None:
            raise XrayConfigError(NO_MIGRATION)
        return super().push(keys, reality)

    def stamp(self) -> Stamp | None:
        try:
            info = os.stat(self.directory)
        except OSError:
            return None
        return info.st_ino, info.st_mtime_ns, self.files.signature()

    # --- reading ---------------------------------------------------------------------------

    def read(self) -> Config:
        """The config Xray reads, merged from the base and the directory (drift, status)."""
        return self.scan().merged()

    def _operators(self) -> Config:
        """The operator's configs: the base and every other file of the directory."""
        return self.scan().operator

    def scan(self) -> Scan:
        """Read the base config and every *.json of the directory (XrayConfigError when the
        directory or one of the operator's files cannot be read; a missing one is empty)."""
        if self.directory.is_symlink() or (self.directory.exists() and not self.directory.is_dir()):
            raise XrayConfigError(f"PORTMETER_XRAY_CONFDIR {self.directory} is not a directory")
        names = sorted(self._json_names())
        operator: Config = {}
        where: dict[str, str] = {}
        base = self.files.path
        if base.parent != self.directory:
            _merge(operator, where, self._read_operator(base), str(base))
        ours: dict[str, bytes | None] = {}
        for name in names:
            path = self.directory / name
            if is_key_file(name):
                ours[name] = _read_key_file(path)
            else:
                _merge(operator, where, self._read_operator(path), str(path))
        return Scan(operator, where, ours)

    def _json_names(self) -> list[str]:
        try:
            with os.scandir(self.directory) as entries:
                return [e.name for e in entries if e.name.endswith(".json")]
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise XrayConfigError(f"cannot read {self.directory}: {failure_reason(exc)}") from None

    def _read_operator(self, path: Path) -> Config:
        """An operator's config file, read as Xray reads it; {} when it does not exist."""
        files = XrayFiles(dataclasses.replace(self.opts, config_path=path))
        data = files.read_bytes()
        return {} if data is None else files.parse(data)

    def _make_directory(self) -> None:
        """Before a write: a missing directory is created (0750, the Xray group)."""
        try:
            make_dirs(self.directory, DIR_MODE, self.opts.file_group)
        except OSError as exc:
            raise XrayStorageError(
                f"PORTMETER_XRAY_CONFDIR {self.directory}: {failure_reason(exc)}"
            ) from None

    # --- writing ---------------------------------------------------------------------------

    def _full(
        self, keys: Sequence[XrayKey], reality: Reality | None, base: Mapping[str, Any] | None
    ) -> Written:
        """Read everything, render every key, check the whole, write what differs, remove
        key files of keys that are gone (`base` is None: `push` refuses one)."""
        scan = self.scan()
        self._make_directory()
        by_port = sorted(keys, key=lambda k: k.port)
        render.check_keys_unique(by_port)
        rendered = [rendered_key(key, self.opts, reality, key_file_bytes) for key in by_port]
        merged = self._check(scan, rendered)
        by_name = {key_file_name(r.key.uuid): r for r in rendered}
        wanted = {name: r.text for name, r in by_name.items()}
        old = scan.our_inbounds(by_name)
        writes = [(name, data) for name, data in wanted.items() if scan.ours.get(name) != data]
        if writes and self.files.has_binary():
            self.files.binary_test(serialize(merged))
        restores = self._apply(
            writes,
            [name for name in scan.ours if name not in wanted],
            scan.ours,
        )
        remove_stale_temporaries(self.directory, KEY_FILES)
        kept = inbounds_of(scan.operator)
        self._model = KeyInbounds(kept, rendered, reality, key_file_bytes)
        self._stamp = self.stamp()
        new = {r.key.tag: r.inbound for r in rendered}
        return Written(
            None,
            None,
            InboundChanges.between(old, new),
            lambda: InboundChanges.between(new, old),
            bool(restores),
            restores=tuple(restores),
        )

    def _check(self, scan: Scan, rendered: Sequence[Rendered]) -> Config:
        """The config Xray will read; XrayConfigError for what Xray would refuse or what would
        lose a key, naming the operator's file where one is at fault."""
        for inbound in inbounds_of(scan.operator):
            if is_portmeter_inbound(inbound):
                tag = inbound["tag"]
                raise XrayConfigError(
                    f"{scan.where[tag]} holds portmeter's inbound {tag}; with "
                    f"PORTMETER_XRAY_CONFDIR key inbounds live in {self.directory}/pm-*.json "
                    "only: remove it there"
                )
        keys = [r.key for r in rendered]
        inbounds = [*inbounds_of(scan.operator), *(r.inbound for r in rendered)]
        config = {**scan.operator, "inbounds": inbounds}
        problems = check_config(config, self.opts, keys)
        if self.opts.apply == "api":
            lacking = api_problems(config, self.opts)
            problems += [f"{p} (add it to {self.files.path})" for p in lacking]
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise XrayConfigError(f"refusing to write {self.directory}: {problems[0]}{more}")
        return config

    def _splice(self, model: KeyInbounds, delta: Delta) -> Written:
        """Write the arriving keys' files and remove the leaving keys' (same uuid: rewritten)."""
        arriving = {key_file_name(r.key.uuid): r.text for r in delta.arriving}
        before = {key_file_name(r.key.uuid): r.text for r in delta.leaving}
        for r in delta.arriving:
            self._binary_test(r)
        restores = self._apply(
            [(name, data) for name, data in arriving.items() if before.get(name) != data],
            [name for name in before if name not in arriving],
            before,
        )
        model.swap(delta)
        self._stamp, self._model = self.stamp(), model
        return Written(
            None,
            None,
            delta.changes(),
            delta.reversed().changes,
            bool(restores),
            delta,
            restores=tuple(restores),
        )

    def _binary_test(self, rendered: Rendered) -> None:
        """Have the installed Xray accept the key's file (alone: cross-file checks are ours)."""
        path = self.directory / key_file_name(rendered.key.uuid)
        XrayFiles(dataclasses.replace(self.opts, config_path=path)).binary_test(rendered.text)

    def _apply(
        self,
        writes: Sequence[tuple[str, bytes]],
        removals: Sequence[str],
        before: Mapping[str, bytes | None],
    ) -> list[tuple[Path, bytes | None]]:
        """Write and remove key files; all or nothing (what was done is put back on failure).
        Returns each changed path with its bytes before.

        A batch (the first sync of thousands of keys) is made durable by one `os.sync` instead
        of two fsyncs a file: 10,000 files in about a second instead of eight.
        """
        done: list[tuple[Path, bytes | None]] = []
        durable = len(writes) <= DURABLE_WRITES
        try:
            owner = self._owner()
            for name, data in writes:
                path = self.directory / name
                if before.get(name) is None:
                    _clear(path)
                write_atomic(path, data, FILE_MODE, owner, DIR_MODE, sweep=False, durable=durable)
                done.append((path, before.get(name)))
            for name in removals:
                path = self.directory / name
                path.unlink(missing_ok=True)
                done.append((path, before.get(name)))
            if not durable:
                os.sync()
            elif removals:
                fsync_directory(self.directory)
        except OSError as exc:
            with contextlib.suppress(OSError):
                self._restore(done)
            raise XrayStorageError(
                f"cannot write Xray key files in {self.directory}: {failure_reason(exc)}"
            ) from None
        return done

    def _put_back(self, written: Written) -> None:
        self._restore(written.restores)

    def _restore(self, restores: Sequence[tuple[Path, bytes | None]]) -> None:
        owner = self._owner()
        for path, data in reversed(restores):
            if data is None:
                path.unlink(missing_ok=True)
            else:
                write_atomic(path, data, FILE_MODE, owner, DIR_MODE, sweep=False)
        fsync_directory(self.directory)

    def _owner(self) -> tuple[int, int]:
        """root and the Xray group (PORTMETER_XRAY_GROUP, else the directory's group): a key
        file holds a REALITY private key, so Xray's group reads it and nobody else does."""
        if self.opts.file_group is not None:
            return 0, self.opts.file_group
        return 0, os.stat(self.directory).st_gid


NO_MIGRATION = (
    "migrate works on a single Xray config: unset PORTMETER_XRAY_CONFDIR, migrate, then set it "
    'again (README "One file per key (PORTMETER_XRAY_CONFDIR)")'
)


def _merge(into: Config, where: dict[str, str], config: Mapping[str, Any], source: str) -> None:
    """Merge one operator config into `into` as Xray does: inbounds appended (a tag seen before
    replaced), every other section replaced by the later file's."""
    inbounds = list(inbounds_of(into))
    places = {_tag(i): n for n, i in enumerate(inbounds) if _tag(i)}
    for inbound in inbounds_of(config):
        tag = _tag(inbound)
        if tag in places:
            inbounds[places[tag]] = inbound
        else:
            if tag:
                places[tag] = len(inbounds)
            inbounds.append(inbound)
        if tag:
            where[tag] = source
    into.update({name: value for name, value in config.items() if name != "inbounds"})
    if inbounds or "inbounds" in config or "inbounds" in into:
        into["inbounds"] = inbounds


def _tag(inbound: object) -> str:
    """An inbound's tag ("" when it has none, or is no object)."""
    tag = inbound.get("tag") if isinstance(inbound, Mapping) else None
    return tag if isinstance(tag, str) else ""


def _clear(path: Path) -> None:
    """Unlink what has a key file's name but is no regular file (a link: the link itself)."""
    with contextlib.suppress(FileNotFoundError):
        if not stat.S_ISREG(os.lstat(path).st_mode):
            path.unlink()


def _read_key_file(path: Path) -> bytes | None:
    """A key file's bytes; None when it is not a regular file or too large to be one. A link
    or a FIFO named like a key file is portmeter's to replace, never read through."""
    try:
        with open_regular(path) as handle:
            info = os.fstat(handle.fileno())
            if info.st_size > MAX_XRAY_CONFIG_BYTES:
                return None
            return handle.read()
    except (LinkRefused, NotRegular, IsADirectoryError, FileNotFoundError):
        return None
    except OSError as exc:
        raise XrayConfigError(f"cannot read {path}: {failure_reason(exc)}") from None


def _key_inbounds(data: bytes | None) -> list[Config]:
    """The portmeter inbounds of a key file's bytes (none when they are not a config)."""
    if data is None:
        return []
    try:
        config = json.loads(data)
        return [i for i in inbounds_of(config) if is_portmeter_inbound(i)]
    except (ValueError, XrayConfigError, AttributeError):
        return []
