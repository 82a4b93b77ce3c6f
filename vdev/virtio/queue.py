"""The device-side virtqueue interface: all that the vhost-user backend, the NIC and the fault
engine may use of a queue, split (2.7 "Split Virtqueues") or packed (2.8 "Packed
Virtqueues").

Two protocols, in the spirit of rust-vmm's ``virtio-queue`` ``QueueT``:

* :class:`QueueFormat` is the class side, what the backend needs before a queue exists:
  the ring areas for a size (SET_VRING_ADDR / SET_MEM_TABLE checks), the size rule
  (SET_VRING_NUM), the vhost-user base encoding (SET_VRING_BASE), and the constructor.
  :func:`queue_format` picks one from the negotiated features (VIRTIO_F_RING_PACKED).
* :class:`VirtQueue` is one running queue: pop/rewind on the avail side, push/flush on the
  used side, notifications, in-flight accounting and the life cycle (remap, kill, close).

The queue does not know which way data flows: the device says so with ``sync`` (a
:class:`SyncKind`: ``RX`` device-writable buffers only, ``TX`` device-readable only, anything
else readable-then-writable), because "even index = receiveq" is virtio-net knowledge
(5.1.2), not virtqueue knowledge.

:class:`QueueLifecycle` is the shared implementation of remap/kill/the defunct check, and
:class:`VirtqueueStats` the counters both formats keep.
"""

from __future__ import annotations

import sys
from array import array
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from vdev.abi import lib
from vdev.errors import DefunctError, SyncError, SyncKind
from vdev.virtio.memory import GuestMemory, MemoryFault
from vdev.virtio.ringstate import CField, CFlag, new_state

if TYPE_CHECKING:
    from vdev.virtio.chain import Chain
    from vdev.virtio.inflight import RingResume

# 2.7 / 2.8: "Queue Size ... The maximum Queue Size value is 32768".
MAX_QUEUE_SIZE = 32768
# 6 "Reserved Feature Bits": the ring features both formats read.
F_RING_PACKED = 1 << lib.VIRTIO_F_RING_PACKED
F_INDIRECT_DESC = 1 << lib.VIRTIO_RING_F_INDIRECT_DESC
F_EVENT_IDX = 1 << lib.VIRTIO_RING_F_EVENT_IDX
F_VERSION_1 = 1 << lib.VIRTIO_F_VERSION_1


@dataclass(frozen=True)
class RingArea:
    """One of a ring's three guest-memory areas: ``name`` for messages, ``field`` the vhost-user
    SET_VRING_ADDR field that carries its address, its byte length and required alignment."""

    name: str
    field: str
    length: int
    align: int


@dataclass
class VirtqueueStats:
    """Counters of one virtqueue (the ring-stats twin of Skywalk's ``RingStats``)."""

    chains: int = 0
    descriptors: int = 0
    bytes_read: int = 0  # device-readable bytes of popped chains
    bytes_written: int = 0  # ``written`` totals of pushed used elements
    used: int = 0  # used elements pushed
    flushes: int = 0  # used idx publications
    notifications_sent: int = 0
    notifications_suppressed: int = 0
    kills: int = 0

    @property
    def bytes(self) -> int:
        return self.bytes_read + self.bytes_written


# The counters the compiled bursts keep too: in the queue's struct (vdev/virtio/ringstate.py).
_STRUCT_COUNTERS = (
    "chains",
    "descriptors",
    "bytes_read",
    "bytes_written",
    "used",
    "flushes",
    "notifications_sent",
    "notifications_suppressed",
)


class StructStats(VirtqueueStats):
    """A queue's :class:`VirtqueueStats` whose ring counters are fields of the queue's state
    struct, which the Python queue and the compiled bursts both count into (``kills`` stays
    a plain attribute: only Python kills)."""

    def __init__(self, cs: Any) -> None:
        self._cs = cs
        super().__init__()


for _name in _STRUCT_COUNTERS:
    setattr(StructStats, _name, CField(_name))


class VirtQueue(Protocol):
    """One device-side virtqueue.  Heads are split descriptor heads or packed buffer ids."""

    index: int
    size: int
    stats: VirtqueueStats
    defunct: SyncError | None  # the violation that killed the queue, if any
    resume: RingResume  # where the (re)started ring resumed, and why
    hold_kick: bool  # TX kick mitigation: an emptied ring is left unarmed (kickhold.py)
    kick_ahead: int  # RX kick batching: the refill kick after this many buffers (rxbatch.py)
    event_idx: bool  # VIRTIO_F_EVENT_IDX negotiated (2.7.10 / 2.8.10)

    @property
    def features(self) -> int: ...

    @features.setter
    def features(self, features: int) -> None:
        """Negotiated features (SET_FEATURES may arrive after the ring was set up)."""

    @property
    def last_avail_idx(self) -> int:
        """The avail position, an opaque token for :meth:`rewind`."""
        ...

    @property
    def vhost_base(self) -> int:
        """The GET_VRING_BASE answer for this ring, in vhost-user's encoding."""
        ...

    # avail side
    def avail_count(self) -> int:
        """Chains the driver made available that the device has not taken (validated)."""
        ...

    def pop(self) -> Chain | None:
        """Take and validate the next chain; None when the ring is empty."""
        ...

    def rewind(self, avail_idx: int) -> None:
        """Give back the chains popped since token ``avail_idx`` (none pushed yet)."""
        ...

    # used side
    def push(self, head: int, written: int) -> None: ...

    def push_raw(self, head: int, written: int) -> None:
        """A used element with no checks at all (fault injection)."""
        ...

    def patch_last_used(self, written: int) -> None: ...

    def flush_used(self) -> None: ...

    # in-flight accounting (device-private, trusted)
    @property
    def in_flight(self) -> int:
        """Chains popped and not yet pushed."""
        ...

    def inflight_writable(self, head: int) -> int | None:
        """Writable bytes of chain ``head`` while it is in flight, None when it is not."""
        ...

    def ring_state(self) -> dict[str, object]:
        """Both sides' indices, for diagnosing a wedged queue: what the device holds and
        what guest memory says now (avail/used idx, flags, event fields).  A queue that is
        stopped or defunct reports only the device side (its mapping may be gone)."""
        ...

    # notifications
    def should_notify(self) -> bool: ...

    def enable_notifications(self, enable: bool = True, ahead: int = 1) -> bool: ...

    # life cycle
    def remap(self, mem: GuestMemory) -> None: ...

    def kill(self, err: SyncError) -> None: ...

    def close(self) -> int: ...


class QueueFormat(Protocol):
    """A queue class (split or packed) as the backend uses it before and while building one."""

    name: str

    def ring_areas(self, size: int) -> tuple[RingArea, RingArea, RingArea]:
        """The three areas a ring of ``size`` entries occupies, in SET_VRING_ADDR order."""
        ...

    def check_size(self, size: int) -> None:
        """ValueError naming the rule if ``size`` is not a valid Queue Size."""
        ...

    def check_base(self, base: int, size: int) -> None:
        """ValueError if ``base`` (SET_VRING_BASE) is not a valid position for ``size``."""
        ...

    def __call__(
        self,
        mem: GuestMemory,
        index: int,
        size: int,
        desc_addr: int,
        avail_addr: int,
        used_addr: int,
        /,
        *,
        features: int,
        last_avail_idx: int,
        sync: SyncKind,
    ) -> VirtQueue: ...


def queue_format(features: int) -> QueueFormat:
    """PackedQueue when VIRTIO_F_RING_PACKED is negotiated, SplitQueue otherwise."""
    # Imported here: both modules build on QueueLifecycle below.
    if features & F_RING_PACKED:
        from vdev.virtio.packed import PackedQueue

        return PackedQueue
    from vdev.virtio.split import SplitQueue

    return SplitQueue


class QueueLifecycle:
    """What split and packed queues share once mapped: remap, kill and the defunct check.

    A subclass sets ``index``, ``mem``, ``stats``, ``defunct`` and ``_closed`` and provides
    ``_map`` (translate the ring areas) and ``_release`` (drop every view of guest memory).
    """

    index: int
    mem: GuestMemory
    stats: VirtqueueStats
    defunct: SyncError | None
    _closed: bool
    _cs: Any  # struct vq_queue: the state both datapaths use (vdev/virtio/ringstate.py)

    # The switches the compiled bursts read too, stored in the state struct.
    event_idx = CFlag("event_idx")
    indirect = CFlag("indirect_ok")
    notify_on_empty = CFlag("notify_on_empty")
    readable_allowed = CFlag("allow_readable")
    writable_expected = CFlag("allow_writable")
    # Kick mitigation (the NIC's TX policy, vdev/net/nic.py): while set, a TX ring found
    # empty is left without a kick asked for, because the device polls it again itself.
    hold_kick = CFlag("hold_kick")
    # RX kick batching (vdev/net/rxbatch.py): while frames wait for buffers, an RX ring out of
    # room asks for its refill kick only after min(kick_ahead, frames waiting) buffers
    # (EVENT_IDX; 0 or 1: after the next one, as 2.7.10 describes).
    kick_ahead = CField("kick_ahead")

    @classmethod
    def check_size(cls, size: int) -> None:
        raise NotImplementedError

    def _setup(
        self,
        mem: GuestMemory,
        index: int,
        size: int,
        addr_space: str,
        features: int,
        sync: SyncKind,
    ) -> None:
        """Construction both formats share: host byte order, the format's size rule, the
        address space, the direction the device gave, and a live queue with nothing in
        flight."""
        if sys.byteorder != "little":
            raise RuntimeError("vdev virtqueues assume a little-endian host")
        try:
            self.check_size(size)
        except ValueError as exc:
            raise ValueError(f"virtqueue {index}: {exc}") from None
        if addr_space not in ("uva", "gpa"):
            raise ValueError(f"virtqueue {index}: addr_space {addr_space!r} is not uva or gpa")
        self._cs = new_state()
        self._cs.size = size
        self.mem = mem
        self.index = index
        self.size = size
        self.addr_space = addr_space
        self.sync = sync
        # The direction made explicit: an RX queue only gets device-writable buffers, a TX
        # queue only device-readable ones (5.1.6 "Device Operation").
        self.writable_expected = sync is not SyncKind.TX
        self.readable_allowed = sync is not SyncKind.RX
        self.defunct = None
        self._closed = False
        self.stats = StructStats(self._cs)
        # Device-private (trusted) record of what the driver handed over: write_len + 1 of
        # each chain (split head / packed buffer id) in flight, 0 when it is not ours.
        self._inflight = array("Q", bytes(8 * size))
        self._bufs: list[Any] = []
        # The compiled bursts' state for this queue (vdev/virtio/fastqueue.py), made lazily.
        self.fast_ctx: Any = None
        self._views: list[memoryview] = []
        self.features = features

    @property
    def features(self) -> int:
        return self._features

    @features.setter
    def features(self, features: int) -> None:
        """Negotiated features; settable because SET_FEATURES may arrive after the ring was
        set up (vhost-user "Ring states"), so the derived switches are recomputed here."""
        self._features = features
        self.event_idx = bool(features & F_EVENT_IDX)
        self.indirect = bool(features & F_INDIRECT_DESC)
        self.version_1 = bool(features & F_VERSION_1)
        self._format_features(features)

    def _format_features(self, features: int) -> None:
        """The switches that differ between the formats (NOTIFY_ON_EMPTY, ANY_LAYOUT)."""
        raise NotImplementedError

    def _map(self, mem: GuestMemory) -> None:
        raise NotImplementedError

    def _release(self) -> None:
        raise NotImplementedError

    def remap(self, mem: GuestMemory) -> None:
        """The frontend replaced the memory table while the queue runs (SET_MEM_TABLE):
        translate the ring addresses again.  On MemoryFault the old mapping stays in use."""
        if self.defunct is not None or self._closed:
            self.mem = mem
            return
        self._map(mem)

    def kill(self, err: SyncError) -> None:
        """Mark the queue defunct: the driver broke the contract and is not trusted again."""
        if self.defunct is None:
            self.defunct = err
            self.stats.kills += 1
            self._release()

    def _translate(
        self, mem: GuestMemory, addr_space: str, areas: tuple[RingArea, ...], addrs: tuple[int, ...]
    ) -> list[memoryview]:
        """Views of the ring areas at ``addrs`` (``addr_space`` "uva" or "gpa"), each checked
        for its alignment (2.7.2 / 2.8 "Virtqueue Alignment") and for fitting in one region."""
        translate = mem.uva_view if addr_space == "uva" else mem.gpa_view
        views: list[memoryview] = []
        try:
            for area, addr in zip(areas, addrs, strict=True):
                if addr % area.align:
                    raise ValueError(
                        f"virtqueue {self.index}: {area.name} at {addr_space} {addr:#x} is not "
                        f"{area.align}-byte aligned"
                    )
                try:
                    views.append(translate(addr, area.length))
                except MemoryFault as exc:
                    raise MemoryFault(
                        f"virtqueue {self.index}: {area.name} {addr_space} {addr:#x}"
                        f"+{area.length:#x} does not fit in guest memory: {exc}"
                    ) from None
        except BaseException:
            for v in views:
                v.release()
            raise
        return views

    def _check(self) -> None:
        if self.defunct is not None or self._closed:
            what = f"virtqueue {self.index}" + (" (stopped)" if self._closed else "")
            raise DefunctError(what, self.defunct)


__all__ = [
    "F_EVENT_IDX",
    "F_INDIRECT_DESC",
    "F_RING_PACKED",
    "F_VERSION_1",
    "MAX_QUEUE_SIZE",
    "QueueFormat",
    "QueueLifecycle",
    "RingArea",
    "StructStats",
    "VirtQueue",
    "VirtqueueStats",
    "queue_format",
]
