"""The key inbounds as written, kept in memory: what finds the change a push makes.

Both writers (`live.py`: one file, `confdir.py`: one file per key) keep a `KeyInbounds` of what
they wrote last, so a push after one key operation renders and checks that key alone (`Delta`)
instead of every key. Pure: no I/O.
"""

from __future__ import annotations

import json
from bisect import bisect_left
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from daemon.allocator import PortRange
from daemon.xray import render
from daemon.xray.drift import listens_overlap, security_problems
from daemon.xray.model import (
    Config,
    Reality,
    XrayConfigError,
    XrayKey,
    XrayOptions,
    port_spans,
    ports_among,
    unix_listen,
)
from daemon.xray.render import InboundChanges


@dataclass(frozen=True, slots=True)
class Rendered:
    """One key's inbound as written: the key, the inbound, and its exact bytes in the file.

    The model of a whole file holds one per key and keeps only the bytes (`parsed` None): the
    inbound, needed only for the few keys a push changes, is parsed again from them, since
    they are its own JSON (live.py's `_fragment`). That halves what the model holds."""

    key: XrayKey
    parsed: Config | None
    text: bytes

    @property
    def inbound(self) -> Config:
        return json.loads(self.text) if self.parsed is None else self.parsed


def rendered_key(
    key: XrayKey,
    opts: XrayOptions,
    reality: Reality | None,
    text_of: Callable[[Config], bytes],
) -> Rendered:
    """A key's inbound rendered, with its bytes as the writer puts them (`text_of`)."""
    inbound = render.render_inbound(key, opts, reality)
    return Rendered(key, inbound, text_of(inbound))


def _by_port(rendered: Iterable[Rendered]) -> list[Rendered]:
    """In the order the files list key inbounds."""
    return sorted(rendered, key=lambda r: r.key.port)


@dataclass(frozen=True, slots=True)
class Delta:
    """The key inbounds one push takes out of the live file and puts into it."""

    leaving: tuple[Rendered, ...] = ()
    arriving: tuple[Rendered, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.leaving or self.arriving)

    def changes(self) -> InboundChanges:
        """What `inbound_changes(old, new)` gives for the whole files, from the changed keys only
        (each key's inbound carries its tag; the files list them by port)."""
        return InboundChanges.between(
            {r.key.tag: r.inbound for r in _by_port(self.leaving)},
            {r.key.tag: r.inbound for r in _by_port(self.arriving)},
        )

    def reversed(self) -> Delta:
        return Delta(self.arriving, self.leaving)


class KeyInbounds:
    """The key inbounds as written, by port, each with its bytes (`text_of` its inbound), and
    the operator's tags and ports they must not collide with: what finds and checks the change
    a push makes, at the cost of the keys that changed.
    """

    def __init__(
        self,
        kept: Sequence[Any],
        rendered: Sequence[Rendered],
        reality: Reality | None,
        text_of: Callable[[Config], bytes],
        routed: Collection[str] = (),
    ) -> None:
        self.reality, self.text_of = reality, text_of
        self.routed = set(routed)  # the inbound tags routing rules name (render.route_keys)
        self.kept_tags = {
            tag for i in kept if isinstance(i, Mapping) and isinstance(tag := i.get("tag"), str)
        }
        # The operator's ports, each span with the listen address (unix sockets hold none).
        self.kept_spans = [
            (first, last, str(inbound.get("listen") or ""))
            for inbound in kept
            if isinstance(inbound, Mapping) and unix_listen(inbound) is None
            for first, last in port_spans(inbound)
        ]
        self.by_uuid = {r.key.uuid: r for r in rendered}
        # By id() of the XrayKey: the model holds each key, so no other object has its id.
        self.by_object = {id(r.key): r for r in rendered}
        self.ports = [r.key.port for r in rendered]
        self.texts = [r.text for r in rendered]

    def delta(
        self, keys: Sequence[XrayKey], opts: XrayOptions, reality: Reality | None
    ) -> Delta | None:
        """The change from the file's keys to `keys`, its new inbounds rendered and checked.

        None when only a full render can tell: another server key pair, no keys, keys sharing a
        uuid or port, an inbound that cannot be rendered or would be refused. The full path then
        raises the very error it always raised.

        Unchanged keys are the very XrayKey objects of the last push (the bridge caches them),
        so the changed ones are found by comparing sets of object ids, which never touches the
        keys themselves: set operations over a list, not a walk through 10,000 objects.
        """
        if reality != self.reality or not keys:
            return None
        objects = set(map(id, keys))
        if len(objects) != len(keys):
            return None
        arriving = [key for key in keys if id(key) not in self.by_object]
        leaving = []
        if len(self.by_object) != len(keys) - len(arriving):  # some keys of the file are gone
            leaving = [r for i, r in self.by_object.items() if i not in objects]
        freed = {r.key.uuid: r.key.port for r in leaving}
        uuids: set[str] = set()
        ports: set[int] = set()
        for key in arriving:
            if key.uuid in uuids or (key.uuid in self.by_uuid and key.uuid not in freed):
                return None
            if key.port in ports or (self._has_port(key.port) and key.port not in freed.values()):
                return None
            uuids.add(key.uuid)
            ports.add(key.port)
        if self.routed and self._reroutes(arriving, leaving):
            return None
        try:
            rendered = [rendered_key(key, opts, reality, self.text_of) for key in arriving]
        except XrayConfigError:
            return None
        if any(self._refused(r, opts) for r in rendered):
            return None
        return Delta(tuple(leaving), tuple(rendered))

    def swap(self, delta: Delta) -> None:
        """Take the delta's leaving inbounds out and put its arriving ones in, by port."""
        for r in delta.leaving:
            at = bisect_left(self.ports, r.key.port)
            del self.ports[at], self.texts[at], self.by_uuid[r.key.uuid], self.by_object[id(r.key)]
        for r in delta.arriving:
            at = bisect_left(self.ports, r.key.port)
            self.ports.insert(at, r.key.port)
            self.texts.insert(at, r.text)
            self.by_uuid[r.key.uuid] = r
            self.by_object[id(r.key)] = r

    def rewind(self, delta: Delta) -> None:
        """Take back a delta `swap` made (its push was undone)."""
        self.swap(delta.reversed())

    def _reroutes(self, arriving: Sequence[XrayKey], leaving: Sequence[Rendered]) -> bool:
        """Whether the change adds a key's tag to the routing rules or takes one out of them
        (render.route_keys): the rules are outside the spliced part, so it takes the full path."""
        staying = {key.tag for key in arriving}
        before = {r.key.tag: r.key.route_sources for r in leaving}  # a changed key: as it was
        return any(r.key.tag in self.routed and r.key.tag not in staying for r in leaving) or any(
            before.get(key.tag) != key.route_sources
            and not self.routed.isdisjoint(key.route_sources)
            for key in arriving
        )

    def _has_port(self, port: int) -> bool:
        at = bisect_left(self.ports, port)
        return at < len(self.ports) and self.ports[at] == port

    def _refused(self, rendered: Rendered, opts: XrayOptions) -> bool:
        """Whether `check_config` would object to this new inbound: its REALITY fields, or a tag
        or port (on an overlapping listen address) that one of the operator's inbounds has."""
        inbound = rendered.inbound
        if inbound["tag"] in self.kept_tags or security_problems(inbound, opts):
            return True
        listen, port = str(inbound.get("listen") or ""), rendered.key.port
        return any(
            a <= port <= b and listens_overlap(listen, other) for a, b, other in self.kept_spans
        )

    def operator_ports(self, port_range: PortRange) -> set[int]:
        """The ports of `port_range` the operator's inbounds listen on (ranges and lists too)."""
        spans = ((a, b) for a, b, _ in self.kept_spans)
        return ports_among(spans, port_range.first, port_range.last)
