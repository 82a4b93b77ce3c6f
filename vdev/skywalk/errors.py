"""Skywalk's errors: the shared ring-contract taxonomy (from :mod:`vdev.errors`, re-exported
as part of this package's API) and the pool's own."""

from __future__ import annotations

from vdev.errors import DefunctError, KillReason, SyncError, SyncKind, VdevError


class SkywalkError(VdevError):
    """Base of the errors only this package raises."""


class PoolError(SkywalkError):
    """Misuse of the packet pool by trusted code (bad config, double free, leak)."""


__all__ = ["DefunctError", "KillReason", "PoolError", "SkywalkError", "SyncError", "SyncKind"]
