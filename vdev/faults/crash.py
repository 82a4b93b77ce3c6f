"""Scriptable back-end crashes: die after N frames, or with descriptors in flight.

Reconnect bugs live in the timing: what the front-end does when the back-end dies with
chains it took and had not completed, or right after a burst.  A :class:`CrashPoint` is
armed on one NIC and fires from the data path (``VirtioNet.take_hook``, called after every
chain a TX queue takes):

- ``after_frames``: TX chains the NIC must have taken since the point was armed first;
- ``in_flight`` >= 1: then crash at the first take where the current batch holds that many
  chains unpublished (taken, used idx not yet stored: exactly what the inflight region
  records); ``in_flight`` = 0: crash at the end of that batch instead (published and
  forwarded, nothing in flight);
- ``mode``: "exit" kills the whole process with SIGKILL (what ``kill -9`` does to
  ``vdev serve``: no cleanup, sockets left on disk), "drop" drops just this NIC's
  connection in process (``crash_backend``), discarding the batch in hand as a dead
  process would.

The event ``backend_crash`` (with ``mode``, ``taken``, ``in_flight``) is written to the fault
log before the crash, flushed, so it survives an "exit".
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vdev.net.nic import VirtioNet

CRASH_MODES = ("exit", "drop")


def check_crash_args(after_frames: int, in_flight: int, mode: str) -> None:
    """ValueError naming the argument when one is out of range."""
    for name, v in (("after_frames", after_frames), ("in_flight", in_flight)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{name}: {v!r} must be an integer >= 0")
    if mode not in CRASH_MODES:
        raise ValueError(f"mode: {mode!r} must be one of {', '.join(CRASH_MODES)}")


@dataclass
class CrashPoint:
    """One armed crash on one NIC; ``fire(nic, taken, unpublished)`` performs it."""

    after_frames: int
    in_flight: int
    mode: str
    fire: Callable[[VirtioNet, int, int], None]
    taken: int = 0
    fired: bool = False
    _later: Callable[[Callable[[], None]], None] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        check_crash_args(self.after_frames, self.in_flight, self.mode)

    def on_take(self, nic: VirtioNet, index: int, unpublished: int) -> None:
        if self.fired:
            return
        self.taken += 1
        if self.taken < self.after_frames:
            return
        if self.in_flight == 0:
            # After this batch: it publishes and forwards first, then the loop runs this.
            self.fired = True
            later = self._later or (nic.defer if nic.defer is not None else None)
            if later is None:
                raise RuntimeError(f"{nic.name}: in_flight = 0 needs an event loop (defer)")
            later(lambda: self.fire(nic, self.taken, 0))
            return
        if unpublished >= self.in_flight:
            self.fired = True
            self.fire(nic, self.taken, unpublished)


def kill_self() -> None:
    """SIGKILL this process: no atexit, no finally, no socket cleanup (kill -9)."""
    os.kill(os.getpid(), signal.SIGKILL)


def crash_detail(point: CrashPoint, taken: int, unpublished: int) -> dict[str, Any]:
    return {
        "mode": point.mode,
        "taken": taken,
        "in_flight": unpublished,
        "after_frames": point.after_frames,
    }


__all__ = ["CRASH_MODES", "CrashPoint", "check_crash_args", "crash_detail", "kill_self"]
