"""The capture tells the truth: one record per frame, saying what happened to it.

Every frame that enters a NIC gets exactly one pcapng record, written at its fate
(forwarded, written into guest buffers, dropped by a rule or by the device), carrying the
comments of every fault that touched it.  Before this, a TX frame a rule dropped was
recorded twice (plain as if delivered, then annotated), and an RX frame that was
corrupted, delayed or duplicated was recorded once annotated and once more plain.

Mutations these tests were proven against (tools/mutants/section4.toml, ``cap-*``):
- the TX tap in ``_internalize_tx`` again (before the hooks): drops appear twice;
- a fault writing its own record at the event (the old RX behaviour): two records;
- a rule's drop not recorded; ``pass_notes`` not carrying the notes; duplicates unmarked;
- ``_fresh`` not clearing a reused packet index (a stale comment lands on a new frame);
- device drops (TX runt/link down, RX refused) or RX deliveries not recorded.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from capture_reader import read_records, tshark_records
from faults_helpers import Bench, make_bench, udp_frame

from vdev.faults import FaultEngine
from vdev.net.device import Device
from vdev.net.nic import FROM_GUEST, TO_GUEST
from vdev.testing.frames import icmp_echo

Rec = tuple[bytes, int, tuple[str, ...]]


def tapped(num_packets: int = 512) -> tuple[Bench, list[Rec]]:
    b = make_bench(num_packets=num_packets)
    recs: list[Rec] = []
    b.nic.tap = lambda nic, frame, d, notes: recs.append((frame, d, tuple(notes)))
    return b, recs


def frames(n: int) -> list[bytes]:
    return [udp_frame(dport=i) for i in range(n)]


@pytest.fixture
def tb() -> Iterator[tuple[Bench, list[Rec]]]:
    b, recs = tapped()
    yield b, recs
    b.engine.clear()
    b.take_backlog()
    b.clock.advance(10.0)
    leaks = b.pool.leaks()
    assert not leaks.leaked, str(leaks)


# -- one record per frame, TX and RX, for every data-plane action ---------------------------


@pytest.mark.parametrize(("side", "d"), [("tx", FROM_GUEST), ("rx", TO_GUEST)])
def test_dropped_frame_is_recorded_once_with_its_rule(
    tb: tuple[Bench, list[Rec]], side: str, d: int
) -> None:
    b, recs = tb
    f = frames(3)
    with b.nf.drop(nth=2, id="lossy", queue=side):
        out = b.tx(f) if side == "tx" else b.rx(f)
    assert out == [f[0], f[2]]
    # Records follow fates: the drop is settled inside the hook, the others after it.
    assert recs == [(f[1], d, ("vdev-fault drop rule=lossy",)), (f[0], d, ()), (f[2], d, ())]


@pytest.mark.parametrize(("side", "d"), [("tx", FROM_GUEST), ("rx", TO_GUEST)])
def test_corrupted_frame_is_recorded_once_with_the_bytes_that_went_on(
    tb: tuple[Bench, list[Rec]], side: str, d: int
) -> None:
    b, recs = tb
    f = udp_frame()
    bad = f[:14] + bytes([f[14] ^ 0x01]) + f[15:]
    with b.nf.corrupt(offsets=[14], queue=side):
        out = b.tx([f]) if side == "tx" else b.rx([f])
    assert out == [bad]
    assert recs == [(bad, d, ("vdev-fault corrupt rule=r1 flipped=[[14, 1]]",))]


@pytest.mark.parametrize(("side", "d"), [("tx", FROM_GUEST), ("rx", TO_GUEST)])
def test_duplicates_are_one_record_each(tb: tuple[Bench, list[Rec]], side: str, d: int) -> None:
    b, recs = tb
    f = udp_frame()
    with b.nf.duplicate(copies=2, queue=side):
        out = b.tx([f]) if side == "tx" else b.rx([f])
    assert out == [f, f, f]
    c = "vdev-fault duplicate rule=r1 copies=2"
    assert recs == [(f, d, (c,)), (f, d, (f"{c} copy=1",)), (f, d, (f"{c} copy=2",))]


@pytest.mark.parametrize(("side", "d"), [("tx", FROM_GUEST), ("rx", TO_GUEST)])
def test_delayed_frame_is_recorded_when_delivered(
    tb: tuple[Bench, list[Rec]], side: str, d: int
) -> None:
    b, recs = tb
    f = udp_frame()
    with b.nf.delay(ms=5, queue=side):
        assert (b.tx([f]) if side == "tx" else b.rx([f])) == []
        assert recs == []  # held: no fate yet, no record
        b.clock.advance(0.01)
        if side == "rx":
            assert b.take_backlog() == [f]
    assert recs == [(f, d, ("vdev-fault delay rule=r1 ms=5.0",))]


def test_reordered_frame_is_recorded_once_in_delivery_order(tb: tuple[Bench, list[Rec]]) -> None:
    b, recs = tb
    f = frames(3)
    with b.nf.reorder(nth=1, after=1):
        assert b.tx(f) == [f[1], f[0], f[2]]
    assert recs == [
        (f[1], FROM_GUEST, ()),
        (f[0], FROM_GUEST, ("vdev-fault reorder rule=r1 after=1",)),
        (f[2], FROM_GUEST, ()),
    ]


def test_rate_limited_and_truncated_frames(tb: tuple[Bench, list[Rec]]) -> None:
    b, recs = tb
    f = frames(2)
    with b.nf.rate_limit(pps=1, burst=1):
        assert b.tx(f) == [f[0]]
    assert recs == [(f[1], FROM_GUEST, ("vdev-fault rate_limit rule=r1",)), (f[0], FROM_GUEST, ())]
    recs.clear()
    with b.nf.truncate(length=20):
        assert b.tx([f[0]]) == [f[0][:20]]
    assert recs == [(f[0][:20], FROM_GUEST, ("vdev-fault truncate rule=r2 was=74",))]


def test_stacked_faults_share_one_record(tb: tuple[Bench, list[Rec]]) -> None:
    """Corrupt then duplicate then drop the copy: every note on the record it belongs to."""
    b, recs = tb
    f = udp_frame()
    bad = f[:20] + bytes([f[20] ^ 0xFF]) + f[21:]
    b.nf.corrupt(offsets=[20], mask=0xFF)
    b.nf.duplicate(copies=1)
    b.nf.drop(nth=2)
    assert b.tx([f]) == [bad]
    corrupt = "vdev-fault corrupt rule=r1 flipped=[[20, 255]]"
    dup = "vdev-fault duplicate rule=r2 copies=1"
    assert recs == [
        (bad, FROM_GUEST, (corrupt, f"{dup} copy=1", "vdev-fault drop rule=r3")),
        (bad, FROM_GUEST, (corrupt, dup)),
    ]


def test_failed_modification_says_so_on_the_unmodified_frame() -> None:
    b, recs = tapped(num_packets=2)
    hog = b.pool.alloc_packets(1)
    f = udp_frame()
    with b.nf.corrupt(offsets=[14]):
        assert b.tx([f]) == [f]  # no packet left for the copy: the frame goes on untouched
    assert recs == [(f, FROM_GUEST, ("vdev-fault alloc_failed rule=r1 error=pool exhausted",))]
    b.pool.free_packets(hog)


def test_a_reused_packet_index_starts_without_notes(tb: tuple[Bench, list[Rec]]) -> None:
    """Notes of a packet freed without a record must not land on the next frame there."""
    b, recs = tb
    pkt = b.pool.packet_from_bytes(udp_frame(), bytes(12))
    assert pkt is not None
    b.nic.annotate(pkt, "stale")
    b.pool.free_packets([pkt])
    again = b.pool.packet_from_bytes(udp_frame(dport=9), bytes(12))
    assert again == pkt
    assert b.nic.deliver([again]) == 0  # no RX ring running: refused, recorded as dropped
    b.pool.free_packets([again])
    assert recs == [(udp_frame(dport=9), TO_GUEST, ("vdev-drop reason=rx_ring_down",))]


# -- the whole device, read back with dpkt and tshark ---------------------------------------


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[tuple[Device, Any, FaultEngine]]:
    frontend_mod = pytest.importorskip("vdev.testing.frontend")
    dev = Device(pcap=str(tmp_path / "cap.pcapng"))
    dev.add_nic(str(tmp_path / "nic0.sock"))
    dev.start()
    engine = FaultEngine(dev, seed=1)
    fe = frontend_mod.VirtioNetFrontend(str(tmp_path / "nic0.sock"), ring_size=64)
    fe.post_rx()
    yield dev, fe, engine
    fe.close()
    engine.close()
    dev.close()
    leaks = dev.pool.leaks()
    assert not leaks.leaked, str(leaks)


def icmp_seq(frame: bytes) -> int:
    return int(struct.unpack_from("!H", frame, 40)[0])


def wait_for(cond: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond() and time.monotonic() < deadline:
        time.sleep(0.01)


def test_device_capture_has_one_record_per_frame(
    rig: tuple[Device, Any, FaultEngine], tmp_path: Path
) -> None:
    """10 pings, every 2nd dropped on TX, every reply duplicated once on RX, one reply
    corrupted: 10 TX records (5 say drop), 10 RX records (5 copies), nothing else."""
    dev, fe, engine = rig
    nf = engine.nic(0)
    nf.drop(queue="tx", every=2, id="txloss")
    nf.corrupt(queue="rx", nth=1, offsets=[45], mask=0xFF, id="bits")  # a payload byte
    nf.duplicate(queue="rx", copies=1, id="dup")
    fe.send_all([icmp_echo(i) for i in range(10)])
    got = fe.recv(max_frames=10, timeout=3.0)
    assert len(got) == 10
    engine.clear()
    with dev.lock:
        assert dev.capture is not None
        dev.capture.flush()
    recs = read_records(tmp_path / "cap.pcapng")
    tx = [r for r in recs if r.direction == FROM_GUEST]
    rx = [r for r in recs if r.direction == TO_GUEST]
    assert len(recs) == 20 and len(tx) == 10 and len(rx) == 10
    tx.sort(key=lambda r: icmp_seq(r.frame))  # in fate order: a batch's drops come first
    assert [r.frame for r in tx] == [icmp_echo(i) for i in range(10)]
    assert [r.comments for r in tx] == [
        () if i % 2 == 0 else ("vdev-fault drop rule=txloss",) for i in range(10)
    ]
    assert sorted(r.frame for r in rx) == sorted(got)
    assert sorted(icmp_seq(r.frame) for r in rx) == [0, 0, 2, 2, 4, 4, 6, 6, 8, 8]
    corrupted = [r for r in rx if any("corrupt" in c for c in r.comments)]
    assert len(corrupted) == 2  # the corrupted reply and its duplicate
    assert corrupted[0].comments == (
        "vdev-fault corrupt rule=bits flipped=[[45, 255]]",
        "vdev-fault duplicate rule=dup copies=1",
    )
    assert corrupted[1].comments[0] == corrupted[0].comments[0]
    assert corrupted[1].comments[1] == "vdev-fault duplicate rule=dup copies=1 copy=1"
    assert all(r.interface == "nic0" for r in recs)
    shark = tshark_records(tmp_path / "cap.pcapng")
    if shark is not None:  # the second reader agrees record for record
        assert shark == [(r.interface, r.direction, r.comments) for r in recs]


def test_device_drops_are_recorded_with_their_reason(
    rig: tuple[Device, Any, FaultEngine], tmp_path: Path
) -> None:
    """A TX runt the device drops is recorded once, named; so is a frame sent while the
    link is down."""
    dev, fe, engine = rig
    runt = icmp_echo(1)[:13]
    fe.send([runt])
    wait_for(lambda: dev.nics[0].stats[1].drops == 1)
    with engine.nic(0).link_down():
        fe.send([icmp_echo(2)])
        wait_for(lambda: dev.nics[0].stats[1].drops == 2)
    with dev.lock:
        assert dev.capture is not None
        dev.capture.flush()
    recs = read_records(tmp_path / "cap.pcapng")
    assert [(r.frame, r.direction, r.comments) for r in recs] == [
        (runt, FROM_GUEST, ("vdev-drop reason=runt",)),
        (icmp_echo(2), FROM_GUEST, ("vdev-drop reason=link_down",)),
    ]
