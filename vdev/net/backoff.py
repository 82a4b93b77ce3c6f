"""The back-off the device's notification policies share (kickhold.py, rxbatch.py).

Each policy gambles per queue (hold a TX ring and poll it; ask for an RX refill kick only
after a batch) and sometimes loses: a ping-pong's poll finds one request, a driver posts
fewer buffers than asked for and waits.  After a loss the queue is left alone for a while,
doubling while losses recur, up to a maximum; one win starts it over at the minimum.
Times are the policy's own clock (tests drive theirs), passed in.
"""

from __future__ import annotations


class Backoff:
    """Per-queue back-off: none for ``min_s`` after a loss, doubling while losses recur, up
    to ``max_s``."""

    def __init__(self, min_s: float, max_s: float) -> None:
        self.min_s = min_s
        self.max_s = max_s
        self._until: dict[int, float] = {}  # per queue: backing off before this time
        self._next: dict[int, float] = {}  # per queue: the next loss's back-off

    def calm(self, index: int, now: float) -> bool:
        """Whether queue ``index`` is backing off at ``now``."""
        return now < self._until.get(index, float("-inf"))

    def lost(self, index: int, now: float) -> float:
        """The gamble lost again on queue ``index``: back off from ``now``; returns for how
        long."""
        backoff = self._next.get(index, self.min_s)
        self._until[index] = now + backoff
        self._next[index] = min(2 * backoff, self.max_s)
        return backoff

    def won(self, index: int) -> None:
        """It paid on queue ``index``: the next loss backs off for ``min_s`` again."""
        self._next.pop(index, None)


__all__ = ["Backoff"]
