"""Making the running Xray serve what was written: nothing, a restart, or Xray's API.

PORTMETER_XRAY_APPLY picks the way: `none` (the operator reloads), `restart` (the restart
command, only when the inbounds changed), `api` (`xray api adi/rmi` for the inbounds that
changed: no connection drops).
"""

from __future__ import annotations

import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio

from daemon.atomic import failure_reason, write_atomic
from daemon.bounds import XRAY_API_BATCH
from daemon.xray.model import ApplyMode, XrayApplyError, XrayOptions, split_host_port
from daemon.xray.render import InboundChanges
from daemon.xray_io.binary import api_add_command, api_remove_command, failure_line, is_v2ray
from daemon.xray_io.files import serialize

# Xray answers RemoveInbound for an unknown tag with common.ErrNoClue.
ABSENT_INBOUND = "not enough information for making a decision"


@dataclass(frozen=True, slots=True)
class ApplyResult:
    """How a change reached Xray: the mode, how long it took, the commands that ran."""

    mode: ApplyMode
    seconds: float = 0.0
    commands: tuple[tuple[str, ...], ...] = ()


class XrayApplier:
    """Makes the running Xray serve what was written: nothing, a restart, or API calls."""

    def __init__(self, opts: XrayOptions) -> None:
        self.opts = opts

    async def apply(self, changes: InboundChanges, *, force_restart: bool = False) -> ApplyResult:
        """Apply `changes` the configured way; in restart mode only if there are any (or forced).

        Write the file first: a restart reads it, and in api mode it keeps a later restart
        equal to what the API calls did. To undo after a failure, restore the file and apply
        `inbound_changes(new, old)`.
        """
        started = time.perf_counter()
        mode = self.opts.apply
        if mode == "none" or (mode == "restart" and not changes and not force_restart):
            return ApplyResult(mode)
        if mode == "restart":
            await self.restart()
            return ApplyResult(mode, time.perf_counter() - started, (self.opts.restart_command,))
        commands = [
            *await self.remove_inbounds(changes.removed),
            *await self.add_inbounds(changes.added),
        ]
        return ApplyResult(mode, time.perf_counter() - started, tuple(commands))

    async def restart(self) -> float:
        """Run the restart command; return how long it took."""
        if not self.opts.restart_command:
            raise XrayApplyError("no restart command is configured")
        started = time.perf_counter()
        await self._run(list(self.opts.restart_command), "restart command", cwd=Path("/"))
        return time.perf_counter() - started

    async def add_inbounds(self, inbounds: Sequence[Mapping[str, Any]]) -> list[tuple[str, ...]]:
        """Add the inbounds to the running Xray through its API (`xray api adi`), up to
        XRAY_API_BATCH per command: one process per inbound made a batch of 1,000 keys take 12 s.
        Xray stops at the first inbound it refuses and names it; the caller's undo removes the
        ones added before it."""
        self._require_xray_api()
        commands = []
        with tempfile.TemporaryDirectory(prefix="portmeter-adi-") as tmp:
            for first in range(0, len(inbounds), XRAY_API_BATCH):
                chunk = inbounds[first : first + XRAY_API_BATCH]
                paths = [Path(tmp) / f"inbound-{first + n}.json" for n in range(len(chunk))]
                for path, inbound in zip(paths, chunk, strict=True):
                    data = serialize({"inbounds": [inbound]})
                    write_atomic(path, data, sweep=False, durable=False)  # read once, then gone
                command = api_add_command(self.opts, paths)
                tags = ", ".join(str(inbound.get("tag")) for inbound in chunk[:3])
                more = f" and {len(chunk) - 3} more" if len(chunk) > 3 else ""
                await self._run(command, f"adding inbound {tags}{more}", cwd=Path(tmp))
                commands.append(tuple(command))
        return commands

    async def remove_inbounds(self, tags: Sequence[str]) -> list[tuple[str, ...]]:
        """Remove inbounds from the running Xray by tag; one Xray does not have is no error."""
        self._require_xray_api()
        commands = []
        with tempfile.TemporaryDirectory(prefix="portmeter-rmi-") as tmp:
            for tag in tags:
                command = api_remove_command(self.opts, [tag])
                # An empty working directory: rmi reads an argument naming a file as JSON.
                await self._run(command, f"removing inbound {tag}", cwd=Path(tmp), absent_ok=True)
                commands.append(tuple(command))
        return commands

    async def reachable(self, timeout: float = 1.0) -> bool | None:
        """Whether Xray's API port accepts connections (None when apply mode is not api)."""
        if self.opts.apply != "api":
            return None
        host, port = split_host_port(self.opts.api_address)
        try:
            with anyio.fail_after(timeout):
                stream = await anyio.connect_tcp(host, port)
        except (OSError, TimeoutError):
            return False
        await stream.aclose()
        return True

    def _require_xray_api(self) -> None:
        if is_v2ray(self.opts.xray_bin):
            raise XrayApplyError(
                f"apply mode api needs Xray's `xray api adi/rmi`; {self.opts.xray_bin} is v2ray "
                "(use apply mode restart)"
            )

    async def _run(self, command: list[str], what: str, cwd: Path, absent_ok: bool = False) -> None:
        try:
            with anyio.fail_after(self.opts.command_timeout):
                done = await anyio.run_process(
                    command, check=False, cwd=cwd, stdin=subprocess.DEVNULL
                )
        except TimeoutError:
            raise XrayApplyError(
                f"{what}: {command[0]} did not finish within {self.opts.command_timeout:g}s"
            ) from None
        except OSError as exc:
            reason = failure_reason(exc)
            raise XrayApplyError(f"{what}: cannot run {command[0]}: {reason}") from None
        if done.returncode == 0:
            return
        output = (done.stdout or b"") + (done.stderr or b"")
        if absent_ok and ABSENT_INBOUND.encode() in output:
            return
        reason = failure_line(done.stdout, done.stderr, done.returncode)
        if "failed to dial" in reason:
            reason += " (is Xray running with its API enabled? restart it once after enabling)"
        raise XrayApplyError(f"{what} failed (exit {done.returncode}): {reason}")
