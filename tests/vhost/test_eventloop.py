"""SelectorLoop: the loop the vhost layer's Watcher/EventLoop interface is run on."""

from __future__ import annotations

import os
import threading
import time

import pytest

from vdev import timerfd
from vdev.eventloop import SelectorLoop


def _pipe() -> tuple[int, int]:
    return os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)


def test_an_event_unwatched_earlier_in_the_same_batch_is_not_dispatched() -> None:
    loop = SelectorLoop()
    (r1, w1), (r2, w2) = _pipe(), _pipe()
    calls: list[str] = []

    def first() -> None:
        calls.append("first")
        loop.unwatch(r2)  # e.g. GET_VRING_BASE stops a ring whose kick fd is also ready
        loop.unwatch(r1)

    def second() -> None:
        calls.append("second")
        loop.unwatch(r1)
        loop.unwatch(r2)

    try:
        loop.watch(r1, first)
        loop.watch(r2, second)
        os.write(w1, b"x")
        os.write(w2, b"x")
        loop.poll(1.0)
        assert len(calls) == 1  # whichever ran first took the other's watch away
        loop.poll(0.0)
        assert len(calls) == 1
    finally:
        for fd in (r1, w1, r2, w2):
            os.close(fd)
        loop.close()


def test_watch_replaces_the_callback_and_timers_run_under_the_lock() -> None:
    lock = threading.RLock()
    loop = SelectorLoop(lock)
    r, w = _pipe()
    seen: list[str] = []
    try:
        loop.watch(r, lambda: seen.append("old"))
        loop.watch(r, lambda: (seen.append("new"), os.read(r, 1)))  # same fd: replaced
        os.write(w, b"x")
        loop.call_later(0.0, lambda: seen.append(f"timer owns lock: {lock._is_owned()}"))  # type: ignore[attr-defined]
        loop.call_later(3600.0, lambda: seen.append("never"))
        loop.poll(1.0)
        assert seen == ["new", "timer owns lock: True"]
        loop.unwatch(r)
        loop.unwatch(r)  # unwatching twice is a no-op
        os.write(w, b"x")
        loop.poll(0.0)
        assert seen == ["new", "timer owns lock: True"]
    finally:
        os.close(r)
        os.close(w)
        loop.close()


def test_call_later_from_another_thread_wakes_a_waiting_poll() -> None:
    loop = SelectorLoop()
    ran = threading.Event()
    try:
        t = threading.Thread(target=lambda: loop.poll(60.0))  # would sleep a minute
        t.start()
        loop.call_later(0.0, ran.set)  # the wake pipe ends the wait; the timer is due
        t.join(10)
        assert not t.is_alive() and ran.is_set()
    finally:
        loop.close()


def _wake_pending(loop: SelectorLoop) -> bool:
    import select

    return bool(select.select([loop._wake_r], [], [], 0)[0])


def test_call_later_without_wake_skips_the_wakeup_only_inside_its_own_callbacks() -> None:
    """``wake=False`` (a held TX queue's poll, vdev/net/kickhold.py) is for a callback of
    this loop on the thread polling it: that thread's next poll sees the timer anyway.
    From outside the loop's callbacks the wake-up is still written, or a waiting poll
    would sleep past the timer."""
    loop = SelectorLoop()
    r, w = _pipe()
    seen: dict[str, bool] = {}
    ran: list[str] = []

    def inside() -> None:
        os.read(r, 1)
        loop._drain_wake()
        loop.call_later(0.0, lambda: ran.append("quiet"), wake=False)
        seen["wake=False inside"] = _wake_pending(loop)
        loop.call_later(0.0, lambda: ran.append("loud"))
        seen["wake=True inside"] = _wake_pending(loop)

    try:
        loop.call_later(0.0, lambda: ran.append("outside"), wake=False)
        assert _wake_pending(loop)  # not inside the loop's callbacks: woken all the same
        loop.poll(0.0)
        assert ran == ["outside"]
        loop._drain_wake()
        loop.watch(r, inside)
        os.write(w, b"x")
        loop.poll(1.0)
        assert seen == {"wake=False inside": False, "wake=True inside": True}
        # Another thread, while this one is inside the callbacks: woken.
        other: list[bool] = []

        def from_thread() -> None:
            loop.call_later(0.0, lambda: None, wake=False)
            other.append(_wake_pending(loop))

        def inside_again() -> None:
            os.read(r, 1)
            loop._drain_wake()
            t = threading.Thread(target=from_thread)
            t.start()
            t.join(5)

        loop.watch(r, inside_again)
        os.write(w, b"x")
        loop.poll(1.0)
        assert other == [True]
        for _ in range(3):
            loop.poll(0.0)
        assert sorted(ran) == ["loud", "outside", "quiet"]
    finally:
        loop.unwatch(r)
        os.close(r)
        os.close(w)
        loop.close()


# -- precise timers (a timerfd) -----------------------------------------------------------

needs_timerfd = pytest.mark.skipif(timerfd.create() is None, reason="no timerfd on this system")


@needs_timerfd
def test_a_precise_timer_arms_the_timerfd_for_its_own_deadline() -> None:
    """The kernel's timer holds the timer's deadline (read back with timerfd_gettime), and
    an ordinary timer never creates one."""
    loop = SelectorLoop()
    try:
        loop.call_later(30.0, lambda: None)
        loop.poll(0.001)
        assert loop._tfd is None  # ordinary timers: epoll's own timeout
        loop.call_later(20.0, lambda: None, precise=True)
        loop.call_later(10.0, lambda: None, precise=True)
        loop.poll(0.001)
        assert loop._tfd is not None
        left = loop._tfd.remaining()
        assert left is not None and 9.0 < left <= 10.0  # the earliest precise deadline
    finally:
        loop.close()


@needs_timerfd
def test_the_wait_ends_at_a_precise_deadline_by_the_timerfd() -> None:
    """A deadline 50.5 ms away: epoll's own timeout is 51 ms (whole milliseconds, rounded
    up), so the wait that returns with the timer run was ended by the timerfd's event."""
    loop = SelectorLoop()
    fired: list[int] = []
    seen: list[list[int]] = []
    real = loop.sel.select

    def select(timeout: float | None = None) -> list:  # type: ignore[type-arg]
        events = real(timeout)
        seen.append([key.fd for key, _ in events])
        return events

    loop.sel.select = select  # type: ignore[method-assign]
    try:
        loop.call_later(0.0505, lambda: fired.append(1), precise=True)
        deadline = time.monotonic() + 10
        while not fired and time.monotonic() < deadline:
            loop.poll(5.0)
        assert fired == [1]
        assert loop._tfd is not None and loop._tfd.fd in seen[-1]
        assert loop._precise == []  # a fired deadline is not armed again
        loop.poll(0.001)
        assert loop._tfd.remaining() is None
    finally:
        loop.close()


def test_without_a_timerfd_a_precise_timer_is_an_ordinary_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(timerfd, "create", lambda: None)
    loop = SelectorLoop()
    fired: list[int] = []
    try:
        loop.call_later(0.0002, lambda: fired.append(1), precise=True)
        deadline = time.monotonic() + 10
        while not fired and time.monotonic() < deadline:
            loop.poll(0.5)
        assert fired == [1] and loop._tfd is None
    finally:
        loop.close()
