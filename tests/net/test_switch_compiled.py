"""The compiled switch (switch.c) against the Python reference (Switch.forward_py).

Hypothesis plays one sequence of bursts (random source endpoint; frames with destination and
source MACs from a small set that includes broadcast, multicast, the sender's own address
and unknown ones; some shorter than an Ethernet header), FDB pins, detaches and re-attaches
through two switches on two identical pools, one compiled and one not.  Endpoints take a
random prefix of what they are offered (backpressure).  What every endpoint received (bytes,
in order, per delivery call), every statistic, the FDB (entries and order) and the pool's
accounting must match after every step.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vdev.net.switch import Switch
from vdev.skywalk import Pbufpool, fastglue

pytestmark = pytest.mark.skipif(not fastglue.load(), reason="compiled module unavailable")

SETTINGS = settings(
    max_examples=int(os.environ.get("VDEV_HYPOTHESIS_EXAMPLES", "300")),
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
MACS = [
    b"\x02\x00\x00\x00\x00\x01",
    b"\x02\x00\x00\x00\x00\x02",
    b"\x02\x00\x00\x00\x00\x03",
    b"\x52\x54\x00\x00\x00\x09",
    b"\xff\xff\xff\xff\xff\xff",  # broadcast
    b"\x01\x00\x5e\x00\x00\x01",  # IPv4 multicast
    b"\x33\x33\x00\x00\x00\x01",  # IPv6 multicast
]
NAMES = ["a", "b", "c", "d"]


class Sink:
    """An endpoint that keeps the bytes of what it takes, up to ``room`` per call."""

    def __init__(self, name: str, pool: Pbufpool, log: list[Any]) -> None:
        self.name = name
        self.pool = pool
        self.log = log
        self.room = 1000

    def deliver(self, pkts: list[int]) -> int:
        take = pkts[: self.room]
        self.log.append((self.name, [self.pool.packet_bytes(p) for p in take]))
        self.pool.free_packets(take)
        return len(take)


frame = st.tuples(
    st.integers(0, len(MACS) - 1),
    st.integers(0, len(MACS) - 1),
    st.sampled_from([0, 5, 13, 14, 15, 60, 300, 1500]),
)
step = st.one_of(
    st.tuples(st.just("burst"), st.integers(0, 3), st.lists(frame, max_size=40)),
    st.tuples(st.just("pin"), st.integers(0, len(MACS) - 1), st.sampled_from([*NAMES, "gone"])),
    st.tuples(st.just("detach"), st.integers(0, 3)),
    st.tuples(st.just("attach"), st.integers(0, 3)),
    st.tuples(st.just("room"), st.integers(0, 3), st.integers(0, 8)),
    st.tuples(st.just("unpin"), st.integers(0, len(MACS) - 1)),
)


def _frame(dst: int, src: int, size: int, k: int) -> bytes:
    body = MACS[dst] + MACS[src] + b"\x08\x00" + bytes((k + i) & 0xFF for i in range(1500))
    return body[:size]


def _play(steps: list[tuple[Any, ...]], compiled: bool) -> list[Any]:
    pool = Pbufpool(num_packets=96, buf_size=256, max_frags=8)
    sw = Switch(pool, compiled=compiled)
    assert sw.compiled == compiled
    log: list[Any] = []
    sinks = {n: Sink(n, pool, log) for n in NAMES}
    for n in NAMES:
        sw.attach(sinks[n])
    k = 0
    for s in steps:
        op = s[0]
        if op == "burst":
            src = NAMES[s[1]]
            pkts = []
            for dst, smac, size in s[2]:
                pkt = pool.packet_from_bytes(_frame(dst, smac, size, k))
                k += 1
                if pkt is not None:
                    pkts.append(pkt)
            sw.forward(src, pkts)
        elif op == "pin":
            sw.fdb[MACS[s[1]]] = s[2]
        elif op == "unpin":
            sw.fdb.pop(MACS[s[1]], None)
        elif op == "detach":
            sw.detach(NAMES[s[1]])
        elif op == "attach" and NAMES[s[1]] not in sw.endpoints:
            sw.attach(sinks[NAMES[s[1]]])
        elif op == "room":
            sinks[NAMES[s[1]]].room = s[2]
        log.append(
            (
                {n: vars(st_).copy() for n, st_ in sw.stats.items()},
                list(sw.fdb.items()),
                pool.stats.in_use,
            )
        )
    assert pool.stats.in_use == 0
    pool.close()
    return log


@SETTINGS
@given(steps=st.lists(step, min_size=1, max_size=12))
def test_compiled_switch_matches_python(steps: list[tuple[Any, ...]]) -> None:
    assert _play(steps, True) == _play(steps, False)


def test_learning_inside_one_burst_is_seen_by_later_frames() -> None:
    """b's frame to a (unknown yet) floods; a's frame in the same burst teaches the switch,
    so the next frame to a goes to a alone: the order of learning inside a burst matters."""
    for compiled in (True, False):
        pool = Pbufpool(num_packets=32)
        log: list[Any] = []
        sw = Switch(pool, compiled=compiled)
        for n in "abc":
            sw.attach(Sink(n, pool, log))
        f1 = _frame(0, 1, 60, 1)  # to MAC 0, from MAC 1, sent by b
        sw.fdb[MACS[1]] = "b"
        sw.forward("c", [pool.packet_from_bytes(_frame(1, 0, 60, 2))])  # MAC 0 lives at c
        log.clear()
        p1 = pool.packet_from_bytes(f1)
        sw.forward("b", [p1])
        assert log == [("c", [f1])], compiled
        assert sw.fdb[MACS[0]] == "c" and sw.stats["b"].tx_frames == 1
        pool.close()
