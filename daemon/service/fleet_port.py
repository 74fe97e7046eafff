"""What the service and the HTTP layer ask of a fleet database, as protocols: daemon/fleet builds
on the service, so the service must not import it back. The wiring (daemon/main.py) hands in the
real objects (daemon/fleet/keys.py `FleetKeys`, daemon/fleet/delivery.py `FleetNode`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from daemon.store.state import KeyRecord


class FleetSubscription(Protocol):
    """One subscription for the whole fleet: the body (a link per server) and its usage header."""

    @property
    def body(self) -> str: ...

    @property
    def userinfo(self) -> str: ...


class FleetKeysPort(Protocol):
    """The fleet's desired keys (README "Keys created once"): an operation's last step writes
    them; the answers read a key's servers and the fleet subscription."""

    def check_serves(self, groups: Sequence[str]) -> None: ...

    async def created(self, key: KeyRecord) -> None: ...

    async def created_many(self, keys: Sequence[KeyRecord]) -> None: ...

    async def changed(self, before: KeyRecord, after: KeyRecord) -> None: ...

    async def deleted(self, key: KeyRecord) -> None: ...

    async def servers_of(self, key: KeyRecord) -> list[dict[str, Any]] | None: ...

    async def subscription(self, token: str) -> FleetSubscription | None: ...


class FleetStatusSource(Protocol):
    """`GET /api/fleet/status`: is the database in use (and why not), what waits to be sent."""

    def status(self) -> dict[str, Any]: ...
