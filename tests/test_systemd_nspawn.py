"""The shipped unit in a real systemd: a Debian bookworm container booted with systemd-nspawn.

A minimal rootfs is built once with debootstrap (from the mirror the host's apt uses) and cached
in /var/cache/portmeter-tests; each run boots a throw-away overlay of it (a copy where overlayfs
is not available) with its own network namespace, installs portmeter there with
scripts/install.sh from a wheelhouse built on the host (pip inside the container is offline), and
drives the container's systemd from the host through nsenter on the container's PID 1 (this works
whether or not the host itself runs systemd and machined).

The tests share one container and run in file order: start, journal, watchdog, stop, reboot,
power cut, security. Everything is removed afterwards, also when a test fails.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.systemd

CACHE = Path(os.environ.get("PORTMETER_TEST_CACHE", "/var/cache/portmeter-tests"))
SUITE = "bookworm"
VARIANT = "minbase"
INCLUDE = (
    "systemd,systemd-sysv,dbus,nftables,libnftables1,iproute2,python3,python3-venv,ca-certificates"
)
ROOTFS = CACHE / f"rootfs-{SUITE}"
STAMP = CACHE / f"rootfs-{SUITE}.stamp"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
CONTAINER_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

UNIT_FILE = REPO / "systemd" / "portmeter.service"
POLL_INTERVAL = 2  # PORTMETER_POLL_INTERVAL in the container
WATCHDOG_SEC = 5  # a drop-in shortens the shipped WatchdogSec so the watchdog test is quick
PAYLOAD = 1000  # UDP payload per datagram; nftables counts payload + 8 (UDP) + 20 (IPv4)
SCORE_LIMIT = 2.5


def _unit_setting(name: str) -> str:
    for line in UNIT_FILE.read_text().splitlines():
        if line.startswith(f"{name}="):
            return line.split("=", 1)[1].strip()
    raise AssertionError(f"{name}= not in {UNIT_FILE}")


RESTART_SEC = float(_unit_setting("RestartSec"))


def log(message: str) -> None:
    """Progress and figures on the terminal (-s) and in the report of a failing test."""
    print(f"[nspawn] {message}", flush=True)


# --- the cached rootfs ---------------------------------------------------------------------


def apt_mirror() -> str:
    """The Debian mirror the host's apt uses for the bookworm suite (PORTMETER_TEST_MIRROR wins)."""
    if os.environ.get("PORTMETER_TEST_MIRROR"):
        return os.environ["PORTMETER_TEST_MIRROR"]
    entries: list[tuple[str, list[str]]] = []  # (uri, suites) of every enabled `deb` source
    one_line = [
        Path("/etc/apt/sources.list"),
        *sorted(Path("/etc/apt/sources.list.d").glob("*.list")),
    ]
    for path in one_line:
        with contextlib.suppress(OSError):
            for line in path.read_text().splitlines():
                words = re.sub(r"\[[^]]*\]", " ", line.split("#", 1)[0]).split()  # no [options]
                if len(words) >= 3 and words[0] == "deb":
                    entries.append((words[1], [words[2]]))
    for path in sorted(Path("/etc/apt/sources.list.d").glob("*.sources")):
        with contextlib.suppress(OSError):
            for stanza in re.split(r"\n\s*\n", path.read_text()):
                fields: dict[str, str] = {}
                for line in stanza.splitlines():
                    if line.startswith("#") or ":" not in line or line[0].isspace():
                        continue
                    name, _, value = line.partition(":")
                    fields[name.strip().lower()] = value.strip()
                if (
                    fields.get("enabled", "yes").lower() == "no"
                    or "deb" not in fields.get("types", "").split()
                ):
                    continue
                for uri in fields.get("uris", "").split():
                    entries.append((uri, fields.get("suites", "").split()))
    for uri, suites in entries:
        if SUITE in suites and uri.startswith(("http://", "https://", "file:/")):
            return uri
    return DEFAULT_MIRROR


def _rootfs_recipe() -> str:
    return json.dumps({"suite": SUITE, "variant": VARIANT, "include": INCLUDE}, sort_keys=True)


def _rootfs_ready() -> bool:
    return (
        STAMP.is_file()
        and STAMP.read_text() == _rootfs_recipe()
        and all(
            (ROOTFS / p).exists()
            for p in ("lib/systemd/systemd", "usr/bin/python3", "usr/sbin/nft")
        )
    )


@contextlib.contextmanager
def cache_lock(exclusive: bool) -> Iterator[None]:
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield


def ensure_rootfs() -> None:
    """debootstrap the rootfs once; a missing or mismatched stamp means build it (again)."""
    with cache_lock(exclusive=True):
        if _rootfs_ready():
            return
        mirror = apt_mirror()
        partial = CACHE / f"rootfs-{SUITE}.partial"
        for stale in (partial, ROOTFS):
            shutil.rmtree(stale, ignore_errors=True)
        STAMP.unlink(missing_ok=True)
        log(f"building {ROOTFS} from {mirror} (once; cached afterwards)")
        started = time.monotonic()
        result = subprocess.run(
            [
                "debootstrap",
                f"--variant={VARIANT}",
                f"--include={INCLUDE}",
                SUITE,
                str(partial),
                mirror,
            ],
            check=False,
            capture_output=True,
            text=True,
            timeout=1800,
        )
        if result.returncode != 0:
            tail = "\n".join((result.stdout + result.stderr).splitlines()[-30:])
            shutil.rmtree(partial, ignore_errors=True)
            raise AssertionError(f"debootstrap from {mirror} failed ({result.returncode}):\n{tail}")
        partial.rename(ROOTFS)
        STAMP.write_text(_rootfs_recipe())
        log(f"rootfs built in {time.monotonic() - started:.0f}s")


def ensure_wheelhouse() -> Path:
    """Wheels of portmeter's dependencies (and of its build backend) for the container's pip.

    Built on the host, where pip reaches the package index; the container's pip installs from it
    with --no-index. Cached by the dependency list and the host's Python version (the container's
    is Debian's 3.11: the host venv's must be 3.11 too for compiled wheels to fit).
    """
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    requirements = [
        *project["project"]["dependencies"],
        *project["build-system"]["requires"],
        "wheel",
    ]
    digest = hashlib.sha256(json.dumps([requirements, sys.version_info[:2]]).encode()).hexdigest()[
        :16
    ]
    wheels = CACHE / f"wheels-{digest}"
    with cache_lock(exclusive=True):
        if (wheels / ".complete").is_file():
            return wheels
        partial = CACHE / f"wheels-{digest}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "wheel",
                "-q",
                "--disable-pip-version-check",
                "--wheel-dir",
                str(partial),
                *requirements,
            ],
            check=False,
            capture_output=True,
            text=True,
            timeout=900,
        )
        if result.returncode != 0:
            raise AssertionError(f"building the wheelhouse failed:\n{result.stdout}{result.stderr}")
        (partial / ".complete").write_text("\n".join(requirements))
        shutil.rmtree(wheels, ignore_errors=True)
        partial.rename(wheels)
        return wheels


# --- the container -------------------------------------------------------------------------


def host_runs_systemd() -> bool:
    return Path("/run/systemd/system").is_dir()


def nspawn_base(root: Path, name: str) -> list[str]:
    # --register=no: the test needs no machined. Without systemd on the host there is no one to
    # make a scope for the container: --keep-unit keeps it in the test's own cgroup.
    command = [
        "systemd-nspawn",
        "--quiet",
        "-D",
        str(root),
        "-M",
        name,
        "--register=no",
        "--link-journal=no",
        "--resolv-conf=off",
        "--timezone=off",
    ]
    if not host_runs_systemd():
        command.append("--keep-unit")
    return command


class Container:
    def __init__(self, root: Path, name: str, workdir: Path) -> None:
        self.root = root
        self.name = name
        self.workdir = workdir
        self.process: subprocess.Popen[bytes] | None = None
        self.leader = 0
        self.boots = 0

    # running things

    def run(
        self, script: str, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        """A shell script inside the container (all its namespaces, a clean environment)."""
        assert self.leader, "container not running"
        result = subprocess.run(
            [
                "nsenter",
                "-t",
                str(self.leader),
                "-a",
                "--",
                "/usr/bin/env",
                "-i",
                f"PATH={CONTAINER_PATH}",
                "LANG=C.UTF-8",
                "SYSTEMD_COLORS=0",
                "SYSTEMD_PAGER=",
                "/bin/sh",
                "-c",
                script,
            ],
            check=False,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"in the container, `{script}` exited {result.returncode}:\n"
                f"{result.stdout}{result.stderr}"
            )
        return result

    def out(self, script: str, timeout: float = 60) -> str:
        return self.run(script, timeout=timeout).stdout

    def props(self, unit: str, *names: str) -> dict[str, str]:
        text = self.out(f"systemctl show --timestamp=us+utc -p {','.join(names)} {unit}")
        return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)

    def journal(self, *args: str) -> list[dict[str, Any]]:
        text = self.out("journalctl --no-pager -o json " + " ".join(args), timeout=60)
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def events(self, *args: str) -> list[dict[str, Any]]:
        """portmeter's own entries (not systemd's about it), oldest first, with `logfmt` parsed."""
        found = []
        for entry in self.journal("_SYSTEMD_UNIT=portmeter.service", *args):
            message = entry.get("MESSAGE")
            if isinstance(message, str) and "event=" in message:
                entry["logfmt"] = dict(re.findall(r'(\w+)=("(?:[^"\\]|\\.)*"|\S*)', message))
                found.append(entry)
        return found

    def send_udp(self, port: int, count: int) -> int:
        """`count` datagrams to the key's port on the container's loopback; the bytes counted."""
        self.run(
            "python3 -c 'import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
            f'[s.sendto(bytes({PAYLOAD}), ("127.0.0.1", {port})) for _ in range({count})]\''
        )
        return count * (PAYLOAD + 28)

    # life cycle

    def boot(self, timeout: float = 120) -> float:
        self.boots += 1
        command = [
            *nspawn_base(self.root, self.name),
            "--boot",
            "--private-network",
            "--console=read-only",
        ]
        started = time.monotonic()
        with open(self.workdir / f"console-{self.boots}.log", "wb") as console:
            self.process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=console,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = started + timeout
        self.leader = 0
        while not self.leader:
            if self.process.poll() is not None:
                raise AssertionError(
                    f"systemd-nspawn exited {self.process.returncode}:\n{self.console()}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(f"no container init after {timeout}s:\n{self.console()}")
            self.leader = _container_init(self.process.pid)
            time.sleep(0.05)
        state = ""
        while state not in ("running", "degraded"):
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"container not up after {timeout}s ({state!r}):\n{self.console()}"
                )
            if self.process.poll() is not None:
                raise AssertionError(f"container stopped while booting:\n{self.console()}")
            result = self.run("systemctl is-system-running --wait", check=False, timeout=timeout)
            state = result.stdout.strip()
            if state not in ("running", "degraded"):
                time.sleep(0.2)
        if state == "degraded":
            log(
                "container is degraded: "
                + self.run("systemctl --failed --no-legend", check=False).stdout
            )
        seconds = time.monotonic() - started
        log(f"boot {self.boots}: {seconds:.1f}s")
        return seconds

    def wait_exit(self, timeout: float) -> int | None:
        assert self.process is not None
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            return None
        self.leader = 0
        return code

    def reboot(self) -> None:
        """`systemctl reboot` inside: nspawn leaves with 133 and the test boots it again."""
        self.run("systemctl reboot --no-block")
        code = self.wait_exit(90)
        assert code == 133, f"reboot: systemd-nspawn exited {code}:\n{self.console()}"
        self.boot()

    def power_cut(self) -> None:
        """SIGKILL to the container's PID 1: every process in it dies at once, nothing is saved."""
        os.kill(self.leader, signal.SIGKILL)
        assert self.wait_exit(30) is not None, "container survived SIGKILL of its init"
        self.boot()

    def shut_down(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        with contextlib.suppress(Exception):
            if self.leader:
                self.run("systemctl poweroff --no-block", check=False, timeout=15)
        if self.wait_exit(45) is None:
            leader = _container_init(self.process.pid)
            if leader:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(leader, signal.SIGKILL)
            if self.wait_exit(15) is None:
                self.process.kill()
                self.process.wait(15)

    def console(self) -> str:
        logs = sorted(self.workdir.glob("console-*.log"))
        return logs[-1].read_text(errors="replace")[-6000:] if logs else ""


def _container_init(nspawn_pid: int) -> int:
    """The child of systemd-nspawn that is PID 1 in its own PID namespace, or 0."""
    for children in Path(f"/proc/{nspawn_pid}/task").glob("*/children"):
        with contextlib.suppress(OSError):
            for pid in children.read_text().split():
                status = Path(f"/proc/{pid}/status").read_text()
                nspid = re.search(r"^NSpid:\s+(.*)$", status, re.MULTILINE)
                if nspid and nspid.group(1).split()[-1] == "1":
                    return int(pid)
    return 0


# --- setting up one run --------------------------------------------------------------------


def _repo_files() -> list[str]:
    result = subprocess.run(
        ["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        capture_output=True,
        text=True,
        check=True,
    )
    return [name for name in result.stdout.split("\0") if name and (REPO / name).is_file()]


def _copy_repo(dest: Path) -> None:
    for name in _repo_files():
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, target, follow_symlinks=False)


def _write(path: Path, text: str, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)


def _prepare(root: Path) -> None:
    _copy_repo(root / "opt/portmeter-src")
    _write(
        root / "etc/portmeter/portmeter.env",
        f"PORTMETER_XRAY_CONFIG=\nPORTMETER_POLL_INTERVAL={POLL_INTERVAL}\n",
    )
    _write(
        root / "etc/systemd/system/portmeter.service.d/10-test.conf",
        "# The test's only change to the shipped unit: a short watchdog.\n"
        f"[Service]\nWatchdogSec={WATCHDOG_SEC}\n",
    )
    # A stand-in for Xray, so the sandbox check can prove `systemctl restart xray` works.
    _write(
        root / "etc/systemd/system/xray.service",
        "[Unit]\nDescription=stand-in for Xray\n[Service]\nExecStart=/bin/sleep infinity\n",
    )
    (root / "usr/local/etc/xray").mkdir(parents=True, exist_ok=True)
    # The container keeps no console getty busy and no timers that wake apt.
    for unit in ("console-getty.service", "apt-daily.timer", "apt-daily-upgrade.timer"):
        link = root / "etc/systemd/system" / unit
        link.unlink(missing_ok=True)
        link.symlink_to("/dev/null")


def _install(root: Path, name: str, wheels: Path) -> float:
    started = time.monotonic()
    result = subprocess.run(
        [
            *nspawn_base(root, f"{name}-install"),
            "--pipe",
            "--private-network",
            f"--bind-ro={wheels}:/wheels",
            "--setenv=PIP_NO_INDEX=1",
            "--setenv=PIP_FIND_LINKS=/wheels",
            "--setenv=PIP_DISABLE_PIP_VERSION_CHECK=1",
            f"--setenv=PATH={CONTAINER_PATH}",
            "--chdir=/opt/portmeter-src",
            "/bin/bash",
            "scripts/install.sh",
        ],
        stdin=subprocess.DEVNULL,
        check=False,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, (
        f"scripts/install.sh in the container failed:\n{result.stdout}{result.stderr}"
    )
    return time.monotonic() - started


def _overlay(lower: Path, workdir: Path) -> Path:
    """A writable view of the cached rootfs: overlayfs, or a copy where that cannot be mounted."""
    merged = workdir / "root"
    for sub in ("upper", "work", "root"):
        (workdir / sub).mkdir()
    options = f"lowerdir={lower},upperdir={workdir / 'upper'},workdir={workdir / 'work'}"
    mounted = subprocess.run(
        ["mount", "-t", "overlay", "overlay", "-o", options, str(merged)],
        check=False,
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        log(f"overlayfs unavailable ({mounted.stderr.strip()}): copying the rootfs")
        merged.rmdir()
        subprocess.run(["cp", "-a", "--reflink=auto", str(lower), str(merged)], check=True)
    return merged


def _remove_workdir(workdir: Path) -> None:
    merged = workdir / "root"
    unmount = ["umount", str(merged)]
    if (
        os.path.ismount(merged)
        and subprocess.run(unmount, check=False, capture_output=True).returncode
    ):
        subprocess.run(["umount", "--lazy", str(merged)], check=False, capture_output=True)
    shutil.rmtree(workdir, ignore_errors=True)


def _sweep_leftovers() -> None:
    """Work dirs of earlier runs whose pytest died without cleaning up (their pid is gone)."""
    for old in Path("/var/tmp").glob("portmeter-nspawn-*"):
        pid = old.name.split("-")[2]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            for proc in Path("/proc").iterdir():
                with contextlib.suppress(OSError):
                    if (
                        proc.name.isdigit()
                        and str(old / "root").encode() in (proc / "cmdline").read_bytes()
                    ):
                        init = _container_init(int(proc.name))
                        if init:
                            os.kill(init, signal.SIGKILL)
            time.sleep(1)
            _remove_workdir(old)


def _unusable_host() -> str | None:
    """Why this host cannot run systemd-nspawn at all, or None."""
    missing = [
        tool for tool in ("systemd-nspawn", "debootstrap", "nsenter") if shutil.which(tool) is None
    ]
    if missing:
        return (
            f"{', '.join(missing)} not installed "
            "(Debian packages systemd-container, debootstrap, util-linux)"
        )
    if not Path("/proc/self/ns/pid").exists() or not Path("/sys/fs/cgroup").is_dir():
        return "no PID namespaces or no cgroup file system"
    return None


def _probe_nspawn() -> str | None:
    """Run /bin/true in the cached rootfs (read-only, own network namespace); the error, or None."""
    result = subprocess.run(
        [
            *nspawn_base(ROOTFS, f"pmprobe{os.getpid()}"),
            "--read-only",
            "--pipe",
            "--private-network",
            "/bin/true",
        ],
        stdin=subprocess.DEVNULL,
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if result.returncode != 0:
        return (
            f"systemd-nspawn cannot start a container here ({result.returncode}): "
            f"{result.stderr.strip()[-500:]}"
        )
    return None


@dataclass
class Run:
    """The booted container and what the tests learn and send along the way."""

    box: Container
    key_id: str = ""
    port: int = 0
    expected_rx: int = 0  # bytes sent to the key's port so far
    figures: dict[str, Any] = field(default_factory=dict)

    def state_rx(self) -> int:
        """The key's saved rx total, read as the daemon reads its state (snapshot and journal)."""
        load = (
            "from pathlib import Path; from daemon.store.state import StateStore; "
            "state = StateStore(Path('/var/lib/portmeter/state.json')).load(); "
            f"print(state.keys[{self.key_id!r}].rx.bytes)"
        )
        return int(self.box.out(f'/opt/portmeter/venv/bin/python -c "{load}"'))

    def api_traffic(self) -> dict[str, Any]:
        return json.loads(self.box.out(f"portmeter traffic {self.key_id} --json"))

    def wait_saved(self, rx: int, timeout: float = POLL_INTERVAL * 4 + 5) -> None:
        deadline = time.monotonic() + timeout
        while (have := self.state_rx()) != rx:
            assert time.monotonic() < deadline, f"state file holds rx {have}, expected {rx} by now"
            time.sleep(0.3)


@pytest.fixture(scope="module")
def run() -> Iterator[Run]:
    reason = _unusable_host()
    if reason:
        pytest.skip(f"cannot run systemd-nspawn: {reason}")
    ensure_rootfs()
    probe = _probe_nspawn()
    if probe:
        pytest.skip(probe)
    wheels = ensure_wheelhouse()
    _sweep_leftovers()
    name = f"pmtest-{os.getpid()}-{secrets.token_hex(3)}"
    workdir = Path(tempfile.mkdtemp(prefix=f"portmeter-nspawn-{os.getpid()}-", dir="/var/tmp"))
    box = Container(workdir / "root", name, workdir)
    started = time.monotonic()
    try:
        with cache_lock(exclusive=False):  # no rebuild of the rootfs underneath a running overlay
            root = _overlay(ROOTFS, workdir)
            box.root = root
            _prepare(root)
            log(f"install.sh in the container: {_install(root, name, wheels):.1f}s")
            box.boot()
            yield Run(box)
    finally:
        box.shut_down()
        _remove_workdir(workdir)
        for leftover in (
            Path("/run/systemd/nspawn/propagate") / name,
            Path("/run/systemd/nspawn/propagate") / f"{name}-install",
        ):
            shutil.rmtree(leftover, ignore_errors=True)
        log(f"container {name}: {time.monotonic() - started:.0f}s from copy to clean-up")


# --- the tests -----------------------------------------------------------------------------


def _when(systemd_timestamp: str) -> datetime:
    """`systemctl show --timestamp=us+utc` → aware datetime."""
    return datetime.strptime(systemd_timestamp, "%a %Y-%m-%d %H:%M:%S.%f UTC").replace(tzinfo=UTC)


def _logged_at(entry: dict[str, Any]) -> datetime:
    """The daemon's own time of an event (timestamp= of its key=value line)."""
    return datetime.fromisoformat(entry["logfmt"]["timestamp"].strip('"'))


def _only(entries: list[dict[str, Any]], event: str) -> dict[str, Any]:
    found = [e for e in entries if e["logfmt"].get("event") == event]
    assert len(found) == 1, (
        f"expected one {event}, found {len(found)}: {[e['MESSAGE'] for e in entries]}"
    )
    return found[0]


def test_start_returns_once_the_daemon_said_ready(run: Run) -> None:
    box = run.box
    assert box.props("portmeter.service", "ActiveState")["ActiveState"] == "inactive"
    box.run("systemctl start --no-block portmeter")
    seen = []
    deadline = time.monotonic() + 60
    while not seen or seen[-1] != "active":
        assert time.monotonic() < deadline, f"never active: {seen}"
        state = box.props("portmeter.service", "ActiveState")["ActiveState"]
        if not seen or seen[-1] != state:
            seen.append(state)
        assert state in ("inactive", "activating", "active"), (
            f"start failed: {seen}\n{box.out('journalctl -u portmeter --no-pager')}"
        )
        time.sleep(0.02)
    box.run("systemctl start portmeter")  # joins the job: returns at once now
    p = box.props(
        "portmeter.service",
        "ActiveState",
        "SubState",
        "StatusText",
        "MainPID",
        "InvocationID",
        "ExecMainStartTimestamp",
        "ActiveEnterTimestamp",
    )
    assert (p["ActiveState"], p["SubState"], p["StatusText"]) == (
        "active",
        "running",
        "counting",
    ), p
    assert "activating" in seen, f"the unit was never seen activating: {seen}"
    ready = _only(box.events(f"_SYSTEMD_INVOCATION_ID={p['InvocationID']}"), "daemon_ready")
    exec_start, ready_at, active_at = (
        _when(p["ExecMainStartTimestamp"]),
        _logged_at(ready),
        _when(p["ActiveEnterTimestamp"]),
    )
    # active only after READY=1: systemd entered "active" after the daemon logged daemon_ready,
    # which it does right before sending READY=1, and only after reconciling the table.
    assert exec_start < ready_at <= active_at, (exec_start, ready_at, active_at)
    started_msgs = [
        e
        for e in box.journal("_PID=1", "UNIT=portmeter.service")
        if e.get("JOB_TYPE") == "start" and e.get("JOB_RESULT") == "done"
    ]
    assert started_msgs, "no 'Started portmeter.service' message from systemd"
    assert int(started_msgs[-1]["__REALTIME_TIMESTAMP"]) >= ready_at.timestamp() * 1e6
    assert box.run("nft list table inet portmeter", check=False).returncode == 0
    run.figures["start_to_active_s"] = round((active_at - exec_start).total_seconds(), 2)
    log(
        f"states seen: {seen}; "
        f"ExecMainStart → daemon_ready {(ready_at - exec_start).total_seconds():.3f}s"
        f" → active {(active_at - ready_at).total_seconds() * 1000:.1f}ms later"
    )


def test_journal_carries_structured_fields(run: Run) -> None:
    box = run.box
    created = json.loads(box.out("portmeter keys add alice --json"))
    run.key_id, run.port = created["id"], int(created["port"])
    invocation = box.props("portmeter.service", "InvocationID")["InvocationID"]
    entries = box.events(f"_SYSTEMD_INVOCATION_ID={invocation}")
    ready, key = _only(entries, "daemon_ready"), _only(entries, "key_created")
    # The key=value line, as `journalctl -u portmeter` shows it.
    assert ready["logfmt"]["level"] == "info" and ready["logfmt"]["table"] == "portmeter"
    assert key["logfmt"]["key_id"] == run.key_id and key["logfmt"]["port"] == str(run.port)
    assert key["logfmt"]["name"] == "alice"
    # A table lost while the daemon runs: rebuilt within a poll interval, logged as an error.
    box.run("nft delete table inet portmeter")
    deadline = time.monotonic() + POLL_INTERVAL * 3 + 5
    while not [e for e in entries if e["logfmt"].get("event") == "table_missing"]:
        assert time.monotonic() < deadline, "no table_missing after the table was deleted"
        time.sleep(0.3)
        entries = box.events(f"_SYSTEMD_INVOCATION_ID={invocation}")
    lost = _only(entries, "table_missing")
    assert lost["logfmt"]["level"] == "error"
    assert f"{run.port}" in box.out("nft list map inet portmeter rx")
    # The same fields as journal fields of their own (daemon/logs/journald.py's native protocol).
    missing = [name for name in ("EVENT", "LEVEL", "KEY_ID", "PORT") if name not in key]
    assert not missing, (
        f"journal entry has no field(s) {missing}: events reach the journal as plain stdout lines, "
        f"not through daemon/logs/journald.py. Entry: {json.dumps(key, indent=1)[:1500]}"
    )
    assert (key["EVENT"], key["KEY_ID"], key["PORT"], key["NAME"]) == (
        "key_created",
        run.key_id,
        str(run.port),
        "alice",
    )
    assert (ready["EVENT"], ready["TABLE"], ready["KEYS"], ready["PORT_RANGE"]) == (
        "daemon_ready",
        "portmeter",
        "0",
        "10001-10100",
    )
    assert ready["PRIORITY"] == key["PRIORITY"] == "6" and key["SYSLOG_IDENTIFIER"] == "portmeter"
    assert (lost["EVENT"], lost["PRIORITY"], lost["TABLE"]) == ("table_missing", "3", "portmeter")
    errors = box.out("journalctl --no-pager -o cat -u portmeter -p err")
    assert "event=table_missing" in errors and "event=key_created" not in errors
    assert box.out(
        f"journalctl --no-pager -o cat -u portmeter EVENT=key_created KEY_ID={run.key_id}"
    ).strip()


def test_watchdog_kills_and_restarts_a_hung_daemon(run: Run) -> None:
    box = run.box
    before = box.props("portmeter.service", "MainPID", "NRestarts")
    started = time.monotonic()
    box.run("systemctl kill -s SIGSTOP portmeter")
    limit = WATCHDOG_SEC + RESTART_SEC + 20  # + the daemon's own start-up and slack for a busy host
    while True:
        now = box.props("portmeter.service", "MainPID", "NRestarts", "ActiveState", "SubState")
        if now["MainPID"] not in ("0", before["MainPID"]) and (
            now["ActiveState"],
            now["SubState"],
        ) == ("active", "running"):
            break
        assert time.monotonic() - started < limit, f"not restarted after {limit}s: {now}"
        time.sleep(0.2)
    elapsed = time.monotonic() - started
    assert int(now["NRestarts"]) == int(before["NRestarts"]) + 1
    messages = [str(e.get("MESSAGE")) for e in box.journal("_PID=1", "UNIT=portmeter.service")]
    said = "\n".join(messages[-12:])
    assert any("Watchdog timeout" in m for m in messages), said
    assert any("Failed with result 'watchdog'" in m for m in messages), said
    # The daemon pings every WatchdogSec/2: the watchdog fires between WatchdogSec/2 and
    # WatchdogSec after the SIGSTOP, and the restart follows RestartSec later.
    assert WATCHDOG_SEC / 2 + RESTART_SEC <= elapsed <= WATCHDOG_SEC + RESTART_SEC + 10, said
    run.figures["watchdog_restart_s"] = round(elapsed, 1)
    log(
        f"SIGSTOP → new MainPID active in {elapsed:.1f}s "
        f"(WatchdogSec={WATCHDOG_SEC}, RestartSec={RESTART_SEC:g})"
    )
    assert json.loads(
        box.out(f"portmeter traffic {run.key_id} --json")
    )  # the key survived the kill


def test_stop_writes_a_final_snapshot(run: Run) -> None:
    box = run.box
    invocation = box.props("portmeter.service", "InvocationID")["InvocationID"]
    run.wait_saved(run.expected_rx)
    # No traffic, nothing to save: a regular poll leaves the file alone from here on.
    time.sleep(POLL_INTERVAL + 0.5)
    before = float(box.out("stat -c %.9Y /var/lib/portmeter/state.json"))
    run.expected_rx += box.send_udp(run.port, 40)
    stop_at = time.time()
    box.run("systemctl stop portmeter")
    after = float(box.out("stat -c %.9Y /var/lib/portmeter/state.json"))
    assert run.state_rx() == run.expected_rx, (
        "the bytes sent right before the stop are not in the state file"
    )
    assert after > before
    entries = box.events(f"_SYSTEMD_INVOCATION_ID={invocation}")
    stopping, stopped = _only(entries, "daemon_stopping"), _only(entries, "daemon_stopped")
    assert stopping["logfmt"]["signal"] == "SIGTERM"
    assert stop_at - 1 <= _logged_at(stopping).timestamp() <= _logged_at(stopped).timestamp()
    assert after >= _logged_at(stopping).timestamp() - 0.01, "state file not written after SIGTERM"
    assert box.props("portmeter.service", "ActiveState", "Result") == {
        "ActiveState": "inactive",
        "Result": "success",
    }
    log(f"stop: final snapshot {after - stop_at:.3f}s after `systemctl stop`, rx {run.expected_rx}")


def test_reboot_keeps_the_totals_and_logs_the_lost_table(run: Run) -> None:
    box = run.box
    box.run("systemctl enable --now portmeter")
    run.expected_rx += box.send_udp(run.port, 30)
    run.wait_saved(run.expected_rx)
    run.expected_rx += box.send_udp(run.port, 20)  # within the last poll interval
    box.reboot()  # a new network namespace: the nft table is gone
    assert box.props("portmeter.service", "ActiveState")["ActiveState"] == "active"
    traffic = run.api_traffic()
    # A clean reboot stops the daemon first: its final snapshot holds every byte.
    assert traffic["rx_bytes"] == run.expected_rx and traffic["tx_bytes"] == 0, traffic
    missing = _only(box.events("-b"), "table_missing")
    assert missing["logfmt"]["level"] == "error"
    assert f"{run.port}" in box.out("nft list map inet portmeter rx")
    log(f"reboot: rx {traffic['rx_bytes']} == sent {run.expected_rx}; table_missing logged")


def test_power_cut_loses_at_most_one_poll_interval(run: Run) -> None:
    box = run.box
    run.expected_rx += box.send_udp(run.port, 30)
    run.wait_saved(run.expected_rx)
    saved = run.expected_rx
    recent = box.send_udp(run.port, 25)  # sent less than one poll interval before the cut
    run.expected_rx += recent
    box.power_cut()
    traffic = run.api_traffic()
    assert saved <= traffic["rx_bytes"] <= run.expected_rx, (
        saved,
        traffic["rx_bytes"],
        run.expected_rx,
    )
    lost = run.expected_rx - traffic["rx_bytes"]
    missing = _only(box.events("-b"), "table_missing")
    assert missing["logfmt"]["level"] == "error"
    run.figures["power_cut_lost_bytes"] = lost
    log(
        f"power cut: {lost} of the {recent} bytes sent in the last poll interval lost; "
        "table_missing logged"
    )
    run.expected_rx = traffic["rx_bytes"]


def test_security_exposure_and_the_sandbox_still_works(run: Run) -> None:
    box = run.box
    report = box.out("systemd-analyze security --no-pager portmeter.service")
    match = re.search(r"Overall exposure level for portmeter\.service: (\d+\.\d+)", report)
    assert match, report[-2000:]
    score = float(match.group(1))
    run.figures["security_exposure"] = score
    offline = ""
    if shutil.which("systemd-analyze"):
        with tempfile.TemporaryDirectory() as tmp:
            copy = Path(tmp) / "portmeter.service"
            shutil.copy(UNIT_FILE, copy)
            result = subprocess.run(
                ["systemd-analyze", "security", "--offline=yes", "--no-pager", str(copy)],
                check=False,
                capture_output=True,
                text=True,
                cwd=tmp,
            )
            found = re.search(
                r"Overall exposure level for portmeter\.service: (\d+\.\d+)", result.stdout
            )
            offline = f"; on the host --offline=yes: {found.group(1) if found else 'n/a'}"
    log(f"systemd-analyze security portmeter.service: {score}{offline}")
    assert score <= SCORE_LIMIT, report

    # Under the very same sandbox: nftables (CAP_NET_ADMIN), the state dir, the Xray config dir
    # and `systemctl restart xray` all work, and the rest of the OS is read-only.
    sandbox = [
        line
        for line in UNIT_FILE.read_text()
        .split("[Service]", 1)[1]
        .split("[Install]", 1)[0]
        .splitlines()
        if line
        and not line.startswith(
            ("#", "Type=", "NotifyAccess=", "ExecStart=", "WatchdogSec=", "Restart")
        )
    ]
    probe = (
        "systemctl restart xray.service && systemctl is-active -q xray.service"
        " && nft list table inet portmeter >/dev/null"
        " && touch /var/lib/portmeter/.probe && rm /var/lib/portmeter/.probe"
        " && touch /usr/local/etc/xray/.probe && rm /usr/local/etc/xray/.probe"
        " && ! touch /etc/.probe 2>/dev/null && ! touch /opt/.probe 2>/dev/null"
    )
    unit = (
        "[Service]\nType=oneshot\nExecStart=/bin/sh -c '"
        + probe
        + "'\n"
        + "\n".join(sandbox)
        + "\n"
    )
    _write(box.root / "etc/systemd/system/pmsandbox.service", unit)
    box.run("systemctl start xray.service")
    xray_before = box.props("xray.service", "MainPID")["MainPID"]
    result = box.run("systemctl daemon-reload && systemctl start pmsandbox.service", check=False)
    assert result.returncode == 0, result.stderr + box.out("journalctl --no-pager -u pmsandbox")
    assert box.props("xray.service", "MainPID")["MainPID"] != xray_before, "xray was not restarted"
