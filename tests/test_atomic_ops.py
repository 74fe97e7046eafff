"""Every operation is all or nothing, in memory too; one key's failure stays its own.

In-process (tests/inprocess.py): the real Service, StateStore and Xray side (apply mode "none") on
a temporary directory, over the in-memory kernel table (daemon.kernel.MemoryKernel) that can
refuse any step. A failure injected at the kernel, Xray or state-file step of any operation,
whatever the exception, must leave memory, the state files, the Xray config and the table exactly
as before, and answer an OperationError (4xx/503/507), never anything a client would see as a 500.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from daemon.bounds import MAX_EPOCH, MAX_KERNEL_QUOTA, MAX_LIMIT_BYTES
from daemon.errors import OperationError, XrayRefused
from daemon.http.app import create_app
from daemon.kernel import MemoryKernel, NftError, OutOfRange
from daemon.limits import Quota
from daemon.nft import codec as nl
from daemon.nft.layout import Transaction, checked_quota
from daemon.service import KeySpec, Service
from daemon.service.kernel_side import desired_quota
from daemon.service.loops import poll_loop
from daemon.service.xray_side import MIGRATION_LABEL, Pushed, XraySide
from daemon.store.state import State, StateStore, StorageError
from daemon.xray.render import InboundChanges
from daemon.xray_sync import ApplyResult, XrayApplier
from tests.inprocess import started
from tests.test_migration import shared_config

MUTATIONS = ("build", "install", "enforce", "remove", "remove_present")
STATUS_EVENTS = {"key_active", "key_limited", "key_expired", "key_disabled", "key_reset"}


class FailingStore(StateStore):
    """The real store; `refuse` makes the next saves raise it before anything is written."""

    refuse: Exception | None = None

    def save(self, state: State, changed: Any = None) -> None:
        if self.refuse is not None:
            raise self.refuse
        super().save(state, changed)


class FailingBridge(XraySide):
    """The real Xray side; `refuse` makes pushes raise it before anything is written, and makes
    Xray refuse what a rollback wrote (the step after the file was replaced)."""

    refuse: Exception | None = None

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.applier = FailingApplier(self)

    async def push(self, state: State, **options: Any) -> Pushed:
        if self.refuse is not None:
            raise self.refuse
        return await super().push(state, **options)


class FailingApplier(XrayApplier):
    """The real applier (mode "none"), raising its bridge's `refuse` instead of applying."""

    def __init__(self, bridge: FailingBridge) -> None:
        super().__init__(bridge.options)
        self.bridge = bridge

    async def apply(self, changes: InboundChanges, *, force_restart: bool = False) -> ApplyResult:
        if self.bridge.refuse is not None:
            raise self.bridge.refuse
        return await super().apply(changes, force_restart=force_restart)


@dataclass
class Rig:
    service: Service
    table: MemoryKernel
    store: FailingStore
    bridge: FailingBridge
    directory: Path
    keys: dict[str, str] = field(default_factory=dict)  # name -> id

    @property
    def xray_config(self) -> Path:
        return self.directory / "xray" / "config.json"

    def files(self) -> tuple[bytes, bytes, bytes, list[str]]:
        """State file, journal, Xray config and the pre-migration copies a rollback restores."""
        journal = self.store.journal
        kept = self.xray_config.parent.glob(f"backups/*{MIGRATION_LABEL}*")
        return (
            self.store.path.read_bytes(),
            journal.read_bytes() if journal.exists() else b"",
            self.xray_config.read_bytes(),
            sorted(path.name for path in kept),
        )

    def memory(self) -> tuple[Any, ...]:
        service = self.service
        return (
            service.state.model_dump(), list(service.state.keys), dict(service.settler.quotas),
            dict(service.failures.errors),
        )

    def everything(self) -> tuple[Any, ...]:
        return self.memory(), self.files(), self.table.contents()

    def arm(self, step: str, error: Exception) -> None:
        if step == "kernel":
            self.table.refuse = {(name, None): error for name in MUTATIONS}
        elif step == "xray":
            self.bridge.refuse = error
        else:
            self.store.refuse = error

    def disarm(self) -> None:
        self.table.refuse, self.bridge.refuse, self.store.refuse = {}, None, None


@contextlib.asynccontextmanager
async def rig(with_keys: bool = True, **extra: Any) -> AsyncIterator[Rig]:
    """A started service with three keys: limited (with traffic), unlimited, disabled."""
    async with started(
        xray_config=shared_config(), history=False, store=FailingStore, side=FailingBridge, **extra
    ) as inside:
        service = inside.service
        assert isinstance(inside.store, FailingStore) and isinstance(inside.xray, FailingBridge)
        made = Rig(service, inside.kernel, inside.store, inside.xray, inside.directory)
        if with_keys:
            for key_name, settings_ in (
                ("limited", {"data_limit_bytes": 10_000}), ("open", {}),
                ("off", {"enabled": False}),
            ):
                made.keys[key_name] = (await service.create_key(key_name, None, settings_)).id
            inside.kernel.add_traffic(service.state.keys[made.keys["limited"]].port, rx=4_000)
            await service.poll_once()
        yield made


# --- one operation per entry: what it does to the rig -----------------------------------------


Operation = Callable[[Rig], Awaitable[object]]
OPERATIONS: dict[str, Operation] = {
    "create": lambda r: r.service.create_key("new", None, {"data_limit_bytes": 5_000}),
    "create unlimited": lambda r: r.service.create_key("plain"),
    "create batch": lambda r: r.service.create_many(
        [KeySpec("b1", None, {"data_limit_bytes": 5_000}), KeySpec("b2"), KeySpec("b3")]
    ),
    "raise limit": lambda r: r.service.update_key(r.keys["limited"], {"data_limit_bytes": 90_000}),
    "lower limit": lambda r: r.service.update_key(r.keys["limited"], {"data_limit_bytes": 3_000}),
    "lift limit": lambda r: r.service.update_key(r.keys["limited"], {"data_limit_bytes": None}),
    "set limit": lambda r: r.service.update_key(r.keys["open"], {"data_limit_bytes": 1}),
    "disable": lambda r: r.service.update_key(r.keys["limited"], {"enabled": False}),
    "enable": lambda r: r.service.update_key(r.keys["off"], {"enabled": True}),
    "note": lambda r: r.service.update_key(r.keys["open"], {"note": "changed"}),
    "reset": lambda r: r.service.reset_traffic(r.keys["limited"]),
    "delete": lambda r: r.service.delete_key(r.keys["limited"]),
    "migrate": lambda r: r.service.migrate(r.xray_config, dry_run=False),
    "rollback": lambda r: r.service.rollback_migration(),
}
# What an operation needs done first (unarmed, as earlier steps are).
PREPARE: dict[str, Operation] = {"rollback": OPERATIONS["migrate"]}
# Operations whose kernel step comes after the save: its failure is logged, the operation stands.
KERNEL_LAST = ("delete", "rollback")
FAILURES: dict[str, list[Exception]] = {
    "kernel": [
        NftError("create quota q_20001: Value too large for defined data type", errno.EOVERFLOW),
        NftError("netlink: Operation not permitted", errno.EPERM),
        OutOfRange("q_20001: a limit of 18446744073709551616 bytes is outside 0..2^63-1"),
        OverflowError("int too big to convert"),
        ValueError("unexpected value"),
        RuntimeError("a bug"),
    ],
    "xray": [XrayRefused("xray refused the config"), RuntimeError("a bug")],
    "save": [
        StorageError("cannot write state.json: No space left on device"), RuntimeError("a bug"),
    ],
}


# Operations that leave every key in place, to run before the one that fails.
BEFOREHAND = ["raise limit", "lower limit", "lift limit", "set limit", "disable", "enable", "note",
              "reset", "traffic"]


async def beforehand(r: Rig, name: str, traffic: int) -> None:
    """One earlier step; a refusal of it (e.g. enabling an enabled key) is fine here."""
    if name == "traffic":
        r.table.add_traffic(r.service.state.keys[r.keys["limited"]].port, rx=traffic)
        await r.service.poll_once()
        return
    with contextlib.suppress(OperationError):
        await OPERATIONS[name](r)


@pytest.mark.parametrize("step", sorted(FAILURES))
@pytest.mark.parametrize("name", sorted(OPERATIONS))
@given(data=st.data())
@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_a_failed_step_leaves_everything_as_it_was(
    name: str, step: str, data: st.DataObject
) -> None:
    """Property: after any earlier steps, whatever the failing step raises, a refused operation
    leaves memory, state files, Xray config and table exactly as before and logs one line; an
    operation that went through saved exactly what it holds; the next operation works."""
    error = data.draw(st.sampled_from(FAILURES[step]), label="error")
    earlier = data.draw(st.lists(st.sampled_from(BEFOREHAND), max_size=3), label="earlier")
    traffic = data.draw(st.integers(0, 20_000), label="traffic")

    async def run() -> None:
        async with rig() as r:
            for earlier_name in earlier:
                await beforehand(r, earlier_name, traffic)
            if name in PREPARE:
                await PREPARE[name](r)
            await r.service.poll_once()  # what the kernel counted is in, as an operation reads it
            before = r.everything()
            r.arm(step, error)
            with capture_logs() as logs:
                try:
                    await OPERATIONS[name](r)
                except OperationError as refusal:
                    assert refusal.status in (422, 503, 507), refusal.detail
                    refused = True
                else:
                    refused = False
            r.disarm()
            # Every operation pushes Xray and saves; one whose kernel step failed must fail too
            # (a deletion removes its counters only once it is saved: that failure is logged).
            hit = step != "kernel" or (r.table.refused > 0 and name not in KERNEL_LAST)
            assert refused or not hit, f"{name} went through although its {step} step failed"
            events = [e["event"] for e in logs]
            if refused:
                assert r.everything() == before
                assert not STATUS_EVENTS.intersection(events)
                assert events.count("operation_refused") + events.count("operation_failed") == 1
            assert StateStore(r.store.path).load().model_dump() == r.service.state.model_dump()
            await r.service.create_key("afterwards")
            await r.service.poll_once()
            assert_table_matches(r)

    anyio.run(run)


def test_a_rollback_the_state_store_refuses_leaves_the_migrated_config_live() -> None:
    """The reproduced case: the save of a rollback fails (507). The migrated keys stay, so Xray
    must keep serving their config, not the pre-migration copy; the rollback works later."""

    async def run() -> None:
        async with rig(with_keys=False) as r:
            original = r.xray_config.read_bytes()
            _, created = await r.service.migrate(r.xray_config, dry_run=False)
            migrated = r.xray_config.read_bytes()
            assert created and migrated != original
            await r.service.poll_once()  # what the kernel counted is in, as an operation reads it
            before = r.everything()
            r.store.refuse = StorageError("state.json: No space left on device", disk_full=True)
            with pytest.raises(OperationError) as refused:
                await r.service.rollback_migration()
            assert refused.value.status == 507
            r.disarm()
            assert r.xray_config.read_bytes() == migrated
            assert r.everything() == before
            _, removed = await r.service.rollback_migration()
            assert [key.id for key in removed] == [key.id for key in created]
            assert r.xray_config.read_bytes() == original
            assert r.service.state.keys == {}

    anyio.run(run)


def assert_table_matches(r: Rig) -> None:
    """The table holds exactly each key's port with the quota limit its status needs."""
    wanted = {}
    for key in r.service.state.keys.values():
        quota = desired_quota(key)
        wanted[key.port] = None if quota is None else quota.limit
    have = {port: None if q is None else q.limit for port, q in r.table.quotas.items()}
    assert have == wanted


def test_a_huge_limit_is_refused_before_any_step_and_poisons_nothing() -> None:
    """The poisoning attack behind the edge: 2^64, 20000 PB and 2^63+5 reach the service."""

    async def run() -> None:
        async with rig() as r:
            before = r.everything()
            for limit in (2**64, 20_000 * 10**15, 2**63 + 5, MAX_LIMIT_BYTES + 1):
                with pytest.raises(OperationError) as refused:
                    await r.service.update_key(r.keys["limited"], {"data_limit_bytes": limit})
                assert refused.value.status == 422
                assert refused.value.detail.startswith("data_limit_bytes: Input should be less")
                with pytest.raises(OperationError) as refused:
                    await r.service.create_key("huge", None, {"data_limit_bytes": limit})
                assert refused.value.status == 422
                assert r.everything() == before
            await r.service.update_key(r.keys["open"], {"note": "saved"})  # another key's save
            saved = StateStore(r.store.path).load()
            assert saved.keys[r.keys["limited"]].data_limit_bytes == 10_000
            assert saved.keys[r.keys["open"]].note == "saved"
            assert r.service.failures.errors == {}

    anyio.run(run)


def test_a_value_past_what_the_kernel_holds_is_rolled_back_even_when_it_slipped_through() -> None:
    """Bounds aside: the kernel step raising OverflowError (the old crash) rolls back too."""

    async def run() -> None:
        async with rig() as r:
            limited = r.service.state.keys[r.keys["limited"]]
            before = r.everything()
            r.table.refuse[("enforce", limited.port)] = OverflowError("int too big to convert")
            with capture_logs() as logs, pytest.raises(OperationError) as refused:
                await r.service.update_key(limited.id, {"data_limit_bytes": 20_000})
            assert refused.value.status == 503
            detail = refused.value.detail
            assert "OverflowError" in detail and "nothing was changed" in detail
            assert [e["event"] for e in logs] == ["operation_failed"]
            assert r.everything() == before
            r.table.refuse.clear()
            await r.service.update_key(r.keys["open"], {"note": "x"})
            assert StateStore(r.store.path).load().keys[limited.id].data_limit_bytes == 10_000

    anyio.run(run)


def test_a_record_changed_in_memory_is_checked_against_the_bounds_before_any_step() -> None:
    """A reset past MAX_EPOCH would save a state no start could load: refused, nothing done."""

    async def run() -> None:
        async with rig() as r:
            key_id = r.keys["limited"]
            r.service.state.keys[key_id].epoch = MAX_EPOCH
            before = r.everything()
            with pytest.raises(OperationError) as refused:
                await r.service.reset_traffic(key_id)
            assert refused.value.status == 422
            assert refused.value.detail.startswith("epoch: Input should be less than or equal to")
            assert r.everything() == before

    anyio.run(run)


def test_a_refused_operation_gives_back_no_allowance_the_kernel_had_stopped() -> None:
    """The undo puts the quota back as the kernel held it, dropped bytes included. Before, it
    set the key's own usage (9,500 of 10,000 here): a refused reset opened 500 bytes again."""

    async def run() -> None:
        async with rig() as r:
            limited = r.service.state.keys[r.keys["limited"]]
            r.table.add_traffic(limited.port, rx=5_500)  # 9,500 of 10,000 used
            r.table.add_traffic(limited.port, rx=1_500)  # past the limit: dropped
            await r.service.poll_once()
            limited = r.service.state.keys[limited.id]
            assert (limited.used_bytes, limited.dropped.bytes) == (9_500, 1_500)
            assert limited.status.value == "limited" and r.table.used(limited.port) == 10_000
            before = r.everything()
            r.store.refuse = StorageError("cannot write: No space left on device", disk_full=True)
            with pytest.raises(OperationError):
                await r.service.reset_traffic(limited.id)
            r.store.refuse = None
            assert r.everything() == before
            r.table.add_traffic(limited.port, rx=500)  # what the old undo let through
            await r.service.poll_once()
            limited = r.service.state.keys[limited.id]
            assert (limited.used_bytes, limited.dropped.bytes) == (9_500, 2_000)

    anyio.run(run)


def test_an_undo_that_fails_is_logged_and_the_next_poll_repairs_the_quota() -> None:
    async def run() -> None:
        async with rig() as r:
            limited = r.service.state.keys[r.keys["limited"]]
            r.store.refuse = StorageError("cannot write: No space left on device", disk_full=True)
            original = r.table.enforce
            calls = 0

            async def first_call_only(port: int, quota: Quota | None) -> None:
                nonlocal calls
                calls += 1
                if calls > 1:
                    raise NftError("netlink: Device or resource busy", errno.EBUSY)
                await original(port, quota)

            r.table.enforce = first_call_only  # type: ignore[method-assign]
            with capture_logs() as logs, pytest.raises(OperationError) as refused:
                await r.service.update_key(limited.id, {"data_limit_bytes": 50_000})
            assert refused.value.status == 507
            assert [e["event"] for e in logs] == [
                "state_write_failed", "undo_failed", "operation_refused"]
            assert r.table.quotas[limited.port] == Quota(50_000, 4_000)  # the undo failed
            assert r.service.state.keys[limited.id].data_limit_bytes == 10_000
            r.store.refuse = None
            r.table.enforce = original  # type: ignore[method-assign]
            await r.service.poll_once()
            assert r.table.quotas[limited.port] == Quota(10_000, 4_000)

    anyio.run(run)


# --- one key's failure stays its own ---------------------------------------------------------


def test_one_keys_quota_failing_at_start_and_every_poll_leaves_the_others_counted() -> None:
    async def run() -> None:
        async with rig() as r:
            service, table = r.service, r.table
            limited, open_ = (service.state.keys[r.keys[n]] for n in ("limited", "open"))
            table.drop_table()  # a reboot: the start rebuilds the table
            too_large = NftError("quota: Value too large", errno.EOVERFLOW)
            table.refuse[("build", limited.port)] = too_large
            table.refuse[("enforce", limited.port)] = too_large
            with capture_logs() as logs:
                await service.reconcile()
                for before, traffic in itertools.pairwise((0, 1_000, 2_500, 4_000)):
                    table.add_traffic(open_.port, rx=traffic - before)
                    await service.poll_once()
                    assert service.state.keys[open_.id].rx.bytes == traffic
                read = await service.refresh_keys([limited.id, open_.id])
            assert [k.id for k in read] == [limited.id, open_.id]
            events = [e["event"] for e in logs]
            assert events.count("table_built_without_quotas") == 1
            assert events.count("key_failed") == 1  # once, not at every poll
            failed = next(e for e in logs if e["event"] == "key_failed")
            assert (failed["key_id"], failed["log_level"]) == (limited.id, "error")
            assert "Value too large" in failed["error"]
            assert service.failures.errors == {limited.id: failed["error"]}
            assert table.quotas[limited.port] is None and table.quotas[open_.port] is None
            table.refuse.clear()
            with capture_logs() as logs:
                await service.poll_once()
            assert [e["event"] for e in logs if e["event"].startswith("key_")] == ["key_recovered"]
            assert service.failures.errors == {}
            assert table.quotas[limited.port] == Quota(10_000, 4_000)

    anyio.run(run)


def test_the_api_answers_every_key_and_shows_the_error_on_the_failing_one_alone() -> None:
    """Before: one key's refused quota made GET /api/traffic/ports/exact a 503 for all keys."""

    async def run() -> None:
        async with rig() as r:
            limited, open_ = (r.service.state.keys[r.keys[n]] for n in ("limited", "open"))
            too_large = NftError("quota: Value too large", errno.EOVERFLOW)
            r.table.refuse[("enforce", limited.port)] = too_large
            r.service.failures.errors[limited.id] = "an earlier failure"  # its quota is retried now
            transport = httpx.ASGITransport(app=create_app(r.service))
            async with httpx.AsyncClient(transport=transport, base_url="http://pm") as client:
                every = await client.get("/api/traffic/ports/exact")
                one = await client.get(f"/api/keys/{limited.id}/traffic/port/exact")
                shown = await client.get(f"/api/keys/{open_.id}")
            assert (every.status_code, one.status_code, shown.status_code) == (200, 200, 200)
            answers = every.json()["ports_traffic"]["ports_traffic"]
            errors = {a["key_id"]: a["error"] for a in answers.values()}
            expected = "nftables refused to set quota: quota: Value too large"
            assert errors == {limited.id: expected, open_.id: None, r.keys["off"]: None}
            assert one.json()["error"] == expected and shown.json()["error"] is None

    anyio.run(run)


def test_one_keys_missing_counters_that_cannot_be_installed_stay_its_own() -> None:
    async def run() -> None:
        async with rig() as r:
            service, table = r.service, r.table
            limited, open_ = (service.state.keys[r.keys[n]] for n in ("limited", "open"))
            table.delete_port(limited.port)  # someone deleted its counters
            invalid = NftError("create counter: Invalid argument", errno.EINVAL)
            table.refuse[("install", limited.port)] = invalid
            table.refuse[("remove_present", limited.port)] = invalid
            with capture_logs() as logs:
                for before, traffic in itertools.pairwise((0, 10, 20)):
                    table.add_traffic(open_.port, rx=traffic - before)
                    await service.poll_once()
                    assert service.state.keys[open_.id].rx.bytes == traffic
            assert [e["event"] for e in logs].count("key_failed") == 1
            assert limited.id in service.failures.errors
            table.refuse.clear()
            await service.poll_once()
            assert limited.port in table.quotas and service.failures.errors == {}

    anyio.run(run)


def test_the_poll_loop_outlives_any_failure_and_logs_it_once() -> None:
    async def run() -> None:
        async with rig(with_keys=False, poll_interval=0.01) as r:
            r.table.refuse[("read", None)] = RuntimeError("a bug in reading")
            with capture_logs() as logs:
                async with anyio.create_task_group() as group:
                    group.start_soon(poll_loop, r.service)
                    await anyio.sleep(0.2)
                    r.table.refuse.clear()
                    await anyio.sleep(0.1)
                    group.cancel_scope.cancel()
            events = [e["event"] for e in logs if e["event"].startswith("poll_")]
            assert events == ["poll_failed", "poll_recovered"]
            failed = next(e for e in logs if e["event"] == "poll_failed")
            assert failed["error"] == "RuntimeError: a bug in reading"

    anyio.run(run)


# --- the kernel layer refuses what it cannot hold --------------------------------------------


@pytest.mark.parametrize("value", [2**64, 2**70, -1])
def test_nlcodec_refuses_a_value_that_does_not_fit_u64(value: int) -> None:
    with pytest.raises(nl.EncodeError) as refused:
        nl.be64(value)
    assert not isinstance(refused.value, OverflowError)
    assert str(refused.value) == f"{value} does not fit in an unsigned 64-bit field"


@pytest.mark.parametrize(
    ("quota", "problem"),
    [
        (Quota(MAX_KERNEL_QUOTA + 1, 0), f"a limit of {MAX_KERNEL_QUOTA + 1} bytes is outside"),
        (Quota(2**64, 0), f"a limit of {2**64} bytes is outside 0..{MAX_KERNEL_QUOTA}"),
        (Quota(-5, 0), "a limit of -5 bytes is outside"),
        (Quota(100, 101), "usage 101 is outside 0..100 (its limit)"),
    ],
)
def test_quotas_the_kernel_cannot_hold_are_refused_as_out_of_range(
    quota: Quota, problem: str
) -> None:
    with pytest.raises(OutOfRange) as refused:
        checked_quota("q_20001", quota)
    assert str(refused.value).startswith("q_20001: ") and problem in str(refused.value)
    assert refused.value.code == errno.EOVERFLOW and not refused.value.denied
    with pytest.raises(OutOfRange):
        Transaction("t").new_quota("q_20001", quota)
    with pytest.raises(OutOfRange):
        Transaction("t").map_element(True, "rx", 70_000)
    assert checked_quota("q_1", Quota(MAX_KERNEL_QUOTA, MAX_KERNEL_QUOTA)).limit == MAX_KERNEL_QUOTA


def test_only_eperm_and_eacces_count_as_missing_privileges() -> None:
    assert NftError("x", errno.EPERM).denied and NftError("x", errno.EACCES).denied
    assert not NftError("x", errno.EOVERFLOW).denied and not NftError("x").denied
