"""Per-ring transfer statistics, the way channel_ring.c's kr_update_stats keeps them.

Totals are exact; the per-second rates are sampled over an accumulation interval of
``ACCUMULATE_INTERVAL`` seconds and smoothed with an exponentially weighted moving average
whose new-sample weight is 2^-``TRANSFER_DECAY`` (so a burst moves the average by a quarter
per interval instead of replacing it).  min/max slots per sync restart with every interval so
they describe recent behaviour.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

ACCUMULATE_INTERVAL = 2.0  # seconds
TRANSFER_DECAY = 2  # EWMA weight of a new sample: 2**-2


def ewma(old: int, sample: int, decay: int = TRANSFER_DECAY) -> int:
    """Integer EWMA: the first sample seeds the average, later ones move it by 2^-decay."""
    if old == 0:
        return sample
    return ((old << decay) - old + sample) >> decay


@dataclass
class RingStats:
    """Counters for one kernel ring (syncs, slots, bytes, min/max per sync, rates)."""

    syncs: int = 0
    transfers: int = 0  # syncs that moved at least one slot
    total_slots: int = 0
    total_bytes: int = 0
    min_slots: int = 0
    max_slots: int = 0
    bytes_per_second: int = 0
    slots_per_second: int = 0
    bytes_per_second_ma: int = 0
    slots_per_second_ma: int = 0
    clock: Callable[[], float] = field(default=time.monotonic, repr=False)
    _acc_start: float | None = field(default=None, repr=False)
    _acc_bytes: int = field(default=0, repr=False)
    _acc_slots: int = field(default=0, repr=False)

    def update(self, slots: int, nbytes: int) -> None:
        """Account one sync that moved ``slots`` slots carrying ``nbytes`` bytes."""
        self.syncs += 1
        if slots == 0:
            return
        self.transfers += 1
        self.total_slots += slots
        self.total_bytes += nbytes
        if slots > self.max_slots:
            self.max_slots = slots
        if self.min_slots == 0 or slots < self.min_slots:
            self.min_slots = slots
        now = self.clock()
        if self._acc_start is not None:
            elapsed = now - self._acc_start
            if elapsed >= ACCUMULATE_INTERVAL:
                bps = int(self._acc_bytes / elapsed)
                sps = int(self._acc_slots / elapsed)
                self.bytes_per_second = bps
                self.slots_per_second = sps
                self.bytes_per_second_ma = ewma(self.bytes_per_second_ma, bps)
                self.slots_per_second_ma = ewma(self.slots_per_second_ma, sps)
                self._acc_start = now
                self._acc_bytes = 0
                self._acc_slots = 0
                self.min_slots = slots
                self.max_slots = slots
        else:
            self._acc_start = now
        self._acc_bytes += nbytes
        self._acc_slots += slots
