"""Property tests: legal traffic never fails or leaks; hostile writes always end in a named
SyncError (or nothing at all), never another exception or an out-of-range access."""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vdev.abi import ffi
from vdev.skywalk import (
    Channel,
    DefunctError,
    KillReason,
    Pbufpool,
    Port,
    SyncError,
    SyncKind,
)
from vdev.skywalk.arena import BUFLET_SIZE, MD_SIZE, RING_HDR_SIZE, SLOT_SIZE

from . import hostile as H

# Every test here runs against both validate.py backends (python and compiled C).
pytestmark = pytest.mark.usefixtures("backend")

N = 8
SETTINGS = settings(
    max_examples=int(os.environ.get("VDEV_HYPOTHESIS_EXAMPLES", "150")),
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)

op = st.one_of(
    st.tuples(st.just("send"), st.integers(0, 1), st.lists(st.integers(0, 7000), max_size=10)),
    st.tuples(st.just("recv"), st.integers(0, 1), st.integers(1, 12)),
    st.tuples(st.just("deliver"), st.integers(0, 1), st.lists(st.integers(0, 9000), max_size=10)),
    st.tuples(st.just("hold"), st.integers(0, 1), st.integers(1, 5)),
    st.tuples(st.just("release"), st.integers(0, 1), st.integers(1, 5)),
    st.tuples(st.just("sync"), st.integers(0, 1), st.sampled_from(list(SyncKind))),
    st.tuples(st.just("reopen"), st.integers(0, 1), st.just(0)),
)


@SETTINGS
@given(st.lists(op, max_size=30))
def test_legal_sequences_never_fail_or_leak(ops: list[tuple[str, int, object]]) -> None:
    pool = Pbufpool(num_packets=96, max_frags=4, num_large_bufs=2)
    port = Port.loopback(pool, ring_slots=N, alloc_nbufs=4)
    chans = [port.open_channel(), port.open_channel()]
    held: list[list[int]] = [[], []]
    sent: list[list[bytes]] = [[], []]
    got: list[list[bytes]] = [[], []]
    counter = 0
    for name, who, arg in ops:
        ch = chans[who]
        if name == "send":
            assert isinstance(arg, list)
            frames = []
            for size in arg:
                counter += 1
                frames.append(b"S" + counter.to_bytes(4, "little") * (size // 4))
            k = ch.send(frames)
            sent[who] += frames[:k]
        elif name == "recv":
            assert isinstance(arg, int)
            got[who] += ch.recv(max=arg)
        elif name == "deliver":
            assert isinstance(arg, list)
            pkts = [pool.packet_from_bytes(b"D" * (s + 1)) for s in arg]
            ok = [p for p in pkts if p is not None]
            taken = port.deliver(ok)
            pool.free_packets(ok[taken:])
        elif name == "hold":
            assert isinstance(arg, int)
            for _ in range(arg):
                p = ch.packet_alloc()
                if p is not None:
                    held[who].append(p)
        elif name == "release":
            assert isinstance(arg, int)
            for _ in range(min(arg, len(held[who]))):
                ch.packet_free(held[who].pop())
            ch.sync(SyncKind.FREE)
        elif name == "sync":
            assert isinstance(arg, SyncKind)
            ch.sync(arg)
        else:
            ch.close()
            chans[who] = port.open_channel()
            held[who] = []
        assert pool.stats.in_use >= sum(len(h) for h in held)
    # Loopback frames arrive in order (some may be dropped when the peer's ring was full).
    for who in (0, 1):
        echoed = [g for g in got[who] if g.startswith(b"S")]
        peer = iter(sent[1 - who])
        assert all(any(g == s for s in peer) for g in echoed)
    port.close()
    assert pool.stats.in_use == 0
    assert not pool.close().leaked


def _regions(ch: Channel, held: list[int], pool: Pbufpool | None = None) -> list[tuple[int, int]]:
    """(arena offset, length) of everything a client can write that the kernel looks at.

    With ``pool``, the external buflets of the held packets are included, found through the
    pool's trusted chain; without it, the first few buflets of the region (single-client
    tests, where every buflet in use is the client's own).
    """
    out = []
    for ring in (ch.tx_ring, ch.rx_ring, ch.alloc_ring, ch.free_ring, ch.event_ring):
        out.append((ring.off, RING_HDR_SIZE))
        out.append((ring.off + RING_HDR_SIZE, ring.n * SLOT_SIZE))
    lay = ch.arena.layout
    for p in held:
        out.append((lay.md_off + p * MD_SIZE, MD_SIZE))
    if pool is None:
        out.append((lay.buflet_off, 4 * BUFLET_SIZE))
        return out
    for p in held:
        j = pool.b_next[p]
        while j != 0xFFFFFFFF:
            out.append((lay.buflet_off + j * BUFLET_SIZE, BUFLET_SIZE))
            j = pool.b_next[pool.num_packets + j]
    return out


corruption = st.lists(
    st.tuples(
        st.integers(0, 1000),  # region (modulo)
        st.integers(0, 10_000),  # offset in region (modulo)
        st.sampled_from(["u8", "u16", "u32"]),
        st.one_of(
            st.integers(0, 16), st.integers(0, 0xFFFFFFFF), st.sampled_from([0xFFFFFFFF, 2048])
        ),
    ),
    min_size=1,
    max_size=4,
)


@SETTINGS
@given(corruption, st.permutations(list(SyncKind)), st.booleans())
def test_random_corruption_ends_in_named_reason(
    writes: list[tuple[int, int, str, int]], order: list[SyncKind], stage_tx: bool
) -> None:
    corrupt_and_sync(writes, order, stage_tx)


def corrupt_and_sync(
    writes: list[tuple[int, int, str, int]], order: list[SyncKind], stage_tx: bool
) -> None:
    """Set every ring in flight, apply ``writes`` to client-writable memory, sync all."""
    pool = Pbufpool(num_packets=64, max_frags=3)
    port = Port(pool, ring_slots=N, alloc_nbufs=2)
    ch = port.open_channel()
    # Put the channel in a state where every ring has something in flight.
    held = [p for p in (ch.packet_alloc() for _ in range(3)) if p is not None]
    if stage_tx:
        p, s = H.stage_tx(ch, b"t" * 2500)
        ch.advance_slot(ch.tx_ring, s)
        held.append(p)
    ch.packet_free(held[0])
    dev = [p for p in (pool.packet_from_bytes(b"r" * 100) for _ in range(3)) if p is not None]
    pool.free_packets(dev[port.deliver(dev) :])
    ch.sync(SyncKind.RX)
    ev = pool.packet_from_bytes(b"e")
    assert ev is not None
    port.post_event(port.channels[0], [ev])
    ch.sync(SyncKind.EVENT)
    for ring in (ch.rx_ring, ch.event_ring):
        s = ring.head
        q = ch.slot_get_packet(ring, s)
        if q is not None:
            held.append(q)
    regions = _regions(ch, held)
    base = H.base(ch.arena)
    for r, off, width, value in writes:
        start, length = regions[r % len(regions)]
        size = {"u8": 1, "u16": 2, "u32": 4}[width]
        o = start + (off % max(1, length - size + 1))
        o -= o % size
        ctype = {"u8": "uint8_t *", "u16": "uint16_t *", "u32": "uint32_t *"}[width]
        ffi.cast(ctype, base + o)[0] = value & ((1 << (8 * size)) - 1)
    killed: SyncError | None = None
    for kind in order:
        try:
            ch.sync(kind)
        except SyncError as err:
            assert killed is None
            assert isinstance(err.reason, KillReason) and err.sync is kind and err.detail
            killed = err
        except DefunctError:
            assert killed is not None
    # The device keeps working whatever happened to the channel.
    more = [p for p in (pool.packet_from_bytes(b"m" * 10) for _ in range(2)) if p is not None]
    pool.free_packets(more[port.deliver(more) :])
    ch.close()
    port.close()
    assert pool.stats.in_use == 0, pool.leaks()
    assert not pool.close().leaked


victim_op = st.one_of(
    st.tuples(st.just("send"), st.integers(0, 2), st.integers(0, 6)),
    st.tuples(st.just("recv"), st.integers(0, 2), st.integers(1, 8)),
    st.tuples(st.just("deliver"), st.integers(0, 2), st.integers(0, 6)),
    st.tuples(st.just("hold"), st.integers(0, 2), st.integers(1, 3)),
    st.tuples(
        st.just("corrupt"),
        st.just(2),
        st.tuples(
            st.integers(0, 1000),
            st.integers(0, 10_000),
            st.sampled_from([1, 2, 4]),
            st.integers(0, 0xFFFFFFFF),
        ),
    ),
    st.tuples(st.just("vsync"), st.just(2), st.sampled_from(list(SyncKind))),
)


@SETTINGS
@given(st.lists(victim_op, max_size=25))
def test_corruption_interleaved_with_traffic(ops: list[tuple[str, int, object]]) -> None:
    """Channel 2 scribbles on its rings, its packets and kernel-held packets' user copies
    between legal operations; channels 0 and 1 never notice, channel 2 only ever sees a
    named SyncError then DefunctError, and nothing leaks."""
    pool = Pbufpool(num_packets=96, max_frags=3)
    port = Port.loopback(pool, ring_slots=N, alloc_nbufs=2)
    chans = [port.open_channel() for _ in range(3)]
    victim = chans[2]
    corrupted = False
    killed = False
    held: list[int] = []
    base = H.base(pool.arena)
    lay = pool.arena.layout
    for name, who, arg in ops:
        ch = chans[who]
        if who == 2 and (corrupted or killed) and name not in ("corrupt", "vsync", "deliver"):
            continue  # after scribbling, the victim only syncs (the kernel-facing path)
        try:
            if name == "send":
                assert isinstance(arg, int)
                ch.send([bytes([who]) * (10 + i) for i in range(arg)])
            elif name == "recv":
                assert isinstance(arg, int)
                ch.recv(max=arg)
            elif name == "deliver":
                assert isinstance(arg, int)
                pkts = [pool.packet_from_bytes(b"D" * 20) for _ in range(arg)]
                ok = [p for p in pkts if p is not None]
                pool.free_packets(ok[port.deliver(ok) :])
            elif name == "hold":
                assert isinstance(arg, int)
                got = [p for p in (ch.packet_alloc() for _ in range(arg)) if p is not None]
                if who == 2:
                    held += got
                else:
                    for p in got:
                        ch.packet_free(p)
                    ch.sync(SyncKind.FREE)
            elif name == "corrupt":
                assert isinstance(arg, tuple)
                r, off, size, value = arg
                # Only what channel 2 may legitimately touch: its rings, the packets it
                # holds (and their buflets), and user copies of kernel-held packets (which
                # the kernel rewrites before anyone sees them).  Another channel's packets
                # live in the same arena but are not channel 2's to scribble on.
                regions = _regions(victim, held, pool) if not killed else []
                regions += [
                    (lay.md_off + i * MD_SIZE, MD_SIZE)
                    for i in range(pool.num_packets)
                    if pool.pkt_state[i] and pool.pkt_owner[i] == -1
                ]
                if regions:
                    start, length = regions[r % len(regions)]
                    o = start + off % max(1, length - size + 1)
                    o -= o % size
                    ctype = {1: "uint8_t *", 2: "uint16_t *", 4: "uint32_t *"}[size]
                    ffi.cast(ctype, base + o)[0] = value & ((1 << (8 * size)) - 1)
                    corrupted = True
            else:
                assert isinstance(arg, SyncKind)
                ch.sync(arg)
        except SyncError as err:
            assert who == 2 and not killed, err
            assert isinstance(err.reason, KillReason)
            killed = True
        except DefunctError:
            assert who == 2 and killed
    port.close()
    assert pool.stats.in_use == 0, pool.leaks()
    assert not pool.close().leaked
