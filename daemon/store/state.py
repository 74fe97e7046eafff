"""The state: keys, their cumulative totals and the kernel readings those totals are based on.

Kept as a snapshot (state.json), written atomically (temp file, fsync, rename, fsync of the
directory), plus a journal (state.journal) with one fdatasynced line per save since, holding the
keys that save changed: saving one key costs O(1), not O(keys). A crash leaves the old or the new
snapshot and at most a torn last journal line, which was never acknowledged and is ignored. Files
that cannot be read or parsed are never overwritten: the daemon refuses to start and says which
file and what to do.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
from collections.abc import Collection, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, ClassVar, Final, Literal, Self
from uuid import UUID

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from daemon.accounting import Account, Reading, Usage
from daemon.atomic import (
    backup_stamp,
    disk_full,
    failure_reason,
    fsync_directory,
    own_dir,
    refuse_link,
    rotate,
    write_atomic,
)
from daemon.bounds import (
    EARLIEST_MOMENT,
    GROUP_PATTERN,
    LATEST_MOMENT,
    MAX_CONNECTIONS,
    MAX_EPOCH,
    MAX_GENERATION,
    MAX_GROUPS,
    MAX_IPS,
    MAX_LIMIT_BYTES,
    MAX_PORT,
    MAX_SPEED_BPS,
    MAX_U64,
    MAX_USAGE_BYTES,
    MIN_PORT,
    MIN_SPEED_BPS,
)
from daemon.limits import ResetStrategy, Status
from daemon.xray.model import check_inbound, check_short_id
from daemon.xray.reality import decode_key

SCHEMA_VERSION: Final = 1
TOP_LEVEL_GENERATION = re.compile(rb'^ "generation": \d+,$', re.MULTILINE)
WRITTEN_VERSION = re.compile(rb'^ "schema_version": %d,$' % SCHEMA_VERSION, re.MULTILINE)


class StateError(Exception):
    """The state file is unreadable or damaged; the message names the file and the remedy."""


class StorageError(Exception):
    """Writing the state failed (disk full, permissions); the previous file is intact.

    `disk_full`: the file system is full (ENOSPC, EDQUOT), the one failure answered 507."""

    def __init__(self, message: str, disk_full: bool = False) -> None:
        super().__init__(message)
        self.disk_full = disk_full


# The bounds of bounds.py, so a file holding a value the API would refuse, or the kernel could not
# hold, is refused at load with the key and field named, instead of failing later, over and over.
KernelNumber = Annotated[int, Field(ge=0, le=MAX_U64)]
UsageBytes = Annotated[int, Field(ge=0, le=MAX_USAGE_BYTES)]
Moment = Annotated[AwareDatetime, Field(ge=EARLIEST_MOMENT, le=LATEST_MOMENT)]
Group = Annotated[str, Field(pattern=GROUP_PATTERN)]  # a fleet group (README "Keys created once")


def _private_key(text: str) -> str:
    decode_key(text)
    return text


def _each_once(tags: tuple[str, ...]) -> tuple[str, ...]:
    if len(set(tags)) != len(tags):
        raise ValueError("a tag is listed twice")
    return tags


# Xray's own rules (daemon/xray), so a value Xray would refuse stops the load, not Xray's start.
ShortId = Annotated[str, AfterValidator(check_short_id)]
PrivateKey = Annotated[str, AfterValidator(_private_key)]
# Tags of shared inbounds a migration replaced, each once (`route_sources` below); a tuple, so
# the thousands of keys without any share one empty tuple.
RouteSources = Annotated[
    tuple[Annotated[str, Field(min_length=1)], ...], AfterValidator(_each_once)
]


class LeanModel(BaseModel):
    """A model the state holds thousands of. Pydantic gives each instance a set of the field
    names it was given (3.3 KB of a loaded key's 6.1 KB, with its five direction records); here
    every instance shares one set of all its fields instead. Nothing dumps these models with
    `exclude_unset`, the one use of that set, and assigning a field adds a name it holds."""

    _every_field: ClassVar[set[str]] = set()

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        cls._every_field = set(cls.model_fields)

    def model_post_init(self, context: Any, /) -> None:
        object.__setattr__(self, "__pydantic_fields_set__", self._every_field)

    @classmethod
    def _trusted(cls, fields: dict[str, Any]) -> Self:
        """The model of `fields` (every field, values already checked), as `model_construct`
        makes it but at a third of its cost: no walk over the fields for defaults and aliases.
        Every poll makes thousands."""
        model = cls.__new__(cls)
        object.__setattr__(model, "__dict__", fields)
        object.__setattr__(model, "__pydantic_fields_set__", cls._every_field)
        object.__setattr__(model, "__pydantic_extra__", None)
        object.__setattr__(model, "__pydantic_private__", None)
        return model


class ReadingModel(LeanModel):
    model_config = ConfigDict(extra="forbid")
    table_handle: KernelNumber
    handle: KernelNumber
    packets: KernelNumber
    bytes: KernelNumber


class DirectionModel(LeanModel):
    """One direction's totals and the reading they are based on. Frozen: a change is a new
    record (`of`), so the many records that counted nothing can be one (`NO_TRAFFIC`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    packets: UsageBytes = 0  # never more than the bytes: a packet is at least 20 bytes
    bytes: UsageBytes = 0
    reading: ReadingModel | None = None

    @classmethod
    def of(cls, account: Account) -> DirectionModel:
        """Built without validation: every poll makes thousands, from values that are already
        non-negative integers (kernel readings and sums of them)."""
        reading = account.reading
        return cls._trusted(
            {
                "packets": account.total.packets,
                "bytes": account.total.bytes,
                "reading": None if reading is None else _reading_model(reading),
            }
        )

    def account(self) -> Account:
        saved = self.reading
        reading = (
            None
            if saved is None
            else Reading(saved.table_handle, saved.handle, saved.packets, saved.bytes)
        )
        return Account(Usage(self.packets, self.bytes), reading)


NO_TRAFFIC: Final = DirectionModel()


def _shared_if_empty(direction: DirectionModel) -> DirectionModel:
    """Most keys count nothing in some direction (no quota: nothing dropped; no limits: nothing
    refused): those share one record instead of holding 250 bytes each."""
    return NO_TRAFFIC if direction == NO_TRAFFIC else direction


Direction = Annotated[DirectionModel, AfterValidator(_shared_if_empty)]


class KeyRecord(LeanModel):
    model_config = ConfigDict(extra="forbid")
    id: str
    name: str
    uuid: UUID
    port: int = Field(ge=MIN_PORT, le=MAX_PORT)
    created_at: Moment
    note: str = ""
    enabled: bool = True
    status: Status = Status.ACTIVE
    data_limit_bytes: int | None = Field(default=None, ge=0, le=MAX_LIMIT_BYTES)
    expire_at: Moment | None = None
    reset_strategy: ResetStrategy = ResetStrategy.NO_RESET
    # Kernel limits (README "Speed, connection and device limits"); None: no limit.
    speed_limit_bps: int | None = Field(default=None, ge=MIN_SPEED_BPS, le=MAX_SPEED_BPS)
    max_connections: int | None = Field(default=None, ge=1, le=MAX_CONNECTIONS)
    max_ips: int | None = Field(default=None, ge=1, le=MAX_IPS)
    next_reset_at: Moment | None = None
    last_reset_at: Moment | None = None
    epoch: int = Field(default=0, ge=0, le=MAX_EPOCH)  # resets so far
    used_before_reset: int | None = Field(default=None, ge=0, le=2 * MAX_USAGE_BYTES)  # rx + tx
    rx: Direction = NO_TRAFFIC
    tx: Direction = NO_TRAFFIC
    dropped: Direction = NO_TRAFFIC
    # What the kernel refused (README "Speed, connection and device limits"): new connections
    # over max_connections, packets of addresses over max_ips.
    refused: Direction = NO_TRAFFIC
    ip_refused: Direction = NO_TRAFFIC
    # Xray: REALITY short id(s), a per-key key pair when configured or migrated, the flow a
    # migrated client used, the unguessable subscription token, and where the key came from.
    short_id: ShortId = ""
    extra_short_ids: list[ShortId] = Field(default_factory=list)
    reality_private_key: PrivateKey | None = Field(default=None, repr=False)
    flow: str | None = None
    sub_token: str = Field(default="", repr=False)
    migrated: bool = False
    # Fleet (README "Keys created once"): the server groups that serve the key (none: every
    # server), and whether the fleet database holds it (False: this server's own key).
    groups: list[Group] = Field(default_factory=list, max_length=MAX_GROUPS)
    fleet: bool = False
    # A migrated key's source inbound with its client alone (the id as the client had it):
    # the key's inbound repeats it except port and tag (README, section Xray).
    xray_inbound: dict[str, Any] | None = Field(default=None, repr=False)
    # A key created after a migration: the shared inbounds it replaced whose routing rules name
    # this key's inbound too (the state's `route_sources` when the key was made).
    route_sources: RouteSources = ()

    @field_validator("xray_inbound")
    @classmethod
    def _one_client(
        cls, inbound: dict[str, Any] | None, info: ValidationInfo
    ) -> dict[str, Any] | None:
        """The inbound must hold this key's client alone, as rendering it requires."""
        uuid = info.data.get("uuid")
        if inbound is not None and uuid is not None:  # a bad uuid is reported by itself
            check_inbound(inbound, str(uuid), info.data.get("id", "?"))
        return inbound

    @property
    def used_bytes(self) -> int:
        """What limits count: both directions since the last reset."""
        return self.rx.bytes + self.tx.bytes


class State(BaseModel):
    model_config = ConfigDict(extra="forbid")
    schema_version: Literal[1] = SCHEMA_VERSION
    # Counts saves; history and fleet reports follow it.
    generation: int = Field(default=0, ge=0, le=MAX_GENERATION)
    # Names this line of generations: a restored backup repeats generation numbers, and fleet
    # report ids must never repeat (the collector drops an id it has seen).
    instance: str = Field(default="", pattern=r"^([0-9a-f]{8})?$")
    table_handle: KernelNumber | None = None
    # The server's REALITY key.
    reality_private_key: PrivateKey | None = Field(default=None, repr=False)
    # The shared inbounds migrations replaced whose routing rules they rewrote (by tag): keys
    # created from now on join those rules (README "Xray"). A rollback empties it.
    route_sources: RouteSources = ()
    keys: dict[str, KeyRecord] = Field(default_factory=dict)

    def ensure_instance(self) -> str:
        if not self.instance:
            self.instance = secrets.token_hex(4)
        return self.instance

    @model_validator(mode="after")
    def _ids_match(self) -> State:
        _check_ids(self.keys)
        _check_shared(self.keys)
        return self


class JournalRecord(BaseModel):
    """One save in the journal: the top-level fields and the keys it changed (None: deleted)."""

    model_config = ConfigDict(extra="forbid")
    generation: int = Field(ge=0, le=MAX_GENERATION)
    instance: str = Field(pattern=r"^([0-9a-f]{8})?$")
    table_handle: KernelNumber | None
    reality_private_key: PrivateKey | None = Field(repr=False)
    route_sources: RouteSources = ()
    keys: dict[str, KeyRecord | None]

    @model_validator(mode="after")
    def _ids_match(self) -> JournalRecord:
        _check_ids({key_id: key for key_id, key in self.keys.items() if key is not None})
        return self

    def apply(self, state: State) -> None:
        state.generation = self.generation
        state.instance = self.instance
        state.table_handle = self.table_handle
        state.reality_private_key = self.reality_private_key
        state.route_sources = self.route_sources
        for key_id, key in self.keys.items():
            if key is None:
                state.keys.pop(key_id, None)
            else:
                state.keys[key_id] = key


def _check_ids(keys: Mapping[str, KeyRecord]) -> None:
    for key_id, key in keys.items():
        if key.id != key_id:
            raise ValueError(f"key stored under {key_id!r} has id {key.id!r}")


def _check_shared(keys: Mapping[str, KeyRecord]) -> None:
    """Two keys on one port would count each other's bytes and clash in the kernel's maps:
    damage, not a state to start from."""
    seen: dict[int, str] = {}
    for key_id, key in keys.items():
        other = seen.setdefault(key.port, key_id)
        if other != key_id:
            raise ValueError(f"keys {other!r} and {key_id!r} have the same port {key.port}")


def _reading_model(reading: Reading) -> ReadingModel:
    return ReadingModel._trusted(
        {
            "table_handle": reading.table_handle,
            "handle": reading.handle,
            "packets": reading.packets,
            "bytes": reading.bytes,
        }
    )


def _same_state(path: Path, data: bytes) -> bool:
    """`path` holds the snapshot `data`, apart from the generation (every start saves once).
    Compared as bytes: both are `snapshot_bytes`, whose top-level lines are indented by one
    space (parsing 10,000 keys twice would take 0.2 s, under the service's lock)."""
    try:
        held = path.read_bytes()
    except OSError:
        return False
    return _without_generation(held) == _without_generation(data)


def _without_generation(data: bytes) -> bytes:
    return TOP_LEVEL_GENERATION.sub(b"", data, count=1)


def _written_state(data: bytes) -> State | None:
    """The state in a snapshot as `snapshot_bytes` writes it (its version line says so), parsed
    and checked in one pass of pydantic's JSON parser, which skips building the whole document
    as Python objects first (README "Start-up and memory"). None for anything else, or a
    snapshot that fails the checks: the careful path then reads it again, and if it must refuse
    it, says why."""
    if WRITTEN_VERSION.search(data) is None:
        return None
    try:
        return State.model_validate_json(data)
    except ValidationError:
        return None


def snapshot_bytes(state: State) -> bytes:
    """The one format of state.json and of its backups."""
    return state.model_dump_json(indent=1).encode()


def now() -> datetime:
    return datetime.now(UTC)


class StateStore:
    """The state of one state directory: a snapshot (state.json) and a journal of saves since.

    A save of a few changed keys appends one line to the journal (O(changed), one fdatasync)
    instead of rewriting every key; a full save (compaction) rewrites the snapshot and drops the
    journal. Loading replays the journal records newer than the snapshot's generation, so a crash
    between writing the snapshot and dropping the journal is harmless.
    """

    def __init__(self, path: Path, backups: int = 10, journal_min: int = 1 << 20) -> None:
        self.path = path
        self.journal = path.with_suffix(".journal")
        self.backups = backups
        self.journal_min = journal_min
        # None: no snapshot this store trusts (never loaded, or the last one failed): write one.
        self._snapshot_size: int | None = None
        # Where the journal's whole records end; a torn tail after it is cut off. None: not read.
        self._journal_end: int | None = None

    @property
    def backup_dir(self) -> Path:
        return self.path.parent / "backups"

    def load(self) -> State:
        """The saved state: the snapshot plus the journal's newer records; empty before any save."""
        state = self._load_snapshot()
        if self._replay(state):
            try:
                _check_shared(state.keys)
            except ValueError as exc:
                raise StateError(self._damaged_journal(f"makes {exc}")) from None
        return state

    def save(self, state: State, changed: Collection[str] | None = None) -> None:
        """Persist `state`; raise StorageError and leave the files as they were if it fails.

        `changed` names the keys changed since the last save (an id missing from state.keys was
        deleted); they are appended to the journal. None writes a full snapshot, and so does a
        change to most keys or a journal grown past its limit: then it costs no more than the
        journal would, or its cost is spread over the many appends before it."""
        if changed is not None and 2 * len(changed) <= len(state.keys):
            record = JournalRecord(
                generation=state.generation,
                instance=state.instance,
                table_handle=state.table_handle,
                reality_private_key=state.reality_private_key,
                route_sources=state.route_sources,
                keys={key_id: state.keys.get(key_id) for key_id in changed},
            )
            data = record.model_dump_json().encode() + b"\n"
            end = self._whole_records_end()
            # Past the limit the appends since the snapshot outweigh rewriting it: compact.
            size = self._snapshot_size
            if size is not None and end + len(data) <= max(self.journal_min, size):
                self._append(data, end)
                return
        self._compact(state)

    def backup(self, state: State) -> Path | None:
        """Write `state` into backups/ as a snapshot, keeping the newest `backups` copies.

        From memory, not a copy of state.json: that lacks what the journal holds. Nothing is
        written before the first save, nor when the newest backup already holds this state: a
        daemon restarted over and over must not rotate the older, different backups out."""
        if self.backups == 0 or not self.path.exists():
            return None
        data = snapshot_bytes(state)
        newest = max(self.backup_dir.glob("state-*.json"), default=None)
        if newest is not None and _same_state(newest, data):
            return None
        target = self.backup_dir / f"state-{backup_stamp()}.json"
        try:
            own_dir(self.backup_dir)
            write_atomic(target, data)
        except OSError as exc:
            raise StorageError(
                f"cannot write {target}: {failure_reason(exc)}", disk_full=disk_full(exc)
            ) from None
        rotate(sorted(self.backup_dir.glob("state-*.json")), self.backups)
        return target

    def valid_backups(self) -> list[Path]:
        """Backups that load cleanly, newest first."""
        good = []
        for path in sorted(self.backup_dir.glob("state-*.json"), reverse=True):
            try:
                StateStore(path, backups=0).load()
            except StateError:
                continue
            good.append(path)
        return good

    def restore_newest_backup(self) -> tuple[Path, list[Path]]:
        """Replace the state with the newest valid backup, moving the current files aside.

        The journal goes too: its records would otherwise be replayed on top of the backup.
        Returns (backup used, where the previous files were moved)."""
        backups = self.valid_backups()
        if not backups:
            raise StateError(f"no valid backup in {self.backup_dir}/ to restore {self.path} from")
        stamp = backup_stamp()
        aside = []
        # Snapshot first: a crash in between leaves a journal without a snapshot, which load
        # refuses, rather than a snapshot that silently lost its journal.
        for current in (self.path, self.journal):
            if current.exists():
                moved = current.with_name(f"{current.name}.replaced-{stamp}")
                os.replace(current, moved)
                aside.append(moved)
        restored = State.model_validate_json(backups[0].read_bytes())
        restored.instance = ""  # its generations will repeat: the daemon starts a new line of them
        data = snapshot_bytes(restored)
        write_atomic(self.path, data)
        self._snapshot_size, self._journal_end = len(data), 0
        return backups[0], aside

    def _load_snapshot(self) -> State:
        try:
            data = self.path.read_bytes()
            text = data.decode("utf-8")
        except FileNotFoundError:
            self._snapshot_size = None
            return State()
        except (OSError, UnicodeDecodeError) as exc:
            raise StateError(self._damaged(f"cannot be read ({failure_reason(exc)})")) from None
        state = _written_state(data)
        if state is not None:
            self._snapshot_size = len(data)
            return state
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise StateError(
                self._damaged(f"is not valid JSON ({exc.msg} at line {exc.lineno})")
            ) from None
        except (ValueError, RecursionError) as exc:  # absurd numbers or nesting
            raise StateError(self._damaged(f"is not valid JSON ({type(exc).__name__})")) from None
        version = raw.get("schema_version") if isinstance(raw, dict) else None
        if type(version) is not int or version != SCHEMA_VERSION:
            raise StateError(
                self._damaged(
                    f"has schema version {version!r}, this portmeter reads {SCHEMA_VERSION}"
                )
            )
        try:
            state = State.model_validate(raw)
        except ValidationError as exc:
            raise StateError(
                self._damaged(f"does not match the schema ({_first_error(exc)})")
            ) from None
        self._snapshot_size = len(data)
        return state

    def _replay(self, state: State) -> bool:
        """Apply the journal's records newer than the snapshot; a torn last line was never
        acknowledged, so it is skipped. True if any record was applied."""
        try:
            data = self.journal.read_bytes()
        except FileNotFoundError:
            self._journal_end = 0
            return False
        except OSError as exc:
            raise StateError(
                self._damaged_journal(f"cannot be read ({failure_reason(exc)})")
            ) from None
        end = data.rfind(b"\n") + 1
        if end and not self.path.exists():
            raise StateError(self._damaged_journal(f"holds changes to {self.path}, which is gone"))
        snapshot_generation = state.generation
        applied = False
        for number, line in enumerate(data[:end].split(b"\n")[:-1], start=1):
            try:
                record = JournalRecord.model_validate_json(line)
            except ValidationError as exc:
                first = exc.errors()[0]
                if first["type"] == "json_invalid":
                    what = f"line {number} is not valid JSON ({first['msg']})"
                else:
                    what = f"line {number} does not match the schema ({_first_error(exc)})"
                raise StateError(self._damaged_journal(what)) from None
            if record.generation > snapshot_generation:
                record.apply(state)
                applied = True
        self._journal_end = end
        return applied

    def _whole_records_end(self) -> int:
        if self._journal_end is None:
            try:
                data = self.journal.read_bytes()
            except FileNotFoundError:
                data = b""
            except OSError as exc:
                raise StorageError(f"cannot read {self.journal}: {failure_reason(exc)}") from None
            self._journal_end = data.rfind(b"\n") + 1
        return self._journal_end

    def _append(self, data: bytes, end: int) -> None:
        """Write one record after the whole ones and fdatasync it; on failure cut it back off."""
        try:
            refuse_link(self.journal)
            fd = os.open(
                self.journal, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
            )
        except OSError as exc:
            raise StorageError(
                f"cannot write {self.journal}: {failure_reason(exc)}", disk_full=disk_full(exc)
            ) from None
        try:
            if os.fstat(fd).st_size != end:
                os.ftruncate(fd, end)  # the torn tail of a crash mid-append
            view = memoryview(data)
            while view:
                view = view[os.pwrite(fd, view, end + len(data) - len(view)) :]
            os.fdatasync(fd)
            if end == 0:  # the file may be new: its directory entry must be on disk too
                fsync_directory(self.journal.parent)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, end)
            raise StorageError(
                f"cannot write {self.journal}: {failure_reason(exc)}", disk_full=disk_full(exc)
            ) from None
        finally:
            os.close(fd)
        self._journal_end = end + len(data)

    def _compact(self, state: State) -> None:
        """Write a full snapshot, then drop the journal, whose records it now holds."""
        data = snapshot_bytes(state)
        try:
            write_atomic(self.path, data)
        except OSError as exc:
            self._snapshot_size = None  # it may be in place anyway: only a snapshot may follow it
            raise StorageError(
                f"cannot write {self.path}: {failure_reason(exc)}", disk_full=disk_full(exc)
            ) from None
        self._snapshot_size = len(data)
        try:
            self.journal.unlink(missing_ok=True)
            self._journal_end = 0
        except OSError:
            # Harmless: its records are not newer than the snapshot, so load skips them, and
            # the next append goes after them.
            self._journal_end = None

    def _damaged(self, what: str) -> str:
        return (
            f"state file {self.path} {what}; it was left untouched. Run `portmeter state restore` "
            f"to use the newest backup from {self.backup_dir}/, or move it and {self.journal.name} "
            f"away to start empty"
        )

    def _damaged_journal(self, what: str) -> str:
        return (
            f"state journal {self.journal} {what}; it and {self.path} were left untouched. Run "
            f"`portmeter state restore` to use the newest backup from {self.backup_dir}/, or move "
            f"the journal away to go back to {self.path} without the changes saved since it"
        )


def _first_error(exc: ValidationError) -> str:
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first["loc"])
    return f"{where}: {first['msg']}" if where else first["msg"]
