"""Packed virtqueues (virtio 1.x 2.8 "Packed Virtqueues"): the device side, with validation.
The mock driver side lives in ``packed_driver.py`` (as ``driver.py`` holds the split one).

Same Skywalk mapping as the split ring (``split.py``): the guest driver is the untrusted user,
every descriptor is read once and checked, violations raise ``SyncError`` (INTERNALIZE_FAILED)
and make the queue defunct.  The differences that matter for validation:

- there is no avail idx to bound-check: a descriptor is available when its AVAIL bit equals
  the device's avail wrap counter and its USED bit does not (2.8.1 "Driver and Device Ring
  Wrap Counters"), so HEAD_OOB has no packed twin;
- chains are consecutive ring entries linked by NEXT (2.8.6), the buffer id sits in the last
  one, and every entry of a chain must itself be marked available;
- the device writes one used descriptor per buffer and skips the chain's length (2.8.9).

The packed layouts are not in ``vdev/abi/virtio.h`` yet; they are declared here with a local
cffi ``cdef`` (no ``struct`` format strings) until the ABI owner moves them there.
"""

from __future__ import annotations

import logging
from array import array

from cffi import FFI

from vdev.errors import KillReason, SyncError, SyncKind

# The packed descriptor flags keep the split ring's values (2.8, "struct pvirtq_desc").
from vdev.virtio.chain import (
    F_INDIRECT,
    F_NEXT,
    F_WRITE,
    Chain,
    ChainViolation,
    Segments,
    indirect_table,
)
from vdev.virtio.inflight import PackedInflight, RingResume, packed_stale_position
from vdev.virtio.memory import GuestMemory, release_views
from vdev.virtio.queue import MAX_QUEUE_SIZE, QueueLifecycle, RingArea
from vdev.virtio.ringstate import CField

log = logging.getLogger("vdev.virtio")

pffi = FFI()
pffi.cdef(
    """
    struct pvirtq_desc { uint64_t addr; uint32_t len; uint16_t id; uint16_t flags; };
    struct pvirtq_event_suppress { uint16_t off_wrap; uint16_t flags; };
    """
)

F_AVAIL = 1 << 7
F_USED = 1 << 15
# 2.8.10 "Event Suppression Structure Format"
RING_EVENT_FLAGS_ENABLE = 0
RING_EVENT_FLAGS_DISABLE = 1
RING_EVENT_FLAGS_DESC = 2
DESC_SIZE: int = pffi.sizeof("struct pvirtq_desc")  # 16, as an indirect table entry
EVENT_SIZE: int = pffi.sizeof("struct pvirtq_event_suppress")


def ring_pos(idx: int, wrap: int, size: int) -> int:
    """A ring position in the 2*size cycle the (index, wrap counter) pair describes."""
    return idx if wrap else idx + size


def packed_need_event(off_wrap: int, new: int, old: int, size: int) -> bool:
    """2.8.10 with EVENT_IDX: was the position named by ``off_wrap`` passed in [old, new)?

    ``new``/``old`` are positions from :func:`ring_pos`; the comparison is the split ring's
    vring_need_event, done modulo 2*size instead of 2^16 so the ring size need not be a power
    of two.
    """
    cycle = 2 * size
    event = ring_pos(off_wrap & 0x7FFF, off_wrap >> 15, size)
    return (new - event - 1) % cycle < (new - old) % cycle


def packed_ring_sizes(size: int) -> tuple[int, int, int]:
    """Bytes of (descriptor ring, driver event suppression, device event suppression) (2.8)."""
    return DESC_SIZE * size, EVENT_SIZE, EVENT_SIZE


class PackedQueue(QueueLifecycle):
    """Device side of one packed virtqueue (a :class:`VirtQueue`, the class a
    :class:`QueueFormat`; arguments as :class:`SplitQueue`'s, ``driver_addr`` and
    ``device_addr`` are the driver and device event suppression areas).

    ``last_avail_idx`` uses vhost-user's packed encoding ("Ring states"/SET_VRING_BASE: bits
    0-14 index, bit 15 avail wrap counter; bits 16-31, the used index and wrap counter QEMU
    adds, are ignored: the used side resumes where the avail side is, as in DPDK's vhost);
    None means a fresh ring (index 0, wrap counter 1).  The :attr:`last_avail_idx` property
    reads back in the same encoding, so the NIC can use it as an opaque rewind token and the
    backend as the GET_VRING_BASE answer (see :attr:`vhost_base`).

    Buffer ids take the place of split heads in the :class:`VirtQueue` methods.
    """

    name = "packed"

    # Ring positions in the state struct the compiled bursts share (vdev/virtio/ringstate.py).
    used_idx = CField("used_idx")
    _avail_idx = CField("last_avail")
    avail_wrap = CField("avail_wrap")
    used_wrap = CField("used_wrap")
    _scan_chains = CField("scan_chains")

    @property
    def _scan_end(self) -> int | None:
        """avail_count's cache: the ring position its scan reached (None: none cached)."""
        end: int = self._cs.scan_end
        return None if end < 0 else end

    @_scan_end.setter
    def _scan_end(self, value: int | None) -> None:
        self._cs.scan_end = -1 if value is None else value

    @property
    def _signalled(self) -> int | None:
        """The used position at the last notification decision (None: none made yet)."""
        cs = self._cs
        return int(cs.signalled_used) if cs.signalled_valid else None

    @_signalled.setter
    def _signalled(self, value: int | None) -> None:
        cs = self._cs
        cs.signalled_valid = value is not None
        cs.signalled_used = value or 0

    # -- QueueFormat: what the backend checks before a queue exists ------------------------

    @classmethod
    def ring_areas(cls, size: int) -> tuple[RingArea, RingArea, RingArea]:
        # 2.8.10: the avail/used address fields carry the 4-byte event suppression areas.
        desc, driver, device = packed_ring_sizes(size)
        return (
            RingArea("descriptor ring", "desc_addr", desc, 16),
            RingArea("driver event suppression area", "avail_addr", driver, 4),
            RingArea("device event suppression area", "used_addr", device, 4),
        )

    @classmethod
    def check_size(cls, size: int) -> None:
        # 2.8 "Packed Virtqueues": any size up to 32768, no power-of-2 requirement.
        if not 0 < size <= MAX_QUEUE_SIZE:
            raise ValueError(f"packed size {size} is not in 1..{MAX_QUEUE_SIZE}")

    @classmethod
    def check_base(cls, base: int, size: int) -> None:
        # SET_VRING_BASE for packed rings: bits 0-14 the avail index, bit 15 its wrap counter;
        # QEMU 7.2 also sends the used index/wrap in bits 16-31
        # (virtio_queue_packed_get_last_avail_idx), which the queue ignores (used resumes at
        # the avail position, as in DPDK's vhost).
        if not 0 <= base <= 0xFFFF_FFFF:
            raise ValueError(f"packed base {base:#x} is not 32 bits")
        if size and base & 0x7FFF >= size:
            raise ValueError(f"packed base {base:#x}: index >= ring size {size}")

    def __init__(
        self,
        mem: GuestMemory,
        index: int,
        size: int,
        desc_addr: int,
        driver_addr: int,
        device_addr: int,
        *,
        features: int,
        last_avail_idx: int | None = None,
        addr_space: str = "uva",
        sync: SyncKind,
    ) -> None:
        self._setup(mem, index, size, addr_space, features, sync)
        self.desc_addr = desc_addr
        self.driver_addr = driver_addr
        self.device_addr = device_addr
        if last_avail_idx is None:
            self._avail_idx, self.avail_wrap = 0, 1
        else:
            self._avail_idx, self.avail_wrap = (
                last_avail_idx & 0x7FFF,
                (last_avail_idx >> 15) & 1,
            )
            if self._avail_idx >= size:
                raise ValueError(f"virtqueue {index}: last_avail_idx {self._avail_idx} >= {size}")
        # The used side resumes where the avail side is (no buffers in flight across a restart).
        self.used_idx, self.used_wrap = self._avail_idx, self.avail_wrap
        # Descriptors each buffer id in flight used (next to _inflight, _setup's).
        self._ndesc = array("H", bytes(2 * size))
        self._pending: list[tuple[int, int, int]] = []  # (id, written, descriptors)
        # (token before the pop, id) of recent pops, so rewind() never re-reads guest memory.
        self._popped: list[tuple[int, int]] = []
        # avail_count() cache: chains known available from the current position up to
        # position _scan_end (a ring_pos() value); available descriptors stay available until
        # the device consumes them (2.8.1), so only the tail needs scanning again.
        self._scan_end = None
        self._scan_chains = 0
        self._signalled = None
        self._map(mem)
        self.inflight: PackedInflight | None = None
        base = self.last_avail_idx
        self.resume = RingResume(index, base, base, base, 0, "base")
        stale = packed_stale_position(self._ring, self._avail_idx, self.avail_wrap, size)
        if stale is not None:
            # The front-end's SET_VRING_BASE is stale (QEMU keeps a packed ring's last base
            # across a back-end crash: a packed ring has no used idx in memory to restore
            # from).  Reported with both positions, not adopted (see packed_stale_position).
            self.resume = RingResume(index, base, stale, base, 0, "packed_stale")
            log.warning(
                "virtqueue %d: packed base %#x is stale: the device's used descriptors "
                "reach %#x, or the driver posted there a lap ahead", index, base, stale,
            )  # fmt: skip

    def attach_inflight(self, region: PackedInflight) -> RingResume:
        """Track taken entries and the used position in ``region`` ("Inflight I/O
        tracking") and resume from it: the entries still in flight are restored from their
        copies and both sides go on at the last published used position, whatever
        SET_VRING_BASE said.  InflightError when the region is inconsistent."""
        base = self.resume.base
        idx, wrap, chains = region.recover(self._ring, self._avail_idx, self.avail_wrap)
        self.inflight = region
        self._avail_idx, self.avail_wrap = idx, wrap
        self.used_idx, self.used_wrap = idx, wrap
        self._scan_end = None
        at = idx | wrap << 15
        self.resume = RingResume(self.index, base, at, at, chains, "inflight")
        if chains or base != at:
            log.warning(
                "virtqueue %d: inflight region: base %#x, resuming at %#x, %d in flight",
                self.index, base, at, chains,
            )  # fmt: skip
        return self.resume

    # -- features and state -------------------------------------------------------------

    def _format_features(self, features: int) -> None:
        self.notify_on_empty = False  # not defined for packed rings (2.8.10 replaces it)
        self.any_layout = True  # RING_PACKED requires VERSION_1, which implies ANY_LAYOUT

    @property
    def last_avail_idx(self) -> int:
        """The next descriptor to read, vhost-user packed encoding (index | wrap << 15)."""
        return self._avail_idx | self.avail_wrap << 15

    @property
    def vhost_base(self) -> int:
        """The GET_VRING_BASE answer (vhost-user.rst "Ring states" / GET_VRING_BASE for packed
        rings: bits 0-14 last avail index, bit 15 avail wrap counter, bits 16-30 used index,
        bit 31 used wrap counter; QEMU 7.2's virtio_queue_packed_set_last_avail_idx reads
        all four)."""
        used = self.used_idx | self.used_wrap << 15
        return self.last_avail_idx | used << 16

    # -- mapping and life cycle ---------------------------------------------------------

    def _map(self, mem: GuestMemory) -> None:
        views = self._translate(
            mem,
            self.addr_space,
            self.ring_areas(self.size),
            (self.desc_addr, self.driver_addr, self.device_addr),
        )
        bufs = [pffi.from_buffer(v) for v in views]
        self._release()
        self._views, self._bufs = views, bufs
        self._ring = pffi.cast("struct pvirtq_desc *", bufs[0])
        self._driver_ev = pffi.cast("struct pvirtq_event_suppress *", bufs[1])
        self._device_ev = pffi.cast("struct pvirtq_event_suppress *", bufs[2])
        self.mem = mem

    def _release(self) -> None:
        release_views(pffi, self._bufs, self._views)

    def close(self) -> int:
        """Stop; returns the vhost-user packed base (index | wrap << 15)."""
        self._release()
        self._closed = True
        self.inflight = None  # the backend owns the region's mapping
        return self.last_avail_idx

    def _violation(self, detail: str) -> SyncError:
        err = SyncError(
            KillReason.INTERNALIZE_FAILED, self.sync, f"virtqueue {self.index}: {detail}"
        )
        self.kill(err)
        return err

    # -- avail side ---------------------------------------------------------------------

    def _is_avail(self, flags: int, wrap: int) -> bool:
        return bool(flags & F_AVAIL) == bool(wrap) and bool(flags & F_USED) != bool(wrap)

    def has_avail(self) -> bool:
        """Whether the next descriptor is available (2.8.1)."""
        self._check()
        return self._is_avail(int(self._ring[self._avail_idx].flags), self.avail_wrap)

    def avail_count(self) -> int:
        """Complete chains the driver made available and the device has not taken yet.

        There is no avail idx in a packed ring (2.8.1), so this scans descriptor flags from
        the current position; a chain counts once its last entry (no NEXT) is available.
        Bounded by the ring size; a hint only (``pop`` validates everything again).
        """
        self._check()
        size = self.size
        start = ring_pos(self._avail_idx, self.avail_wrap, size)
        if self._scan_end is None:
            self._scan_end, self._scan_chains = start, 0
        scanned = (self._scan_end - start) % (2 * size)
        idx, wrap = self._scan_end % size, 1 if self._scan_end < size else 0
        ring = self._ring
        run = 0
        while scanned + run < size:
            flags = int(ring[idx].flags)
            if not self._is_avail(flags, wrap):
                break
            run += 1
            idx += 1
            if idx == size:
                idx, wrap = 0, wrap ^ 1
            if not flags & F_NEXT:
                scanned += run
                run = 0
                self._scan_chains += 1
                self._scan_end = ring_pos(idx, wrap, size)
        return self._scan_chains

    def pop(self) -> Chain | None:
        """Take the next available buffer, validated, or None."""
        self._check()
        ring = self._ring
        start = self._avail_idx
        wrap = self.avail_wrap
        first_flags = int(ring[start].flags)
        if not self._is_avail(first_flags, wrap):
            return None
        where = f"avail desc {start} (wrap {wrap})"
        try:
            return self._walk(start, wrap, first_flags)
        except ChainViolation as exc:
            raise self._violation(f"{where}: {exc}") from None

    def _walk(self, start: int, wrap: int, first_flags: int) -> Chain:
        """2.8.6 "Next Flag: Descriptor Chaining": the chain is consecutive ring entries
        linked by NEXT, each marked available, the buffer id in the last one; the buffers are
        checked by the shared :class:`Segments`, INDIRECT by :func:`indirect_table`."""
        ring = self._ring
        size = self.size
        token = self.last_avail_idx
        segs = Segments(
            self.mem.gpa_view,
            allow_readable=self.readable_allowed,
            allow_writable=self.writable_expected,
        )
        idx = start
        count = 0
        buf_id = 0
        indirect = False
        while True:
            d = ring[idx]
            # 2.8.13: flags are written last by the driver; read them before the rest.
            flags = int(d.flags) if count else first_flags
            if count and not self._is_avail(flags, wrap):
                raise ChainViolation(
                    f"chain entry {idx} is not available (flags {flags:#x}, wrap {wrap})"
                )
            addr, length, buf_id = int(d.addr), int(d.len), int(d.id)
            count += 1
            if count > size:
                # Defensive: entry ``size`` is the first one again, whose AVAIL bit is for
                # the other wrap counter, so it fails the availability check first.
                raise ChainViolation(f"chain longer than the queue size {size}")
            if flags & F_INDIRECT:
                # 2.8.7 "Indirect Flag: Scatter-Gather Support"
                if count > 1:
                    # 2.8 "Driver Requirements: Indirect Descriptors": "A driver MUST NOT
                    # write direct descriptors with DESC_F_INDIRECT set in a scatter-gather
                    # list linked by VIRTQ_DESC_F_NEXT."
                    raise ChainViolation(
                        f"desc {idx} has INDIRECT set after {count - 1} direct "
                        "descriptors linked by NEXT"
                    )
                tview, n = indirect_table(
                    self.mem.gpa_view, f"desc {idx}", addr, length, flags, indirect_ok=self.indirect
                )
                if n > size:
                    # 2.8 "Driver Requirements: Scatter-Gather Support": "A driver MUST NOT
                    # create a descriptor list longer than the Queue Size", and for indirect
                    # tables "longer than allowed by the device": this device allows the
                    # queue size, as for split rings (2.7.5.3.1).
                    tview.release()
                    raise ChainViolation(
                        f"chain too long: indirect table of {n} entries, "
                        f"more than the queue size {size}"
                    )
                tbuf = pffi.from_buffer(tview)
                try:
                    table = pffi.cast("struct pvirtq_desc *", tbuf)
                    for i in range(n):
                        t = table[i]
                        tf, ta, tl = int(t.flags), int(t.addr), int(t.len)
                        if tf & F_INDIRECT:
                            raise ChainViolation(f"nested indirect at table entry {i}")
                        # NEXT is meaningless inside a packed indirect table: the table's
                        # length delimits the chain.
                        segs.add("indirect entry", i, ta, tl, tf)
                finally:
                    pffi.release(tbuf)
                indirect = True
            else:
                segs.add("desc", idx, addr, length, flags)
            idx += 1
            if idx == size:
                idx = 0
                wrap ^= 1
            if not flags & F_NEXT:
                break
        chain = segs.finish(buf_id, count, indirect, where="chain")
        # 2.8.6: the buffer id is in the last descriptor of the chain.
        if buf_id >= size:
            raise ChainViolation(f"buffer id {buf_id} >= queue size {size}")
        if self._inflight[buf_id]:
            raise ChainViolation(f"buffer id {buf_id} is still in flight")
        self._avail_idx, self.avail_wrap = idx, wrap
        self._inflight[buf_id] = chain.write_len + 1
        self._ndesc[buf_id] = count
        if self.inflight is not None:
            self.inflight.popped(ring, start, count, idx, wrap)
        self._popped.append((token, buf_id))
        if len(self._popped) > size:
            del self._popped[: len(self._popped) - size]
        if self._scan_chains:
            self._scan_chains -= 1
        else:
            self._scan_end = None
        self.stats.chains += 1
        self.stats.descriptors += count
        self.stats.bytes_read += chain.read_len
        return chain

    def rewind(self, avail_idx: int) -> None:
        """Give back the buffers popped since token ``avail_idx`` (a :attr:`last_avail_idx`
        value; none of them pushed yet), as SplitQueue.rewind: the RX path pops several
        buffers for one mergeable frame and returns them when the guest posted too few."""
        self._check()
        if avail_idx == self.last_avail_idx:
            return
        n = 0
        for token, _bid in reversed(self._popped):
            n += 1
            if token == avail_idx:
                break
        else:
            raise ValueError(
                f"virtqueue {self.index}: cannot rewind from {self.last_avail_idx:#x} "
                f"to {avail_idx:#x}"
            )
        ids = [bid for _t, bid in self._popped[-n:]]
        if not all(self._inflight[b] for b in ids):
            raise ValueError(
                f"virtqueue {self.index}: rewind to {avail_idx:#x}: a buffer was already pushed"
            )
        for b in ids:
            self._inflight[b] = 0
            self.stats.descriptors -= self._ndesc[b]
        del self._popped[-n:]
        self._avail_idx, self.avail_wrap = avail_idx & 0x7FFF, (avail_idx >> 15) & 1
        if self.inflight is not None:
            self.inflight.moved(self._avail_idx, self.avail_wrap)
        self._scan_end = None
        self.stats.chains -= n

    # -- used side ----------------------------------------------------------------------

    def push(self, head: int, written: int) -> None:
        """Queue a used buffer (published by :meth:`flush_used`); misuse is ValueError."""
        self._check()
        if not 0 <= head < self.size or not self._inflight[head]:
            raise ValueError(f"virtqueue {self.index}: buffer id {head} is not in flight")
        if not 0 <= written < self._inflight[head]:
            raise ValueError(
                f"virtqueue {self.index}: id {head}: written {written} exceeds "
                f"{self._inflight[head] - 1}"
            )
        self._inflight[head] = 0
        # 2.8.9 "Used descriptors": one per buffer; the device skips the buffer's
        # descriptors, so the used position advances by their count.
        self._pending.append((head, written, self._ndesc[head]))
        self.stats.used += 1
        self.stats.bytes_written += written

    def push_raw(self, head: int, written: int) -> None:
        """Queue a used descriptor with no checks (fault injection: a lying device).

        Device-private state is untouched; the id is truncated to the 16-bit field and the
        used position advances by one descriptor (the device cannot know more), so a raw
        element overwrites the next ring entry, as a buggy device would.
        """
        self._check()
        self._pending.append((head & 0xFFFF, written & 0xFFFF_FFFF, 1))

    def patch_last_used(self, written: int) -> None:
        """Overwrite the length of the most recently pushed, unpublished element (faults)."""
        self._check()
        if not self._pending:
            raise ValueError(f"virtqueue {self.index}: no pushed element to patch")
        bid, _n, ndesc = self._pending[-1]
        self._pending[-1] = (bid, written & 0xFFFF_FFFF, ndesc)

    def flush_used(self) -> None:
        """Write the used descriptors (2.8.9); the first one's flags go last, publishing the
        whole batch at once."""
        self._check()
        if not self._pending:
            return
        first: tuple[int, int] | None = None
        for buf_id, written, ndesc in self._pending:
            d = self._ring[self.used_idx]
            d.id = buf_id
            d.len = written
            flags = (F_AVAIL | F_USED if self.used_wrap else 0) | (F_WRITE if written else 0)
            if first is None:
                first = (self.used_idx, flags)
            else:
                d.flags = flags
            self.used_idx += ndesc
            if self.used_idx >= self.size:
                self.used_idx -= self.size
                self.used_wrap ^= 1
        assert first is not None
        if self.inflight is not None:
            self.inflight.publishing(self.used_idx, self.used_wrap)
        self._ring[first[0]].flags = first[1]
        if self.inflight is not None:
            self.inflight.published()
        self._pending.clear()
        self.stats.flushes += 1

    @property
    def in_flight(self) -> int:
        return sum(1 for v in self._inflight if v)

    def inflight_writable(self, head: int) -> int | None:
        """Writable bytes of buffer ``head`` while it is in flight, None when it is not."""
        if not 0 <= head < self.size or not self._inflight[head]:
            return None
        return self._inflight[head] - 1

    # -- notifications (2.8.10 "Event Suppression Structure Format") --------------------

    def should_notify(self) -> bool:
        self._check()
        new = ring_pos(self.used_idx, self.used_wrap, self.size)
        old = self._signalled
        if old == new:
            return False
        self._signalled = new
        flags = int(self._driver_ev.flags) & 3
        if flags == RING_EVENT_FLAGS_DISABLE:
            notify = False
        elif flags == RING_EVENT_FLAGS_DESC and self.event_idx and old is not None:
            notify = packed_need_event(int(self._driver_ev.off_wrap), new, old, self.size)
        else:
            notify = True
        if notify:
            self.stats.notifications_sent += 1
        else:
            self.stats.notifications_suppressed += 1
        return notify

    def enable_notifications(self, enable: bool = True, ahead: int = 1) -> bool:
        """As the split ring's (2.8.10); ``ahead`` > 1 names the descriptor ``ahead`` - 1
        positions past the first one not yet available (EVENT_IDX only)."""
        self._check()
        ev = self._device_ev
        if not enable:
            ev.flags = RING_EVENT_FLAGS_DISABLE
            return False
        if self.event_idx:
            # 2.8.10 with EVENT_IDX: the driver kicks when it makes available the descriptor
            # at off_wrap.  Name the first position *past* what is already available, not
            # our read position: the RX path re-arms while it waits for more buffers than
            # the driver posted, and the driver has already gone past the read position, so
            # it would never kick again.  (With nothing available both are the same.)
            self.avail_count()
            size = self.size
            end = self._scan_end
            if end is None:
                end = ring_pos(self._avail_idx, self.avail_wrap, size)
            end = (end + max(1, ahead) - 1) % (2 * size)
            ev.off_wrap = (end % size) | (1 if end < size else 0) << 15
            ev.flags = RING_EVENT_FLAGS_DESC
        else:
            ev.flags = RING_EVENT_FLAGS_ENABLE
        return self.has_avail()

    def ring_state(self) -> dict[str, object]:
        state: dict[str, object] = {
            "format": "packed",
            "size": self.size,
            "avail_idx": self._avail_idx,
            "avail_wrap": self.avail_wrap,
            "used_idx": self.used_idx,
            "used_wrap": self.used_wrap,
            "pending_used": len(self._pending),
            "in_flight": self.in_flight,
            "signalled_used": self._signalled,
            "event_idx": self.event_idx,
        }
        if self.defunct is not None or self._closed:
            return state
        # 2.8.10 "Event Suppression Structure Format": the driver's area says when to
        # interrupt it, the device's area when the driver should kick.
        state["guest"] = {
            "next_desc_flags": int(self._ring[self._avail_idx].flags),
            "driver_event_flags": int(self._driver_ev.flags),
            "driver_event_off_wrap": int(self._driver_ev.off_wrap),
            "device_event_flags": int(self._device_ev.flags),
            "device_event_off_wrap": int(self._device_ev.off_wrap),
        }
        state["avail_pending"] = int(self.has_avail())
        return state

    def __repr__(self) -> str:
        state = f"defunct={self.defunct.reason.name}" if self.defunct else "live"
        return (
            f"PackedQueue(index={self.index}, size={self.size}, sync={self.sync.name}, "
            f"avail={self._avail_idx}/{self.avail_wrap}, used={self.used_idx}/{self.used_wrap}, "
            f"{state})"
        )


__all__ = [
    "DESC_SIZE",
    "EVENT_SIZE",
    "F_AVAIL",
    "F_INDIRECT",
    "F_NEXT",
    "F_USED",
    "F_WRITE",
    "RING_EVENT_FLAGS_DESC",
    "RING_EVENT_FLAGS_DISABLE",
    "RING_EVENT_FLAGS_ENABLE",
    "PackedQueue",
    "packed_need_event",
    "packed_ring_sizes",
    "pffi",
    "ring_pos",
]
