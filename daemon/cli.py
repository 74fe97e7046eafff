"""The `portmeter` command: `run` starts the daemon; everything else is a client of its socket."""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import re
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, NoReturn
from urllib.parse import quote

import httpx
import segno

from daemon import bounds, keyfile
from daemon.limits import parse_limit, parse_rate
from daemon.units import display_bytes

if TYPE_CHECKING:
    from daemon.store.state import StateStore

DEFAULT_SOCKET = "/run/portmeter/portmeter.sock"
CALL_TIMEOUT = 30.0  # seconds for an answer, except the long operations that wait
CONNECT_TIMEOUT = 5.0
PROBE_TIMEOUT = 2.0  # GET /api/system/operation, which never waits for the daemon's lock
PROGRESS_AFTER, PROGRESS_EVERY = 2.0, 2.0  # seconds before and between progress lines
HEAD_BYTES = 4096  # what `keys import` reads to tell JSON lines from CSV by the first character


class CliError(Exception):
    """Ends the command with one line on stderr and exit code 1."""


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (and exit code 2), like every other error."""

    def error(self, message: str) -> NoReturn:
        message = message.replace("\n", "\\n")  # one line, whatever the arguments held
        self.exit(2, f"portmeter: {message} (see: {self.prog} --help)\n")


# --- the daemon ----------------------------------------------------------------------------


def run_daemon_command(_: argparse.Namespace) -> int:
    import anyio

    from daemon import logs
    from daemon.errors import KernelRefused, OperationError
    from daemon.http.server import SocketBusy, serve
    from daemon.main import run_daemon
    from daemon.sdnotify import Notifier
    from daemon.settings import SettingsError, load_settings
    from daemon.store.state import StateError

    try:
        settings = load_settings()
    except SettingsError as exc:
        raise CliError(f"bad settings: {exc}") from None
    logs.configure(settings.log_level)
    log = logs.get_logger()
    try:
        serving = functools.partial(serve, settings, log)
        anyio.run(run_daemon, settings, serving, Notifier(os.environ), log)
    except (StateError, SocketBusy) as exc:
        log.critical("daemon_refused_to_start", reason=str(exc))
        raise CliError(str(exc)) from None
    except OperationError as exc:
        log.critical("daemon_refused_to_start", reason=exc.detail)
        denied = isinstance(exc, KernelRefused) and exc.denied  # EPERM/EACCES, nothing else
        hint = " (portmeter needs root or CAP_NET_ADMIN)" if denied else ""
        raise CliError(f"{exc.detail}{hint}") from None
    return 0


# --- the client ----------------------------------------------------------------------------


class DaemonBusy(CliError):
    """The daemon took the request but has not answered in time: it is running, and busy."""


class Client:
    """The daemon's API over its Unix socket. A daemon that does not answer within `timeout`
    seconds is busy (an operation holds it), never "unreachable": that is only a socket
    nobody listens on."""

    def __init__(self, socket_path: str, timeout: float | None = None) -> None:
        self.socket_path = socket_path
        self.timeout = CALL_TIMEOUT if timeout is None else timeout
        self._http = self._connect()

    def _connect(self) -> httpx.Client:
        # Plain HTTP over a Unix socket: no TLS, so no certificate store to load (0.2 s a command).
        transport = httpx.HTTPTransport(uds=self.socket_path, verify=False)
        timeout = httpx.Timeout(self.timeout, connect=CONNECT_TIMEOUT)
        return httpx.Client(transport=transport, base_url="http://portmeter", timeout=timeout)

    def call(
        self, method: str, path: str, body: dict[str, Any] | None = None, *, wait: bool = False
    ) -> Any:
        """The answer's JSON; CliError with the daemon's reason otherwise. `wait`: no deadline
        for the answer (a long operation, e.g. a migration of thousands of clients)."""
        timeout = httpx.Timeout(None, connect=CONNECT_TIMEOUT) if wait else httpx.USE_CLIENT_DEFAULT
        try:
            response = self._http.request(method, path, json=body, timeout=timeout)
        except httpx.InvalidURL:
            raise CliError("the key reference is too long") from None
        except httpx.TimeoutException:
            raise DaemonBusy(
                f"the portmeter daemon at {self.socket_path} is busy: no answer within "
                f"{self.timeout:g} s{self._doing()}; it carries on with the request"
            ) from None
        except httpx.ConnectError:
            raise CliError(
                f"cannot reach the portmeter daemon at {self.socket_path} "
                "(is it running? try: systemctl status portmeter)"
            ) from None
        except httpx.TransportError:
            raise CliError(
                f"the portmeter daemon at {self.socket_path} closed the connection without an "
                "answer (did it stop? try: systemctl status portmeter)"
            ) from None
        try:
            payload = response.json()
        except ValueError:
            raise CliError(f"daemon answered {response.status_code} without JSON") from None
        if response.status_code >= 400:
            detail = payload.get("detail") if isinstance(payload, dict) else payload
            raise CliError(str(detail))
        return payload

    def call_showing_progress(
        self, method: str, path: str, body: dict[str, Any] | None, show: Callable[[str], None]
    ) -> Any:
        """`call` that waits as long as the operation takes; after PROGRESS_AFTER seconds, what
        the daemon is doing is passed to `show` whenever it changed (every PROGRESS_EVERY s)."""
        done = threading.Event()

        def watch() -> None:
            last, pause = "", PROGRESS_AFTER
            while not done.wait(pause):
                pause, line = PROGRESS_EVERY, self.operation_line()
                if line and line != last:
                    show(line)
                    last = line

        watcher = threading.Thread(target=watch, name="progress", daemon=True)
        watcher.start()
        try:
            return self.call(method, path, body, wait=True)
        finally:
            done.set()
            watcher.join()

    def operation_line(self) -> str:
        """What the daemon is busy with, on a connection of its own ("" when nothing or when it
        does not answer in time either)."""
        with self._connect() as probe:
            try:
                now = probe.get("/api/system/operation", timeout=PROBE_TIMEOUT).json()
            except (httpx.HTTPError, ValueError):
                return ""
        if not isinstance(now, dict) or not now.get("operation"):
            return ""
        counted = f" {now['done']}/{now['total']}" if now.get("total") else ""
        return f"{now['operation']}: {now['phase']}{counted} ({now['seconds']:.0f} s)"

    def _doing(self) -> str:
        line = self.operation_line()
        return f" ({line})" if line else ""


def _path_segment(ref: str) -> str:
    return quote(ref, safe="")


def table(rows: Sequence[Sequence[str]], header: Sequence[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in [header, *rows]
    ]
    return "\n".join(lines)


def print_key(key: dict[str, Any]) -> None:
    limit = key["data_limit_bytes"]
    rows = [
        ("id", key["id"]),
        ("name", key["name"]),
        ("uuid", key["uuid"]),
        ("port", key["port"]),
        ("status", key["status"]),
        ("created", key["created_at"]),
        (
            "traffic",
            (
                f"rx {display_bytes(key['rx_bytes'])}, tx {display_bytes(key['tx_bytes'])}, "
                f"total {display_bytes(key['total_bytes'])}"
            ),
        ),
        (
            "limit",
            "unlimited"
            if limit is None
            else f"{display_bytes(key['used_bytes'])} of {display_bytes(limit)}",
        ),
        ("dropped", display_bytes(key["dropped_bytes"])),
        ("expires", key["expire_at"] or "never"),
        (
            "reset",
            key["reset_strategy"]
            + (f", next {key['next_reset_at']}" if key["next_reset_at"] else ""),
        ),
    ]
    if key.get("last_reset_at"):
        before = display_bytes(key["used_before_reset"] or 0)
        rows.append(("last reset", f"{key['last_reset_at']} ({before} before)"))
    if key.get("note"):
        rows.append(("note", key["note"]))
    rows += _kernel_limit_rows(key)
    if key.get("link"):
        rows.append(("link", key["link"]))
    if key.get("groups"):
        rows.append(("groups", ", ".join(key["groups"])))
    for server in key.get("servers") or ():
        rows.append(("server", f"{server['server']} port {server['port']} {server['status']}"))
    for label, value in rows:
        print(f"{label + ':':12} {value}")


def _kernel_limit_rows(key: dict[str, Any]) -> list[tuple[str, Any]]:
    """Speed, connection and device limits (README "Speed, connection and device limits")."""
    speed, conns, ips = key.get("speed_limit_bps"), key.get("max_connections"), key.get("max_ips")
    if speed is None and conns is None and ips is None:
        return []
    rows: list[tuple[str, Any]] = [
        ("speed", "unlimited" if speed is None else f"{speed / 1e6:g} Mbit/s each way"),
        ("max conns", "unlimited" if conns is None else conns),
        ("max ips", "unlimited" if ips is None else ips),
        ("refused", key.get("refused_connections", 0)),
    ]
    for seen in key.get("client_ips") or ():
        rows.append(("client ip", f"{seen['address']} last seen {seen['last_seen']}"))
    return rows


def key_settings(args: argparse.Namespace) -> dict[str, Any]:
    """--limit/--expire/--reset/--note as API fields; 'none'/'never' clear a limit or expiry."""
    body: dict[str, Any] = {}
    if args.limit is not None:
        unlimited = args.limit.lower() in ("none", "unlimited")
        body["data_limit_bytes"] = None if unlimited else _checked_limit(args.limit)
    if args.expire is not None:
        body["expire_at"] = None if args.expire.lower() in ("never", "none") else args.expire
    if args.reset is not None:
        body["reset_strategy"] = args.reset
    if args.note is not None:
        body["note"] = args.note
    if args.speed is not None:
        body["speed_limit_bps"] = None if _cleared(args.speed) else _checked_speed(args.speed)
    if args.max_conns is not None:
        body["max_connections"] = _count("--max-conns", args.max_conns, bounds.MAX_CONNECTIONS)
    if args.max_ips is not None:
        body["max_ips"] = _count("--max-ips", args.max_ips, bounds.MAX_IPS)
    if args.groups is not None:
        body["groups"] = [group.strip() for group in args.groups.split(",") if group.strip()]
    return body


def _scope(args: argparse.Namespace) -> str:
    """`?local=true` for --local: this server alone, not the fleet (README "Keys created once")."""
    return "?local=true" if args.local else ""


def _cleared(text: str) -> bool:
    """'none' (or 'unlimited'): the option clears its limit."""
    return text.strip().lower() in ("none", "unlimited")


def _checked_speed(text: str) -> int:
    """--speed as bits/s, refused here (one line, exit 1) as the daemon would refuse it."""
    try:
        return parse_rate(text)
    except ValueError as exc:
        raise CliError(f"--speed: {exc}") from None


def _count(option: str, text: str, most: int) -> int | None:
    """--max-conns / --max-ips: a whole number from 1 to `most`, or None for 'none'."""
    if _cleared(text):
        return None
    try:
        value = bounds.whole_number(text.strip())
    except ValueError:
        value = 0  # refused below, as a number out of range is
    if not 1 <= value <= most:
        shown = repr(text) if len(text) <= bounds.MAX_DIGITS else f"{len(text)} characters"
        raise CliError(f"{option}: {shown} is not a whole number from 1 to {most} (or 'none')")
    return value


def _checked_limit(text: str) -> str:
    """--limit as typed, refused here (one line, exit 1) as the daemon would refuse it."""
    try:
        parse_limit(text)
    except ValueError as exc:
        raise CliError(f"--limit: {exc}") from None
    return text


def keys_add(client: Client, args: argparse.Namespace) -> Any:
    body: dict[str, Any] = {"name": args.name, **key_settings(args)}
    if args.port is not None:
        body["port"] = args.port
    key = client.call("POST", f"/api/keys{_scope(args)}", body)
    return key, lambda: print_key(key)


def keys_import(client: Client, args: argparse.Namespace) -> Any:
    """Create every key of a CSV or JSON lines file (README "Batch create"): the whole file is
    checked first, then sent in batches of MAX_BATCH_KEYS, each all or nothing. The file is read
    twice, a row at a time (daemon/keyfile.py), so its rows are never all held at once; only
    --json keeps every created key (it prints them)."""
    with _rereadable(args.file) as source:
        start = source.tell()
        form = keyfile.format_of(args.file, source.read(HEAD_BYTES), args.format)
        source.seek(start)
        try:
            keyfile.check(keyfile.rows(source, form))
        except (keyfile.KeyFileError, OSError) as exc:
            raise CliError(f"{args.file}: {_problem(exc)}; nothing was created") from None
        source.seek(start)
        ports, every = _send_batches(client, args, keyfile.batches(keyfile.rows(source, form)))
    return {"keys": every}, lambda: print(
        f"created {len(ports)} keys from {args.file} (ports {min(ports)}-{max(ports)})"
    )


def _send_batches(
    client: Client, args: argparse.Namespace, chunks: Iterator[list[keyfile.Row]]
) -> tuple[list[int], list[dict[str, Any]]]:
    """Send each batch: the ports of the keys created, and the keys themselves with --json."""
    ports: list[int] = []
    every: list[dict[str, Any]] = []
    try:
        for chunk in chunks:
            body = {"keys": [row.body for row in chunk]}
            try:
                made = client.call("POST", f"/api/keys/batch{_scope(args)}", body)["keys"]
            except CliError as exc:
                raise CliError(_refused_batch(str(exc), chunk, len(ports))) from None
            ports += [key["port"] for key in made]
            if getattr(args, "json", False):
                every += made
    except (keyfile.KeyFileError, OSError) as exc:  # the file changed since it was checked
        raise CliError(
            f"{args.file} changed while it was imported: {_problem(exc)}; "
            f"{len(ports)} keys were created before"
        ) from None
    return ports, every


@contextlib.contextmanager
def _rereadable(path: str) -> Iterator[BinaryIO]:
    """The file (`-`: stdin) open for reading, and for reading again from where it started: a
    pipe is copied into a temporary file first."""
    with contextlib.ExitStack() as stack:
        try:
            source = sys.stdin.buffer if path == "-" else stack.enter_context(open(path, "rb"))
            if not source.seekable():
                spool = stack.enter_context(tempfile.TemporaryFile())
                shutil.copyfileobj(source, spool)
                spool.seek(0)
                source = spool
        except OSError as exc:
            raise CliError(f"{path}: {_problem(exc)}") from None
        yield source


def _problem(exc: Exception) -> str:
    return (exc.strerror if isinstance(exc, OSError) else None) or str(exc)


def _refused_batch(detail: str, chunk: Sequence[keyfile.Row], before: int) -> str:
    """A refused batch in one line: the file's line at fault (the daemon names `keys[i]`), what
    earlier batches created and that this one created nothing."""
    item = BATCH_ITEM.match(detail)
    if item is not None:
        at = int(item.group(1) or item.group(2))
        detail = f"line {chunk[at].line}: {detail[item.end() :].lstrip('.: ')}"
    lines = f"lines {chunk[0].line}-{chunk[-1].line}"
    return f"{detail}; the batch of {lines} created nothing, {before} keys were created before it"


def keys_set(client: Client, args: argparse.Namespace) -> Any:
    body = key_settings(args)
    if not body:
        raise CliError(
            "nothing to change: give --limit, --expire, --reset, --note, --speed, --max-conns,"
            " --max-ips or --groups"
        )
    key = client.call("PATCH", f"/api/keys/{_path_segment(args.key)}{_scope(args)}", body)
    return key, lambda: print_key(key)


def keys_switch(client: Client, args: argparse.Namespace) -> Any:
    where = f"/api/keys/{_path_segment(args.key)}/{args.keys_command}{_scope(args)}"
    key = client.call("POST", where)
    return key, lambda: print(f"key {key['name']} (port {key['port']}) is now {key['status']}")


def keys_list(client: Client, _: argparse.Namespace) -> Any:
    result = client.call("GET", "/api/keys")
    rows = [
        (
            k["id"],
            k["name"],
            str(k["port"]),
            display_bytes(k["rx_bytes"]),
            display_bytes(k["tx_bytes"]),
            display_bytes(k["total_bytes"]),
            k["created_at"][:19],
        )
        for k in result["keys"]
    ]
    header = ("ID", "NAME", "PORT", "RX", "TX", "TOTAL", "CREATED")
    return result, lambda: print(
        table(rows, header) if rows else "no keys yet: portmeter keys add NAME"
    )


def keys_show(client: Client, args: argparse.Namespace) -> Any:
    key = client.call("GET", f"/api/keys/{_path_segment(args.key)}")

    def show() -> None:
        print_key(key)
        if args.qr:
            if not key.get("link"):
                raise CliError("this key has no link (is the Xray integration on?)")
            segno.make(key["link"], error="l").terminal(compact=True)

    return key, show


def xray(client: Client, args: argparse.Namespace) -> Any:
    if args.action == "status":
        s = client.call("GET", "/api/system/xray/config-status")
        if not s.get("enabled"):
            return s, lambda: print("Xray integration is off (PORTMETER_XRAY_CONFIG is empty)")
        return s, lambda: print("\n".join(_xray_status_lines(s)))
    if args.action == "sync":
        r = client.call("POST", "/api/system/xray/sync-config")
        return r, lambda: print(
            f"synced: {len(r['added_inbounds'])} inbounds added, "
            f"{len(r['removed_inbounds'])} removed "
            f"(apply {r['apply_mode']}, {r['apply_seconds']} s)"
        )
    r = client.call("GET", "/api/system/xray/validate-sync")
    lines = [f"{p['kind']}: {p['message']}" for p in r["problems"]]
    return r, lambda: print(
        "\n".join(lines) if lines else f"in sync: {r['expected_inbounds']} inbounds as expected"
    )


def _xray_status_lines(s: dict[str, Any]) -> list[str]:
    """The lines of `xray status`: the config file, its inbounds, backups and how it is applied."""
    written = f"{'exists' if s['exists'] else 'missing'}, written {s['last_write']}"
    sync = "in sync" if s["in_sync"] else "NOT in sync"
    found = "found" if s["xray_bin_found"] else "not found"
    api = (
        ""
        if s["xray_reachable"] is None
        else f"; API {'reachable' if s['xray_reachable'] else 'NOT reachable'}"
    )
    return [
        f"config:     {s['path']} ({written})",
        (
            f"inbounds:   {s['portmeter_inbound_count']} of portmeter for "
            f"{s['expected_inbounds']} keys, {s['inbound_count']} in all; {sync}"
        ),
        *([f"confdir:    {s['confdir']} ({s['key_files']} key files)"] if s.get("confdir") else []),
        f"backups:    {s['backup_count']} in {s['backup_dir']}",
        f"apply:      {s['apply_mode']}; xray binary {s['xray_bin']} {found}{api}",
        *([f"error:      {s['error']}"] if s.get("error") else []),
    ]


def migrate(client: Client, args: argparse.Namespace) -> Any:
    if args.rollback:
        r = client.call_showing_progress(
            "POST", "/api/system/xray/migrate/rollback", None, _progress
        )
        return r, lambda: print(
            f"restored {r['restored_from']}; removed keys: {', '.join(r['removed_keys']) or 'none'}"
        )
    if not args.config:
        raise CliError(
            "usage: portmeter migrate CONFIG [--dry-run] [--replace] | portmeter migrate --rollback"
        )
    path = os.path.abspath(args.config)
    body = {"config_path": path, "dry_run": args.dry_run, "replace": args.replace}
    r = client.call_showing_progress("POST", "/api/system/xray/migrate", body, _progress)
    prefix = "plan (dry run, nothing changed):" if args.dry_run else "migrated:"
    return r, lambda: print("\n".join([prefix, *(f"  {line}" for line in r["plan"])]))


def _progress(line: str) -> None:
    """A long operation's progress: on stderr, so `--json` output stays one document."""
    print(f"portmeter: {line}", file=sys.stderr, flush=True)


def fleet_status(client: Client, _: argparse.Namespace) -> Any:
    s = client.call("GET", "/api/fleet/status")
    return s, lambda: print("\n".join(_fleet_status_lines(s)))


def _fleet_status_lines(s: dict[str, Any]) -> list[str]:
    """`fleet status`: the database, why it is not in use, what waits (README "A fleet in
    PostgreSQL")."""
    if not s["configured"]:
        return ["fleet database: not configured (PORTMETER_FLEET_DSN is unset)"]
    backlog = s["backlog"]
    state = "reachable" if s["reachable"] else "NOT reachable"
    return [
        f"database:   {state}, schema version {s['schema_version'] or '-'}",
        *([f"error:      {s['error']}"] if s["error"] else []),
        f"server:     {s['server']}",
        *_skew_line(s.get("clock_skew_seconds")),
        f"delivered:  {s['last_delivered_at'] or 'nothing yet since start'}",
        (
            f"backlog:    {backlog['messages']} messages, {backlog['rows']} rows, "
            f"{display_bytes(backlog['bytes'])}, oldest {backlog['oldest_at'] or '-'}"
        ),
    ]


def _skew_line(skew: float | None) -> list[str]:
    """The database's clock against this server's, when measured."""
    if skew is None:
        return []
    side = "ahead of" if skew >= 0 else "behind"
    return [f"clock:      the database is {abs(skew):.3f} s {side} this server"]


def keys_rm(client: Client, args: argparse.Namespace) -> Any:
    key = client.call("DELETE", f"/api/keys/{_path_segment(args.key)}{_scope(args)}")
    return key, lambda: print(
        f"deleted key {key['id']} ({key['name']}), port {key['port']} is free"
    )


def watch(client: Client, args: argparse.Namespace) -> Any:
    """A live view of every key's traffic with rates, redrawn every --interval seconds."""
    from rich.console import Console
    from rich.live import Live
    from rich.table import Table

    def snapshot() -> dict[str, dict[str, Any]]:
        result = client.call("GET", "/api/traffic/ports/exact")
        return {
            e["key_id"]: e["traffic"] for e in result["ports_traffic"]["ports_traffic"].values()
        }

    def render(
        now: dict[str, dict[str, Any]], before: dict[str, dict[str, Any]], seconds: float
    ) -> Table:
        view = Table(title="portmeter: exact traffic per key (Ctrl-C to stop)")
        for column in ("name", "port", "status", "rx", "tx", "rx/s", "tx/s", "conns"):
            view.add_column(column, justify="left" if column in ("name", "status") else "right")
        for key_id, t in sorted(now.items(), key=lambda item: item[1]["port"]):
            old = before.get(key_id, t)
            rates = [max(0, t[f] - old[f]) / seconds for f in ("rx_bytes", "tx_bytes")]
            view.add_row(
                t["name"],
                str(t["port"]),
                t["status"],
                display_bytes(t["rx_bytes"]),
                display_bytes(t["tx_bytes"]),
                *(f"{display_bytes(int(r))}/s" for r in rates),
                str(t["connections"]),
            )
        return view

    before = snapshot()
    with Live(render(before, before, 1.0), console=Console(), auto_refresh=False) as live:
        for _ in range(args.count) if args.count else iter(int, 1):
            time.sleep(args.interval)
            now = snapshot()
            live.update(render(now, before, args.interval), refresh=True)
            before = now
    return before, lambda: None


def usage(client: Client, args: argparse.Namespace) -> Any:
    if not args.name:
        g = client.call("GET", "/api/admin/usage")
        return g, lambda: print(json.dumps(g, indent=2, ensure_ascii=False))
    path = f"/api/admin/usage/{_path_segment(args.name)}" + ("/detailed" if args.detailed else "")
    u = client.call("GET", path)
    rows = [
        (
            entry["server"],
            entry.get("source", ""),
            display_bytes(entry["bytes_uploaded"]),
            display_bytes(entry["bytes_downloaded"]),
            display_bytes(entry["total_bytes"]),
            str(entry.get("last_used")),
        )
        for entry in _usage_rows(u)
    ]
    header = ("SERVER", "SOURCE", "UPLOADED", "DOWNLOADED", "TOTAL", "LAST USED")
    count = u["server_count"] if isinstance(u["servers"], list) else u["servers"]
    return u, lambda: print(
        f"{args.name}: {display_bytes(u['total_bytes'])} on {count} servers\n" + table(rows, header)
    )


def _usage_rows(u: dict[str, Any]) -> list[dict[str, Any]]:
    """Per-server rows of both answers: /detailed lists them, the plain one is local + reported."""
    if isinstance(u["servers"], list):
        return list(u["servers"])
    local = [] if not u.get("local") else [{**u["local"], "source": "local", "last_used": None}]
    return local + list(u.get("reported", []))


def traffic(client: Client, args: argparse.Namespace) -> Any:
    if args.watch:
        return watch(client, args)
    words = args.words
    if len(words) == 2 and words[0] == "reset":
        result = client.call("POST", f"/api/keys/{_path_segment(words[1])}/traffic/port/reset")
        return result, lambda: print(
            f"traffic of {result['name']} (port {result['port']}) reset to 0"
        )
    if len(words) == 1:
        t = client.call("GET", f"/api/keys/{_path_segment(words[0])}/traffic/port/exact")
        rows = [_traffic_row(t)]
        return t, lambda: print(table(rows, TRAFFIC_HEADER))
    if words:
        raise CliError("usage: portmeter traffic [KEY] | portmeter traffic reset KEY")
    result = client.call("GET", "/api/traffic/ports/exact")
    entries = result["ports_traffic"]["ports_traffic"].values()
    rows = [_traffic_row(e["traffic"]) for e in entries]
    total = display_bytes(result["ports_traffic"]["total_traffic"])
    return result, lambda: print(
        (table(rows, TRAFFIC_HEADER) + f"\n\ntotal {total}") if rows else "no keys yet"
    )


TRAFFIC_HEADER = ("NAME", "PORT", "RX", "TX", "TOTAL", "RX PKTS", "TX PKTS", "CONNS")


def _traffic_row(t: dict[str, Any]) -> tuple[str, ...]:
    return (
        t["name"],
        str(t["port"]),
        display_bytes(t["rx_bytes"]),
        display_bytes(t["tx_bytes"]),
        display_bytes(t["total_bytes"]),
        str(t["rx_packets"]),
        str(t["tx_packets"]),
        str(t["connections"]),
    )


def ports(client: Client, _: argparse.Namespace) -> Any:
    result = client.call("GET", "/api/system/ports")
    return result, lambda: print(
        f"range {result['port_range']}: {result['used_ports']} used, "
        f"{result['available_ports']} free of {result['max_ports']}"
    )


Handler = Callable[[Client, argparse.Namespace], Any]
BATCH_ITEM = re.compile(r"keys(?:\[(\d+)\]|\.(\d+))")  # the item a batch refusal names
WHOLE = re.compile(r"[0-9]+")
DECIMAL = re.compile(r"[0-9]+(?:\.[0-9]+)?")


def number(low: float, high: float, pattern: re.Pattern[str] = WHOLE) -> Callable[[str], float]:
    """An argparse type: ASCII digits (`int("٥")` would be 5) between `low` and `high`."""

    def parse(text: str) -> float:
        value = (int if pattern is WHOLE else float)(text) if pattern.fullmatch(text) else None
        if value is None or not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number from {low} to {high}")
        return value

    return parse


def add_limit_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--limit",
        metavar="SIZE",
        help="data allowance, rx+tx: 50GB, 50GiB, 500MB, bytes; 'none' = unlimited",
    )
    parser.add_argument(
        "--expire",
        metavar="WHEN",
        help="2027-01-31 (start of that day), ISO date-time, or +30d/+12h/+2w; 'never'",
    )
    parser.add_argument(
        "--reset",
        choices=("no_reset", "day", "week", "month"),
        help="zero the usage every day/week/month (PORTMETER_TIMEZONE)",
    )
    parser.add_argument("--note", help="free text for the operator")
    parser.add_argument(
        "--speed", metavar="RATE", help="per direction: 20Mbit, 500kbit, 1Gbit, bits/s; 'none'"
    )
    parser.add_argument(
        "--max-conns", metavar="N", help="concurrent TCP connections (1-100000); 'none'"
    )
    parser.add_argument(
        "--max-ips",
        metavar="N",
        help="client addresses within PORTMETER_IP_WINDOW (1-1000); 'none'",
    )


def add_fleet_options(parser: argparse.ArgumentParser, groups: bool = False) -> None:
    """--local (and --groups) of key operations (README "Keys created once")."""
    parser.add_argument(
        "--local",
        action="store_true",
        help="with a fleet database: this server alone (also when the database is down)",
    )
    if groups:
        parser.add_argument(
            "--groups", help="fleet groups that serve the key, e.g. eu,premium ('' for all)"
        )


def state_command(args: argparse.Namespace) -> int:
    """Offline: works on the files, with or without a running daemon (restore needs it stopped)."""
    from daemon.store.state import StateStore

    state_dir = args.state_dir or os.environ.get("PORTMETER_STATE_DIR") or "/var/lib/portmeter"
    store = StateStore(Path(state_dir) / "state.json")
    try:
        return _state_action(store, args.action)
    except OSError as exc:
        raise CliError(f"{state_dir}: {exc.strerror or exc}") from None


def _state_action(store: StateStore, action: str) -> int:
    from daemon.store.state import StateError

    if action == "check":
        if not store.path.exists() and not store.journal.exists():
            print(f"{store.path} does not exist yet: the daemon starts with no keys")
            return 0
        backups = store.valid_backups()
        newest = f"newest valid backup {backups[0]}" if backups else "no valid backup"
        try:
            state = store.load()
        except StateError as exc:
            raise CliError(f"{exc} ({newest})") from None
        print(
            f"{store.path}: valid, schema {state.schema_version}, {len(state.keys)} keys, "
            f"generation {state.generation}; {len(backups)} valid backups ({newest})"
        )
        return 0
    socket_path = os.environ.get("PORTMETER_SOCKET") or DEFAULT_SOCKET
    if os.path.exists(socket_path):
        try:
            Client(socket_path).call("GET", "/api/system/ports")
        except DaemonBusy:
            raise CliError("the daemon is running (and busy): stop it first") from None
        except CliError:
            pass
        else:
            raise CliError("the daemon is running: stop it first (systemctl stop portmeter)")
    try:
        used, aside = store.restore_newest_backup()
    except (StateError, OSError) as exc:
        raise CliError(str(exc)) from None
    kept = ", ".join(str(path) for path in aside)
    files = "file is" if len(aside) == 1 else "files are"
    print(
        f"restored {store.path} from {used}"
        + (f"; the previous {files} kept as {kept}" if aside else "")
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    common = Parser(add_help=False)
    common.add_argument(
        "--socket",
        default=argparse.SUPPRESS,
        help=f"daemon socket (default: $PORTMETER_SOCKET or {DEFAULT_SOCKET})",
    )
    common.add_argument(
        "--json",
        action="store_true",
        default=argparse.SUPPRESS,
        help="print the daemon's JSON answer, for scripts",
    )
    parser = Parser(
        prog="portmeter",
        parents=[common],
        description="Exact per-key traffic accounting for Xray servers, counted by nftables.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = sub.add_parser("run", help="run the daemon (systemd starts this)")
    run.set_defaults(daemon=True)

    keys = sub.add_parser("keys", help="create, list, show and delete keys", parents=[common])
    keys_sub = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    add = keys_sub.add_parser("add", help="create a key with its own port", parents=[common])
    add.add_argument("name", help="a unique name, e.g. alice")
    add.add_argument(
        "--port",
        type=number(bounds.MIN_PORT, bounds.MAX_PORT),
        help="a specific port of the range (default: lowest free)",
    )
    add_limit_options(add)
    add_fleet_options(add, groups=True)
    add.set_defaults(handler=keys_add)
    imp = keys_sub.add_parser(
        "import", help="create the keys of a CSV or JSON lines file", parents=[common]
    )
    imp.add_argument("file", help="CSV with a header row (name, port, ...) or JSON lines; - stdin")
    imp.add_argument(
        "--format", choices=keyfile.FORMATS, help="default: by extension, else by the content"
    )
    add_fleet_options(imp)
    imp.set_defaults(handler=keys_import)
    change = keys_sub.add_parser(
        "set", help="change limit, expiry, reset or note", parents=[common]
    )
    change.add_argument("key", help="key id, uuid or name")
    add_limit_options(change)
    add_fleet_options(change, groups=True)
    change.set_defaults(handler=keys_set)
    for verb, text in (
        ("disable", "stop a key's traffic in the kernel"),
        ("enable", "let it flow again"),
    ):
        p = keys_sub.add_parser(verb, help=text, parents=[common])
        p.add_argument("key", help="key id, uuid or name")
        add_fleet_options(p)
        p.set_defaults(handler=keys_switch)
    keys_sub.add_parser("list", help="all keys with their traffic", parents=[common]).set_defaults(
        handler=keys_list
    )
    show = keys_sub.add_parser(
        "show", help="one key, its share link (--qr: as a QR code)", parents=[common]
    )
    show.add_argument("key", help="key id, uuid or name")
    show.add_argument(
        "--qr", action="store_true", help="print the vless:// link as a terminal QR code"
    )
    show.set_defaults(handler=keys_show)
    rm = keys_sub.add_parser("rm", help="delete a key", parents=[common])
    rm.add_argument("key", help="key id, uuid or name")
    add_fleet_options(rm)
    rm.set_defaults(handler=keys_rm)

    tr = sub.add_parser(
        "traffic", parents=[common], help="exact traffic: all keys, one KEY, or `traffic reset KEY`"
    )
    tr.add_argument("words", nargs="*", metavar="KEY | reset KEY")
    tr.add_argument("--watch", action="store_true", help="a live view with rates (Ctrl-C to stop)")
    seconds = number(bounds.MIN_WATCH_SECONDS, bounds.MAX_WATCH_SECONDS, DECIMAL)
    tr.add_argument(
        "--interval", type=seconds, default=2.0, help="seconds between redraws (--watch)"
    )
    tr.add_argument(
        "--count",
        type=number(0, bounds.MAX_WATCH_COUNT),
        default=0,
        help="stop after this many redraws (--watch; 0: until Ctrl-C)",
    )
    tr.set_defaults(handler=traffic)
    us = sub.add_parser(
        "usage", parents=[common], help="usage per user across servers (history, reports)"
    )
    us.add_argument("name", nargs="?", help="a user (key name); without: global statistics")
    us.add_argument(
        "--detailed", action="store_true", help="per server, with hourly and daily series"
    )
    us.set_defaults(handler=usage)
    sub.add_parser("ports", help="port range usage", parents=[common]).set_defaults(handler=ports)
    xr = sub.add_parser(
        "xray", help="Xray config: status, sync (repair), validate (drift)", parents=[common]
    )
    xr.add_argument("action", choices=("status", "sync", "validate"))
    xr.set_defaults(handler=xray)
    mg = sub.add_parser(
        "migrate",
        parents=[common],
        help="give every client of a shared VLESS inbound its own key and port",
    )
    mg.add_argument("config", nargs="?", help="the Xray config with the shared inbound")
    mg.add_argument("--dry-run", action="store_true", help="print the plan, change nothing")
    mg.add_argument(
        "--replace",
        action="store_true",
        help="CONFIG is not the live Xray config: replace the live one (the plan says what goes)",
    )
    mg.add_argument(
        "--rollback", action="store_true", help="restore the config from before migrating"
    )
    mg.set_defaults(handler=migrate)
    fl = sub.add_parser("fleet", help="the fleet database: reachable?, backlog", parents=[common])
    fl.add_argument("action", choices=("status",))
    fl.set_defaults(handler=fleet_status)
    st = sub.add_parser("state", help="check the state file, or restore the newest valid backup")
    st.add_argument("action", choices=("check", "restore"))
    st.add_argument("--state-dir", help="default: $PORTMETER_STATE_DIR or /var/lib/portmeter")
    st.set_defaults(offline=state_command)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    for arg in argv:
        try:
            arg.encode("utf-8")
        except UnicodeEncodeError:  # bytes that are not UTF-8, smuggled in by surrogateescape
            print("portmeter: arguments must be UTF-8 text", file=sys.stderr)
            return 2
    args = build_parser().parse_args(argv)
    try:
        if getattr(args, "daemon", False):
            return run_daemon_command(args)
        if getattr(args, "offline", None):
            return int(args.offline(args))
        socket_path = (
            getattr(args, "socket", None) or os.environ.get("PORTMETER_SOCKET") or DEFAULT_SOCKET
        )
        handler: Handler = args.handler
        payload, show = handler(Client(socket_path), args)
        if getattr(args, "json", False):
            print(json.dumps(payload, indent=2, ensure_ascii=False))
        else:
            show()
        return 0
    except CliError as exc:
        print("portmeter: " + str(exc).replace("\n", "\\n"), file=sys.stderr)  # always one line
        return 1
    except KeyboardInterrupt:
        return 130
