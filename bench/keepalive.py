"""Kept-alive connections under a flood (issue 23): 100 clients at 5,000 keys, each on one
connection to the Unix socket, read every key's traffic (`GET /api/traffic/ports/exact`, 2.6 MB)
and then ask for single keys (`GET /api/keys/{id}`) on the same connection, five rounds of one
listing and nine single keys: 5,000 requests. A request whose connection closes before any
answer is dropped (the client reconnects and goes on, as a client would); the daemon must drop
none.

The clients are threads of this process with plain sockets (no library that retries on its
own), and parse every answer as a panel would: on 2 cores, 100 of them read the listing slowly,
which is what made the daemon's keep-alive timer close connections before their next request.
Usage: .venv/bin/python -m bench.keepalive [--quick]
On demand, not part of `make bench`.
"""

from __future__ import annotations

import json
import random
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.common import append_results, interruptible, parse_quick, print_table, running

LISTING = "/api/traffic/ports/exact"
CLIENT_TIMEOUT = 300.0


@dataclass(frozen=True)
class Plan:
    keys: int
    clients: int
    rounds: int  # each: the listing, then `singles` single keys
    singles: int = 9


FULL, QUICK = Plan(5000, 100, 5), Plan(1000, 20, 2)


@dataclass
class Tally:
    """What the clients saw, summed under a lock."""

    sent: int = 0
    answered: int = 0
    dropped: int = 0
    bad: list[str] = field(default_factory=list)  # answers other than 200
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, sent: int, answered: int, dropped: int, bad: list[str]) -> None:
        with self.lock:
            self.sent += sent
            self.answered += answered
            self.dropped += dropped
            self.bad += bad


class Dropped(Exception):
    """The connection closed (or was reset) before an answer began."""


def exchange(sock: socket.socket, path: str) -> tuple[int, bytes]:
    """Send one GET and read its whole answer (content-length); Dropped if the connection
    closed before any of it came."""
    try:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: portmeter\r\n\r\n".encode())
        data = b""
        while b"\r\n\r\n" not in data:
            got = sock.recv(65536)
            if not got:
                raise Dropped
            data += got
    except (BrokenPipeError, ConnectionResetError):
        raise Dropped from None
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    length = next(
        int(line.split(b":", 1)[1]) for line in lines if line.lower().startswith(b"content-length:")
    )
    parts = [body]
    have = len(body)
    while have < length:
        got = sock.recv(min(1 << 20, length - have))
        if not got:
            raise RuntimeError(f"GET {path}: connection closed in the middle of an answer")
        parts.append(got)
        have += len(got)
    return int(lines[0].split(b" ", 2)[1]), b"".join(parts)


def client(socket_path: Path, ids: list[str], plan: Plan, tally: Tally, seed: int) -> None:
    """One client: its rounds on one kept-alive connection, a new one only after a drop."""
    rng = random.Random(seed)
    paths = []
    for _ in range(plan.rounds):
        paths += [LISTING] + [f"/api/keys/{rng.choice(ids)}" for _ in range(plan.singles)]
    sent = answered = dropped = 0
    bad: list[str] = []
    sock = connect(socket_path)
    try:
        for path in paths:
            sent += 1
            try:
                status, body = exchange(sock, path)
            except Dropped:
                dropped += 1
                sock.close()
                sock = connect(socket_path)
                continue
            json.loads(body)  # as a panel would
            answered += 1
            if status != 200:
                bad.append(f"{path}: {status}")
    finally:
        sock.close()
        tally.add(sent, answered, dropped, bad)


def connect(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(CLIENT_TIMEOUT)
    sock.connect(str(path))
    return sock


def main(quick: bool = False) -> None:
    plan = QUICK if quick else FULL
    with running(plan.keys) as run:
        ids = [key.id for key in run.keys]
        listing = run.daemon.http.get(LISTING)
        size = len(listing.content)
        tally = Tally()
        threads = [
            threading.Thread(target=client, args=(run.daemon.socket, ids, plan, tally, n))
            for n in range(plan.clients)
        ]
        started = time.monotonic()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        seconds = time.monotonic() - started
        closed = run.daemon.log().count("event=request_timed_out")
    rows = [
        [
            f"{plan.keys} keys, {plan.clients} clients",
            f"{size / 1e6:.1f} MB",
            tally.sent,
            tally.answered,
            tally.dropped,
            len(tally.bad),
            f"{seconds:.0f} s",
        ]
    ]
    print_table(
        f"Kept-alive connections: {plan.rounds} x (listing + {plan.singles} single keys) each",
        ["load", "listing", "sent", "answered", "dropped", "not 200", "took"],
        rows,
    )
    if tally.bad:
        print("answers other than 200:", *tally.bad[:10], sep="\n  ")
    print(f"request_timed_out events in the daemon's log: {closed}")
    figures = (
        f"sent {tally.sent}, answered {tally.answered}, dropped {tally.dropped}"
        f" ({size / 1e6:.1f} MB listing, {seconds:.0f} s)"
    )
    append_results(
        "keep-alive flood", [(f"{plan.keys} keys, {plan.clients} clients", figures)], quick
    )


if __name__ == "__main__":
    interruptible()
    main(parse_quick(__doc__))
