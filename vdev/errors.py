"""The root of vdev's error types, and the ring-contract errors every layer shares.

Every exception vdev raises on purpose derives from :class:`VdevError` (packages add their
own subclasses: ``skywalk.errors.PoolError``, ``vhost.codec.ProtocolError``,
``virtio.memory.MemoryFault``, ...).  The ring contract is one taxonomy for channel rings and
virtqueues alike: a user (a channel client or a guest driver) that breaks it is not trusted
again.  The sync that saw the violation raises :class:`SyncError` naming one
:class:`KillReason` and the :class:`SyncKind` it came from, and the channel or queue goes
defunct; later calls raise :class:`DefunctError`.  The names reproduce Skywalk's
``SKYWALK_KILL_REASON_*`` values so logs read the same in both worlds.
"""

from __future__ import annotations

import enum


class VdevError(Exception):
    """Base of every error vdev raises on purpose."""


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
    """Which sync saw the violation; for a virtqueue also its direction (RX: the device
    writes, TX: the device reads)."""

    TX = "tx"
    RX = "rx"
    ALLOC = "alloc"
    FREE = "free"
    EVENT = "event"


class SyncError(VdevError):
    """A sync found a contract violation; the ring's owner is now defunct."""

    def __init__(self, reason: KillReason, sync: SyncKind, detail: str) -> None:
        self.reason = reason
        self.sync = sync
        self.detail = detail
        super().__init__(f"{sync.name} sync: {reason.name}: {detail}")


class DefunctError(VdevError):
    """The channel or queue was killed earlier; it accepts no more calls."""

    def __init__(self, what: str, cause: SyncError | None) -> None:
        self.cause = cause
        because = f" after {cause.sync.name} sync {cause.reason.name}" if cause else ""
        super().__init__(f"{what} is defunct{because}")


class GuestMemoryFault(VdevError):
    """Guest memory went away under the device: the frontend shrank or truncated a shared
    region after SET_MEM_TABLE, and an access past its new end raised SIGBUS (recovered by
    ``vdev/native/memguard.c``).  Costs the connection that owns the memory, nothing else."""

    def __init__(self, gpa: int, size: int, offset: int, faults: int) -> None:
        self.gpa = gpa
        self.size = size
        self.offset = offset
        self.faults = faults
        super().__init__(
            f"guest memory region gpa {gpa:#x}+{size:#x} faulted at offset {offset:#x} "
            f"({faults} SIGBUS): the frontend truncated or shrank the region's fd after "
            "mapping it"
        )


__all__ = [
    "DefunctError",
    "GuestMemoryFault",
    "KillReason",
    "SyncError",
    "SyncKind",
    "VdevError",
]
