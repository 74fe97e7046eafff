"""Errors an operation can end with; each carries the HTTP status the API answers with.

The API answers every OperationError as `{"detail": ...}` with its `status`; the CLI prints the
detail on one line and exits 1. Nothing reaches a client as a 500 (OperationFailed is 503).

    OperationError ............................ 400  the base (never raised itself)
    ├── NotFound .............................. 404  no such key, user, subscription or copy
    ├── Conflict .............................. 409  the name or port is taken
    ├── Invalid ............................... 422  a value the API, the kernel or a bound refuses
    ├── KernelRefused ......................... 503  nftables refused (`denied`: EPERM/EACCES)
    ├── XrayRefused ........................... 503  Xray's config not written or applied
    ├── OperationFailed ....................... 503  a bug, not bad input; rolled back, logged
    ├── StoreUnavailable ...................... 503  a store failed for another reason
    └── StorageFull ........................... 507  the disk is full (Xray: any failed write)

Module errors below never reach a client as they are: the module named turns each into one of
the above (or the CLI into a one-line message and exit 1), as the arrow says.

    daemon/kernel.py         NftError -> KernelRefused
                             └── OutOfRange -> Invalid
    daemon/nft/codec.py      EncodeError (ValueError) -> OutOfRange
    daemon/allocator.py      PortUnavailable -> Conflict
    daemon/names.py          NameRefused (ValueError) -> 422 (a request validation error)
    daemon/store/state.py    StateError -> CLI: the daemon refuses to start
                             StorageError -> StorageFull (disk_full) | StoreUnavailable
    daemon/store/usage.py    SinkError -> StorageFull (disk_full) | StoreUnavailable
    daemon/store/history.py  HistoryError (StateError, SinkError): either of the above
                             ReportRefused (ValueError) -> Invalid
    daemon/atomic.py         LinkRefused (OSError): a symbolic link where portmeter writes
    daemon/xray/model.py     XrayError -> XrayRefused
                             ├── XrayConfigError
                             ├── XrayStorageError -> StorageFull
                             └── XrayApplyError
    daemon/settings.py       SettingsError -> CLI: "bad settings: ...", exit 1
    daemon/http/server.py    SocketBusy -> CLI: the daemon refuses to start
    daemon/cli.py            CliError -> one line on stderr, exit 1

The HTTP layer answers some requests before any operation runs, without these classes: 400 (the
body is not JSON), 422 (the body does not match the schema), 401/403 (the API key; the guard's
Refusal in daemon/http/middleware/auth.py), 408 (a request too slow to arrive) and 413 (a body
too large).
"""

from __future__ import annotations


class OperationError(Exception):
    """The base: `detail` is the one sentence the client reads, `status` the HTTP answer."""

    status = 400

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class NotFound(OperationError):
    """No key, user, subscription or copy by that name or id."""

    status = 404


class Conflict(OperationError):
    """The name or the port asked for is taken; nothing was changed."""

    status = 409


class Invalid(OperationError):
    """A value the API, a bound (daemon/bounds.py) or the kernel refuses; nothing was changed."""

    status = 422


class KernelRefused(OperationError):
    """nftables refused a change; nothing was changed. `denied`: refused for lack of privileges
    (EPERM, EACCES), the only case where "needs root or CAP_NET_ADMIN" is the remedy."""

    status = 503

    def __init__(self, detail: str, denied: bool = False) -> None:
        super().__init__(detail)
        self.denied = denied


class StorageFull(OperationError):
    """The state could not be written (disk full, read-only); nothing was changed."""

    status = 507


class XrayRefused(OperationError):
    """Xray's config could not be written or applied; everything was rolled back."""

    status = 503


class OperationFailed(OperationError):
    """A step failed in a way nobody foresaw (a bug, not bad input); everything was rolled back
    and the daemon log holds the traceback. Answered as 503, never as a 500."""

    status = 503


class StoreUnavailable(OperationError):
    """A store could not be used for another reason than a full disk (database locked, I/O
    error, read-only file system); nothing was changed. 507 is kept for a full disk."""

    status = 503
