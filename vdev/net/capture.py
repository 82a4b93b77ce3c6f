"""pcapng capture of what crosses each NIC, with direction flags and per-frame comments.

pcapng (not classic pcap) because a frame can carry a comment (opt_comment) and a
direction (epb_flags): the fault engine annotates the frames it touched, and tshark shows
both.  One Interface Description Block per NIC; the writer is tiny and dependency-free.
The NIC writes one record per frame, at its fate (``VirtioNet.record``), so a dropped or
corrupted frame appears once, with the notes saying what happened to it.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Sequence
from typing import BinaryIO

LINKTYPE_ETHERNET = 1
_OPT_END = 0
_OPT_COMMENT = 1
_OPT_IF_NAME = 2
_EPB_FLAGS = 2
# epb_flags bits 0-1: 01 inbound, 10 outbound (pcapng spec, "Enhanced Packet Block Flags Word").
INBOUND = 1
OUTBOUND = 2


def _pad4(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % 4)


def _option(code: int, value: bytes) -> bytes:
    return struct.pack("<HH", code, len(value)) + _pad4(value)


def _block(block_type: int, body: bytes) -> bytes:
    length = 12 + len(body)
    return struct.pack("<II", block_type, length) + body + struct.pack("<I", length)


class PcapngWriter:
    """Append-only pcapng writer; ``interface(name)`` returns the id to write frames on."""

    def __init__(self, path: str, snaplen: int = 65535) -> None:
        self.path = path
        self.snaplen = snaplen
        self._file: BinaryIO = open(path, "wb")
        self._interfaces: dict[str, int] = {}
        self.frames = 0
        shb = struct.pack("<IHHq", 0x1A2B3C4D, 1, 0, -1) + _option(_OPT_END, b"")
        self._file.write(_block(0x0A0D0D0A, shb))

    def interface(self, name: str) -> int:
        if name not in self._interfaces:
            body = struct.pack("<HHI", LINKTYPE_ETHERNET, 0, self.snaplen)
            body += _option(_OPT_IF_NAME, name.encode()) + _option(_OPT_END, b"")
            self._file.write(_block(0x00000001, body))
            self._interfaces[name] = len(self._interfaces)
        return self._interfaces[name]

    def write(
        self,
        interface: str,
        frame: bytes,
        direction: int = 0,
        comment: str | Sequence[str] | None = None,
    ) -> None:
        """One Enhanced Packet Block; each comment becomes its own opt_comment option."""
        if self._file.closed:
            return
        if_id = self.interface(interface)
        ts = time.time_ns() // 1000
        data = frame[: self.snaplen]
        body = struct.pack("<IIIII", if_id, ts >> 32, ts & 0xFFFFFFFF, len(data), len(frame))
        body += _pad4(data)
        comments = [comment] if isinstance(comment, str) else list(comment or ())
        for text in comments:
            body += _option(_OPT_COMMENT, text.encode()[:0xFFFF])  # a 16-bit option length
        if direction:
            body += _option(_EPB_FLAGS, struct.pack("<I", direction))
        if comments or direction:
            body += _option(_OPT_END, b"")
        self._file.write(_block(0x00000006, body))
        self.frames += 1

    def flush(self) -> None:
        if not self._file.closed:
            self._file.flush()

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()
