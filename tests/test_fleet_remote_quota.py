"""A fleet key's kernel quota counts the other servers' usage from the moment it is installed
(README "A fleet in PostgreSQL", limits across servers), not only from its next settle: at a
key's creation and at a table rebuild the usage already known (`Settler.remote`) is taken off
its limit. In process: the real service over the in-memory kernel.
"""

from __future__ import annotations

import errno
from datetime import timedelta

import anyio

from daemon.kernel import NftError
from daemon.store.state import now
from tests.inprocess import started

LIMIT = 10_000
REMOTE = 4_000  # what the fleet's other servers counted for the name since its reset


def test_a_key_created_again_gets_the_known_remote_usage_at_install() -> None:
    """The name's remote usage is known from its earlier key: the new key's first quota is the
    limit minus it, before any poll settles the key."""

    async def run() -> None:
        async with started(xray=False) as rig:
            service = rig.service
            first = await service.create_key("alice", settings={"data_limit_bytes": LIMIT})
            await service.settle_remote({"alice": REMOTE}, {})
            assert rig.kernel.contents()[1][first.port][0] == LIMIT - REMOTE
            await service.delete_key(first.id)
            again = await service.create_key("alice", settings={"data_limit_bytes": LIMIT})
            assert rig.kernel.contents()[1][again.port][0] == LIMIT - REMOTE

    anyio.run(run)


def test_a_rebuilt_table_installs_quotas_with_the_remote_usage() -> None:
    """The table is gone (reboot, `nft flush ruleset`) and the settle's quota change is refused:
    the quota the rebuild installed is the one in force, so it must already count the others'
    usage: of 10,000 bytes sent in packets of 1,500, the 6,000 within limit - remote pass."""

    async def run() -> None:
        async with started(xray=False) as rig:
            service, kernel = rig.service, rig.kernel
            key = await service.create_key("alice", settings={"data_limit_bytes": LIMIT})
            await service.settle_remote({"alice": REMOTE}, {})
            kernel.drop_table()
            kernel.refuse[("enforce", key.port)] = NftError("set quota: refused", errno.EPERM)
            await service.poll_once()
            assert kernel.contents()[1][key.port][0] == LIMIT - REMOTE
            kernel.add_traffic(key.port, rx=LIMIT)
            await service.poll_once()
            assert service.state.keys[key.id].rx.bytes == LIMIT - REMOTE

    anyio.run(run)


def test_a_reset_from_a_node_whose_clock_is_ahead_is_applied_once() -> None:
    """Another node reset the name at a moment this node's clock has not reached yet: the key is
    reset once, and the refreshes that follow (the same figures, every poll) leave it alone."""
    async def run() -> None:
        async with started(xray=False) as rig:
            service = rig.service
            key = await service.create_key("alice", settings={"data_limit_bytes": LIMIT})
            ahead = now() + timedelta(seconds=30)
            for _ in range(3):
                await service.settle_remote({}, {"alice": ahead})
            assert service.find(key.id).epoch == key.epoch + 1

    anyio.run(run)
