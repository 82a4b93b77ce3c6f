"""Device side of a split virtqueue (virtio 1.x 2.7 "Split Virtqueues") under the Skywalk contract.

The guest driver is the untrusted user and the device is the kernel: the avail ring's
``idx`` is the user's ``head``, :attr:`SplitQueue.last_avail_idx` the kernel's ``rhead``
(what it last accepted), and the used ring's ``idx`` the published ``tail``.  Every value
read from the rings is validated before use; a violation raises :class:`SyncError` with a
named :class:`KillReason` and marks the queue defunct (later calls raise
:class:`DefunctError`) while the device and its other queues keep running.

Ring memory is reached only through bounded views handed out by :class:`GuestMemory`
(translated once at construction or :meth:`SplitQueue.remap`), and descriptor buffers only
through ``GuestMemory.gpa_view``; nothing outside the mapped regions is ever touched.

Layouts come from ``vdev/abi/virtio.h`` through cffi.  All ring fields are little endian
(VERSION_1, or legacy on a little-endian guest); the host must be little endian too, which
the constructor checks.

Memory ordering: CPython executes our stores in program order and each cffi store is one
plain C store.  On x86-64 (TSO) that gives exactly the order 2.7.8 requires (used elements
before used idx; 2.7.13 on the driver side: ring entry before avail idx).  Weakly ordered
hosts would need real barriers, which pure Python cannot emit; vdev targets x86-64.
"""

from __future__ import annotations

import logging
from array import array

from vdev.abi import ffi, lib
from vdev.errors import KillReason, SyncError, SyncKind
from vdev.virtio.chain import DESC_SIZE, Chain, ChainViolation, walk_chain
from vdev.virtio.inflight import RingResume, SplitInflight
from vdev.virtio.memory import GuestMemory, release_views
from vdev.virtio.queue import MAX_QUEUE_SIZE, QueueLifecycle, RingArea
from vdev.virtio.ringstate import CField, CFlag

log = logging.getLogger("vdev.virtio")

__all__ = [
    "Chain",
    "SplitQueue",
    "ring_sizes",
    "vring_need_event",
]

VRING_AVAIL_F_NO_INTERRUPT: int = lib.VRING_AVAIL_F_NO_INTERRUPT
VRING_USED_F_NO_NOTIFY: int = lib.VRING_USED_F_NO_NOTIFY
F_NOTIFY_ON_EMPTY = 1 << lib.VIRTIO_F_NOTIFY_ON_EMPTY
F_ANY_LAYOUT = 1 << lib.VIRTIO_F_ANY_LAYOUT

AVAIL_HDR: int = ffi.sizeof("struct vring_avail_hdr")
USED_HDR: int = ffi.sizeof("struct vring_used_hdr")
USED_ELEM: int = ffi.sizeof("struct vring_used_elem")


def ring_sizes(size: int) -> tuple[int, int, int]:
    """Bytes of (descriptor table, avail ring, used ring) for ``size`` entries, with the
    EVENT_IDX trailer fields (2.7.5, 2.7.6, 2.7.8)."""
    return (
        DESC_SIZE * size,
        AVAIL_HDR + 2 * size + 2,
        USED_HDR + USED_ELEM * size + 2,
    )


def vring_need_event(event_idx: int, new_idx: int, old_idx: int) -> bool:
    """2.7.10 "Event Suppression": notify iff ``event_idx`` lies in ``[old_idx, new_idx)``
    modulo 2^16 (the spec's ``(u16)(new - event - 1) < (u16)(new - old)``)."""
    return ((new_idx - event_idx - 1) & 0xFFFF) < ((new_idx - old_idx) & 0xFFFF)


class SplitQueue(QueueLifecycle):
    """One split virtqueue as the device (kernel side) sees it (a :class:`VirtQueue`; the
    class is a :class:`QueueFormat`).

    ``sync`` names the Skywalk sync the queue plays and so its direction, as the device
    decides it: ``SyncKind.RX`` (device writes guest buffers; chains must be all
    device-writable), ``SyncKind.TX`` (device reads; all device-readable), anything else
    (e.g. ``SyncKind.EVENT`` for a control queue) accepts readable-then-writable chains.
    """

    name = "split"

    # Ring indices in the state struct the compiled bursts share (vdev/virtio/ringstate.py).
    used_idx = CField("used_idx")
    last_avail_idx = CField("last_avail")
    _seen_avail_idx = CField("seen_avail")  # avail idx as of the last validated read
    _pending_used = CField("pending_used")  # pushed, not yet published
    _signalled_used = CField("signalled_used")
    _signalled_valid = CFlag("signalled_valid")

    # -- QueueFormat: what the backend checks before a queue exists ------------------------

    @classmethod
    def ring_areas(cls, size: int) -> tuple[RingArea, RingArea, RingArea]:
        # 2.7.2 "Virtqueue Alignment": Descriptor Table 16, Available Ring 2, Used Ring 4.
        desc, avail, used = ring_sizes(size)
        return (
            RingArea("descriptor table", "desc_addr", desc, 16),
            RingArea("avail ring", "avail_addr", avail, 2),
            RingArea("used ring", "used_addr", used, 4),
        )

    @classmethod
    def check_size(cls, size: int) -> None:
        # 2.7 "Split Virtqueues": Queue Size is a power of 2, maximum 32768.
        if not 0 < size <= MAX_QUEUE_SIZE or size & (size - 1):
            raise ValueError(f"size {size} is not a power of 2 <= {MAX_QUEUE_SIZE}")

    @classmethod
    def check_base(cls, base: int, size: int) -> None:
        # SET_VRING_BASE for a split ring: the 16-bit last avail index.
        if not 0 <= base <= 0xFFFF:
            raise ValueError(f"base {base:#x} is not a 16-bit index")

    def __init__(
        self,
        mem: GuestMemory,
        index: int,
        size: int,
        desc_addr: int,
        avail_addr: int,
        used_addr: int,
        *,
        features: int,
        last_avail_idx: int = 0,
        addr_space: str = "uva",
        sync: SyncKind,
    ) -> None:
        self._setup(mem, index, size, addr_space, features, sync)
        if not 0 <= last_avail_idx <= 0xFFFF:
            raise ValueError(f"virtqueue {index}: last_avail_idx {last_avail_idx} is not a u16")
        self._mask = size - 1
        self.desc_addr = desc_addr
        self.avail_addr = avail_addr
        self.used_addr = used_addr
        self.last_avail_idx = last_avail_idx
        self._seen_avail_idx = last_avail_idx
        self._pending_used = 0
        self._signalled_used = 0
        self._signalled_valid = False
        # Head popped from each avail slot, so rewind() never re-reads guest memory.
        self._popped = array("H", bytes(2 * size))
        self._map(mem)
        # vhost-user resumes from the used idx in guest memory (libvhost-user does the same):
        # it is what the driver has already seen.
        self.used_idx = int(self._used16[1])
        self._signalled_used = self.used_idx
        self.inflight: SplitInflight | None = None
        self._resubmit: dict[int, int] = {}  # avail position -> head, from the inflight region
        self.resume = RingResume(index, last_avail_idx, self.used_idx, last_avail_idx, 0, "base")
        if self.last_avail_idx == 0 and self.used_idx != 0:
            # SET_VRING_BASE ("Ring states") says "a fresh ring" but the used ring has moved
            # on: a front-end that re-establishes a lost connection may send 0 (DPDK
            # virtio_user in server mode does).  The used idx is then the truth: every chain
            # it counts was taken and completed (this device completes chains in the order
            # it takes them) and nothing after it was.  DPDK's vhost library resumes there on
            # any mismatch (vhost_user_set_vring_addr), libvhost-user for in-order devices;
            # a non-zero base is always honoured.
            log.warning(
                "virtqueue %d: base 0 but used idx %d in guest memory; resuming at %d",
                index, self.used_idx, self.used_idx,
            )  # fmt: skip
            self.last_avail_idx = self._seen_avail_idx = self.used_idx
            self.resume = RingResume(index, 0, self.used_idx, self.used_idx, 0, "used_idx")

    def attach_inflight(self, region: SplitInflight) -> RingResume:
        """Track in-flight heads in ``region`` ("Inflight I/O tracking") and resume from it:
        the heads it holds are popped again first, oldest first, and the avail side goes on
        after them (libvhost-user's ``last_avail_idx = used_idx + inuse``), whatever
        SET_VRING_BASE said.  InflightError when the region is inconsistent."""
        heads = region.recover(self.used_idx)
        self.inflight = region
        base = self.resume.base
        self._resubmit = {(self.used_idx + i) & 0xFFFF: h for i, h in enumerate(heads)}
        self.last_avail_idx = self._seen_avail_idx = self.used_idx
        resumed_at = (self.used_idx + len(heads)) & 0xFFFF
        self.resume = RingResume(
            self.index, base, self.used_idx, resumed_at, len(heads), "inflight"
        )
        if heads or base != resumed_at:
            log.warning(
                "virtqueue %d: inflight region: base %d, used idx %d, %d in flight resubmitted",
                self.index, base, self.used_idx, len(heads),
            )  # fmt: skip
        return self.resume

    # -- features -----------------------------------------------------------------------

    def _format_features(self, features: int) -> None:
        self.notify_on_empty = bool(features & F_NOTIFY_ON_EMPTY)
        # ANY_LAYOUT is implied by VERSION_1 (2.6.4 "Message Framing"); the ring does not
        # care, the net layer reads it from here.
        self.any_layout = self.version_1 or bool(features & F_ANY_LAYOUT)

    # -- mapping ------------------------------------------------------------------------

    def _map(self, mem: GuestMemory) -> None:
        """Translate the three ring areas in ``mem`` and install cffi pointers onto them."""
        views = self._translate(
            mem,
            self.addr_space,
            self.ring_areas(self.size),
            (self.desc_addr, self.avail_addr, self.used_addr),
        )
        bufs = [ffi.from_buffer(v) for v in views]
        self._release()
        self._views = views
        self._bufs = bufs
        self._desc = ffi.cast("struct vring_desc *", bufs[0])
        # avail as u16s: [0] flags, [1] idx, [2 + i] ring[i], [2 + size] used_event
        self._avail16 = ffi.cast("uint16_t *", bufs[1])
        self._used_event_i = 2 + self.size
        # used as u16s: [0] flags, [1] idx, [2 + 4*size] avail_event; elements after 4 bytes
        self._used16 = ffi.cast("uint16_t *", bufs[2])
        self._used_elems = ffi.cast("struct vring_used_elem *", bufs[2] + USED_HDR)
        self._avail_event_i = (USED_HDR + USED_ELEM * self.size) // 2
        self.mem = mem

    def _release(self) -> None:
        release_views(ffi, self._bufs, self._views)
        self._desc = self._avail16 = self._used16 = self._used_elems = ffi.NULL

    def close(self) -> int:
        """Stop using guest memory (GET_VRING_BASE); returns ``last_avail_idx`` to report."""
        self._release()
        self._closed = True
        self.inflight = None  # the backend owns the region's mapping
        return self.last_avail_idx

    @property
    def vhost_base(self) -> int:
        """The GET_VRING_BASE answer: the last avail index (vhost-user "Ring states")."""
        return self.last_avail_idx & 0xFFFF

    # -- defunct handling (kill and _check: QueueLifecycle) ------------------------------

    def _violation(self, reason: KillReason, detail: str) -> SyncError:
        err = SyncError(reason, self.sync, f"virtqueue {self.index}: {detail}")
        self.kill(err)
        return err

    # -- avail side (the user's head) ---------------------------------------------------

    def avail_count(self) -> int:
        """Chains the driver made available and the device has not taken yet.

        Like Skywalk's txsync prologue validating ``head`` against ``rhead``: the driver can
        have at most ``size`` chains outstanding, so a jump further than that is HEAD_OOB.
        """
        self._check()
        avail_idx = int(self._avail16[1])
        pending = (avail_idx - self.last_avail_idx) & 0xFFFF
        if pending > self.size:
            raise self._violation(
                KillReason.HEAD_OOB,
                f"avail idx {avail_idx} is {pending} ahead of last_avail_idx "
                f"{self.last_avail_idx} (queue size {self.size})",
            )
        self._seen_avail_idx = avail_idx
        return pending

    def pop(self) -> Chain | None:
        """Take the next available chain, validated, or None when the ring is empty."""
        self._check()
        last = self.last_avail_idx
        if self._seen_avail_idx == last and self.avail_count() == 0:
            return None
        # 2.7.13.3 / 2.7.6: ring entries before idx were written before idx was published.
        slot = last & self._mask
        head = self._resubmit.get(last) if self._resubmit else None
        if head is None:
            head = int(self._avail16[2 + slot])
        if head >= self.size:
            raise self._violation(
                KillReason.INTERNALIZE_FAILED,
                f"avail ring slot {slot} (avail idx {last}) names head {head} "
                f">= queue size {self.size}",
            )
        if self._inflight[head]:
            raise self._violation(
                KillReason.INTERNALIZE_FAILED,
                f"avail ring slot {slot} (avail idx {last}) names head {head}, "
                "which is still in flight (not yet used)",
            )
        try:
            chain = walk_chain(
                self._desc,
                self.size,
                head,
                self.mem.gpa_view,
                indirect_ok=self.indirect,
                allow_readable=self.readable_allowed,
                allow_writable=self.writable_expected,
            )
        except ChainViolation as exc:
            raise self._violation(
                KillReason.INTERNALIZE_FAILED,
                f"avail slot {slot} (avail idx {last}) head {head}: {exc}",
            ) from None
        self.last_avail_idx = (last + 1) & 0xFFFF
        self._inflight[head] = chain.write_len + 1
        self._popped[slot] = head
        if self.inflight is not None:
            self.inflight.popped(head)
        st = self.stats
        st.chains += 1
        st.descriptors += chain.desc_count
        st.bytes_read += chain.read_len
        return chain

    def rewind(self, avail_idx: int) -> None:
        """Give back the chains popped since ``avail_idx`` (none of them pushed yet).

        The RX path pops several chains for one mergeable frame and returns them when the
        guest has not posted enough room; they will be popped (and validated) again later.
        """
        self._check()
        n = (self.last_avail_idx - avail_idx) & 0xFFFF
        if n > self.size:
            raise ValueError(
                f"virtqueue {self.index}: cannot rewind from {self.last_avail_idx} to {avail_idx}"
            )
        heads = [self._popped[(avail_idx + i) & self._mask] for i in range(n)]
        if not all(self._inflight[h] for h in heads):
            raise ValueError(
                f"virtqueue {self.index}: rewind to {avail_idx}: a chain was already pushed"
            )
        for h in heads:
            self._inflight[h] = 0
        if self.inflight is not None:
            self.inflight.rewound(heads)
        self.last_avail_idx = avail_idx & 0xFFFF
        self.stats.chains -= n

    # -- used side (the published tail) -------------------------------------------------

    def push(self, head: int, written: int) -> None:
        """Queue a used element (2.7.8): ``written`` bytes of the chain ``head`` were filled.

        The device is trusted, so misuse (a head not in flight, more bytes than the chain's
        writable space) is a programming error: ValueError, the queue stays alive.
        """
        self._check()
        if not 0 <= head < self.size or not self._inflight[head]:
            raise ValueError(f"virtqueue {self.index}: head {head} is not in flight")
        if not 0 <= written < self._inflight[head]:
            raise ValueError(
                f"virtqueue {self.index}: head {head}: written {written} exceeds the chain's "
                f"writable length {self._inflight[head] - 1}"
            )
        self._inflight[head] = 0
        elem = self._used_elems[(self.used_idx + self._pending_used) & self._mask]
        elem.id = head
        elem.len = written
        if self.inflight is not None:
            self.inflight.pushed(head)
        self._pending_used += 1
        self.stats.used += 1
        self.stats.bytes_written += written

    def push_raw(self, head: int, written: int) -> None:
        """Queue a used element with no checks at all (fault injection: a lying device).

        Device-private state is not touched, so a later legitimate push of ``head`` still
        works; values are truncated to the 32-bit fields.
        """
        self._check()
        elem = self._used_elems[(self.used_idx + self._pending_used) & self._mask]
        elem.id = head & 0xFFFF_FFFF
        elem.len = written & 0xFFFF_FFFF
        self._pending_used += 1

    def patch_last_used(self, written: int) -> None:
        """Overwrite the length of the most recently pushed, unpublished element (faults)."""
        self._check()
        if not self._pending_used:
            raise ValueError(f"virtqueue {self.index}: no pushed element to patch")
        elem = self._used_elems[(self.used_idx + self._pending_used - 1) & self._mask]
        elem.len = written & 0xFFFF_FFFF

    @property
    def in_flight(self) -> int:
        """Chains popped and not yet pushed."""
        return sum(1 for v in self._inflight if v)

    def inflight_writable(self, head: int) -> int | None:
        """Writable bytes of chain ``head`` while it is in flight, None when it is not."""
        if not 0 <= head < self.size or not self._inflight[head]:
            return None
        return self._inflight[head] - 1

    def avail_heads(self) -> set[int]:
        """Every head in the avail ring's slots now (guest memory: the driver's latest
        postings, stale ones included).  Fault injection only (``bad_used_id``)."""
        return {int(self._avail16[2 + i]) for i in range(self.size)}

    def flush_used(self) -> None:
        """Publish the pushed elements by storing the used idx (2.7.8.2: after the elements)."""
        self._check()
        if self._pending_used:
            old = self.used_idx
            self.used_idx = (self.used_idx + self._pending_used) & 0xFFFF
            self._pending_used = 0
            self._used16[1] = self.used_idx
            self.stats.flushes += 1
            if self.inflight is not None:
                self.inflight.published(self.used_idx)
            if self._resubmit:
                self._drop_resubmitted(old)

    def _drop_resubmitted(self, old_used: int) -> None:
        """Forget resubmit positions the used idx has now passed."""
        n = (self.used_idx - old_used) & 0xFFFF
        for pos in [p for p in self._resubmit if (p - old_used) & 0xFFFF < n]:
            del self._resubmit[pos]

    # -- notifications ------------------------------------------------------------------

    def should_notify(self) -> bool:
        """Whether to signal the call eventfd after :meth:`flush_used` (2.7.7, 2.7.10).

        NOTIFY_ON_EMPTY (6 "Reserved Feature Bits"): always notify when the device ran out of
        available buffers.  EVENT_IDX: ``vring_need_event(used_event, new, old)`` with ``old``
        the used idx at the previous decision (the first decision always notifies).
        Otherwise: unless the driver set VRING_AVAIL_F_NO_INTERRUPT.  Nothing published since
        the last decision means nothing to tell.
        """
        self._check()
        new = self.used_idx
        old = self._signalled_used
        valid = self._signalled_valid
        if valid and new == old:
            return False
        self._signalled_used = new
        self._signalled_valid = True
        if self.notify_on_empty and int(self._avail16[1]) == self.last_avail_idx:
            notify = True
        elif self.event_idx:
            notify = not valid or vring_need_event(int(self._avail16[self._used_event_i]), new, old)
        else:
            notify = not (int(self._avail16[0]) & VRING_AVAIL_F_NO_INTERRUPT)
        if notify:
            self.stats.notifications_sent += 1
        else:
            self.stats.notifications_suppressed += 1
        return notify

    def enable_notifications(self, enable: bool = True, ahead: int = 1) -> bool:
        """Ask the driver to kick (or not) when it makes buffers available (2.7.7, 2.7.10).

        Without EVENT_IDX this sets/clears VRING_USED_F_NO_NOTIFY.  With EVENT_IDX, enabling
        writes ``avail_event`` = the driver's current avail idx: "kick me on the next buffer
        after the ones already posted".  (Not ``last_avail_idx``: after an RX rewind the
        driver is already past it, so vring_need_event would never fire and frames waiting
        for more buffers would wait for an unrelated kick.)  ``ahead`` > 1 asks for the kick
        only once that many more buffers are posted (avail_event = avail idx + ahead - 1:
        the RX kick batching of vdev/net/rxbatch.py; without EVENT_IDX it has no meaning and
        is ignored).  Disabling does nothing, as the driver only kicks when it crosses
        avail_event.  After enabling, returns whether buffers arrived meanwhile so the
        caller can close the race window (re-check before sleeping).
        """
        self._check()
        if self.event_idx:
            if enable:
                # The value is only a hint to the driver; reading it from the (untrusted)
                # avail ring cannot make the device misbehave.
                event = int(self._avail16[1]) + max(1, ahead) - 1
                self._used16[self._avail_event_i] = event & 0xFFFF
        else:
            self._used16[0] = 0 if enable else VRING_USED_F_NO_NOTIFY
        if enable:
            return self.avail_count() > 0
        return False

    def ring_state(self) -> dict[str, object]:
        state: dict[str, object] = {
            "format": "split",
            "size": self.size,
            "last_avail_idx": self.last_avail_idx,
            "used_idx": self.used_idx,
            "pending_used": self._pending_used,
            "in_flight": self.in_flight,
            "signalled_used": self._signalled_used if self._signalled_valid else None,
            "event_idx": self.event_idx,
        }
        if self.defunct is not None or self._closed:
            return state
        avail_idx = int(self._avail16[1])
        guest: dict[str, object] = {
            "avail_idx": avail_idx,
            "avail_flags": int(self._avail16[0]),
            "used_idx": int(self._used16[1]),
            "used_flags": int(self._used16[0]),
        }
        if self.event_idx:
            guest["used_event"] = int(self._avail16[self._used_event_i])
            guest["avail_event"] = int(self._used16[self._avail_event_i])
        state["guest"] = guest
        # 2.7.10: chains the driver posted that the device has not taken; with EVENT_IDX the
        # driver kicks only for a buffer at or past avail_event, so posted chains behind an
        # armed avail_event mean the device owes itself a look, not the driver a kick.
        state["avail_pending"] = (avail_idx - self.last_avail_idx) & 0xFFFF
        return state

    def __repr__(self) -> str:
        state = f"defunct={self.defunct.reason.name}" if self.defunct else "live"
        return (
            f"SplitQueue(index={self.index}, size={self.size}, sync={self.sync.name}, "
            f"last_avail_idx={self.last_avail_idx}, used_idx={self.used_idx}, {state})"
        )
