"""Files portmeter writes (README "Faults and their remedies", Security): a symbolic link planted
at a temporary name or at the target is never written through; modes are exact whatever the
umask. In-process for each writer (state, Xray config, outboxes); the real daemon for the modes of
everything it creates."""

from __future__ import annotations

import grp
import os
import socket
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import structlog

from daemon.atomic import LinkRefused, write_atomic
from daemon.reports import Courier
from daemon.store.state import StateStore, StorageError
from daemon.xray.model import XrayConfigError, XrayStorageError
from daemon.xray.render import render_config
from daemon.xray_sync import XrayFiles
from tests.conftest import Daemon
from tests.netlab import Lab
from tests.test_counting import udp_exchange
from tests.test_state_store import sample_state
from tests.test_xray_sync import REALITY, key, opts_for

# Ownership, modes as root sees them and planted links in shared places: needs root.
pytestmark = pytest.mark.root

PRECIOUS = b"root's precious file\n"
NOGROUP = grp.getgrnam("nogroup").gr_gid


@contextmanager
def umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    """A file outside every directory portmeter writes: an attacker's planted link points here."""
    path = tmp_path / "elsewhere" / "victim"
    path.parent.mkdir()
    path.write_bytes(PRECIOUS)
    path.chmod(0o644)
    return path


def assert_untouched(victim: Path) -> None:
    info = victim.lstat()
    assert victim.read_bytes() == PRECIOUS
    assert (stat.S_IFMT(info.st_mode), stat.S_IMODE(info.st_mode), info.st_nlink, info.st_uid) == (
        stat.S_IFREG,
        0o644,
        1,
        0,
    )
    assert sorted(p.name for p in victim.parent.iterdir()) == ["victim"]


def mode(path: Path) -> tuple[int, int, int]:
    info = path.lstat()
    return stat.S_IMODE(info.st_mode), info.st_uid, info.st_gid


# --- write_atomic ---------------------------------------------------------------------------


@pytest.mark.parametrize("mask", [0o000, 0o022, 0o077])
def test_modes_are_exact_whatever_the_umask(tmp_path: Path, mask: int) -> None:
    tmp_path.chmod(0o711)
    with umask(mask):
        write_atomic(tmp_path / "a" / "b" / "state.json", b"{}")
        write_atomic(
            tmp_path / "x" / "config.json", b"{}", mode=0o640, owner=(0, NOGROUP), dir_mode=0o750
        )
    assert mode(tmp_path / "a") == mode(tmp_path / "a" / "b") == (0o700, 0, 0)
    assert mode(tmp_path / "a" / "b" / "state.json") == (0o600, 0, 0)
    assert mode(tmp_path / "x") == (0o750, 0, NOGROUP)
    assert mode(tmp_path / "x" / "config.json") == (0o640, 0, NOGROUP)
    assert stat.S_IMODE(tmp_path.stat().st_mode) == 0o711  # a directory that exists is left alone


def test_links_at_temporary_names_are_removed_never_followed(tmp_path: Path, victim: Path) -> None:
    target = tmp_path / "state.json"
    for name in (".state.json.tmp", ".state.json.0123456789abcdef.tmp"):  # old fixed, new shape
        (tmp_path / name).symlink_to(victim)
    write_atomic(target, b"new")
    assert_untouched(victim)
    assert target.read_bytes() == b"new" and not target.is_symlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere", "state.json"]


def test_a_link_at_the_target_is_refused(tmp_path: Path, victim: Path) -> None:
    target = tmp_path / "state.json"
    target.symlink_to(victim)
    with pytest.raises(LinkRefused, match=f"^{target} is a symbolic link; portmeter never writes"):
        write_atomic(target, b"new")
    assert_untouched(victim)
    assert target.is_symlink() and sorted(p.name for p in tmp_path.iterdir()) == [
        "elsewhere",
        "state.json",
    ]


# --- the state file -------------------------------------------------------------------------


def test_state_file_journal_and_backups_refuse_links(tmp_path: Path, victim: Path) -> None:
    store = StateStore(tmp_path / "state.json")
    store.path.symlink_to(victim)
    with pytest.raises(StorageError, match="is a symbolic link"):
        store.save(sample_state())
    store.path.unlink()
    store.save(sample_state())
    store.journal.symlink_to(victim)
    with pytest.raises(StorageError, match=f"cannot write {store.journal}: .* is a symbolic link"):
        store.save(sample_state(), changed={"k1"})
    store.backup_dir.symlink_to(victim.parent, target_is_directory=True)
    with pytest.raises(StorageError, match="is a symbolic link"):
        store.backup(sample_state())
    assert_untouched(victim)


# --- the Xray config ------------------------------------------------------------------------


def test_a_link_at_the_xray_temporary_name_is_not_written_through(
    tmp_path: Path, victim: Path
) -> None:
    # The reported attack: xray/.config.json.tmp -> elsewhere. The old code truncated the
    # target, wrote the config (with the REALITY private key) into it, chmod-ed it and renamed
    # the link over config.json.
    files = XrayFiles(opts_for(tmp_path))
    files.path.parent.mkdir()
    (files.path.parent / ".config.json.tmp").symlink_to(victim)
    for keys in ([key()], [key(), key("0b6c1f7a-95a1-4e0e-8d7e-5a3c2d1e0f9b", 10002)]):
        files.write(render_config(files.read(), keys, files.opts, REALITY))
    assert_untouched(victim)
    assert not files.path.is_symlink() and REALITY.private_key in files.path.read_text()
    assert mode(files.path) == (0o640, 0, 0)
    assert sorted(p.name for p in files.path.parent.iterdir()) == ["backups", "config.json"]


def test_a_link_at_the_xray_config_or_its_backups_is_refused(tmp_path: Path, victim: Path) -> None:
    files = XrayFiles(opts_for(tmp_path))
    files.path.parent.mkdir()
    files.path.symlink_to(victim)
    # Refused at the read before the write: the live file is never read through a link either.
    with pytest.raises(XrayConfigError, match=f"{files.path} is a symbolic link"):
        files.write(render_config(files.parse(None), [key()], files.opts, REALITY))
    assert files.path.is_symlink() and not files.backup_dir.exists()
    files.path.unlink()
    files.write(render_config(files.parse(None), [key()], files.opts, REALITY))
    live = files.path.read_bytes()
    files.backup_dir.symlink_to(victim.parent, target_is_directory=True)
    with pytest.raises(
        XrayStorageError, match=f"cannot write backup .*{files.backup_dir} is a symbolic link"
    ):
        files.write(render_config(files.parse(None), [key(port=10009)], files.opts, REALITY))
    assert files.path.read_bytes() == live
    assert_untouched(victim)


def test_a_backup_is_never_a_link_to_what_a_planted_link_points_to(
    tmp_path: Path, victim: Path
) -> None:
    # A hard link follows a symbolic link unless told not to: the backup would then be the
    # victim's inode, and sealing it (0600 root) would change the victim.
    files = XrayFiles(opts_for(tmp_path))
    files.path.parent.mkdir()
    files.path.symlink_to(victim)
    backup = files._backup(b"the bytes read before")
    assert backup is not None and backup.read_bytes() == b"the bytes read before"
    assert not backup.is_symlink() and mode(backup) == (0o600, 0, 0)
    assert_untouched(victim)


@pytest.mark.parametrize("mask", [0o000, 0o022])
def test_xray_group_modes_and_private_backups(tmp_path: Path, mask: int) -> None:
    files = XrayFiles(opts_for(tmp_path, file_group=NOGROUP))
    with umask(mask):
        for port in (10001, 10002, 10003):
            files.write(render_config(files.read(), [key(port=port)], files.opts, REALITY))
    assert mode(files.path.parent) == (0o750, 0, NOGROUP)
    assert mode(files.path) == (0o640, 0, NOGROUP)
    assert mode(files.backup_dir) == (0o700, 0, 0)
    backups = files.backups()
    assert len(backups) == 2 and all(mode(b) == (0o600, 0, 0) for b in backups)
    assert files.path.stat().st_ino not in {b.stat().st_ino for b in backups}


# --- outboxes -------------------------------------------------------------------------------


def outbox(directory: Path) -> Courier:
    return Courier(directory, "http://127.0.0.1:9/hook", lambda _: {}, structlog.get_logger())


def test_outbox_refuses_links_and_never_sends_a_planted_one(tmp_path: Path, victim: Path) -> None:
    linked = outbox(tmp_path / "outbox")
    (tmp_path / "outbox").symlink_to(victim.parent, target_is_directory=True)
    with pytest.raises(LinkRefused):
        linked.put({"event": "x"})
    (tmp_path / "outbox").unlink()
    box = outbox(tmp_path / "outbox")
    (tmp_path / "outbox").mkdir(mode=0o700)
    (tmp_path / "outbox" / "planted.json").symlink_to(victim)
    with pytest.raises(LinkRefused):
        box.put({"event": "x"}, name="planted")

    async def deliver() -> bool:
        async with httpx.AsyncClient(timeout=2) as client:
            return await box._deliver(client, tmp_path / "outbox" / "planted.json")

    assert anyio.run(deliver) is True  # done with: set aside unread, never posted
    assert [p.name for p in (tmp_path / "outbox").iterdir()] == ["planted.refused"]
    assert_untouched(victim)


# --- everything the daemon creates ----------------------------------------------------------


def expected_mode(path: Path, daemon: Daemon) -> tuple[int, int, int]:
    xray_dir = daemon.xray_config.parent
    if path == xray_dir:
        return 0o750, 0, NOGROUP
    if path == daemon.xray_config:
        return 0o640, 0, NOGROUP
    return (0o700 if path.is_dir() else 0o600), 0, 0


@pytest.mark.kernel
@pytest.mark.parametrize("mask", [0o000, 0o022])
def test_every_file_and_directory_the_daemon_creates_has_its_mode(
    net: Lab, make_daemon: Any, mask: int
) -> None:
    daemon: Daemon = make_daemon(
        start=False,
        PORTMETER_XRAY_GROUP="nogroup",
        PORTMETER_XRAY_BIN="/nonexistent/xray",
        PORTMETER_WEBHOOK_URL="http://127.0.0.1:9/hook",
        PORTMETER_WEBHOOK_SECRET="s" * 16,
        PORTMETER_REPORT_URL="http://127.0.0.1:9/api/traffic/webhook",
    )
    with umask(mask):
        daemon.start()
    first, second = daemon.create("alice"), daemon.create("bob")  # the second backs the config up
    udp_exchange(net, socket.AF_INET, first["port"], 3, 100, echo=False)
    daemon.api("POST", f"/api/keys/{second['id']}/disable")  # a webhook event
    daemon.api("GET", "/api/admin/usage/alice/detailed")  # saves: history and a fleet report
    assert daemon.stop() == 0
    with umask(mask):
        daemon.start()  # a start writes a backup of the state
    assert daemon.stop() == 0
    created = sorted(
        [
            *daemon.state_dir.rglob("*"),
            daemon.state_dir,
            *daemon.xray_config.parent.rglob("*"),
            daemon.xray_config.parent,
        ]
    )
    names = {p.relative_to(daemon.workdir).as_posix() for p in created}
    assert {
        "state/outbox",
        "state/reports",
        "state/backups",
        "state/history.sqlite3",
        "xray/config.json",
        "xray/backups",
    } <= names, names
    for directory in ("state/outbox", "state/reports", "state/backups", "xray/backups"):
        assert any((daemon.workdir / directory).iterdir()), directory
    wrong = {str(p): oct(mode(p)[0]) for p in created if mode(p) != expected_mode(p, daemon)}
    assert wrong == {}
    assert not [p for p in created if p.is_symlink() or p.name.endswith(".tmp")]
