"""Daemon settings: environment `PORTMETER_*`, optionally a TOML file named by `PORTMETER_CONFIG`.

Settings are loaded once by the entry point and passed down explicitly, so tests can run several
daemons side by side with different settings in one process tree.
"""

from __future__ import annotations

import grp
import os
import re
from pathlib import Path
from socket import gethostname
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BeforeValidator, Field, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from daemon import bounds, names
from daemon.allocator import PortRange
from daemon.xray.model import is_key_file

NFT_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,31}$")
# An API key is sent as a header value: visible ASCII, and no comma (it separates the keys).
API_KEY_CHARS = re.compile(r"^[\x21-\x2b\x2d-\x7e]+$")


class SettingsError(Exception):
    """A setting is missing or invalid; the message is one line an operator can act on."""


def _parse_port_range(value: object) -> object:
    if isinstance(value, str):
        return PortRange.parse(value)
    return value


def _split_names(value: object) -> object:
    if isinstance(value, str):
        return tuple(name.strip() for name in value.split(",") if name.strip())
    return value


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="PORTMETER_", extra="forbid", frozen=True, arbitrary_types_allowed=True
    )

    state_dir: Path = Path("/var/lib/portmeter")
    socket: Path = Path("/run/portmeter/portmeter.sock")
    socket_group: str = "portmeter"
    port_range: Annotated[PortRange, NoDecode, BeforeValidator(_parse_port_range)] = PortRange(
        10001, 10100
    )
    nft_table: str = "portmeter"
    poll_interval: float = Field(default=10.0, gt=0, le=3600)
    snapshot_interval: float = Field(default=3600.0, gt=0, le=7 * 86400)
    # How long a client address holds a place of a key's max_ips (README "Speed, connection and
    # device limits").
    ip_window: int = Field(default=300, ge=bounds.MIN_IP_WINDOW, le=bounds.MAX_IP_WINDOW)
    state_backups: int = Field(default=10, ge=0, le=1000)
    # An empty PORTMETER_XRAY_CONFIG switches the Xray integration off (counting only).
    xray_config: Path | None = Path("/usr/local/etc/xray/config.json")
    xray_bin: Path = Path("/usr/local/bin/xray")
    xray_apply: Literal["none", "restart", "api"] = "none"
    xray_restart_command: str = "systemctl restart xray"
    xray_api_address: str = "127.0.0.1:62789"
    xray_backups: int = Field(default=10, ge=0, le=1000)
    xray_autosync: bool = True
    xray_remove_inactive: bool = False
    # The group Xray runs as: its config 0640 root:group (README "Faults and their remedies").
    xray_group: str = ""
    xray_flow: str = "xtls-rprx-vision"
    xray_security: Literal["reality", "none"] = "reality"
    # A directory Xray reads with -confdir: each key's inbound in a file of its own there, and
    # PORTMETER_XRAY_CONFIG is then never written (README "One file per key").
    xray_confdir: Path | None = None
    reality_dest: str = ""
    reality_server_names: Annotated[tuple[str, ...], NoDecode, BeforeValidator(_split_names)] = ()
    reality_keys: Literal["server", "key"] = "server"
    public_host: str = ""
    timezone: str = "UTC"
    webhook_url: str | None = None
    webhook_secret: str = Field(default="", repr=False)
    history_retention_days: int = Field(default=90, ge=1, le=3650)
    metrics_textfile: Path | None = None  # a *.prom file for node_exporter's textfile collector
    # Fleet: this server's name in reports, where to send them, and the collector's API key.
    server_name: str = Field(default_factory=gethostname, max_length=128)
    # The fleet database (README "A fleet in PostgreSQL"): a libpq connection string; unset, the
    # server keeps everything in its embedded stores. Never logged: it may hold a password.
    fleet_dsn: str | None = Field(default=None, repr=False, max_length=4096)
    # The fleet groups this server serves (README "Keys created once"): a key with groups is
    # served only where one of them is listed; a key without groups everywhere.
    server_groups: Annotated[
        tuple[Annotated[str, Field(pattern=bounds.GROUP_PATTERN)], ...],
        NoDecode,
        BeforeValidator(_split_names),
    ] = Field(default=(), max_length=bounds.MAX_GROUPS)
    report_url: str | None = None
    report_api_key: str = Field(default="", repr=False)
    # Optional TCP listener (e.g. 127.0.0.1:8080) for the API and the page; needs an API key.
    http_listen: str | None = None
    api_key: str = Field(default="", repr=False)
    # Keys accepted only by the report intake routes, so nodes never hold the admin key.
    report_api_keys: Annotated[tuple[str, ...], NoDecode, BeforeValidator(_split_names)] = Field(
        default=(), repr=False
    )
    # What one client, or all of them, may hold of the TCP listener (README "Usage history, the
    # Traffic Manager page, a fleet, Prometheus").
    http_max_connections: int = Field(default=512, ge=1, le=bounds.MAX_HTTP_CONNECTIONS)
    http_max_connections_per_client: int = Field(default=32, ge=1, le=bounds.MAX_HTTP_CONNECTIONS)
    http_head_timeout: float = Field(
        default=10.0, ge=bounds.MIN_HTTP_TIMEOUT, le=bounds.MAX_HTTP_TIMEOUT
    )
    http_body_timeout: float = Field(
        default=30.0, ge=bounds.MIN_HTTP_TIMEOUT, le=bounds.MAX_HTTP_TIMEOUT
    )
    log_repeat_interval: float = Field(
        default=10.0, ge=bounds.MIN_LOG_REPEAT_INTERVAL, le=bounds.MAX_LOG_REPEAT_INTERVAL
    )
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @field_validator("*", mode="before")
    @classmethod
    def _storable(cls, value: Any) -> Any:
        """No setting holds what no store can (bounds.stored_text): a NUL, which TOML can spell,
        in a path stopped the start with a traceback, in the server's name PostgreSQL refused."""
        return bounds.stored_texts(value)

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(
                f"unknown time zone {value!r} (use e.g. UTC or Europe/Berlin)"
            ) from None
        return value

    @field_validator("public_host")
    @classmethod
    def _link_host(cls, value: str) -> str:
        """The host of every share link: a host name or an IP address, or unset."""
        value = value.strip()
        if value and (problem := names.host_problem(value)):
            raise ValueError(problem)
        return value

    @field_validator("xray_group")
    @classmethod
    def _known_group(cls, value: str) -> str:
        if value:
            try:
                grp.getgrnam(value)
            except KeyError:
                raise ValueError(f"no group named {value!r} on this system") from None
        return value

    @property
    def socket_gid(self) -> int | None:
        """PORTMETER_SOCKET_GROUP's id, None where the group does not exist (a development
        machine): the socket is then root's alone."""
        try:
            return grp.getgrnam(self.socket_group).gr_gid
        except KeyError:
            return None

    @property
    def xray_gid(self) -> int | None:
        """PORTMETER_XRAY_GROUP's id, None when unset."""
        return grp.getgrnam(self.xray_group).gr_gid if self.xray_group else None

    @field_validator("http_listen")
    @classmethod
    def _host_port(cls, value: str | None) -> str | None:
        if not value:
            return None
        host, _, port = value.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError("must be HOST:PORT, e.g. 127.0.0.1:8080")
        return value

    @field_validator("report_api_keys")
    @classmethod
    def _report_keys(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        low, high = bounds.MIN_API_KEY_CHARS, bounds.MAX_API_KEY_CHARS
        for key in value:  # the message never quotes a key: it is a secret
            if not low <= len(key) <= high or not API_KEY_CHARS.match(key):
                raise ValueError(
                    f"each key must be {low}-{high} visible ASCII characters (comma-separated)"
                )
        return value

    @model_validator(mode="after")
    def _listener_limits(self) -> Settings:
        if self.http_max_connections_per_client > self.http_max_connections:
            raise ValueError(
                "PORTMETER_HTTP_MAX_CONNECTIONS_PER_CLIENT must not exceed "
                "PORTMETER_HTTP_MAX_CONNECTIONS"
            )
        if self.api_key and self.api_key in self.report_api_keys:
            raise ValueError("PORTMETER_REPORT_API_KEYS must not hold PORTMETER_API_KEY")
        return self

    @field_validator("fleet_dsn")
    @classmethod
    def _empty_is_unset(cls, value: str | None) -> str | None:
        return value or None

    @field_validator("webhook_url", "report_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value and not value.startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL")
        return value or None

    @model_validator(mode="after")
    def _one_fleet(self) -> Settings:
        """Usage goes to one place: the fleet database or an HTTP collector (README "A fleet in
        PostgreSQL")."""
        if self.fleet_dsn and self.report_url:
            raise ValueError(
                "PORTMETER_FLEET_DSN and PORTMETER_REPORT_URL are both set: usage goes to the "
                "fleet database or to a collector, not both; unset one of them"
            )
        return self

    @model_validator(mode="after")
    def _secrets_given(self) -> Settings:
        if self.webhook_url and not self.webhook_secret:
            raise ValueError(
                "PORTMETER_WEBHOOK_SECRET is required when PORTMETER_WEBHOOK_URL is set"
            )
        if self.http_listen and len(self.api_key) < 16:
            raise ValueError(
                "PORTMETER_API_KEY (16 characters or more) is required with PORTMETER_HTTP_LISTEN"
            )
        return self

    @field_validator("nft_table")
    @classmethod
    def _nft_name(cls, value: str) -> str:
        if not NFT_NAME.match(value):
            raise ValueError(
                "must start with a letter and hold only letters, digits and _ (max 32)"
            )
        return value

    @field_validator("state_dir", "socket")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        return value.absolute()

    @field_validator("metrics_textfile", mode="before")
    @classmethod
    def _prom_file(cls, value: object) -> object:
        if value in ("", None):
            return None
        path = Path(str(value)).absolute()
        if path.suffix != ".prom":
            raise ValueError(
                "must end in .prom (node_exporter's textfile collector reads only *.prom)"
            )
        return path

    @field_validator("xray_config", mode="before")
    @classmethod
    def _optional_path(cls, value: object) -> object:
        if value in ("", None):
            return None
        return Path(str(value)).absolute()

    @field_validator("xray_confdir", mode="before")
    @classmethod
    def _confdir(cls, value: object) -> object:
        if value in ("", None):
            return None
        path = Path(str(value)).absolute()
        if path.is_symlink() or (path.exists() and not path.is_dir()):
            raise ValueError(f"{path} must be a directory (not a file or a symbolic link)")
        return path

    @model_validator(mode="after")
    def _confdir_base(self) -> Settings:
        """The base config Xray reads beside the directory: needed, and never a name portmeter
        owns there."""
        if self.xray_confdir is None:
            return self
        if self.xray_config is None:
            raise ValueError(
                "PORTMETER_XRAY_CONFDIR needs PORTMETER_XRAY_CONFIG (the base config: log, "
                "routing, outbounds, api)"
            )
        if self.xray_config.parent == self.xray_confdir and is_key_file(self.xray_config.name):
            raise ValueError(
                f"PORTMETER_XRAY_CONFIG {self.xray_config} has a name portmeter uses for key "
                "files in PORTMETER_XRAY_CONFDIR (pm-*.json); rename it, e.g. 00-base.json"
            )
        return self

    @model_validator(mode="after")
    def _reality_dest(self) -> Settings:
        if self.xray_config and self.xray_security == "reality" and not self.reality_dest:
            raise ValueError(
                "PORTMETER_REALITY_DEST is required for REALITY inbounds (host:port of a TLS 1.3 "
                "site to borrow); set PORTMETER_XRAY_CONFIG= (empty) to count without Xray"
            )
        return self

    @property
    def state_file(self) -> Path:
        return self.state_dir / "state.json"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Precedence: explicit arguments, then environment, then the TOML file.
        return init_settings, env_settings, TomlConfigSettingsSource(settings_cls)


def load_settings() -> Settings:
    """Build settings from the environment (and the TOML file it names), or raise SettingsError."""
    config_file = os.environ.get("PORTMETER_CONFIG")
    settings_cls: type[Settings] = Settings
    if config_file:
        path = Path(config_file)
        if not path.is_file():
            raise SettingsError(f"PORTMETER_CONFIG={config_file}: no such file")
        settings_cls = type(
            "FileSettings",
            (Settings,),
            {"model_config": {**Settings.model_config, "toml_file": path}},
        )
    try:
        return settings_cls()
    except ValidationError as exc:
        raise SettingsError(describe_validation_error(exc, prefix="PORTMETER_")) from None
    except ValueError as exc:  # TOML syntax errors and undecodable values surface as ValueError
        raise SettingsError(f"{config_file or 'environment'}: {exc}") from None


def describe_validation_error(exc: ValidationError, prefix: str = "") -> str:
    """One readable line per problem, joined with '; '."""
    parts = []
    for error in exc.errors():
        field = ".".join(str(p) for p in error["loc"])
        message = error["msg"].removeprefix("Value error, ")
        name = f"{prefix}{field.upper()}" if prefix and field else field
        parts.append(f"{name}: {message}" if name else message)
    return "; ".join(parts)
