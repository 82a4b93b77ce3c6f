"""The soak's verdict: pure functions over samples and counters, so the bounds are testable.

A soak (``benchmarks/soak.py``) pushes millions of frames through one device process with a
fault scenario active for part of the run and samples the process as it goes.  Whether it
passed is decided here, from numbers alone, with every bound named:

* **Pool**: once the frontend is gone (and the soak's own host channel closed) the pool's
  ``in_use`` is exactly 0: every packet the device allocated came back.
* **File descriptors**: the count after the frontend left equals the count before it came
  (the connection, its memory regions and its kick/call eventfds are all closed), and during
  the run the fds are *flat*: the maximum of the last quarter of the samples exceeds the
  maximum of the first quarter by at most ``fd_slack`` (default 0; the set of fds a
  connected frontend holds does not change while traffic runs).
* **RSS** (``RssAnon``, the process's private heap; the pool and guest memory are shared
  mappings and do not count): flat in the same sense, last-quarter max minus first-quarter
  max at most ``rss_slack_kib`` (default 8 MiB).  Maxima, not means, because the allocator
  returns memory in steps and a first-quarter peak (the warm-up) is part of the baseline;
  quarters, not the first and last sample, because one sample can catch a transient burst.
  Why 8 MiB: over a 10M-frame run the two quarters are about 5M frames apart, so a leak of
  about 2 bytes per frame, or of about 250 bytes per fault event (about 33,000 drops at
  p=0.01 in the middle third), exceeds it; the fault event log's in-memory ring
  (``vdev/faults/events.py``, 4096 events, about 1.6 MB when full) stays well inside it.
* **Kills**: no queue was killed (the scenario's drops and stall are not ring violations).
* **Frames**: ``sent == received + fault_drops + other_drops``, exactly, from device counters
  (``other_drops``: every named drop that was not the fault rule's, e.g. a full host ring);
  the fault rule dropped at least one frame and the stall happened, so the faults ran; and
  where the frontend counted what it received (RX) or sent (a Linux guest's pktgen, TX),
  that equals the device's ``received`` or ``sent``.  (testpmd's own TX count is not
  compared: frames still in its ring when it is stopped were never the device's.)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

RSS_SLACK_KIB = 8 * 1024
FD_SLACK = 0
MIN_SAMPLES = 4


@dataclass(frozen=True)
class Sample:
    """One look at the device process while the frontend was connected."""

    t: float
    fds: int
    rss_anon_kib: int
    in_use: int


@dataclass
class SoakCounts:
    """What the device counted (and the frontend, where it can say)."""

    sent: int
    received: int
    fault_drops: int
    other_drops: int
    stalls: int
    kills: int
    frontend_received: int | None = None
    frontend_sent: int | None = None


@dataclass
class SoakRun:
    """Everything one row's verdict looks at."""

    samples: list[Sample]
    fds_start: int
    fds_end: int
    rss_start_kib: int
    rss_end_kib: int
    in_use_after: int
    counts: SoakCounts


@dataclass
class Verdict:
    failures: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures

    def text(self) -> str:
        return "PASS" if self.ok else "FAIL: " + "; ".join(self.failures)


def quartile_growth(values: list[int]) -> int:
    """Max of the last quarter minus max of the first quarter (at least one value each)."""
    if not values:
        raise ValueError("no samples")
    q = max(1, len(values) // 4)
    return max(values[-q:]) - max(values[:q])


def judge(run: SoakRun, *, rss_slack_kib: int = RSS_SLACK_KIB, fd_slack: int = FD_SLACK) -> Verdict:
    """Every check of the module docstring; each failure says which bound and by how much."""
    v = Verdict()
    c = run.counts
    if run.in_use_after != 0:
        v.failures.append(f"pool in_use {run.in_use_after} after the frontend left (want 0)")
    if run.fds_end != run.fds_start:
        v.failures.append(f"fds {run.fds_start} before the frontend, {run.fds_end} after")
    if len(run.samples) < MIN_SAMPLES:
        v.failures.append(f"{len(run.samples)} samples during the run (want >= {MIN_SAMPLES})")
    else:
        fd_growth = quartile_growth([s.fds for s in run.samples])
        if fd_growth > fd_slack:
            v.failures.append(f"fds grew by {fd_growth} during the run (bound {fd_slack})")
        rss_growth = quartile_growth([s.rss_anon_kib for s in run.samples])
        if rss_growth > rss_slack_kib:
            v.failures.append(
                f"RssAnon grew by {rss_growth} KiB during the run (bound {rss_slack_kib} KiB)"
            )
    if c.kills:
        v.failures.append(f"{c.kills} queue kill(s)")
    accounted = c.received + c.fault_drops + c.other_drops
    if c.sent != accounted:
        v.failures.append(
            f"sent {c.sent} != received {c.received} + fault drops {c.fault_drops}"
            f" + other drops {c.other_drops} (= {accounted})"
        )
    if c.fault_drops == 0:
        v.failures.append("the fault rule dropped nothing (did the scenario run?)")
    if c.stalls == 0:
        v.failures.append("no stall happened (did the scenario run?)")
    if c.frontend_received is not None and c.frontend_received != c.received:
        v.failures.append(
            f"the frontend counted {c.frontend_received} received, the device {c.received}"
        )
    if c.frontend_sent is not None and c.frontend_sent != c.sent:
        v.failures.append(f"the frontend counted {c.frontend_sent} sent, the device {c.sent}")
    return v


def _queue(stats: dict[str, Any], name: str) -> dict[str, Any]:
    q: dict[str, Any] = stats["nics"][0]["queues"].get(name, {})
    return q


def counts_from_stats(
    stats: dict[str, Any],
    direction: str,
    frontend_received: int | None,
    frontend_sent: int | None = None,
) -> SoakCounts:
    """The verdict's counters from the device's STATS.

    TX (sink): sent = frames taken off tx0; received = frames the host channel counted;
    other drops = tx0's non-fault drops and the host port's refusals (a full host ring).
    RX (source): sent = frames the host channel handed to the switch; received = frames
    written into the guest's RX buffers (rx0); other drops = rx0's non-fault drops (the NIC
    records every RX frame it refuses by name, inbox and backlog refusals included)."""
    kills = sum(sum(q.get("kills", {}).values()) for q in stats["nics"][0]["queues"].values())
    stalls = int(stats.get("fault_counts", {}).get("stall", 0))
    if direction == "tx":
        q = _queue(stats, "tx0")
        fault = int(q.get("drop_reasons", {}).get("fault", 0))
        other = int(q.get("drops", 0)) - fault + int(stats["switch"]["host"]["drops"])
        return SoakCounts(
            int(q.get("frames", 0)),
            int(stats["host_received"]),
            fault,
            other,
            stalls,
            kills,
            frontend_sent=frontend_sent,
        )
    q = _queue(stats, "rx0")
    fault = int(q.get("drop_reasons", {}).get("fault", 0))
    other = int(q.get("drops", 0)) - fault
    return SoakCounts(
        int(stats["host_sent"]),
        int(q.get("frames", 0)),
        fault,
        other,
        stalls,
        kills,
        frontend_received,
    )


def other_drop_reasons(stats: dict[str, Any], direction: str) -> dict[str, int]:
    """Where :func:`counts_from_stats`'s ``other_drops`` came from, by name (for the report)."""
    name = "tx0" if direction == "tx" else "rx0"
    reasons = {
        f"{name} {k}": int(n)
        for k, n in _queue(stats, name).get("drop_reasons", {}).items()
        if k != "fault" and n
    }
    if direction == "tx" and stats["switch"]["host"]["drops"]:
        reasons["host ring full"] = int(stats["switch"]["host"]["drops"])
    return reasons


__all__ = [
    "FD_SLACK",
    "MIN_SAMPLES",
    "RSS_SLACK_KIB",
    "Sample",
    "SoakCounts",
    "SoakRun",
    "Verdict",
    "counts_from_stats",
    "judge",
    "other_drop_reasons",
    "quartile_growth",
]
