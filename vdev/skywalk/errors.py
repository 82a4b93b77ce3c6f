"""The kill-reason taxonomy shared by channel rings and virtqueues.

A user (a channel client or a guest driver) that breaks the ring contract is not trusted
again: the sync that saw the violation raises :class:`SyncError` naming one
:class:`KillReason` and the :class:`SyncKind` it came from, and the channel or queue goes
defunct.  Later calls raise :class:`DefunctError`.  The names reproduce Skywalk's
``SKYWALK_KILL_REASON_*`` values so logs read the same in both worlds.
"""

from __future__ import annotations

import enum


class KillReason(enum.Enum):
    """Why a sync rejected its user (the Skywalk names, exactly)."""

    BASIC_SANITY = "basic_sanity"
    HEAD_OOB = "head_oob"
    HEAD_OOB_WRAPPED = "head_oob_wrapped"
    TAIL_MISMATCH = "tail_mismatch"
    QUM_IDX_MISMATCH = "qum_idx_mismatch"
    INTERNALIZE_FAILED = "internalize_failed"
    UNALLOCATED_PKT = "unallocated_pkt"
    BAD_BUFLET_CHAIN = "bad_buflet_chain"
    SLOT_NOT_DETACHED = "slot_not_detached"
    INCONSISTENT_READY_BYTES = "inconsistent_ready_bytes"


class SyncKind(enum.Enum):
    """Which sync saw the violation."""

    TX = "tx"
    RX = "rx"
    ALLOC = "alloc"
    FREE = "free"
    EVENT = "event"


class SkywalkError(Exception):
    """Base of every error this package raises on purpose."""


class SyncError(SkywalkError):
    """A sync found a contract violation; the ring's owner is now defunct."""

    def __init__(self, reason: KillReason, sync: SyncKind, detail: str) -> None:
        self.reason = reason
        self.sync = sync
        self.detail = detail
        super().__init__(f"{sync.name} sync: {reason.name}: {detail}")


class DefunctError(SkywalkError):
    """The channel or queue was killed earlier; it accepts no more calls."""

    def __init__(self, what: str, cause: SyncError | None) -> None:
        self.cause = cause
        because = f" after {cause.sync.name} sync {cause.reason.name}" if cause else ""
        super().__init__(f"{what} is defunct{because}")


class PoolError(SkywalkError):
    """Misuse of the packet pool by trusted code (bad config, double free, leak)."""
