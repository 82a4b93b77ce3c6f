"""Stop a long-running loop on SIGINT / SIGTERM without the handler deadlocking the process.

A handler that calls ``threading.Event.set`` takes the event's condition lock.  Python runs
signal handlers in the main thread between bytecodes, so a second signal that lands while
the first handler is inside ``set`` (Ctrl-C twice, or ``timeout`` sending TERM after a
user's INT) runs the handler again in the middle of it, and that second ``set`` waits for a
lock its own thread holds: the process hangs forever with its sockets open (seen with the
benchmark worker, which ``timeout`` and its parent both signalled).  The handler here marks
the request first, without a lock, and only the first delivery touches the event.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterable
from types import FrameType


class StopOnSignals:
    """Set ``stop`` once when any of ``signals`` arrives; ``received`` names the first."""

    def __init__(
        self,
        stop: threading.Event,
        signals: Iterable[signal.Signals] = (signal.SIGINT, signal.SIGTERM),
    ) -> None:
        self.stop = stop
        self.received: signal.Signals | None = None
        for sig in signals:
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        if self.received is not None:  # a repeat, maybe inside the first one's stop.set()
            return
        self.received = signal.Signals(signum)
        self.stop.set()


def stop_on_signals(
    stop: threading.Event,
    signals: Iterable[signal.Signals] = (signal.SIGINT, signal.SIGTERM),
) -> StopOnSignals:
    """Install the handlers (main thread only, as ``signal.signal`` requires)."""
    return StopOnSignals(stop, signals)


__all__ = ["StopOnSignals", "stop_on_signals"]
