"""The writer protocol: what the service drives, whichever way Xray's keys are written.

Two writers implement it: `LiveConfig` (live.py: every key in the one config file) and `ConfDir`
(confdir.py: one file per key in PORTMETER_XRAY_CONFDIR). The service holds an `XrayWriter` and
never asks which. `IncrementalWriter` is what both share: the model of the key inbounds as last
written, trusted only while the files' stamp is the one it was written at, so a push after one
key operation costs that key (a `Delta`) and anything unusual takes the full path; and the undo
of the latest push, which rolls the model back with the files.
"""

from __future__ import annotations

import weakref
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

from daemon.allocator import PortRange
from daemon.xray.model import Config, Reality, XrayKey, XrayOptions, inbounds_of, operator_ports
from daemon.xray.render import InboundChanges
from daemon.xray_io.files import XrayFiles
from daemon.xray_io.inbounds import Delta, KeyInbounds


@dataclass(frozen=True, slots=True, weakref_slot=True)
class Written:
    """What one push did: the changes for Xray, and what the writer's `undo` needs."""

    previous: bytes | None  # one file: the file's bytes before (None: there was no file)
    backup: Path | None
    changes: InboundChanges
    # The changes that take a running Xray back; computed only when undoing.
    reverse: Callable[[], InboundChanges]
    wrote: bool
    delta: Delta | None = None  # set when the push spliced the model
    comments_dropped: bool = False  # the replaced file had comments (its backup keeps them)
    # One file per key: each key file the push changed, with its bytes before (None: it did
    # not exist).
    restores: tuple[tuple[Path, bytes | None], ...] = ()


class XrayWriter(Protocol):
    """What daemon/service/xray_side.py drives to put the keys into Xray's files."""

    def push(
        self,
        keys: Sequence[XrayKey],
        reality: Reality | None,
        base: Mapping[str, Any] | None = None,
    ) -> Written:
        """Write the config for `keys` (on `base`: a migration's config, one file only); raise
        XrayError having left every file as it was."""

    def undo(self, written: Written) -> None:
        """Put back the files `written` changed; Xray is the caller's part."""

    def stamp(self) -> object:
        """What changes whenever anyone writes the files Xray reads."""

    def operator_ports(self, port_range: PortRange) -> set[int]:
        """The ports of `port_range` the operator's inbounds hold."""

    def read(self) -> Config:
        """The config Xray reads."""


Model = TypeVar("Model", bound=KeyInbounds)


class IncrementalWriter(ABC, Generic[Model]):
    """A writer that keeps a model of what it wrote last and writes at the cost of what changed.

    A push takes the model's delta while the files' stamp is the one the model was made at and
    the model can tell the change (`KeyInbounds.delta`); otherwise the full path: read,
    render, check and write everything. A writer sets `_model` and `_stamp` whenever it knows
    the files hold what the model says.
    """

    def __init__(self, files: XrayFiles) -> None:
        self.files = files
        self._model: Model | None = None
        self._stamp: object = None  # the files' stamp when they last held what `_model` holds
        # The latest push, while its caller may still undo it: kept alive by the caller alone,
        # so the bytes before it that it holds go once the operation is over.
        self._last: weakref.ref[Written] | None = None

    @property
    def opts(self) -> XrayOptions:
        return self.files.opts

    @abstractmethod
    def stamp(self) -> object:
        """What changes whenever anyone writes the files this writer trusts its model for."""

    @abstractmethod
    def read(self) -> Config:
        """The config Xray reads."""

    def push(
        self,
        keys: Sequence[XrayKey],
        reality: Reality | None,
        base: Mapping[str, Any] | None = None,
    ) -> Written:
        """Write the config for `keys` (on `base`, default: the live files); raise XrayError
        having left every file as it was."""
        model, self._model = self._model, None  # until the files are known to match it again
        if model is not None and base is None and self._stamp == self.stamp():
            delta = model.delta(keys, self.opts, reality)
            if delta is not None:
                return self._latest(self._splice(model, delta))
        return self._latest(self._full(keys, reality, base))

    def undo(self, written: Written) -> None:
        """Put back the files `written` changed; Xray is the caller's part.

        After the latest push the model is rolled back too; otherwise it is dropped and the
        next push takes the full path.
        """
        if not written.wrote:
            return
        model, self._model = self._model, None
        self._put_back(written)
        latest = None if self._last is None else self._last()
        if model is not None and written is latest and written.delta is not None:
            model.rewind(written.delta)
            self._stamp, self._model = self.stamp(), model
        self._last = None

    def operator_ports(self, port_range: PortRange) -> set[int]:
        """The ports of `port_range` the operator's inbounds hold: from the model while the
        files are as portmeter left them, else read from the files."""
        model = self._model
        if model is not None and self._stamp == self.stamp():
            return model.operator_ports(port_range)
        inbounds = inbounds_of(self._operators())
        return operator_ports(inbounds, port_range.first, port_range.last)

    def _latest(self, written: Written) -> Written:
        self._last = weakref.ref(written)
        return written

    @abstractmethod
    def _splice(self, model: Model, delta: Delta) -> Written:
        """Write the change `delta` (from `model.delta`) alone."""

    @abstractmethod
    def _full(
        self, keys: Sequence[XrayKey], reality: Reality | None, base: Mapping[str, Any] | None
    ) -> Written:
        """Read everything, render every key, check the whole, write what differs."""

    @abstractmethod
    def _put_back(self, written: Written) -> None:
        """Put the files `written` changed back as they were."""

    def _operators(self) -> Config:
        """The config the operator's inbounds are read from, when the model cannot tell."""
        return self.read()
