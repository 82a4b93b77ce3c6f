"""Lost notifications: a kick or an interrupt that both sides skipped, found and reported.

Notification suppression (virtio 2.7.10 / 2.8.10) is a handshake through shared memory.  The
driver publishes its avail idx and then reads ``avail_event`` to decide whether to kick; the
device publishes ``avail_event`` and then re-reads the avail idx before it sleeps.  The same
holds for interrupts, with the used idx and ``used_event``.  Each side needs a full barrier
between its store and its load.  If one side lacks it, both can read the other's old value:
the driver does not kick and the device does not look, or the device does not interrupt and
the driver does not poll.  The queue then stops for good with nothing wrong in either ring.
This has a real cause here: QEMU before 8.1 drops a single-vCPU TCG guest's barriers (see
``host/machine.py``).  A driver with a missing ``virtio_mb()`` fails the same way.

A device cannot see the race as it happens.  It can see the result: the queue is quiet, yet
the rings say that a kick or an interrupt was due.
  * Lost kick: chains are posted that the device has not taken (2.7.13.4 / 2.8.21) and
    nothing moved for a whole period.
  * Lost interrupt: the driver's event state asks for an interrupt at a used position the
    device has passed since its last interrupt (``vring_need_event(used_event, used, last)``
    or the ENABLE / DESC rules of 2.8.10) and nothing moved for a whole period.

Every finding is counted (``late_kicks`` / ``late_interrupts`` per queue in the NIC's stats),
logged with both sides' indices and handed to the NIC's event sink, so a driver developer
sees that the handshake raced.  In ``recover`` mode (the default) the device then does what
the lost notification would have made it do: it services the queue, or it sends the
interrupt.  Both are legal at any time (a device may process without a kick, and a driver
must tolerate an interrupt with no new used buffers).  ``report`` only counts and logs.
``off`` disables the watch.

A queue that a fault rule owns (a stall, or an interrupt or used-element rule) is left alone.
Withholding the notification is then the point.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from vdev.virtio.packed import (
    RING_EVENT_FLAGS_DESC,
    RING_EVENT_FLAGS_DISABLE,
    PackedQueue,
    packed_need_event,
    ring_pos,
)
from vdev.virtio.split import VRING_AVAIL_F_NO_INTERRUPT, SplitQueue, vring_need_event

if TYPE_CHECKING:
    from vdev.net.nic import VirtioNet

log = logging.getLogger("vdev.net")

MODES = ("recover", "report", "off")
DEFAULT_MODE = "recover"
# How often each NIC's queues are looked at.  A lost notification therefore costs at most about
# two periods.  That is far below Linux's 5 s netdev watchdog, and the cost of a look is a
# few reads of shared memory.
PERIOD_S = 0.1


@dataclass
class _Seen:
    """What a queue looked like at the previous look."""

    queue: object
    used: int  # device used position (split: used idx; packed: ring_pos)
    avail: int  # driver side: split avail idx; packed: 1 if the next descriptor is available
    irq_used: int  # device used position at the last interrupt sent (or at first sight)
    kick_reported: int | None = None  # avail mark of a lost kick already reported


def _used_pos(q: SplitQueue | PackedQueue) -> int:
    if isinstance(q, PackedQueue):
        return ring_pos(q.used_idx, q.used_wrap, q.size)
    return int(q.used_idx)


def _avail_mark(q: SplitQueue | PackedQueue) -> int:
    if isinstance(q, PackedQueue):
        return int(q.has_avail())
    return int(q._avail16[1])


def _pending(q: SplitQueue | PackedQueue) -> bool:
    if isinstance(q, PackedQueue):
        return q.has_avail()
    return bool((int(q._avail16[1]) - q.last_avail_idx) & 0xFFFF)


def _wants_interrupt(q: SplitQueue | PackedQueue, used: int, last: int) -> bool:
    """Whether the driver's event state now asks for an interrupt for the used entries the
    device published after position ``last`` (up to ``used``)."""
    if used == last:
        return False
    if isinstance(q, PackedQueue):
        ev = q._driver_ev
        flags = int(ev.flags) & 3
        if flags == RING_EVENT_FLAGS_DISABLE:
            return False
        if flags == RING_EVENT_FLAGS_DESC and q.event_idx:
            return packed_need_event(int(ev.off_wrap), used, last, q.size)
        return True
    if q.event_idx:
        return vring_need_event(int(q._avail16[q._used_event_i]), used, last)
    return not int(q._avail16[0]) & VRING_AVAIL_F_NO_INTERRUPT


class NotifyWatch:
    """The lost-notification watch of one NIC.  The device calls :meth:`check` every
    :data:`PERIOD_S`, and the NIC calls :meth:`interrupted` on every interrupt it sends.
    Both run under the device lock."""

    def __init__(self, nic: VirtioNet, mode: str = DEFAULT_MODE) -> None:
        if mode not in MODES:
            raise ValueError(f"notify watch mode {mode!r}: expected one of {', '.join(MODES)}")
        self.nic = nic
        self.mode = mode
        self._seen: dict[int, _Seen] = {}
        # The used position of the last interrupt per queue, kept from before the first look.
        self._irq: dict[int, tuple[object, int]] = {}
        self.late_kicks: dict[int, int] = {}
        self.late_interrupts: dict[int, int] = {}

    def interrupted(self, index: int) -> None:
        vring = self.nic.vrings.get(index)
        q = vring.queue if vring is not None else None
        if not isinstance(q, SplitQueue | PackedQueue):
            return
        pos = _used_pos(q)
        self._irq[index] = (q, pos)
        seen = self._seen.get(index)
        if seen is not None and seen.queue is q:
            seen.irq_used = pos

    def stats(self) -> dict[str, dict[int, int]]:
        return {"late_kicks": dict(self.late_kicks), "late_interrupts": dict(self.late_interrupts)}

    def check(self) -> None:
        if self.mode == "off":
            return
        nic = self.nic
        for index in sorted(nic.vrings):
            vring = nic.vrings[index]
            q = vring.queue
            if (
                not isinstance(q, SplitQueue | PackedQueue)
                or q.defunct is not None
                or q._closed
                or not vring.enabled
            ):
                self._seen.pop(index, None)
                continue
            used, avail = _used_pos(q), _avail_mark(q)
            seen = self._seen.get(index)
            if seen is None or seen.queue is not q:
                irq_q, irq_pos = self._irq.get(index, (None, used))
                self._seen[index] = _Seen(q, used, avail, irq_pos if irq_q is q else used)
                continue
            quiet = used == seen.used and avail == seen.avail
            seen.used, seen.avail = used, avail
            if not quiet or not self._unfaulted(index):
                continue
            if self._kick_owed(index, q):
                if seen.kick_reported == avail:
                    continue  # one report per lost kick ("report" mode leaves it there)
                self._found("late_kick", index, q)
                if self.mode == "recover":
                    nic.kick(index)
                    seen.used, seen.avail = _used_pos(q), _avail_mark(q)
                else:
                    seen.kick_reported = avail
            elif _wants_interrupt(q, used, seen.irq_used):
                self._found("late_interrupt", index, q)
                if self.mode == "recover":
                    nic.notify(index)  # calls interrupted(): irq_used moves up to used
                else:
                    seen.irq_used = used  # one report per lost interrupt

    def _unfaulted(self, index: int) -> bool:
        faults = self.nic.ring_faults
        return faults is None or (
            not faults.stalled(self.nic, index) and faults.idle(self.nic, index, ("used", "calls"))
        )

    def _kick_owed(self, index: int, q: SplitQueue | PackedQueue) -> bool:
        if not _pending(q):
            return False
        if index % 2 == 1:  # a transmitq: posted chains are frames waiting to go out
            return True
        # A receiveq: posted buffers wait for frames, which is normal, unless frames wait
        # in the NIC's backlog for buffers.
        return bool(self.nic.backlog) and self.nic.link_up

    def _found(self, kind: str, index: int, q: SplitQueue | PackedQueue) -> None:
        counts = self.late_kicks if kind == "late_kick" else self.late_interrupts
        counts[index] = counts.get(index, 0) + 1
        state = q.ring_state()
        log.warning(
            "%s: queue %d: %s (quiet for %.1f s with one due; %s): %s",
            self.nic.name,
            index,
            kind.replace("_", " "),
            PERIOD_S,
            "recovered" if self.mode == "recover" else "reported only",
            state,
        )
        sink = self.nic.event_sink
        if sink is not None:
            sink(kind, nic=self.nic.name, queue=index, mode=self.mode, ring=state)


__all__ = ["DEFAULT_MODE", "MODES", "PERIOD_S", "NotifyWatch"]
