"""The responder checks checksums like a real host: bad ones are counted by name and dropped.

Frames are built with dpkt (it computes the checksums: an oracle independent of vdev's
``inet_checksum``), then broken on purpose one checksum at a time, on both sides of the
right value (+1 and -1), so a check that only rejects one direction fails here.

Mutations proven against (tools/mutants/section4.toml, ``resp-*``; each fails a test):
- the IPv4 header check removed, narrowed to 10 bytes, or ``!= 0xFFFF`` made ``> 0xFFFF``
  (``< 0xFFFF`` is equivalent: the folded sum never exceeds 0xFFFF);
- the ICMP check removed; the UDP check removed, made unconditional, or ``csum != 0`` made
  ``csum == 0``; the pseudo-header built without the source address;
- the NEEDS_CSUM completion in ``Responder.deliver`` removed (host-channel offload dropped).
"""

from __future__ import annotations

import struct
import time
from collections.abc import Callable
from typing import Any

import dpkt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vdev.abi import lib
from vdev.net.checksum import ones_complement_sum
from vdev.net.device import Device
from vdev.net.responder import Responder
from vdev.skywalk import fastglue
from vdev.skywalk.pool import Pbufpool
from vdev.testing.frames import GUEST_IP, GUEST_MAC, RESPONDER_IP, RESPONDER_MAC

from .conftest import FrontendFactory


def ip_packet(proto: int, payload: dpkt.Packet, **kw: int) -> dpkt.ip.IP:
    return dpkt.ip.IP(src=GUEST_IP, dst=RESPONDER_IP, p=proto, ttl=64, id=7, data=payload, **kw)


def frame_of(ip: dpkt.ip.IP) -> bytes:
    return bytes(dpkt.ethernet.Ethernet(dst=RESPONDER_MAC, src=GUEST_MAC, type=0x0800, data=ip))


def icmp_request(seq: int = 1, data: bytes = b"vdev checksum test") -> dpkt.ip.IP:
    echo = dpkt.icmp.ICMP.Echo(id=0x4242, seq=seq, data=data)
    return ip_packet(dpkt.ip.IP_PROTO_ICMP, dpkt.icmp.ICMP(type=8, code=0, data=echo))


def udp_request(data: bytes = b"echo me, checked", *, checksum: bool = True) -> dpkt.ip.IP:
    udp = dpkt.udp.UDP(sport=40000, dport=7, data=data)
    udp.ulen = 8 + len(data)
    ip = ip_packet(dpkt.ip.IP_PROTO_UDP, udp)
    ip.len = 20 + udp.ulen
    bytes(ip)  # dpkt fills in both checksums on serialisation
    if not checksum:
        udp.sum = 0
    return ip


def with_field(frame: bytes, offset: int, delta: int) -> bytes:
    """``frame`` with the 16-bit field at ``offset`` moved by ``delta`` (mod 2^16)."""
    value = (struct.unpack_from("!H", frame, offset)[0] + delta) & 0xFFFF
    return frame[:offset] + struct.pack("!H", value) + frame[offset + 2 :]


IP_SUM, L4 = 14 + 10, 14 + 20
ICMP_SUM, UDP_SUM = L4 + 2, L4 + 6


def answer(frame: bytes) -> tuple[bytes | None, dict[str, int]]:
    r = Responder(Pbufpool(num_packets=8))
    reply = r.answer(frame)
    stats = vars(r.stats)
    return reply, {k: v for k, v in stats.items() if v}


def verify_reply(reply: bytes) -> dpkt.ip.IP:
    """Parse a reply with dpkt and check its checksums against dpkt's own computation."""
    eth = dpkt.ethernet.Ethernet(reply)
    ip = eth.data
    assert isinstance(ip, dpkt.ip.IP)
    sent_ip_sum, sent_l4_sum = ip.sum, ip.data.sum
    ip.sum = 0
    ip.data.sum = 0
    fresh = dpkt.ip.IP(bytes(ip))
    assert fresh.sum == sent_ip_sum
    if isinstance(ip.data, dpkt.udp.UDP) and sent_l4_sum == 0:
        return fresh  # "no checksum" is allowed for UDP over IPv4 (RFC 768)
    assert fresh.data.sum == sent_l4_sum
    return fresh


# -- good frames are answered ---------------------------------------------------------------


def test_good_icmp_request_is_answered_with_valid_checksums() -> None:
    reply, stats = answer(frame_of(icmp_request(seq=9)))
    assert reply is not None and stats == {"icmp_replies": 1}
    ip = verify_reply(reply)
    assert ip.data.type == 0 and ip.data.data.seq == 9
    assert ip.data.data.data == b"vdev checksum test"


@pytest.mark.parametrize("checksum", [True, False], ids=["udp-sum", "udp-no-sum"])
def test_good_udp_echo_is_answered(checksum: bool) -> None:
    frame = frame_of(udp_request(checksum=checksum))
    assert (struct.unpack_from("!H", frame, UDP_SUM)[0] != 0) == checksum
    reply, stats = answer(frame)
    assert reply is not None and stats == {"udp_replies": 1}
    assert verify_reply(reply).data.data == b"echo me, checked"


def test_udp_checksum_that_computes_to_zero_is_sent_as_ffff() -> None:
    """RFC 768: a computed 0 is transmitted as all ones; it must still verify."""
    for n in range(1 << 16):  # find a payload whose checksum computes to 0 (dpkt: 0xffff)
        ip = udp_request(struct.pack("!H", n) + b"pad")
        if ip.data.sum == 0xFFFF:
            break
    else:
        pytest.fail("no payload with checksum 0 found")
    reply, stats = answer(frame_of(ip))
    assert reply is not None and stats == {"udp_replies": 1}


# -- bad checksums: both sides of the right value -------------------------------------------


@pytest.mark.parametrize("delta", [1, -1], ids=["plus1", "minus1"])
@pytest.mark.parametrize(
    ("build", "offset", "counter"),
    [
        (icmp_request, IP_SUM, "bad_ip_checksum"),
        (udp_request, IP_SUM, "bad_ip_checksum"),
        (icmp_request, ICMP_SUM, "bad_icmp_checksum"),
        (udp_request, UDP_SUM, "bad_udp_checksum"),
    ],
    ids=["icmp-ip", "udp-ip", "icmp", "udp"],
)
def test_bad_checksum_is_dropped_and_counted(
    build: Callable[[], dpkt.ip.IP], offset: int, counter: str, delta: int
) -> None:
    frame = with_field(frame_of(build()), offset, delta)
    reply, stats = answer(frame)
    assert reply is None and stats == {counter: 1}


def test_corrupted_payload_is_dropped_not_reanswered() -> None:
    """One flipped payload bit (what a TX corrupt fault does) breaks the L4 checksum."""
    for build, counter in ((icmp_request, "bad_icmp_checksum"), (udp_request, "bad_udp_checksum")):
        frame = bytearray(frame_of(build()))
        frame[-3] ^= 0x10
        assert answer(bytes(frame)) == (None, {counter: 1})


def test_udp_checksum_covers_the_pseudo_header() -> None:
    """A datagram moved to another source address (pseudo-header changed, UDP bytes and a
    re-made IP header checksum valid) must fail its UDP checksum."""
    ip = udp_request()
    ip.src = bytes([10, 0, 2, 16])
    ip.sum = 0  # dpkt recomputes the IP header sum; the UDP sum stays the old one
    frame = frame_of(ip)
    assert answer(frame) == (None, {"bad_udp_checksum": 1})


# -- through the device: TX corruption reaches the guest as loss ----------------------------


def wait_for(cond: Callable[[], bool], timeout: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout
    while not cond() and time.monotonic() < deadline:
        time.sleep(0.01)
    return cond()


def test_tx_corruption_is_visible_to_a_pinging_guest(
    frontend: FrontendFactory, device: Device
) -> None:
    from vdev.faults import FaultEngine

    engine = FaultEngine(device, seed=3)
    fe = frontend()
    try:
        with engine.nic(0).corrupt(queue="tx", nth=2, offsets=[50], mask=0x04):
            fe.send([frame_of(icmp_request(seq=s)) for s in range(3)])
            replies = fe.recv(3, timeout=1.0)
    finally:
        engine.close()
    assert sorted(dpkt.ethernet.Ethernet(r).data.data.data.seq for r in replies) == [0, 2]
    assert device.responder.stats.bad_icmp_checksum == 1
    assert device.responder.stats.icmp_replies == 2


def udp_partial(data: bytes) -> tuple[bytes, bytes]:
    """A UDP echo request whose checksum holds only the pseudo-header sum (as Linux leaves
    it with NEEDS_CSUM), and the virtio_net_hdr asking the device to finish it."""
    frame = bytearray(frame_of(udp_request(data)))
    udp_len = len(frame) - L4
    pseudo = GUEST_IP + RESPONDER_IP + struct.pack("!BBH", 0, 17, udp_len)
    frame[UDP_SUM : UDP_SUM + 2] = struct.pack("!H", ones_complement_sum(pseudo))
    vnet = struct.pack("<BBHHHHH", lib.VIRTIO_NET_HDR_F_NEEDS_CSUM, 0, 0, 0, L4, 6, 0)
    return bytes(frame), vnet


def test_needs_csum_from_the_guest_is_completed_before_the_responder(
    frontend: FrontendFactory, device: Device
) -> None:
    fe = frontend()
    frame, vnet = udp_partial(b"offloaded from the guest")
    assert answer(frame)[1] == {"bad_udp_checksum": 1}  # as sent it does not verify
    fe.send([frame], vnet=vnet)
    (reply,) = fe.recv(1, timeout=2.0)
    assert verify_reply(reply).data.data == b"offloaded from the guest"
    assert device.responder.stats.bad_udp_checksum == 0


class Collect:
    """A switch endpoint standing in for a guest: keeps the bytes of what it is given."""

    def __init__(self, name: str, pool: Pbufpool) -> None:
        self.name = name
        self.pool = pool
        self.frames: list[bytes] = []

    def deliver(self, pkts: list[int]) -> int:
        self.frames += [self.pool.packet_bytes(p) for p in pkts]
        self.pool.free_packets(pkts)
        return len(pkts)


def test_needs_csum_from_a_host_channel_is_completed_by_the_responder(device: Device) -> None:
    frame, vnet = udp_partial(b"offloaded from the host")
    sink = Collect("guest", device.pool)
    with device.lock:
        device.switch.attach(sink)
        device.switch.fdb[GUEST_MAC] = "guest"
        device.switch.fdb[RESPONDER_MAC] = device.responder.name  # no flood to the sink
        pkt = device.pool.packet_from_bytes(frame, vnet)
        assert pkt is not None
        device.forward("host", [pkt])
        device.switch.detach("guest")
    (reply,) = sink.frames
    assert verify_reply(reply).data.data == b"offloaded from the host"
    assert device.responder.stats.bad_udp_checksum == 0


# -- the compiled responder (sw_respond) against the Python parse alone -------------------

_OTHER_MAC = bytes.fromhex("020000000000")  # testpmd txonly's default peer: unknown unicast


def _frame_st() -> Any:
    from vdev.testing.frames import arp_request, eth, icmp_echo, udp

    kinds = st.sampled_from(
        ["arp", "icmp", "udp_echo", "udp_sink", "ip_other_mac", "ipv6", "runt", "junk"]
    )

    def build(kind: str, seq: int, junk: bytes) -> bytes:
        if kind == "arp":
            return arp_request()
        if kind == "icmp":
            return icmp_echo(seq)
        if kind == "udp_echo":
            return udp(7, junk)
        if kind == "udp_sink":
            return udp(9, junk)
        if kind == "ip_other_mac":
            return udp(7, junk, dst_mac=_OTHER_MAC)
        if kind == "ipv6":
            return eth(RESPONDER_MAC, GUEST_MAC, 0x86DD, junk.ljust(40, b"\0"))
        if kind == "runt":
            return junk[:13]
        return (RESPONDER_MAC + GUEST_MAC + junk).ljust(60, b"\0")

    return st.builds(build, kinds, st.integers(0, 0xFFFF), st.binary(max_size=64))


_vnet_st = st.one_of(
    st.none(),
    st.just(bytes(12)),
    # NEEDS_CSUM, the checksum written inside the Ethernet header: the compiled path must not
    # judge such a frame by the header as it was before completion
    st.builds(lambda off: struct.pack("<BBHHHH", 1, 0, 0, 0, 0, off) + b"\0\0", st.integers(0, 12)),
)


@settings(max_examples=120, deadline=None)
@given(burst=st.lists(st.tuples(_frame_st(), _vnet_st), min_size=0, max_size=40))
def test_the_compiled_responder_changes_cost_never_answers_or_counts(burst: list[Any]) -> None:
    """The same burst through a responder that answers it in C and one that parses
    every frame in Python: the same replies, in order, and the same counters."""
    outcomes = []
    for compiled in (True, False):
        pool = Pbufpool(num_packets=128, buf_size=2048, max_frags=2)
        resp = Responder(pool, compiled=compiled)
        pkts = []
        for frame, vnet in burst:
            pkt = pool.packet_from_bytes(frame, vnet=vnet)
            assert pkt is not None
            pkts.append(pkt)
        assert resp.deliver(pkts) == len(pkts)
        replies = [pool.packet_bytes(p) for p in resp.take_outbox()]
        outcomes.append((replies, resp.stats))
        pool.free_packets([p for p in range(pool.num_packets) if pool.pkt_state[p]])
        assert pool.stats.in_use == 0
        pool.close()
    assert outcomes[0] == outcomes[1]


@pytest.mark.skipif(not fastglue.load(), reason="no C compiler: no compiled responder")
def test_the_compiled_responder_frees_unknown_unicast_without_parsing_it() -> None:
    """A flood of frames to another MAC (what testpmd txonly sends to vdev serve) is
    ignored whole in C: answer() is never called for it."""
    from vdev.testing.frames import udp

    pool = Pbufpool(num_packets=64, buf_size=2048, max_frags=2)
    resp = Responder(pool, compiled=True)
    calls: list[bytes] = []
    real = resp.answer
    resp.answer = lambda f: calls.append(f) or real(f)  # type: ignore[method-assign]
    pkts = [pool.packet_from_bytes(udp(7, b"x", dst_mac=_OTHER_MAC)) for _ in range(32)]
    assert resp.deliver([p for p in pkts if p is not None]) == 32
    assert calls == [] and resp.stats.ignored == 32 and pool.stats.in_use == 0
    pool.close()


def _ocsum(data: bytes) -> int:
    """RFC 1071's ones' complement sum of 16-bit big-endian words (the test's own)."""
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def test_a_frame_whose_checksum_completion_makes_it_ipv4_is_answered_either_way() -> None:
    """NEEDS_CSUM with csum_start 0 and csum_offset 12: the completion writes the ethertype.
    The frame is built so that the completed ethertype is IPv4 (an ICMP echo to the
    responder) while the one on the wire before completion is neither ARP nor IPv4: a
    compiled path that judged the header before completion would drop what Python answers."""
    from vdev.testing.frames import icmp_echo

    good = icmp_echo(5)
    zeroed = good[:12] + b"\0\0" + good[14:]
    # the device stores ~sum(frame[0:]) at 12, the field's own content included: choose the
    # field so that the stored value is 0x0800
    v = (0xF7FF - _ocsum(zeroed)) % 0xFFFF
    frame = good[:12] + v.to_bytes(2, "big") + good[14:]
    assert (~_ocsum(frame) & 0xFFFF) == 0x0800 and v not in (0x0800, 0x0806)
    vnet = struct.pack("<BBHHHH", 1, 0, 0, 0, 0, 12) + b"\0\0"
    for compiled in (True, False):
        pool = Pbufpool(num_packets=64, buf_size=2048, max_frags=2)
        resp = Responder(pool, compiled=compiled)
        pkts = [pool.packet_from_bytes(frame, vnet=vnet) for _ in range(8)]
        resp.deliver([p for p in pkts if p is not None])
        replies = resp.take_outbox()
        assert len(replies) == 8 and resp.stats.icmp_replies == 8, compiled
        pool.free_packets(replies)
        pool.close()
