"""A reset of every user (or of one user and their key) with a fleet database is ONE outbox
message, however many users (README "A fleet in PostgreSQL"): ten thousand fsynced files on the
event loop stalled the answers, the polls and the watchdog.

Real PostgreSQL 15 (tests/pgserver.py) and an in-process service; the routes are called as the
HTTP server calls them.
"""

from __future__ import annotations

import json
from pathlib import Path

import anyio
import pytest
import structlog

from daemon.fleet.limits import FleetResets
from daemon.fleet.reads import FleetReads
from daemon.http.routes.usage import Users, usage_reset_all, user_usage_reset
from daemon.reports import FleetReports
from daemon.store.outbox import Outbox
from tests.fleetrig import ready_fleet_db
from tests.inprocess import started
from tests.pgserver import Database
from tests.test_fleet_pg import rows, run_delivery

LOG = structlog.get_logger()
ELSEWHERE = 400  # users only other servers reported
LOCAL = ("anna", "bert", "cleo")  # users with a key here, and usage elsewhere too


def reset_files(box: Path) -> list[Path]:
    return sorted(box.glob("*~reset-*"))


def reset_with(db: Database, box: Path, *, everyone: bool) -> list[Path]:
    """Keys of LOCAL here, usage of LOCAL and ELSEWHERE users on node1; one reset route run on
    an in-process service wired to the fleet as daemon/fleet/limits.py `attach` wires it."""
    names = [f"user{n:04d}" for n in range(ELSEWHERE)] + list(LOCAL)

    async def main() -> None:
        async with ready_fleet_db(db.dsn) as fleet:
            async with fleet.connection() as conn:
                await conn.execute(
                    "INSERT INTO portmeter.totals SELECT n, 'node1', 700, 800, 3, 1, now(), now()"
                    " FROM unnest(%s::text[]) AS n",
                    (names,),
                )
            async with started(xray=False) as rig:
                service = rig.service
                reports = FleetReports(Outbox(box), "srv", "inst", extended=True)
                service.ledger.sinks.append(reports)
                service.settler.on_reset = FleetResets(reports, LOG).reset
                reads = FleetReads(fleet, "srv")
                for name in LOCAL:
                    key = await service.create_key(name)
                    rig.kernel.add_traffic(key.port, rx=1_000)
                if everyone:
                    done = await usage_reset_all(service, reads)
                    assert (len(done["users_reset"]), done["keys_reset"]) == (
                        len(names),
                        len(LOCAL),
                    )
                else:
                    assert rig.history is not None
                    users = Users(service, rig.history, reads, "srv")
                    done = await user_usage_reset("anna", service, users)
                    assert (len(done["local"]), done["reported"]["servers"]) == (1, 1)

    anyio.run(main)
    return reset_files(box)


@pytest.mark.root
def test_a_reset_of_every_user_is_one_message_and_reaches_every_user(
    fleet_db: Database, tmp_path: Path
) -> None:
    box = tmp_path / "reports"
    files = reset_with(fleet_db, box, everyone=True)
    assert len(files) == 1
    message = json.loads(files[0].read_bytes())
    # Each key, and each user reported from elsewhere (the local ones among them too).
    assert len(message["resets"]) == ELSEWHERE + 2 * len(LOCAL)
    run_delivery(fleet_db, box)
    assert reset_files(box) == []
    assert rows(fleet_db, "SELECT resets, count(*) FROM portmeter.users GROUP BY 1 ORDER BY 1") == [
        f"1|{ELSEWHERE}",
        f"2|{len(LOCAL)}",  # their key here and their usage elsewhere
    ]
    assert rows(fleet_db, "SELECT count(*) FROM portmeter.users WHERE reset_at = '-infinity'") == [
        "0"
    ]
    # Everything counted before the reset, here (delivered before it) and elsewhere, is gone.
    assert rows(fleet_db, "SELECT count(*) FROM portmeter.totals") == ["0"]


@pytest.mark.root
def test_a_reset_of_one_user_and_their_keys_is_one_message(
    fleet_db: Database, tmp_path: Path
) -> None:
    box = tmp_path / "reports"
    files = reset_with(fleet_db, box, everyone=False)
    assert len(files) == 1
    message = json.loads(files[0].read_bytes())
    assert [r["name"] for r in message["resets"]] == ["anna"] * 2
    run_delivery(fleet_db, box)
    assert rows(fleet_db, "SELECT name, resets FROM portmeter.users ORDER BY 1") == ["anna|2"]
    assert rows(fleet_db, "SELECT count(*) FROM portmeter.totals WHERE name = 'anna'") == ["0"]
