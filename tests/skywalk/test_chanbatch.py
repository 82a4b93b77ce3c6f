"""The compiled user half (chanbatch.c via chanbatch.py) against channel.py's Python loops.

Differential: the same operations (send bursts of random frames, some too large for one
ALLOC packet; receives of random sizes) run on two identical loopback setups, one with the
Python reference and one with the compiled bursts.  Every return value and error message,
every frame received, the port and ring statistics and the user-visible ring indices must
match, and both must end with nothing leaked.  Hostile arenas (indices corrupted where the
user half reads them) must give the same errors on both paths; a second process attached
through the arena fd must see the same traffic with either.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vdev.skywalk import Channel, LoopbackPort, Pbufpool, Port, SyncError, chanbatch
from vdev.skywalk.arena import (
    BUF0_W32,
    BUFLET_W32,
    MD_W16,
    MD_W32,
    BufletOff,
    MdOff,
    RingOff,
    SlotOff,
)
from vdev.skywalk.remote import SyncServer, socketpair

from .conftest import assert_no_leak

pytestmark = pytest.mark.skipif(
    not chanbatch.available(), reason="compiled fast path unavailable (no compiler?)"
)

SETTINGS = settings(
    max_examples=int(os.environ.get("VDEV_HYPOTHESIS_EXAMPLES", "200")),
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _restore() -> Iterator[None]:
    prev = chanbatch.ENABLED
    yield
    chanbatch.ENABLED = prev


def _setup(ring_slots: int, alloc_nbufs: int, num_packets: int) -> tuple[Pbufpool, Any, Any, Any]:
    pool = Pbufpool(num_packets=num_packets, buf_size=256, max_frags=4)
    port = Port.loopback(pool, ring_slots=ring_slots, alloc_nbufs=alloc_nbufs)
    a = port.open_channel()
    b = port.open_channel()
    return pool, port, a, b


def _indices(ch: Channel) -> list[int]:
    rings = (ch.tx_ring, ch.rx_ring, ch.alloc_ring, ch.free_ring)
    return [v for r in rings for v in (r.head, r.tail, r.khead)]


def _run(ops: list[tuple[str, Any]], compiled: bool, setup: tuple[int, int, int]) -> list[Any]:
    chanbatch.ENABLED = compiled
    pool, port, a, b = _setup(*setup)
    log: list[Any] = []
    diverged = False  # after a too-big frame the two paths free different spare packets
    for op, arg in ops:
        try:
            if op == "send":
                log.append(("sent", a.send(arg)))
            else:
                log.append(("recv", b.recv(max=arg)))
        except ValueError as exc:
            log.append(("error", str(exc)))
            diverged = True
        log.append(("stats", vars(port.stats).copy()))
        if not diverged:
            log.append(("rings", _indices(a), _indices(b), pool.stats.in_use))
    log.append(("drain", b.recv(max=10_000)))
    a.close()
    b.close()
    port.close()
    assert_no_leak(pool)
    return log


frames = st.lists(
    st.one_of(st.binary(min_size=0, max_size=300), st.integers(0, 1100).map(lambda n: b"x" * n)),
    max_size=40,
)
ops = st.lists(
    st.one_of(st.tuples(st.just("send"), frames), st.tuples(st.just("recv"), st.integers(1, 50))),
    min_size=1,
    max_size=8,
)


@SETTINGS
@given(
    ops=ops,
    ring_slots=st.sampled_from([2, 3, 8, 33]),
    alloc_nbufs=st.sampled_from([1, 2, 4]),
    num_packets=st.sampled_from([24, 256]),
)
def test_bursts_match_the_python_loops(
    ops: list[tuple[str, Any]], ring_slots: int, alloc_nbufs: int, num_packets: int
) -> None:
    setup = (ring_slots, alloc_nbufs, num_packets)
    assert _run(ops, True, setup) == _run(ops, False, setup)


def test_send_repeat_and_recv_count_move_whole_rings() -> None:
    pool, port, a, b = _setup(64, 1, 512)
    frame = bytes(range(60))
    assert chanbatch.send_repeat(a, frame, 63) == 63  # one slot always stays empty
    assert chanbatch.recv_count(b, max=10) == (10, 600)
    got = chanbatch.recv(b, max=100)
    assert got == [frame] * 53
    # The TX ring takes all 200 (synced as it fills).  b has not synced RX since it read the
    # last 53, so the kernel still counts those slots as b's: 10 fit, 190 drop.
    assert chanbatch.send_repeat(a, frame, 200) == 200
    assert port.stats.tx_dropped == 190
    assert chanbatch.recv_count(b, max=1000) == (10, 600)
    assert chanbatch.send_repeat(a, frame, 100) == 100  # the 10 just read are still b's
    assert chanbatch.recv_count(b, max=1000) == (53, 53 * 60)
    for ch in (a, b):
        ch.close()
    port.close()
    assert_no_leak(pool)


def test_multi_buflet_frames_round_trip_byte_exact() -> None:
    pool, port, a, b = _setup(16, 4, 64)
    chanbatch.ENABLED = True
    sizes = (1, 255, 256, 257, 1024)
    data = [bytes((i * 7 + k) & 0xFF for k in range(n)) for i, n in enumerate(sizes)]
    assert a.send(data) == 5
    assert b.recv(max=10) == data
    with pytest.raises(ValueError, match=r"packet \d+ holds 1024 bytes, frame has 1025"):
        a.send([b"a", b"y" * 1025])
    assert b.recv(max=10) == [b"a"]  # what was staged before the bad frame went out
    for ch in (a, b):
        ch.close()
    port.close()
    assert_no_leak(pool)


# ------------------------------------------------------------------ hostile arenas
def _corrupt_alloc_slot(pool: Pbufpool, a: Channel, b: Channel) -> Callable[[], object]:
    from vdev.skywalk import SyncKind

    a.sync(SyncKind.ALLOC)  # the kernel fills the ALLOC ring; then its head slot is bent
    ring = a.alloc_ring
    w, _ = ring.slot_words(ring.head)
    ring.r32[w + SlotOff.MD_IDX_W32] = pool.num_packets + 5
    return lambda: a.send([b"z" * 10])


def _corrupt_rx_buffer(pool: Pbufpool, a: Channel, b: Channel) -> Callable[[], object]:
    assert a.send([b"q" * 40]) == 1
    pkt = _rx_packet(b)
    pool.arena.md32[pkt * MD_W32 + BUF0_W32 + BufletOff.BUF_IDX_W32] = 1 << 30
    return lambda: b.recv(max=4)


def _corrupt_rx_window(pool: Pbufpool, a: Channel, b: Channel) -> Callable[[], object]:
    assert a.send([b"q" * 40]) == 1
    pkt = _rx_packet(b)
    pool.arena.md32[pkt * MD_W32 + BUF0_W32 + BufletOff.DOFF_W32] = pool.buf_size - 39
    return lambda: b.recv(max=4)


def _corrupt_rx_window_fits(pool: Pbufpool, a: Channel, b: Channel) -> Callable[[], object]:
    """The other side of the window check: a window ending exactly at the buffer is fine."""
    assert a.send([b"q" * 40]) == 1
    pkt = _rx_packet(b)
    pool.arena.md32[pkt * MD_W32 + BUF0_W32 + BufletOff.DOFF_W32] = pool.buf_size - 40
    return lambda: len(b.recv(max=4))


def _corrupt_rx_looped_chain(pool: Pbufpool, a: Channel, b: Channel) -> Callable[[], object]:
    """A user copy whose buflet chain loops (buflet 3 -> 3) with bufs_cnt 100: the Python
    loop reads 100 buflets (bufs_cnt bounds the walk), so the compiled one must too (it
    refused chains of more than 64 buflets as a bad buflet index)."""
    assert a.send([b"q" * 40]) == 1
    pkt = _rx_packet(b)
    arena = pool.arena
    arena.md16[pkt * MD_W16 + MdOff.BUFS_CNT_W16] = 100
    arena.md32[pkt * MD_W32 + BUF0_W32 + BufletOff.NEXT_W32] = 3
    w = 3 * BUFLET_W32
    arena.bl32[w + BufletOff.NEXT_W32] = 3
    arena.bl32[w + BufletOff.BUF_IDX_W32] = 0
    arena.bl32[w + BufletOff.DOFF_W32] = 1
    arena.bl32[w + BufletOff.DLEN_W32] = 10
    return lambda: [len(f) for f in b.recv(max=4)]


def _corrupt_rx_second_buffer(pool: Pbufpool, a: Channel, b: Channel) -> Callable[[], object]:
    """Two frames received, the second one's buffer index bad: the first is taken and handed
    back (FREE ring) on both paths before the refusal, the bad one stays on the RX ring."""
    assert a.send([b"p" * 30, b"q" * 40]) == 2
    _rx_packet(b)
    ring = b.rx_ring
    w, _ = ring.slot_words(ring.next(ring.head))
    pkt = ring.r32[w + SlotOff.MD_IDX_W32]
    pool.arena.md32[pkt * MD_W32 + BUF0_W32 + BufletOff.BUF_IDX_W32] = 1 << 30
    return lambda: b.recv(max=4)


def _corrupt_rx_buffer_then_link(pool: Pbufpool, a: Channel, b: Channel) -> Callable[[], object]:
    """A bad buffer in buflet 0 and a bad link after it: the Python loop walks the whole
    chain (links) before it looks at any buffer, so the link is what both paths name."""
    assert a.send([b"q" * 40]) == 1
    pkt = _rx_packet(b)
    arena = pool.arena
    arena.md16[pkt * MD_W16 + MdOff.BUFS_CNT_W16] = 2
    arena.md32[pkt * MD_W32 + BUF0_W32 + BufletOff.BUF_IDX_W32] = 1 << 30
    arena.md32[pkt * MD_W32 + BUF0_W32 + BufletOff.NEXT_W32] = 1 << 20
    return lambda: b.recv(max=4)


def _corrupt_tx_buffer_then_link(pool: Pbufpool, a: Channel, b: Channel) -> Callable[[], object]:
    """The same on send: the ALLOC ring's head packet has a bad buffer and a bad link."""
    from vdev.skywalk import SyncKind

    a.sync(SyncKind.ALLOC)
    ring = a.alloc_ring
    w, _ = ring.slot_words(ring.head)
    pkt = ring.r32[w + SlotOff.MD_IDX_W32]
    arena = pool.arena
    arena.md16[pkt * MD_W16 + MdOff.BUFS_CNT_W16] = 2
    arena.md32[pkt * MD_W32 + BUF0_W32 + BufletOff.BUF_IDX_W32] = 1 << 30
    arena.md32[pkt * MD_W32 + BUF0_W32 + BufletOff.NEXT_W32] = 1 << 20
    return lambda: a.send([b"z" * 10])


def _corrupt_tx_head(pool: Pbufpool, a: Channel, b: Channel) -> Callable[[], object]:
    """The TX ring's head scribbled to n + 5: the compiled loop reads every ring index
    modulo n (it must stay inside the slot array); the Python one used it as it was, so
    its first frame went to a slot past the ring's end, over the RX ring's header, and the
    rest sent as if nothing happened (the fuzzer's find).  Now both stage the frames at
    slots 5 and 6 and the kernel, finding slot 0 empty, kills the channel."""
    ring = a.tx_ring
    ring.r32[ring.h + RingOff.HEAD_W32] = ring.n + 5
    return lambda: (a.send([b"h" * 20, b"i" * 30, b"j" * 40]), [len(f) for f in b.recv(max=8)])


def _corrupt_rx_head(pool: Pbufpool, a: Channel, b: Channel) -> Callable[[], object]:
    """The same on the RX ring's head, with two frames waiting."""
    assert a.send([b"p" * 30, b"q" * 40]) == 2
    _rx_packet(b)
    ring = b.rx_ring
    ring.r32[ring.h + RingOff.HEAD_W32] = ring.head + ring.n
    return lambda: [len(f) for f in b.recv(max=8)]


def _corrupt_free_head(pool: Pbufpool, a: Channel, b: Channel) -> Callable[[], object]:
    """The FREE ring's head scribbled to 255, then a receive that takes nothing: neither
    loop writes the FREE head back (the compiled one wrote it, modulo n, so its channel
    survived the FREE sync the Python one was killed at: the fuzzer's find)."""
    from vdev.skywalk import SyncKind

    ring = b.free_ring
    ring.r32[ring.h + RingOff.HEAD_W32] = 255
    return lambda: (b.recv(max=4), b.sync(SyncKind.FREE))


def _rx_packet(b: Channel) -> int:
    from vdev.skywalk import SyncKind

    b.sync(SyncKind.RX)
    pkt = b.slot_get_packet(b.rx_ring, b.rx_ring.head)
    assert pkt is not None
    return pkt


@pytest.mark.parametrize(
    ("corrupt", "expect"),
    [
        # channel.py hands the bad index back through the FREE ring, which kills the channel
        (_corrupt_alloc_slot, "FREE sync: UNALLOCATED_PKT: slot 0: packet 69 not held"),
        (_corrupt_rx_buffer, f"buffer {1 << 30} out of range"),
        (_corrupt_rx_window, "data window beyond its buffer"),
        (_corrupt_rx_window_fits, None),
        (_corrupt_rx_looped_chain, None),
        (_corrupt_rx_second_buffer, f"buffer {1 << 30} out of range"),
        (_corrupt_rx_buffer_then_link, f"packet 0: buflet {1 << 20} out of range"),
        (_corrupt_tx_buffer_then_link, f"buflet {1 << 20} out of range"),
        # the frames go to slots n + 5 - n = 5 and 6, so the kernel finds slot 0 empty
        (_corrupt_tx_head, "TX sync: UNALLOCATED_PKT: slot 0: packet none"),
        (_corrupt_rx_head, "RX sync: BASIC_SANITY: head 8 >= num_slots 8"),
        (_corrupt_free_head, "FREE sync: BASIC_SANITY: head 255 >= num_slots 8"),
    ],
)
def test_hostile_arena_same_error_on_both_paths(
    corrupt: Callable[[Pbufpool, Channel, Channel], Callable[[], object]], expect: str | None
) -> None:
    results = []
    for compiled in (False, True):
        chanbatch.ENABLED = compiled
        pool, port, a, b = _setup(8, 1, 64)
        act = corrupt(pool, a, b)
        if expect is None:
            results.append(act())
        else:
            with pytest.raises((ValueError, SyncError), match=expect) as info:
                act()
            results.append(f"{type(info.value).__name__}: {info.value}")
        # what the refusal left behind: the rings' indices on both ends, the kernel's view
        ids = {a.info.channel_id: "a", b.info.channel_id: "b", -1: None}
        owners = [ids.get(o, o) for o in pool.pkt_owner]
        results.append((_indices(a), _indices(b), owners, list(pool.pkt_state)))
        for ch in (a, b):
            ch.close()
        port.close()
        pool.close()
    assert results[0] == results[2]
    assert results[1] == results[3], "the rings or the pool differ after the same refusal"
    if corrupt is _corrupt_rx_window_fits:
        assert results[0] == results[2] == 1
    if corrupt is _corrupt_rx_looped_chain:
        assert results[0] == [40 + 99 * 10]


# ------------------------------------------------------------------ another process
CHILD = """
import json, sys
from vdev.skywalk import Channel, ChannelInfo, chanbatch
ch = Channel.attach(int(sys.argv[1]), ChannelInfo.from_json(sys.argv[2]), int(sys.argv[3]))
got = []
while len(got) < 500:
    got += ch.recv(max=128, timeout=5.0)
sent = ch.send([bytes([i & 0xFF]) * (60 + i % 700) for i in range(700)])
print(json.dumps({"compiled": chanbatch.in_use(), "n": len(got),
                  "sum": sum(map(len, got)), "first": got[0].hex(), "sent": sent}))
ch.close()
"""


@pytest.mark.timeout(90)
@pytest.mark.parametrize("compiled", ["0", "1"])
def test_attached_process_moves_bursts(compiled: str) -> None:
    pool = Pbufpool(num_packets=2048)
    port: LoopbackPort = Port.loopback(pool, ring_slots=256)
    local = port.open_channel()
    handle = port.open_kernel_channel()
    server_sock, client_sock = socketpair()
    client_fd = client_sock.fileno()
    env = dict(os.environ, PYTHONPATH=str(ROOT), VDEV_FASTPATH=compiled)
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(pool.fd), handle.info().to_json(), str(client_fd)],
        pass_fds=(pool.fd, client_sock.fileno()),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    client_sock.close()
    server = SyncServer(handle, server_sock)
    frames = [bytes([0x40 + (i & 0x3F)]) * (64 + i) for i in range(500)]
    sent = 0
    received: list[bytes] = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        # Send only what the child's RX ring can hold: the loopback drops the rest.
        if sent < len(frames) and handle.rx.kernel_space() >= 100:
            sent += local.send(frames[sent : sent + 100])
        ready, _, _ = select.select([server_sock], [], [], 0.005)
        if ready and not server.handle_request():
            break
        received += local.recv(max=256)
    out, err = proc.communicate(timeout=30)
    server_sock.close()
    received += local.recv(max=1000)
    assert proc.returncode == 0, err.decode()
    result = json.loads(out.decode().strip().splitlines()[-1])
    assert result == {
        "compiled": compiled == "1",
        "n": 500,
        "sum": sum(map(len, frames)),
        "first": frames[0].hex(),
        "sent": 700,
    }
    assert len(received) == 700
    assert received[699] == bytes([699 & 0xFF]) * (60 + 699 % 700)
    local.close()
    port.close()
    assert_no_leak(pool)


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "python"])
def test_send_and_recv_on_two_threads_send_each_frame_once(compiled: bool) -> None:
    """A channel's sender and its receiver on two threads (as ScriptPeer runs them): every
    frame the sender counts as sent reaches the switch exactly once. The compiled bursts
    once shared one result struct per channel, so a send could read the receiver's count
    (0) for its 64 staged frames and send them again: seen as 64 extra frames in a guest."""
    import threading

    from vdev.net.device import Device

    if compiled and not chanbatch.set_enabled(True):
        pytest.skip("compiled fast path unavailable (no compiler?)")
    if not compiled:
        chanbatch.set_enabled(False)
    mac_a, mac_b = bytes.fromhex("020000000a0a"), bytes.fromhex("020000000b0b")

    def frame(seq: int, dst: bytes, src: bytes) -> bytes:
        return dst + src + b"\x88\xb5" + seq.to_bytes(4, "big") + bytes(46)

    n = 20_000
    with Device() as dev:
        a = dev.open_channel("a", ring_slots=256)
        b = dev.open_channel("b", ring_slots=1024)
        try:
            b.send([frame(0, mac_a, mac_b)])  # the switch learns both MACs
            a.send([frame(0, mac_b, mac_a)])
            deadline = time.monotonic() + 5
            while not (a.recv(16) or time.monotonic() > deadline):
                pass
            b.recv(16, 0.5)
            stop = threading.Event()
            got: list[int] = []

            def a_receives() -> None:  # traffic back to a keeps a's recv busy meanwhile
                while not stop.is_set():
                    a.recv(64, 0.001)

            def b_echoes() -> None:
                while not stop.is_set():
                    frames = b.recv(64, 0.001)
                    got.extend(int.from_bytes(f[14:18], "big") for f in frames)
                    if frames:
                        b.send([frame(0, mac_a, mac_b)] * len(frames))

            threads = [threading.Thread(target=t) for t in (a_receives, b_echoes)]
            for t in threads:
                t.start()
            sent = 0
            frames = [frame(i, mac_b, mac_a) for i in range(1, n + 1)]
            t_end = time.monotonic() + 60
            while sent < n and time.monotonic() < t_end:
                k = a.send(frames[sent : sent + 64])
                sent += k
                if k == 0:
                    time.sleep(0.0005)
            time.sleep(0.5)
            stop.set()
            for t in threads:
                t.join(10)
            while rest := b.recv(256, 0.2):  # what b had not taken when its thread stopped
                got.extend(int.from_bytes(f[14:18], "big") for f in rest)
            dropped = dev.switch.stats["b"].drops  # counted on the endpoint that refused
        finally:
            a.close()
            b.close()
    assert sent == n
    assert len(got) == len(set(got)), f"{len(got) - len(set(got))} frames delivered twice"
    assert set(got) <= set(range(1, n + 1))
    assert len(got) + dropped == n, (len(got), dropped)
