"""A slowloris client for the listener tests: many TCP connections, each sending one byte of a
request head per second and never finishing it; a connection the server closes is opened again
at the next second. Run it inside the namespace of the daemon under test:

    python -m tests.slowloris HOST PORT CONNECTIONS SECONDS SOURCES

Connections come from SOURCES loopback addresses (127.0.0.2, 127.0.0.3, ...), so both the total
and the per-client caps are met. Prints one JSON line: how the server answered.
"""

from __future__ import annotations

import errno
import json
import selectors
import socket
import sys
import time
from collections import Counter
from dataclasses import dataclass, field

HEAD = b"GET /api/keys HTTP/1.1\r\nHost: portmeter\r\nX-Padding: " + b"a" * 4096


@dataclass
class Attack:
    host: str
    port: int
    sources: int
    selector: selectors.BaseSelector = field(default_factory=selectors.DefaultSelector)
    sent: dict[socket.socket, int] = field(default_factory=dict)
    answers: dict[socket.socket, bytes] = field(default_factory=dict)
    outcomes: Counter[str] = field(default_factory=Counter)
    opened: int = 0

    def open(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.bind((f"127.0.0.{2 + self.opened % self.sources}", 0))
        self.opened += 1
        sock.connect_ex((self.host, self.port))
        self.selector.register(sock, selectors.EVENT_READ)
        self.sent[sock] = 0
        self.answers[sock] = b""

    def trickle(self) -> None:
        """One more byte of the head on every open connection."""
        for sock, count in list(self.sent.items()):
            try:
                sock.send(HEAD[count % len(HEAD) : count % len(HEAD) + 1])
                self.sent[sock] = count + 1
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.ENOTCONN, errno.EINPROGRESS):
                    self.finish(sock, "error")

    def read(self, timeout: float) -> None:
        for selected, _ in self.selector.select(timeout):
            sock = selected.fileobj
            assert isinstance(sock, socket.socket)
            try:
                data = sock.recv(65536)
            except OSError:
                self.finish(sock, "reset")
                continue
            if data:
                self.answers[sock] += data
            else:
                self.finish(sock, "closed")

    def finish(self, sock: socket.socket, how: str) -> None:
        """Count the answer by its status (e.g. `503`), or how it ended without one."""
        answer = self.answers.pop(sock)
        status = answer.split(b" ", 2)[1].decode() if answer.startswith(b"HTTP/1.1 ") else how
        self.outcomes[status] += 1
        self.selector.unregister(sock)
        del self.sent[sock]
        sock.close()


def main(argv: list[str]) -> None:
    host, port, connections, seconds, sources = argv
    attack = Attack(host, int(port), int(sources))
    end = time.monotonic() + float(seconds)
    while (now := time.monotonic()) < end:
        while len(attack.sent) < int(connections):
            attack.open()
        attack.trickle()
        tick = now + 1
        while (left := min(tick, end) - time.monotonic()) > 0:
            attack.read(left)
    summary = {"opened": attack.opened, "open_at_end": len(attack.sent), **attack.outcomes}
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
