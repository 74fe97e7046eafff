"""The service's ledger: which keys changed since the last save, the usage that moved since then,
and saving both in one step, so what the state file, the history and the fleet reports hold agree
exactly (daemon/store/usage.py tells how sinks stage, commit and roll back around a save).

Also the status events (limited, expired, reset ...): a log line and a webhook message each,
held back while an operation is under way and dropped if it is undone, since an undone change
never happened (README "Limits, expiry and resets").
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Sequence
from typing import Any

import structlog

from daemon.errors import StorageFull, StoreUnavailable
from daemon.logs.repeats import RepeatedFailure
from daemon.store.outbox import Outbox
from daemon.store.state import KeyRecord, State, StateStore, StorageError, now
from daemon.store.usage import SinkError, UsageDelta, UsageSink

Log = structlog.typing.FilteringBoundLogger
Follower = Callable[[str, bool], None]  # told of each mark: key id, and whether its status moved


class Ledger:
    """The state's way to disk, with the usage the sinks are told about in the same step."""

    def __init__(
        self, store: StateStore, state: State, sinks: Sequence[UsageSink], log: Log
    ) -> None:
        self.store = store
        self.state = state
        self.sinks = list(sinks)
        self.log = log
        self.unsaved = False  # in-memory totals or statuses newer than the state file
        # Ids of keys changed (or deleted) since the last save: a save writes only these.
        self.dirty: set[str] = set()
        self.followers: list[Follower] = []  # who else needs to know of a changed key
        self._pending: dict[tuple[str, int], UsageDelta] = {}  # traffic since the last save
        # A full disk fails every save (every poll): logged once a minute with a count.
        self.write_failures = RepeatedFailure(log, "state_write_failed", "state_write_recovered")
        self.backup_failures = RepeatedFailure(log, "state_backup_failed", "state_backup_recovered")

    def mark(self, key_id: str, *, status: bool = False) -> None:
        """The key changed (or went): the next save writes it and the followers hear of it;
        `status`: its status changed."""
        self.dirty.add(key_id)
        for follower in self.followers:
            follower(key_id, status)

    def note_usage(self, key: KeyRecord, before: tuple[int, int, int, int]) -> None:
        """Remember what moved since the last save, for history and fleet reports."""
        if not self.sinks:
            return
        slot = (key.id, key.epoch)
        pending = self._pending.get(slot) or UsageDelta(
            key.id, key.name, str(key.uuid), key.port, key.epoch
        )
        self._pending[slot] = pending.plus(
            key.rx.bytes - before[0],
            key.tx.bytes - before[1],
            key.rx.packets - before[2],
            key.tx.packets - before[3],
        )

    def save(self, compact: bool = False) -> None:
        """Save the state; the usage since the last save goes to the sinks in the same step.

        Only the keys marked dirty are written (the store may still choose a full snapshot);
        `compact` asks for a full snapshot. The marks are dropped only once the save succeeded."""
        generation = self.state.generation + 1
        deltas = [d for d in self._pending.values() if d.rx_bytes or d.tx_bytes]
        staged: list[UsageSink] = []
        try:
            if deltas:
                for sink in self.sinks:
                    sink.stage(generation, now(), deltas)
                    staged.append(sink)
            self.state.generation = generation
            self.store.save(self.state, None if compact else self.dirty)
        except Exception as exc:
            self.state.generation = generation - 1
            for sink in staged:
                sink.rollback(generation)
            if not isinstance(exc, (StorageError, SinkError)):
                raise
            self.write_failures.failed(error=str(exc))
            refusal = StorageFull if exc.disk_full else StoreUnavailable
            raise refusal(f"{exc}; nothing was changed") from None
        for sink in self.sinks:  # also those with nothing staged: what waits for the save goes
            sink.commit(generation)
        self._pending.clear()
        self.dirty.clear()
        self.unsaved = False
        self.write_failures.succeeded()

    def save_quietly(self, compact: bool = False) -> None:
        """Persist from a background loop: a failure is logged and retried at the next poll."""
        try:
            self.save(compact)
        except (StorageFull, StoreUnavailable):
            pass

    def backup(self) -> None:
        """Copy the state into backups/ (none if the newest backup holds it); failures logged."""
        try:
            target = self.store.backup(self.state)
        except StorageError as exc:
            self.backup_failures.failed(error=str(exc))
            return
        self.backup_failures.succeeded()
        if target is not None:
            self.log.info("state_backup_written", path=str(target))


class StatusEvents:
    """Status changes and resets: a log event, and a webhook message when configured."""

    def __init__(self, outbox: Outbox, log: Log) -> None:
        self.outbox = outbox
        self.log = log
        self._held: list[tuple[str, KeyRecord, dict[str, Any]]] | None = None

    def hold(self) -> None:
        """An operation begins: its events wait until `release`."""
        self._held = []

    def release(self, *, emit: bool) -> None:
        """The operation ended: its events are sent if it succeeded (`emit`), else dropped."""
        held, self._held = self._held or [], None
        for name, key, fields in held if emit else ():
            self._emit(name, key, fields)

    def report(self, name: str, key: KeyRecord, **fields: Any) -> None:
        if self._held is not None:
            self._held.append((name, key, fields))
        else:
            self._emit(name, key, fields)

    def _emit(self, name: str, key: KeyRecord, fields: dict[str, Any]) -> None:
        self.log.info(
            name,
            key_id=key.id,
            name=key.name,
            port=key.port,
            status=key.status.value,
            used_bytes=key.used_bytes,
            limit=key.data_limit_bytes,
            **fields,
        )
        self.outbox.put(
            {
                "event_id": secrets.token_hex(8),
                "event": name,
                "key": {"id": key.id, "name": key.name, "uuid": str(key.uuid), "port": key.port},
                "status": key.status.value,
                "used_bytes": key.used_bytes,
                "data_limit_bytes": key.data_limit_bytes,
                "at": now().isoformat(),
                **fields,
            }
        )
