"""libnftables with JSON in and out: building the table, repairing it, and the full listings.

Slow at scale (it reads the whole table before each command and prints every object), so only
the rare paths use it: a build, a repair, the layout check once, and the listings behind the
consistency report (README "How it counts"). Blocking: Counters runs each call in a worker
thread, one at a time.
"""

from __future__ import annotations

import errno
import os
from typing import Any

import nftables

from daemon.kernel import NftError

Json = dict[str, Any]


class Libnft:
    """One libnftables context (it opens its netlink socket when made: in the namespace of the
    caller that makes it)."""

    def __init__(self) -> None:
        self._nft = nftables.Nftables()
        self._nft.set_json_output(True)
        self._nft.set_handle_output(True)

    def run(self, commands: list[Json]) -> None:
        """Apply `commands` in one transaction."""
        self._call({"nftables": commands}, terse=False)

    def list(self, what: Json, *, terse: bool = False) -> list[Json] | None:
        """The listed objects, or None when the table (or the listed map or set) does not exist.
        `terse` leaves out the elements of sets and maps."""
        try:
            output = self._call({"nftables": [{"list": what}]}, terse=terse)
        except NftError as exc:
            if "No such file or directory" in str(exc):
                return None
            raise
        return [obj for obj in output.get("nftables", []) if "metainfo" not in obj]

    def _call(self, payload: Json, *, terse: bool) -> Json:
        self._nft.set_terse_output(terse)
        rc, output, error = self._nft.json_cmd(payload)
        if rc != 0:
            message = " ".join(error.replace("internal:0:0-0:", "").split()) or f"nft rc={rc}"
            raise NftError(message, _errno_in(message))
        return output if isinstance(output, dict) else {}


def _errno_in(message: str) -> int | None:
    """The errno libnftables names in its message (it prints strerror), if any."""
    for code in (errno.EPERM, errno.EACCES, errno.ENOENT, errno.EEXIST, errno.EOVERFLOW):
        if os.strerror(code) in message:
            return code
    return None
