"""The fault event log: every injected fault becomes one record, in three places.

1. ``EventLog.events`` (in memory, bounded) and an optional JSON-lines file, so a failing
   test can show exactly what the device did and a rerun with the same seed can be diffed
   line by line (timestamps come from the engine's clock, relative to its start);
2. counters by kind and by rule (``EventLog.counts``), folded into the engine stats;
3. a pcapng comment on the affected frame's one capture record when the device writes a
   capture (the action hands the comment to ``VirtioNet.annotate``/``record``), so the frame
   that was corrupted or dropped is visible in Wireshark next to the traffic around it.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO, Any

# Capture direction flags (pcapng epb_flags): 1 inbound = from the guest (TX queues),
# 2 outbound = to the guest (RX queues), as VirtioNet records them.
FROM_GUEST = 1
TO_GUEST = 2


@dataclass
class FaultEvent:
    """One injected fault (or a lifecycle note such as a rule being added)."""

    seq: int
    t: float
    kind: str  # action name: "drop", "corrupt", "stall", "link_down", ...
    rule: str | None = None
    nic: str | None = None
    queue: int | None = None
    detail: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"seq": self.seq, "t": round(self.t, 6), "kind": self.kind}
        if self.rule is not None:
            d["rule"] = self.rule
        if self.nic is not None:
            d["nic"] = self.nic
        if self.queue is not None:
            d["queue"] = self.queue
        if self.detail:
            d["detail"] = self.detail
        return d

    def comment(self) -> str:
        """The pcapng comment text: short, greppable with tshark's frame.comment."""
        parts = [f"vdev-fault {self.kind}"]
        if self.rule is not None:
            parts.append(f"rule={self.rule}")
        parts += [f"{k}={v}" for k, v in sorted(self.detail.items()) if k != "len"]
        return " ".join(parts)


# In-memory events kept (the newest; the JSON-lines file, when asked for, keeps every one).
# An event costs about 380 bytes, so 4096 of them are about 1.6 MB.  The bound used to be
# 100,000 (about 38 MB): a long run with a lossy rule then grew the process's heap by tens of
# MB while the ring filled, which a soak cannot tell from a leak (benchmarks/soak.py, whose
# RSS bound is 8 MiB).  Readers of the ring (the control socket's ``events``, test
# assertions) look at recent events; counts by kind and by rule are never dropped.
EVENT_LOG_KEEP = 4096


class EventLog:
    """Bounded in-memory log (a ring of ``keep`` events) plus optional JSON-lines file."""

    def __init__(
        self,
        path: str | None = None,
        *,
        clock: Callable[[], float],
        keep: int = EVENT_LOG_KEEP,
    ) -> None:
        self.path = path
        self.clock = clock
        self.t0 = clock()
        self.events: deque[FaultEvent] = deque(maxlen=keep)
        self.counts: dict[str, int] = {}
        self.by_rule: dict[str, int] = {}
        self._seq = 0
        self._file: IO[str] | None = open(path, "a", encoding="utf-8") if path else None
        self.listeners: list[Callable[[FaultEvent], None]] = []

    def emit(
        self,
        kind: str,
        *,
        rule: str | None = None,
        nic: str | None = None,
        queue: int | None = None,
        frame: bytes | None = None,
        **detail: Any,
    ) -> FaultEvent:
        """Record one fault; ``frame`` gives its length (``len`` in the detail)."""
        self._seq += 1
        if frame is not None and "len" not in detail:
            detail["len"] = len(frame)
        ev = FaultEvent(self._seq, self.clock() - self.t0, kind, rule, nic, queue, detail)
        self.events.append(ev)
        self.counts[kind] = self.counts.get(kind, 0) + 1
        if rule is not None:
            self.by_rule[rule] = self.by_rule.get(rule, 0) + 1
        if self._file is not None:
            self._file.write(json.dumps(ev.as_dict(), sort_keys=True) + "\n")
            self._file.flush()
        for listener in self.listeners:
            listener(ev)
        return ev

    def since(self, seq: int = 0, limit: int | None = None) -> list[FaultEvent]:
        out = [e for e in self.events if e.seq > seq]
        return out[:limit] if limit is not None else out

    def lines(self) -> list[str]:
        """The log as the JSON lines the file holds (what determinism tests compare)."""
        return [json.dumps(e.as_dict(), sort_keys=True) for e in self.events]

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


__all__ = ["EVENT_LOG_KEEP", "FROM_GUEST", "TO_GUEST", "EventLog", "FaultEvent"]
