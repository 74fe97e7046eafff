"""Stateful fuzzing of the real daemon: random sequences of good and bad operations.

A hypothesis rule-based state machine drives one real daemon (its own namespace, table, port
range and state dir) through creates, changes, resets, deletes and hostile bodies, and keeps a
model of the keys that must exist. After every step the daemon must still answer, no answer may
be a 5xx, and the key set must equal the model (a refused request changed nothing). At the end
of every example `portmeter state check` must call the state valid and a restart (clean or
`kill -9`) must come up with the same keys: the known attack (one request poisons the
state and the daemon never starts again) is exactly what this searches for.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from typing import Any, ClassVar, TypeVar
from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, initialize, invariant, rule

from tests.conftest import REPO, Daemon

pytestmark = pytest.mark.kernel

T = TypeVar("T")
EXAMPLES = 25
STEPS = 20

NAMES = st.one_of(
    st.sampled_from(
        [
            "alice",
            "Alice",
            "bob",
            "café",
            "cafe\u0301",
            "a\u200db",
            "аlice",
            "ｂｏｂ",
            "deadbeef",
            "0b5e9a9e-3f0a-4c55-9d0e-2b1b1f1d2c3e",
            "",
            " ",
            "x" * 200,
        ]
    ),
    st.text(min_size=1, max_size=12),
)
HUGE = [2**63 - 1, 2**63, 2**63 + 5, 2**64 - 1, 2**64, 10**30, -1]
LIMITS = st.one_of(
    st.none(),
    st.booleans(),
    st.sampled_from(HUGE),
    st.sampled_from(HUGE),
    st.integers(min_value=0, max_value=10**19),
    st.sampled_from(
        [
            "50GB",
            "1 GiB",
            "20000PB",
            "18446744073709551616",
            "٥GB",
            "1e3",
            "GB",
            "-5MB",
            "1.5 TB",
            "none",
        ]
    ),
)
MOMENTS = st.one_of(
    st.none(),
    st.sampled_from(
        [
            "+30d",
            "+99999999d",
            "2027-01-31",
            "0001-01-01",
            "9999-12-31",
            "yesterday",
            "+0d",
            "1970-01-01T00:00:00Z",
        ]
    ),
)
CHANGES = st.fixed_dictionaries(
    {},
    optional={
        "data_limit_bytes": LIMITS,
        "expire_at": MOMENTS,
        "enabled": st.one_of(st.booleans(), st.sampled_from(["yes", 1, 0, None])),
        "reset_strategy": st.sampled_from(["no_reset", "day", "week", "month", "year", "bogus"]),
        "note": st.one_of(st.text(max_size=40), st.just("\x1b[31m\x07\x00")),
    },
)
HOSTILE = st.sampled_from(
    [
        b"{",
        b"[]",
        b"null",
        b'{"name": 5}',
        b"\xff\xfe",
        b'{"name": "a"' * 40,
        b"[" * 40 + b"]" * 40,
        b'{"data_limit_bytes": 1e400}',
    ]
)


class Broken(Exception):
    """The daemon broke a rule; the machine stops sending and the test reports the steps."""


class DaemonMachine(RuleBasedStateMachine):
    """Drives the daemon and checks it against a model of the keys that exist.

    The daemon's state outlives an example, so hypothesis must never replay one (a replay is a
    different run): the first broken rule is recorded in `failure` with the steps that led to
    it, every later step does nothing, and the test asserts on the record at the end.
    """

    daemon: Daemon  # set by the test before the machine runs
    failure: str | None = None
    refused: ClassVar[set[str]] = set()  # distinct requests answered 4xx, for the closing figures
    restarts = 0
    kill_on_restart = False

    keys = Bundle("keys")
    seeds = Bundle("seeds")  # never deleted, so changes keep reaching a key that exists

    def __init__(self) -> None:
        super().__init__()
        self.steps: list[str] = []
        self.model: set[str] = set()
        self.created = 0
        self._guarded(lambda: self.model.update(self._names()))

    def _guarded(self, step: Callable[[], T]) -> T | None:
        if DaemonMachine.failure is not None:
            return None
        try:
            return step()
        except Exception as exc:  # noqa: BLE001 - every way of breaking is a finding
            trail = "\n  ".join(self.steps[-25:])
            DaemonMachine.failure = f"{type(exc).__name__}: {exc}\nsteps:\n  {trail}"
            return None

    def _names(self) -> set[str]:
        return {key["name"] for key in self.daemon.api("GET", "/api/keys")["keys"]}

    def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        self.steps.append(f"{method} {path} {kwargs.get('json', kwargs.get('content'))!r}")
        response = self.daemon.http.request(method, path, **kwargs)
        self.steps.append(f"  -> {response.status_code} {response.text[:200]}")
        if response.status_code >= 500:
            raise Broken(f"{method} {path} answered {response.status_code}")
        if response.status_code >= 400 and "detail" not in response.json():
            raise Broken(f"{method} {path} answered {response.status_code} without a detail")
        if response.status_code >= 400:
            DaemonMachine.refused.add(self.steps[-2])
        return response

    def _create(self, body: dict[str, Any]) -> str:
        def create() -> None:
            response = self._send("POST", "/api/keys", json=body)
            if response.status_code == 201:
                self.model.add(response.json()["name"])

        self._guarded(create)
        return str(body["name"])

    def _on(self, key: str, method: str, tail: str = "", **kwargs: Any) -> None:
        self._guarded(
            lambda: self._send(method, f"/api/keys/{quote(key, safe='')}{tail}", **kwargs)
        )

    @initialize(target=seeds)
    def a_valid_key(self) -> str:
        self.created += 1
        return self._create({"name": f"seed{self.created}x{id(self) % 997}"})

    @rule(key=seeds, limit=LIMITS)
    def change_limit(self, key: str, limit: Any) -> None:
        self._on(key, "PATCH", json={"data_limit_bytes": limit})

    @rule(target=keys, name=NAMES, changes=CHANGES)
    def create(self, name: str, changes: dict[str, Any]) -> str:
        return self._create({"name": name, **changes})

    @rule(target=keys, name=NAMES, port=st.integers(min_value=-5, max_value=70000))
    def create_on_port(self, name: str, port: int) -> str:
        return self._create({"name": name, "port": port})

    @rule(key=st.one_of(seeds, keys), changes=CHANGES)
    def change(self, key: str, changes: dict[str, Any]) -> None:
        self._on(key, "PATCH", json=changes)

    @rule(key=st.one_of(seeds, keys))
    def reset(self, key: str) -> None:
        self._on(key, "POST", "/traffic/port/reset")

    @rule(key=st.one_of(seeds, keys), verb=st.sampled_from(["disable", "enable"]))
    def toggle(self, key: str, verb: str) -> None:
        self._on(key, "POST", f"/{verb}")

    @rule(key=keys)
    def delete(self, key: str) -> None:
        def delete() -> None:
            response = self._send("DELETE", f"/api/keys/{quote(key, safe='')}")
            if response.status_code == 200:
                self.model.discard(response.json()["name"])

        self._guarded(delete)

    @rule(body=HOSTILE, path=st.sampled_from(["/api/keys", "/api/keys/alice"]))
    def hostile(self, body: bytes, path: str) -> None:
        method = "POST" if path == "/api/keys" else "PATCH"
        headers = {"content-type": "application/json"}
        self._guarded(lambda: self._send(method, path, content=body, headers=headers))

    @invariant()
    def answers_and_matches_the_model(self) -> None:
        self._guarded(self._check_model)

    def _check_model(self) -> None:
        if self._names() != self.model:
            raise Broken(f"keys {sorted(self._names())} but the model says {sorted(self.model)}")
        self._send("GET", "/api/traffic/ports/exact")

    def teardown(self) -> None:
        self._guarded(self._check_and_restart)

    def _check_and_restart(self) -> None:
        self.steps.append(f"state check, then restart (kill -9: {self.kill_on_restart})")
        check = subprocess.run(
            [
                sys.executable,
                "-m",
                "daemon",
                "state",
                "check",
                "--state-dir",
                str(self.daemon.state_dir),
            ],
            check=False,
            cwd=REPO,
            env=self.daemon.env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        if check.returncode != 0:
            raise Broken(f"state check failed: {check.stdout}{check.stderr}")
        if self.kill_on_restart:
            self.daemon.kill9()
        elif self.daemon.stop() != 0:
            raise Broken("the daemon did not stop cleanly")
        DaemonMachine.kill_on_restart = not self.kill_on_restart
        self.daemon.start()
        DaemonMachine.restarts += 1
        self._check_model()


def test_no_sequence_of_requests_poisons_the_daemon(daemon: Daemon) -> None:
    DaemonMachine.daemon = daemon
    DaemonMachine.failure = None
    machine = DaemonMachine.TestCase
    machine.settings = settings(
        max_examples=EXAMPLES,
        stateful_step_count=STEPS,
        deadline=None,
        derandomize=True,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    machine().runTest()
    print(
        f"distinct refused requests: {len(DaemonMachine.refused)}, "
        f"restarts verified: {DaemonMachine.restarts}"
    )
    assert DaemonMachine.failure is None, f"{DaemonMachine.failure}\n{daemon.log()[-3000:]}"
