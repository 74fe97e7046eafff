"""The fields of a new key as clients send them (`POST /api/keys`, `POST /api/keys/batch`, the
rows of `portmeter keys import`) and pydantic's complaints as one readable line. Pydantic alone,
no FastAPI: the CLI checks a whole import file with these models before it sends anything, and a
command must not pay for loading the web framework. Class names are the OpenAPI document's
schema names (http/schemas.py re-exports them).
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    StrictBool,
    StrictInt,
    WithJsonSchema,
    field_validator,
)
from pydantic_core import PydanticCustomError

from daemon import bounds, limits, names
from daemon.limits import ResetStrategy


def _limit_bytes(value: Any) -> int:
    """data_limit_bytes as sent: a JSON integer or a size such as "50GB", within the bounds of
    README "Bounds and names". `true` is no number here, though Python counts bools as ints."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise PydanticCustomError(
            "data_limit_bytes", "must be a whole number of bytes or a size such as 50GB"
        )
    try:
        return limits.parse_limit(value) if isinstance(value, str) else bounds.limit_bytes(value)
    except ValueError as exc:
        raise PydanticCustomError("data_limit_bytes", str(exc)) from None


def _speed(value: object) -> int:
    """speed_limit_bps as sent: a JSON integer (bits/s) or a rate such as "20Mbit"."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise PydanticCustomError(
            "speed_limit_bps", "must be a whole number of bits/s or a rate such as 20Mbit"
        )
    try:
        return limits.parse_rate(value) if isinstance(value, str) else bounds.speed_bps(value)
    except ValueError as exc:
        raise PydanticCustomError("speed_limit_bps", str(exc)) from None


SpeedBps = Annotated[
    int,
    PlainValidator(_speed),
    WithJsonSchema(
        {
            "anyOf": [
                {
                    "type": "integer",
                    "minimum": bounds.MIN_SPEED_BPS,
                    "maximum": bounds.MAX_SPEED_BPS,
                },
                {"type": "string", "maxLength": bounds.MAX_SIZE_CHARS},
            ],
            "description": "bits per second per direction, or e.g. 20Mbit / 500kbit / 1Gbit",
        }
    ),
]
Connections = Annotated[StrictInt, Field(ge=1, le=bounds.MAX_CONNECTIONS)]
Addresses = Annotated[StrictInt, Field(ge=1, le=bounds.MAX_IPS)]


def _key_name(value: str) -> str:
    """A new key's name in its kept form, or 422 saying which rule of daemon.names it breaks."""
    try:
        return names.validate(value)
    except names.NameRefused as exc:
        raise PydanticCustomError("name", str(exc)) from None


LimitBytes = Annotated[
    int,
    PlainValidator(_limit_bytes),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "integer", "minimum": 0, "maximum": bounds.MAX_LIMIT_BYTES},
                {"type": "string", "maxLength": bounds.MAX_SIZE_CHARS},
            ],
            "description": "bytes, or e.g. 50GB / 50GiB; at most 1 EB (10^18 bytes)",
        }
    ),
]
NAME_SCHEMA: dict[str, Any] = {
    "type": "string",
    "minLength": 1,
    "maxLength": bounds.MAX_NAME_CHARS,
    "description": names.RULE,
}
Moment = Annotated[str, Field(max_length=bounds.MAX_MOMENT_CHARS)]
Group = Annotated[str, Field(pattern=bounds.GROUP_PATTERN)]
Groups = Annotated[list[Group], AfterValidator(lambda groups: sorted(set(groups)))]
Port = Annotated[StrictInt, Field(ge=bounds.MIN_PORT, le=bounds.MAX_PORT)]


class RequestBody(BaseModel):
    """What every request body's model is: its text values (a field, or an item of a list field)
    must be text every store holds (`bounds.stored_text`). One rule for every field of every
    request, present and future, checked before the field's own rules: a NUL in a note is 422 on
    every node, never a refusal of the fleet database afterwards. Nested models (the items of a
    batch) are RequestBodies too and check their own fields."""

    @field_validator("*", mode="before")
    @classmethod
    def _storable(cls, value: Any) -> Any:
        return bounds.stored_texts(value)


class KeySettings(RequestBody):
    """Limits and lifecycle, as sent by clients: sizes as bytes or "50GB", dates as ISO or "+30d".
    Types are strict: a boolean is `true`/`false`, a number is a JSON number."""

    model_config = ConfigDict(extra="forbid")
    data_limit_bytes: LimitBytes | None = None
    expire_at: Moment | None = Field(
        default=None, description="ISO 8601 date/time, or +30d; 2000-01-01 to 9998-12-31"
    )
    reset_strategy: ResetStrategy | None = None
    note: str | None = Field(default=None, max_length=bounds.MAX_NOTE_CHARS)
    enabled: StrictBool | None = None
    speed_limit_bps: SpeedBps | None = None
    max_connections: Connections | None = None
    max_ips: Addresses | None = None
    groups: Groups | None = Field(
        default=None,
        max_length=bounds.MAX_GROUPS,
        description='fleet groups that serve the key (README "Keys created once"); [] every one',
    )


class NewKey(KeySettings):
    name: Annotated[str, AfterValidator(_key_name), WithJsonSchema(NAME_SCHEMA)]
    port: Port | None = None


class NewKeys(RequestBody):
    """`POST /api/keys/batch` (README "Batch create"): keys as `POST /api/keys` takes them."""

    model_config = ConfigDict(extra="forbid")
    keys: list[NewKey] = Field(min_length=1, max_length=bounds.MAX_BATCH_KEYS)


# Types are strict (README "Bounds and names"): say what was expected, in JSON's words.
STRICT_TYPES = {
    "bool_type": "must be true or false (a JSON boolean)",
    "int_type": "must be a whole number (a JSON number without quotes)",
}


def describe_errors(errors: Any) -> str:
    """Pydantic's error list as one readable line: `body.name: String should match ...`."""
    parts = []
    for error in errors:
        where = ".".join(str(p) for p in error.get("loc", ()) if p != "body") or "body"
        message = str(error.get("msg", "invalid")).removeprefix("Value error, ")
        if error.get("type") == "missing" and where == "body":
            message = "a JSON body is required"
        elif error.get("type") in STRICT_TYPES:
            message = STRICT_TYPES[error["type"]]
        parts.append(f"{where}: {message}")
    return "; ".join(parts)
