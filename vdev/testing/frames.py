"""Ethernet/IPv4 frame builders for tests, benchmarks and the demo (hand-packed: the formats
are fixed and tiny)."""

from __future__ import annotations

import struct

from vdev.net.responder import inet_checksum

GUEST_MAC = bytes.fromhex("525400aabbcc")
HOST_MAC = bytes.fromhex("0200000000aa")
RESPONDER_MAC = bytes.fromhex("5254000000fe")
GUEST_IP = bytes([10, 0, 2, 15])
RESPONDER_IP = bytes([10, 0, 2, 2])
ETH_TEST = 0x88B5  # IEEE local experimental ethertype


def eth(dst: bytes, src: bytes, ethertype: int, payload: bytes) -> bytes:
    return dst + src + struct.pack("!H", ethertype) + payload


def numbered(dst: bytes, src: bytes, seq: int, size: int = 64) -> bytes:
    """An experimental-ethertype frame of ``size`` bytes carrying ``seq``."""
    body = struct.pack("!I", seq)
    return eth(dst, src, ETH_TEST, body.ljust(size - 14, b"\xa5"))


def seq_of(frame: bytes) -> int:
    return int(struct.unpack_from("!I", frame, 14)[0])


def arp_request(src_mac: bytes = GUEST_MAC, src_ip: bytes = GUEST_IP) -> bytes:
    body = struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1) + src_mac + src_ip + bytes(6) + RESPONDER_IP
    return eth(b"\xff" * 6, src_mac, 0x0806, body)


def ipv4(
    src: bytes, dst: bytes, proto: int, payload: bytes, *, ident: int = 1, checksum: bool = True
) -> bytes:
    """An IPv4 header (no options, DF clear, TTL 64) then payload; the header checksum is
    valid, or left 0 with ``checksum=False`` (tests that never look at it)."""
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), ident, 0, 64, proto, 0, src, dst)
    if checksum:
        hdr = hdr[:10] + struct.pack("!H", inet_checksum(hdr)) + hdr[12:]
    return hdr + payload


def icmp_echo(seq: int, data: bytes = b"vdev-ping") -> bytes:
    icmp = struct.pack("!BBHHH", 8, 0, 0, 0x1234, seq) + data
    icmp = icmp[:2] + struct.pack("!H", inet_checksum(icmp)) + icmp[4:]
    return eth(RESPONDER_MAC, GUEST_MAC, 0x0800, ipv4(GUEST_IP, RESPONDER_IP, 1, icmp))


def udp(
    dport: int,
    data: bytes,
    sport: int = 40000,
    dst_mac: bytes = RESPONDER_MAC,
    src_mac: bytes = GUEST_MAC,
    src_ip: bytes = GUEST_IP,
    dst_ip: bytes = RESPONDER_IP,
    *,
    ip_id: int = 1,
    ip_checksum: bool = True,
) -> bytes:
    """A UDP/IPv4 frame; UDP checksum 0 ("none", RFC 768)."""
    u = struct.pack("!HHHH", sport, dport, 8 + len(data), 0) + data
    ip = ipv4(src_ip, dst_ip, 17, u, ident=ip_id, checksum=ip_checksum)
    return eth(dst_mac, src_mac, 0x0800, ip)


def tcp(
    dport: int,
    sport: int = 40000,
    dst_mac: bytes = RESPONDER_MAC,
    src_mac: bytes = GUEST_MAC,
    src_ip: bytes = GUEST_IP,
    dst_ip: bytes = RESPONDER_IP,
    *,
    flags: int = 0x02,
    window: int = 1024,
    ip_id: int = 1,
    ip_checksum: bool = True,
) -> bytes:
    """A TCP/IPv4 segment without options or payload (default flags SYN); TCP checksum 0."""
    t = struct.pack("!HHIIBBHHH", sport, dport, 0, 0, 0x50, flags, window, 0, 0)
    ip = ipv4(src_ip, dst_ip, 6, t, ident=ip_id, checksum=ip_checksum)
    return eth(dst_mac, src_mac, 0x0800, ip)


TOOLS_MAGIC = 0x56444556  # "VDEV": guest/tools/vdev_tools.h, struct vdev_payload


def tools_payload(seq: int, size: int) -> bytes:
    """A payload the guest's vdev-sink counts: magic and sequence number, padded to ``size``."""
    return struct.pack("!II", TOOLS_MAGIC, seq).ljust(size, b"\0")
