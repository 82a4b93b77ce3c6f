"""Per-NIC datapath threads and the locks that let them run side by side.

docs/DESIGN.md "Threads and the locking rule" is the contract; in short, three levels, always
taken in this order and never the other way:

1. the **world lock** (:class:`WorldLock`, ``Device.lock`` with ``threads="per-nic"``): the
   control plane (vhost-user messages, timers, the control socket, the fault API, stats,
   test code).  Taking it takes every NIC lock (in NIC order) and then the shared lock, so a
   holder runs alone, exactly as with the one device lock of ``threads="single"``;
2. one **NIC lock** per NIC (``VirtioNet.lock``): that NIC's queues, RX backlog and counters,
   held by its datapath thread while it services kicks;
3. the **shared lock** (``Device.shared``): switch, FDB, pool, responder, host-channel ports
   and the capture file.  A datapath thread holds it around its Python work and lets it go
   only for the compiled bursts (``fastqueue.tx_burst(..., unlocked=...)``), which touch
   nothing but the NIC's own ring and the pool packets reserved for them.

A datapath thread never takes another NIC's lock: packets for another NIC are handed off
(:meth:`NicDatapath.hand_off`: appended to that NIC's inbox under the shared lock, its
thread woken), so two NICs forwarding to each other cannot deadlock.  A NIC with fault hooks,
ring faults, a capture tap or a crash point armed runs its whole iteration under the world
lock instead (the fault engine's state is one, shared by all NICs): slower, and exact.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from vdev.eventloop import SelectorLoop

if TYPE_CHECKING:
    from vdev.net.nic import VirtioNet
    from vdev.net.switch import Switch

log = logging.getLogger("vdev.threads")

THREAD_MODES = ("per-nic", "single")


class WorldLock:
    """A re-entrant lock that, when first taken by a thread, takes every registered NIC lock
    (in registration order) and then the shared lock; released in reverse.

    ``pending`` counts threads waiting for it: a datapath thread that sees it non-zero
    yields before it takes its NIC lock again, so a busy-polling NIC cannot starve the
    control plane (Python locks are not fair)."""

    def __init__(self, shared: threading.RLock) -> None:
        self._own = threading.RLock()
        self._shared = shared
        self._locks: list[threading.RLock] = []
        self._held: list[threading.RLock] = []
        self._depth = 0
        self._pending_lock = threading.Lock()
        self.pending = 0

    def add(self, lock: threading.RLock) -> None:
        """Register a NIC lock (under this lock, so a holder gets the new NIC too)."""
        with self:
            self._locks.append(lock)
            lock.acquire()
            self._held.append(lock)

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        """Take it (all of it); with ``timeout`` >= 0, give up after that long (and hold
        nothing), as ``threading.RLock.acquire`` does."""
        if self._own._is_owned():  # type: ignore[attr-defined]
            self._depth += 1
            return True
        deadline = None if timeout < 0 else time.monotonic() + timeout
        with self._pending_lock:
            self.pending += 1
        got: list[Any] = []
        try:
            for lock in [self._own, *self._locks, self._shared]:
                left = -1.0 if deadline is None else max(0.0, deadline - time.monotonic())
                if not lock.acquire(blocking, left if blocking else -1):
                    for held in reversed(got):
                        held.release()
                    return False
                got.append(lock)
        finally:
            with self._pending_lock:
                self.pending -= 1
        self._held = got[1:-1]
        self._depth = 1
        return True

    def release(self) -> None:
        self._depth -= 1
        if self._depth:
            return
        held, self._held = self._held, []
        self._shared.release()
        for lock in reversed(held):
            lock.release()
        self._own.release()

    def _is_owned(self) -> bool:
        return bool(self._own._is_owned())  # type: ignore[attr-defined]

    def __enter__(self) -> WorldLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _yield_to(world: WorldLock) -> None:
    """Let a waiting world-lock taker in (bounded: it only waits for locks we released)."""
    deadline = time.monotonic() + 1.0
    while world.pending and time.monotonic() < deadline:
        time.sleep(0.0001)


class DatapathLock:
    """What one NIC's datapath iteration holds: its NIC lock and the shared lock, or the
    world lock when the NIC needs the slow, exact path (:func:`needs_world`).

    The choice is made before the NIC lock is taken and checked again under it: fault state
    changes only under the world lock, which includes this NIC's lock, so once the check
    passes under it the answer cannot change until release."""

    def __init__(self, nic: VirtioNet, world: WorldLock, shared: threading.RLock) -> None:
        self.nic = nic
        self.world = world
        self.shared = shared
        self.mode: str | None = None  # "plain" or "world" while held
        self.owner: int | None = None
        self.thread_ident: int | None = None  # the NIC's datapath thread, while it runs

    def __enter__(self) -> DatapathLock:
        nic, world = self.nic, self.world
        if world.pending:
            _yield_to(world)
        while True:
            if needs_world(nic):
                world.acquire()
                self.mode = "world"
                break
            nic.lock.acquire()
            if needs_world(nic):
                nic.lock.release()
                continue
            self.shared.acquire()
            self.mode = "plain"
            break
        self.owner = threading.get_ident()
        return self

    def __exit__(self, *exc: object) -> None:
        mode, self.mode, self.owner = self.mode, None, None
        if mode == "world":
            self.world.release()
        else:
            self.shared.release()
            self.nic.lock.release()

    def unlocked(self) -> contextlib.AbstractContextManager[object] | None:
        """The context a compiled burst runs in: without the shared lock when this is the
        datapath thread holding the plain path (then nothing above it on this thread holds
        the shared lock for its own reasons), else None (keep everything held)."""
        me = threading.get_ident()
        if self.mode == "plain" and self.owner == me and self.thread_ident == me:
            return _SharedReleased(self.shared)
        return None


class _SharedReleased:
    """The shared lock let go (all its recursion levels) for the extent of a ``with``, and
    taken back after: a class, not a generator context manager, since every compiled burst
    of a datapath thread enters one."""

    __slots__ = ("lock", "state")

    def __init__(self, lock: threading.RLock) -> None:
        self.lock: Any = lock
        self.state: Any = None

    def __enter__(self) -> None:
        self.state = self.lock._release_save()

    def __exit__(self, *exc: object) -> None:
        self.lock._acquire_restore(self.state)


def needs_world(nic: VirtioNet) -> bool:
    """Whether the NIC's datapath must run under the world lock: anything that calls into
    state shared by every NIC (fault engine hooks and ring faults, capture, crash points)."""
    return bool(
        nic.tap is not None
        or nic.ring_faults is not None
        or nic.tx_hooks
        or nic.rx_hooks
        or nic.take_hook is not None
    )


class NicDatapath:
    """One NIC's datapath: its kick loop (a :class:`SelectorLoop` the NIC's vhost-user
    backend watches kick fds on), its hand-off inbox, and the thread that runs them.

    Without a running thread (the device not started, or stopped) the loop can be polled
    from any thread (:meth:`poll`), and :meth:`hand_off` is not used (the device delivers
    directly)."""

    def __init__(
        self,
        nic: VirtioNet,
        world: WorldLock,
        shared: threading.RLock,
        switch: Switch,
    ) -> None:
        self.nic = nic
        self.switch = switch
        self.shared = shared
        self.world = world
        self.lock = DatapathLock(nic, world, shared)
        self.loop = SelectorLoop(self.lock, after=self._after)
        self.inbox: list[int] = []  # under the shared lock
        self.refused = 0  # inbox-full drops not yet counted in the NIC's stats (shared lock)
        self._efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._signalled = False  # an eventfd write is pending (shared lock)
        self.loop.watch(self._efd, self._on_inbox)
        self.poll_queues = False  # busy-poll: service every started queue every iteration
        self.thread: threading.Thread | None = None
        self.ident: int | None = None
        self._stop = threading.Event()

    # -- hand-off ------------------------------------------------------------------------

    def hand_off(self, pkts: list[int]) -> int:
        """Take frames for this NIC from any thread holding the shared lock: queued for the
        NIC's thread (woken), the prefix that fits; the rest the switch frees as refused."""
        nic = self.nic
        if threading.get_ident() == self.ident and not self.inbox and not self.refused:
            # From the NIC's own thread (its TX forwarded to itself, through the responder
            # or a loop): delivered now, as with one thread for all; nothing is queued ahead.
            # The switch above holds the shared lock for its own reasons (its scratch
            # arrays, the batch it walks), so the RX bursts keep it (DatapathLock.unlocked).
            unlocked, nic.burst_unlocked = nic.burst_unlocked, None
            try:
                return nic.deliver_now(pkts)
            finally:
                nic.burst_unlocked = unlocked
        room = max(0, nic.rx_room() - len(self.inbox))
        taken = pkts[:room]
        if len(taken) < len(pkts):
            self.refused += len(pkts) - len(taken)
            nic.record_refused(pkts[room:], "rx_backlog_full")
        if taken:
            self.inbox.extend(taken)
            if threading.get_ident() != self.ident and not self._signalled:
                self._signalled = True
                os.eventfd_write(self._efd, 1)
        return len(taken)

    def hold_later(self, delay: float, fn: Callable[[], None]) -> None:
        """A held TX queue's next poll (kickhold.py): a timer of this NIC's loop, with no
        wake-up when set from inside the loop's own callbacks (``call_later(wake=False)``:
        the NIC's thread polls the loop again itself)."""
        self.loop.call_later(delay, fn, wake=False)

    def inbox_len(self) -> int:
        """Frames handed off and not yet taken in (read without the lock: a gauge)."""
        return len(self.inbox)

    def _on_inbox(self) -> None:
        try:
            os.eventfd_read(self._efd)
        except BlockingIOError:
            pass
        self._signalled = False

    def take_inbox(self) -> None:
        """Deliver the inbox into the NIC (its backlog and guest RX buffers); frames the NIC
        refuses are counted and freed by the switch as if refused at delivery.  Call with
        the NIC lock and the shared lock held."""
        if self.refused:
            self.nic.count_refused(self.refused)
            self.refused = 0
        if not self.inbox:
            return
        pkts, self.inbox = self.inbox, []
        taken = self.nic.deliver_now(pkts)
        if taken < len(pkts):
            self.switch.refused(self.nic.name, pkts[taken:])

    def _after(self) -> None:
        if self.poll_queues:
            nic = self.nic
            turn = nic.echo_turn
            served = None
            if turn is not None and 1 in nic.vrings and turn.ready(nic) is not None:
                # A PMD's wait: spin in C for the TX ring's next chain (bounded, the GIL and
                # the shared lock let go), then serve that queue first (echoturn.py).
                if turn.wait(nic, 1):
                    nic.kick(1)
                    served = 1
            for index in list(nic.vrings):
                if index != served:
                    nic.kick(index)
        self.take_inbox()

    # -- running -------------------------------------------------------------------------

    def poll(self, timeout: float = 0.0) -> None:
        self.loop.poll(timeout)

    def start(self, *, poll: bool = False) -> None:
        if self.thread is not None:
            return
        self.poll_queues = poll
        self._stop.clear()
        self.thread = threading.Thread(target=self._run, name=f"vdev-{self.nic.name}", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        self.ident = self.lock.thread_ident = threading.get_ident()
        stop, loop = self._stop, self.loop
        try:
            if self.poll_queues:
                while not stop.is_set():
                    loop.poll(0.0)
            else:
                while not stop.is_set():
                    loop.poll(0.2)
        except Exception:  # pragma: no cover - a bug: the NIC stops, loudly
            log.exception("%s: datapath thread failed", self.nic.name)
        finally:
            self.ident = self.lock.thread_ident = None

    def stop(self, timeout: float = 5.0) -> None:
        thread, self.thread = self.thread, None
        if thread is None:
            return
        self._stop.set()
        self.loop.wake()
        thread.join(timeout)
        self.poll_queues = False

    def close(self) -> None:
        self.stop()
        self.loop.unwatch(self._efd)
        os.close(self._efd)
        self.loop.close()


def check_mode(mode: str) -> str:
    """``mode`` if it names a threading mode (a typo in VDEV_THREADS must not silently pick
    one), else ValueError."""
    if mode not in THREAD_MODES:
        raise ValueError(f"threads={mode!r}: want one of {', '.join(THREAD_MODES)}")
    return mode


__all__ = ["THREAD_MODES", "DatapathLock", "NicDatapath", "WorldLock", "check_mode", "needs_world"]
