"""The event loop interface the vhost layer is written against, and the one loop vdev runs.

The vhost-user library owns no loop (libvhost-user style): it asks its caller to watch file
descriptors and to run callbacks later.  :class:`Watcher` is libvhost-user's
``set_watch``/``remove_watch`` pair (the backend watches kick eventfds with it);
:class:`EventLoop` adds a timer (the connection layer schedules client-mode retries with it,
so it never blocks inside a callback).  :class:`SelectorLoop` implements both over
:mod:`selectors`; the device runs one of them (``Device.loop``), tests and tools may run their
own.
"""

from __future__ import annotations

import logging
import os
import selectors
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Protocol

from vdev import timerfd

log = logging.getLogger("vdev.loop")

Callback = Callable[[], None]


class Watcher(Protocol):
    """Watch a file descriptor for reading (libvhost-user's ``set_watch``/``remove_watch``)."""

    def watch(self, fd: int, callback: Callback) -> None:
        """Call ``callback()`` from the loop whenever ``fd`` is readable (replaces an existing
        watch of the same fd)."""
        ...

    def unwatch(self, fd: int) -> None:
        """Stop watching ``fd``; a no-op if it is not watched.  Call before closing it."""
        ...


class EventLoop(Watcher, Protocol):
    """A :class:`Watcher` that also runs callbacks later."""

    def call_later(self, delay: float, fn: Callback) -> None:
        """Run ``fn()`` on the loop after ``delay`` seconds; safe from any thread."""
        ...


class SelectorLoop:
    """One :mod:`selectors` loop with timers and a wake-up pipe.

    ``lock`` (optional) is held while callbacks and due timers run, so other threads that
    take it are ordered with the loop (the device shares its state lock this way).  Only
    :meth:`poll` (or :meth:`run`) runs callbacks; call it from one thread.
    """

    def __init__(
        self,
        lock: AbstractContextManager[object] | None = None,
        *,
        after: Callback | None = None,
    ) -> None:
        """``after`` (optional) runs under ``lock`` at the end of every :meth:`poll`, after
        the callbacks and timers (a NIC's datapath thread takes its hand-off inbox there)."""
        self.sel = selectors.DefaultSelector()
        self._lock = lock
        self._after = after
        self._timers_lock = threading.Lock()
        self._timers: list[tuple[float, Callback]] = []
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.sel.register(self._wake_r, selectors.EVENT_READ, self._drain_wake)
        self.closed = False
        self._running: int | None = None  # the thread inside poll()'s callbacks
        # Deadlines of the timers asked for with precise=True, and the timerfd that makes
        # the wait end at the earliest of them (created on first use; None: unavailable).
        self._precise: list[float] = []
        self._tfd: timerfd.TimerFd | None = None
        self._tfd_tried = False

    # -- Watcher / EventLoop ---------------------------------------------------------------

    def watch(self, fd: int, callback: Callback) -> None:
        try:
            self.sel.register(fd, selectors.EVENT_READ, callback)
        except KeyError:
            self.sel.modify(fd, selectors.EVENT_READ, callback)

    def unwatch(self, fd: int) -> None:
        try:
            self.sel.unregister(fd)
        except (KeyError, ValueError):
            pass

    def call_later(
        self, delay: float, fn: Callback, *, wake: bool = True, precise: bool = False
    ) -> None:
        """``wake=False`` skips the wake-up, for a caller inside this loop's callbacks on a
        thread that polls this loop again itself (its next poll() sees the timer before it
        waits); a loop polled from another loop's callback needs the wake-up.

        ``precise``: the wait ends at the deadline itself, not at the next whole
        millisecond after it (``epoll``'s granularity), through a timerfd; for timers well
        under a millisecond away that pace a datapath.  Where timerfds are unavailable it
        is an ordinary timer."""
        when = time.monotonic() + delay
        with self._timers_lock:
            self._timers.append((when, fn))
            if precise:
                self._precise.append(when)
        if wake or threading.get_ident() != self._running:
            self.wake()

    # -- running ---------------------------------------------------------------------------

    def wake(self) -> None:
        """Make a :meth:`poll` that is waiting return now (from any thread)."""
        try:
            os.write(self._wake_w, b"x")
        except BlockingIOError:
            pass

    def _drain_wake(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass

    def _arm(self, deadline: float) -> None:
        """Make the next wait end at ``deadline`` (a precise timer's)."""
        tfd = self._tfd
        if tfd is None:
            if self._tfd_tried:
                return
            self._tfd_tried = True
            tfd = self._tfd = timerfd.create()
            if tfd is None:
                log.info("no timerfd: precise timers have millisecond granularity")
                return
            self.sel.register(tfd.fd, selectors.EVENT_READ, tfd.clear)
        if tfd.armed_at != deadline:
            tfd.arm(deadline)

    def _due(self) -> list[Callback]:
        now = time.monotonic()
        with self._timers_lock:
            due = [fn for t, fn in self._timers if t <= now]
            if due:
                self._timers = [t for t in self._timers if t[0] > now]
            if self._precise:
                self._precise = [t for t in self._precise if t > now]
        return due

    def poll(self, timeout: float = 0.1) -> None:
        """One iteration: wait up to ``timeout`` (less if a timer is due), run what is ready."""
        with self._timers_lock:
            if self._timers:
                first = min(t for t, _ in self._timers)
                timeout = max(0.0, min(timeout, first - time.monotonic()))
            precise = min(self._precise) if self._precise else None
        if precise is not None and timeout > 0.0:
            self._arm(precise)
        events = self.sel.select(timeout)
        with self._lock if self._lock is not None else nullcontext():
            outer, self._running = self._running, threading.get_ident()
            try:
                self._dispatch(events)
            finally:
                self._running = outer

    def _dispatch(self, events: list[tuple[selectors.SelectorKey, int]]) -> None:
        fd_map = self.sel.get_map()
        for key, _mask in events:
            # An earlier callback of this batch may have unwatched (and closed) the fd, or
            # watched a new file under the same number: skip the stale event.
            if fd_map.get(key.fd) is not key:
                continue
            try:
                key.data()
            except Exception:
                log.exception("event handler failed")
        for fn in self._due():
            try:
                fn()
            except Exception:
                log.exception("timer failed")
        if self._after is not None:
            try:
                self._after()
            except Exception:
                log.exception("after-poll hook failed")

    def run(
        self, until: Callable[[], bool], *, poll: float = 0.1, timeout: float | None = None
    ) -> None:
        """Poll until ``until()`` is true; TimeoutError after ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not until():
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError("SelectorLoop.run timed out")
            self.poll(poll)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.sel.close()
        if self._tfd is not None:
            self._tfd.close()
            self._tfd = None
        os.close(self._wake_r)
        os.close(self._wake_w)


__all__ = ["Callback", "EventLoop", "SelectorLoop", "Watcher"]
