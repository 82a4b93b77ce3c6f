"""Kick mitigation for TX queues: while a guest streams, poll its ring instead of asking for
a kick per frame.

A guest under TCG kicks every few frames, and every kick costs the device a wake-up, a burst
call and, most of all, the interrupt it sends back when it completes those frames (an
``eventfd`` write that wakes QEMU: 42% of the NIC thread in a py-spy profile of
``benchmarks/guest_tcg.py``).  So, as Linux's NAPI does for interrupts: when a kick comes
less than ``window`` seconds after the queue's previous drain ended, the queue is *held*.
Its kick is switched off (2.7.10 "Available Buffer Notification Suppression":
``VRING_USED_F_NO_NOTIFY``, or with ``VIRTIO_F_EVENT_IDX`` ``avail_event`` simply left
behind; 2.8.10 "Driver and Device Event Suppression": the packed ``DISABLE`` flag), the
drain does not re-arm it (``VirtQueue.hold_kick``), and the device polls the ring again
after ``window``.  A poll that takes a batch publishes it with one interrupt decision and
polls again; the first poll that takes less re-arms the kick exactly as a drain does
(re-arm, then look again for chains that raced in).  So a queue is never left without a
kick asked for and no poll due.

The poll runs on the loop serving the NIC, whose ``epoll`` wait has millisecond
granularity: a poll comes about 1 ms after it is asked for whatever the window (RESULTS
"Kick mitigation" has the polls per second).  A 256-entry ring at a TCG guest's 170 kpps
lasts 1.5 ms, so the guest does not wait on it.  A driver that fills the ring faster (a
DPDK PMD: 256 entries in about 50 us) shows as a drain that took a whole ring's worth, and
the next poll is then asked for at once.

A ping-pong (one frame, its reply, the next frame) whose round trip is shorter than the
window looks like a stream at its kick; it shows at the poll, which finds the one request
that waited for it.  A hold none of whose polls took a batch backs the queue off: no hold
for ``BACKOFF_MIN_S`` (doubling while it recurs, up to ``BACKOFF_MAX_S``), so such a
ping-pong pays one poll's wait per back-off period, not per round trip.  Only the
plain datapath holds; a NIC with fault rules, capture or a crash point armed
(``threads.needs_world``) runs as before, so fault runs stay as reproducible as they were.
``window`` 0 turns it off (``vdev serve --kick-hold-us 0``).

The policy is the device's choice, not the ring's: the driver sees a device that completes
buffers a little later and asks for fewer kicks, both legal at any time.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from vdev.net.backoff import Backoff
from vdev.net.threads import needs_world

if TYPE_CHECKING:
    from vdev.net.nic import VirtioNet
    from vdev.virtio.queue import VirtQueue

# The default window.  Measured with benchmarks/guest_tcg.py (RESULTS "Kick mitigation").
DEFAULT_WINDOW_S = 100e-6
MAX_WINDOW_S = 0.01  # beyond this a held queue would look stalled to a driver's watchdog
# A poll of a held queue that takes fewer chains than this ends the hold (a ping-pong's
# poll finds the one request that waited for it).
MIN_BATCH = 2
# After a hold that did not pay off, no hold for this long (doubling up to the maximum
# while it keeps happening): a ping-pong then pays one poll's wait per back-off period.
BACKOFF_MIN_S = 0.1
BACKOFF_MAX_S = 5.0

Later = Callable[[float, Callable[[], None]], None]


def check_window(window: float) -> float:
    """``window`` (seconds) if usable, else ValueError naming it."""
    if not 0.0 <= window <= MAX_WINDOW_S:
        raise ValueError(
            f"kick hold window {window * 1e6:g} us: want 0 (off) to {MAX_WINDOW_S * 1e6:g} us"
        )
    return window


class KickHold:
    """One NIC's TX kick mitigation: which queues are held and when each last drained.

    Runs on the NIC's datapath (under its lock); ``later`` schedules a callback on the loop
    that serves the NIC's kicks, under the same lock."""

    def __init__(self, nic: VirtioNet, window: float, later: Later | None) -> None:
        self.nic = nic
        self.window = check_window(window)
        self.later = later
        self._last_end: dict[int, float] = {}  # per queue: when its last drain ended
        self._due: dict[int, VirtQueue] = {}  # queues with a poll scheduled
        self._paid: dict[int, bool] = {}  # the current hold's polls took a batch
        self.backoff = Backoff(BACKOFF_MIN_S, BACKOFF_MAX_S)  # per queue (see _poll)
        self.clock: Callable[[], float] = time.monotonic  # tests drive their own
        self.held = 0  # times a queue was held (a gauge of how often it applies)
        self.polls = 0  # polls run on held queues
        self.polls_at_once = 0  # of them, asked for with no delay (a full ring was taken)
        self.backoffs = 0  # holds that did not pay off (their first poll took no batch)

    def active(self) -> bool:
        return self.window > 0.0 and self.later is not None

    def _drain(self, index: int) -> int:
        n = self.nic.process_tx(index)
        self._last_end[index] = self.clock()
        return n

    def _streaming(self, index: int) -> bool:
        """A kick within ``window`` of the previous drain's end, and the queue not backing
        off (a request/response whose round trip is shorter than the window looks the
        same until its first poll: see :meth:`_poll`)."""
        now = self.clock()
        if self.backoff.calm(index, now):
            return False
        return now - self._last_end.get(index, float("-inf")) < self.window

    def _queue(self, index: int) -> VirtQueue | None:
        vring = self.nic.vrings.get(index)
        return vring.queue if vring is not None else None

    def _current(self, index: int, queue: VirtQueue) -> bool:
        """``queue`` is still ring ``index``'s, alive (not stopped, replaced or killed)."""
        return self._queue(index) is queue and queue.defunct is None

    def kicked(self, index: int) -> None:
        """The guest kicked TX queue ``index`` (or it started): drain it, holding it when
        it streams (:meth:`_streaming`)."""
        queue = self._queue(index)
        if queue is None:
            self._drain(index)
            return
        holding = self.active() and self._may_hold(queue)
        if queue.hold_kick:
            if holding:  # a kick that was on its way: take what is there
                self._drain(index)
            else:  # held when holding stopped: re-arm, drain
                self.release(index, queue)
            return
        if not holding or not self._streaming(index):
            self._drain(index)
            return
        queue.enable_notifications(False)
        queue.hold_kick = True
        self.held += 1
        self._paid[index] = False
        self._schedule(index, queue, self._drain(index))

    def _may_hold(self, queue: VirtQueue) -> bool:
        return queue.defunct is None and not needs_world(self.nic)

    def _schedule(self, index: int, queue: VirtQueue, taken: int) -> None:
        """The next poll: after ``window``, or at once when the drain before it took a
        whole ring's worth (``taken`` chains) or more.  The driver then fills the ring
        faster than polls come and waits on the device, told not to kick (testpmd fills
        256 entries in about 50 us, and a timer comes about 1 ms later)."""
        if self._due.get(index) is queue:
            return
        self._due[index] = queue
        assert self.later is not None
        delay = 0.0 if taken >= queue.size else self.window
        self.polls_at_once += delay == 0.0
        self.later(delay, lambda: self._poll(index, queue))

    def _poll(self, index: int, queue: VirtQueue) -> None:
        if self._due.get(index) is queue:
            del self._due[index]
        if not self._current(index, queue):
            return  # stopped or replaced: a new queue starts with its kick armed
        if not queue.hold_kick:
            return  # released meanwhile (the ring disabled, the loop stopped): armed
        self.polls += 1
        if not self._may_hold(queue):  # a fault rule came: run as before it
            self.release(index, queue)
            return
        taken = self._drain(index)
        if taken >= MIN_BATCH:
            self._paid[index] = True
            self.backoff.won(index)
            self._schedule(index, queue, taken)
            return
        # Quiet (less than a batch came while held): re-arm as any drain does.  A hold none
        # of whose polls took a batch was a ping-pong (each next request waited for this
        # poll): back off, longer each time it happens again.
        if not self._paid.get(index, True):
            self.backoff.lost(index, self.clock())
            self.backoffs += 1
        self.release(index, queue)

    def release(self, index: int, queue: VirtQueue) -> None:
        """Stop holding ``queue``: its kick is asked for again (the drain re-arms it and
        takes what raced in)."""
        queue.hold_kick = False
        self._drain(index)

    def disabling(self, index: int) -> None:
        """The ring is about to be disabled: if held, release it now (drain, re-arm) while
        it is still enabled; its pending poll then finds it released."""
        queue = self._queue(index)
        if queue is not None and queue.hold_kick and queue.defunct is None:
            self.release(index, queue)

    def release_all(self) -> None:
        """Stop holding every queue (the loop that would poll them stops serving)."""
        due, self._due = self._due, {}
        for index, queue in due.items():
            if self._current(index, queue):
                self.release(index, queue)

    def stats(self) -> dict[str, object]:
        return {
            "window_us": round(self.window * 1e6, 3),
            "held": self.held,
            "polls": self.polls,
            "polls_at_once": self.polls_at_once,
            "backoffs": self.backoffs,
        }


__all__ = [
    "BACKOFF_MAX_S",
    "BACKOFF_MIN_S",
    "DEFAULT_WINDOW_S",
    "MAX_WINDOW_S",
    "MIN_BATCH",
    "KickHold",
    "check_window",
]
