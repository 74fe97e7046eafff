"""Rows read from the fleet database, checked before a node uses them (README "Keys created
once", "The database is input too").

Any client of the database can write any row, so a row is input like an API request: a key's
row passes the very models the API checks a new key with (http/keyfields.py `NewKey`, the name
rule of daemon/names.py, the bounds of daemon/bounds.py), plus the identity a node takes from
the fleet (id, uuid, subscription token, REALITY short id, creation time). A server's row passes
the rules of a public host and a REALITY public key. Pure: values in, a checked value or
`RowRefused` (naming the field) out.

Timestamps PostgreSQL holds but Python cannot (`infinity`, years past 9999) reach here as
`Unreadable` (daemon/fleet/db.py loads them so instead of failing the whole query).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, Final
from uuid import UUID

from pydantic import ConfigDict, Field, StrictInt, ValidationError

from daemon import bounds, names
from daemon.http.keyfields import NewKey, describe_errors
from daemon.limits import Status
from daemon.store.state import Moment, ShortId
from daemon.xray.reality import decode_key

KEY_ID: Final = r"^[0-9a-f]{8}$"  # what daemon/service/front.py new_id() makes
# base64url, as xray_side makes it; none on a server without Xray
SUB_TOKEN: Final = r"^([A-Za-z0-9_-]{16,128})?$"
SHOWN: Final = 64  # characters of a refused value a log line repeats


@dataclass(frozen=True, slots=True)
class Unreadable:
    """A value PostgreSQL holds that Python cannot (a timestamp of `infinity`): refused by
    every check, shown as PostgreSQL wrote it."""

    text: str

    def __str__(self) -> str:
        return self.text


class RowRefused(ValueError):
    """A row, or one field of it, that a node must not use; `field` names the column."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


class KeyRow(NewKey):
    """A `portmeter.keys` row as a node follows it: the new-key fields exactly as the API
    takes them (name rule, bounds, groups), with the row's types, and the fleet's identity."""

    model_config = ConfigDict(extra="ignore", arbitrary_types_allowed=True)
    id: Annotated[str, Field(pattern=KEY_ID)]
    version: StrictInt
    uuid: UUID
    sub_token: Annotated[str, Field(pattern=SUB_TOKEN)]
    short_id: ShortId
    created_at: Moment
    # The other fields are NewKey's own (NOT NULL columns never give None); expire_at is a
    # moment here, not a date as typed.
    expire_at: Moment | None = None  # type: ignore[assignment]


def key_row(row: Mapping[str, Any]) -> KeyRow:
    """The row checked as the API checks a new key; RowRefused naming the first bad field."""
    try:
        return KeyRow.model_validate(dict(row))
    except ValidationError as exc:
        first = exc.errors()[0]
        field = str(first["loc"][0]) if first["loc"] else "row"
        reason = describe_errors([first]).partition(": ")[2]
        raise RowRefused(field, reason) from None


def desired(row: KeyRow, fields: tuple[str, ...]) -> dict[str, Any]:
    """What a node applies of a checked row, in the types of a KeyRecord."""
    found = {name: getattr(row, name) for name in fields}
    found["groups"] = list(row.groups or [])
    return found


@dataclass(frozen=True, slots=True)
class ServerRow:
    """One server of a key, checked: where its link points."""

    server: str
    port: int
    status: str
    public_host: str | None
    reality_public_key: str | None
    silent: bool = False  # no heartbeat for SERVER_SILENT seconds


def server_row(row: Mapping[str, Any]) -> ServerRow:
    """A row of KEY_SERVERS (server_keys joined with servers), checked; RowRefused otherwise."""
    port = row.get("port")
    if type(port) is not int or not bounds.MIN_PORT <= port <= bounds.MAX_PORT:
        raise RowRefused("port", f"{shown(port)} is not a port ({bounds.MIN_PORT}-65535)")
    status = row.get("status")
    if status is not None and status not in {s.value for s in Status}:
        raise RowRefused("status", f"{shown(status)} is not a key status")
    host = row.get("public_host")
    if host is not None and (problem := names.host_problem(str(host))):
        raise RowRefused("public_host", problem)
    pbk = row.get("reality_public_key")
    if pbk is not None:
        try:
            decode_key(str(pbk))
        except ValueError as exc:
            raise RowRefused("reality_public_key", str(exc)) from None
    server = row.get("server")
    if not isinstance(server, str) or not re.fullmatch(r"[^\x00-\x1f\x7f]{1,128}", server):
        raise RowRefused("server", f"{shown(server)} is not a server name")
    return ServerRow(server, port, str(status), host, pbk, row.get("silent") is True)


def moment_or_none(value: object) -> datetime | None:
    """A timestamp within the bounds, or None (NULL, `infinity`, out of range)."""
    if not isinstance(value, datetime) or value.tzinfo is None:
        return None
    return value if bounds.EARLIEST_MOMENT <= value <= bounds.LATEST_MOMENT else None


def shown(value: object) -> str:
    """A refused value as a log line or an answer may repeat it: printable, at most SHOWN
    characters (a row may hold a 1 MB note, or escape sequences for a terminal)."""
    text = repr(value) if not isinstance(value, Unreadable) else repr(value.text)
    return text if len(text) <= SHOWN else f"{text[: SHOWN - 3]}..."
