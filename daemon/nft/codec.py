"""nf_tables netlink messages, encoded and decoded. Pure: bytes in, values out.

portmeter speaks netlink itself for the hot paths (daemon/nft/netlink.py sends these messages)
because libnftables rebuilds its cache of the whole table for every command (adding one map
element takes 60-100 ms at 10,000 ports) and prints JSON for every object (listing 20,000
counters takes ~400 ms), and pyroute2 has no nf_tables object messages and decodes 20,000
messages far too slowly. The messages needed are few and fixed: get/new/delete of counter, quota
and limit objects and map elements, the expressions of a key's guard chain (layout.py says which),
its sets and rules, and reads of the table, its sets, chains and rules to check the layout. The
sock_diag messages netinfo.py sends share the framing and sit at the end.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

NFNL_SUBSYS_NFTABLES = 10
NFPROTO_INET = 1
BATCH_BEGIN, BATCH_END = 0x10, 0x11
NLMSG_ERROR, NLMSG_DONE = 2, 3
REQUEST, MULTI, ACK, EXCL, CREATE, DUMP = 0x1, 0x2, 0x4, 0x200, 0x400, 0x300
DUMP_INTERRUPTED = 0x10  # NLM_F_DUMP_INTR
NESTED = 0x8000
TYPE_MASK = 0x3FFF

# nf_tables message types and attributes (linux/netfilter/nf_tables.h)
GETTABLE, GETCHAIN, GETRULE, GETSET = 1, 4, 7, 10
NEWSETELEM, DELSETELEM = 12, 14
NEWOBJ, GETOBJ, DELOBJ = 18, 19, 20
TABLE_NAME, TABLE_USE, TABLE_HANDLE = 1, 3, 4
CHAIN_TABLE, CHAIN_NAME, CHAIN_HOOK, CHAIN_POLICY, CHAIN_TYPE = 1, 3, 4, 5, 7
RULE_TABLE, RULE_CHAIN, RULE_EXPRESSIONS = 1, 2, 4
SET_TABLE, SET_NAME, SET_FLAGS, SET_KEY_TYPE, SET_KEY_LEN, SET_DATA_TYPE, SET_OBJ_TYPE = (
    1,
    2,
    3,
    4,
    5,
    6,
    15,
)
ELEM_LIST_TABLE, ELEM_LIST_SET, ELEM_LIST_ELEMENTS, LIST_ELEM = 1, 2, 3, 1
ELEM_KEY, ELEM_OBJREF, DATA_VALUE = 1, 9, 1
OBJ_TABLE, OBJ_NAME, OBJ_TYPE, OBJ_DATA, OBJ_HANDLE = 1, 2, 3, 4, 6
COUNTER_BYTES, COUNTER_PACKETS = 1, 2
QUOTA_BYTES, QUOTA_FLAGS, QUOTA_CONSUMED = 1, 2, 4
QUOTA_INVERT = 1  # "over": the quota matches once the allowance is used up
LIMIT_RATE, LIMIT_UNIT, LIMIT_BURST, LIMIT_TYPE, LIMIT_FLAGS = 1, 2, 3, 4, 5
LIMIT_BYTES, LIMIT_INVERT = 1, 1  # a rate of bytes (not packets); "over": matches above it
OBJECT_COUNTER, OBJECT_QUOTA, OBJECT_LIMIT = 1, 2, 4  # a limit object: a key's speed
DATA_KIND = {0x24: OBJECT_QUOTA, 0x34: OBJECT_LIMIT}  # by the length of the data nest

HEADER = struct.Struct("=IHHII")  # nlmsghdr: length, type, flags, sequence, port id
NFGEN = struct.Struct("=BBH")  # nfgenmsg: family, version, resource id (big endian)
ATTR = struct.Struct("=HH")


@dataclass(frozen=True, slots=True)
class Message:
    kind: int  # nf_tables message type, or NLMSG_ERROR / NLMSG_DONE
    seq: int
    body: bytes  # attributes (after nfgenmsg), or the error payload


@dataclass(frozen=True, slots=True)
class KernelObject:
    """A counter (packets, bytes) or a quota (limit, consumed) as the kernel holds it."""

    name: str
    type: int
    handle: int
    first: int  # counter: packets; quota: limit in bytes
    second: int  # counter: bytes; quota: bytes consumed


# --- encoding ------------------------------------------------------------------------------


def attr(kind: int, payload: bytes) -> bytes:
    length = ATTR.size + len(payload)
    return ATTR.pack(length, kind) + payload + b"\0" * (-length % 4)


def nest(kind: int, *parts: bytes) -> bytes:
    return attr(kind | NESTED, b"".join(parts))


def text(value: str) -> bytes:
    return value.encode() + b"\0"


class EncodeError(ValueError):
    """A value does not fit the field it is meant for (a quota past u64, a port past u16)."""


def unsigned(value: int, size: int) -> bytes:
    """`value` as a big-endian unsigned field of `size` bytes; EncodeError if it does not fit,
    so a caller never meets OverflowError from deep inside a message."""
    if not 0 <= value < 1 << (8 * size):
        raise EncodeError(f"{value} does not fit in an unsigned {8 * size}-bit field")
    return value.to_bytes(size, "big")


def be32(value: int) -> bytes:
    return unsigned(value, 4)


def be64(value: int) -> bytes:
    return unsigned(value, 8)


def message(kind: int, flags: int, seq: int, *attrs: bytes, family: int = NFPROTO_INET) -> bytes:
    body = NFGEN.pack(family, 0, 0) + b"".join(attrs)
    full_type = (NFNL_SUBSYS_NFTABLES << 8) | kind
    return HEADER.pack(HEADER.size + len(body), full_type, flags, seq, 0) + body


def batch(messages: list[bytes], first_seq: int, last_seq: int) -> bytes:
    """One nf_tables transaction: all messages are applied, or none."""
    resource = struct.pack("!H", NFNL_SUBSYS_NFTABLES)

    def marker(kind: int, seq: int) -> bytes:
        body = NFGEN.pack(0, 0, 0)[:2] + resource
        return HEADER.pack(HEADER.size + len(body), kind, REQUEST, seq, 0) + body

    return marker(BATCH_BEGIN, first_seq) + b"".join(messages) + marker(BATCH_END, last_seq)


def counter_data() -> bytes:
    return nest(OBJ_DATA, attr(COUNTER_BYTES, be64(0)), attr(COUNTER_PACKETS, be64(0)))


def quota_data(limit: int, used: int) -> bytes:
    return nest(
        OBJ_DATA,
        attr(QUOTA_BYTES, be64(limit)),
        attr(QUOTA_FLAGS, be32(QUOTA_INVERT)),
        attr(QUOTA_CONSUMED, be64(used)),
    )


def limit_data(rate: int) -> bytes:
    """A limit object that matches packets over `rate` bytes per second (its bucket holds one
    second of the rate: the kernel's smallest unit)."""
    return nest(
        OBJ_DATA,
        attr(LIMIT_RATE, be64(rate)),
        attr(LIMIT_UNIT, be64(1)),
        attr(LIMIT_BURST, be32(0)),
        attr(LIMIT_TYPE, be32(LIMIT_BYTES)),
        attr(LIMIT_FLAGS, be32(LIMIT_INVERT)),
    )


def port_element(port: int, target: str | None) -> bytes:
    """One map element: the port as key, the named object as value (None when deleting)."""
    parts = [nest(ELEM_KEY, attr(DATA_VALUE, unsigned(port, 2)))]
    if target is not None:
        parts.append(attr(ELEM_OBJREF, text(target)))
    return nest(LIST_ELEM, *parts)


# --- expressions (the netlink form of a rule; layout.py composes them) ----------------------
# A rule sent as netlink messages holds the expressions libnftables would send for its text, so
# a chain made over netlink lists exactly as one libnftables made. Built here, a change costs one
# transaction at any number of keys (libnftables first reads the whole table, ~45 ms at 10,000).

NEWCHAIN, DELCHAIN, NEWRULE, DELRULE, NEWSET, DELSET = 3, 5, 6, 8, 9, 11
APPEND = 0x800
SET_DESC, SET_ID, SET_TIMEOUT, SET_DESC_SIZE = 9, 10, 11, 1
SET_WITH_TIMEOUT = 0x10
ADDRESS_TYPES = {4: (7, 4, 12), 6: (8, 16, 8)}  # IP version: nft type id, length, header offset
NFPROTO = {4: 2, 6: 10}
ELEM_DATA, DATA_VERDICT, VERDICT_CODE, VERDICT_CHAIN = 2, 2, 1, 2
EXPR_NAME, EXPR_DATA = 1, 2
REG_VERDICT, REG_1 = 0, 1
META_NFPROTO, META_L4PROTO, CT_STATE, CT_STATE_NEW = 15, 16, 0, 8
CMP_EQ, CMP_NEQ = 0, 1
IPPROTO = {"tcp": 6, "udp": 17}
PAYLOAD_NETWORK, DYNSET_UPDATE = 1, 1
REJECT_TCP_RST, CONNLIMIT_OVER = 1, 1
VERDICTS = {"accept": 1, "drop": 0, "return": 0xFFFFFFFB}
VERDICT_JUMP = 0xFFFFFFFD


def expression(name: str, *attrs: bytes) -> bytes:
    return nest(LIST_ELEM, attr(EXPR_NAME, text(name)), nest(EXPR_DATA, *attrs))


def compare(op: int, value: bytes) -> bytes:
    """cmp: register 1 against `value` (CMP_EQ, CMP_NEQ)."""
    return expression(
        "cmp", attr(1, be32(REG_1)), attr(2, be32(op)), nest(3, attr(DATA_VALUE, value))
    )


def meta_is(key: int, value: int, op: int = CMP_EQ) -> bytes:
    """meta nfproto / l4proto ==/!= value (both one byte)."""
    return expression("meta", attr(1, be32(REG_1)), attr(2, be32(key))) + compare(
        op, bytes([value])
    )


def ct_state_is(bits: int) -> bytes:
    """ct state in `bits`: the state masked with them is not zero."""
    return (
        expression("ct", attr(1, be32(REG_1)), attr(2, be32(CT_STATE)))
        + expression(
            "bitwise",
            attr(1, be32(REG_1)),
            attr(2, be32(REG_1)),
            attr(3, be32(4)),
            nest(4, attr(DATA_VALUE, struct.pack("=I", bits))),
            nest(5, attr(DATA_VALUE, bytes(4))),
        )
        + compare(CMP_NEQ, bytes(4))
    )


def connlimit_over(limit: int) -> bytes:
    return expression("connlimit", attr(1, be32(limit)), attr(2, be32(CONNLIMIT_OVER)))


def counter_ref(counter: str) -> bytes:
    """counter name C: the named counter object counts the packet."""
    return expression("objref", attr(1, be32(OBJECT_COUNTER)), attr(2, text(counter)))


def tcp_reset() -> bytes:
    return expression("reject", attr(1, be32(REJECT_TCP_RST)), attr(2, b"\0"))


def source_address(version: int) -> bytes:
    """ip saddr / ip6 saddr into register 1."""
    _type, length, offset = ADDRESS_TYPES[version]
    return expression(
        "payload",
        attr(1, be32(REG_1)),
        attr(2, be32(PAYLOAD_NETWORK)),
        attr(3, be32(offset)),
        attr(4, be32(length)),
    )


def set_update(set_name: str, set_id: int) -> bytes:
    """update @set { register 1 }: the set made in the same batch as `set_id`."""
    return expression(
        "dynset",
        attr(1, text(set_name)),
        attr(2, be32(set_id)),
        attr(3, be32(DYNSET_UPDATE)),
        attr(4, be32(REG_1)),
    )


def verdict(code: int, chain: str | None = None) -> bytes:
    parts = [attr(VERDICT_CODE, be32(code))]
    if chain is not None:
        parts.append(attr(VERDICT_CHAIN, text(chain)))
    return nest(DATA_VERDICT, *parts)


def immediate(code: int) -> bytes:
    """accept, drop, return: the verdict register set."""
    return expression("immediate", attr(1, be32(REG_VERDICT)), nest(2, verdict(code)))


def rule_message_attrs(table: str, chain: str, exprs: bytes) -> bytes:
    return (
        attr(RULE_TABLE, text(table))
        + attr(RULE_CHAIN, text(chain))
        + nest(RULE_EXPRESSIONS, exprs)
    )


def address_set_attrs(
    table: str, name: str, version: int, size: int, timeout_ms: int, set_id: int
) -> bytes:
    kind, length, _offset = ADDRESS_TYPES[version]
    return (
        attr(SET_TABLE, text(table))
        + attr(SET_NAME, text(name))
        + attr(SET_FLAGS, be32(SET_WITH_TIMEOUT))
        + attr(SET_KEY_TYPE, be32(kind))
        + attr(SET_KEY_LEN, be32(length))
        + nest(SET_DESC, attr(SET_DESC_SIZE, be32(size)))
        + attr(SET_ID, be32(set_id))
        + attr(SET_TIMEOUT, be64(timeout_ms))
    )


def jump_element(port: int, chain: str | None) -> bytes:
    """One verdict map element: the port as key, `jump chain` as value (None when deleting)."""
    parts = [nest(ELEM_KEY, attr(DATA_VALUE, unsigned(port, 2)))]
    if chain is not None:
        parts.append(nest(ELEM_DATA, verdict(VERDICT_JUMP, chain)))
    return nest(LIST_ELEM, *parts)


# --- decoding ------------------------------------------------------------------------------


def messages(data: bytes) -> Iterator[Message]:
    offset = 0
    while offset + HEADER.size <= len(data):
        length, full_type, _flags, seq, _pid = HEADER.unpack_from(data, offset)
        if length < HEADER.size:
            raise ValueError(f"netlink message of impossible length {length}")
        kind = full_type if full_type < 0x100 else full_type & 0xFF
        skip = 0 if full_type < 0x100 else NFGEN.size
        yield Message(kind, seq, data[offset + HEADER.size + skip : offset + length])
        offset += (length + 3) & ~3


def attrs(data: bytes) -> dict[int, bytes]:
    found: dict[int, bytes] = {}
    offset = 0
    while offset + ATTR.size <= len(data):
        length, kind = ATTR.unpack_from(data, offset)
        if length < ATTR.size:
            break
        found[kind & TYPE_MASK] = data[offset + ATTR.size : offset + length]
        offset += (length + 3) & ~3
    return found


def error_code(body: bytes) -> tuple[int, int]:
    """(errno, sequence of the request it answers) of an NLMSG_ERROR; errno 0 is an ACK."""
    (code,) = struct.unpack_from("=i", body)
    seq = HEADER.unpack_from(body, 4)[3] if len(body) >= 4 + HEADER.size else -1
    return -code, seq


def uint(raw: bytes) -> int:
    return int.from_bytes(raw, "big")


def kernel_object(body: bytes) -> KernelObject:
    found = attrs(body)
    return _object(
        found[OBJ_NAME].rstrip(b"\0"),
        uint(found[OBJ_TYPE]),
        found[OBJ_HANDLE],
        found.get(OBJ_DATA, b""),
    )


def _object(name: bytes, kind: int, handle: bytes, data: bytes) -> KernelObject:
    """An object from its name, type, handle and the attributes of its data nest."""
    values = attrs(data)
    first, second = (
        (QUOTA_BYTES, QUOTA_CONSUMED) if kind == OBJECT_QUOTA else (COUNTER_PACKETS, COUNTER_BYTES)
    )
    return KernelObject(
        name.decode(),
        kind,
        uint(handle),
        uint(values.get(first, b"")),
        uint(values.get(second, b"")),
    )


class ObjectScanner:
    """Decodes a dump of a table's objects in one regular-expression pass.

    A dump of 10,000 ports is 20,000 messages: walking them attribute by attribute in Python costs
    ~170 ms, this ~15 ms. The expression spells out the layout this kernel sends; the lengths of
    the matched messages must add up to the whole dump, otherwise (another kernel's layout) the
    dump is decoded the slow, general way. Objects seen unchanged since the last scan keep their
    decoded value, and a dump equal to the last one returns the very same list, so an idle poll
    decodes nothing. (Dumps are requested with one fixed sequence number, so an unchanged table
    dumps to the same bytes while the ruleset's generation stays the same.)
    """

    def __init__(self, table: str) -> None:
        table_attr = re.escape(attr(OBJ_TABLE, text(table)))
        new_obj = re.escape(struct.pack("=H", (NFNL_SUBSYS_NFTABLES << 8) | NEWOBJ))
        self._pattern = re.compile(
            b"(.{4})"
            + new_obj
            + b".{14}"
            + table_attr
            + rb"..\x02\x00([a-z]+_\d+)\x00+\x08\x00\x03\x00\x00\x00\x00[\x01\x02\x04]"
            + rb"\x0c\x00\x06\x00(.{8})\x08\x00\x05\x00.{4}"
            + rb"(\x1c\x00\x04[\x00\x80].{24}|\x24\x00\x04[\x00\x80].{32}"
            + rb"|\x34\x00\x04[\x00\x80].{48})",
            re.DOTALL,
        )
        self._known: dict[tuple[bytes, bytes, bytes], KernelObject] = {}
        self._last: tuple[list[tuple[bytes, ...]], list[KernelObject]] = ([], [])
        self._last_dump = b""

    def scan(self, dump: bytes) -> list[KernelObject]:
        """The objects of `dump`: NEWOBJ messages only, the closing NLMSG_DONE already cut off."""
        if dump == self._last_dump:
            return self._last[1]  # byte for byte the last dump: one memory comparison
        self._last_dump = dump
        found = self._pattern.findall(dump)
        if found and found == self._last[0]:
            return self._last[1]
        lengths = b"".join(match[0] for match in found)
        if sum(struct.unpack(f"={len(found)}I", lengths)) != len(dump):
            self._known, self._last, self._last_dump = {}, ([], []), b""
            return [kernel_object(m.body) for m in messages(dump) if m.kind == NEWOBJ]
        known, decoded = self._known, {}
        for _length, name, handle, data in found:
            slot = (name, handle, data)
            value = known.get(slot)
            if value is None:
                value = _object(name, DATA_KIND.get(data[0], OBJECT_COUNTER), handle, data[4:])
            decoded[slot] = value
        self._known = decoded
        self._last = (found, list(decoded.values()))
        return self._last[1]


def dump_part(chunk: bytes) -> tuple[int, Message | None, bool]:
    """How much of one received chunk of a dump is data, the message that ended the dump
    (NLMSG_DONE, or an NLMSG_ERROR) if this chunk holds it, and whether the kernel marked the
    dump inconsistent (the ruleset changed while it ran: objects may be missing or repeated).
    Reads headers only: a dump of 10,000 ports arrives as 20,000 messages."""
    offset, unpack, flags_seen = 0, HEADER.unpack_from, 0
    while offset + HEADER.size <= len(chunk):
        length, full_type, flags, seq, _pid = unpack(chunk, offset)
        flags_seen |= flags
        if full_type in (NLMSG_DONE, NLMSG_ERROR) or length < HEADER.size:
            ended = Message(full_type, seq, chunk[offset + HEADER.size : offset + length])
            return offset, ended, bool(flags_seen & DUMP_INTERRUPTED)
        offset += (length + 3) & ~3
    return offset, None, bool(flags_seen & DUMP_INTERRUPTED)


def selected(found: Mapping[int, bytes], keys: tuple[int, ...]) -> tuple[bytes | None, ...]:
    return tuple(found.get(k) for k in keys)


# --- sock_diag: established TCP connections, filtered by local port in the kernel ---------
# netinfo.py counts a key's connections with these (README "API"). pyroute2's
# inet_diag request has no attributes, so it cannot carry the filter: the kernel would send
# every socket of the host, and decoding them costs more than the few in the key range.

SOCK_DIAG_BY_FAMILY = 20
INET_DIAG_REQ_BYTECODE = 1
BC_S_GE, BC_S_LE = 2, 3  # inet_diag_bc_op codes: local (source) port >= / <= the next op's `no`
BC_OP = struct.Struct("=BBH")  # inet_diag_bc_op: code, bytes to skip if yes, if no (host order)
DIAG_REQ = struct.Struct("=BBBxI")  # inet_diag_req_v2 before its sockid: family, protocol, ext,
# states
SOCKID_SIZE = 48  # inet_diag_sockid: ports, addresses, interface, cookie
DIAG_SPORT = struct.Struct(">H")  # the sockid's first field: the local port
SOCKID_OFFSET = HEADER.size + 4  # inet_diag_msg's sockid, after family, state, timer, retrans
SOCK_DESTROY = 21
IPPROTO_TCP = 6
TCP_ESTABLISHED = 1


def port_range_bytecode(first: int, last: int) -> bytes:
    """An inet_diag filter program that accepts a socket whose local port is in first..last.

    Two comparisons of two ops each (the second op holds the port). A comparison that holds
    goes on to the next op; one that fails jumps 4 bytes past the program's end, which the
    kernel reads as "no match" (it accepts only a run that ends exactly at the end)."""
    if not 0 <= first <= last <= 0xFFFF:
        raise EncodeError(f"{first}-{last} is not a port range")
    size = 4 * BC_OP.size
    return b"".join(
        (
            BC_OP.pack(BC_S_GE, BC_OP.size * 2, size + 4),
            BC_OP.pack(0, 0, first),
            BC_OP.pack(BC_S_LE, BC_OP.size * 2, size // 2 + 4),
            BC_OP.pack(0, 0, last),
        )
    )


def established_request(family: int, first: int, last: int, seq: int) -> bytes:
    """A dump request for the established TCP sockets of `family` whose local port is in
    first..last, filtered by the kernel."""
    return diag_request(family, 1 << TCP_ESTABLISHED, first, last, seq)


def diag_request(
    family: int, states: int, first: int, last: int, seq: int, protocol: int = IPPROTO_TCP
) -> bytes:
    """A dump request for the sockets of `family` and `protocol` in `states` (a bit per TCP
    state) whose local port is in first..last, filtered by the kernel."""
    body = (
        DIAG_REQ.pack(family, protocol, 0, states)
        + bytes(SOCKID_SIZE)
        + attr(INET_DIAG_REQ_BYTECODE, port_range_bytecode(first, last))
    )
    return HEADER.pack(HEADER.size + len(body), SOCK_DIAG_BY_FAMILY, REQUEST | DUMP, seq, 0) + body


def destroy_request(family: int, states: int, sockid: bytes, seq: int) -> bytes:
    """SOCK_DESTROY of the one TCP socket `sockid` (as a dump answered it), acknowledged."""
    body = DIAG_REQ.pack(family, IPPROTO_TCP, 0, states) + sockid
    return HEADER.pack(HEADER.size + len(body), SOCK_DESTROY, REQUEST | ACK, seq, 0) + body


def diag_sockets(chunk: bytes) -> tuple[list[bytes], Message | None]:
    """The sockid of every socket in one received chunk of a sock_diag dump, and the message
    that ended the dump (NLMSG_DONE, or an NLMSG_ERROR) if this chunk holds it."""
    found: list[bytes] = []
    offset = 0
    while offset + HEADER.size <= len(chunk):
        length, kind, _flags, seq, _pid = HEADER.unpack_from(chunk, offset)
        if kind in (NLMSG_DONE, NLMSG_ERROR) or length < HEADER.size:
            return found, Message(kind, seq, chunk[offset + HEADER.size : offset + length])
        if kind == SOCK_DIAG_BY_FAMILY:
            at = offset + SOCKID_OFFSET
            found.append(chunk[at : at + SOCKID_SIZE])
        offset += (length + 3) & ~3
    return found, None


def diag_ports(chunk: bytes) -> tuple[list[int], Message | None]:
    """The local port of every socket in one received chunk of a sock_diag dump, and the message
    that ended the dump (NLMSG_DONE, or an NLMSG_ERROR) if this chunk holds it."""
    found, ended = diag_sockets(chunk)
    return [DIAG_SPORT.unpack_from(sockid)[0] for sockid in found], ended
