"""What a buggy or hostile client can do: write the shared arena directly through cffi."""

from __future__ import annotations

from typing import Any

from vdev.abi import ffi
from vdev.skywalk import Channel
from vdev.skywalk.arena import Arena
from vdev.skywalk.channel import UserRing


def base(arena: Arena) -> Any:
    # From the mmap itself, not a memoryview: a cffi buffer export held by a memoryview
    # caught in a reference cycle (exception tracebacks!) can crash the GC.
    return ffi.from_buffer(arena.mm)


def ring_hdr(ch: Channel, ring: UserRing) -> Any:
    return ffi.cast("struct sk_ring *", base(ch.arena) + ring.off)


def slot(ch: Channel, ring: UserRing, s: int) -> Any:
    return ffi.cast("struct sk_slot *", base(ch.arena) + ring.off + ffi.sizeof("struct sk_ring"))[s]


def md(arena: Arena, idx: int) -> Any:
    return ffi.cast("struct sk_md_obj *", base(arena) + arena.layout.md_off)[idx]


def pkt(arena: Arena, idx: int) -> Any:
    return md(arena, idx).pkt


def buflet(arena: Arena, j: int) -> Any:
    return ffi.cast("struct sk_buflet *", base(arena) + arena.layout.buflet_off)[j]


def stage_tx(ch: Channel, data: bytes = b"x" * 60) -> tuple[int, int]:
    """Allocate a packet, fill it and attach it at the TX head without advancing."""
    p = ch.packet_alloc()
    assert p is not None
    ch.packet_write(p, data)
    s = ch.tx_ring.head
    ch.slot_attach_packet(ch.tx_ring, s, p)
    return p, s
