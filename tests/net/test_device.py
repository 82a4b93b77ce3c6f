"""The virtio-net device end to end through the QEMU-free frontend (real sockets, real rings),
on split rings; the tests that do not depend on the ring format (responder, exact counts,
mergeable RX, multiqueue, reconnect) run on split and packed rings in test_packed.py."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from vdev.abi import lib
from vdev.net.device import Device
from vdev.testing.frames import (
    GUEST_MAC,
    HOST_MAC,
    icmp_echo,
    numbered,
    seq_of,
    udp,
)
from vdev.testing.frontend import VirtioNetFrontend

from .conftest import FrontendFactory, drain_channel, kills, open_fds, still_receives, wait_for_kill

# -- RX buffers ---------------------------------------------------------------------------------


def test_without_mrg_rxbuf_one_buffer_per_frame(frontend: FrontendFactory, device: Device) -> None:
    ch = device.open_channel("host", alloc_nbufs=2)
    no_mrg = ~(1 << lib.VIRTIO_NET_F_MRG_RXBUF) & ((1 << 64) - 1)
    fe = frontend(features=no_mrg, rx_buf_size=1600)
    assert not fe.has(lib.VIRTIO_NET_F_MRG_RXBUF)
    small = numbered(GUEST_MAC, HOST_MAC, 1, 1500)
    big = numbered(GUEST_MAC, HOST_MAC, 2, 3000)
    ch.send([small, big, small])
    got = fe.recv(3, timeout=1.0)
    assert got == [small, small]  # the big one does not fit one 1600-byte buffer
    reasons = device.stats()["nics"][0]["queues"]["rx0"]["drop_reasons"]  # type: ignore[index]
    assert reasons == {"rx_buffer_too_small": 1}
    ch.close()


def test_legacy_driver_10_byte_header(frontend: FrontendFactory, device: Device) -> None:
    legacy = ~((1 << lib.VIRTIO_F_VERSION_1) | (1 << lib.VIRTIO_NET_F_MRG_RXBUF)) & ((1 << 64) - 1)
    fe = frontend(features=legacy)
    assert fe.hdr_len == 10
    fe.send([icmp_echo(3)])
    (reply,) = fe.recv(1, timeout=2)
    assert reply[34] == 0 and struct.unpack_from("!H", reply, 40)[0] == 3


def rfc1071(data: bytes) -> int:
    """Brute-force RFC 1071 oracle: add 16-bit words one by one, folding every carry back in
    at once (the "end-around carry"), then complement.  Independent of vdev.net.checksum."""
    if len(data) % 2:
        data += b"\0"
    acc = 0
    for i in range(0, len(data), 2):
        acc += (data[i] << 8) | data[i + 1]
        acc = (acc & 0xFFFF) + (acc >> 16)
    return ~acc & 0xFFFF


def test_tx_checksum_offload_is_completed(frontend: FrontendFactory, device: Device) -> None:
    """With CSUM the guest seeds the UDP checksum with the pseudo-header sum (as Linux does)
    and the device finishes it: the result must equal what dpkt computes for the datagram.

    Verified against dpkt and a brute-force RFC 1071 sum, not vdev's own function: a broken
    end-around carry in ``ones_complement_sum`` (0x7aa6 where dpkt says 0x7aa4) passed the
    old self-check.  The payload (0xff bytes) makes the word sum carry many times over.
    Mutation killed: tools/mutants/section5.toml ``csum-*``.
    """
    import dpkt

    ch = device.open_channel("host")
    fe = frontend()
    assert fe.has(lib.VIRTIO_NET_F_CSUM)
    payload = b"\xff" * 40 + b"payload!"
    frame = bytearray(udp(5000, payload, dst_mac=HOST_MAC))
    udp_len = len(frame) - 34
    pseudo = bytes(frame[26:34]) + struct.pack("!BBH", 0, 17, udp_len)
    raw = sum(struct.unpack(f"!{len(payload) // 2}H", payload))
    assert raw >> 16 >= 10  # the end-around carry is exercised, many times
    seed = ~rfc1071(pseudo) & 0xFFFF  # the folded pseudo-header sum, not complemented
    frame[40:42] = struct.pack("!H", seed)
    vnet = struct.pack("<BBHHHHH", lib.VIRTIO_NET_HDR_F_NEEDS_CSUM, 0, 0, 0, 34, 6, 0)
    fe.send([bytes(frame)], vnet=vnet)
    (got,) = drain_channel(ch, 1)
    assert got[:40] == frame[:40] and got[42:] == frame[42:]
    ip = dpkt.ethernet.Ethernet(got).data
    completed = ip.data.sum
    ip.data.sum = 0
    ip.sum = 0
    want = dpkt.ip.IP(bytes(ip)).data.sum  # dpkt computes the UDP checksum itself
    assert completed == want
    assert completed == rfc1071(pseudo + got[34:40] + b"\0\0" + got[42:])
    ch.close()


# -- the ring contract: violations kill one queue, not the device ---------------------------


def test_avail_idx_jump_is_head_oob(frontend: FrontendFactory, device: Device) -> None:
    fe = frontend()
    tx = fe.txq(0)
    tx.driver.set_avail_idx(fe.ring_size + 5)
    fe.kick(tx, force=True)
    assert wait_for_kill(device) == {"HEAD_OOB": 1}
    err = device.nics[0].kill_log[0][1]
    assert "ahead of last_avail_idx" in err.detail
    still_receives(device, fe)  # RX on the same NIC keeps working


@pytest.mark.parametrize(
    "hostile",
    ["outside_memory", "writable_on_tx", "loop", "head_out_of_range"],
)
def test_descriptor_violations_are_internalize_failed(
    frontend: FrontendFactory, device: Device, hostile: str
) -> None:
    fe = frontend()
    drv = fe.txq(0).driver
    buf = fe.mem.alloc(4096)
    if hostile == "outside_memory":
        drv.write_desc(0, 0x7000_0000_0000, 64, 0, 0)
        drv.post_head(0)
    elif hostile == "writable_on_tx":
        drv.write_desc(0, buf, 64, lib.VRING_DESC_F_WRITE, 0)
        drv.post_head(0)
    elif hostile == "loop":
        drv.post_head(drv.make_loop((buf, 64)))
    else:
        drv.post_head(fe.ring_size + 3)
    fe.kick(fe.txq(0), force=True)
    assert wait_for_kill(device) == {"INTERNALIZE_FAILED": 1}
    assert kills(device)["rx0"] == {}
    still_receives(device, fe)


def test_other_nic_unaffected_by_a_defunct_queue(tmp_path: Path, device: Device) -> None:
    a, b = str(tmp_path / "a.sock"), str(tmp_path / "b.sock")
    device.add_nic(a)
    device.add_nic(b)
    device.start()
    with VirtioNetFrontend(a) as bad, VirtioNetFrontend(b) as good:
        bad.txq(0).driver.set_avail_idx(9999)
        bad.kick(bad.txq(0), force=True)
        good.send([icmp_echo(1)])
        (reply,) = good.recv(1, timeout=2)
        assert reply[34] == 0
        assert wait_for_kill(device, nic=0) == {"HEAD_OOB": 1}
        assert kills(device, 1) == {"rx0": {}, "tx0": {}}


# -- two guests through the switch -----------------------------------------------------------


def test_two_nics_talk_through_the_switch(tmp_path: Path, device: Device) -> None:
    a, b = str(tmp_path / "a.sock"), str(tmp_path / "b.sock")
    device.add_nic(a)
    device.add_nic(b)
    device.start()
    mac_a, mac_b = bytes.fromhex("525400000a0a"), bytes.fromhex("525400000b0b")
    with VirtioNetFrontend(a) as fa, VirtioNetFrontend(b) as fb:
        fa.send([numbered(b"\xff" * 6, mac_a, 0)])  # b learns nothing yet; flood
        assert [seq_of(f) for f in fb.recv(1, timeout=2)] == [0]
        fb.send([numbered(mac_a, mac_b, 1)])  # unicast to a learned MAC
        assert [seq_of(f) for f in fa.recv(1, timeout=2)] == [1]
        fa.send([numbered(mac_b, mac_a, i) for i in range(2, 50)])
        assert [seq_of(f) for f in fb.recv(48, timeout=3)] == list(range(2, 50))
        assert device.switch.fdb[mac_a] == "nic0" and device.switch.fdb[mac_b] == "nic1"


# -- vhost-user life cycle ------------------------------------------------------------------


def test_reconnect_resumes_from_vring_base(nic_path: str, device: Device) -> None:
    fds_before = open_fds()
    fe = VirtioNetFrontend(nic_path)
    fe.send([icmp_echo(i) for i in range(10)])
    assert len(fe.recv(10, timeout=2)) == 10
    bases = fe.stop()
    assert bases[1] == 10  # TX consumed 10 chains
    fe.close()
    time.sleep(0.2)
    fe2 = VirtioNetFrontend(nic_path)
    try:
        fe2.send([icmp_echo(99)])
        (reply,) = fe2.recv(1, timeout=2)
        assert struct.unpack_from("!H", reply, 40)[0] == 99
    finally:
        fe2.close()
    time.sleep(0.2)
    assert device.stats()["nics"][0]["connections"] == 2  # type: ignore[index]
    assert open_fds() - fds_before == set()


def test_disabled_rings_drop_tx_and_refuse_rx(frontend: FrontendFactory, device: Device) -> None:
    """vhost-user "Ring states": a started but disabled ring processes and discards TX and
    supplies no RX."""
    ch = device.open_channel("host")
    fe = frontend()
    fe.vhost.set_vring_enable(1, False)
    fe.vhost.set_vring_enable(0, False)
    fe.send([numbered(HOST_MAC, GUEST_MAC, i) for i in range(5)])
    deadline = time.monotonic() + 2
    while fe.reap_tx() == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert ch.recv(10, timeout=0.2) == []
    ch.send([numbered(GUEST_MAC, HOST_MAC, 1)])
    assert fe.recv(1, timeout=0.3) == []
    q = device.stats()["nics"][0]["queues"]  # type: ignore[index]
    assert q["tx0"]["drop_reasons"].get("ring_disabled") == 5
    assert q["rx0"]["drop_reasons"].get("rx_ring_down") == 1
    ch.close()


# -- capture -------------------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("tshark") is None, reason="tshark not installed")
def test_pcapng_capture_has_both_directions(
    frontend: FrontendFactory, device: Device, tmp_path: Path
) -> None:
    fe = frontend()
    fe.send([icmp_echo(i) for i in range(3)])
    assert len(fe.recv(3, timeout=2)) == 3
    assert device.capture is not None
    device.capture.flush()
    out = subprocess.run(
        ["tshark", "-r", str(tmp_path / "capture.pcapng"), "-T", "fields", "-e", "icmp.type",
         "-e", "frame.interface_name", "-e", "pkt_comment"],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout.split("\n")  # fmt: skip
    types = [line.split("\t")[0] for line in out if line]
    assert types.count("8") == 3 and types.count("0") == 3
    assert all(line.split("\t")[1] == "nic0" for line in out if line)
    flags = subprocess.run(
        ["tshark", "-r", str(tmp_path / "capture.pcapng"), "-T", "fields", "-e",
         "frame.packet_flags_direction"],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout.split()  # fmt: skip
    assert sorted({int(f, 0) for f in flags}) == [1, 2]


# -- vdev serve ----------------------------------------------------------------------------


def test_vdev_serve_cli_runs_and_cleans_up(tmp_path: Path) -> None:
    sock = tmp_path / "serve.sock"
    proc = subprocess.Popen(
        ["python3", "-m", "host.cli", "serve", "--socket", str(sock), "--mac", "52:54:00:12:34:99",
         "--kick-hold-us", "250", "--rx-kick-batch", "32"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while not sock.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sock.exists(), proc.stderr.read() if proc.poll() is not None else "no socket"
        with VirtioNetFrontend(str(sock)) as fe:
            fe.send([icmp_echo(i) for i in range(4)])
            assert len(fe.recv(4, timeout=3)) == 4
        proc.send_signal(2)
        out, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert "rx0" in out and "tx0" in out and "icmp=4" in out
    assert "kick hold 250 us" in err and "RX kick batch 32" in err
    assert not sock.exists()


def test_vdev_serve_rejects_bad_arguments(tmp_path: Path) -> None:
    sock = str(tmp_path / "x.sock")
    bad = subprocess.run(
        ["python3", "-m", "host.cli", "serve", "--socket", sock, "--queues", "9"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert bad.returncode == 2 and "--queues 9" in bad.stderr
    badmac = subprocess.run(
        ["python3", "-m", "host.cli", "serve", "--socket", sock, "--mac", "zz:00"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert badmac.returncode == 1 and "zz:00" in badmac.stderr
    assert not os.path.exists(sock)
    nodir = subprocess.run(
        ["python3", "-m", "host.cli", "serve", "--socket", str(tmp_path / "no" / "x.sock")],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert nodir.returncode == 1 and f"--socket {tmp_path / 'no' / 'x.sock'}" in nodir.stderr
    batch_range = "want 0 (half the RX ring), 1 (off) or up to 32768"
    for option, value, why in [
        ("--kick-hold-us", "-5", "want 0 (off) to 10000 us"),
        ("--kick-hold-us", "20000", "want 0 (off) to 10000 us"),
        ("--kick-hold-us", "fast", "'fast' is not a number of microseconds"),
        ("--rx-kick-batch", "-1", batch_range),
        ("--rx-kick-batch", "32769", batch_range),
        ("--rx-kick-batch", "8.5", "'8.5' is not a number of buffers"),
    ]:
        r = subprocess.run(
            ["python3", "-m", "host.cli", "serve", "--socket", sock, option, value],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert r.returncode == 2 and option in r.stderr and why in r.stderr, r.stderr
    assert not os.path.exists(sock)


def test_repeated_add_mem_reg_is_idempotent(nic_path: str, device: Device) -> None:
    """QEMU 7.2 re-sends ADD_MEM_REG for mapped regions when it restarts the vhost device
    (seen when a guest enables a second queue pair); the ring must keep working."""
    from vdev.vhost.codec import Request, encode_mem_reg
    from vdev.vhost.frontend import FrontendConfig, VhostUserError

    fe = VirtioNetFrontend(nic_path, config=FrontendConfig(add_mem_reg=True))
    try:
        first = fe.mem.regions[0]
        fe.vhost.request(Request.ADD_MEM_REG, encode_mem_reg(first), [fe.mem.fd])  # no error
        fe.send([icmp_echo(5)])
        assert len(fe.recv(1, timeout=2)) == 1
        # A region that overlaps without being identical is still refused.
        from dataclasses import replace

        with pytest.raises(VhostUserError):
            fe.vhost.request(
                Request.ADD_MEM_REG,
                encode_mem_reg(replace(first, size=first.size // 2)),
                [fe.mem.fd],
            )
    finally:
        fe.close()


def test_long_tx_burst_is_split_across_loop_turns(tmp_path: Path, device: Device) -> None:
    """A TX ring refilled faster than the device drains it must not recurse (it once did:
    one nested call per 256 chains) nor hold the device lock for the whole burst."""
    from vdev.net import nic as nic_mod

    path = str(tmp_path / "burst.sock")
    nic = device.add_nic(path)
    deferred: list[object] = []
    loop_defer = nic.defer
    assert loop_defer is not None

    def counting_defer(fn: Any) -> None:
        deferred.append(fn)
        loop_defer(fn)

    nic.defer = counting_defer
    device.start()
    ch = device.open_channel("host", ring_slots=1024)
    with VirtioNetFrontend(path, ring_size=1024) as fe:
        frames = [numbered(HOST_MAC, GUEST_MAC, i) for i in range(1000)]
        with device.lock:  # queue the whole burst before the device sees a kick
            assert fe.send(frames) == 1000
        got = drain_channel(ch, 1000)
    assert [seq_of(f) for f in got] == list(range(1000))
    assert len(deferred) >= 1000 // nic_mod.TX_BUDGET - 1
    ch.close()


def test_client_mode_connects_and_reconnects(tmp_path: Path, device: Device) -> None:
    """`vdev serve --client`: the front-end listens (QEMU server=on) and the device dials in,
    retrying until it is there, and again after the front-end goes away."""
    import threading

    path = str(tmp_path / "client.sock")
    device.add_nic(path, client=True)  # nobody listens yet: the device keeps retrying
    device.start()
    for round_ in range(2):
        result: list[VirtioNetFrontend] = []
        t = threading.Thread(target=lambda r=result: r.append(VirtioNetFrontend(path, server=True)))
        t.start()
        t.join(timeout=15)
        assert result, "device did not connect to the listening front-end"
        with result[0] as fe:
            fe.send([icmp_echo(round_)])
            (reply,) = fe.recv(1, timeout=2)
            assert struct.unpack_from("!H", reply, 40)[0] == round_
    assert device.stats()["nics"][0]["connections"] == 2  # type: ignore[index]


def test_frame_too_big_for_a_small_pool_is_dropped_by_name(tmp_path: Path) -> None:
    from vdev.skywalk import Pbufpool

    pool = Pbufpool(num_packets=256, buf_size=2048, max_frags=2)  # frames up to 4 KiB
    with Device(pool=pool) as dev:
        path = str(tmp_path / "small.sock")
        dev.add_nic(path)
        dev.start()
        ch = dev.open_channel("host", ring_slots=64, alloc_nbufs=2)
        with VirtioNetFrontend(path, tx_buf_size=8192) as fe:
            fe.send([numbered(HOST_MAC, GUEST_MAC, 1, 6000), numbered(HOST_MAC, GUEST_MAC, 2, 100)])
            got = drain_channel(ch, 1)
        assert [seq_of(f) for f in got] == [2]  # the queue kept going after the drop
        reasons = dev.stats()["nics"][0]["queues"]["tx0"]["drop_reasons"]  # type: ignore[index]
        assert reasons == {"too_big_for_pool": 1}
        ch.close()
    assert pool.stats.in_use == 0


def test_a_new_frontend_replaces_the_connected_one(nic_path: str, device: Device) -> None:
    """vdev/vhost/server.py's decision: a second connection while one is active replaces it
    (the old front-end is gone, or going); the first one's rings stop cleanly, its socket is
    closed, the newcomer is served, and nothing leaks."""
    from vdev.vhost.codec import Request
    from vdev.vhost.connection import PeerClosed

    fds_before = open_fds()
    first = VirtioNetFrontend(nic_path)
    try:
        first.send([icmp_echo(1)])
        assert len(first.recv(1, timeout=2)) == 1
        nic = device.nics[0]
        assert sorted(nic.vrings) == [0, 1]
        with VirtioNetFrontend(nic_path) as second:
            second.send([icmp_echo(2)])
            (reply,) = second.recv(1, timeout=2)
            assert struct.unpack_from("!H", reply, 40)[0] == 2
            with pytest.raises(PeerClosed):
                first.vhost.send_raw(Request.GET_FEATURES)
                first.vhost.recv_reply(timeout=2)
            entry = device.stats()["nics"][0]  # type: ignore[index]
            assert (entry["connections"], entry["replaced"]) == (2, 1)
    finally:
        first.close()

    def gone() -> bool:
        with device.lock:  # the loop drops a connection in one callback, under this lock
            return not device.sockets[0].server.connected

    deadline = time.monotonic() + 2
    while not gone() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert device.nics[0].vrings == {}
    assert open_fds() - fds_before == set()
