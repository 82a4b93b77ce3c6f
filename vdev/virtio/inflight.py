"""Inflight I/O tracking for split rings (vhost-user.rst "Inflight I/O tracking").

With VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD the back-end keeps, in a buffer it allocates and
the front-end keeps across back-end restarts (GET_INFLIGHT_FD / SET_INFLIGHT_FD), which
descriptor heads it took from the avail ring and has not yet returned in the used ring.  A
restarted back-end resubmits exactly those, in the order it took them, so a crash costs
nothing and repeats nothing that had not been completed.

The buffer is ``num_queues`` queue regions one after the other, each::

    QueueRegionSplit { u64 features; u16 version; u16 desc_num; u16 last_batch_head;
                       u16 used_idx; DescStateSplit desc[desc_num]; }
    DescStateSplit   { u8 inflight; u8 padding[5]; u16 next; u64 counter; }

The queue calls :class:`SplitInflight` at four points, the spec's steps: ``popped`` (set
``counter`` and ``inflight``), ``pushed`` (link the head into the last batch), ``published``
(after the used idx store: clear the batch, then record ``used_idx``) and ``rewound`` (chains
given back before they were used are not in flight).  :meth:`SplitInflight.recover` is the
"When reconnecting" procedure.

The front-end can write this buffer (it is shared memory), so nothing read from it is
trusted: :meth:`recover` checks every field it uses and the queue still validates every
resubmitted chain like any other (``walk_chain``).

Packed rings (:class:`PackedInflight`) keep the spec's ``QueueRegionPacked`` header and
``DescStatePacked`` entries, used the way an in-order device (this one) needs them: the
region is back-end private (the front-end only keeps the fd), so the spec's layout is kept
and its free list is not.  A packed ring has no used idx in memory and the device's used
descriptors overwrite the very ring entries the driver posted, so the region records:
``desc[pos]`` a copy of every ring entry the device took (addr, len, id, flags; ``inflight``
and ``num`` on a chain's first entry), ``free_head`` the avail position after the last take
(index | wrap counter << 15, as SET_VRING_BASE encodes it),
``used_idx``/``used_wrap_counter`` the used position a publish is about to reach and
``old_*`` the last one published (the spec's two-phase update).  Recovery decides from the
first descriptor of the batch in flight whether the publish happened (the spec's step 1),
restores the ring entries still in flight from their copies and resumes both sides there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cffi import FFI

from vdev.errors import VdevError

iffi = FFI()
iffi.cdef(
    """
    struct desc_state_split {
        uint8_t inflight; uint8_t padding[5]; uint16_t next; uint64_t counter;
    };
    struct queue_region_split {
        uint64_t features; uint16_t version; uint16_t desc_num;
        uint16_t last_batch_head; uint16_t used_idx;
    };
    """
)
iffi.cdef(
    """
    struct desc_state_packed {
        uint8_t inflight; uint8_t padding; uint16_t next; uint16_t last; uint16_t num;
        uint64_t counter; uint16_t id; uint16_t flags; uint32_t len; uint64_t addr;
    };
    struct queue_region_packed {
        uint64_t features; uint16_t version; uint16_t desc_num; uint16_t free_head;
        uint16_t old_free_head; uint16_t used_idx; uint16_t old_used_idx;
        uint8_t used_wrap_counter; uint8_t old_used_wrap_counter; uint8_t padding[7];
    };
    """
)
SPLIT_HDR: int = iffi.sizeof("struct queue_region_split")  # 16
SPLIT_DESC: int = iffi.sizeof("struct desc_state_split")  # 16
PACKED_DESC: int = iffi.sizeof("struct desc_state_packed")  # 32
# DPDK's get_pervq_shm_size_packed counts the header's 29 bytes of fields; the array starts
# at the 8-byte aligned 32, which the 64-byte alignment always leaves room for.
PACKED_HDR = 29
PACKED_ARRAY: int = iffi.sizeof("struct queue_region_packed")  # 32
F_AVAIL = 1 << 7
F_USED = 1 << 15
# DPDK lib/vhost and libvhost-user align every queue region to 64 bytes (INFLIGHT_ALIGNMENT).
INFLIGHT_ALIGNMENT = 64
REGION_VERSION = 1
# A sane bound for the global order counter: a front-end-written counter beyond it is refused
# (it would make the next counter overflow u64).
MAX_COUNTER = (1 << 63) - 1


def _align(n: int) -> int:
    return (n + INFLIGHT_ALIGNMENT - 1) // INFLIGHT_ALIGNMENT * INFLIGHT_ALIGNMENT


def queue_region_size(queue_size: int) -> int:
    """Bytes of one queue region: room for either layout (split or packed), 64-aligned, so
    the buffer does not depend on VIRTIO_F_RING_PACKED, which may be acked later."""
    return _align(max(SPLIT_HDR + SPLIT_DESC * queue_size, PACKED_HDR + PACKED_DESC * queue_size))


class InflightError(VdevError, ValueError):
    """The inflight region the front-end handed back is inconsistent (names the field)."""


@dataclass(frozen=True)
class RingResume:
    """How a (re)started ring chose its position: the event ``vdev serve`` and the fault log
    report, so a base that disagreed with guest memory is visible with both values.

    ``source``: "base" (SET_VRING_BASE honoured), "used_idx" (base 0 on a used ring moved on:
    the used idx adopted), "inflight" (the inflight region decided) or "packed_stale" (a
    packed base whose descriptor the device had already used: reported, not adopted)."""

    index: int
    base: int
    used_idx: int
    resumed_at: int
    resubmitted: int
    source: str

    @property
    def disagreed(self) -> bool:
        """Whether guest memory (or the inflight region) contradicted the base: the event."""
        if self.source == "packed_stale":
            return True
        return self.source != "base" and (self.base != self.resumed_at or self.resubmitted > 0)

    def as_dict(self) -> dict[str, Any]:
        return {
            "queue": self.index,
            "base": self.base,
            "used_idx": self.used_idx,
            "resumed_at": self.resumed_at,
            "resubmitted": self.resubmitted,
            "source": self.source,
        }


class SplitInflight:
    """The queue region of one split ring inside the shared inflight buffer.

    ``buf`` is a writable buffer (a memoryview of the mapping) of at least
    :func:`queue_region_size` bytes for ``size``; it is only referenced, never copied.
    """

    def __init__(self, buf: Any, size: int) -> None:
        need = SPLIT_HDR + SPLIT_DESC * size
        if len(buf) < need:
            raise InflightError(f"queue region of {len(buf)} bytes, need {need} for size {size}")
        self.size = size
        self._cbuf = iffi.from_buffer(buf)
        self.hdr = iffi.cast("struct queue_region_split *", self._cbuf)
        self.desc = iffi.cast("struct desc_state_split *", self._cbuf + SPLIT_HDR)
        self.counter = 1
        self._batch: list[int] = []

    def release(self) -> None:
        """Drop every pointer into the buffer (the queue closes or remaps)."""
        self.hdr = self.desc = iffi.NULL
        self._cbuf = None

    # -- "When reconnecting" ---------------------------------------------------------------

    def recover(self, used_idx: int) -> list[int]:
        """Bring the region up to ``used_idx`` (the used ring's idx in guest memory) and return
        the heads to resubmit, oldest first.  A fresh region (version 0) is initialised and
        resubmits nothing.  InflightError names a field the front-end corrupted."""
        hdr, desc, size = self.hdr, self.desc, self.size
        if hdr.version == 0:
            need = SPLIT_HDR + SPLIT_DESC * size
            iffi.memmove(self._cbuf, bytes(need), need)
            hdr.version = REGION_VERSION
            hdr.desc_num = size
            hdr.used_idx = used_idx
            return []
        if hdr.version != REGION_VERSION:
            raise InflightError(f"version {hdr.version} (this back-end writes {REGION_VERSION})")
        if hdr.desc_num != size:
            raise InflightError(f"desc_num {hdr.desc_num} != queue size {size}")
        batch = (used_idx - hdr.used_idx) & 0xFFFF
        if batch:
            # The used idx moved past the region's: the last batch was published but its
            # inflight flags not yet cleared.  Clear them along the last_batch_head list.
            if batch > size:
                raise InflightError(
                    f"used_idx {hdr.used_idx} is {batch} behind the used ring's {used_idx}"
                )
            head = int(hdr.last_batch_head)
            for _ in range(batch):
                if head >= size:
                    raise InflightError(f"last batch list names head {head} >= size {size}")
                desc[head].inflight = 0
                head = int(desc[head].next)
            hdr.used_idx = used_idx
        found: list[tuple[int, int]] = []
        for head in range(size):
            flag = int(desc[head].inflight)
            if flag == 0:
                continue
            if flag != 1:
                raise InflightError(f"desc[{head}].inflight is {flag}, not 0 or 1")
            counter = int(desc[head].counter)
            if counter > MAX_COUNTER:
                raise InflightError(f"desc[{head}].counter {counter:#x} is out of range")
            found.append((counter, head))
        found.sort()
        self.counter = (found[-1][0] + 1) if found else 1
        return [head for _c, head in found]

    # -- the four points of the data path --------------------------------------------------

    def popped(self, head: int) -> None:
        d = self.desc[head]
        d.counter = self.counter
        self.counter += 1
        d.inflight = 1

    def rewound(self, heads: list[int]) -> None:
        for head in heads:
            self.desc[head].inflight = 0

    def pushed(self, head: int) -> None:
        self.desc[head].next = self.hdr.last_batch_head
        self.hdr.last_batch_head = head
        self._batch.append(head)

    def published(self, used_idx: int) -> None:
        """After the used idx store (the spec's order: idx, then flags, then used_idx)."""
        desc = self.desc
        for head in self._batch:
            desc[head].inflight = 0
        self._batch.clear()
        self.hdr.used_idx = used_idx


def packed_stale_position(ring: Any, idx: int, wrap: int, size: int) -> int | None:
    """Whether a packed ring's start position (``idx``, ``wrap``) contradicts the ring: the
    descriptor there was already used by the device in this lap (2.8.1: AVAIL == USED ==
    wrap counter) or the driver posted it for the next lap (which it can only do after the
    device consumed it).  Returns the position the used descriptors from there reach
    (index | wrap << 15), or None when the position is consistent.  Only reported, never
    adopted: a used descriptor does not say how many ring entries its chain took (2.8.9),
    so the scan is exact only for one-descriptor chains; the inflight region is exact."""
    w = bool(wrap)
    flags = int(ring[idx].flags)
    lapped = bool(flags & F_AVAIL) != w and bool(flags & F_USED) == w
    i, lap, n = idx, wrap, 0
    while n < size:
        f = int(ring[i].flags)
        if bool(f & F_AVAIL) != bool(lap) or bool(f & F_USED) != bool(lap):
            break
        n += 1
        i += 1
        if i == size:
            i, lap = 0, lap ^ 1
    if not n and not lapped:
        return None
    return i | lap << 15


def _pos(idx: int, wrap: int, size: int) -> int:
    return idx if wrap else idx + size


class PackedInflight:
    """The packed queue region of one ring (see the module docstring for what it holds)."""

    def __init__(self, buf: Any, size: int) -> None:
        need = PACKED_ARRAY + PACKED_DESC * size
        if len(buf) < need:
            raise InflightError(f"queue region of {len(buf)} bytes, need {need} for size {size}")
        self.size = size
        self._cbuf = iffi.from_buffer(buf)
        self.hdr = iffi.cast("struct queue_region_packed *", self._cbuf)
        self.desc = iffi.cast("struct desc_state_packed *", self._cbuf + PACKED_ARRAY)
        self.counter = 1

    def release(self) -> None:
        self.hdr = self.desc = iffi.NULL
        self._cbuf = None

    def recover(self, ring: Any, idx: int, wrap: int) -> tuple[int, int, int]:
        """Resume: returns (index, wrap counter, chains in flight) where both sides go on, after
        restoring the in-flight ring entries from their copies.  A fresh region starts at
        (``idx``, ``wrap``), the position SET_VRING_BASE gave.  InflightError names a field
        the front-end corrupted."""
        hdr, size = self.hdr, self.size
        if hdr.version == 0:
            need = PACKED_ARRAY + PACKED_DESC * size
            iffi.memmove(self._cbuf, bytes(need), need)
            hdr.version, hdr.desc_num = REGION_VERSION, size
            hdr.used_idx = hdr.old_used_idx = idx
            hdr.used_wrap_counter = hdr.old_used_wrap_counter = wrap
            self.moved(idx, wrap)
            return idx, wrap, 0
        if hdr.version != REGION_VERSION:
            raise InflightError(f"version {hdr.version} (this back-end writes {REGION_VERSION})")
        if hdr.desc_num != size:
            raise InflightError(f"desc_num {hdr.desc_num} != queue size {size}")
        if hdr.free_head & 0x7FFF >= size:
            raise InflightError(f"free_head index {hdr.free_head & 0x7FFF} >= queue size {size}")
        for name in ("used_idx", "old_used_idx"):
            if getattr(hdr, name) >= size:
                raise InflightError(f"{name} {getattr(hdr, name)} >= queue size {size}")
        for name in ("used_wrap_counter", "old_used_wrap_counter"):
            if getattr(hdr, name) > 1:
                raise InflightError(f"{name} is {getattr(hdr, name)}, not 0 or 1")
        new = (int(hdr.used_idx), int(hdr.used_wrap_counter))
        old = (int(hdr.old_used_idx), int(hdr.old_used_wrap_counter))
        if new != old:
            # Step 1: was the batch published?  Its first used descriptor's flags are the
            # last store of a publish (2.8.21): used in the old lap means it was.
            flags = int(ring[old[0]].flags)
            used = bool(flags & F_AVAIL) == bool(old[1]) == bool(flags & F_USED)
            if used:
                old = new
            hdr.used_idx, hdr.used_wrap_counter = old
            hdr.old_used_idx, hdr.old_used_wrap_counter = old
        avail = _pos(hdr.free_head & 0x7FFF, hdr.free_head >> 15, size)
        n = (avail - _pos(old[0], old[1], size)) % (2 * size)
        if n > size:
            raise InflightError(f"free_head is {n} entries past the used position (size {size})")
        chains, k, desc = 0, 0, self.desc
        top = 0
        while k < n:
            p = (old[0] + k) % size
            num = int(desc[p].num)
            if desc[p].inflight != 1 or not 1 <= num <= n - k:
                raise InflightError(f"desc[{p}] does not start a chain of 1..{n - k} entries")
            top = max(top, int(desc[p].counter))
            chains += 1
            k += num
        for k in range(n):
            p = (old[0] + k) % size
            d, r = desc[p], ring[p]
            r.addr, r.len, r.id, r.flags = d.addr, d.len, d.id, d.flags
        self.counter = top + 1
        return old[0], old[1], chains

    def popped(self, ring: Any, start: int, count: int, idx: int, wrap: int) -> None:
        """A chain of ``count`` entries from ``start`` was taken; the avail side is now at
        (``idx``, ``wrap``)."""
        size, desc = self.size, self.desc
        for k in range(count):
            p = (start + k) % size
            d, r = desc[p], ring[p]
            d.addr, d.len, d.id, d.flags = r.addr, r.len, r.id, r.flags
            d.inflight, d.num = 0, 0
        head = desc[start]
        head.counter = self.counter
        self.counter += 1
        head.num = count
        head.inflight = 1
        self.moved(idx, wrap)

    def moved(self, idx: int, wrap: int) -> None:
        """The avail side is at (``idx``, ``wrap``) (after a take or a rewind): kept in
        ``free_head`` in vhost-user's packed encoding (index | wrap counter << 15)."""
        self.hdr.free_head = idx | wrap << 15

    def publishing(self, idx: int, wrap: int) -> None:
        """Phase 1: the used side is about to reach (``idx``, ``wrap``)."""
        self.hdr.used_idx, self.hdr.used_wrap_counter = idx, wrap

    def published(self) -> None:
        """Phase 2: the batch's first flags are stored; commit the position."""
        hdr = self.hdr
        hdr.old_used_idx, hdr.old_used_wrap_counter = hdr.used_idx, hdr.used_wrap_counter


__all__ = [
    "INFLIGHT_ALIGNMENT",
    "InflightError",
    "PackedInflight",
    "RingResume",
    "SplitInflight",
    "packed_stale_position",
    "queue_region_size",
]
