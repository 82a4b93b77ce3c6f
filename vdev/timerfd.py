"""A Linux ``timerfd`` for waits shorter than a millisecond.

Python's ``epoll`` wait takes its timeout in whole milliseconds, rounded up
(``select.epoll.poll``), so a loop timer due in 200 us fires after 1 ms.  A timerfd armed
for the timer's deadline makes the same ``epoll`` wait return at that instant: the loop
watches the fd like any other.  Python 3.11 has no ``os.timerfd_create`` (3.13 does), so
this calls the libc functions through :mod:`ctypes`; on a system without them
:func:`create` returns None and the loop keeps its millisecond timers.

Deadlines are ``time.monotonic()`` values: on Linux that clock is ``CLOCK_MONOTONIC``,
which the fd is created on, so the deadline is armed as an absolute time.
"""

from __future__ import annotations

import ctypes
import os

CLOCK_MONOTONIC = 1
TFD_NONBLOCK = os.O_NONBLOCK
TFD_CLOEXEC = os.O_CLOEXEC
TFD_TIMER_ABSTIME = 1


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.timerfd_create.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.timerfd_settime.argtypes = [
            ctypes.c_int,
            ctypes.c_int,
            ctypes.POINTER(_Itimerspec),
            ctypes.POINTER(_Itimerspec),
        ]
        libc.timerfd_gettime.argtypes = [ctypes.c_int, ctypes.POINTER(_Itimerspec)]
    except (OSError, AttributeError):
        return None
    return libc


_LIBC = _libc()


class TimerFd:
    """One non-blocking, close-on-exec timerfd on ``CLOCK_MONOTONIC``."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._spec = _Itimerspec()
        self.armed_at: float | None = None  # the deadline it is armed for

    def arm(self, deadline: float) -> None:
        """Fire once at ``deadline`` (a ``time.monotonic()`` value); a deadline already
        past fires at once (the kernel treats it so)."""
        assert _LIBC is not None
        sec = int(deadline)
        nsec = int((deadline - sec) * 1e9)
        if nsec <= 0 and sec <= 0:
            nsec = 1  # 0/0 would disarm it
        self._spec.it_value.tv_sec = sec
        self._spec.it_value.tv_nsec = min(nsec, 999_999_999)
        if _LIBC.timerfd_settime(self.fd, TFD_TIMER_ABSTIME, ctypes.byref(self._spec), None):
            err = ctypes.get_errno()
            raise OSError(err, f"timerfd_settime: {os.strerror(err)}")
        self.armed_at = deadline

    def remaining(self) -> float | None:
        """Seconds until it fires (None: not armed), as the kernel reads it."""
        assert _LIBC is not None
        cur = _Itimerspec()
        if _LIBC.timerfd_gettime(self.fd, ctypes.byref(cur)):
            err = ctypes.get_errno()
            raise OSError(err, f"timerfd_gettime: {os.strerror(err)}")
        left = cur.it_value.tv_sec + cur.it_value.tv_nsec * 1e-9
        return left if left > 0 else None

    def clear(self) -> None:
        """Take the expiry count, if any (the fd is readable until then)."""
        try:
            os.read(self.fd, 8)
        except BlockingIOError:
            pass
        self.armed_at = None

    def close(self) -> None:
        os.close(self.fd)


def create() -> TimerFd | None:
    """A new :class:`TimerFd`, or None where timerfds are not available."""
    if _LIBC is None:
        return None
    fd = _LIBC.timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC)
    if fd < 0:
        return None
    return TimerFd(fd)


__all__ = ["TimerFd", "create"]
