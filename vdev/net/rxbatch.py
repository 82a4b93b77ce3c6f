"""RX kick batching: while frames wait for guest buffers, ask for the refill kick only after
several buffers, not after the first one.

A guest that cannot keep up with what the device has for it (its RX ring full, frames in
the NIC's backlog) refills its ring in small steps: Linux's virtio_net refills after every
NAPI poll of 64 frames and kicks when the refill crosses ``avail_event``.  The device
re-arms at every stop for lack of room, so it took a kick, a wake-up and a burst for every
67 frames (``benchmarks/guest_tcg.py --directions rx``: 16,960 kicks for 1.13 M frames),
and the NIC thread spends most of its CPU in the Python around each wake-up, not in the
copies (RESULTS "RX kick batching").

EVENT_IDX lets the device say *when* it wants the kick (2.7.10 "Available Buffer
Notification Suppression": the driver kicks when its avail idx passes ``avail_event``;
2.8.10 "Driver and Device Event Suppression" for packed rings).  So, while frames wait, a
queue out of room re-arms with ``avail_event`` = avail idx + ``ahead`` - 1, where ``ahead``
is the smaller of the batch (half the ring by default) and the frames waiting: the driver's
kick then comes once it has posted enough buffers for a batch, or for everything waiting.
The rings' code does the re-arm (``VirtQueue.kick_ahead``, honoured by the reference
``enable_notifications(ahead=...)`` and the compiled RX burst alike); this module only
decides which queues batch.

Posting buffers is the driver's choice: one may post fewer than ``ahead`` and then wait for
frames, which the device would be holding back for a kick that never comes.  A check
``FALLBACK_S`` after a queue starts batching (and again while it batches) covers that.  A
stall is: nothing written to the queue since the previous check, frames waiting, and
buffers posted but no more than at the previous check (the driver stopped posting short
of the batch).  No buffers posted, or more than before, is a driver still busy with what
it received, or still refilling: a TCG guest's NAPI round can take longer than a check.
On a stall the queue stops batching, re-arms for the very next buffer (a drain, as before)
and backs off: no batching for ``BACKOFF_MIN_S``, doubling while it recurs, up to
``BACKOFF_MAX_S``.  So a driver that refills in small steps pays one fallback wait per
back-off period.

Only with EVENT_IDX negotiated (flag-only suppression has no threshold), only on the plain
datapath (no fault rules, capture or crash points armed: ``threads.needs_world``, so fault
runs stay exactly as reproducible as before) and only while the loop serving the NIC runs
the checks (``later``; not in busy-poll mode, which services every queue on every
iteration).  ``batch`` 1 turns it off (``vdev serve --rx-kick-batch 1``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from vdev.errors import DefunctError, SyncError
from vdev.net.backoff import Backoff
from vdev.net.threads import needs_world

log = logging.getLogger("vdev.net")

if TYPE_CHECKING:
    from vdev.net.nic import VirtioNet
    from vdev.virtio.queue import VirtQueue

# 0: half the RX ring.  A driver that refills in steps of up to half its ring (Linux: one
# NAPI budget, 64 buffers, of a 256-entry ring) still crosses it within two steps.
DEFAULT_BATCH = 0
MAX_BATCH = 32768  # the largest split or packed ring (2.7 / 2.8)
# How long a batching queue may go without a frame written while frames wait, before the
# device stops batching it.  Well below any driver's watchdog (Linux: 5 s) and the
# lost-notification watch's period (notify_watch.PERIOD_S, 0.1 s), above the ~0.4 ms
# between a TCG guest's refills.
FALLBACK_S = 0.002
BACKOFF_MIN_S = 0.1
BACKOFF_MAX_S = 5.0

Later = Callable[[float, Callable[[], None]], None]


@dataclass
class _Due:
    """A queue's check: what it is for, and what the queue looked like when it was set."""

    queue: VirtQueue
    frames: int  # frames written to the queue
    # Already re-armed batched then: the first check of a batching period is set right
    # after the unbatched stop that started it, so what it sees says nothing of batches.
    armed: bool
    avail: int  # buffers posted and not taken, at the previous check (-1: none yet)


def check_batch(batch: int) -> int:
    """``batch`` if usable, else ValueError naming it."""
    if isinstance(batch, bool) or not isinstance(batch, int) or not 0 <= batch <= MAX_BATCH:
        raise ValueError(
            f"RX kick batch {batch!r}: want 0 (half the RX ring), 1 (off) or up to {MAX_BATCH}"
        )
    return batch


class RxKickBatch:
    """One NIC's RX kick batching: which RX queues batch, and their fallback checks.

    Runs on the NIC's datapath (under its lock); ``later`` schedules a callback on the loop
    that serves the NIC, under the same lock."""

    def __init__(self, nic: VirtioNet, batch: int, later: Later | None) -> None:
        self.nic = nic
        self.batch = check_batch(batch)
        self.later = later
        # Per queue: the check due (see _Due).
        self._due: dict[int, _Due] = {}
        self.backoff = Backoff(BACKOFF_MIN_S, BACKOFF_MAX_S)  # per queue, after a stall
        self.fallback_s = FALLBACK_S
        self.clock: Callable[[], float] = time.monotonic  # tests drive their own
        self.batched = 0  # times a queue started batching
        self.checks = 0  # fallback checks run
        self.fallbacks = 0  # checks that found a batching queue stalled (then backed off)

    def active(self) -> bool:
        return self.batch != 1 and self.later is not None

    def ahead(self, queue: VirtQueue) -> int:
        """The batch for ``queue``: at most half its ring, so that a driver refilling in
        half-ring steps still crosses it."""
        half = max(1, queue.size // 2)
        return half if self.batch == 0 else min(self.batch, half)

    def _queue(self, index: int) -> VirtQueue | None:
        vring = self.nic.vrings.get(index)
        if vring is None or not vring.enabled:
            return None
        return vring.queue

    def _may_batch(self, index: int, queue: VirtQueue) -> bool:
        return (
            self.active()
            and queue.defunct is None
            and bool(queue.event_idx)
            and not needs_world(self.nic)
            and not self.backoff.calm(index, self.clock())
        )

    def waiting(self) -> None:
        """A drain left frames waiting: the running RX queues that may batch ask for their
        next refill kick after a batch (``kick_ahead``), each with a check due; the others
        after the next buffer."""
        nic = self.nic
        for index in range(0, 2 * nic.queue_pairs, 2):
            queue = self._queue(index)
            if queue is None:
                continue
            due = self._due.get(index)
            if due is not None and due.queue is queue:
                continue  # batching, its check due (the check looks at everything again)
            if not self._may_batch(index, queue):
                queue.kick_ahead = 0
                continue
            armed = queue.kick_ahead > 1
            if not armed:
                queue.kick_ahead = self.ahead(queue)
                self.batched += 1
            self._schedule(index, queue, armed)

    def _schedule(self, index: int, queue: VirtQueue, armed: bool, avail: int = -1) -> None:
        assert self.later is not None
        self._due[index] = _Due(queue, self.nic.stats[index].frames, armed, avail)
        self.later(self.fallback_s, lambda: self._check(index, queue))

    def _check(self, index: int, queue: VirtQueue) -> None:
        due = self._due.get(index)
        if due is None or due.queue is not queue:
            return  # replaced by a newer queue's check
        del self._due[index]
        if self._queue(index) is not queue or queue.kick_ahead <= 1:
            return  # stopped, replaced or disabled (a new queue starts unbatched), or off
        self.checks += 1
        nic = self.nic
        if not nic.rx_pending():
            return  # nothing waits: the next stop for lack of room starts a check again
        if not self._may_batch(index, queue):
            self._unbatch(queue)  # a fault rule came, or the loop stops the checks
            return
        if nic.stats[index].frames != due.frames:
            if due.armed:  # a batched re-arm's kick came: this driver refills in batches
                self.backoff.won(index)
            self._schedule(index, queue, True)
            return
        try:
            avail = queue.avail_count()
        except SyncError:
            nic.drain_rx()  # the drain meets the same violation and kills the queue
            return
        except DefunctError:
            return
        if avail == 0 or avail != due.avail:
            self._schedule(index, queue, due.armed, avail)  # busy, or still refilling
            return
        # Nothing written for a whole check while frames wait, and the driver posted no
        # more buffers since the previous check: it posted fewer than asked for and waits.
        # Back off, longer each time it happens again.
        self.fallbacks += 1
        backoff = self.backoff.lost(index, self.clock())
        log.info(
            "%s: queue %d: RX kick batching: the driver posted %d buffers, short of the up "
            "to %d asked for, and none since the last check: writing them now, no batching "
            "for %g s",
            nic.name,
            index,
            avail,
            queue.kick_ahead,
            backoff,
        )
        self._unbatch(queue)

    def _unbatch(self, queue: VirtQueue) -> None:
        """Stop batching ``queue``: the drain writes what fits and, out of room again,
        re-arms for the next buffer."""
        queue.kick_ahead = 0
        self.nic.drain_rx()

    def release_all(self) -> None:
        """Stop batching every queue (the loop that would run the checks stops serving)."""
        due, self._due = self._due, {}
        for index, entry in due.items():
            if self._queue(index) is entry.queue and entry.queue.defunct is None:
                self._unbatch(entry.queue)

    def stats(self) -> dict[str, object]:
        return {
            "batch": self.batch,
            "batched": self.batched,
            "checks": self.checks,
            "fallbacks": self.fallbacks,
        }


__all__ = [
    "BACKOFF_MAX_S",
    "BACKOFF_MIN_S",
    "DEFAULT_BATCH",
    "FALLBACK_S",
    "MAX_BATCH",
    "RxKickBatch",
    "check_batch",
]
