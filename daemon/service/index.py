"""The keys by name, uuid and port, kept in step with the state, so that finding a key, checking a
new name and choosing a port cost the same at 30 keys and at 30,000 (README "30,000 keys").

Every change to `state.keys` is followed by a ledger mark (the save must write it), and the index
follows those marks; an undone operation puts the whole dict back, and the index is rebuilt then.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import TypeVar
from uuid import UUID

from daemon import names
from daemon.store.state import KeyRecord

Slot = TypeVar("Slot", str, int, bytes)


@dataclass(frozen=True, slots=True)
class _Entry:
    """What the index holds of one key: enough to take it out again."""

    name: str
    folded: str
    uuid: UUID
    port: int
    token: str


class KeyIndex:
    """Lookups over `keys` (the state's dict, read, never written here)."""

    def __init__(self, keys: Mapping[str, KeyRecord]) -> None:
        self.keys = keys
        self._entries: dict[str, _Entry] = {}
        self._by_fold: dict[str, list[str]] = {}  # ids in the order they were indexed
        self._by_uuid: dict[str, list[str]] = {}
        self._by_port: dict[int, list[str]] = {}  # one key per port, in a sound state
        self._by_token: dict[bytes, list[str]] = {}
        self._ordered: list[str] | None = None  # ids by port, until a key comes or goes
        self.rebuild()

    def rebuild(self) -> None:
        """Index every key again (after the dict was replaced as a whole)."""
        self._entries.clear()
        self._by_fold.clear()
        self._by_uuid.clear()
        self._by_port.clear()
        self._by_token.clear()
        self._ordered = None
        for key_id in self.keys:
            self.follow(key_id)

    def follow(self, key_id: str, status: bool = False) -> None:
        """The key was added, changed or deleted (a ledger follower: `status` is not needed)."""
        key = self.keys.get(key_id)
        entry = self._entries.get(key_id)
        if key is not None and entry is not None and _same(entry, key):
            return  # totals or status moved: nothing indexed did
        if entry is not None:
            self._drop(key_id, entry)
        if key is not None:
            self._add(key)

    def ports(self) -> AbstractSet[int]:
        """The ports keys hold (a live view)."""
        return self._by_port.keys()

    def on_port(self, port: int) -> KeyRecord | None:
        """The key on `port`, if any."""
        ids = self._by_port.get(port)
        return self.keys[ids[0]] if ids else None

    def in_port_order(self, offset: int = 0, limit: int | None = None) -> list[KeyRecord]:
        """The keys ordered by port, from `offset` on, at most `limit` of them: a page costs
        its own keys, not a sort of every key."""
        if self._ordered is None:
            by_port = self._by_port
            self._ordered = [key_id for port in sorted(by_port) for key_id in by_port[port]]
        keys = self.keys
        return [
            keys[key_id]
            for key_id in self._ordered[offset : None if limit is None else offset + limit]
        ]

    def with_token(self, token: str) -> KeyRecord | None:
        """The key whose subscription token is `token`, found by the token's sha256, so the
        time taken tells nothing of how much of a guess was right; the token itself is then
        compared in constant time."""
        for key_id in self._by_token.get(_digest(token), ()):
            key = self.keys[key_id]
            if key.sub_token and hmac.compare_digest(key.sub_token.encode(), token.encode()):
                return key
        return None

    def same_name(self, name: str) -> str | None:
        """The name of a key that has the same name as `name` (names.fold), if any."""
        ids = self._by_fold.get(names.fold(name))
        return self.keys[ids[0]].name if ids else None

    def find(self, ref: str) -> KeyRecord | None:
        """A key by id, uuid or name, in that order (names.find's rule for names)."""
        if ref in self.keys:
            return self.keys[ref]
        if by_uuid := self._by_uuid.get(ref.lower()):
            return self.keys[by_uuid[0]]
        return names.find(ref, self._folded_as(ref), lambda key: key.name)

    def named(self, name: str) -> list[KeyRecord]:
        """The keys named exactly `name`, ordered by port (then id)."""
        found = [key for key in self._folded_as(name) if key.name == name]
        found.sort(key=lambda key: (key.port, key.id))
        return found

    def _folded_as(self, name: str) -> list[KeyRecord]:
        return [self.keys[key_id] for key_id in self._by_fold.get(names.fold(name), ())]

    def _add(self, key: KeyRecord) -> None:
        entry = _Entry(key.name, names.fold(key.name), key.uuid, key.port, key.sub_token)
        self._entries[key.id] = entry
        self._by_uuid.setdefault(str(entry.uuid), []).append(key.id)
        self._by_token.setdefault(_digest(entry.token), []).append(key.id)
        self._ordered = None
        self._by_fold.setdefault(entry.folded, []).append(key.id)
        self._by_port.setdefault(entry.port, []).append(key.id)

    def _drop(self, key_id: str, entry: _Entry) -> None:
        del self._entries[key_id]
        _unlist(self._by_fold, entry.folded, key_id)
        _unlist(self._by_uuid, str(entry.uuid), key_id)
        _unlist(self._by_port, entry.port, key_id)
        _unlist(self._by_token, _digest(entry.token), key_id)
        self._ordered = None


def _same(entry: _Entry, key: KeyRecord) -> bool:
    return (
        entry.name == key.name
        and entry.port == key.port
        and entry.uuid == key.uuid
        and entry.token == key.sub_token
    )


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def _unlist(lists: dict[Slot, list[str]], slot: Slot, key_id: str) -> None:
    """Take `key_id` out of `lists[slot]`; the slot goes when it empties."""
    held = lists[slot]
    held.remove(key_id)
    if not held:
        del lists[slot]
