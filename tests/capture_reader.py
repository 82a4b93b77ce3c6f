"""An independent pcapng reader for capture tests: dpkt's block parsers, not vdev's writer.

``dpkt.pcapng.Reader`` yields only (timestamp, bytes); the tests need each Enhanced Packet
Block's interface, direction flag and every opt_comment, so this walks the blocks and lets
dpkt parse each one.  ``tshark_records`` reads the same file with tshark (a second reader,
used where it is installed).
"""

from __future__ import annotations

import shutil
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

import dpkt.pcapng as pcapng

EPB_FLAGS = 2  # pcapng spec, Enhanced Packet Block option epb_flags (dpkt has no name for it)


@dataclass(frozen=True)
class Record:
    interface: str
    direction: int  # epb_flags bits 0-1: 1 inbound (from the guest), 2 outbound (to it)
    frame: bytes
    comments: tuple[str, ...]


def read_records(path: str | Path) -> list[Record]:
    data = Path(path).read_bytes()
    names: list[str] = []
    out: list[Record] = []
    off = 0
    while off < len(data):
        block_type, length = struct.unpack_from("<II", data, off)
        block = data[off : off + length]
        off += length
        if block_type == pcapng.PCAPNG_BT_IDB:
            idb = pcapng.InterfaceDescriptionBlockLE(block)
            name = [o.data for o in idb.opts if o.code == pcapng.PCAPNG_OPT_IF_NAME]
            names.append(name[0].decode() if name else str(len(names)))
        elif block_type == pcapng.PCAPNG_BT_EPB:
            epb = pcapng.EnhancedPacketBlockLE(block)
            flags = [o.data for o in epb.opts if o.code == EPB_FLAGS]
            texts = [o.data for o in epb.opts if o.code == pcapng.PCAPNG_OPT_COMMENT]
            comments = tuple(t.decode() for t in texts)
            direction = struct.unpack("<I", flags[0])[0] & 3 if flags else 0
            out.append(Record(names[epb.iface_id], direction, bytes(epb.pkt_data), comments))
    return out


def tshark_records(path: str | Path) -> list[tuple[str, int, tuple[str, ...]]] | None:
    """(interface, direction, comments) per record as tshark reads them; None without tshark."""
    if shutil.which("tshark") is None:
        return None
    fields = ["frame.interface_name", "frame.packet_flags_direction", "frame.comment"]
    cmd = ["tshark", "-r", str(path), "-T", "fields", "-E", "occurrence=a", "-E", "aggregator=|"]
    for f in fields:
        cmd += ["-e", f]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True).stdout
    rows = []
    for line in out.splitlines():
        name, direction, comments = [*line.split("\t"), "", ""][:3]
        rows.append((name, int(direction, 0), tuple(comments.split("|")) if comments else ()))
    return rows
