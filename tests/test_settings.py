"""Tests for daemon.settings.load_settings: environment PORTMETER_* and the optional TOML file.

pydantic-settings reads os.environ itself, so every test sets the variables with monkeypatch (and
passes the same mapping as `environ`); an autouse fixture clears any PORTMETER_* of the caller.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from daemon.allocator import PortRange
from daemon.settings import Settings, SettingsError, load_settings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("PORTMETER_"):
            monkeypatch.delenv(name)
    # REALITY inbounds need a dest; every test but the one about that gives one.
    monkeypatch.setenv("PORTMETER_REALITY_DEST", "www.example.org:443")


def test_reality_dest_is_required_unless_xray_is_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PORTMETER_REALITY_DEST")
    with pytest.raises(SettingsError, match="PORTMETER_REALITY_DEST is required"):
        load_settings()
    assert load(monkeypatch, PORTMETER_XRAY_CONFIG="").xray_config is None
    assert load(monkeypatch, PORTMETER_XRAY_SECURITY="none").xray_security == "none"


def test_server_names_are_a_comma_list(monkeypatch: pytest.MonkeyPatch) -> None:
    names = load(
        monkeypatch, PORTMETER_REALITY_SERVER_NAMES="a.example, b.example"
    ).reality_server_names
    assert names == ("a.example", "b.example")


def load(monkeypatch: pytest.MonkeyPatch, **env: str) -> Settings:
    """Set the variables in the process environment, which is what load_settings reads."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return load_settings()


def test_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    s = load(monkeypatch)
    assert s.state_dir == Path("/var/lib/portmeter")
    assert s.state_file == Path("/var/lib/portmeter/state.json")
    assert s.socket == Path("/run/portmeter/portmeter.sock")
    assert s.socket_group == "portmeter"
    assert s.port_range == PortRange(10001, 10100)
    assert s.nft_table == "portmeter"
    assert s.poll_interval == 10.0
    assert s.snapshot_interval == 3600.0
    assert s.state_backups == 10
    assert s.xray_config == Path("/usr/local/etc/xray/config.json")
    assert s.xray_bin == Path("/usr/local/bin/xray")
    assert s.xray_apply == "none"
    assert s.public_host == ""
    assert s.log_level == "info"


def test_defaults_with_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    s = load_settings()
    assert s.port_range == PortRange(10001, 10100)
    assert s.nft_table == "portmeter"


def test_simple_env_values(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    s = load(
        monkeypatch,
        PORTMETER_STATE_DIR=str(tmp_path / "state"),
        PORTMETER_SOCKET=str(tmp_path / "pm.sock"),
        PORTMETER_NFT_TABLE="pm_test_1",
        PORTMETER_POLL_INTERVAL="0.5",
        PORTMETER_SNAPSHOT_INTERVAL="60",
        PORTMETER_STATE_BACKUPS="0",
        PORTMETER_XRAY_APPLY="restart",
        PORTMETER_PUBLIC_HOST="vpn.example.net",
        PORTMETER_LOG_LEVEL="debug",
    )
    assert s.state_dir == tmp_path / "state"
    assert s.state_file == tmp_path / "state" / "state.json"
    assert s.socket == tmp_path / "pm.sock"
    assert s.nft_table == "pm_test_1"
    assert s.poll_interval == 0.5
    assert s.snapshot_interval == 60.0
    assert s.state_backups == 0
    assert s.xray_apply == "restart"
    assert s.public_host == "vpn.example.net"
    assert s.log_level == "debug"


def test_relative_state_dir_becomes_absolute(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    s = load(monkeypatch, PORTMETER_STATE_DIR="rel/state")
    assert s.state_dir == tmp_path / "rel" / "state"
    assert s.state_dir.is_absolute()


def test_settings_are_frozen(monkeypatch: pytest.MonkeyPatch) -> None:
    s = load(monkeypatch)
    with pytest.raises(ValidationError, match="Instance is frozen"):
        s.nft_table = "other"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("10001-20000", PortRange(10001, 20000)),
        ("10001-10100", PortRange(10001, 10100)),
        ("1-65535", PortRange(1, 65535)),
        ("30000-30000", PortRange(30000, 30000)),
    ],
)
def test_port_range_from_env(
    monkeypatch: pytest.MonkeyPatch, text: str, expected: PortRange
) -> None:
    s = load(monkeypatch, PORTMETER_PORT_RANGE=text)
    assert s.port_range == expected


@pytest.mark.parametrize("text", ["20000-10000", "abc", "0-5", "1-70000", "", "10001"])
def test_bad_port_range(monkeypatch: pytest.MonkeyPatch, text: str) -> None:
    with pytest.raises(SettingsError) as info:
        load(monkeypatch, PORTMETER_PORT_RANGE=text)
    message = str(info.value)
    assert "PORTMETER_PORT_RANGE" in message
    assert "None" not in message


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("0", "greater than 0"),
        ("-1", "greater than 0"),
        ("x", "valid number"),
        ("3601", "less than or equal to 3600"),
    ],
)
def test_bad_poll_interval(monkeypatch: pytest.MonkeyPatch, value: str, reason: str) -> None:
    with pytest.raises(SettingsError) as info:
        load(monkeypatch, PORTMETER_POLL_INTERVAL=value)
    message = str(info.value)
    assert message.startswith("PORTMETER_POLL_INTERVAL: ")
    assert reason in message


@pytest.mark.parametrize("name", ["1abc", "a-b", "", "_x", "a" * 33, "täble", "a b"])
def test_bad_table_name(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    with pytest.raises(SettingsError) as info:
        load(monkeypatch, PORTMETER_NFT_TABLE=name)
    message = str(info.value)
    assert message.startswith("PORTMETER_NFT_TABLE: ")
    assert "must start with a letter" in message


@pytest.mark.parametrize("name", ["a", "A1", "pm_test", "a" * 32])
def test_good_table_name(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    assert load(monkeypatch, PORTMETER_NFT_TABLE=name).nft_table == name


def test_bad_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(SettingsError, match=r"^PORTMETER_XRAY_APPLY: "):
        load(monkeypatch, PORTMETER_XRAY_APPLY="reload")


def test_several_errors_in_one_message(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(SettingsError) as info:
        load(monkeypatch, PORTMETER_POLL_INTERVAL="0", PORTMETER_NFT_TABLE="a-b")
    message = str(info.value)
    assert "PORTMETER_POLL_INTERVAL: " in message
    assert "PORTMETER_NFT_TABLE: " in message
    assert "; " in message


# --- the TOML file ----------------------------------------------------------------------------


def write_toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "portmeter.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_config_file_applies(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = write_toml(
        tmp_path,
        f"""
state_dir = "{tmp_path / "st"}"
port_range = "20001-20050"
nft_table = "from_file"
poll_interval = 2.5
xray_apply = "api"
public_host = "file.example.net"
""",
    )
    s = load(monkeypatch, PORTMETER_CONFIG=str(path))
    assert s.state_dir == tmp_path / "st"
    assert s.port_range == PortRange(20001, 20050)
    assert s.nft_table == "from_file"
    assert s.poll_interval == 2.5
    assert s.xray_apply == "api"
    assert s.public_host == "file.example.net"
    assert s.snapshot_interval == 3600.0  # not in the file: default


def test_env_overrides_config_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = write_toml(tmp_path, 'nft_table = "from_file"\npoll_interval = 2.5\n')
    s = load(monkeypatch, PORTMETER_CONFIG=str(path), PORTMETER_NFT_TABLE="from_env")
    assert s.nft_table == "from_env"
    assert s.poll_interval == 2.5


def test_env_port_range_overrides_config_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    path = write_toml(tmp_path, 'port_range = "20001-20050"\n')
    s = load(monkeypatch, PORTMETER_CONFIG=str(path), PORTMETER_PORT_RANGE="10001-20000")
    assert s.port_range == PortRange(10001, 20000)


def test_config_file_bad_value(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = write_toml(tmp_path, 'port_range = "0-5"\n')
    with pytest.raises(SettingsError) as info:
        load(monkeypatch, PORTMETER_CONFIG=str(path))
    message = str(info.value)
    assert message.startswith("PORTMETER_PORT_RANGE: ")
    assert "1 <= first <= last <= 65535" in message


@pytest.mark.parametrize(
    ("line", "setting"),
    [
        ('state_dir = "/var/lib/a\\u0000b"', "STATE_DIR"),  # a traceback at start before
        ('server_name = "node\\u0000one"', "SERVER_NAME"),  # PostgreSQL refused it
        ('public_host = "vpn\\u0000.example"', "PUBLIC_HOST"),
        ('reality_server_names = ["a.example", "b\\u0000"]', "REALITY_SERVER_NAMES"),
    ],
)
def test_config_file_text_no_store_holds(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, line: str, setting: str
) -> None:
    """TOML can spell a NUL (environment variables cannot): refused with one line, as the API
    refuses it (bounds.stored_text), instead of a traceback at start or a database's refusal."""
    path = write_toml(tmp_path, line + "\n")
    with pytest.raises(SettingsError) as info:
        load(monkeypatch, PORTMETER_CONFIG=str(path))
    assert str(info.value) == (
        f"PORTMETER_{setting}: may not contain U+0000 (NUL): no store can hold it"
    )


def test_config_file_unknown_setting(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = write_toml(tmp_path, 'nft_tabel = "typo"\n')
    with pytest.raises(SettingsError, match=r"NFT_TABEL: Extra inputs are not permitted"):
        load(monkeypatch, PORTMETER_CONFIG=str(path))


def test_missing_config_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(SettingsError) as info:
        load(monkeypatch, PORTMETER_CONFIG=str(missing))
    assert str(info.value) == f"PORTMETER_CONFIG={missing}: no such file"


def test_config_file_is_a_directory(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match=r"^PORTMETER_CONFIG=.*: no such file$"):
        load(monkeypatch, PORTMETER_CONFIG=str(tmp_path))


@pytest.mark.parametrize(
    "text", ["port_range = \n", "nft_table = 'unterminated\n", "[[[\n", "a = 1\na = 2\n"]
)
def test_config_file_syntax_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, text: str
) -> None:
    path = write_toml(tmp_path, text)
    with pytest.raises(SettingsError) as info:
        load(monkeypatch, PORTMETER_CONFIG=str(path))
    message = str(info.value)
    assert message.startswith(f"{path}: ")
    assert len(message) > len(f"{path}: ")  # says what tomllib found
