"""The one config file, kept in memory: `LiveConfig` writes a set of keys at the cost of what
changed, splicing the changed keys' inbounds into the bytes it wrote last time.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Collection, Mapping, Sequence
from typing import Any

from daemon.xray import render
from daemon.xray.drift import check_config
from daemon.xray.model import (
    Config,
    Reality,
    XrayConfigError,
    XrayError,
    XrayKey,
    XrayOptions,
    tag_uuid,
)
from daemon.xray.render import InboundChanges
from daemon.xray_io.files import Signature, json_bytes, serialize
from daemon.xray_io.inbounds import Delta, KeyInbounds, Rendered
from daemon.xray_io.writer import IncrementalWriter, Written

# How `serialize` separates the inbounds: each sits at depth two of the indented dump.
INBOUND_SEPARATOR = b",\n    "


def _fragment(inbound: Mapping[str, Any]) -> bytes:
    """An inbound's bytes inside the written file.

    `serialize` nests every inbound at depth two and JSON strings hold no raw newline, so the
    inbound's own indented dump with four more spaces after each newline is exactly its text
    there, whatever else the file holds.
    """
    return json_bytes(inbound, deeper="    ")


class _Model(KeyInbounds):
    """The live file as portmeter last wrote it, in pieces a one-key change can splice.

    The operator's part is fixed text around the list of key inbounds (`head`, `tail`); the key
    inbounds are one fragment each, kept in port order. Invariants while a model is in use: the
    file whose signature is the writer's stamp holds exactly `data`, and `check_config` finds
    nothing wrong with it, so a change needs checking only where it can break something.
    """

    def __init__(
        self,
        head: bytes,
        tail: bytes,
        kept: Sequence[Any],
        rendered: Sequence[Rendered],
        reality: Reality | None,
        routed: Collection[str] = (),
    ) -> None:
        super().__init__(kept, rendered, reality, _fragment, routed)
        self.head, self.tail = head, tail
        self.data = self.assemble()

    @classmethod
    def build(
        cls,
        config: Config,
        rendered: Sequence[Rendered],
        opts: XrayOptions,
        reality: Reality | None,
    ) -> _Model | None:
        """The model of `config`, rendered from `rendered` (by port), or None where splicing
        would not give what `render_config` gives.

        That is without key inbounds (whether "inbounds" is written at all then depends on the
        file's history), and in api mode with an api tag shaped like a key's (a key inbound
        could then stand in for the API inbound).
        """
        if not rendered:
            return None
        if opts.apply == "api" and tag_uuid(config["api"].get("tag")) is not None:
            return None
        inbounds = config["inbounds"]
        kept = inbounds[: len(inbounds) - len(rendered)]
        marker = f"portmeter-key-inbounds-{secrets.token_hex(16)}"
        data = serialize({**config, "inbounds": [*kept, marker]})
        around = data.split(json.dumps(marker).encode())
        if len(around) != 2:
            return None
        return cls(around[0], around[1], kept, rendered, reality, render.routed_tags(config))

    def assemble(self) -> bytes:
        return b"".join((self.head, INBOUND_SEPARATOR.join(self.texts), self.tail))

    def rewind(self, delta: Delta) -> None:
        super().rewind(delta)
        self.data = self.assemble()


class LiveConfig(IncrementalWriter[_Model]):
    """Xray's config for a set of keys, written at the cost of what changed, not of all keys.

    Keeps a model of the live file (see `_Model`). A push re-renders only keys whose XrayKey
    changed, checks only what they can break, splices their fragments into the file's bytes and
    replaces the file (with a hard-linked backup). The bytes are always exactly
    `serialize(render_config(live config, keys, ...))`. Whenever the model cannot vouch for
    that (no model yet, the file changed behind our back, a new `base`, anything unusual) the
    push takes the full path: read, render, validate and write everything, as before.
    """

    def stamp(self) -> Signature | None:
        """Inode, size and mtime of the file: what changes whenever anyone writes it."""
        return self.files.signature()

    def read(self) -> Config:
        """The live file as a config (the minimal base while there is none)."""
        return self.files.read()

    def _put_back(self, written: Written) -> None:
        """Put back the bytes `written` replaced and drop its backup."""
        self.files.restore(written.previous)
        self.files.discard_backup(written.backup)

    def _splice(self, model: _Model, delta: Delta) -> Written:
        previous = model.data
        model.swap(delta)
        data = model.assemble() if delta else previous
        if data == previous:  # no key changed, or none in a way its inbound shows (e.g. its id)
            self._model = model
            return Written(previous, None, InboundChanges(), InboundChanges, False)
        try:
            self.files.binary_test(data)
            backup = self.files.replace(data, previous)
        except XrayError:
            model.swap(delta.reversed())  # the live file was not replaced
            self._model = model
            raise
        model.data, self._stamp = data, self.files.signature()
        self._model = model
        return Written(previous, backup, delta.changes(), delta.reversed().changes, True, delta)

    def _full(
        self, keys: Sequence[XrayKey], reality: Reality | None, base: Mapping[str, Any] | None
    ) -> Written:
        previous, signature = self.files.read_signed()
        read = self.files.parse_text(previous)
        old = read.config
        by_port = sorted(keys, key=lambda k: k.port)
        render.check_keys_unique(by_port)
        ours = [render.render_inbound(key, self.opts, reality) for key in by_port]
        new = render.with_inbounds(old if base is None else base, ours, self.opts, by_port)
        try:
            rendered = [Rendered(k, None, _fragment(i)) for k, i in zip(by_port, ours, strict=True)]
            model = _Model.build(new, rendered, self.opts, reality)
        except XrayConfigError:
            model = None  # serialize raises the error for the whole config below
        data = serialize(new) if model is None else model.data
        if data == previous:
            if model is not None and not check_config(new, self.opts, keys):
                self._stamp = signature
                self._model = model
            # The model's bytes, equal to those read: one copy of the file is kept, not two.
            return Written(data, None, InboundChanges(), InboundChanges, False)
        self.files.validate(new, keys, data)
        backup = self.files.replace(data, previous)
        if model is not None:
            self._stamp = self.files.signature()
            self._model = model
        return Written(
            previous,
            backup,
            render.inbound_changes(old, new),
            lambda: render.inbound_changes(new, old),
            True,
            comments_dropped=read.comments,
        )
