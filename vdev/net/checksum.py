"""Finish a partial checksum the way a NIC with checksum offload would.

With VIRTIO_NET_F_CSUM the guest may send a frame whose L4 checksum field holds only the
pseudo-header sum, with ``csum_start``/``csum_offset`` in the virtio_net_hdr (5.1.6.2
"Packet Transmission"): the device sums from csum_start to the end and stores the result
at csum_start + csum_offset.
"""

from __future__ import annotations

import array
import sys


def ones_complement_sum(data: bytes) -> int:
    """16-bit one's-complement sum of ``data`` in network byte order, folded."""
    if len(data) % 2:
        data += b"\0"
    words = array.array("H", data)
    if sys.byteorder == "little":
        words.byteswap()
    total = sum(words)
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def complete_checksum(frame: bytes, start: int, offset: int) -> bytes:
    """Return ``frame`` with the checksum at start+offset filled in.

    Offsets that do not fit inside the frame leave it untouched: the frame is then
    delivered with whatever the guest wrote, which the receiver's own checks will flag.
    """
    where = start + offset
    if start >= len(frame) or where + 2 > len(frame):
        return frame
    csum = ~ones_complement_sum(frame[start:]) & 0xFFFF
    if csum == 0 and offset == 6:
        csum = 0xFFFF  # UDP: a computed 0 is sent as all ones (RFC 768)
    return frame[:where] + csum.to_bytes(2, "big") + frame[where + 2 :]
