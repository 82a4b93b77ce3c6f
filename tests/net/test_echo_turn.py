"""The echo turn (vdev/net/echoturn.py) against the stage-by-stage path it stands in for.

Each case sends one batch of frames from the mock driver with a single kick, lets the
device serve it, stops the device, and records everything either path can leave behind:
the frames the driver received (bytes and order), both used rings as the driver reads
them, the device's statistics (NIC queues, switch ports, responder, pool), the FDB, the
NIC's backlog and the pool's free lists in order.  The same case runs with the turn on and
off (``EchoTurn.enabled``); the records must be equal, and the turn must have run (and,
for the plain cases, gone all the way) so a case cannot pass by never reaching it.

The hostile and odd cases each end the turn at a different stage (VE_TX ... VE_RX), which
is where the general path has to take over exactly: a runt (the TX burst stops), an ARP
broadcast and a frame for an unknown MAC (the switch floods), a NEEDS_CSUM request (the
responder's C cannot judge it), a UDP sink and a bad checksum (verdicts that drop), a guest
with fewer RX buffers than replies (the RX burst stops), buffers too small without
MRG_RXBUF (the reference drops)."""

from __future__ import annotations

import struct
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vdev.abi import lib
from vdev.net.device import Device
from vdev.net.echoturn import SKIP_BATCHES
from vdev.net.nic import DEFAULT_FEATURES
from vdev.skywalk import fastglue
from vdev.testing.frames import (
    GUEST_MAC,
    HOST_MAC,
    RESPONDER_MAC,
    arp_request,
    icmp_echo,
    numbered,
    udp,
)
from vdev.testing.frontend import VirtioNetFrontend
from vdev.virtio import fastqueue

pytestmark = pytest.mark.skipif(
    not fastglue.load() or fastqueue.BACKEND != "c", reason="needs the compiled module"
)

NEEDS_CSUM_VNET = struct.pack("<BBHHHH", 1, 0, 0, 0, 34, 2)  # csum_start 34, offset 2


def bad_ip_checksum(seq: int) -> bytes:
    f = bytearray(icmp_echo(seq))
    f[24] ^= 0xFF  # the IPv4 header checksum
    return bytes(f)


FRAMES = {
    "echo": lambda i: icmp_echo(i),
    "udp_echo": lambda i: udp(7, b"x" * (i % 40)),
    "udp_sink": lambda i: udp(9, b"sink"),
    "arp": lambda i: arp_request(),
    "unknown": lambda i: numbered(bytes.fromhex("02aaaaaaaa01"), GUEST_MAC, i),
    "to_host": lambda i: numbered(HOST_MAC, GUEST_MAC, i),
    "bad_ip": bad_ip_checksum,
    "runt": lambda i: GUEST_MAC[:6],
    "long_echo": lambda i: icmp_echo(i, b"p" * 1400),
    "jumbo_udp": lambda i: udp(7, b"j" * 5000),
}


def _used(fe: VirtioNetFrontend, index: int) -> list[tuple[int, int]]:
    """Queue ``index``'s used ring as the driver sees it: (id, len) of every element so far
    (split rings: the used idx and the elements, read from guest memory)."""
    q = fe.queues[index]
    used = q.ring_gpas[2]
    idx = struct.unpack("<H", fe.mem.read(used + 2, 2))[0]
    size = fe.ring_size
    out = []
    for i in range(idx):
        ident, length = struct.unpack("<II", fe.mem.read(used + 4 + 8 * (i % size), 8))
        out.append((ident, length))
    return out


def serve_batch(
    tmp: Path,
    kinds: list[str],
    *,
    turn: bool,
    prefill: int = 0,
    ring_size: int = 32,
    features: int = DEFAULT_FEATURES,
    rx_buf_size: int = 2048,
    needs_csum: bool = False,
    tx_buf_size: int = 2048,
    skipped_out: list[int] | None = None,
) -> tuple[dict[str, Any], Counter[str]]:
    """One batch of ``kinds`` through a fresh device: (record, the turns by end stage).
    ``prefill``: frames flooded to the NIC first, taking that many RX buffers."""
    path = str(tmp / f"nic-{turn}.sock")
    frames = [FRAMES[k](i) for i, k in enumerate(kinds)]
    with Device(notify_watch="off") as device:
        device.echo_turn.enabled = turn
        nic = device.add_nic(path)
        ch = device.open_channel("host")
        ch.send([numbered(b"\xff" * 6, HOST_MAC, 0)])  # the switch learns HOST_MAC
        device.switch.fdb[RESPONDER_MAC] = device.responder.name  # as after its first reply
        device.start()
        fe = VirtioNetFrontend(
            path,
            ring_size=ring_size,
            features=features,
            rx_buf_size=rx_buf_size,
            tx_buf_size=tx_buf_size,
        )
        try:
            if prefill:
                ch.send([numbered(b"\xff" * 6, HOST_MAC, 100 + i) for i in range(prefill)])
                deadline = time.monotonic() + 5
                while len(_used(fe, 0)) < prefill and time.monotonic() < deadline:
                    time.sleep(0.005)
                assert len(_used(fe, 0)) == prefill
            kicks: list[int] = []
            real_kick = fe.kick
            fe.kick = lambda q, force=False: kicks.append(q.index)  # type: ignore[method-assign]
            vnet = NEEDS_CSUM_VNET if needs_csum else None
            assert fe.send(frames, vnet=vnet) == len(frames)
            real_kick(fe.txq(), force=True)  # the whole batch, one kick
            deadline = time.monotonic() + 5
            while len(_used(fe, 1)) < len(frames) and time.monotonic() < deadline:
                time.sleep(0.002)
            assert len(_used(fe, 1)) == len(frames)
            time.sleep(0.05)
            device.stop()  # joins the NIC's thread: the kick's work is done
            pool = device.pool
            stats = device.stats()
            for n in stats["nics"]:  # type: ignore[attr-defined]
                n.pop("socket")
                # The RX kick batch's fallback checks are timer polls (rxbatch.py): how many
                # ran by the stop is the clock's, not the path's.
                n["rx_kick_batch"].pop("checks")
                n["rx_kick_batch"].pop("fallbacks")
            record = {
                "tx_used": _used(fe, 1),
                "rx_used": _used(fe, 0),
                "received": fe.recv(timeout=0.0),
                "stats": stats,
                "fdb": dict(device.switch.fdb),
                "backlog": list(nic.backlog),
                "free_pkts": list(pool._free_pkts),
                "free_ext": list(pool._free_ext),
            }
            turn = device.echo_turn
            skip = turn._skip.get(nic.name, 0)
            # After a turn whose traffic went elsewhere, SKIP_BATCHES batches that carry
            # packets go stage by stage (asking does not count one), then turns resume
            # (with the turn off, ready() says no throughout).
            want = 0 if turn.enabled and not nic.backlog else None  # frames waiting: no turn
            held = [turn.ready(nic) for _ in range(3)]
            assert held == [None if skip else want] * 3, (skip, held)
            for _ in range(skip):
                turn.forwarded_by(nic.name)
            assert turn.ready(nic) == want, skip
            skipped = skip
        finally:
            fe.close()
            ch.close()
        if skipped_out is not None:
            skipped_out.append(skipped)
        return record, Counter(device.echo_turn.stages)


def both(tmp: Path, kinds: list[str], **kw: Any) -> Counter[str]:
    """The batch with the turn and without: equal records; the turns' end stages."""
    on, stages = serve_batch(tmp, kinds, turn=True, **kw)
    off, off_stages = serve_batch(tmp, kinds, turn=False, **kw)
    assert not off_stages
    assert sum(stages.values()) >= 1
    for key in on:
        assert on[key] == off[key], key
    return stages


def batch_stage(stages: Counter[str]) -> str:
    """Where the batch's turn ended: the one stage past "tx" (later turns find the ring
    empty and end at "tx"), or "tx" when none went past it."""
    past = [s for s in stages if s != "tx"]
    assert len(past) <= 1 and sum(stages[s] for s in past) <= 1, stages
    return past[0] if past else "tx"


def test_plain_echoes_go_all_the_way_and_leave_what_the_stages_leave(tmp_path: Path) -> None:
    stages = both(tmp_path, ["echo"] * 5 + ["udp_echo"] * 3 + ["long_echo"])
    assert batch_stage(stages) == "done"


def test_traffic_not_for_the_responder_skips_the_next_batches_turns(tmp_path: Path) -> None:
    skipped: list[int] = []
    _record, stages = serve_batch(tmp_path, ["to_host"], turn=True, skipped_out=skipped)
    assert stages["forward"] == 1
    # No turn after the forward one (any "tx" turn is the ring's start, before the batch),
    # and no batch with packets came after it: the whole skip is left.
    assert stages["done"] == 0
    assert skipped[0] == SKIP_BATCHES


@pytest.mark.parametrize(
    ("kinds", "stage"),
    [
        (["runt", "echo"], "tx"),  # the TX burst stops at the runt
        (["echo", "arp", "echo"], "forward"),  # a broadcast floods
        (["unknown", "echo"], "forward"),  # an unknown MAC floods
        (["to_host", "echo"], "forward"),  # two destinations
        (["echo", "udp_sink", "bad_ip", "echo"], "done"),  # verdicts that drop, and replies
        (["udp_sink", "bad_ip"], "done"),  # nothing to answer
    ],
)
def test_a_turn_that_stops_at_a_stage_hands_over_exactly(
    tmp_path: Path, kinds: list[str], stage: str
) -> None:
    assert batch_stage(both(tmp_path, kinds)) == stage


def test_a_checksum_the_tx_burst_completes_goes_all_the_way(tmp_path: Path) -> None:
    assert batch_stage(both(tmp_path, ["echo"] * 3, needs_csum=True)) == "done"


def test_a_multi_buffer_request_stops_at_the_responder(tmp_path: Path) -> None:
    kinds = ["echo", "jumbo_udp", "echo"]
    assert batch_stage(both(tmp_path, kinds, tx_buf_size=8192)) == "responder"


def test_a_guest_short_of_rx_buffers_stops_at_the_rx_burst(tmp_path: Path) -> None:
    # 16 RX buffers, 12 taken first: 4 of the 8 replies fit, 4 wait in the backlog.
    stages = both(tmp_path, ["echo"] * 8, ring_size=16, prefill=12)
    assert batch_stage(stages) == "rx"


def test_small_rx_buffers_without_mergeable_go_to_the_reference(tmp_path: Path) -> None:
    features = DEFAULT_FEATURES & ~(1 << lib.VIRTIO_NET_F_MRG_RXBUF)
    stages = both(tmp_path, ["echo", "long_echo", "echo"], features=features, rx_buf_size=256)
    assert batch_stage(stages) == "rx"


@settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    kinds=st.lists(st.sampled_from(sorted(FRAMES)), min_size=1, max_size=12),
    prefill=st.integers(0, 30),  # of 32 RX buffers: from all free to nearly none
)
def test_any_mix_of_frames_ends_the_same_with_or_without_the_turn(
    tmp_path: Path, kinds: list[str], prefill: int
) -> None:
    both(tmp_path, kinds, prefill=prefill, tx_buf_size=8192)


def test_an_idle_poll_loop_keeps_the_batches_a_skip_holds_back(tmp_path: Path) -> None:
    """Busy-poll mode asks whether to spin for the TX ring every iteration; that question
    must not count as a batch, or an idle loop would end a skip in microseconds."""
    path = str(tmp_path / "nic0.sock")
    with Device(notify_watch="off") as device:
        nic = device.add_nic(path)
        device.start(poll=True)
        fe = VirtioNetFrontend(path, ring_size=32)
        try:
            turn = device.echo_turn
            deadline = time.monotonic() + 5
            while turn.ready(nic) is None and time.monotonic() < deadline:
                time.sleep(0.01)
            assert turn.ready(nic) == 0
            turn._skip[nic.name] = 5
            assert turn.ready(nic) is None  # the skip holds turns back
            time.sleep(0.2)  # hundreds of idle poll iterations
            assert turn._skip[nic.name] == 5
            assert fe.send([numbered(HOST_MAC, GUEST_MAC, 1)]) == 1  # a batch with a packet
            while turn._skip[nic.name] == 5 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert turn._skip[nic.name] == 4
        finally:
            fe.close()
