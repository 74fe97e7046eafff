"""The nftables table: the entry point of the kernel side (`Counters`).

portmeter owns one table, `inet <table>`, and never reads or changes any other. What the table
holds (per port, counters and a quota behind maps; the rules on the input and output hooks; a
key's speed limit and guard chain) is described once in daemon/nft/layout.py, with the libnftables
JSON that builds it and the netlink messages that change it. Around that description:

- building and repairing go through libnftables (nft/libnft.py): the whole table in one
  transaction, checked in full against the layout once after it is read;
- installing, changing or removing a port, its quota, speed or guard chain is one nf_tables
  transaction sent over netlink (nft/netlink.py, messages in nft/codec.py): the cost does not grow
  with the keys;
- reading every counter and quota is one netlink dump (nft/readings.py). A fingerprint of the
  table's maps, hooked chains and rules, read over netlink at every poll, shows any change to the
  layout, which sends the next reading back through the full check.

Both libraries block: every call runs in a worker thread, one at a time. The service sees this
class through kernel.Kernel, and its answers and errors are the types of kernel.py.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

import anyio

from daemon.kernel import TableView
from daemon.limits import Guard, Quota
from daemon.nft import layout, readings
from daemon.nft.layout import FAMILY, Fingerprint, Transaction
from daemon.nft.libnft import Json, Libnft
from daemon.nft.netlink import Netlink

T = TypeVar("T")


class Counters:
    """Our nftables table. Methods are coroutines; nft work happens in a worker thread."""

    def __init__(self, table: str) -> None:
        self.table = table
        self._libnft = Libnft()
        self._netlink = Netlink()
        self._readings = readings.Readings(table)
        self._layout: Fingerprint | None = None  # as last checked in full by libnftables
        self._last_view: TableView | None = None
        self._lock = anyio.Lock()
        self._enforced: set[int] = set()  # ports with a quota installed, as last seen or set
        self._guarded: dict[int, Guard] = {}  # ports with a guard, as last listed or set

    # --- reading -------------------------------------------------------------------------

    async def read(self) -> TableView | None:
        """Every counter and quota of the table, or None when the table is missing.

        One netlink dump while the layout is as last checked; the full libnftables listing (and
        its layout check) when it is not, or has not been checked yet."""
        if self._layout is not None:
            view = await self._blocking(self._quick_read, self._layout)
            if view is not None or self._layout is not None:
                return self._seen(view)
        objects = await self._list(self._table_ref(), terse=True)
        if objects is None:
            return self._seen(None)
        view = readings.listed_view(objects)
        self._guarded = dict(view.guards or {})
        if not view.problems:
            self._layout = await self._blocking(self._current_layout)
            if self._layout is not None and self._layout.handle != view.handle:
                self._layout = None  # recreated in between: check again next time
        return self._seen(view)

    async def read_ports(self, ports: Iterable[int]) -> TableView | None:
        """The counters and quotas of a few ports (no layout check): the cost does not grow with
        the table. None when the table is missing."""
        return await self._blocking(self._readings.some_ports, self._netlink, sorted(set(ports)))

    def _seen(self, view: TableView | None) -> TableView | None:
        if view is not None and view is self._last_view:
            return view
        self._last_view = view
        self._enforced = (
            set() if view is None else {p for p, r in view.ports.items() if r.quota is not None}
        )
        return view

    def _quick_read(self, checked: Fingerprint) -> TableView | None:
        handle = self._netlink.table_handle(self.table)
        if handle is None:
            return None
        if self._fingerprint(handle) != checked:
            self._layout = None
            return None
        view = self._readings.every_port(self._netlink, handle)
        if view is None:
            self._layout = None  # replaced while we read: take the full path
        return view

    def _current_layout(self) -> Fingerprint | None:
        handle = self._netlink.table_handle(self.table)
        return None if handle is None else self._fingerprint(handle)

    def _fingerprint(self, handle: int) -> Fingerprint:
        link, table = self._netlink, self.table
        return layout.fingerprint(
            handle,
            link.sets(table, layout.FINGERPRINTED_MAPS),
            link.chains(table, layout.FINGERPRINTED_CHAINS),
            [rule for chain in layout.FINGERPRINTED_CHAINS for rule in link.rules(table, chain)],
        )

    async def map_elements(self) -> dict[str, dict[int, str]]:
        """Port -> object name for every map (not part of `read`: costly and rarely needed)."""
        result: dict[str, dict[int, str]] = {}
        for name in layout.ALL_MAPS:
            objects = await self._list({"map": {**self._ref(), "name": name}})
            result[name] = readings.map_elements(objects or [])
        return result

    async def client_addresses(self, port: int) -> list[tuple[str, int]]:
        """(address, seconds until it expires) of each client address the port's guard holds."""
        found: list[tuple[str, int]] = []
        for name in (f"a4_{port}", f"a6_{port}"):
            found += readings.set_addresses(
                await self._list({"set": {**self._ref(), "name": name}}) or []
            )
        return found

    # --- changing ------------------------------------------------------------------------

    async def build(
        self, ports: Mapping[int, Quota | None], guards: Mapping[int, Guard] | None = None
    ) -> None:
        """(Re)create the whole table with fresh counters and quotas for `ports`, and the guards
        of those that have one, atomically."""
        held = {port: g for port, g in (guards or {}).items() if port in ports}
        await self._run(layout.build_commands(self.table, ports, held))
        self._layout = None
        self._enforced = {port for port, quota in ports.items() if quota is not None}
        self._guarded = held

    def guard_of(self, port: int) -> Guard | None:
        """The guard the table holds for `port`, as last listed or set."""
        return self._guarded.get(port)

    async def guard(self, port: int, guard: Guard | None) -> None:
        """Install, replace or lift the guard of `port`. The part that changed is replaced in
        one netlink transaction each, fast at any number of keys: the chain of connection and
        address limits (with its sets, counters and verdict map element), and the speed (its
        limit objects and map elements). A replaced part starts afresh: its rate bucket full,
        no connection or address counted yet."""
        old = self._guarded.get(port)
        old_rate, rate = layout.rate_of(old), layout.rate_of(guard)
        old_chain, chain = layout.chain_part(old), layout.chain_part(guard)
        if old_chain != chain:
            edit = Transaction(self.table)
            edit.guard_chain(port, old_chain, chain)
            await self._commit(edit)
            self._hold(port, old_rate, chain)
        if old_rate != rate:
            edit = Transaction(self.table)
            edit.speed(port, old_rate, rate)
            await self._commit(edit)
            self._hold(port, rate, chain)

    def _hold(self, port: int, rate: int | None, chain: Guard | None) -> None:
        """Remember what the table holds for `port` now."""
        if rate is None and chain is None:
            self._guarded.pop(port, None)
            return
        held = chain or Guard(None, None, None, 0)
        self._guarded[port] = Guard(rate, held.connections, held.addresses, held.window)

    async def install(self, port: int, quota: Quota | None = None) -> None:
        """Add fresh counters (and the quota) for `port` in one transaction.

        Fails (NftError) if a counter of that name already exists: a leftover must be removed
        first, or its old bytes would be counted as the new key's.
        """
        edit = Transaction(self.table)
        edit.install(port, quota)
        await self._commit(edit)
        if quota is not None:
            self._enforced.add(port)

    async def remove(self, port: int) -> None:
        """Remove the map entries, counters and quota of `port` in one transaction."""
        await self.guard(port, None)
        edit = Transaction(self.table)
        edit.remove(port, port in self._enforced)
        await self._commit(edit)
        self._enforced.discard(port)

    async def enforce(self, port: int, quota: Quota | None) -> None:
        """Install, replace or lift the quota of `port`, atomically.

        Replacing (not updating) the quota object sets its `used` to the given usage: the kernel's
        own `used` also counted the packets it dropped, which are not usage.
        """
        edit = Transaction(self.table)
        edit.quota(port, port in self._enforced, quota)
        await self._commit(edit)
        if quota is None:
            self._enforced.discard(port)
        else:
            self._enforced.add(port)

    async def remove_present(self, ports: Iterable[int]) -> None:
        """Remove whatever exists of `ports` (map entries, counters, quotas, guards), however
        half-made."""
        wanted = set(ports)
        if not wanted:
            return
        objects = await self._list(self._table_ref(), terse=True)
        if objects is None:
            return
        elements = await self.map_elements()
        await self._run(layout.leftover_commands(self.table, objects, elements, wanted))
        self._enforced -= wanted
        self._guarded = {port: g for port, g in self._guarded.items() if port not in wanted}

    # --- the two libraries, in a worker thread -------------------------------------------

    def _ref(self) -> dict[str, str]:
        return {"family": FAMILY, "table": self.table}

    def _table_ref(self) -> Json:
        return {"table": {"family": FAMILY, "name": self.table}}

    async def _commit(self, edit: Transaction) -> None:
        await self._blocking(self._netlink.transact, edit)

    async def _run(self, commands: list[Json]) -> None:
        if commands:
            await self._blocking(self._libnft.run, commands)

    async def _list(self, what: Json, *, terse: bool = False) -> list[Json] | None:
        return await self._blocking(functools.partial(self._libnft.list, what, terse=terse))

    async def _blocking(self, call: Callable[..., T], *args: Any) -> T:
        async with self._lock:
            return await anyio.to_thread.run_sync(call, *args)
