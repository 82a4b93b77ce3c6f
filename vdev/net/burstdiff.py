"""What the differential checks of the compiled virtqueue bursts compare, in one place.

The compiled bursts (``vdev/virtio/fastqueue.py`` over ``vdev/native/virtq.c``) must leave
everything a guest, the switch or an operator can observe exactly as the Python reference
does.  Two checkers run the same ring contents through a NIC on each backend and compare
the outcome built here: the Hypothesis properties (``tests/virtio/test_fastqueue_diff.py``)
and the coverage-guided fuzzer (``fuzz/vq_burst.py``).  Keeping the list of what is
compared here means neither can silently compare less than the other.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from vdev.net.nic import VirtioNet
from vdev.skywalk.pool import Pbufpool
from vdev.virtio.packed import PackedQueue
from vdev.virtio.queue import VirtQueue

# The pool's trusted per-buffer and per-packet arrays: a burst writes them directly.
POOL_ARRAYS = (
    "b_buf", "b_large", "b_doff", "b_dlen", "b_next", "pkt_state", "pkt_owner", "pkt_len",
    "pkt_nbufs", "pkt_pflags", "pkt_l2", "pkt_cstart", "pkt_cstuff", "pkt_vnet",
)  # fmt: skip

Forwarded = list[tuple[int, bytes, bytes | None]]


@dataclass
class FakeVring:
    """What VirtioNet reads of a backend Vring (the NIC is driven without a backend)."""

    index: int
    queue: VirtQueue | None
    enabled: bool
    call_fd: int | None
    num: int = 0
    base: int = 0


def make_nic(features: int, pool: Pbufpool, forwarded: Forwarded) -> VirtioNet:
    """A NIC with ``features`` negotiated whose switch side records every forwarded packet
    (its index, bytes and vnet header) and frees it."""

    def forward(_name: str, pkts: list[int]) -> None:
        for p in pkts:
            forwarded.append((p, pool.packet_bytes(p), pool.packet_vnet(p)))
        pool.free_packets(pkts)

    nic = VirtioNet("nic0", pool, forward)
    nic.negotiated = features
    return nic


def queue_state(queue: Any) -> tuple[Any, ...]:
    """The device-private state of a split or packed queue a burst carries in and out."""
    common = (
        queue.used_idx,
        list(queue._inflight),
        None if queue.defunct is None else str(queue.defunct),
    )
    if isinstance(queue, PackedQueue):
        return (
            *common,
            queue.vhost_base,
            list(queue._pending),
            queue._scan_end,
            queue._scan_chains,
            queue._signalled,
            list(queue._ndesc),
        )
    return (
        *common,
        queue.last_avail_idx,
        queue._pending_used,
        queue._signalled_used,
        queue._signalled_valid,
    )


def outcome(
    nic: VirtioNet,
    queue: Any,
    pool: Pbufpool,
    forwarded: Forwarded,
    calls: int,
    memory: bytes,
) -> dict[str, Any]:
    """Everything observable after a run: ``memory`` (the guest's, read by the caller: used
    ring, event areas, RX buffers), kills with reasons and details, NIC and virtqueue
    counters, what was forwarded, the pool's arrays, free lists and counters, the NIC's
    backlog and the interrupts sent (``calls``)."""
    return {
        "memory": memory,
        "kills": [(i, e.reason.name, str(e)) for i, e in nic.kill_log],
        "nic": nic.stats_dict(),
        "queue": asdict(queue.stats),
        "queue_state": queue_state(queue),
        "forwarded": forwarded,
        "pool_arrays": {name: bytes(getattr(pool, name)) for name in POOL_ARRAYS},
        "free": (list(pool._free_pkts), list(pool._free_ext), list(pool._free_large)),
        "pool_stats": pool.stats_dict(),
        "backlog": list(nic.backlog),
        "calls": calls,
    }


def first_difference(py: dict[str, Any], c: dict[str, Any]) -> str | None:
    """The first key whose values differ between the reference's outcome and the compiled
    one (for guest memory, with the first differing offset), or None."""
    for key in py:
        if py[key] == c.get(key):
            continue
        if key == "memory":
            a, b = py[key], c[key]
            at = next((i for i in range(min(len(a), len(b))) if a[i] != b[i]), min(len(a), len(b)))
            return f"guest memory differs at offset {at:#x}"
        return f"{key}: reference {py[key]!r} != compiled {c.get(key)!r}"
    return None


def assert_same(py: dict[str, Any], c: dict[str, Any]) -> None:
    """AssertionError naming the first difference (see :func:`first_difference`)."""
    diff = first_difference(py, c)
    assert diff is None, diff


__all__ = [
    "POOL_ARRAYS",
    "FakeVring",
    "Forwarded",
    "assert_same",
    "first_difference",
    "make_nic",
    "outcome",
    "queue_state",
]
