"""Errors an operation can end with; each carries the HTTP status the API answers with."""

from __future__ import annotations


class OperationError(Exception):
    status = 400

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class NotFound(OperationError):
    status = 404


class Conflict(OperationError):
    status = 409


class Invalid(OperationError):
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
