"""The words portmeter's rules are made of, each with its encodings. Pure.

A rule is a tuple of these expressions (layout.py writes every chain with them, once). Each has
its libnftables JSON, exactly as `nft -j list` shows it back (the layout check compares the two);
those of a chain that is also changed over netlink (a key's guard chain) have their netlink form
too, the expressions libnftables would send for the same text (codec.py encodes them), so a chain
made either way lists the same. mypy keeps a rule without a netlink form out of a netlink change:
its type is `Rule`, not `NetlinkRule`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from daemon.nft import codec as nl

Json = dict[str, Any]


class Expr(Protocol):
    def json(self) -> Json: ...


class NetlinkExpr(Expr, Protocol):
    def netlink(self, set_ids: Mapping[str, int]) -> bytes:
        """The expression's netlink form; `set_ids`: the batch's ids of sets it makes."""
        ...


Rule = tuple[Expr, ...]
NetlinkRule = tuple[NetlinkExpr, ...]


def payload(protocol: str, field: str) -> Json:
    return {"payload": {"protocol": protocol, "field": field}}


def _match(op: str, left: Json, right: Any) -> Json:
    return {"match": {"op": op, "left": left, "right": right}}


@dataclass(frozen=True, slots=True)
class L4Proto:
    """meta l4proto tcp (or != tcp)"""

    proto: str
    equal: bool = True

    def json(self) -> Json:
        return _match("==" if self.equal else "!=", {"meta": {"key": "l4proto"}}, self.proto)

    def netlink(self, set_ids: Mapping[str, int]) -> bytes:
        op = nl.CMP_EQ if self.equal else nl.CMP_NEQ
        return nl.meta_is(nl.META_L4PROTO, nl.IPPROTO[self.proto], op)


@dataclass(frozen=True, slots=True)
class NfProto:
    """meta nfproto ipv4 / ipv6"""

    version: int

    def json(self) -> Json:
        return _match("==", {"meta": {"key": "nfproto"}}, f"ipv{self.version}")

    def netlink(self, set_ids: Mapping[str, int]) -> bytes:
        return nl.meta_is(nl.META_NFPROTO, nl.NFPROTO[self.version])


@dataclass(frozen=True, slots=True)
class TcpFlag:
    """tcp flags & rst == rst"""

    flag: str

    def json(self) -> Json:
        flags = {"&": [payload("tcp", "flags"), self.flag]}
        return _match("==", flags, self.flag)


@dataclass(frozen=True, slots=True)
class NewConnection:
    """ct state new"""

    def json(self) -> Json:
        return _match("in", {"ct": {"key": "state"}}, "new")

    def netlink(self, set_ids: Mapping[str, int]) -> bytes:
        return nl.ct_state_is(nl.CT_STATE_NEW)


@dataclass(frozen=True, slots=True)
class ConnectionsOver:
    """ct count over N"""

    limit: int

    def json(self) -> Json:
        return {"ct count": {"val": self.limit, "inv": True}}

    def netlink(self, set_ids: Mapping[str, int]) -> bytes:
        return nl.connlimit_over(self.limit)


@dataclass(frozen=True, slots=True)
class Count:
    """counter name C"""

    counter: str

    def json(self) -> Json:
        return {"counter": self.counter}

    def netlink(self, set_ids: Mapping[str, int]) -> bytes:
        return nl.counter_ref(self.counter)


@dataclass(frozen=True, slots=True)
class ByPort:
    """counter / quota / limit name th dport map @m: the object the port's element names."""

    statement: str  # counter, quota, limit
    field: str  # dport, sport
    map: str
    protocol: str = "th"

    def json(self) -> Json:
        return {
            self.statement: {
                "map": {"key": payload(self.protocol, self.field), "data": f"@{self.map}"}
            }
        }


@dataclass(frozen=True, slots=True)
class JumpByPort:
    """th dport vmap @m: on to the verdict the port's element holds."""

    field: str
    map: str

    def json(self) -> Json:
        return {"vmap": {"key": payload("th", self.field), "data": f"@{self.map}"}}


@dataclass(frozen=True, slots=True)
class RememberSource:
    """update @set { ip saddr } (ip6 saddr for version 6)"""

    version: int
    set: str

    def json(self) -> Json:
        family = "ip" if self.version == 4 else "ip6"
        return {"set": {"op": "update", "elem": payload(family, "saddr"), "set": f"@{self.set}"}}

    def netlink(self, set_ids: Mapping[str, int]) -> bytes:
        return nl.source_address(self.version) + nl.set_update(self.set, set_ids[self.set])


@dataclass(frozen=True, slots=True)
class Verdict:
    """accept, drop, return"""

    kind: str

    def json(self) -> Json:
        return {self.kind: None}

    def netlink(self, set_ids: Mapping[str, int]) -> bytes:
        return nl.immediate(nl.VERDICTS[self.kind])


@dataclass(frozen=True, slots=True)
class TcpReset:
    """reject with tcp reset"""

    def json(self) -> Json:
        return {"reject": {"type": "tcp reset"}}

    def netlink(self, set_ids: Mapping[str, int]) -> bytes:
        return nl.tcp_reset()


ACCEPT, DROP, RETURN = Verdict("accept"), Verdict("drop"), Verdict("return")


def json_rule(rule: Rule) -> list[Json]:
    return [expr.json() for expr in rule]


def netlink_rule(rule: NetlinkRule, set_ids: Mapping[str, int]) -> bytes:
    return b"".join(expr.netlink(set_ids) for expr in rule)
