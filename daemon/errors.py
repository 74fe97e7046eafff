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
    """nftables refused a change; nothing was changed."""

    status = 503


class StorageFull(OperationError):
    """The state could not be written (disk full, read-only); nothing was changed."""

    status = 507


class XrayRefused(OperationError):
    """Xray's config could not be written or applied; everything was rolled back."""

    status = 503
