"""Packed rings, MQ, indirect descriptors and checksum/TSO offload in the bare driver,
each switched on from the sandbox command line and checked against the vdev device.

The device is the oracle: it validates every ring it reads (a driver bug there kills the
queue by name), its per-queue counters say which queue carried what, its vrings say which
pairs QEMU enabled, and frames are checked on the host channel (payload pattern, L4
checksums recomputed here). ``inspect`` (guest RAM) must agree with the driver's ``vq``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from host.cli_sandbox import Sandbox
from tests.guest.sandbox_support import (
    GUEST_MAC_B,
    HOST_MAC_B,
    Collector,
    drain,
    guest_frames,
    l4_checksum_ok,
    l4_pseudo_sum,
    sandbox_fixture,
    send_all,
    to_guest,
    wait_for,
)
from vdev.faults import FaultEngine
from vdev.skywalk import Channel

pytestmark = [pytest.mark.qemu, pytest.mark.slow]


def vq_lines(sb: Sandbox) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for line in sb.cmd("vq").lines:
        name, *pairs = line.split()
        out[name] = {k: int(v, 0) for k, v in (p.split("=") for p in pairs)}
    return out


def device_vring(sb: Sandbox, index: int) -> Any:
    assert sb.device is not None
    return sb.device.nics[0].vrings[index]


def tx_exact(sb: Sandbox, host: Channel, command: str, count: int) -> list[bytes]:
    col = Collector(host)
    try:
        assert sb.cmd(command, timeout=120).int("sent") == count
    finally:
        frames = col.stop()
    return frames


def rx_exact(sb: Sandbox, host: Channel, count: int, size: int) -> None:
    sb.send_line(f"rx {count} 30000")
    time.sleep(0.05)
    send_all(host, to_guest(count, size))
    reply = sb.wait_reply(60)
    assert reply.ok and reply.int("received") == count and reply.int("bad") == 0, reply.status_line
    assert reply.int("pattern") == count


# ---------------------------------------------------------------- packed rings


class TestPacked:
    @pytest.fixture(scope="class")
    def sb(self, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sandbox]:
        yield from sandbox_fixture(tmp_path_factory, append="packed=1")

    @pytest.fixture(scope="class")
    def host(self, sb: Sandbox) -> Iterator[Channel]:
        ch = sb.channel("host", ring_slots=2048, alloc_nbufs=2)  # 3000-byte frames too
        yield ch
        ch.close()

    def test_negotiated_on_both_ends(self, sb: Sandbox) -> None:
        f = sb.cmd("features").fields
        assert f["packed"] == "1" and int(f["driver"], 16) >> 34 & 1
        assert sb.device is not None
        assert sb.device.nics[0].negotiated >> 34 & 1
        for index in (0, 1):
            assert type(device_vring(sb, index).queue).__name__ == "PackedQueue"

    @pytest.mark.parametrize("batch", [1, 32, 255])
    def test_tx_wraps_the_ring(self, sb: Sandbox, host: Channel, batch: int) -> None:
        drain(host, quiet=0.05)
        count = 256 * 6 + 7
        frames = tx_exact(sb, host, f"tx {count} 60 {batch}", count)
        assert guest_frames(frames) == list(range(count))

    def test_tx_multi_buffer_chains(self, sb: Sandbox, host: Channel) -> None:
        """5000-byte frames are three buflets: three chained descriptors per buffer."""
        drain(host, quiet=0.05)
        frames = tx_exact(sb, host, "tx 300 5000 16", 300)
        assert guest_frames(frames) == list(range(300))

    @pytest.mark.parametrize(("count", "size"), [(700, 60), (700, 1514), (300, 3000)])
    def test_rx(self, sb: Sandbox, host: Channel, count: int, size: int) -> None:
        rx_exact(sb, host, count, size)

    def test_inspect_decodes_the_packed_rings(self, sb: Sandbox, host: Channel) -> None:
        drain(host, quiet=0.05)
        tx_exact(sb, host, "tx 333 100 16", 333)
        sb.send_line("rx 50 20000")
        time.sleep(0.05)
        send_all(host, to_guest(60, 90))
        assert sb.wait_reply(30).int("received") == 50
        sb.cmd("rx 0")
        vq = vq_lines(sb)
        snap = sb.introspect()
        queues = {q["kind"]: q for q in snap["queues"]}
        for kind in ("rx", "tx"):
            q, line = queues[kind], vq[f"{kind}q0"]
            assert q["packed"] and q["ring"]["consistent"]
            for key in ("avail_idx", "last_used", "in_flight", "num_free", "posted", "completed"):
                assert q["driver"][key] == line[key], (kind, key)
            # Decoded from the descriptors themselves: every outstanding buffer is either
            # still the device's or used and waiting for the driver.
            ring = q["ring"]
            assert ring["device_owned"] + ring["used_unconsumed"] == line["in_flight"]
        assert queues["tx"]["ring"]["device_owned"] == 0  # drained
        assert queues["rx"]["ring"]["device_owned"] == 256  # refilled
        # The device's own positions (vhost-user packed encoding: index | wrap << 15).
        tx = device_vring(sb, 1).queue
        assert tx.last_avail_idx == vq["txq0"]["avail_idx"]
        assert tx.used_idx | tx.used_wrap << 15 == vq["txq0"]["last_used"]
        rxq = device_vring(sb, 0).queue
        assert rxq.used_idx | rxq.used_wrap << 15 == vq["rxq0"]["last_used"]
        sb.cmd("rx 10 1000")

    def test_hostile_used_id_on_a_packed_ring(self, sb: Sandbox, host: Channel) -> None:
        assert sb.device is not None
        nf = FaultEngine.for_device(sb.device).nic(0)
        before = sb.stats()
        rule = nf.bad_used_id(queue="rx", nth=1, limit=1, mode="out_of_range", replace=True)
        try:
            sb.send_line("rx 5 3000")
            time.sleep(0.05)
            send_all(host, to_guest(5, 100))
            sb.wait_reply(30)
            assert wait_for(lambda: rule.hits == 1)
        finally:
            rule.remove()
        after = sb.stats()
        assert after["viol_used_id_range"] - before["viol_used_id_range"] == 1
        assert after["recoveries"] - before["recoveries"] == 1
        drain(host, quiet=0.1)
        rx_exact(sb, host, 100, 200)
        frames = tx_exact(sb, host, "tx 100 60 32", 100)
        assert guest_frames(frames) == list(range(100))


# ---------------------------------------------------------------- multiqueue


class TestMultiqueue:
    @pytest.fixture(scope="class")
    def sb(self, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sandbox]:
        yield from sandbox_fixture(tmp_path_factory, append="mq=2")

    @pytest.fixture(scope="class")
    def host(self, sb: Sandbox) -> Iterator[Channel]:
        ch = sb.channel("host", ring_slots=2048)
        yield ch
        ch.close()

    def test_pairs_set_through_the_control_queue(self, sb: Sandbox) -> None:
        f = sb.cmd("features").fields
        assert (f["mq"], f["max_pairs"]) == ("2", "2")
        stats = sb.stats()
        assert stats["ctrl_cmds"] == 1 and stats["ctrl_errors"] == 0
        # QEMU kept the control queue and enabled pair 1 in the backend (SET_VRING_ENABLE).
        assert wait_for(lambda: all(device_vring(sb, i).enabled for i in range(4)))
        assert [q["index"] for q in sb.introspect()["queues"]] == [0, 1, 2, 3, 4]

    def test_tx_spreads_flows_over_both_queues(self, sb: Sandbox, host: Channel) -> None:
        assert sb.device is not None
        nic = sb.device.nics[0]
        drain(host, quiet=0.05)
        before = [nic.stats[i].frames for i in (1, 3)]
        q0 = {q["index"]: q["driver"]["packets"] for q in sb.introspect()["queues"]}
        frames = tx_exact(sb, host, "tx 2000 60 32 flows=16", 2000)
        dev = [nic.stats[i].frames - b for i, b in zip((1, 3), before, strict=True)]
        q1 = {q["index"]: q["driver"]["packets"] for q in sb.introspect()["queues"]}
        assert sum(dev) == 2000 and min(dev) > 0
        assert [q1[i] - q0[i] for i in (1, 3)] == dev  # driver and device agree per queue
        seqs = guest_frames(frames)
        assert sorted(seqs) == list(range(2000))
        by_flow: dict[bytes, list[int]] = {}
        for f, s in zip([f for f in frames if f[12:14] == b"\x88\xb5"], seqs, strict=True):
            by_flow.setdefault(f[:6], []).append(s)
        assert len(by_flow) == 16
        assert all(v == sorted(v) for v in by_flow.values())  # each flow kept its order

    def test_rx_from_both_queues(self, sb: Sandbox, host: Channel) -> None:
        assert sb.device is not None
        nic = sb.device.nics[0]
        before = [nic.stats[i].frames for i in (0, 2)]
        q0 = {q["index"]: q["driver"]["packets"] for q in sb.introspect()["queues"]}
        rx_exact(sb, host, 600, 200)
        dev = [nic.stats[i].frames - b for i, b in zip((0, 2), before, strict=True)]
        q1 = {q["index"]: q["driver"]["packets"] for q in sb.introspect()["queues"]}
        assert sum(dev) == 600 and min(dev) > 0
        assert [q1[i] - q0[i] for i in (0, 2)] == dev

    def test_one_pair_leaves_the_second_disabled(self, sb: Sandbox, host: Channel) -> None:
        try:
            f = sb.cmd("features mq=1").fields
            assert (f["mq"], f["max_pairs"]) == ("1", "1")  # MQ not negotiated at all
            # After the reset QEMU uses one pair until told otherwise: pair 1 stays off.
            assert wait_for(lambda: device_vring(sb, 0).enabled and device_vring(sb, 1).enabled)
            assert sb.introspect()["queues"][-1]["index"] == 1
            for i in (2, 3):
                vr = sb.device.nics[0].vrings.get(i) if sb.device else None
                assert vr is None or not vr.enabled
            drain(host, quiet=0.05)
            frames = tx_exact(sb, host, "tx 200 60 32 flows=8", 200)
            assert sorted(guest_frames(frames)) == list(range(200))
        finally:
            assert sb.cmd("features mq=2").fields["mq"] == "2"
        assert wait_for(lambda: all(device_vring(sb, i).enabled for i in range(4)))


# ---------------------------------------------------------------- indirect descriptors


@pytest.fixture(scope="module", params=["indirect=1", "indirect=1 packed=1"])
def ind(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Sandbox]:
    yield from sandbox_fixture(tmp_path_factory, append=request.param)


def test_indirect_tables_carry_every_tx_chain(ind: Sandbox) -> None:
    assert ind.device is not None
    nf = FaultEngine.for_device(ind.device).nic(0)
    ch = ind.channel("host", ring_slots=2048)
    try:
        f = ind.cmd("features").fields
        assert f["indirect"] == "1"
        s0 = ind.stats()
        frames = tx_exact(ind, ch, "tx 300 5000 16", 300)  # three buflets per frame
        assert guest_frames(frames) == list(range(300))
        assert ind.stats()["tx_indirect"] - s0["tx_indirect"] == 300
        # Hold 100 chains in the ring (device stalled) and read them from guest RAM: each
        # buffer is one INDIRECT descriptor naming a 3-entry table (header + 5000 bytes).
        rule = nf.stall(queue="tx")
        col = Collector(ch)
        try:
            ind.send_line("tx 100 5000 16")
            assert wait_for(lambda: _tx_queue(ind)["driver"]["in_flight"] == 100)
            heads = _posted_descriptors(ind, _tx_queue(ind))
        finally:
            rule.remove()
            reply = ind.wait_reply(30)
            frames = col.stop()
        assert reply.ok and guest_frames(frames) == list(range(100))
        assert len(heads) == 100
        mem = ind.guest_memory()
        for addr, length, flags in heads:
            assert flags & 4 and not flags & 1, flags  # INDIRECT, never NEXT with it
            assert length == 3 * 16
            table = bytes(mem.gpa_view(addr, length))
            lens = [int.from_bytes(table[16 * i + 8 : 16 * i + 12], "little") for i in range(3)]
            assert sum(lens) == 5000 + 12
    finally:
        ch.close()


def _tx_queue(sb: Sandbox) -> dict[str, Any]:
    return next(q for q in sb.introspect()["queues"] if q["kind"] == "tx")


def _posted_descriptors(sb: Sandbox, q: dict[str, Any]) -> list[tuple[int, int, int]]:
    """(addr, len, flags) of the head descriptor of every buffer the device has not used,
    read from guest RAM: split via the avail ring entries, packed by ring position."""
    mem = sb.guest_memory()
    size, d = q["size"], q["driver"]
    ring = bytes(mem.gpa_view(d["desc"], 16 * size))

    def desc(i: int) -> tuple[int, int, int]:
        e = ring[16 * i : 16 * i + 16]
        fl = e[14:16] if q["packed"] else e[12:14]
        return (
            int.from_bytes(e[0:8], "little"),
            int.from_bytes(e[8:12], "little"),
            int.from_bytes(fl, "little"),
        )

    if q["packed"]:
        pos = d["last_used"] & 0x7FFF
        return [desc((pos + k) % size) for k in range(d["in_flight"])]
    avail = bytes(mem.gpa_view(d["driver"], 4 + 2 * size))
    out = []
    for k in range(d["in_flight"]):
        slot = (d["last_used"] + k) % size
        out.append(desc(int.from_bytes(avail[4 + 2 * slot : 6 + 2 * slot], "little")))
    return out


# ---------------------------------------------------------------- checksum / TSO offload


class TestOffload:
    @pytest.fixture(scope="class")
    def sb(self, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sandbox]:
        yield from sandbox_fixture(tmp_path_factory, append="csum=1 tso=1")

    @pytest.fixture(scope="class")
    def host(self, sb: Sandbox) -> Iterator[Channel]:
        ch = sb.channel("host", ring_slots=2048)
        yield ch
        ch.close()

    @pytest.fixture
    def vnets(self, sb: Sandbox) -> Iterator[list[tuple[bytes, bytes]]]:
        """(vnet header, frame) of every packet the device took off the TX queue."""
        assert sb.device is not None
        nic = sb.device.nics[0]
        seen: list[tuple[bytes, bytes]] = []

        def hook(n: Any, index: int, pkts: list[int]) -> list[int]:
            for p in pkts:
                seen.append((n.pool.packet_vnet(p) or b"", n.pool.packet_bytes(p)))
            return pkts

        nic.tx_hooks.append(hook)
        yield seen
        nic.tx_hooks.remove(hook)

    def test_udp_checksum_left_to_the_device(
        self, sb: Sandbox, host: Channel, vnets: list[tuple[bytes, bytes]]
    ) -> None:
        f = sb.cmd("features").fields
        assert (f["csum"], f["tso"]) == ("1", "1")
        drain(host, quiet=0.05)
        col = Collector(host)
        try:
            reply = sb.cmd("txip udp 50 300")
        finally:
            frames = col.stop()
        assert reply.int("csum_offload") == 50 and reply.int("csum_sw") == 0
        udp = [fr for fr in frames if fr[12:14] == b"\x08\x00" and fr[23] == 17]
        assert len(udp) == 50 and all(l4_checksum_ok(fr) for fr in udp)
        # The device completed it (flags cleared) where the driver said: 34 + 6.
        assert {(v[6:8], v[8:10]) for v, _ in vnets} == {(b"\x22\x00", b"\x06\x00")}

    def test_tso_frame_passes_with_its_header(
        self, sb: Sandbox, host: Channel, vnets: list[tuple[bytes, bytes]]
    ) -> None:
        drain(host, quiet=0.05)
        col = Collector(host)
        try:
            reply = sb.cmd("txip tcp 4 2000 mss=500")
        finally:
            col.stop()
        assert reply.int("gso") == 4 and reply.int("sent") == 4
        assert len(vnets) == 4
        for vnet, frame in vnets:
            # flags NEEDS_CSUM, gso TCPV4, hdr_len 54, gso_size 500, csum 34 + 16
            assert vnet[:10] == bytes([1, 1]) + (54).to_bytes(2, "little") + (500).to_bytes(
                2, "little"
            ) + (34).to_bytes(2, "little") + (16).to_bytes(2, "little")
            assert len(frame) == 2000
            assert int.from_bytes(frame[50:52], "big") == l4_pseudo_sum(frame)

    def test_without_the_features_the_driver_does_it(
        self, sb: Sandbox, host: Channel, vnets: list[tuple[bytes, bytes]]
    ) -> None:
        try:
            f = sb.cmd("features csum=0 tso=0").fields
            assert (f["csum"], f["tso"]) == ("0", "0")
            drain(host, quiet=0.05)
            col = Collector(host)
            try:
                reply = sb.cmd("txip udp 20 300")
                refused = sb.cmd("txip tcp 2 2000 mss=500", check=False)
            finally:
                frames = col.stop()
            assert reply.int("csum_sw") == 20 and reply.int("csum_offload") == 0
            assert not refused.ok and refused.int("gso_refused") == 2
            udp = [fr for fr in frames if fr[12:14] == b"\x08\x00" and fr[23] == 17]
            assert len(udp) == 20 and all(l4_checksum_ok(fr) for fr in udp)
            assert {v for v, _ in vnets} == {bytes(12)}  # no header for the device to act on
        finally:
            sb.cmd("features csum=1 tso=1")

    def test_partial_checksum_received_and_echoed(self, sb: Sandbox, host: Channel) -> None:
        """GUEST_CSUM: a frame with NEEDS_CSUM reaches the driver as such; echoed back it
        stays partial and the device (CSUM) completes it on the way out."""
        import dpkt

        assert sb.device is not None
        device, nic = sb.device, sb.device.nics[0]
        drain(host, quiet=0.05)
        frames = []
        for i in range(5):
            udp = dpkt.udp.UDP(sport=7000 + i, dport=9, data=bytes(range(i, i + 40)))
            udp.ulen = len(udp)
            ip = dpkt.ip.IP(src=bytes([10, 0, 2, 2]), dst=bytes([10, 0, 2, 15]), p=17, data=udp)
            ip.len = len(ip)
            eth = dpkt.ethernet.Ethernet(dst=GUEST_MAC_B, src=HOST_MAC_B, type=0x0800, data=ip)
            raw = bytearray(bytes(eth))
            raw[40:42] = l4_pseudo_sum(bytes(raw)).to_bytes(2, "big")  # partial, as a stack would
            frames.append(bytes(raw))
        vnet = bytes([1, 0, 0, 0, 0, 0]) + (34).to_bytes(2, "little") + (6).to_bytes(2, "little")
        s0 = sb.stats()
        sb.send_line("echo 5 20000")
        time.sleep(0.05)
        with device.lock:
            pkts = [device.pool.packet_from_bytes(fr, vnet + b"\0\0") for fr in frames]
            nic.inject_rx([p for p in pkts if p is not None])
        reply = sb.wait_reply(30)
        assert reply.ok and reply.int("echoed") == 5, reply.status_line
        s1 = sb.stats()
        assert s1["rx_csum_partial"] - s0["rx_csum_partial"] == 5
        assert s1["tx_csum_offload"] - s0["tx_csum_offload"] == 5
        back = [f for f in drain(host, quiet=0.2) if f[12:14] == b"\x08\x00"]
        assert len(back) == 5 and all(l4_checksum_ok(f) for f in back)
        assert {f[:6] for f in back} == {HOST_MAC_B}  # the MACs were swapped
