"""The service's Xray side: which keys Xray must serve, and how a change reaches it.

All Xray file and process work happens in daemon/xray_io/ (entry point daemon/xray_sync.py), in
a worker thread where it blocks; this module turns state records into XrayKeys, packages
"write, apply, and how to undo it", and remembers which keys changed since the last push (the
ledger's marks reach it through `follow`), so a push after one key operation looks at that key
alone.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import secrets
import shlex
import socket
import uuid
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import structlog

from daemon.allocator import PortRange
from daemon.errors import Invalid, NotFound, OperationError, StorageFull, XrayRefused
from daemon.limits import Status
from daemon.settings import Settings
from daemon.store.state import KeyRecord, State, now
from daemon.xray.drift import DriftProblem, drift_report
from daemon.xray.links import vless_link
from daemon.xray.migration import MigrationMove, MigrationPlan, plan_migration, replaced_parts
from daemon.xray.model import (
    Reality,
    XrayError,
    XrayKey,
    XrayOptions,
    XrayStorageError,
)
from daemon.xray.reality import generate_reality, new_short_id, reality_from_private
from daemon.xray.render import inbound_changes
from daemon.xray.text import ConfigText
from daemon.xray_sync import (
    NO_MIGRATION,
    ConfDir,
    LiveConfig,
    XrayApplier,
    XrayFiles,
    XrayWriter,
    config_status,
    inbound_status,
    read_source,
)

Undo = Callable[[], Awaitable[None]]
MIGRATION_LABEL = "pre-migration"
DRIFT_LINES = 20  # drift problems logged one by one at start; the rest as a count


@dataclass(frozen=True, slots=True)
class Pushed:
    """A change Xray took: how to take it back, and what happened."""

    undo: Undo
    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    apply_seconds: float = 0.0
    backup: str | None = None


@dataclass(frozen=True, slots=True)
class Restored:
    """The pre-migration copy now live, and how to put back the config it replaced."""

    copy: Path
    undo: Undo


@functools.lru_cache(maxsize=1024)
def _reality(private_key: str) -> Reality:
    """Deriving the public half is an X25519 operation: once per key pair, not once per link."""
    return reality_from_private(private_key)


class XraySide:
    """Xray's view of the keys: the inbounds they need, pushed and applied, and the marks of
    which keys changed since the last push."""

    def __init__(self, settings: Settings, log: structlog.typing.FilteringBoundLogger) -> None:
        assert settings.xray_config is not None
        self.settings = settings
        self.log = log
        host = settings.public_host or socket.getfqdn()
        self.options = XrayOptions(
            config_path=settings.xray_config,
            xray_bin=settings.xray_bin,
            apply=settings.xray_apply,
            restart_command=tuple(shlex.split(settings.xray_restart_command)),
            api_address=settings.xray_api_address,
            backups=settings.xray_backups,
            reality_dest=settings.reality_dest,
            reality_server_names=settings.reality_server_names,
            flow=settings.xray_flow,
            security=settings.xray_security,
            public_host=host,
            file_group=settings.xray_gid,
        )
        self.files = XrayFiles(self.options)
        directory = settings.xray_confdir
        # With a confdir, one file per key there (README "One file per key"); else one file.
        self.confdir = None if directory is None else ConfDir(self.files, directory)
        self.live: XrayWriter = self.confdir or LiveConfig(self.files)
        self.applier = XrayApplier(self.options)
        # key id -> (the record's fields an XrayKey is made of, that XrayKey); see `served`.
        self._xray_keys: dict[str, tuple[tuple[Any, ...], XrayKey]] = {}
        self._served: dict[str, XrayKey] | None = None  # by key id, as the last call found them
        # Ids of keys changed since the last push (None: not known, look at every key).
        self.stale: set[str] | None = None
        self.statuses_moved = False  # a key's status changed since the last push
        self._last_drift: tuple[tuple[Any, ...], list[XrayKey], list[DriftProblem]] | None = None

    def follow(self, key_id: str, status: bool) -> None:
        """A key changed (or went), its status too if `status`: the next push looks at it."""
        if self.stale is not None:
            self.stale.add(key_id)
        self.statuses_moved = self.statuses_moved or status

    # --- keys ----------------------------------------------------------------------------

    def prepare(self, state: State, key: KeyRecord) -> bool:
        """Give a new key its REALITY short id, subscription token (and key pair if per key);
        True if the key lacked any of them (it changed and must be saved)."""
        lacking = not key.short_id or not key.sub_token
        if not key.short_id:
            key.short_id = new_short_id()
        if not key.sub_token:
            key.sub_token = secrets.token_urlsafe(24)
        if self.settings.reality_keys == "key" and key.reality_private_key is None:
            key.reality_private_key = generate_reality().private_key
            lacking = True
        self.server_reality(state)
        return lacking

    def server_reality(self, state: State) -> Reality:
        if state.reality_private_key is None:
            state.reality_private_key = generate_reality().private_key
        return _reality(state.reality_private_key)

    def xray_key(self, key: KeyRecord) -> XrayKey:
        pair = None if key.reality_private_key is None else _reality(key.reality_private_key)
        inbound = key.xray_inbound
        return XrayKey(
            id=key.id,
            name=key.name,
            uuid=str(key.uuid),
            port=key.port,
            short_id=key.short_id,
            reality=pair,
            flow=key.flow,
            extra_short_ids=tuple(key.extra_short_ids),
            template="" if inbound is None else json.dumps(inbound, ensure_ascii=False),
            route_sources=(*_migrated_from(inbound), *key.route_sources),
        )

    def served(self, state: State, changed: Collection[str] | None = None) -> list[XrayKey]:
        """The keys Xray must have an inbound for.

        Every push needs this for all keys, and building an XrayKey parses and checks its uuid
        and short ids (170 ms for 10,000 keys). So each XrayKey is kept by key id and built
        again only when a field it is made of changed; an unchanged key then is the very same
        object, which is how LiveConfig finds the changed keys quickly. When the caller knows
        which keys `changed` since the last push, the last ones are patched: only those keys
        are looked at (a status change marks a key changed too).
        """
        served, self._served = self._served, None  # kept again only once patched whole
        if changed is not None and served is not None:
            for key_id in changed:
                served.pop(key_id, None)
                key = state.keys.get(key_id)
                if key is not None and self._serves(key):
                    served[key_id] = self._cached_key(key)
        else:
            keys = state.keys.values()
            served = {key.id: self._cached_key(key) for key in keys if self._serves(key)}
        known = self._xray_keys
        if len(known) > 2 * len(state.keys):  # forget deleted keys now and then, not every time
            self._xray_keys = {key_id: known[key_id] for key_id in state.keys if key_id in known}
        self._served = served
        return list(served.values())

    def _serves(self, key: KeyRecord) -> bool:
        return key.status is Status.ACTIVE or not self.settings.xray_remove_inactive

    def _cached_key(self, key: KeyRecord) -> XrayKey:
        fields = (
            key.name,
            key.uuid,
            key.port,
            key.short_id,
            key.reality_private_key,
            key.flow,
            key.xray_inbound,
            key.route_sources,
            key.extra_short_ids,
        )
        hit = self._xray_keys.get(key.id)
        if hit is None or hit[0] != fields:
            # A copy of the list: the record's own list may be changed in place.
            kept = (*fields[:-1], list(key.extra_short_ids))
            hit = self._xray_keys[key.id] = (kept, self.xray_key(key))
        return hit[1]

    async def operator_ports(self, port_range: PortRange) -> set[int]:
        """The ports of `port_range` the operator's inbounds hold (ranges and lists too, in the
        confdir's files as well), which no key may take. Unreadable config: none (the write
        that follows says what is wrong)."""
        try:
            return await anyio.to_thread.run_sync(self.live.operator_ports, port_range)
        except XrayError:
            return set()

    def link(self, state: State, key: KeyRecord) -> str:
        return vless_link(self.xray_key(key), self.options, self.server_reality(state))

    # --- pushing changes -----------------------------------------------------------------

    async def push(
        self,
        state: State,
        *,
        force_restart: bool = False,
        base: dict[str, Any] | None = None,
        changed: Collection[str] | None = None,
    ) -> Pushed:
        """Write the config for the current keys (on `base`, default: the live file) and apply it;
        raises XrayRefused or StorageFull having restored the previous file.

        After one key operation this costs about the atomic write of the file: LiveConfig
        splices the changed keys' inbounds into the bytes it wrote last time. `changed`: the ids
        of the keys changed since the last push, when the caller knows them.
        """
        keys = self.served(state, changed)
        reality = self.server_reality(state)
        try:
            written = await anyio.to_thread.run_sync(self.live.push, keys, reality, base)
        except XrayStorageError as exc:
            raise StorageFull(f"{exc}; nothing was changed") from None
        except (XrayError, ValueError) as exc:
            raise XrayRefused(str(exc)) from None
        changes, backup = written.changes, written.backup
        if written.comments_dropped:
            self.log.warning("xray_comments_dropped", path=str(self.files.path), backup=str(backup))

        async def undo() -> None:
            await anyio.to_thread.run_sync(self.live.undo, written)
            with contextlib.suppress(XrayError):
                await self.applier.apply(written.reverse())

        try:
            result = await self.applier.apply(changes, force_restart=force_restart)
        except XrayError as exc:
            await undo()
            raise XrayRefused(f"{exc}; the previous Xray config was restored") from None
        if changes or result.seconds:
            self.log.info(
                "xray_applied",
                mode=result.mode,
                seconds=round(result.seconds, 3),
                added=len(changes.added),
                removed=len(changes.removed),
            )
        return Pushed(
            undo=undo,
            added=tuple(str(i.get("tag")) for i in changes.added),
            removed=tuple(changes.removed),
            apply_seconds=result.seconds,
            backup=None if backup is None else str(backup),
        )

    async def push_changes(self, state: State, **options: Any) -> Pushed:
        """`push`, looking only at the keys marked stale since the last push."""
        pushed = await self.push(state, changed=self.stale, **options)
        self.stale, self.statuses_moved = set(), False
        return pushed

    async def take_back(self, pushed: Pushed) -> None:
        """Undo a push; what Xray has then is the file before it, so the next push looks at
        every key."""
        self.stale = None
        await pushed.undo()

    async def sync(self, state: State, force_restart: bool = False) -> Pushed:
        """Render the config from every key and apply it (repairs drift)."""
        self.stale = None
        return await self.push_changes(state, force_restart=force_restart)

    async def follow_statuses(self, state: State) -> None:
        """With PORTMETER_XRAY_REMOVE_INACTIVE, keep Xray's inbounds in step with statuses; a
        failure is logged and tried again after the next poll."""
        if not self.settings.xray_remove_inactive or not self.statuses_moved:
            return
        try:
            await self.push_changes(state)
        except OperationError as exc:
            self.log.error("xray_sync_failed", error=exc.detail)

    # --- migration from a shared inbound -------------------------------------------------

    def migrated_key(self, state: State, move: MigrationMove, key_id: str) -> KeyRecord:
        """The key a migration makes of one client: its uuid, name and Xray fields kept."""
        wanted = move.key(key_id)
        key = KeyRecord(
            id=wanted.id,
            name=wanted.name,
            uuid=uuid.UUID(wanted.uuid),
            port=wanted.port,
            created_at=now(),
            flow=wanted.flow or None,
            migrated=True,
            short_id=wanted.short_id,
            extra_short_ids=list(wanted.extra_short_ids),
            xray_inbound=move.inbound,
            reality_private_key=None if wanted.reality is None else wanted.reality.private_key,
        )
        self.prepare(state, key)
        return key

    async def read_source(self, path: Path) -> ConfigText:
        """A migration source, read as Xray reads it (comments allowed); Invalid in one line."""
        if self.confdir is not None:
            raise Invalid(NO_MIGRATION)
        try:
            return await anyio.to_thread.run_sync(read_source, self.options, path)
        except XrayError as exc:
            raise Invalid(str(exc)) from None
        except (OSError, ValueError) as exc:  # e.g. a name too long for the file system
            raise Invalid(f"{path}: {getattr(exc, 'strerror', None) or exc}") from None

    async def replacement(self, source: ConfigText, replace: bool) -> list[str]:
        """What the live config loses when the migration of `source`, another file, replaces
        it (none when `source` is the live config, or there is none yet); Invalid when it is
        another file and `replace` was not asked for."""
        live = self.files.path
        if _same_file(Path(source.where), live):
            return []
        try:
            previous = await anyio.to_thread.run_sync(self.files.read_bytes)
            if previous is None:
                return []
            config = self.files.parse(previous)
        except XrayError as exc:
            raise Invalid(str(exc)) from None
        if not replace:
            raise Invalid(
                f"{source.where} is not the live Xray config {live}: migrating it replaces that "
                "config entirely, with its own inbounds and routing; pass --replace (API: "
                '"replace": true) to do so, and --dry-run first to see what goes'
            )
        return replaced_parts(config, source.config, str(live))

    def plan(
        self, source: ConfigText, state: State, busy: set[int], replaces: Collection[str] = ()
    ) -> MigrationPlan:
        """The migration of `source` onto the live config; says which files lose comments and
        (`replaces`) what the live config loses when `source` is another file."""
        plan = plan_migration(
            source.config,
            self.settings.port_range,
            busy | {k.port for k in state.keys.values()},
            self.options,
            known_uuids=[str(k.uuid) for k in state.keys.values()],
            taken_names=[k.name for k in state.keys.values()],
            commented=self._commented(source),
        )
        return dataclasses.replace(plan, replaces=tuple(replaces))

    def _commented(self, source: ConfigText) -> list[str]:
        """The files with comments a migration of `source` rewrites or replaces: the live one."""
        found = [source.where] if source.comments else []
        if source.where != str(self.files.path):
            with contextlib.suppress(XrayError):
                if self.files.parse_text(self.files.read_bytes()).comments:
                    found.append(str(self.files.path))
        return found

    async def keep_original(self) -> Path | None:
        """A copy of the live config that rotation never deletes, for `migrate --rollback`."""
        if not self.files.path.exists():
            return None
        try:
            return await anyio.to_thread.run_sync(self.files.keep_copy, MIGRATION_LABEL)
        except XrayStorageError as exc:
            raise StorageFull(str(exc)) from None

    async def discard_original(self, copy: Path | None) -> None:
        """Drop the copy `keep_original` made for a migration that is being undone, so a later
        rollback does not restore it."""
        await anyio.to_thread.run_sync(self.files.discard_backup, copy)

    async def restore_original(self) -> Restored:
        """Put the pre-migration config back byte for byte and apply it; what it returns undoes
        that (a failed apply is undone here already)."""
        if self.confdir is not None:
            raise Invalid(NO_MIGRATION)
        copy = self.files.latest_copy(MIGRATION_LABEL)
        if copy is None:
            raise NotFound(f"no pre-migration copy of {self.files.path} to roll back to")
        try:
            previous = await anyio.to_thread.run_sync(self.files.read_bytes)
            old = new = self.files.parse(previous)
            saved = await anyio.to_thread.run_sync(self.files.restore_from, copy)
        except XrayError as exc:
            raise XrayRefused(str(exc)) from None

        async def undo() -> None:
            await anyio.to_thread.run_sync(self.files.restore, previous)
            await anyio.to_thread.run_sync(self.files.discard_backup, saved)
            self.stale = None  # Xray has the file before the rollback: look at every key
            with contextlib.suppress(XrayError):
                await self.applier.apply(inbound_changes(new, old))

        try:
            new = await anyio.to_thread.run_sync(self.files.read)
            await self.applier.apply(inbound_changes(old, new))
        except BaseException as exc:
            with anyio.CancelScope(shield=True):
                await undo()
            if isinstance(exc, XrayError):
                raise XrayRefused(f"{exc}; the previous Xray config was restored") from None
            raise
        return Restored(copy, undo)

    # --- reports -------------------------------------------------------------------------

    async def status(self, state: State) -> dict[str, Any]:
        keys = self.served(state)
        report = await anyio.to_thread.run_sync(config_status, self.files, keys)
        if self.confdir is not None:
            report.update(await anyio.to_thread.run_sync(_confdir_status, self.confdir, keys))
        report["xray_reachable"] = await self.applier.reachable()
        report["expected_inbounds"] = len(keys)
        report["reality_public_key"] = (
            self.server_reality(state).public_key if self.options.security == "reality" else None
        )
        return report

    async def report_drift(self, state: State) -> list[DriftProblem] | None:
        """At start: log the drift between the keys and Xray's config (None: it is unreadable)."""
        if not self.settings.public_host:
            self.log.warning(
                "public_host_unset",
                using=self.options.public_host,
                hint="set PORTMETER_PUBLIC_HOST for share links",
            )
        try:
            problems = await self.drift(state)
        except XrayError as exc:
            self.log.error("xray_config_unreadable", error=str(exc))
            return None
        for problem in problems[:DRIFT_LINES]:
            self.log.warning(
                "xray_drift", kind=problem.kind, problem=problem.message, port=problem.port
            )
        if len(problems) > DRIFT_LINES:
            self.log.warning(
                "xray_drift_more", more=len(problems) - DRIFT_LINES, hint="portmeter xray status"
            )
        return problems

    async def drift(self, state: State, reuse: bool = False) -> list[DriftProblem]:
        """The drift between the keys and Xray's config. `reuse` (a metrics scrape): the last
        report again while neither the config's files (the stamp a splice trusts: inode, size,
        mtime) nor the served keys nor the key pair changed; reading and comparing 30,000
        inbounds took 2 s of every scrape."""
        keys, reality = self.served(state), self.server_reality(state)
        stamp = await anyio.to_thread.run_sync(self.live.stamp)
        seen = (stamp, tuple(map(id, keys)), reality)
        last = self._last_drift
        if reuse and stamp is not None and last is not None and last[0] == seen:
            return list(last[2])
        config = await anyio.to_thread.run_sync(self.live.read)
        problems = drift_report(config, keys, self.options, self.settings.port_range, reality)
        self._last_drift = (seen, keys, problems)  # the keys kept: no id is reused meanwhile
        return problems


def _same_file(path: Path, other: Path) -> bool:
    """Whether two names are one file (the live config under another name counts as itself)."""
    try:
        return os.path.samefile(path, other)
    except OSError:
        return False


def _migrated_from(inbound: dict[str, Any] | None) -> tuple[str, ...]:
    """The tag of the shared inbound a migrated key's inbound was copied from (none: ())."""
    tag = None if inbound is None else inbound.get("tag")
    return (tag,) if isinstance(tag, str) and tag else ()


def _confdir_status(confdir: ConfDir, keys: Collection[XrayKey]) -> dict[str, Any]:
    """The status fields a confdir changes: inbounds counted in what Xray reads (the base and
    every file of the directory), and the directory with its number of key files."""
    try:
        scan = confdir.scan()
    except XrayError as exc:
        return {"confdir": str(confdir.directory), "key_files": None, "error": str(exc)}
    return {
        **inbound_status(scan.merged(), keys),
        "confdir": str(confdir.directory),
        "key_files": len(scan.ours),
    }
