"""The netlink transport: one NETLINK_NETFILTER socket, its requests, dumps and batches.

It knows nf_tables' messages (codec.py) but not portmeter's table: which objects, maps and
chains to read or change is layout.py's and readings.py's business. Blocking, one caller at a
time (Counters' lock runs every call in a worker thread).
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import socket
from collections.abc import Iterator, Sequence

from daemon.atomic import failure_reason
from daemon.kernel import NftError
from daemon.nft import codec as nl

NETLINK_NETFILTER = 12
RECEIVE_BUFFER = 1 << 20
GET_SLICE = 256  # get requests per write
DUMP_SEQ = 1  # requests other than dumps count up from 2
DUMP_ATTEMPTS = 5
Step = tuple[str, int, int, bytes]  # what (for error messages), message type, flags, attributes


class Batch:
    """nf_tables messages applied together or not at all, each described for error messages.
    The messages name one table; what goes in is the caller's (layout.Transaction)."""

    def __init__(self, table: str) -> None:
        self.table = table
        self.steps: list[Step] = []

    def add(self, what: str, kind: int, flags: int, attrs: bytes) -> None:
        self.steps.append((what, kind, flags, attrs))

    def named(self, table_attr: int, name_attr: int, name: str) -> bytes:
        """The attributes that name an object of this table: its table, then its own name."""
        return nl.attr(table_attr, nl.text(self.table)) + nl.attr(name_attr, nl.text(name))


class Netlink:
    """One NETLINK_NETFILTER socket of the daemon's network namespace."""

    def __init__(self) -> None:
        self._sock: socket.socket | None = None
        self._seq = itertools.count(DUMP_SEQ + 1)

    # --- reading -------------------------------------------------------------------------

    def table_handle(self, table: str) -> int | None:
        return self.objects(table, [])[0]

    def objects(
        self, table: str, wanted: Sequence[tuple[str, int]]
    ) -> tuple[int | None, list[nl.KernelObject]]:
        """The table's handle and those of the wanted objects (name, object type) that exist,
        read in one exchange."""
        requests = [(nl.GETTABLE, nl.attr(nl.TABLE_NAME, nl.text(table)))]
        for name, obj_type in wanted:
            requests.append(
                (
                    nl.GETOBJ,
                    nl.attr(nl.OBJ_TABLE, nl.text(table))
                    + nl.attr(nl.OBJ_NAME, nl.text(name))
                    + nl.attr(nl.OBJ_TYPE, nl.be32(obj_type)),
                )
            )
        table_reply, *replies = self.get(requests)
        if table_reply is None:
            return None, []
        handle = nl.uint(nl.attrs(table_reply)[nl.TABLE_HANDLE])
        return handle, [nl.kernel_object(body) for body in replies if body is not None]

    def sets(self, table: str, names: Sequence[str]) -> list[dict[int, bytes] | None]:
        """The attributes of each named set or map, None for one that does not exist."""
        requests = [
            (nl.GETSET, nl.attr(nl.SET_TABLE, nl.text(table)) + nl.attr(nl.SET_NAME, nl.text(n)))
            for n in names
        ]
        return [None if body is None else nl.attrs(body) for body in self.get(requests)]

    def chains(self, table: str, names: Sequence[str]) -> list[dict[int, bytes] | None]:
        """The attributes of each named chain, None for one that does not exist."""
        requests = [
            (
                nl.GETCHAIN,
                nl.attr(nl.CHAIN_TABLE, nl.text(table)) + nl.attr(nl.CHAIN_NAME, nl.text(n)),
            )
            for n in names
        ]
        return [None if body is None else nl.attrs(body) for body in self.get(requests)]

    def rules(self, table: str, chain: str) -> list[dict[int, bytes]]:
        """The attributes of each rule of a chain, in order."""
        dump = self.dump(
            nl.GETRULE,
            nl.attr(nl.RULE_TABLE, nl.text(table)),
            nl.attr(nl.RULE_CHAIN, nl.text(chain)),
        )
        return [nl.attrs(m.body) for m in nl.messages(dump)]

    def dump(self, kind: int, *attrs: bytes) -> bytes:
        """The messages a dump request returns, concatenated, without the closing NLMSG_DONE.

        Every dump uses the same sequence number, so an unchanged table dumps to the same bytes
        (see codec.ObjectScanner); a dump is read to its end or the socket is replaced. A
        dump the kernel marks inconsistent (another program changed the ruleset meanwhile) is
        taken again, as libnftables does: a port missing from it would look like lost counters.
        """
        for _ in range(DUMP_ATTEMPTS):
            data, ended, interrupted = self._dump_once(kind, *attrs)
            if ended.kind == nl.NLMSG_ERROR:
                code, _ = nl.error_code(ended.body)
                if code:
                    raise NftError(f"netlink dump: {os.strerror(code)}", code)
            if not interrupted:
                return data
        raise NftError(
            f"the ruleset kept changing during {DUMP_ATTEMPTS} readings; trying again at the next"
        )

    def _dump_once(self, kind: int, *attrs: bytes) -> tuple[bytes, nl.Message, bool]:
        with self._exchange() as sock:
            sock.send(nl.message(kind, nl.REQUEST | nl.DUMP, DUMP_SEQ, *attrs))
            parts, interrupted = [], False
            while True:
                chunk = sock.recv(RECEIVE_BUFFER)
                end, last, marked = nl.dump_part(chunk)
                parts.append(chunk[:end])
                interrupted = interrupted or marked
                if last is not None:
                    return b"".join(parts), last, interrupted

    def get(self, requests: Sequence[tuple[int, bytes]]) -> list[bytes | None]:
        """One reply per request, in order: the object's attributes, or None if it does not exist.
        Sent in slices: one write must fit the socket's send buffer."""
        replies: list[bytes | None] = []
        for start in range(0, len(requests), GET_SLICE):
            replies += self._get_slice(requests[start : start + GET_SLICE])
        return replies

    def _get_slice(self, requests: Sequence[tuple[int, bytes]]) -> list[bytes | None]:
        with self._exchange() as sock:
            return self._get_answers(sock, requests)

    def _get_answers(
        self, sock: socket.socket, requests: Sequence[tuple[int, bytes]]
    ) -> list[bytes | None]:
        wanted: dict[int, int] = {}
        payload = []
        for index, (kind, attrs) in enumerate(requests):
            seq = next(self._seq)
            wanted[seq] = index
            payload.append(nl.message(kind, nl.REQUEST, seq, attrs))
        sock.send(b"".join(payload))
        replies: list[bytes | None] = [None] * len(requests)
        pending = set(wanted)
        while pending:
            for reply in nl.messages(sock.recv(RECEIVE_BUFFER)):
                if reply.seq not in pending:
                    continue
                pending.discard(reply.seq)
                if reply.kind == nl.NLMSG_ERROR:
                    code, _ = nl.error_code(reply.body)
                    if code not in (0, errno.ENOENT):
                        raise NftError(f"netlink get: {os.strerror(code)}", code)
                    continue
                replies[wanted[reply.seq]] = reply.body
        return replies

    # --- changing ------------------------------------------------------------------------

    def transact(self, edit: Batch) -> None:
        """Send `edit` as one batch; raise NftError naming the step the kernel refused."""
        if not edit.steps:
            return
        first = next(self._seq)
        described = {}
        messages = []
        for what, kind, flags, attrs in edit.steps:
            seq = next(self._seq)
            described[seq] = what
            messages.append(nl.message(kind, nl.REQUEST | nl.ACK | flags, seq, attrs))
        with self._exchange() as sock:
            sock.send(nl.batch(messages, first, next(self._seq)))
            answers = self._answers(sock, len(messages))
        codes = [(code, seq) for code, seq in answers if code]
        if codes:
            refused = [f"{described.get(seq, 'transaction')}: {os.strerror(c)}" for c, seq in codes]
            raise NftError("; ".join(refused), codes[0][0])

    @staticmethod
    def _answers(sock: socket.socket, expected: int) -> list[tuple[int, int]]:
        """(errno, sequence) of each ACK or error. The kernel handles a batch inside send(), so
        all answers are queued once it returns: wait for the first, then take what is there."""
        answers: list[tuple[int, int]] = []
        flags = 0
        while len(answers) < expected:
            try:
                chunk = sock.recv(RECEIVE_BUFFER, flags)
            except BlockingIOError:
                break
            answers += [
                nl.error_code(m.body) for m in nl.messages(chunk) if m.kind == nl.NLMSG_ERROR
            ]
            flags = socket.MSG_DONTWAIT
        return answers

    # --- the socket ----------------------------------------------------------------------

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    @contextlib.contextmanager
    def _exchange(self) -> Iterator[socket.socket]:
        """The socket for one request and its answers. A failure half-way leaves answers queued
        that the next request would misread: the socket is replaced instead."""
        try:
            yield self._socket()
        except OSError as exc:
            self.close()
            raise NftError(f"netlink: {failure_reason(exc)}", exc.errno) from None
        except BaseException:
            self.close()
            raise

    def _socket(self) -> socket.socket:
        if self._sock is None:
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
            sock.settimeout(10)
            sock.bind((0, 0))
            self._sock = sock
        return self._sock
