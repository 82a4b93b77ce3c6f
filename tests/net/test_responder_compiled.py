"""The compiled responder (switch.c ``sw_respond``) against the Python reference.

The same burst goes through two identical pools, one responder answering in C and one in
Python (``compiled=False``); everything either leaves behind is compared: the outbox (the
packet indices, in order), every byte of the data buffers, every trusted metadata array,
the free lists, the pool's counters and the responder's.  The C answers in place while the
reference frees the request and allocates the reply, so this is also the proof that the
in-place reply is the reference's allocation exactly.

The frames are built with dpkt (its checksums, not vdev's), then bent: a byte changed,
cut short, padded, IP options, odd lengths, checksums moved by +1 and -1, UDP lengths
either side of the payload.  Packets the C must leave to Python are mixed in: chained
over two buffers, NEEDS_CSUM, data at an offset, a broken redzone.  The replies to valid
requests are checked on their own with dpkt as well.
"""

from __future__ import annotations

import struct
from typing import Any

import dpkt
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from vdev.net.responder import Responder
from vdev.skywalk import fastglue
from vdev.skywalk.arena import MD_W64, MdOff
from vdev.skywalk.pool import Pbufpool
from vdev.testing.frames import GUEST_IP, GUEST_MAC, RESPONDER_IP, RESPONDER_MAC

pytestmark = pytest.mark.skipif(not fastglue.load(), reason="no C compiler: no compiled responder")

BUF = 256  # small buffers, so a frame over 256 bytes is chained (the C leaves it to Python)
ARRAYS = (
    "pkt_state",
    "pkt_owner",
    "pkt_len",
    "pkt_nbufs",
    "pkt_pflags",
    "pkt_l2",
    "pkt_cstart",
    "pkt_cstuff",
    "pkt_vnet",
    "b_doff",
    "b_dlen",
    "b_next",
    "b_large",
    "b_buf",
)


def _eth(ip: dpkt.Packet, dst: bytes = RESPONDER_MAC) -> bytes:
    return bytes(dpkt.ethernet.Ethernet(dst=dst, src=GUEST_MAC, type=0x0800, data=ip))


def icmp_frame(data: bytes, *, opts: bytes = b"", icmp_type: int = 8) -> bytes:
    echo = dpkt.icmp.ICMP.Echo(id=0x77, seq=3, data=data)
    ip = dpkt.ip.IP(
        src=GUEST_IP,
        dst=RESPONDER_IP,
        p=1,
        ttl=9,
        id=5,
        opts=opts,
        data=dpkt.icmp.ICMP(type=icmp_type, data=echo),
    )
    ip.hl = 5 + len(opts) // 4  # dpkt leaves the header length at 5 words
    return _eth(ip)


def udp_frame(dport: int, data: bytes, *, checksum: bool = True, opts: bytes = b"") -> bytes:
    u = dpkt.udp.UDP(sport=4321, dport=dport, data=data)
    u.ulen = 8 + len(data)
    ip = dpkt.ip.IP(src=GUEST_IP, dst=RESPONDER_IP, p=17, ttl=9, id=5, opts=opts, data=u)
    ip.hl = 5 + len(opts) // 4
    ip.len = 20 + len(opts) + u.ulen
    raw = bytes(ip)  # dpkt fills in both checksums
    if not checksum:
        raw = raw[: 20 + len(opts) + 6] + b"\0\0" + raw[20 + len(opts) + 8 :]
    return bytes(dpkt.ethernet.Ethernet(dst=RESPONDER_MAC, src=GUEST_MAC, type=0x0800)) + raw


def udp_len(frame: bytes, ulen: int) -> bytes:
    """``frame`` (UDP without IP options) with its UDP length field set to ``ulen``."""
    return frame[:38] + struct.pack("!H", ulen) + frame[40:]


def arp_frame(op: int = 1, tpa: bytes = RESPONDER_IP) -> bytes:
    arp = dpkt.arp.ARP(op=op, sha=GUEST_MAC, spa=GUEST_IP, tha=bytes(6), tpa=tpa)
    return bytes(dpkt.ethernet.Ethernet(dst=b"\xff" * 6, src=GUEST_MAC, type=0x0806, data=arp))


@st.composite
def frames(draw: Any) -> bytes:
    data = draw(st.binary(max_size=300))
    opts = draw(st.sampled_from([b"", b"\x01\x01\x01\x00", b"\x94\x04\x00\x00" * 2]))
    kind = draw(
        st.sampled_from(
            [
                "icmp",
                "icmp_reply",
                "icmp_other",
                "udp7",
                "udp9",
                "udp_nosum",
                "udp_len8",
                "udp5",
                "arp",
                "arp_reply",
                "arp_other",
                "junk",
            ]
        )
    )
    frame = {
        "icmp": lambda: icmp_frame(data, opts=opts),
        "icmp_reply": lambda: icmp_frame(data, icmp_type=0),
        "icmp_other": lambda: icmp_frame(data, icmp_type=13),  # a timestamp request
        "udp7": lambda: udp_frame(7, data, opts=opts),
        "udp9": lambda: udp_frame(9, data),
        "udp_nosum": lambda: udp_frame(7, data, checksum=False),
        # a UDP length of 8 (no data) in front of more IP payload: the segment is 8 bytes
        "udp_len8": lambda: udp_len(udp_frame(7, data, checksum=False), 8),
        "udp5": lambda: udp_frame(5, data),
        "arp": lambda: arp_frame(),
        "arp_reply": lambda: arp_frame(op=2),
        "arp_other": lambda: arp_frame(tpa=bytes([10, 0, 2, 3])),
        "junk": lambda: data,
    }[kind]()
    bend = draw(st.sampled_from(["none", "none", "byte", "cut", "pad", "field+1", "field-1"]))
    if bend == "byte" and frame:
        at = draw(st.integers(0, len(frame) - 1))
        frame = frame[:at] + bytes([draw(st.integers(0, 255))]) + frame[at + 1 :]
    elif bend == "cut":
        frame = frame[: draw(st.integers(0, len(frame)))]
    elif bend == "pad":
        frame += bytes(draw(st.integers(1, 40)))
    elif bend.startswith("field") and len(frame) >= 44:
        # a 16-bit field either side of its right value: IP total length or checksum, the
        # L4 checksum or the UDP length
        at = draw(st.sampled_from([16, 24, 14 + 20 + 2, 14 + 20 + 4, 14 + 20 + 6]))
        delta = 1 if bend == "field+1" else -1
        value = (struct.unpack_from("!H", frame, at)[0] + delta) & 0xFFFF
        frame = frame[:at] + struct.pack("!H", value) + frame[at + 2 :]
    return frame


NEEDS_CSUM = struct.pack("<BBHHHH", 1, 0, 0, 0, 34, 6) + b"\0\0"
packets = st.tuples(
    frames(),
    st.sampled_from([None, None, bytes(12), NEEDS_CSUM]),  # vnet header
    st.sampled_from([0, 0, 0, 6, 31]),  # data offset in the buffer
    st.booleans(),  # redzone broken
)


def _make(pool: Pbufpool, frame: bytes, vnet: bytes | None, doff: int, broken: bool) -> int:
    """A kernel-held packet of ``frame``; with ``doff`` its data starts that far into its
    buffer (as a channel's client may place it), when it fits one buffer."""
    if doff and len(frame) + doff <= BUF:
        pkt = pool.packet_from_bytes(bytes(doff) + frame, vnet=vnet)
        assert pkt is not None
        pool.b_doff[pkt] = doff
        pool.b_dlen[pkt] = len(frame)
        pool.pkt_len[pkt] = len(frame)
    else:
        pkt = pool.packet_from_bytes(frame, vnet=vnet)
        assert pkt is not None
    if broken:
        pool.arena.md64[pkt * MD_W64 + MdOff.REDZONE_W64] ^= 1
    return pkt


def _state(pool: Pbufpool, resp: Responder, outbox: list[int]) -> dict[str, Any]:
    lay = pool.arena.layout
    return {
        "outbox": outbox,
        "replies": [pool.packet_bytes(p) for p in outbox],
        "buffers": bytes(pool.arena.mem[lay.buf_off : lay.buf_off + pool.num_packets * BUF]),
        "free": (list(pool._free_pkts), list(pool._free_ext), list(pool._free_large)),
        "pool_stats": pool.stats_dict(),
        "responder": vars(resp.stats).copy(),
        "redzones": [
            pool.arena.md64[i * MD_W64 + MdOff.REDZONE_W64] for i in range(pool.num_packets)
        ],
        **{name: bytes(getattr(pool, name)) for name in ARRAYS},
    }


def run_both(
    burst: list[Any],
    *,
    ports: tuple[tuple[int, ...], tuple[int, ...]] = ((7,), (9,)),
    large: int = 0,
) -> dict[str, Any]:
    """``burst`` through both paths; with ``large`` the pool has that many large buffers
    (a frame over one small buffer then takes one large buffer, not a chain)."""
    states = []
    for compiled in (True, False):
        pool = Pbufpool(
            num_packets=96, buf_size=BUF, max_frags=4, num_large_bufs=large, large_buf_size=1024
        )
        try:
            resp = Responder(
                pool, compiled=compiled, udp_echo_ports=ports[0], udp_sink_ports=ports[1]
            )
            pkts = [_make(pool, *p) for p in burst]
            assert resp.deliver(pkts) == len(pkts)
            states.append({"requests": pkts, **_state(pool, resp, resp.take_outbox())})
        finally:
            pool.close()
    c, py = states
    for key in py:
        assert c[key] == py[key], key
    return c


@settings(max_examples=300, deadline=None)
@given(burst=st.lists(packets, max_size=24))
@example(
    burst=[(icmp_frame(b"x" * 7, opts=b"\x01\x01\x01\x00"), None, 6, False)]
)  # odd, options, offset
@example(burst=[(udp_frame(7, b"abc") + bytes(9), None, 0, False), (arp_frame(), None, 31, True)])
@example(burst=[(icmp_frame(b"y" * 400), None, 0, False), (icmp_frame(b"z"), NEEDS_CSUM, 0, False)])
def test_compiled_responder_leaves_what_the_reference_leaves(burst: list[Any]) -> None:
    run_both(burst)


@settings(max_examples=60, deadline=None)
@given(burst=st.lists(packets, max_size=12))
def test_large_buffers_are_left_to_the_reference(burst: list[Any]) -> None:
    """A frame in a large buffer (one buflet, not chained) is Python's too."""
    run_both(burst, large=8)


@pytest.mark.parametrize(
    "frame, cut",
    [(icmp_frame(b"stale"), 13), (arp_frame(), 41), (udp_frame(7, b"u"), 33)],
    ids=["icmp-13", "arp-41", "udp-33"],
)
def test_a_runt_over_a_whole_stale_request_is_ignored(frame: bytes, cut: int) -> None:
    """The buffer still holds a whole request but the packet's length says it is shorter
    than its headers (a client shortened it in place): nothing past the length is read."""
    out: list[dict[str, Any]] = []
    for compiled in (True, False):
        pool = Pbufpool(num_packets=8, buf_size=BUF, max_frags=4)
        try:
            resp = Responder(pool, compiled=compiled)
            pkt = _make(pool, frame, None, 0, False)
            pool.b_dlen[pkt] = pool.pkt_len[pkt] = cut
            resp.deliver([pkt])
            out.append(_state(pool, resp, resp.take_outbox()))
        finally:
            pool.close()
    assert out[0] == out[1]
    assert out[0]["outbox"] == [] and out[0]["responder"]["ignored"] == 1


@pytest.mark.parametrize(
    "ports", [((7,), (9,)), ((7, 9), (9,)), ((), ()), ((5, 7, 1000), (5,))], ids=str
)
@settings(max_examples=40, deadline=None)
@given(burst=st.lists(packets, max_size=12))
def test_the_ports_are_the_ones_configured(ports: Any, burst: list[Any]) -> None:
    """Sink before echo, several of each, none at all: the C reads the ports it is given."""
    run_both(burst, ports=ports)


def _checked(reply: bytes) -> dpkt.ethernet.Ethernet:
    """dpkt's parse of a reply, its checksums recomputed by dpkt and compared."""
    eth = dpkt.ethernet.Ethernet(reply)
    assert eth.dst == GUEST_MAC and eth.src == RESPONDER_MAC
    if eth.type == 0x0800:
        ip = eth.data
        got_ip, got_l4 = ip.sum, ip.data.sum
        ip.sum = 0
        ip.data.sum = 0
        if isinstance(ip.data, dpkt.udp.UDP):
            assert got_l4 == 0  # the responder sends UDP without a checksum
            ip.data.sum = 0
            fresh = dpkt.ip.IP(bytes(ip))
        else:
            fresh = dpkt.ip.IP(bytes(ip))  # dpkt recomputes the zeroed sums
            assert fresh.data.sum == got_l4
        assert fresh.sum == got_ip
        assert (ip.src, ip.dst, ip.ttl, ip.id, ip.hl) == (RESPONDER_IP, GUEST_IP, 64, 0, 5)
        assert reply[20:22] == b"\x40\x00"  # flags DF, fragment offset 0
    return eth


@pytest.mark.parametrize("doff", [0, 6, 31])
@pytest.mark.parametrize("size", [0, 1, 2, 57, 180])
def test_replies_are_what_dpkt_reads_them_as(size: int, doff: int) -> None:
    """Valid requests of every kind, at several data offsets: dpkt checks each reply."""
    data = bytes(range(size % 256))[:size] * 1
    burst = [
        (icmp_frame(data), None, doff, False),
        (icmp_frame(data, opts=b"\x01\x01\x01\x00"), None, doff, False),
        (udp_frame(7, data), None, doff, False),
        (udp_frame(7, data, checksum=False), bytes(12), doff, False),
        (arp_frame(), None, doff, False),
    ]
    out = run_both(burst)
    icmp, icmp_opts, u, u0, arp = (_checked(r) for r in out["replies"])
    for e in (icmp, icmp_opts):
        assert e.data.data.type == 0 and e.data.data.data.data == data and e.data.data.data.seq == 3
    for e in (u, u0):
        assert (e.data.data.sport, e.data.data.dport, e.data.data.data) == (7, 4321, data)
    assert arp.type == 0x0806 and arp.data.op == 2
    assert (arp.data.sha, arp.data.spa, arp.data.tha, arp.data.tpa) == (
        RESPONDER_MAC,
        RESPONDER_IP,
        GUEST_MAC,
        GUEST_IP,
    )
    assert out["responder"]["icmp_replies"] == 2 and out["responder"]["udp_replies"] == 2
    assert out["responder"]["arp_replies"] == 1
    assert out["outbox"] == out["requests"]  # each reply in its request's packet, in order


def test_a_chained_packet_mid_burst_is_answered_by_the_reference_in_order() -> None:
    """The C stops at the packet it cannot judge (chained over two buffers); Python answers
    it, the C resumes: four replies, in the burst's order, the middle one from Python."""
    small, big = icmp_frame(b"s"), icmp_frame(b"b" * 300)
    pool = Pbufpool(num_packets=16, buf_size=BUF, max_frags=4)
    try:
        resp = Responder(pool, compiled=True)
        answered: list[bytes] = []
        real = resp.answer
        resp.answer = lambda f: answered.append(f) or real(f)  # type: ignore[method-assign]
        pkts = [pool.packet_from_bytes(f) for f in (small, small, big, small)]
        resp.deliver([p for p in pkts if p is not None])
        out = resp.take_outbox()
        assert answered == [big]  # only the chained one went through the Python parse
        assert out == pkts and resp.stats.icmp_replies == 4
        assert len(pool.packet_bytes(out[2])) == len(big) - 0 and pool.stats.in_use == 4
    finally:
        pool.close()


def test_a_closed_pool_is_left_to_the_reference() -> None:
    """After close the C must not touch the pool's arrays: the reference's PoolError."""
    pool = Pbufpool(num_packets=8)
    resp = Responder(pool, compiled=True)
    pkt = pool.packet_from_bytes(icmp_frame(b"x"))
    assert pkt is not None
    pool.close()
    with pytest.raises(Exception, match="closed"):
        resp.deliver([pkt])


@pytest.mark.parametrize("how", ["client-held", "freed"])
def test_a_packet_not_the_kernels_is_refused_as_the_reference_refuses_it(how: str) -> None:
    """A packet not held by the kernel (a channel's client owns it, or it was freed) is not
    the C's to answer: both paths raise the reference's PoolError and leave the same pool."""
    from vdev.skywalk.pool import PoolError

    states = []
    for compiled in (True, False):
        pool = Pbufpool(num_packets=16, buf_size=BUF, max_frags=4)
        try:
            resp = Responder(pool, compiled=compiled)
            pkts = [_make(pool, icmp_frame(b"p"), None, 0, False) for _ in range(3)]
            if how == "freed":
                pool.free_packets([pkts[1]])
            else:
                pool.pkt_owner[pkts[1]] = 5
            with pytest.raises(PoolError, match=f"packet {pkts[1]}") as err:
                resp.deliver(pkts)
            states.append((str(err.value), _state(pool, resp, resp.take_outbox())))
        finally:
            if how != "freed":
                pool.pkt_owner[pkts[1]] = -1
            pool.close()
    assert states[0] == states[1]
    assert states[0][1]["outbox"] == [pkts[0]]  # the first was answered before the refusal


def test_a_short_frame_in_a_large_buffer_is_read_from_the_large_buffer() -> None:
    """A large buffer holding a frame that would fit a small one (a client may shorten a
    packet in place): its bytes are the large buffer's, which the C leaves to Python."""
    request = icmp_frame(b"in a large buffer")
    out: list[dict[str, Any]] = []
    for compiled in (True, False):
        pool = Pbufpool(
            num_packets=8, buf_size=BUF, max_frags=4, num_large_bufs=2, large_buf_size=1024
        )
        try:
            resp = Responder(pool, compiled=compiled)
            pkt = _make(pool, request.ljust(BUF + 1, b"\0"), None, 0, False)
            assert pool.b_large[pkt] == 1
            pool.b_dlen[pkt] = pool.pkt_len[pkt] = len(request)
            resp.deliver([pkt])
            out.append(_state(pool, resp, resp.take_outbox()))
        finally:
            pool.close()
    assert out[0] == out[1]
    assert out[0]["responder"]["icmp_replies"] == 1
    assert _checked(out[0]["replies"][0]).data.data.data.data == b"in a large buffer"
