"""schemathesis against the daemon's own /openapi.json: in-process, and over the real socket.

One fuzz run per module, in-process (tests/inprocess.py: the app exactly as the Unix socket serves
it, over the in-memory kernel, with the Xray integration on and a poll after each operation), goes
through every operation the document lists with positive and negative data; a third of the cases
aim at keys that exist (by id, uuid and name) so the paths past "no key" are reached too. The run
records every case instead of stopping at the first failure, and the tests below judge the record:
no 5xx anywhere, and every answer matches the schema the document gives for it. A short run
against the real daemon in its own namespace, over its Unix socket, proves the same of the real
process and nftables table.
"""

from __future__ import annotations

import collections
import io
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests
import schemathesis
import urllib3
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from requests.adapters import HTTPAdapter
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import FailureGroup
from schemathesis.core.result import Err, Ok
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import response_schema_conformance

from daemon.allocator import PortRange
from tests.conftest import REPO, Daemon
from tests.inprocess import FIRST_PORT, InProcessDaemon, inprocess_daemon

MAX_EXAMPLES = 40  # per operation and strategy kind; the whole module stays well under 3 minutes
SMOKE_EXAMPLES = 5  # the same, for the short run against the real daemon
SEED_NAMES = ("alpha", "beta two", "gamma.3")
BASE_URL = "http://portmeter"
Target = Daemon | InProcessDaemon


# --- requests to the daemon: over its Unix socket, or to the in-process app ----------------------


class _UnixConnection(urllib3.connection.HTTPConnection):
    def __init__(self, socket_path: str, *args: Any, **kwargs: Any) -> None:
        super().__init__("portmeter", *args, **kwargs)
        self.socket_path = socket_path

    def _new_conn(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(30)
        sock.connect(self.socket_path)
        return sock


class _UnixPool(urllib3.connectionpool.HTTPConnectionPool):
    def __init__(self, socket_path: str) -> None:
        super().__init__("portmeter", maxsize=4)
        self.socket_path = socket_path

    def _new_conn(self) -> _UnixConnection:
        return _UnixConnection(self.socket_path, timeout=30)


class UnixAdapter(HTTPAdapter):
    """Every request of the session goes to the daemon's socket, whatever host the URL names."""

    def __init__(self, socket_path: str) -> None:
        super().__init__()
        self.pool = _UnixPool(socket_path)

    def get_connection_with_tls_context(
        self, request: Any, verify: Any, proxies: Any = None, cert: Any = None
    ) -> _UnixPool:
        return self.pool

    def close(self) -> None:
        self.pool.close()
        super().close()


class AppAdapter(HTTPAdapter):
    """Every request of the session goes to the in-process app, on the service's own event loop
    (schemathesis' own ASGI transport would run the app on an event loop of its own)."""

    def __init__(self, inproc: InProcessDaemon) -> None:
        super().__init__()
        self.inproc = inproc

    def send(
        self, request: requests.PreparedRequest, *args: Any, **kwargs: Any
    ) -> requests.Response:
        body = request.body.encode() if isinstance(request.body, str) else request.body
        answer = self.inproc.http.request(
            request.method or "GET", request.path_url, headers=dict(request.headers), content=body
        )
        raw = urllib3.HTTPResponse(
            body=io.BytesIO(answer.content),
            headers=urllib3.HTTPHeaderDict(answer.headers.multi_items()),
            status=answer.status_code,
            version=11,
            reason=answer.reason_phrase,
            preload_content=False,
        )
        return self.build_response(request, raw)


def session_of(target: Target) -> requests.Session:
    session = requests.Session()
    session.trust_env = False
    if isinstance(target, InProcessDaemon):
        session.mount("http://", AppAdapter(target))
    else:
        session.mount("http://", UnixAdapter(str(target.socket)))
    return session


# --- the run ---------------------------------------------------------------------------------


@dataclass
class Finding:
    check: str
    operation: str
    status: int
    message: str
    curl: str
    body: str


@dataclass
class FuzzRecord:
    operations: list[str] = field(default_factory=list)
    takes_input: dict[str, bool] = field(default_factory=dict)
    cases: collections.Counter[str] = field(default_factory=collections.Counter)
    statuses: collections.Counter[tuple[str, int]] = field(default_factory=collections.Counter)
    undocumented: collections.Counter[tuple[str, int]] = field(default_factory=collections.Counter)
    findings: list[Finding] = field(default_factory=list)
    failed: collections.Counter[tuple[str, str, int]] = field(default_factory=collections.Counter)
    seconds: float = 0.0

    def add(self, finding: Finding) -> None:
        # Count them all, keep the first of each kind: enough to reproduce, short enough to read.
        kind = (finding.check, finding.operation, finding.status)
        self.failed[kind] += 1
        if self.failed[kind] == 1:
            self.findings.append(finding)

    def of(self, check: str) -> list[Finding]:
        return [f for f in self.findings if f.check == check]

    def summary(self) -> str:
        total, count = sum(self.cases.values()), len(self.operations)
        lines = [f"schemathesis: {total} cases over {count} operations in {self.seconds:.1f}s"]
        for op in self.operations:
            codes = ", ".join(
                f"{code}x{n}" for (o, code), n in sorted(self.statuses.items()) if o == op
            )
            lines.append(f"  {op}: {self.cases[op]} cases ({codes})")
        if self.undocumented:
            gaps = sorted({(op, code) for op, code in self.undocumented})
            lines.append("  statuses the document does not list: "
                         + "; ".join(f"{op} {code}" for op, code in gaps))
        return "\n".join(lines)


def headline(failure: BaseException) -> str:
    """A failure's title and the first line of its message (the rest repeats the schema)."""
    message = (getattr(failure, "message", None) or str(failure)).strip()
    parts = [getattr(failure, "title", ""), message.splitlines()[0] if message else ""]
    return ": ".join(part for part in parts if part)


def describe(record: FuzzRecord, findings: list[Finding]) -> str:
    return "\n".join(
        f"[{f.check}] {f.operation} -> {f.status} "
        f"({record.failed[(f.check, f.operation, f.status)]} cases)"
        f"\n  {f.message[:200]}\n  e.g. {f.curl[:240]}\n  answer: {f.body[:240]}"
        for f in findings
    )


def ensure_seed_keys(daemon: Target) -> list[str]:
    """The seed keys exist (the fuzzer deletes and disables them); their ids, uuids and names."""
    refs: list[str] = []
    for name in SEED_NAMES:
        response = daemon.http.get(f"/api/keys/{name}")
        if response.status_code == 404:
            response = daemon.http.post("/api/keys", json={"name": name})
        if response.status_code not in (200, 201):
            continue  # e.g. the range is full: the fuzzer created that many keys
        key = response.json()
        refs += [key["id"], key["uuid"], key["name"]]
    return refs


def sub_tokens(daemon: Target) -> list[str]:
    keys = daemon.http.get("/api/keys").json()["keys"]
    return [k["subscription_url"].rsplit("/", 1)[1] for k in keys if k.get("subscription_url")]


# Paths a random string never hits: a directory, a file that is not JSON, not UTF-8, too long.
MIGRATION_SOURCES = ("/", "/proc/self/status", "/bin/sh", "/nonexistent/config.json", "/a\x00b",
                     "/" + "a" * 4000, "/tmp/../etc/hostname")


def takes_input(operation: Any) -> bool:
    raw = operation.definition.raw
    return bool(raw.get("parameters") or raw.get("requestBody"))


def known_refs(names: list[str], daemon: Target) -> list[str]:
    """Keys that exist, for an operation whose first path parameter names one."""
    if "key_id" in names:
        return ensure_seed_keys(daemon)
    return sub_tokens(daemon) if "token" in names else []


def case_strategy(operation: Any, daemon: Target) -> st.SearchStrategy[Any]:
    kinds = [
        operation.as_strategy(GenerationMode.POSITIVE),
        operation.as_strategy(GenerationMode.NEGATIVE),
    ]
    names = [p.name for p in operation.path_parameters]
    known = known_refs(names, daemon)
    if known and names:
        kinds.append(st.sampled_from(known).flatmap(
            lambda ref: operation.as_strategy(
                GenerationMode.POSITIVE, path_parameters={names[0]: ref}
            )))
    if known and operation.label == "PATCH /api/keys/{key_id}":
        # A valid change of a key that exists: schema-valid bodies are mostly refused by the
        # bounds or change nothing, so without this a run could see no 200 at all.
        kinds.append(st.tuples(st.sampled_from(known), st.text(max_size=20)).flatmap(
            lambda seed: operation.as_strategy(
                GenerationMode.POSITIVE, path_parameters={"key_id": seed[0]},
                body={"note": seed[1]},
            )))
    if operation.label == "POST /api/system/xray/migrate":
        kinds.append(st.tuples(st.sampled_from(MIGRATION_SOURCES), st.booleans()).flatmap(
            lambda source: operation.as_strategy(
                body={"config_path": source[0], "dry_run": source[1]}
            )))
    return st.one_of(kinds)


def exercise(
    operation: Any, daemon: Target, session: requests.Session, record: FuzzRecord, examples: int
) -> None:
    """Send one operation's generated cases to the daemon; record each answer and what it broke."""
    label = operation.label
    if label not in record.operations:
        record.operations.append(label)
        record.takes_input[label] = takes_input(operation)
    documented = {str(code) for code in operation.definition.raw.get("responses", {})}

    @settings(max_examples=examples * 3, deadline=None, database=None, derandomize=False,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    @given(case=case_strategy(operation, daemon))
    def run(case: Any) -> None:
        response = case.call(session=session, base_url=BASE_URL)
        record.cases[label] += 1
        record.statuses[(label, response.status_code)] += 1
        if str(response.status_code) not in documented and "default" not in documented:
            record.undocumented[(label, response.status_code)] += 1
        for check in (not_a_server_error, response_schema_conformance):
            try:
                case.validate_response(response, checks=[check])
            except (FailureGroup, AssertionError) as exc:
                message = " | ".join(headline(f) for f in getattr(exc, "exceptions", [exc]))
                record.add(Finding(check.__name__, label, response.status_code, message,
                                   case.as_curl_command(base_url=BASE_URL), response.text[:500]))
        if response.status_code >= 500:  # belt and braces, whatever the check's config says
            record.add(Finding("status_below_500", label, response.status_code, "a 5xx answer",
                               case.as_curl_command(base_url=BASE_URL), response.text[:500]))

    run()


def fuzz(
    daemon: Target, examples: int, poll: Callable[[], None] | None = None, under: str = "/"
) -> FuzzRecord:
    """Fuzz the operations of the daemon's document whose path starts with `under`; `poll` after
    each (the real daemon's own poll loop runs meanwhile)."""
    record = FuzzRecord()
    schema = schemathesis.openapi.from_dict(daemon.api("GET", "/openapi.json"))
    results = list(schema.get_all_operations())
    assert not [result.err() for result in results if isinstance(result, Err)]
    found = [result.ok() for result in results if isinstance(result, Ok)]
    operations = [operation for operation in found if operation.path.startswith(under)]
    started = time.monotonic()
    with session_of(daemon) as session:
        for operation in operations:
            exercise(operation, daemon, session, record, examples)
            if poll is not None:
                poll()
        # Operations without input are one request each: they go again at the end, when the
        # fuzzer has left keys with odd names, notes, limits and statuses for them to show.
        for operation in operations:
            if not takes_input(operation):
                exercise(operation, daemon, session, record, examples)
    record.seconds = time.monotonic() - started
    return record


def state_check(state_dir: Path) -> subprocess.CompletedProcess[str]:
    """`portmeter state check` on a state dir (it reads the files, not the socket)."""
    return subprocess.run(
        [sys.executable, "-m", "daemon", "state", "check", "--state-dir", str(state_dir)],
        cwd=REPO, capture_output=True, text=True, timeout=60, check=False,
    )


def assert_survived(daemon: Target) -> None:
    """The daemon still answers, its table matches its state, and the saved state is valid."""
    assert daemon.api("GET", "/api/system/ports/status")["valid"]
    checked = state_check(daemon.state_dir)
    assert checked.returncode == 0 and "valid" in checked.stdout, checked.stderr


# --- the in-process layer: the whole run ------------------------------------------------------


@dataclass
class Fuzzed:
    daemon: InProcessDaemon
    record: FuzzRecord


@pytest.fixture(scope="module")
def fuzzed() -> Iterator[Fuzzed]:
    ports = PortRange(FIRST_PORT, FIRST_PORT + 299)
    with inprocess_daemon(port_range=ports) as daemon:
        ensure_seed_keys(daemon)
        record = fuzz(daemon, MAX_EXAMPLES, daemon.poll)
        print("\n" + record.summary())
        yield Fuzzed(daemon, record)


def test_every_operation_was_fuzzed(fuzzed: Fuzzed) -> None:
    record = fuzzed.record
    assert len(record.operations) >= 15, record.operations
    assert "POST /api/keys" in record.operations and "GET /sub/{token}" in record.operations
    for op in record.operations:
        least = MAX_EXAMPLES if record.takes_input[op] else 2
        assert record.cases[op] >= least, (op, record.cases[op])
    # The fuzzer got past "no such key" and past validation, not only into the error paths.
    for op in ("PATCH /api/keys/{key_id}", "DELETE /api/keys/{key_id}", "GET /sub/{token}"):
        assert record.statuses[(op, 200)] > 0, op


def test_no_server_errors(fuzzed: Fuzzed) -> None:
    errors = fuzzed.record.of("not_a_server_error") + fuzzed.record.of("status_below_500")
    assert not errors, "5xx answers:\n" + describe(fuzzed.record, errors)


def test_every_response_matches_its_schema(fuzzed: Fuzzed) -> None:
    mismatches = fuzzed.record.of("response_schema_conformance")
    assert not mismatches, (
        "answers that do not match the document:\n" + describe(fuzzed.record, mismatches)
    )


def test_daemon_survived_the_fuzzing(fuzzed: Fuzzed) -> None:
    fuzzed.daemon.poll()  # its poll still runs, as the real daemon's loop does
    assert_survived(fuzzed.daemon)


# --- the kernel layer: a short run over the real daemon's socket -------------------------------


def test_real_daemon_survives_fuzzing_over_its_socket(make_daemon: Callable[..., Daemon]) -> None:
    """The same checks against the real process, over its socket, for the operations on keys:
    the ones that change its nftables table (poll loop on)."""
    daemon = make_daemon(size=300, PORTMETER_POLL_INTERVAL="1")
    ensure_seed_keys(daemon)
    record = fuzz(daemon, SMOKE_EXAMPLES, under="/api/keys")
    print("\n" + record.summary())
    assert {"POST /api/keys", "PATCH /api/keys/{key_id}"} <= set(record.operations)
    assert not record.findings, "failed checks:\n" + describe(record, record.findings)
    assert daemon.process is not None and daemon.process.poll() is None, daemon.log()
    assert_survived(daemon)
