"""Hypothesis-driven fuzzing of the `portmeter` command against a real daemon.

argv is built from the real vocabulary (subcommands, options, key names, ids, sizes, dates) and
then mutated with random strings: unicode, empty, very long, option-like, with newlines, and raw
bytes that are not UTF-8 (what a Latin-1 terminal sends). Whatever comes in, the command must
end the way the CLI promises: exit 0, 1 or 2, no traceback, and when it fails exactly one line on
stderr starting with "portmeter:".

Most examples run `daemon.cli.main(argv)` in this process (fast, hypothesis can shrink them);
some run `python -m daemon ...` as a real subprocess with bytes argv, the stronger test.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from daemon import cli
from tests.conftest import REPO, Daemon, fresh_port_range
from tests.netlab import lab

pytestmark = pytest.mark.kernel

IN_PROCESS_EXAMPLES = 300
BYTES_EXAMPLES = 100
SUBPROCESS_EXAMPLES = 30
SEED_NAMES = ("alice", "bob smith", "carol.3")


@dataclass
class Target:
    daemon: Daemon
    cwd: Path
    refs: list[str]  # ids, uuids and names of keys that existed at the start

    @property
    def env(self) -> dict[str, str]:
        # `state restore` asks $PORTMETER_SOCKET whether a daemon runs: it does, so it refuses and
        # never replaces a state file; `state` without --state-dir looks at the daemon's own.
        return {
            "PORTMETER_SOCKET": str(self.daemon.socket),
            "PORTMETER_STATE_DIR": str(self.daemon.state_dir),
        }


@pytest.fixture(scope="module")
def target() -> Iterator[Target]:
    workdir = Path(tempfile.mkdtemp(prefix="pm-"))
    try:
        with lab() as net:
            daemon = Daemon(net.server, workdir / "d", fresh_port_range(300))
            try:
                daemon.start()
                refs: list[str] = []
                for name in SEED_NAMES:
                    key = daemon.create(name, data_limit_bytes="1GB", note="seed")
                    refs += [key["id"], key["uuid"], key["name"]]
                cwd = workdir / "cwd"  # relative paths the fuzzer makes up land here
                cwd.mkdir()
                yield Target(daemon, cwd, refs)
            finally:
                daemon.close()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


# --- argv ------------------------------------------------------------------------------------

WORDS = [
    "keys",
    "add",
    "list",
    "show",
    "rm",
    "set",
    "disable",
    "enable",
    "traffic",
    "reset",
    "ports",
    "xray",
    "status",
    "sync",
    "validate",
    "migrate",
    "state",
    "check",
    "restore",
    "--port",
    "--limit",
    "--expire",
    "--reset",
    "--note",
    "--qr",
    "--json",
    "--dry-run",
    "--rollback",
    "--state-dir",
    "-h",
    "--help",
    "--",
    "-",
    "-x",
    "--x",
    "--json=1",
    "--port=1",
    "-qr",
    "--socket",
]
# argv cannot hold NUL, nor a surrogate that is not the decoding of a byte (see not_utf8 below)
TEXT = st.characters(exclude_characters="\x00", exclude_categories=["Cs"])

junk = st.one_of(
    st.text(TEXT, max_size=12),
    st.just(""),
    st.sampled_from(
        [
            "-x",
            "--",
            "-",
            "--x",
            "-1",
            "--port=5",
            "-h",
            " ",
            "\n",
            "a\nb",
            "é",
            "名前",
            "👍",
            "\u202e",
            "%2F",
            "../..",
            "/",
            "'",
            '"',
            "\\",
            "$(id)",
            "*",
        ]
    ),
    st.text(TEXT, min_size=60, max_size=300),
    st.builds(
        lambda c, n: c * n,
        st.sampled_from(["a", "é", "/", "-", " ", "€", "👍"]),
        st.integers(255, 30_000),  # 4 bytes a char: under 128 KiB an arg
    ),
)
# Bytes that are not UTF-8 (a Latin-1 terminal), decoded the way Python decodes a real argv.
not_utf8 = (
    st.binary(min_size=1, max_size=12)
    .filter(lambda b: b"\x00" not in b)
    .map(lambda b: os.fsdecode(b"caf\xe9" + b))
)
sizes = st.sampled_from(
    [
        "50GB",
        "1.5GiB",
        "500MB",
        "0",
        "none",
        "unlimited",
        "-1",
        "1e30",
        "GB",
        "99999999999999999999999999GB",
        "50 GB",
        "5XB",
        "nan",
        "inf",
    ]
)
moments = st.sampled_from(
    [
        "+30d",
        "+0d",
        "+12h",
        "+2w",
        "2027-01-31",
        "2027-01-31T12:00:00+02:00",
        "2020-01-01",
        "never",
        "none",
        "+99999999999d",
        "2027-13-45",
        "+-1d",
        "9999-12-31T23:59:59",
        "0000-01-01",
        "tomorrow",
    ]
)
ports = st.one_of(st.integers(-1, 70000).map(str), st.sampled_from(["0x10", "1e3", " 1", "٣"]))
paths = st.sampled_from(
    [
        "/",
        "/nonexistent/config.json",
        "/etc/hostname",
        "/proc/self/status",
        "config.json",
        ".",
        "/" + "a" * 300,
        "/dev/null",
    ]
)


@st.composite
def argvs(draw: st.DrawFn, target: Target, raw: bool = False) -> list[str]:
    """An argv of the real vocabulary, mutated; with `raw`, many values are not UTF-8."""
    junk_ = st.one_of(not_utf8, not_utf8, junk) if raw else junk
    known = st.sampled_from(target.refs)
    key = st.one_of(known, known, junk_)
    name = st.one_of(
        st.from_regex(r"[A-Za-z0-9][A-Za-z0-9 .@+_-]{0,20}[A-Za-z0-9]", fullmatch=True),
        st.sampled_from(SEED_NAMES),
        junk_,
    )

    def some(strategy: st.SearchStrategy[str]) -> str:
        return draw(st.one_of(strategy, strategy, strategy, strategy, junk_))

    def limit_options() -> list[str]:
        options: list[str] = []
        for flag, values in (
            ("--port", ports),
            ("--limit", sizes),
            ("--expire", moments),
            ("--reset", st.sampled_from(["no_reset", "day", "week", "month"])),
            ("--note", st.text(TEXT, max_size=40)),
        ):
            if draw(st.booleans()):
                options += [flag, some(values)]
        return options

    command = draw(
        st.sampled_from(
            [
                "add",
                "list",
                "show",
                "rm",
                "set",
                "disable",
                "enable",
                "traffic",
                "traffic key",
                "traffic reset",
                "ports",
                "xray",
                "migrate",
                "rollback",
                "state check",
                "state restore",
            ]
        )
    )
    words: list[str] = {
        "add": lambda: ["keys", "add", draw(name), *limit_options()],
        "list": lambda: ["keys", "list"],
        "show": lambda: ["keys", "show", draw(key), *(["--qr"] if draw(st.booleans()) else [])],
        "rm": lambda: ["keys", "rm", draw(key)],
        "set": lambda: ["keys", "set", draw(key), *limit_options()],
        "disable": lambda: ["keys", "disable", draw(key)],
        "enable": lambda: ["keys", "enable", draw(key)],
        "traffic": lambda: ["traffic"],
        "traffic key": lambda: ["traffic", draw(key)],
        "traffic reset": lambda: ["traffic", "reset", draw(key)],
        "ports": lambda: ["ports"],
        "xray": lambda: ["xray", some(st.sampled_from(["status", "sync", "validate"]))],
        "migrate": lambda: [
            "migrate",
            some(paths),
            *(["--dry-run"] if draw(st.booleans()) else []),
        ],
        "rollback": lambda: ["migrate", "--rollback"],
        "state check": lambda: [
            "state",
            "check",
            *(
                [
                    "--state-dir",
                    some(st.sampled_from([str(target.daemon.state_dir), "/nonexistent", "."])),
                ]
                if draw(st.booleans())
                else []
            ),
        ],
        "state restore": lambda: ["state", "restore", "--state-dir", str(target.daemon.state_dir)],
    }[command]()
    # Mutations (insert, replace, drop a word), mostly after the command words so that most
    # argvs still reach the daemon; one in eight anywhere, the command words included.
    first = (
        0
        if draw(st.integers(0, 7)) == 0
        else min(len(words), 2 if words[0] in ("keys", "traffic") else 1)
    )
    for _ in range(draw(st.sampled_from([0, 0, 0, 0, 0, 1, 2, 3]))):
        how = draw(st.sampled_from(["insert", "replace", "drop"]))
        word = st.one_of(st.sampled_from(WORDS), junk_)
        if how == "insert" or len(words) <= first:
            words.insert(draw(st.integers(first, len(words))), draw(word))
        elif how == "replace":
            words[draw(st.integers(first, len(words) - 1))] = draw(word)
        else:
            del words[draw(st.integers(first, len(words) - 1))]
    if draw(st.booleans()):
        words.insert(draw(st.integers(0, len(words))), "--json")
    # `portmeter run` would start a daemon outside the lab's namespace: never a word here.
    words = [word for word in words if word != "run"]
    return ["--socket", str(target.daemon.socket), *words]


# --- outcome ---------------------------------------------------------------------------------


@dataclass
class Outcome:
    argv: list[str]
    code: int
    stdout: str
    stderr: str
    crash: str = ""  # a traceback that escaped main()


def judge(outcome: Outcome) -> None:
    """The CLI's promise, one assertion per line so hypothesis reports each broken rule apart."""
    what = f"argv={outcome.argv!r}\nexit={outcome.code}\nstderr={outcome.stderr[-2000:]!r}"
    assert not outcome.crash, f"exception escaped main():\n{outcome.crash}\n{what}"
    assert "Traceback" not in outcome.stderr, what
    assert outcome.code in (0, 1, 2), what
    if outcome.code != 0:
        lines = outcome.stderr.rstrip("\n").split("\n")
        assert len(lines) == 1, f"{len(lines)} lines on stderr\n{what}"
        assert lines[0].startswith("portmeter: "), what
        assert outcome.stdout == "", what


def run_in_process(target: Target, argv: list[str]) -> Outcome:
    # Like a real process under a UTF-8 locale: stdout strict, stderr backslashreplace.
    out = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="strict", write_through=True)
    err = io.TextIOWrapper(
        io.BytesIO(), encoding="utf-8", errors="backslashreplace", write_through=True
    )
    crash = ""
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main(argv)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except Exception:  # noqa: BLE001 - anything escaping main() is the finding
            code, crash = 1, traceback.format_exc()
    text = [s.buffer.getvalue().decode("utf-8", errors="replace") for s in (out, err)]  # type: ignore[attr-defined]
    return Outcome(argv, code, text[0], text[1], crash)


def run_subprocess(target: Target, argv: list[str]) -> Outcome:
    env = {**target.daemon.env, **target.env, "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-m", "daemon", *[os.fsencode(word) for word in argv]],
        cwd=target.cwd,
        env=env,
        capture_output=True,
        timeout=60,
        check=False,
    )
    return Outcome(
        argv,
        result.returncode,
        result.stdout.decode("utf-8", errors="replace"),
        result.stderr.decode("utf-8", errors="replace"),
    )


@contextlib.contextmanager
def client_environment(target: Target) -> Iterator[None]:
    never_run = mock.patch.object(
        cli, "run_daemon_command", side_effect=AssertionError("started a daemon")
    )
    with mock.patch.dict(os.environ, target.env), contextlib.chdir(target.cwd), never_run:
        yield


FUZZ = settings(
    deadline=None, database=None, suppress_health_check=list(HealthCheck), print_blob=True
)


def test_cli_fuzz_in_process(target: Target) -> None:
    seen: dict[int, int] = {}

    @settings(FUZZ, max_examples=IN_PROCESS_EXAMPLES)
    @given(data=st.data())
    def run(data: st.DataObject) -> None:
        argv = data.draw(argvs(target), label="argv")
        outcome = run_in_process(target, argv)
        seen[outcome.code] = seen.get(outcome.code, 0) + 1
        judge(outcome)

    with client_environment(target):
        run()
    print(f"\nCLI in-process: {sum(seen.values())} runs, exit codes {dict(sorted(seen.items()))}")
    assert seen.get(0, 0) > 0 and seen.get(1, 0) > 0 and seen.get(2, 0) > 0, seen


@pytest.mark.parametrize(
    "argv",
    [
        ["ports", "--x\ny"],  # argparse echoes the newline raw
        ["state", "check", "--state-dir", "a" * 300],  # a path component over NAME_MAX
        ["keys", "show", os.fsdecode(b"\xff")],  # not UTF-8: the key in the URL
        ["keys", "add", "x", "--note", os.fsdecode(b"caf\xe9")],  # not UTF-8: the JSON body
        ["keys", "show", "é" * 11000],  # URL over httpx's 65536 limit
    ],
    ids=[
        "newline-in-unknown-option",
        "long-state-dir",
        "non-utf8-key",
        "non-utf8-note",
        "url-too-long",
    ],
)
def test_cli_inputs_the_fuzzer_found(target: Target, argv: list[str]) -> None:
    argv = ["--socket", str(target.daemon.socket), *argv]
    with client_environment(target):
        judge(run_in_process(target, argv))
    judge(run_subprocess(target, argv))


def test_cli_fuzz_not_utf8_argv(target: Target) -> None:
    @settings(FUZZ, max_examples=BYTES_EXAMPLES)
    @given(data=st.data())
    def run(data: st.DataObject) -> None:
        argv = data.draw(argvs(target, raw=True), label="argv")
        judge(run_in_process(target, argv))

    with client_environment(target):
        run()


def test_cli_fuzz_subprocess(target: Target) -> None:
    """Real processes: the interpreter's own argv decoding, stdout encoding and exit path."""
    runs: list[int] = []

    # No shrinking: each step is a process; the failing argv is reported as found.
    @settings(FUZZ, max_examples=SUBPROCESS_EXAMPLES, phases=[Phase.explicit, Phase.generate])
    @given(data=st.data())
    def run(data: st.DataObject) -> None:
        argv = data.draw(argvs(target, raw=data.draw(st.integers(0, 3)) == 0), label="argv")
        outcome = run_subprocess(target, argv)
        runs.append(outcome.code)
        judge(outcome)

    run()
    print(f"\nCLI subprocesses: {len(runs)} runs")


def test_daemon_survived_the_cli_fuzzing(target: Target) -> None:
    daemon = target.daemon
    assert daemon.process is not None and daemon.process.poll() is None, daemon.log()
    assert daemon.api("GET", "/api/system/ports/status")["valid"]
    failed = [line[:400] for line in daemon.log().splitlines() if "request_failed" in line]
    assert not failed, "the daemon answered 500 to the CLI:\n" + "\n".join(failed)
