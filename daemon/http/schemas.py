"""What clients may send, and how it is checked: request models, their validators and the error
answers the OpenAPI document names. Class names are the document's schema names: renaming one
changes the document.

Types are strict (README "Bounds and names"): a boolean is `true`/`false`, a number is a JSON
number, and every bound comes from daemon.bounds.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated, Any
from zoneinfo import ZoneInfo

from fastapi import Path as PathParam
from fastapi import Query
from fastapi.exceptions import RequestValidationError
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StringConstraints,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from daemon import bounds, limits
from daemon.errors import Invalid
from daemon.http.keyfields import KeySettings, RequestBody
from daemon.store.history import FleetReport
from daemon.store.state import now

KeyRef = Annotated[
    str,
    PathParam(min_length=1, max_length=bounds.MAX_REF_CHARS, description="key id, uuid or name"),
]
Text = r"^[^\x00-\x1f\x7f]+$"  # printable: no control characters
# Pages of the key lists (GET /api/keys, GET /api/traffic/ports/exact), ordered by port.
PageLimit = Annotated[
    int | None, Query(ge=1, le=bounds.MAX_PAGE_LIMIT, description="keys per page, by port")
]
PageOffset = Annotated[int, Query(ge=0, le=bounds.MAX_OFFSET, description="keys to skip, by port")]
Username = Annotated[
    str,
    PathParam(
        min_length=1,
        max_length=128,
        pattern=Text,
        description="key name / user_token of reports",
    ),
]
FUTURE_SLACK = timedelta(days=1)  # reports from servers whose clock runs ahead are still taken


class Migration(RequestBody):
    model_config = ConfigDict(extra="forbid")
    config_path: str = Field(min_length=1, max_length=4096, pattern=r"^/[^\x00]*$")
    dry_run: StrictBool = False
    # A file that is not the live config replaces it: refused unless asked for.
    replace: StrictBool = False


class ErrorAnswer(BaseModel):
    """Every error: one readable sentence."""

    detail: str


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorAnswer, "description": text}
    for status, text in (
        (400, "malformed request body"),
        (401, "missing or wrong X-API-Key (TCP listener)"),
        (404, "no such key or route"),
        (409, "name or port taken, range full"),
        (413, "request body too large"),
        (422, "invalid field"),
        (503, "nftables or Xray refused; nothing was changed"),
        (507, "the state could not be written; nothing was changed"),
    )
}


def key_changes(body: KeySettings, zone: ZoneInfo, creating: bool) -> dict[str, Any]:
    """The fields the client sent, parsed and checked: raises Invalid with a readable reason.
    Dates such as "+30d" are read in `zone`; a new key may not expire in the past."""
    sent = body.model_fields_set - {"name", "port"}
    changes: dict[str, Any] = {}
    for name in sent:
        value = getattr(body, name)
        if value is None and name in ("reset_strategy", "note", "enabled", "groups"):
            raise Invalid(f"{name}: may not be null")
        changes[name] = value
    if changes.get("expire_at") is not None:
        moment = _moment(changes["expire_at"], zone)
        if creating and moment <= now():
            raise Invalid(f"expire_at: {moment.isoformat()} is in the past")
        changes["expire_at"] = moment
    return changes


def _moment(value: str, zone: ZoneInfo) -> datetime:
    try:
        return limits.parse_moment(value, now(), zone)
    except ValueError as exc:
        raise Invalid(f"expire_at: {exc}") from None


# --- usage reports (POST /api/traffic/webhook) ----------------------------------------------

Bytes = Annotated[StrictInt, Field(ge=0, le=bounds.MAX_REPORT_BYTES)]


class Report(RequestBody):
    """One usage report from a server: the report intake's fields (README "Usage history, the
    Traffic Manager page, a fleet, Prometheus"), a report id and a time.
    Each direction carries at most MAX_REPORT_BYTES; an unknown field is refused."""

    model_config = ConfigDict(extra="forbid")
    report_id: Annotated[str, StringConstraints(min_length=1, max_length=512, pattern=Text)]
    user_token: Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=Text)]
    server: Annotated[str, StringConstraints(min_length=1, max_length=253, pattern=Text)]
    port: Annotated[StrictInt, Field(ge=1, le=65535)]
    protocol: Annotated[
        str, StringConstraints(min_length=1, max_length=32, pattern=r"^[A-Za-z0-9_.+-]+$")
    ]
    bytes_uploaded: Bytes
    bytes_downloaded: Bytes
    timestamp: datetime | None = Field(
        default=None, description="Unix seconds or ISO 8601; default: now"
    )

    @field_validator("server")
    @classmethod
    def _another_server(cls, value: str, info: ValidationInfo) -> str:
        """This server's usage is counted here, by the kernel: a report under its name (given
        as the context's `own_servers`, case-folded) would add to the local keys' users."""
        if value.casefold() in (info.context or {}).get("own_servers", ()):
            raise ValueError(
                "is this server's own name; a report may only carry another server's usage"
            )
        return value

    @field_validator("timestamp")
    @classmethod
    def _plausible(cls, value: datetime | None) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        if value < bounds.EARLIEST_MOMENT:
            raise ValueError("is before 2000-01-01")
        if value > now() + FUTURE_SLACK:
            raise ValueError("is more than a day in the future")
        return value

    def fleet_report(self) -> FleetReport:
        return FleetReport(
            self.report_id,
            self.user_token,
            self.server,
            self.port,
            self.protocol,
            self.bytes_uploaded,
            self.bytes_downloaded,
            self.timestamp,
        )


class ReportBatch(RequestBody):
    model_config = ConfigDict(extra="forbid")
    reports: list[Report] = Field(min_length=1, max_length=bounds.MAX_REPORT_BATCH)


def parse_reports(body: Any, own_servers: frozenset[str] = frozenset()) -> list[Report]:
    """A single report object or {"reports": [...]}, none from a server named in `own_servers`
    (case-folded); raises RequestValidationError (422)."""
    context = {"own_servers": own_servers}
    try:
        if isinstance(body, dict) and "reports" in body:
            return ReportBatch.model_validate(body, context=context).reports
        if not isinstance(body, dict):
            raise RequestValidationError(
                [
                    {
                        "loc": ("body",),
                        "type": "model_type",
                        "msg": 'must be a report object or {"reports": [...]}',
                    }
                ]
            )
        return [Report.model_validate(body, context=context)]
    except ValidationError as exc:
        raise RequestValidationError(
            [{**error, "loc": ("body", *error["loc"])} for error in exc.errors()]
        ) from None
