"""Review fixes of the fleet's delivery, limits and resets (README "A fleet in PostgreSQL"):
background steps that fail without ending the daemon, reset messages that never collide, files
of a restored state line delivered under their own ids, stale resets that clear nothing, and a
periodic reset delivered only after the usage before it.

Tests with `fleet_db` use a real PostgreSQL 15 (tests/pgserver.py); the rest run in-process.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import pytest
import structlog

from daemon.fleet.db import FleetDB
from daemon.fleet.delivery import Delivery, Retried
from daemon.fleet.limits import FleetResets, RemoteLimits
from daemon.reports import FleetReports
from daemon.store.outbox import Outbox
from daemon.store.state import State, StateStore, StorageError
from daemon.store.usage import UsageDelta
from tests.fleetrig import ready_fleet_db
from tests.inprocess import started
from tests.pgserver import Database
from tests.test_fleet_pg import HOUR, put, report, rows, run_delivery

LOG = structlog.get_logger()
MOMENT = datetime.fromtimestamp(HOUR, UTC)


def delta(name: str, rx: int, key_id: str = "k1") -> UsageDelta:
    return UsageDelta(key_id, name, "00000000-0000-4000-8000-000000000001", 10001, 0, rx, 1, 1, 1)


def saved(reports: FleetReports, generation: int, deltas: Sequence[UsageDelta]) -> None:
    """Generation `generation` staged and saved, as the ledger does around a save."""
    reports.stage(generation, MOMENT, deltas)
    reports.commit(generation)


# --- 2: a failing background step never ends the daemon -------------------------------------


class Failing:
    """A service whose settling fails as a remote reset would when the disk is full."""

    def __init__(self) -> None:
        self.calls = 0

    def keys_by_port(self) -> list[Any]:
        return [type("Key", (), {"name": "alice"})()]

    async def settle_remote(self, remote: dict[str, int], resets: dict[str, datetime]) -> None:
        self.calls += 1
        raise OSError(28, "No space left on device")


@pytest.mark.root
def test_a_settle_that_fails_is_logged_once_and_tried_again(fleet_db: Database) -> None:
    service = Failing()

    async def main() -> None:
        async with ready_fleet_db(fleet_db.dsn) as db:
            limits = RemoteLimits(db, service, "srv", 1.0, LOG)  # type: ignore[arg-type]
            with structlog.testing.capture_logs() as logs:
                await limits.refresh()
                await limits.refresh()
        assert service.calls == 2
        assert [entry["event"] for entry in logs] == ["fleet_settle_failed"]

    anyio.run(main)


def test_a_failing_delivery_hook_is_logged_and_the_next_hooks_run(tmp_path: Path) -> None:
    ran: list[str] = []

    async def failing() -> None:
        ran.append("failing")
        raise RuntimeError("Xray refused")

    async def next_hook() -> None:
        ran.append("next")

    async def main() -> None:
        db = FleetDB("postgresql:///unused", LOG)
        delivery = Delivery(db, Outbox(tmp_path), "srv", "inst", 1.0, LOG)
        delivery.on_delivered += [failing, next_hook]
        with structlog.testing.capture_logs() as logs:
            await delivery._tell_delivered()
            await delivery._tell_delivered()
        assert ran == ["failing", "next", "failing", "next"]
        assert [entry["event"] for entry in logs] == ["fleet_delivery_hook_failed"]

    anyio.run(main)


def test_a_step_that_recovers_says_so() -> None:
    outcomes = [RuntimeError("down"), None]

    async def step() -> None:
        outcome = outcomes.pop(0)
        if outcome is not None:
            raise outcome

    async def main() -> None:
        retried = Retried("fleet_settle_failed", LOG)
        with structlog.testing.capture_logs() as logs:
            await retried.attempt(step)
            await retried.attempt(step)
        assert [e["event"] for e in logs] == ["fleet_settle_failed", "fleet_settle_recovered"]

    anyio.run(main)


# --- 3, 5: resets ---------------------------------------------------------------------------


@pytest.mark.root
def test_two_resets_of_a_name_at_one_generation_both_arrive(
    fleet_db: Database, tmp_path: Path
) -> None:
    box = tmp_path / "reports"
    reports = FleetReports(Outbox(box), "srv", "inst", extended=True)
    resets = FleetResets(reports, LOG)
    saved(reports, 5, [delta("alice", 10)])
    resets.put([("alice", MOMENT + timedelta(seconds=1))], 5, staged=False)
    resets.put([("alice", MOMENT + timedelta(seconds=2))], 5, staged=False)
    assert len(list(box.glob("000000000005~reset-*.json"))) == 2
    run_delivery(fleet_db, box)
    assert rows(
        fleet_db, "SELECT name, resets, extract(epoch FROM reset_at)::bigint FROM portmeter.users"
    ) == [f"alice|2|{HOUR + 2}"]


@pytest.mark.root
def test_a_reset_older_than_the_stored_one_clears_nothing(
    fleet_db: Database, tmp_path: Path
) -> None:
    other, box = tmp_path / "other", tmp_path / "reports"
    put(
        other,
        "000000000001",
        {
            "resets": [{"name": "alice", "at": "2026-05-28T20:02:00+00:00"}],
            "reports": [report("alice", 1000, 1000, HOUR + 150)],
        },
    )
    run_delivery(fleet_db, other, server="other")
    # This node delivers late a reset made before the other's, then usage after both.
    put(
        box,
        "000000000001",
        {
            "resets": [{"name": "alice", "at": "2026-05-28T20:01:00+00:00"}],
            "reports": [report("alice", 5, 6, HOUR + 90), report("alice", 7, 8, HOUR + 180)],
        },
    )
    run_delivery(fleet_db, box)
    assert rows(
        fleet_db, "SELECT name, resets, extract(epoch FROM reset_at)::bigint FROM portmeter.users"
    ) == [f"alice|2|{HOUR + 120}"]
    assert rows(
        fleet_db, "SELECT server, rx_bytes, tx_bytes FROM portmeter.totals ORDER BY server"
    ) == ["other|1000|1000", "srv|7|8"]


# --- 4: a restored state line ---------------------------------------------------------------


@pytest.mark.root
def test_files_of_two_state_lines_with_the_same_generations_each_go_once(
    fleet_db: Database, tmp_path: Path
) -> None:
    box = tmp_path / "reports"
    before = FleetReports(Outbox(box), "srv", "x0000000", extended=True)
    for generation in (1, 2):
        saved(before, generation, [delta("alice", 100)])
    after = FleetReports(Outbox(box), "srv", "y0000000", extended=True)  # after a restore
    after.recover(0)
    for generation in (1, 2):
        saved(after, generation, [delta("alice", 10)])
    assert len(list(box.glob("*.json"))) == 4
    run_delivery(fleet_db, box)  # the delivery knows only the current line's instance
    assert rows(fleet_db, "SELECT report_id FROM portmeter.reports ORDER BY 1") == [
        "srv:x0000000:000000000001",
        "srv:x0000000:000000000002",
        "srv:y0000000:000000000001",
        "srv:y0000000:000000000002",
    ]
    assert rows(fleet_db, "SELECT rx_bytes, reports FROM portmeter.totals") == ["220|4"]
    # Sent again (a crash before the files' removal): still once.
    for generation in (1, 2):
        saved(after, generation, [delta("alice", 10)])
    run_delivery(fleet_db, box)
    assert rows(fleet_db, "SELECT rx_bytes, reports FROM portmeter.totals") == ["220|4"]


# --- 7, 11: a periodic reset follows the save of the usage before it -------------------------


class RefusingStore(StateStore):
    """A state store whose saves fail while `refuse` is set (a full disk)."""

    refuse = False

    def save(self, state: State, changed: Collection[str] | None = None) -> None:
        if self.refuse:
            raise StorageError("No space left on device", disk_full=True)
        super().save(state, changed)


def deliverable(box: Path) -> list[str]:
    return sorted(p.name.split("~")[0] if "~" in p.name else "usage" for p in box.glob("*.json"))


def test_a_periodic_reset_is_deliverable_only_once_the_usage_before_it_is() -> None:
    async def main() -> None:
        async with started(xray=False, history=False, store=RefusingStore) as rig:
            service = rig.service
            box = rig.directory / "reports"
            reports = FleetReports(Outbox(box), "srv", "inst", extended=True)
            service.ledger.sinks.append(reports)
            resets = FleetResets(reports, LOG)
            service.settler.on_resets = resets.periodic
            daily = {"reset_strategy": "day"}
            keys = [await service.create_key(n, settings=daily) for n in ("a", "b", "c")]
            for key in keys:
                rig.kernel.add_traffic(key.port, rx=1_000)
                service.state.keys[key.id].next_reset_at = datetime.now(UTC) - timedelta(1)
            service.settler.everything = True
            store = rig.store
            assert isinstance(store, RefusingStore)
            store.refuse = True
            await service.poll_once()  # the keys reset; the save holding their usage fails
            assert list(box.glob("*.json")) == []
            staged = list(box.glob("*~reset-*.staged"))
            assert len(staged) == 1  # one message for the poll's resets
            message = json.loads(staged[0].read_bytes())
            assert sorted(r["name"] for r in message["resets"]) == ["a", "b", "c"]
            store.refuse = False
            await service.poll_once()  # saved now: the usage, then the resets
            names = sorted(p.name for p in box.glob("*.json"))
            assert len(names) == 2 and names[0] == f"{service.state.generation:012d}-inst.json"
            assert names[1].startswith(f"{service.state.generation:012d}~reset-")
            usage = json.loads((box / names[0]).read_bytes())
            assert sum(r["bytes_uploaded"] for r in usage["reports"]) == 3_000

    anyio.run(main)


def test_a_staged_reset_goes_with_a_save_without_usage_and_a_start_drops_an_unsaved_one(
    tmp_path: Path,
) -> None:
    box = tmp_path / "reports"
    reports = FleetReports(Outbox(box), "srv", "inst", extended=True)
    FleetResets(reports, LOG).put([("alice", MOMENT)], 4, staged=True)
    reports.commit(3)
    assert list(box.glob("*.json")) == []
    reports.commit(4)  # a save without usage still releases it
    assert len(list(box.glob("000000000004~reset-*.json"))) == 1
    FleetResets(reports, LOG).put([("bob", MOMENT)], 5, staged=True)
    FleetReports(Outbox(box), "srv", "inst", extended=True).recover(4)  # generation 5 never saved
    assert list(box.glob("*.staged")) == []
    assert len(list(box.glob("*.json"))) == 1


def test_an_outbox_reads_its_directory_for_leftovers_once(tmp_path: Path, monkeypatch: Any) -> None:
    box = Outbox(tmp_path)
    (tmp_path / ".000000000001-inst.json.0123456789abcdef.tmp").write_bytes(b"half")
    scans: list[Path] = []
    real = __import__("os").scandir

    def counted(path: Any) -> Any:
        scans.append(Path(path))
        return real(path)

    monkeypatch.setattr("os.scandir", counted)
    for number in range(3):
        box.put({"resets": []}, name=f"{number:012d}")
    assert scans == [tmp_path]
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{n:012d}.json" for n in range(3)]
