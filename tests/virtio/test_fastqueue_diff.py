"""Differential tests: the compiled virtqueue bursts against the Python reference.

Hypothesis builds split-ring contents, legal chains from the mock driver and then hostile
rewrites of descriptor fields, avail entries, the avail idx and indirect tables, plus pool
pressure; the same contents go once through the NIC with ``fastqueue`` on the Python backend
and once on the C backend (with ``STRICT``, so a C violation the reference accepts fails).
Everything observable must be identical: the whole guest memory afterwards (used ring,
avail_event, RX buffers), kill reasons and details, NIC and virtqueue counters, the frames
and vnet headers forwarded, the pool's trusted arrays, free lists and counters, and the
notifications sent.  The oracle is the reference itself, run on the same input.
"""

from __future__ import annotations

import contextlib
import os
import random
import struct
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from virtio_helpers import (
    DATA_HIGH,
    DATA_LOW,
    FD_SIZE,
    HIGH_GPA,
    INDIRECT_BASE,
    LOW_SIZE,
    MEM_END,
    RING_BASE,
    RING_SLOT,
    gpa_to_uva,
    layout,
    make_memory,
    make_pair,
)

from vdev.abi import lib
from vdev.faults.engine import FaultEngine, ManualClock
from vdev.net.burstdiff import FakeVring, assert_same, make_nic, outcome
from vdev.net.nic import VirtioNet, net_queue_direction
from vdev.skywalk import Pbufpool
from vdev.virtio import fastqueue
from vdev.virtio.driver import DriverError, DriverQueue
from vdev.virtio.packed import PackedQueue
from vdev.virtio.packed_driver import PackedDriverQueue

pytestmark = pytest.mark.skipif(not fastqueue.load(), reason="no C compiler: no compiled path")

MEM, FD = make_memory()
SETTINGS = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
B = lib
F_V1 = 1 << B.VIRTIO_F_VERSION_1
F_EVENT = 1 << B.VIRTIO_RING_F_EVENT_IDX
F_INDIRECT = 1 << B.VIRTIO_RING_F_INDIRECT_DESC
F_NOE = 1 << B.VIRTIO_F_NOTIFY_ON_EMPTY
F_MRG = 1 << B.VIRTIO_NET_F_MRG_RXBUF
F_GCSUM = 1 << B.VIRTIO_NET_F_GUEST_CSUM
features_st = st.lists(
    st.sampled_from([F_V1, F_EVENT, F_INDIRECT, F_NOE, F_MRG, F_GCSUM]), unique=True
).map(sum)


@pytest.fixture(autouse=True)
def _backend() -> Iterator[None]:
    old, strict = fastqueue.BACKEND, fastqueue.STRICT
    yield
    fastqueue.set_backend(old)
    fastqueue.STRICT = strict


def _pool() -> Pbufpool:
    # Small buffers, 4 frags and 2 large buffers: multi-buflet, large and exhausted pools.
    return Pbufpool(
        num_packets=24, buf_size=128, max_frags=4, num_large_bufs=2, large_buf_size=1024
    )


def _snapshot() -> bytes:
    return os.pread(FD, FD_SIZE, 0)


def _restore(data: bytes) -> None:
    os.pwrite(FD, data, 0)


# -- ring contents ------------------------------------------------------------------------

TABLE = INDIRECT_BASE + 0x70000
addr_st = st.one_of(
    st.sampled_from(
        [
            DATA_LOW,
            DATA_HIGH,
            TABLE,
            LOW_SIZE - 8,
            LOW_SIZE,
            HIGH_GPA,
            MEM_END - 16,
            MEM_END,
            (1 << 64) - 16,
        ]
    ),
    st.integers(0, (1 << 64) - 1),
)
len_st = st.one_of(
    st.sampled_from([0, 1, 10, 12, 16, 26, 64, 0x10000, 0xFFFFFFFF]), st.integers(0, 4096)
)
# (target, index, value): one hostile store into the ring or an indirect table.
mutation_st = st.one_of(
    st.tuples(st.just("addr"), st.integers(0, 15), addr_st),
    st.tuples(st.just("len"), st.integers(0, 15), len_st),
    st.tuples(
        st.just("flags"),
        st.integers(0, 15),
        st.one_of(st.integers(0, 7), st.sampled_from([0x80, 0x81, 0x83, 0x84, 0x8000, 0x8080])),
    ),
    st.tuples(st.just("next"), st.integers(0, 15), st.integers(0, 20)),
    st.tuples(st.just("avail"), st.integers(0, 15), st.integers(0, 20)),
    st.tuples(st.just("avail_idx"), st.just(0), st.integers(0, 0xFFFF)),
    # the avail idx moved by delta relative to the queue size: exactly full, one past it, ...
    st.tuples(st.just("avail_idx_rel"), st.just(0), st.sampled_from([-1, 0, 1, 0x8000, 0xFFFF])),
    st.tuples(
        st.just("table"),
        st.integers(0, 7),
        st.tuples(addr_st, len_st, st.integers(0, 7), st.integers(0, 9)),
    ),
    st.tuples(st.just("used_event"), st.just(0), st.integers(0, 0xFFFF)),
    st.tuples(st.just("no_interrupt"), st.just(0), st.booleans()),
    # desc i continues at desc j (NEXT set): loops, long chains and revisits
    st.tuples(st.just("link"), st.integers(0, 15), st.integers(0, 15)),
    # desc i points at an indirect table of n chained entries (some looping back)
    st.tuples(
        st.just("chain_table"),
        st.integers(0, 15),
        st.tuples(st.integers(0, 40), st.integers(0, 40)),  # 0 entries: a zero-length table
    ),
    # desc i points at a legal table of n entries at TABLE + off: any byte offset (the spec
    # aligns the rings, not indirect tables; virtq.c once read them misaligned)
    st.tuples(
        st.just("table_at"), st.integers(0, 15), st.tuples(st.integers(1, 6), st.integers(0, 15))
    ),
    # the chain at avail slot i loops: its head continues at itself (split; packed: NEXT)
    st.tuples(st.just("loop"), st.integers(0, 15), st.just(0)),
    # avail slot / packed descriptor i names the same buffer as i - 1 (still in flight)
    st.tuples(st.just("dup"), st.integers(1, 15), st.just(0)),
)
# A TX chain: frame length, buffer split sizes, indirect, vnet header (flags, start, offset),
# and whether the frame's bytes sum to 0xFFFF from csum_start (the computed checksum is 0:
# the UDP all-ones rule).
tx_chain_st = st.tuples(
    st.one_of(
        st.integers(0, 80), st.sampled_from([127, 128, 129, 511, 512, 513, 1500, 3000, 4100])
    ),
    st.lists(st.integers(1, 200), min_size=0, max_size=3),
    st.booleans(),
    st.tuples(
        st.sampled_from([0, 0, 1, 3]),
        st.integers(0, 80),
        st.one_of(st.sampled_from([6, 16]), st.integers(0, 40)),  # UDP, TCP or any
    ),
    st.booleans(),
)
rx_chain_st = st.tuples(st.lists(st.integers(0, 300), min_size=1, max_size=3), st.booleans())
packet_st = st.tuples(
    st.one_of(st.integers(14, 100), st.sampled_from([128, 300, 1500, 3000])),
    st.sampled_from([None, (0, 0), (1, 0), (0, 1), (1, 3)]),  # vnet (flags, gso) or none
)


def _packed_pair(
    index: int, size: int, features: int
) -> tuple[PackedQueue, PackedDriverQueue, tuple[int, int, int]]:
    """A packed ring in the queue's ring slot, driver and device side (fresh: base None)."""
    base = RING_BASE + index * RING_SLOT
    areas = (base, base + 16 * size, base + 16 * size + 4)
    drv = PackedDriverQueue(
        MEM, size, *areas, features=features, indirect_area=(INDIRECT_BASE + index * 0x8000, 0x8000)
    )
    dev = PackedQueue(
        MEM,
        index,
        size,
        *(gpa_to_uva(a) for a in areas),
        features=features,
        sync=net_queue_direction(index),
    )
    return dev, drv, areas


def _mutate_packed(
    areas: tuple[int, int, int], size: int, mutations: list[Any], rx: bool = False
) -> None:
    """The hostile stores of :func:`_mutate` on a packed ring (2.8.13 descriptor layout:
    addr, len, id, flags; the driver event suppression area for the split ring's avail
    idx / used_event / flags)."""
    ring, drv_ev, _ = areas
    for kind, i, value in mutations:
        i %= size
        d = ring + 16 * i
        if kind == "addr":
            MEM.write(d, struct.pack("<Q", value))
        elif kind == "len":
            MEM.write(d + 8, struct.pack("<I", value))
        elif kind == "flags":
            MEM.write(d + 14, struct.pack("<H", value))
        elif kind in ("next", "avail"):
            MEM.write(d + 12, struct.pack("<H", value))  # the buffer id
        elif kind in ("avail_idx", "used_event", "avail_idx_rel"):
            MEM.write(drv_ev, struct.pack("<H", value & 0xFFFF))
        elif kind == "no_interrupt":
            MEM.write(drv_ev + 2, struct.pack("<H", 1 if value else 2))
        elif kind == "table":
            addr, ln, fl, nx = value
            MEM.write(TABLE + 16 * i, struct.pack("<QIHH", addr, ln, nx, fl))
        elif kind in ("link", "loop"):
            flags = struct.unpack_from("<H", MEM.read(d + 14, 2))[0]
            MEM.write(d + 14, struct.pack("<H", flags | B.VRING_DESC_F_NEXT))
        elif kind == "dup":
            MEM.write(d + 12, MEM.read(ring + 16 * ((i - 1) % size) + 12, 2))
        elif kind == "table_at":
            n, off = value
            fl = B.VRING_DESC_F_WRITE if rx else 0
            for k in range(n):
                entry = struct.pack("<QIHH", DATA_LOW + 64 * k, 30, k, fl)
                MEM.write(TABLE + off + 16 * k, entry)
            flags = struct.unpack_from("<H", MEM.read(d + 14, 2))[0] & 0x8080
            MEM.write(d, struct.pack("<QI", TABLE + off, 16 * n))
            MEM.write(d + 14, struct.pack("<H", flags | B.VRING_DESC_F_INDIRECT))
        elif kind == "chain_table":
            n, back = value
            for k in range(n):
                fl = B.VRING_DESC_F_INDIRECT if back == k else 0
                MEM.write(TABLE + 16 * k, struct.pack("<QIHH", DATA_LOW + 64 * k, 30, 0, fl))
            flags = struct.unpack_from("<H", MEM.read(d + 14, 2))[0] & 0x8080
            MEM.write(d, struct.pack("<QI", TABLE, 16 * n))
            MEM.write(d + 14, struct.pack("<H", flags | B.VRING_DESC_F_INDIRECT))


def _mutate(queue_index: int, size: int, mutations: list[Any]) -> None:
    lay = layout(queue_index, size)
    rx = queue_index == 0  # a receiveq: the device writes, so a legal table is writable
    for kind, i, value in mutations:
        i %= size
        d = lay.desc + 16 * i
        if kind == "addr":
            MEM.write(d, struct.pack("<Q", value))
        elif kind == "len":
            MEM.write(d + 8, struct.pack("<I", value))
        elif kind == "flags":
            MEM.write(d + 12, struct.pack("<H", value))
        elif kind == "next":
            MEM.write(d + 14, struct.pack("<H", value))
        elif kind == "avail":
            MEM.write(lay.avail + 4 + 2 * i, struct.pack("<H", value))
        elif kind == "avail_idx":
            MEM.write(lay.avail + 2, struct.pack("<H", value))
        elif kind == "avail_idx_rel":
            used = struct.unpack_from("<H", MEM.read(lay.used + 2, 2))[0]
            MEM.write(lay.avail + 2, struct.pack("<H", (used + size + value) & 0xFFFF))
        elif kind == "table":
            addr, ln, fl, nx = value
            MEM.write(TABLE + 16 * i, struct.pack("<QIHH", addr, ln, fl, nx))
        elif kind == "used_event":
            MEM.write(lay.avail + 4 + 2 * size, struct.pack("<H", value))
        elif kind == "no_interrupt":
            MEM.write(lay.avail, struct.pack("<H", int(value)))
        elif kind == "link":
            flags = struct.unpack_from("<H", MEM.read(d + 12, 2))[0]
            MEM.write(d + 12, struct.pack("<HH", flags | B.VRING_DESC_F_NEXT, value % size))
        elif kind == "loop":
            head = struct.unpack_from("<H", MEM.read(lay.avail + 4 + 2 * i, 2))[0] % size
            h = lay.desc + 16 * head
            flags = struct.unpack_from("<H", MEM.read(h + 12, 2))[0]
            MEM.write(h + 12, struct.pack("<HH", flags | B.VRING_DESC_F_NEXT, head))
        elif kind == "dup":
            prev = lay.avail + 4 + 2 * ((i - 1) % size)
            MEM.write(lay.avail + 4 + 2 * i, MEM.read(prev, 2))
        elif kind == "table_at":
            n, off = value
            for k in range(n):
                fl = (0 if k + 1 == n else B.VRING_DESC_F_NEXT) | (
                    B.VRING_DESC_F_WRITE if rx else 0
                )
                entry = struct.pack("<QIHH", DATA_LOW + 64 * k, 30, fl, k + 1)
                MEM.write(TABLE + off + 16 * k, entry)
            MEM.write(d, struct.pack("<QIHH", TABLE + off, 16 * n, B.VRING_DESC_F_INDIRECT, 0))
        elif kind == "chain_table":
            n, back = value
            for k in range(n):
                last = k + 1 == n
                nxt = (back % n) if last and back < n else k + 1
                fl = 0 if last and back >= n else B.VRING_DESC_F_NEXT
                MEM.write(TABLE + 16 * k, struct.pack("<QIHH", DATA_LOW + 64 * k, 30, fl, nxt))
            MEM.write(d, struct.pack("<QIHH", TABLE, 16 * n, B.VRING_DESC_F_INDIRECT, 0))


def _segments(total: int, splits: list[int], rnd: random.Random) -> list[tuple[int, int]]:
    """``total`` bytes cut at ``splits`` into buffers spread over both regions."""
    out, left, k = [], total, 0
    for s in splits:
        if left <= s:
            break
        out.append(s)
        left -= s
    out.append(left)
    segs = []
    for n in out:
        base = DATA_LOW if k % 2 else DATA_HIGH
        segs.append((base + rnd.randrange(0, 0x8000) // 16 * 16, n))
        k += 1
    return segs


def _reclaim(drv: DriverQueue | PackedDriverQueue) -> None:
    """The driver takes its used buffers back (after hostile stores it may refuse some: the
    same way on both paths, as the used ring is compared anyway)."""
    try:
        drv.get_used()
    except (DriverError, RuntimeError):
        pass


def _kick_wanted(drv: DriverQueue | PackedDriverQueue) -> bool:
    """Whether the driver, posting one more chain now, must kick: its own reading of the
    device's suppression state (2.7.10 / 2.8.10), independent of the device code."""
    _reclaim(drv)
    drv.kick_needed()  # the decision for what was posted before: not the one asked here
    drv.add_chain([(DATA_LOW, 60)], [])
    drv.publish()
    return drv.kick_needed()


def _ids_free(drv: DriverQueue | PackedDriverQueue) -> bool:
    return not isinstance(drv, PackedDriverQueue) or bool(drv._free_ids)


def _instrument(
    nic: VirtioNet, rules: list[dict[str, Any]] | None, tap: bool
) -> tuple[FaultEngine | None, list[Any]]:
    """A seeded fault engine with ``rules`` on the NIC, and a capture tap recording every
    frame's one record (frame, direction, notes)."""
    captured: list[Any] = []
    if tap:
        nic.tap = lambda _nic, frame, direction, notes: captured.append(
            (bytes(frame), direction, list(notes))
        )
    if not rules:
        return None, captured
    engine = FaultEngine(seed=7, clock=ManualClock(100.0))
    nf = engine.nic(nic)
    for spec in rules:
        nf.add(spec)
    return engine, captured


def _run_tx(
    backend: str,
    packed: bool,
    start: bytes,
    size: int,
    features: int,
    base: int,
    hold: int,
    rounds: list[tuple[list[Any], list[Any]]],
    seed: int,
    rules: list[dict[str, Any]] | None = None,
    tap: bool = False,
    unlocked: bool = False,
    hold_kick: bool = False,
    probe_kick: bool = False,
) -> dict[str, Any]:
    """``probe_kick``: after the outcome is taken, post one more chain and record whether
    the driver would kick for it (``kick_wanted``).  ``hold_kick``: the queue held by the
    kick mitigation (vdev/net/kickhold.py) for the whole run: kick switched off, and an
    emptied ring left without re-arming."""
    fastqueue.set_backend(backend)
    fastqueue.STRICT = True
    _restore(start)
    pool = _pool()
    held = pool.alloc_packets(hold)
    forwarded: list[Any] = []
    nic = make_nic(features, pool, forwarded)
    if unlocked:  # bursts as a datapath thread runs them: free-list tops reserved first
        nic.burst_unlocked = contextlib.nullcontext
    engine, captured = _instrument(nic, rules, tap)
    queue: Any
    drv: Any
    if packed:
        queue, drv, areas = _packed_pair(1, size, features)
    else:
        queue, drv = make_pair(MEM, 1, size, features=features, start_idx=base)
    efd = os.eventfd(0, os.EFD_NONBLOCK)
    nic.vrings[1] = FakeVring(1, queue, True, efd)  # type: ignore[assignment]
    if hold_kick:
        queue.enable_notifications(False)
        queue.hold_kick = True
    rnd = random.Random(seed)
    hlen = nic.hdr_len
    try:
        for chains, mutations in rounds:
            _reclaim(drv)
            for flen, splits, indirect, (vflags, cstart, coff), zero_sum in chains:
                hdr = struct.pack("<BBHHHHH", vflags, 0, 0, 0, cstart, coff, 0)[:hlen]
                if zero_sum and cstart + 2 <= flen:
                    frame = bytes(rnd.randrange(256) for _ in range(cstart)) + b"\xff\xff"
                    frame += bytes(flen - cstart - 2)
                else:
                    frame = bytes(rnd.randrange(256) for _ in range(flen))
                data = hdr + frame
                segs = _segments(len(data), splits, rnd)
                ind = indirect and bool(features & F_INDIRECT) and len(segs) <= size
                if drv.num_free < (1 if ind else len(segs)) or not _ids_free(drv):
                    break
                pos = 0
                for gpa, n in segs:
                    MEM.write(gpa, data[pos : pos + n])
                    pos += n
                drv.add_chain(segs, [], indirect=ind)
            drv.publish()
            if packed:
                _mutate_packed(areas, size, mutations)
            else:
                _mutate(1, size, mutations)
            nic.process_tx(1)
        calls = 0
        try:
            calls = os.eventfd_read(efd)
        except BlockingIOError:
            pass
        if engine is not None:
            engine.clock.advance(5.0)  # release what delay rules hold  # type: ignore[attr-defined]
            nic.drain_rx()
        out = outcome(nic, queue, pool, forwarded, calls, _snapshot())
        out["log"] = engine.log.lines() if engine is not None else []
        out["captured"] = captured
        if probe_kick:
            out["kick_wanted"] = _kick_wanted(drv)
        return out
    finally:
        os.close(efd)
        if queue.defunct is None:
            queue.close()
        drv.close()
        if engine is not None:
            engine.clear()
        pool.free_packets(held)
        pool.close()


def _run_rx(
    backend: str,
    packed: bool,
    start: bytes,
    size: int,
    features: int,
    base: int,
    rounds: list[tuple[list[Any], list[Any], list[Any]]],
    seed: int,
    rules: list[dict[str, Any]] | None = None,
    tap: bool = False,
    kick_ahead: int = 0,
) -> dict[str, Any]:
    """``kick_ahead``: the RX kick batching of vdev/net/rxbatch.py for the whole run (the
    refill kick asked for after min(kick_ahead, frames waiting) buffers)."""
    fastqueue.set_backend(backend)
    fastqueue.STRICT = True
    _restore(start)
    pool = _pool()
    forwarded: list[Any] = []
    nic = make_nic(features, pool, forwarded)
    engine, captured = _instrument(nic, rules, tap)
    queue: Any
    drv: Any
    if packed:
        queue, drv, areas = _packed_pair(0, size, features)
    else:
        queue, drv = make_pair(MEM, 0, size, features=features, start_idx=base)
    queue.kick_ahead = kick_ahead
    efd = os.eventfd(0, os.EFD_NONBLOCK)
    nic.vrings[0] = FakeVring(0, queue, True, efd)  # type: ignore[assignment]
    rnd = random.Random(seed)
    try:
        for buffers, packets, mutations in rounds:
            _reclaim(drv)
            for lens, indirect in buffers:
                segs = _segments(sum(lens), lens[:-1], rnd)
                ind = indirect and bool(features & F_INDIRECT) and len(segs) <= size
                if drv.num_free < (1 if ind else len(segs)) or not _ids_free(drv):
                    break
                drv.add_chain([], segs, indirect=ind)
            drv.publish()
            if packed:
                _mutate_packed(areas, size, mutations, rx=True)
            else:
                _mutate(0, size, mutations)
            pkts = []
            for flen, vnet in packets:
                frame = bytes(rnd.randrange(256) for _ in range(flen))
                hdr = None
                if vnet is not None:
                    hdr = struct.pack("<BBHHHHH", vnet[0], vnet[1], 0, 0, 14, 6, 0)
                p = pool.packet_from_bytes(frame, hdr)
                if p is not None:
                    pkts.append(p)
            nic.deliver(pkts)
            nic.drain_rx()
        calls = 0
        try:
            calls = os.eventfd_read(efd)
        except BlockingIOError:
            pass
        if engine is not None:
            engine.clock.advance(5.0)  # release what delay rules hold  # type: ignore[attr-defined]
            nic.drain_rx()
        out = outcome(nic, queue, pool, forwarded, calls, _snapshot())
        out["log"] = engine.log.lines() if engine is not None else []
        out["captured"] = captured
        return out
    finally:
        os.close(efd)
        pool.free_packets(list(nic.backlog))
        nic.backlog.clear()
        if engine is not None:
            engine.clear()
        if queue.defunct is None:
            queue.close()
        drv.close()
        pool.close()


# The fixed cases come before the properties: ``pytest -x`` (tools/mutate.py) stops at the
# first failure, so a mutant they catch costs seconds, not a property run.

# -- faults and capture stay exact (issue 11 item 3) -----------------------------------------

RULE_SETS = {
    # packet rules: the hooks see the packets after the loop, on both paths
    "packet": [
        {"action": "drop", "queue": "both", "p": 0.2},
        {"action": "corrupt", "queue": "rx", "p": 0.3, "flips": 2},
        {"action": "duplicate", "queue": "tx", "p": 0.2},
        {"action": "delay", "queue": "tx", "p": 0.3, "ms": 3},
    ],
    # interrupt rules: compiled bursts, the notification decision through the rules
    "calls": [
        {"action": "suppress_irq", "queue": "both", "p": 0.5},
        {"action": "spurious_irq", "queue": "both", "p": 0.3},
    ],
    # used-element rules: the whole batch takes the reference path
    "used": [
        {"action": "bad_used_len", "queue": "both", "p": 0.3},
        {"action": "double_complete", "queue": "rx", "p": 0.2},
        {"action": "bad_used_id", "queue": "tx", "p": 0.2},
    ],
}


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
@pytest.mark.parametrize("rules", sorted(RULE_SETS))
def test_faults_and_capture_same_on_both_paths(packed: bool, rules: str) -> None:
    """Same seed, same traffic: the same frames, counters, capture records and fault event
    log whichever path ran, with rules active and capture on."""
    start = _snapshot()
    features = F_V1 | F_EVENT | F_INDIRECT | F_MRG
    size = 7 if packed else 8
    tx_round = ([(60 + 7 * i, [], i % 3 == 0, (i % 2, 14, 16), False) for i in range(6)], [])
    rx_round = (
        [([200], False), ([100, 100], True)] * 3,
        [(60 + 11 * i, (0, 0) if i % 2 else None) for i in range(6)],
        [],
    )
    spec = RULE_SETS[rules]
    for run in (_run_tx, _run_rx):
        rounds: list[Any] = [tx_round] * 3 if run is _run_tx else [rx_round] * 3
        args = (start, size, features, 0)
        extra = (0,) if run is _run_tx else ()
        fastqueue.COUNTS.clear()
        py = run("python", packed, *args, *extra, rounds, 3, rules=spec, tap=True)  # type: ignore[operator]
        c = run("c", packed, *args, *extra, rounds, 3, rules=spec, tap=True)  # type: ignore[operator]
        assert_same(py, c)
        assert py["log"], "the rules never fired: nothing compared"
        assert py["captured"]
        if rules != "used":
            assert fastqueue.COUNTS.get("tx_chains", 0) + fastqueue.COUNTS.get("rx_frames", 0)


@pytest.mark.parametrize(
    ("kind", "value"),
    [
        ("loop", 0),
        ("dup", 0),
        ("chain_table", (5, 2)),
        ("chain_table", (0, 0)),
        ("avail_idx_rel", 1),
    ],
    ids=["loop", "dup", "table-loop", "table-empty", "avail-idx-past-size"],
)
def test_hostile_heads_named_cases(kind: str, value: Any) -> None:
    """Fixed examples of the hostile shapes the properties draw at random: a head looping to
    itself (a loop, not a long chain), a buffer named twice while in flight, an indirect
    table looping back, a zero-length indirect table, an avail idx one past the queue size
    (HEAD_OOB); on both paths, TX and RX."""
    start = _snapshot()
    mutation = [(kind, 1, value)]
    features = F_V1 | F_EVENT | F_INDIRECT | F_MRG
    tx = [([(60, [], False, (0, 0, 0), False)] * 3, mutation)]
    py = _run_tx("python", False, start, 8, features, 0, 0, tx, 1)
    c = _run_tx("c", False, start, 8, features, 0, 0, tx, 1)
    assert_same(py, c)
    # a TX chain is used at once, so naming it again is legal there
    assert bool(py["kills"]) == (kind != "dup"), py["kills"]
    rx = [([([100], False)] * 3, [(150, None)], mutation)]
    py = _run_rx("python", False, start, 8, features, 0, rx, 1)
    c = _run_rx("c", False, start, 8, features, 0, rx, 1)
    assert_same(py, c)
    assert py["kills"]


@pytest.mark.parametrize(
    ("mutations", "tx_kills", "rx_kills"),
    [
        # the last posted chain continues into a free entry (RX counts it as incomplete)
        ([("link", 2, 0)], True, False),
        ([("dup", 1, 0)], False, True),  # chain 1 names chain 0's id: in flight only on RX
        ([("chain_table", 1, (3, 1))], True, True),  # INDIRECT inside the indirect table
        ([("link", 0, 0), ("chain_table", 1, (2, 9))], True, True),  # INDIRECT after direct
    ],
    ids=["not-available", "id-in-flight", "table-nested", "indirect-after-direct"],
)
def test_hostile_packed_named_cases(mutations: list[Any], tx_kills: bool, rx_kills: bool) -> None:
    """Fixed hostile packed-ring cases (2.8.6, 2.8.7), the same on both paths, TX and RX."""
    start = _snapshot()
    features = F_V1 | F_EVENT | F_INDIRECT | F_MRG
    tx = [([(60, [], False, (0, 0, 0), False)] * 3, mutations)]
    py = _run_tx("python", True, start, 7, features, 0, 0, tx, 1)
    c = _run_tx("c", True, start, 7, features, 0, 0, tx, 1)
    assert_same(py, c)
    assert bool(py["kills"]) == tx_kills, py["kills"]
    rx = [([([100], False)] * 3, [(150, None)], mutations)]
    py = _run_rx("python", True, start, 7, features, 0, rx, 1)
    c = _run_rx("c", True, start, 7, features, 0, rx, 1)
    assert_same(py, c)
    assert bool(py["kills"]) == rx_kills, py["kills"]


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
@pytest.mark.parametrize("features", [F_V1, F_V1 | F_EVENT], ids=["flags", "event-idx"])
def test_legal_rings_rearm_the_same(packed: bool, features: int) -> None:
    """Legal traffic to an empty ring: the kick is re-armed (used flags / avail_event /
    device event area) and the guest notified exactly as the reference does."""
    start = _snapshot()
    size = 7 if packed else 8
    tx = [([(60 + i, [], False, (0, 0, 0), False) for i in range(4)], [])] * 2
    py = _run_tx("python", packed, start, size, features, 0, 0, tx, 1)
    c = _run_tx("c", packed, start, size, features, 0, 0, tx, 1)
    assert_same(py, c)
    assert not py["kills"] and py["calls"]


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
@pytest.mark.parametrize("features", [F_V1, F_V1 | F_EVENT], ids=["flags", "event-idx"])
@pytest.mark.parametrize("hold", [False, True], ids=["armed", "held"])
def test_held_ring_is_left_without_a_kick_asked_for(
    packed: bool, features: int, hold: bool
) -> None:
    """Kick mitigation (vdev/net/kickhold.py): a held TX queue drained to empty is not
    re-armed, on either path, and the driver (its own reading of the used flags,
    ``avail_event`` or the device event area) then posts without kicking; the same ring
    not held asks for the kick again.  Chains are all taken and completed either way."""
    start = _snapshot()
    size = 7 if packed else 8
    tx = [([(60 + i, [], False, (0, 0, 0), False) for i in range(4)], [])] * 2
    args = ("python", packed, start, size, features, 0, 0, tx, 1)
    py = _run_tx(*args, hold_kick=hold, probe_kick=True)
    c = _run_tx("c", *args[1:], hold_kick=hold, probe_kick=True)
    assert_same(py, c)
    assert not py["kills"] and len(py["forwarded"]) == 8
    assert py["kick_wanted"] is (not hold)


# -- the properties -----------------------------------------------------------------------


@SETTINGS
@given(
    packed=st.booleans(),
    size=st.sampled_from([2, 4, 8, 16]),
    features=features_st,
    base=st.one_of(st.just(0), st.integers(0xFFF0, 0xFFFF), st.integers(0, 0xFFFF)),
    hold=st.sampled_from([0, 0, 10, 22, 24]),
    rounds=st.lists(
        st.tuples(
            st.lists(tx_chain_st, max_size=10),
            st.one_of(st.just([]), st.lists(mutation_st, max_size=4)),
        ),
        min_size=1,
        max_size=3,
    ),
    seed=st.integers(0, 2**32),
    unlocked=st.booleans(),
    hold_kick=st.booleans(),
)
def test_tx_burst_matches_reference(
    packed: bool,
    size: int,
    features: int,
    base: int,
    hold: int,
    rounds: list[Any],
    seed: int,
    unlocked: bool,
    hold_kick: bool,
) -> None:
    """Pool free lists popped in place (a burst under the pool's lock) or their tops reserved
    first (``unlocked``: a datapath thread's burst), the kick held or not: the same result
    as the reference."""
    start = _snapshot()
    if packed:
        size, features = size - 1 or 1, features | F_V1  # any size; packed implies VERSION_1
    args = (packed, start, size, features, base, hold, rounds, seed)
    py = _run_tx("python", *args, hold_kick=hold_kick)
    c = _run_tx("c", *args, unlocked=unlocked, hold_kick=hold_kick)
    assert_same(py, c)


@SETTINGS
@given(
    packed=st.booleans(),
    size=st.sampled_from([2, 4, 8, 16]),
    features=features_st,
    base=st.one_of(st.just(0), st.integers(0xFFF0, 0xFFFF), st.integers(0, 0xFFFF)),
    rounds=st.lists(
        st.tuples(
            st.lists(rx_chain_st, max_size=10),
            st.lists(packet_st, max_size=10),
            st.one_of(st.just([]), st.lists(mutation_st, max_size=4)),
        ),
        min_size=1,
        max_size=3,
    ),
    seed=st.integers(0, 2**32),
    kick_ahead=st.sampled_from([0, 0, 2, 3, 7, 64]),
)
def test_rx_burst_matches_reference(
    packed: bool,
    size: int,
    features: int,
    base: int,
    rounds: list[Any],
    seed: int,
    kick_ahead: int,
) -> None:
    """Also with RX kick batching (``kick_ahead``): both paths re-arm a ring out of room
    with the same ``avail_event`` / packed ``off_wrap`` (the guest memory compared)."""
    start = _snapshot()
    if packed:
        size, features = size - 1 or 1, features | F_V1
    args = (packed, start, size, features, base, rounds, seed)
    py = _run_rx("python", *args, kick_ahead=kick_ahead)
    c = _run_rx("c", *args, kick_ahead=kick_ahead)
    assert_same(py, c)


def test_compiled_path_runs_in_these_tests() -> None:
    """The properties above compare something only if the C bursts actually complete items
    (not just hand everything to the reference): a legal TX and RX run counts them."""
    fastqueue.COUNTS.clear()
    start = _snapshot()
    chains = [(60, [], False, (1, 14, 16), False), (300, [20, 50], True, (0, 0, 0), False)] * 3
    out = _run_tx("c", False, start, 8, F_V1 | F_EVENT | F_INDIRECT, 0, 0, [(chains, [])], 1)
    assert not out["kills"]
    assert fastqueue.COUNTS.get("tx_chains", 0) == 6
    bufs = [([100, 100], False), ([2000], True)] * 3
    pkts = [(60, None), (300, (0, 0))] * 3  # 300 B: a 3-buflet packet
    out = _run_rx(
        "c", False, start, 16, F_V1 | F_EVENT | F_INDIRECT | F_MRG, 0, [(bufs, pkts, [])], 2
    )
    assert not out["kills"]
    assert fastqueue.COUNTS.get("rx_frames", 0) == 6


@pytest.mark.parametrize("reserve", [1, 64], ids=["short-reservation", "default-reservation"])
def test_tx_buffer_reservation_changes_cost_never_results(
    monkeypatch: pytest.MonkeyPatch, reserve: int
) -> None:
    """A TX burst outside the pool's lock (a datapath thread's) reserves only as many
    external and large buffers as recent bursts used (``fastqueue.RESERVE_MIN`` at first).
    Multi-buflet and large-buffer chains beyond that stop the burst ("pool", SLOW): the
    reference takes that chain and the next burst gets the worst case.  The used ring, pool
    and counters are the reference's either way; only with the short reservation do the
    bursts stop for it.  A burst under the lock pops the lists in place and never stops
    for it."""
    monkeypatch.setattr(fastqueue, "RESERVE_MIN", reserve)
    start = _snapshot()
    # 400 B: 4 buflets of 128 B (3 external); 900 B: more than max_frags, a large buffer
    rounds: list[Any] = [
        ([(400, [], False, (0, 0, 0), False)] * 6, []),
        ([(900, [], False, (0, 0, 0), False)] * 2, []),
    ]
    features = F_V1 | F_EVENT
    py = _run_tx("python", False, start, 16, features, 0, 0, rounds, 3)
    fastqueue.COUNTS.clear()
    c = _run_tx("c", False, start, 16, features, 0, 0, rounds, 3, unlocked=True)
    assert_same(py, c)
    assert not py["kills"] and len(py["forwarded"]) == 8
    slow = fastqueue.COUNTS.get(f"tx_stop_{fastqueue.C.SLOW}", 0)
    assert fastqueue.COUNTS.get("tx_chains", 0) + slow == 8  # the reference took `slow`
    # short: one stop per round (external, then large buffers), then the worst case
    assert slow == (2 if reserve == 1 else 0), fastqueue.COUNTS
    fastqueue.COUNTS.clear()
    locked = _run_tx("c", False, start, 16, features, 0, 0, rounds, 3)
    assert_same(py, locked)
    assert fastqueue.COUNTS.get("tx_chains", 0) == 8, fastqueue.COUNTS


def test_region_map_follows_the_memory_table() -> None:
    """The compiled bursts' cached ``struct vq_region[]`` is rebuilt whenever the table
    changes (a region added, removed, or the memory closed), so a burst never reads
    through an address of a mapping that is gone; the oracle is each mapping's own
    address, read through a fresh buffer export."""
    from vdev.virtio.memory import GuestMemory

    assert fastqueue.load()
    nffi = fastqueue._fast.ffi

    def addr(r: Any) -> int:
        buf = nffi.from_buffer("uint8_t[]", r.mm)
        try:
            return int(nffi.cast("uintptr_t", buf)) + r.mmap_offset - r._base
        finally:
            nffi.release(buf)

    fds = [os.memfd_create(f"rm{i}") for i in range(2)]
    for fd in fds:
        os.ftruncate(fd, 1 << 16)
    mem = GuestMemory()
    rmap = fastqueue._RegionMap()
    try:
        a = mem.add_region(0, 1 << 16, 0x10000, 0, fds[0])
        arr, n = rmap.get(mem)
        assert n == 1 and int(nffi.cast("uintptr_t", arr[0].host)) == addr(a)
        assert rmap.get(mem)[0] is arr  # unchanged table: the cached map
        b = mem.add_region(1 << 16, 1 << 16, 0x40000, 0, fds[1])
        arr, n = rmap.get(mem)
        hosts = [int(nffi.cast("uintptr_t", arr[i].host)) for i in range(n)]
        assert (n, hosts, arr[1].gpa) == (2, [addr(a), addr(b)], 1 << 16)
        assert mem.remove_region(0, 1 << 16, 0x10000)
        arr, n = rmap.get(mem)
        assert n == 1 and arr[0].gpa == 1 << 16
        assert int(nffi.cast("uintptr_t", arr[0].host)) == addr(b)
        mem.close()
        assert rmap.get(mem)[1] == 0
    finally:
        mem.close()
        for fd in fds:
            os.close(fd)
