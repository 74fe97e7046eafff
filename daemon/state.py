"""The state file: keys, their cumulative totals and the kernel readings those totals are based on.

Written atomically (temp file, fsync, rename, fsync of the directory), so a crash leaves either the
old or the new file, never a mix. A file that cannot be read or parsed is never overwritten: the
daemon refuses to start and says which file and what to do.
"""

from __future__ import annotations

import json
import os
import secrets
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from daemon.accounting import Account, Reading, Usage
from daemon.atomic import write_atomic
from daemon.limits import ResetStrategy, Status

SCHEMA_VERSION = 1
BACKUP_STAMP = "%Y%m%dT%H%M%S%fZ"


class StateError(Exception):
    """The state file is unreadable or damaged; the message names the file and the remedy."""


class StorageError(Exception):
    """Writing the state failed (disk full, permissions); the previous file is intact."""


class ReadingModel(BaseModel):
    model_config = ConfigDict(extra="forbid")
    table_handle: int
    handle: int
    packets: int = Field(ge=0)
    bytes: int = Field(ge=0)


class DirectionModel(BaseModel):
    model_config = ConfigDict(extra="forbid")
    packets: int = Field(default=0, ge=0)
    bytes: int = Field(default=0, ge=0)
    reading: ReadingModel | None = None

    @classmethod
    def of(cls, account: Account) -> DirectionModel:
        reading = account.reading
        return cls(
            packets=account.total.packets,
            bytes=account.total.bytes,
            reading=None if reading is None else ReadingModel(**_reading_fields(reading)),
        )

    def account(self) -> Account:
        reading = None if self.reading is None else Reading(**self.reading.model_dump())
        return Account(Usage(self.packets, self.bytes), reading)


class KeyRecord(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str
    name: str
    uuid: UUID
    port: int = Field(ge=1, le=65535)
    created_at: datetime
    note: str = ""
    enabled: bool = True
    status: Status = Status.ACTIVE
    data_limit_bytes: int | None = Field(default=None, ge=0)
    expire_at: datetime | None = None
    reset_strategy: ResetStrategy = ResetStrategy.NO_RESET
    next_reset_at: datetime | None = None
    last_reset_at: datetime | None = None
    epoch: int = Field(default=0, ge=0)  # resets so far
    used_before_reset: int | None = None
    rx: DirectionModel = Field(default_factory=DirectionModel)
    tx: DirectionModel = Field(default_factory=DirectionModel)
    dropped: DirectionModel = Field(default_factory=DirectionModel)
    # Xray: REALITY short id(s), a per-key key pair when configured or migrated, the flow a
    # migrated client used, the unguessable subscription token, and where the key came from.
    short_id: str = ""
    extra_short_ids: list[str] = Field(default_factory=list)
    reality_private_key: str | None = Field(default=None, repr=False)
    flow: str | None = None
    sub_token: str = Field(default="", repr=False)
    migrated: bool = False

    @property
    def used_bytes(self) -> int:
        """What limits count: both directions since the last reset."""
        return self.rx.bytes + self.tx.bytes


class State(BaseModel):
    model_config = ConfigDict(extra="forbid")
    schema_version: Literal[1] = SCHEMA_VERSION
    generation: int = Field(default=0, ge=0)  # counts saves; history and reports follow it
    # Names this line of generations: a restored backup repeats generation numbers, and fleet
    # report ids must never repeat (the collector drops an id it has seen).
    instance: str = Field(default="", pattern=r"^([0-9a-f]{8})?$")
    table_handle: int | None = None
    reality_private_key: str | None = Field(default=None, repr=False)  # the server's REALITY key
    keys: dict[str, KeyRecord] = Field(default_factory=dict)

    def ensure_instance(self) -> str:
        if not self.instance:
            self.instance = secrets.token_hex(4)
        return self.instance

    @model_validator(mode="after")
    def _ids_match(self) -> State:
        for key_id, key in self.keys.items():
            if key.id != key_id:
                raise ValueError(f"key stored under {key_id!r} has id {key.id!r}")
        return self


def _reading_fields(reading: Reading) -> dict[str, int]:
    return {
        "table_handle": reading.table_handle,
        "handle": reading.handle,
        "packets": reading.packets,
        "bytes": reading.bytes,
    }


def now() -> datetime:
    return datetime.now(UTC)


class StateStore:
    """Loads and saves the state file of one state directory."""

    def __init__(self, path: Path, backups: int = 10) -> None:
        self.path = path
        self.backups = backups

    @property
    def backup_dir(self) -> Path:
        return self.path.parent / "backups"

    def load(self) -> State:
        """The saved state; an empty one when no file exists yet."""
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return State()
        except (OSError, UnicodeDecodeError) as exc:
            raise StateError(self._damaged(f"cannot be read ({_reason(exc)})")) from None
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise StateError(self._damaged(f"is not valid JSON ({exc.msg} at line {exc.lineno})")) from None
        except (ValueError, RecursionError) as exc:  # absurd numbers or nesting
            raise StateError(self._damaged(f"is not valid JSON ({type(exc).__name__})")) from None
        version = raw.get("schema_version") if isinstance(raw, dict) else None
        if type(version) is not int or version != SCHEMA_VERSION:
            raise StateError(
                self._damaged(f"has schema version {version!r}, this portmeter reads {SCHEMA_VERSION}")
            )
        try:
            return State.model_validate(raw)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise StateError(self._damaged(f"does not match the schema ({where}: {first['msg']})")) from None

    def save(self, state: State) -> None:
        """Atomically replace the state file; raise StorageError and leave the old file if it fails."""
        data = state.model_dump_json(indent=1).encode()
        try:
            write_atomic(self.path, data)
        except OSError as exc:
            raise StorageError(f"cannot write {self.path}: {_reason(exc)}") from None

    def backup(self) -> Path | None:
        """Copy the current file into backups/, keeping the newest `backups` copies."""
        if self.backups == 0 or not self.path.exists():
            return None
        self.backup_dir.mkdir(mode=0o700, exist_ok=True)
        target = self.backup_dir / f"state-{now().strftime(BACKUP_STAMP)}.json"
        try:
            write_atomic(target, self.path.read_bytes())
        except OSError as exc:
            raise StorageError(f"cannot write {target}: {_reason(exc)}") from None
        for old in sorted(self.backup_dir.glob("state-*.json"))[: -self.backups]:
            old.unlink(missing_ok=True)
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

    def restore_newest_backup(self) -> tuple[Path, Path | None]:
        """Replace the state file with the newest valid backup; the current file is kept aside.

        Returns (backup used, where the previous file was moved)."""
        backups = self.valid_backups()
        if not backups:
            raise StateError(f"no valid backup in {self.backup_dir}/ to restore {self.path} from")
        aside = None
        if self.path.exists():
            aside = self.path.with_name(f"{self.path.name}.replaced-{now().strftime(BACKUP_STAMP)}")
            os.replace(self.path, aside)
        restored = State.model_validate_json(backups[0].read_bytes())
        restored.instance = ""  # its generations will repeat: the daemon starts a new line of them
        write_atomic(self.path, restored.model_dump_json(indent=1).encode())
        return backups[0], aside

    def _damaged(self, what: str) -> str:
        return (
            f"state file {self.path} {what}; it was left untouched. Run `portmeter state restore` "
            f"to use the newest backup from {self.backup_dir}/, or move the file away to start empty"
        )


def _reason(exc: OSError | UnicodeDecodeError) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc)

