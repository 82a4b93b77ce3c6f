"""The device's built-in peer: answers ARP, ICMP echo and UDP echo on its own addresses.

It gives a guest something to ping with no test code at all (the default gateway of the
guest image points here), and it is the far end of the main demo's UDP bursts.
Frames are parsed by hand with ``struct``: the formats are fixed and tiny.

Like a real host it verifies checksums on input and drops what fails, counted by name
(``bad_ip_checksum``, ``bad_icmp_checksum``, ``bad_udp_checksum``): a frame the fault
engine corrupted on TX gets no answer, so the guest sees the loss.  A frame whose L4
checksum is legitimately not computed yet (virtio_net_hdr NEEDS_CSUM from a host channel)
is completed first, as the NIC would on the wire; the guest's TX path already completes
its own before the switch (``VirtioNet._internalize_tx``).
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass, field
from typing import Any

from vdev.net.checksum import complete_checksum, ones_complement_sum
from vdev.net.switch import COMPILED_DEFAULT
from vdev.skywalk import Pbufpool, fastglue
from vdev.skywalk.arena import MdOff

ETH_P_ARP = 0x0806
ETH_P_IP = 0x0800
IPPROTO_ICMP = 1
IPPROTO_UDP = 17
VNET_F_NEEDS_CSUM = 1  # virtio_net_hdr flags (5.1.6 "Device Operation")


def inet_checksum(data: bytes) -> int:
    """RFC 1071 Internet checksum of ``data``."""
    return ~ones_complement_sum(data) & 0xFFFF


def mac_bytes(mac: str) -> bytes:
    """Parse ``aa:bb:cc:dd:ee:ff``; ValueError names the bad text."""
    parts = mac.split(":")
    if len(parts) != 6 or not all(len(p) == 2 for p in parts):
        raise ValueError(f"bad MAC address {mac!r}: want six hex pairs like 52:54:00:12:34:56")
    try:
        return bytes(int(p, 16) for p in parts)
    except ValueError:
        raise ValueError(f"bad MAC address {mac!r}: not hex") from None


def mac_str(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


@dataclass
class ResponderStats:
    arp_replies: int = 0
    icmp_replies: int = 0
    udp_replies: int = 0
    udp_sink_packets: int = 0  # UDP frames to the sink port (counted, not answered)
    udp_sink_bytes: int = 0
    ignored: int = 0
    bad_ip_checksum: int = 0  # dropped on input, as a host's IP layer would
    bad_icmp_checksum: int = 0
    bad_udp_checksum: int = 0  # only when the checksum is not 0 ("none", RFC 768)


_COUNTERS = tuple(ResponderStats.__dataclass_fields__)
REPLY = 1  # switch.h SW_R_REPLY


class _CResponder:
    """What sw_respond takes besides the burst: the responder's addresses and ports as C
    values (rebuilt when one of them changes), the verdict array and the result."""

    def __init__(
        self, ffi: Any, lib: Any, key: tuple[int, bytes, tuple[int, ...], tuple[int, ...]]
    ) -> None:
        order = [lib.SW_C_ARP, lib.SW_C_ICMP, lib.SW_C_UDP, lib.SW_C_SINK, lib.SW_C_SINK_BYTES]
        order += [lib.SW_C_IGNORED, lib.SW_C_BAD_IP, lib.SW_C_BAD_ICMP, lib.SW_C_BAD_UDP]
        if order != list(range(len(_COUNTERS))) or lib.SW_NCOUNTS != len(_COUNTERS):
            raise AssertionError(f"switch.h's SW_C_* {order} are not ResponderStats' order")
        want = (ETH_P_ARP, ETH_P_IP, VNET_F_NEEDS_CSUM, MdOff.VNET_LEN, REPLY)
        got = (
            lib.SW_ETH_P_ARP,
            lib.SW_ETH_P_IP,
            lib.SW_VNET_F_NEEDS_CSUM,
            lib.SW_VNET_STRIDE,
            lib.SW_R_REPLY,
        )
        if got != want:  # pragma: no cover - the header and this module disagree
            raise AssertionError(f"switch.h's responder constants {got} != {want}")
        self.key = key
        self.ffi = ffi
        _mac, ip, sink, echo = key
        self.ip = int.from_bytes(ip, "big")
        self.ports = ffi.new("uint16_t[]", [*sink, *echo] or [0])
        self.n_sink, self.n_echo = len(sink), len(echo)
        self.ret = ffi.new("struct sw_resp *")
        self.cap = 0
        self.verdict: Any = None
        self.grow(ffi, 64)

    def grow(self, ffi: Any, n: int) -> None:
        self.cap = max(n, 2 * self.cap)
        self.verdict = ffi.new("uint8_t[]", self.cap)


@dataclass
class Responder:
    """Switch endpoint with one MAC and IPv4 address; ``send`` is wired by the device."""

    pool: Pbufpool
    mac: bytes = field(default_factory=lambda: mac_bytes("52:54:00:00:00:fe"))
    ip: str = "10.0.2.2"
    udp_echo_ports: tuple[int, ...] = (7,)
    udp_sink_ports: tuple[int, ...] = (9,)
    name: str = "responder"
    stats: ResponderStats = field(default_factory=ResponderStats)

    # Whether bursts are answered in C (sw_respond); None: when compiled paths are on.
    compiled: bool | None = None

    def __post_init__(self) -> None:
        self._ip = ipaddress.IPv4Address(self.ip).packed
        self.outbox: list[int] = []
        self._mac64 = int.from_bytes(self.mac, "big")
        if self.compiled is None:
            self.compiled = COMPILED_DEFAULT
        self._c: _CResponder | None = None

    def deliver(self, pkts: list[int]) -> int:
        """Answer what deserves an answer; replies collect in ``outbox`` for the device.

        With the compiled module loaded a burst is answered in C (``sw_respond``), each
        reply written into the request's own packet; what the C cannot judge from trusted
        pool state alone (a chained or large buffer, a checksum still to complete, a packet
        not the kernel's) stops the burst at that packet, which the Python reference below
        answers before the C resumes.  Both leave the same replies, counters and pool."""
        if self.compiled and fastglue._fast is not None and not self.pool._closed:
            self._answer_compiled(pkts)
        else:
            self._answer_all(pkts)
        return len(pkts)

    def compiled_state(self, n: int) -> _CResponder:
        """sw_respond's arguments for a burst of up to ``n`` packets (rebuilt when an
        address or port changed)."""
        fast = fastglue._fast
        ffi, lib = fast.ffi, fast.lib
        c = self._c
        key = (self._mac64, self._ip, self.udp_sink_ports, self.udp_echo_ports)
        if c is None or c.key != key:
            c = self._c = _CResponder(ffi, lib, key)
        if n > c.cap:
            c.grow(ffi, n)
        return c

    def _answer_compiled(self, pkts: list[int], judged: int | None = None) -> None:
        """``judged``: the first sw_respond call was made already (by the echo turn,
        vdev/net/echoturn.py) and judged that many packets, its results in the state's
        verdicts and ``ret``; the loop goes on from there."""
        lib = fastglue._fast.lib
        n = len(pkts)
        c = self.compiled_state(n)
        ctx = fastglue._ctx(self.pool)
        idx = fastglue._idx_buf(pkts)
        r = c.ret
        start = 0
        if judged is not None:
            if judged:
                self._take_verdicts(pkts[:judged], c, r)
            start = judged
            if start < n:
                self._answer_all([pkts[start]])
                start += 1
        while start < n:
            done = lib.sw_respond(
                ctx.c,
                ctx.bufs,
                idx + start,
                n - start,
                self._mac64,
                c.ip,
                c.ports,
                c.n_sink,
                c.n_echo,
                c.verdict,
                r,
            )
            if done:
                self._take_verdicts(pkts[start : start + done], c, r)
            start += done
            if start < n:  # the packet the C left: the reference's, then the C again
                self._answer_all([pkts[start]])
                start += 1

    def _take_verdicts(self, judged: list[int], c: _CResponder, r: object) -> None:
        """Book one sw_respond call: replies to the outbox, the rest freed, counters added
        (the pool's too: each reply stands for the reference's free and allocation)."""
        st = self.stats
        n_reply = r.n_reply  # type: ignore[attr-defined]
        if n_reply == len(judged):
            self.outbox.extend(judged)
        else:
            verdict = bytes(c.ffi.buffer(c.verdict, len(judged)))
            drop = [p for p, v in zip(judged, verdict, strict=True) if v != REPLY]
            if n_reply:
                self.outbox.extend(p for p, v in zip(judged, verdict, strict=True) if v == REPLY)
            self.pool.free_packets(drop)
        if n_reply:
            pst = self.pool.stats
            pst.frees += n_reply
            pst.allocs += n_reply
            pst.redzone_faults += r.redzone_faults  # type: ignore[attr-defined]
            pst.high_water = max(pst.high_water, pst.in_use)
        for name, v in zip(_COUNTERS, c.ffi.unpack(r.counts, len(_COUNTERS)), strict=True):  # type: ignore[attr-defined]
            if v:
                setattr(st, name, getattr(st, name) + v)

    def _answer_all(self, pkts: list[int]) -> None:
        for pkt in pkts:
            frame = self.pool.packet_bytes(pkt)
            vnet = self.pool.packet_vnet(pkt)
            self.pool.free_packets([pkt])
            if vnet is not None and vnet[0] & VNET_F_NEEDS_CSUM:
                # 5.1.6.2 "Packet Transmission": the checksum from csum_start to the end is
                # the device's to fill in at csum_start + csum_offset; do it as the wire would.
                start, offset = struct.unpack_from("<HH", vnet, 6)
                frame = complete_checksum(frame, start, offset)
            reply = self.answer(frame)
            if reply is None:
                continue
            out = self.pool.packet_from_bytes(reply)
            if out is not None:
                self.outbox.append(out)

    def take_outbox(self) -> list[int]:
        out, self.outbox = self.outbox, []
        return out

    def answer(self, frame: bytes) -> bytes | None:
        if len(frame) < 14:
            self.stats.ignored += 1
            return None
        dst, src, ethertype = frame[0:6], frame[6:12], struct.unpack_from("!H", frame, 12)[0]
        if ethertype == ETH_P_ARP:
            return self._arp(frame, src)
        if ethertype == ETH_P_IP and dst == self.mac:
            return self._ipv4(frame, src)
        self.stats.ignored += 1
        return None

    def _arp(self, frame: bytes, src: bytes) -> bytes | None:
        if len(frame) < 42:
            self.stats.ignored += 1
            return None
        htype, ptype, hlen, plen, op = struct.unpack_from("!HHBBH", frame, 14)
        sha, spa, _tha, tpa = frame[22:28], frame[28:32], frame[32:38], frame[38:42]
        if (htype, ptype, hlen, plen, op) != (1, ETH_P_IP, 6, 4, 1) or tpa != self._ip:
            self.stats.ignored += 1
            return None
        self.stats.arp_replies += 1
        body = struct.pack("!HHBBH", 1, ETH_P_IP, 6, 4, 2) + self.mac + self._ip + sha + spa
        return src + self.mac + struct.pack("!H", ETH_P_ARP) + body

    def _ipv4(self, frame: bytes, src: bytes) -> bytes | None:
        ip = frame[14:]
        if len(ip) < 20 or ip[0] >> 4 != 4:
            self.stats.ignored += 1
            return None
        ihl = (ip[0] & 0xF) * 4
        total = struct.unpack_from("!H", ip, 2)[0]
        if ihl < 20 or total < ihl or total > len(ip) or ip[16:20] != self._ip:
            self.stats.ignored += 1
            return None
        # RFC 1122 3.2.1.2: a datagram whose header checksum fails is silently discarded
        # (a correct header sums to 0xffff, RFC 1071).
        if ones_complement_sum(ip[:ihl]) != 0xFFFF:
            self.stats.bad_ip_checksum += 1
            return None
        proto, peer = ip[9], ip[12:16]
        payload = ip[ihl:total]
        if proto == IPPROTO_ICMP and len(payload) >= 8 and ones_complement_sum(payload) != 0xFFFF:
            self.stats.bad_icmp_checksum += 1  # RFC 792: over the whole ICMP message
            return None
        if proto == IPPROTO_ICMP and len(payload) >= 8 and payload[0] == 8:
            self.stats.icmp_replies += 1
            icmp = b"\0\0\0\0" + payload[4:]
            icmp = icmp[:2] + struct.pack("!H", inet_checksum(icmp)) + icmp[4:]
            return self._ip_frame(src, peer, IPPROTO_ICMP, icmp)
        if proto == IPPROTO_UDP and len(payload) >= 8:
            sport, dport, ulen, csum = struct.unpack_from("!HHHH", payload, 0)
            segment = payload[:ulen] if 8 <= ulen <= len(payload) else payload
            if csum != 0 and not self._udp_checksum_ok(ip[12:16], segment):
                self.stats.bad_udp_checksum += 1
                return None
            data = segment[8:]
            if dport in self.udp_sink_ports:
                self.stats.udp_sink_packets += 1
                self.stats.udp_sink_bytes += len(data)
                return None
            if dport in self.udp_echo_ports:
                self.stats.udp_replies += 1
                # UDP checksum 0 means "none" for IPv4 (RFC 768).
                udp = struct.pack("!HHHH", dport, sport, 8 + len(data), 0) + data
                return self._ip_frame(src, peer, IPPROTO_UDP, udp)
        self.stats.ignored += 1
        return None

    def _udp_checksum_ok(self, src_ip: bytes, segment: bytes) -> bool:
        """RFC 768: the sum over the pseudo-header (addresses, protocol, UDP length) and the
        datagram, checksum field included, is 0xffff."""
        pseudo = src_ip + self._ip + struct.pack("!BBH", 0, IPPROTO_UDP, len(segment))
        return ones_complement_sum(pseudo + segment) == 0xFFFF

    def _ip_frame(self, dst_mac: bytes, dst_ip: bytes, proto: int, payload: bytes) -> bytes:
        hdr = struct.pack(
            "!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 0, 0x4000, 64, proto, 0, self._ip, dst_ip
        )
        hdr = hdr[:10] + struct.pack("!H", inet_checksum(hdr)) + hdr[12:]
        return dst_mac + self.mac + struct.pack("!H", ETH_P_IP) + hdr + payload
