"""Channel: the user half of a Skywalk channel (os_channel.c semantics, in Python).

A Channel sees only the shared arena: the ring headers and slots of its five rings and the
user copy of packet metadata.  It moves ``ring_head`` and fills slots; everything else
happens in the kernel half during :meth:`Channel.sync`, which is a direct call for an
in-process channel and a request over a socket for a channel in another process (see
``remote.py``).  The user side trusts what the kernel published, but still range-checks any
index before touching memory so a corrupted arena raises :class:`ValueError` rather than
reading out of bounds.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

from vdev.abi import lib

from . import chanbatch
from .arena import (
    BUF0_W16,
    BUF0_W32,
    BUFLET_W16,
    BUFLET_W32,
    MD_W16,
    MD_W32,
    NO_INDEX,
    RING_HDR_SIZE,
    Arena,
    BufletOff,
    MdOff,
    RingOff,
    SlotOff,
)
from .errors import DefunctError, SkywalkError, SyncError, SyncKind

SD_VALID: int = lib.SK_SD_VALID
_SI = SlotOff.MD_IDX_W32
_SF = SlotOff.FLAGS_W16
_SL = SlotOff.LEN_W16

Syncer = Callable[[SyncKind], None]


@dataclass(frozen=True)
class ChannelInfo:
    """Arena offsets of a channel's rings: with the arena fd, all a client needs."""

    channel_id: int
    tx_off: int
    rx_off: int
    alloc_off: int
    free_off: int
    event_off: int

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> ChannelInfo:
        return cls(**{k: int(v) for k, v in json.loads(text).items()})


class UserRing:
    """The user's view of one ring: header words and slots in the arena."""

    def __init__(self, arena: Arena, off: int, kind: int) -> None:
        lay = arena.layout
        if not (lay.ring_off <= off and off + RING_HDR_SIZE <= lay.arena_size and off % 8 == 0):
            raise ValueError(f"ring offset {off} outside the ring region")
        self.r32 = arena.ring32
        self.r16 = arena.ring16
        self.h = (off - lay.ring_off) // 4
        self.n = self.r32[self.h + RingOff.NUM_SLOTS_W32]
        self.kind = self.r32[self.h + RingOff.KIND_W32]
        if self.kind != kind:
            raise ValueError(f"ring at {off} is of kind {self.kind}, expected {kind}")
        slots_off = off + RING_HDR_SIZE
        if self.n < 2 or slots_off + 8 * self.n > lay.arena_size:
            raise ValueError(f"ring at {off}: {self.n} slots do not fit the arena")
        self.slots_w32: int = (slots_off - lay.ring_off) // 4
        self.off = off

    # The ring indices are read modulo the slot count, as chanbatch.c reads them: whatever
    # the client scribbled there, a slot index taken from them stays inside this ring's slot
    # array (the kernel judges the raw values at the next sync).  Read as they were, a head
    # of n + 5 made send_py write its first frame past the ring's end, over the next ring.
    @property
    def head(self) -> int:
        return self.r32[self.h + RingOff.HEAD_W32] % self.n

    @head.setter
    def head(self, v: int) -> None:
        self.r32[self.h + RingOff.HEAD_W32] = v

    @property
    def tail(self) -> int:
        return self.r32[self.h + RingOff.TAIL_W32] % self.n

    @property
    def khead(self) -> int:
        return self.r32[self.h + RingOff.KHEAD_W32] % self.n

    @property
    def ready_slots(self) -> int:
        return self.r32[self.h + RingOff.READY_SLOTS_W32]

    def next(self, s: int) -> int:
        return s + 1 if s + 1 < self.n else 0

    def slot_words(self, s: int) -> tuple[int, int]:
        """(u32 index of sd_md_idx, u16 index of the slot start) for slot ``s``."""
        if not 0 <= s < self.n:
            raise ValueError(f"slot {s} out of range 0..{self.n - 1}")
        w = self.slots_w32 + 2 * s
        return w, 2 * w

    def available(self) -> int:
        """os_channel_available_slot_count: writable (TX/FREE) or readable slots."""
        n = self.n
        head = self.head
        if self.kind in (lib.SK_RING_TX, lib.SK_RING_FREE):
            d = (head - self.khead) % n
            return max(0, n - d - 1)
        return (self.tail - head) % n


class Channel:
    """User half of a channel (see module docstring); all methods mirror os_channel.c."""

    def __init__(
        self,
        arena: Arena,
        info: ChannelInfo,
        syncer: Syncer,
        *,
        closer: Callable[[], None] | None = None,
    ) -> None:
        self.arena = arena
        self.info = info
        self._syncer = syncer
        self._closer = closer
        self.tx_ring = UserRing(arena, info.tx_off, lib.SK_RING_TX)
        self.rx_ring = UserRing(arena, info.rx_off, lib.SK_RING_RX)
        self.alloc_ring = UserRing(arena, info.alloc_off, lib.SK_RING_ALLOC)
        self.free_ring = UserRing(arena, info.free_off, lib.SK_RING_FREE)
        self.event_ring = UserRing(arena, info.event_off, lib.SK_RING_EVENT)
        cfg = arena.cfg
        self._np = cfg.num_packets
        self._nbuflets = cfg.resolved_buflets()
        self._nbufs = arena.layout.num_bufs
        self.defunct: SyncError | None = None
        self.closed = False
        self.fast_ctx: object | None = None  # chanbatch.py's view of this channel

    @classmethod
    def attach(cls, fd: int, info: ChannelInfo, sync_fd: int) -> Channel:
        """Build a Channel in another process from the arena fd and a sync socket fd."""
        from .remote import RemoteSyncer

        arena = Arena.attach(fd)
        rs = RemoteSyncer(sync_fd)

        def closer() -> None:
            rs.close()  # the server sees EOF and closes the kernel half
            arena.close()

        return cls(arena, info, rs, closer=closer)

    # ------------------------------------------------------------------ state
    def _check(self) -> None:
        if self.closed:
            raise DefunctError("channel (closed)", None)
        if self.defunct is not None:
            raise DefunctError("channel", self.defunct)

    def sync(self, kind: SyncKind) -> None:
        """Ask the kernel half to run one sync; a violation makes this channel defunct."""
        self._check()
        try:
            self._syncer(kind)
        except SyncError as err:
            self.defunct = err
            raise
        except DefunctError as err:
            if self.defunct is None and err.cause is not None:
                self.defunct = err.cause
            raise

    def close(self) -> None:
        """Release the channel: the kernel reclaims every packet it still held."""
        if self.closed:
            return
        self.closed = True
        if self._closer is not None:
            self._closer()

    def __enter__(self) -> Channel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ slots
    def get_next_slot(self, ring: UserRing, slot: int | None = None) -> int | None:
        """The slot after ``slot`` (or the head slot) if it is still before tail, else None."""
        self._check()
        if slot is None:
            s = ring.head
        else:
            ring.slot_words(slot)
            s = ring.next(slot)
        return None if s == ring.tail else s

    def advance_slot(self, ring: UserRing, slot: int) -> None:
        """Hand every slot up to and including ``slot`` to the kernel (moves head)."""
        self._check()
        ring.slot_words(slot)
        ring.head = ring.next(slot)

    def set_slot_properties(self, ring: UserRing, slot: int, length: int) -> None:
        self._check()
        _, w16 = ring.slot_words(slot)
        ring.r16[w16 + _SL] = min(length, 0xFFFF)

    def slot_get_packet(self, ring: UserRing, slot: int) -> int | None:
        """The packet attached to ``slot``, or None if the slot names none."""
        self._check()
        w, w16 = ring.slot_words(slot)
        if not ring.r16[w16 + _SF] & SD_VALID:
            return None
        return ring.r32[w + _SI]

    def slot_get_length(self, ring: UserRing, slot: int) -> int:
        self._check()
        _, w16 = ring.slot_words(slot)
        return ring.r16[w16 + _SL]

    def slot_attach_packet(self, ring: UserRing, slot: int, pkt: int) -> None:
        """Name ``pkt`` in ``slot`` (TX/FREE); the kernel checks ownership at sync."""
        self._check()
        w, w16 = ring.slot_words(slot)
        if ring.r16[w16 + _SF] & SD_VALID:
            raise ValueError(f"slot {slot} already has packet {ring.r32[w + _SI]} attached")
        ring.r32[w + _SI] = pkt
        ring.r16[w16 + _SF] = SD_VALID
        ring.r16[w16 + _SL] = min(self.packet_len(pkt), 0xFFFF)

    def slot_detach_packet(self, ring: UserRing, slot: int, pkt: int) -> None:
        """Take ``pkt`` off ``slot`` (RX/EVENT/ALLOC) before the slot is released."""
        self._check()
        w, w16 = ring.slot_words(slot)
        if not ring.r16[w16 + _SF] & SD_VALID or ring.r32[w + _SI] != pkt:
            raise ValueError(f"slot {slot} does not hold packet {pkt}")
        ring.r16[w16 + _SF] = 0

    def available_slot_count(self, ring: UserRing) -> int:
        if self.closed or self.defunct is not None:
            return 0
        return ring.available()

    def pending(self, ring: UserRing) -> bool:
        """True while slots handed to the kernel (head) are not yet consumed (khead)."""
        return ring.head != ring.khead

    # ------------------------------------------------------------------ packets (user copy)
    def _md(self, pkt: int) -> tuple[int, int]:
        if not 0 <= pkt < self._np:
            raise ValueError(f"packet {pkt} out of range")
        return pkt * MD_W32, pkt * MD_W16

    def _buflets(self, pkt: int) -> list[tuple[memoryview, memoryview, int, int]]:
        """(u32 view, u16 view, u32 base, u16 base) of each buflet in the user copy."""
        a = self.arena
        b32, b16 = self._md(pkt)
        cnt = a.md16[b16 + MdOff.BUFS_CNT_W16]
        out = [(a.md32, a.md16, b32 + BUF0_W32, b16 + BUF0_W16)]
        nxt = a.md32[b32 + BUF0_W32 + BufletOff.NEXT_W32]
        while nxt != NO_INDEX and len(out) < cnt:
            if not 0 <= nxt < self._nbuflets:
                raise ValueError(f"packet {pkt}: buflet {nxt} out of range")
            out.append((a.bl32, a.bl16, nxt * BUFLET_W32, nxt * BUFLET_W16))
            nxt = a.bl32[nxt * BUFLET_W32 + BufletOff.NEXT_W32]
        return out

    def _buffer(self, u32: memoryview, u16: memoryview, w32: int, w16: int) -> memoryview:
        large = bool(u16[w16 + BufletOff.FLAGS_W16] & lib.SK_BUFLET_LARGE)
        bi = u32[w32 + BufletOff.BUF_IDX_W32]
        limit = self.arena.cfg.num_large_bufs if large else self._nbufs
        if not 0 <= bi < limit:
            raise ValueError(f"buffer {bi} out of range")
        return self.arena.buf_view(bi, large)

    def packet_len(self, pkt: int) -> int:
        b32, _ = self._md(pkt)
        return self.arena.md32[b32 + MdOff.LEN_W32]

    def packet_capacity(self, pkt: int) -> int:
        return sum(len(self._buffer(*b)) for b in self._buflets(pkt))

    def packet_write(self, pkt: int, data: bytes, vnet: bytes | None = None) -> None:
        """Fill the user copy of ``pkt`` with ``data`` across its buflets (no headroom)."""
        a = self.arena
        b32, b16 = self._md(pkt)
        pos = 0
        n = len(data)
        for u32, u16, w32, w16 in self._buflets(pkt):
            buf = self._buffer(u32, u16, w32, w16)
            chunk = min(len(buf), n - pos)
            if chunk:
                buf[:chunk] = data[pos : pos + chunk]
            u32[w32 + BufletOff.DOFF_W32] = 0
            u32[w32 + BufletOff.DLEN_W32] = chunk
            pos += chunk
        if pos < n:
            raise ValueError(f"packet {pkt} holds {pos} bytes, frame has {n}")
        a.md32[b32 + MdOff.LEN_W32] = n
        a.md16[b16 + MdOff.HEADROOM_W16] = 0
        pflags = a.md16[b16 + MdOff.PFLAGS_W16] & ~lib.SK_PKT_VNET_HDR
        if vnet is not None:
            vb = b32 * 4 + MdOff.VNET_BYTE
            a.md8[vb : vb + MdOff.VNET_LEN] = vnet
            pflags |= lib.SK_PKT_VNET_HDR
        a.md16[b16 + MdOff.PFLAGS_W16] = pflags

    def packet_read(self, pkt: int) -> bytes:
        """The packet's data as the user copy of its metadata describes it."""
        parts: list[bytes] = []
        for u32, u16, w32, w16 in self._buflets(pkt):
            buf = self._buffer(u32, u16, w32, w16)
            doff = u32[w32 + BufletOff.DOFF_W32]
            dlen = u32[w32 + BufletOff.DLEN_W32]
            if doff + dlen > len(buf):
                raise ValueError(f"packet {pkt}: data window beyond its buffer")
            parts.append(bytes(buf[doff : doff + dlen]))
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def packet_alloc(self) -> int | None:
        """Take one packet from the ALLOC ring (syncing it when empty); None if exhausted."""
        self._check()
        ring = self.alloc_ring
        if ring.available() == 0:
            self.sync(SyncKind.ALLOC)
            if ring.available() == 0:
                return None
        s = ring.head
        w, w16 = ring.slot_words(s)
        pkt = ring.r32[w + _SI]
        ring.r16[w16 + _SF] = 0
        ring.head = ring.next(s)
        return pkt

    def packet_alloc_batch(self, n: int) -> list[int]:
        """Take up to ``n`` packets from the ALLOC ring in one pass (one sync if empty)."""
        self._check()
        ring = self.alloc_ring
        avail = ring.available()
        if avail == 0:
            self.sync(SyncKind.ALLOC)
            avail = ring.available()
        k = min(n, avail)
        out: list[int] = []
        r32, r16 = ring.r32, ring.r16
        s = ring.head
        base = ring.slots_w32
        nslots = ring.n
        for _ in range(k):
            w = base + 2 * s
            out.append(r32[w + _SI])
            r16[2 * w + _SF] = 0  # detach
            s = s + 1 if s + 1 < nslots else 0
        ring.head = s
        return out

    def packet_free_batch(self, pkts: list[int]) -> None:
        """Return packets through the FREE ring, syncing it whenever it fills up."""
        self._check()
        ring = self.free_ring
        r32, r16 = ring.r32, ring.r16
        base = ring.slots_w32
        nslots = ring.n
        i = 0
        while i < len(pkts):
            room = ring.available()
            if room == 0:
                self.sync(SyncKind.FREE)
                continue
            s = ring.head
            for pkt in pkts[i : i + room]:
                w = base + 2 * s
                r32[w + _SI] = pkt
                r16[2 * w + _SF] = SD_VALID
                s = s + 1 if s + 1 < nslots else 0
            i += room
            ring.head = s

    def packet_free(self, pkt: int) -> None:
        """Return ``pkt`` through the FREE ring (syncing it when full)."""
        self._check()
        ring = self.free_ring
        if ring.available() == 0:
            self.sync(SyncKind.FREE)
        s = ring.head
        w, w16 = ring.slot_words(s)
        ring.r32[w + _SI] = pkt
        ring.r16[w16 + _SF] = SD_VALID
        ring.head = ring.next(s)

    # ------------------------------------------------------------------ conveniences
    def send(self, frames: Iterable[bytes]) -> int:
        """Send frames through the TX ring; returns how many were accepted.

        Stops early when the TX ring is full after a sync or the pool runs out of packets.
        A frame larger than one ALLOC-ring packet raises ValueError (open the channel with
        a larger ``alloc_nbufs``).  Runs in compiled bursts (``chanbatch.py``) when they are
        available; :meth:`send_py` is the Python reference.
        """
        if chanbatch.in_use():
            return chanbatch.send(self, list(frames))
        return self.send_py(frames)

    def recv(self, max: int = 256, timeout: float = 0.0) -> list[bytes]:
        """Receive up to ``max`` frames, waiting up to ``timeout`` seconds for the first.

        Compiled bursts when available, else :meth:`recv_py` (the reference).
        """
        if chanbatch.in_use():
            return chanbatch.recv(self, max, timeout)
        return self.recv_py(max, timeout)

    def send_py(self, frames: Iterable[bytes]) -> int:
        """The Python reference of :meth:`send`."""
        self._check()
        ring = self.tx_ring
        todo = list(frames)
        sent = 0
        r32, r16 = ring.r32, ring.r16
        base = ring.slots_w32
        nslots = ring.n
        while sent < len(todo):
            room = ring.available()
            if room == 0:
                self.sync(SyncKind.TX)
                room = ring.available()
                if room == 0:
                    break
            pkts = self.packet_alloc_batch(min(room, len(todo) - sent))
            if not pkts:
                break
            s = ring.head
            for i, pkt in enumerate(pkts):
                frame = todo[sent]
                try:
                    self.packet_write(pkt, frame)
                except ValueError:
                    ring.head = s
                    self.packet_free_batch(pkts[i:])
                    self.sync(SyncKind.FREE)
                    if self.pending(ring):
                        self.sync(SyncKind.TX)
                    raise
                w = base + 2 * s
                r32[w + _SI] = pkt
                r16[2 * w + _SF] = SD_VALID
                r16[2 * w + _SL] = len(frame) if len(frame) <= 0xFFFF else 0xFFFF
                s = s + 1 if s + 1 < nslots else 0
                sent += 1
            ring.head = s
        if self.pending(ring):
            self.sync(SyncKind.TX)
        return sent

    def recv_py(self, max: int = 256, timeout: float = 0.0) -> list[bytes]:
        """The Python reference of :meth:`recv`."""
        self._check()
        ring = self.rx_ring
        deadline = time.monotonic() + timeout
        out: list[bytes] = []
        while True:
            self.sync(SyncKind.RX)
            taken: list[int] = []
            s = ring.head
            tail = ring.tail
            while s != tail and len(out) < max:
                pkt = self.slot_get_packet(ring, s)
                if pkt is not None:
                    try:
                        out.append(self.packet_read(pkt))
                    except ValueError:
                        # The frames before the one refused are taken: their slots released
                        # and their packets handed back (not synced), as the compiled loop
                        # leaves them; before, they stayed detached but never freed.
                        ring.head = s
                        if taken:
                            self.packet_free_batch(taken)
                        raise
                    self.slot_detach_packet(ring, s, pkt)
                    taken.append(pkt)
                s = ring.next(s)
            ring.head = s
            if taken:
                self.packet_free_batch(taken)
                self.sync(SyncKind.FREE)
            if out or time.monotonic() >= deadline:
                return out
            time.sleep(min(0.001, max_wait(deadline)))


def max_wait(deadline: float) -> float:
    return max(0.0, deadline - time.monotonic())


__all__ = ["Channel", "ChannelInfo", "SkywalkError", "Syncer", "UserRing"]
