"""The shared-memory arena: one memfd holding metadata, buflets, buffers and rings.

Everything a client may touch lives in this one file descriptor, so another process can map
the same pool just from the fd (``Arena.attach``).  Objects are named by index; the layout
(region offsets) is computed once from a :class:`PoolConfig` and written into the arena
header, which an attaching process validates before trusting any offset.

Field offsets are taken from cffi (``ffi.offsetof``), never retyped: the per-slot hot path
reads and writes through typed memoryviews (``'H'``, ``'I'``, ``'Q'`` casts) indexed with the
word offsets computed here, which is much cheaper in CPython than cffi attribute access.
"""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass

from vdev.abi import ffi, lib

from .errors import PoolError

_PAGE = mmap.PAGESIZE
MD_SIZE: int = ffi.sizeof("struct sk_md_obj")
SLOT_SIZE: int = ffi.sizeof("struct sk_slot")
BUFLET_SIZE: int = ffi.sizeof("struct sk_buflet")
RING_HDR_SIZE: int = ffi.sizeof("struct sk_ring")
ARENA_HDR_SIZE: int = ffi.sizeof("struct sk_arena_hdr")
NO_INDEX: int = lib.SK_NO_INDEX
REDZONE_SEED: int = lib.SK_REDZONE_SEED
# Largest packet length a slot's 16-bit sd_len can state exactly.
SD_LEN_MAX = 0xFFFF


def _off(struct: str, *path: str) -> int:
    return int(ffi.offsetof(struct, *path))


_PKT = _off("struct sk_md_obj", "pkt")
_B0 = _PKT + _off("struct sk_packet", "buf0")
_VNET = _PKT + _off("struct sk_packet", "vnet")


class MdOff:
    """Word offsets inside one ``struct sk_md_obj`` (u16/u32/u64 units).

    Indexing a ``cast('I')`` view of the metadata region with ``idx * MD_W32 + MdOff.X_W32``
    reads field X of packet ``idx`` without building any cffi object.
    """

    REDZONE_W64 = _off("struct sk_md_obj", "pre", "redzone") // 8
    IDX_W32 = (_PKT + _off("struct sk_packet", "idx")) // 4
    LEN_W32 = (_PKT + _off("struct sk_packet", "len")) // 4
    QFLAGS_W16 = (_PKT + _off("struct sk_packet", "qflags")) // 2
    PFLAGS_W16 = (_PKT + _off("struct sk_packet", "pflags")) // 2
    BUFS_CNT_W16 = (_PKT + _off("struct sk_packet", "bufs_cnt")) // 2
    BUFS_MAX_W16 = (_PKT + _off("struct sk_packet", "bufs_max")) // 2
    HEADROOM_W16 = (_PKT + _off("struct sk_packet", "headroom")) // 2
    L2_LEN_W16 = (_PKT + _off("struct sk_packet", "l2_len")) // 2
    CSUM_START_W16 = (_PKT + _off("struct sk_packet", "csum_start")) // 2
    CSUM_STUFF_W16 = (_PKT + _off("struct sk_packet", "csum_stuff")) // 2
    VNET_BYTE = _VNET
    VNET_FLAGS_BYTE = _VNET + _off("struct sk_vnet_hdr", "flags")
    VNET_CSUM_START_W16 = (_VNET + _off("struct sk_vnet_hdr", "csum_start")) // 2
    VNET_CSUM_OFFSET_W16 = (_VNET + _off("struct sk_vnet_hdr", "csum_offset")) // 2
    VNET_LEN = 12  # the virtio_net_hdr_mrg_rxbuf part; the rest is padding
    BUF0_BYTE = _B0


class BufletOff:
    """Word offsets inside one ``struct sk_buflet`` (added to the buflet's own base)."""

    BUF_IDX_W32 = _off("struct sk_buflet", "buf_idx") // 4
    DOFF_W32 = _off("struct sk_buflet", "doff") // 4
    DLEN_W32 = _off("struct sk_buflet", "dlen") // 4
    DLIM_W32 = _off("struct sk_buflet", "dlim") // 4
    NEXT_W32 = _off("struct sk_buflet", "next_idx") // 4
    FLAGS_W16 = _off("struct sk_buflet", "flags") // 2


class SlotOff:
    """Word offsets inside one ``struct sk_slot``."""

    MD_IDX_W32 = _off("struct sk_slot", "sd_md_idx") // 4
    FLAGS_W16 = _off("struct sk_slot", "sd_flags") // 2
    LEN_W16 = _off("struct sk_slot", "sd_len") // 2


class RingOff:
    """Word offsets inside ``struct sk_ring``."""

    HEAD_W32 = _off("struct sk_ring", "ring_head") // 4
    TAIL_W32 = _off("struct sk_ring", "ring_tail") // 4
    KHEAD_W32 = _off("struct sk_ring", "ring_khead") // 4
    NUM_SLOTS_W32 = _off("struct sk_ring", "ring_num_slots") // 4
    KIND_W32 = _off("struct sk_ring", "ring_kind") // 4
    ID_W32 = _off("struct sk_ring", "ring_id") // 4
    ALLOC_WS_W32 = _off("struct sk_ring", "alloc_ws") // 4
    READY_SLOTS_W32 = _off("struct sk_ring", "ready_slots") // 4
    READY_BYTES_W64 = _off("struct sk_ring", "ready_bytes") // 8


MD_W16 = MD_SIZE // 2
MD_W32 = MD_SIZE // 4
MD_W64 = MD_SIZE // 8
BUFLET_W16 = BUFLET_SIZE // 2
BUFLET_W32 = BUFLET_SIZE // 4
BUF0_W32 = _B0 // 4
BUF0_W16 = _B0 // 2


def _align(x: int, a: int) -> int:
    return (x + a - 1) // a * a


@dataclass(frozen=True)
class PoolConfig:
    """Sizes of every region; ``num_buflets`` defaults to enough for full chains."""

    num_packets: int = 4096
    buf_size: int = 2048
    max_frags: int = 4
    num_buflets: int | None = None
    num_large_bufs: int = 0
    large_buf_size: int = 16384
    num_ring_slots: int = 8192

    def resolved_buflets(self) -> int:
        if self.num_buflets is not None:
            return self.num_buflets
        return self.num_packets * (self.max_frags - 1)

    def check(self) -> None:
        """Refuse configurations whose values would not fit the ABI's field widths."""
        if not 1 <= self.num_packets < NO_INDEX:
            raise PoolError(f"num_packets {self.num_packets} out of range")
        if not 64 <= self.buf_size <= 0xFFFF or self.buf_size % 8:
            raise PoolError(f"buf_size {self.buf_size}: need a multiple of 8 in 64..65535")
        if not 1 <= self.max_frags <= 64:
            raise PoolError(f"max_frags {self.max_frags} out of range 1..64")
        if self.resolved_buflets() < 0 or self.num_large_bufs < 0:
            raise PoolError("negative object count")
        if self.num_large_bufs and (self.large_buf_size < self.buf_size or self.large_buf_size % 8):
            raise PoolError(f"large_buf_size {self.large_buf_size} invalid")
        if self.num_ring_slots < 0:
            raise PoolError("negative num_ring_slots")


@dataclass(frozen=True)
class Layout:
    """Byte offsets of each region inside the arena."""

    md_off: int
    buflet_off: int
    buf_off: int
    large_buf_off: int
    ring_off: int
    ring_region_size: int
    arena_size: int
    num_bufs: int

    @staticmethod
    def compute(cfg: PoolConfig) -> Layout:
        nbuflets = cfg.resolved_buflets()
        # Every packet's inline buf0 and every external buflet own one default buffer.
        num_bufs = cfg.num_packets + nbuflets
        md_off = _align(ARENA_HDR_SIZE, 64)
        buflet_off = _align(md_off + cfg.num_packets * MD_SIZE, 64)
        buf_off = _align(buflet_off + nbuflets * BUFLET_SIZE, _PAGE)
        large_off = _align(buf_off + num_bufs * cfg.buf_size, _PAGE)
        ring_off = _align(large_off + cfg.num_large_bufs * cfg.large_buf_size, _PAGE)
        # Room for num_ring_slots slots plus one header per 16 slots (rings are small).
        ring_size = _align(
            cfg.num_ring_slots * SLOT_SIZE + (cfg.num_ring_slots // 16 + 8) * RING_HDR_SIZE, _PAGE
        )
        return Layout(
            md_off,
            buflet_off,
            buf_off,
            large_off,
            ring_off,
            ring_size,
            ring_off + ring_size,
            num_bufs,
        )


class Arena:
    """One mapping of the pool's memfd, with typed views over each region.

    Created by the pool owner (``Arena.create``) or by any other process from the fd
    (``Arena.attach``).  The views are plain memoryviews so the per-slot code can index them
    directly; nothing here trusts values read back from the shared memory.
    """

    def __init__(self, fd: int, cfg: PoolConfig, layout: Layout, owner: bool) -> None:
        self.fd = fd
        self.cfg = cfg
        self.layout = layout
        self.owner = owner
        self.mm = mmap.mmap(
            fd, layout.arena_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE
        )
        self.mem = memoryview(self.mm)
        md = self.mem[layout.md_off : layout.md_off + cfg.num_packets * MD_SIZE]
        self.md16 = md.cast("H")
        self.md32 = md.cast("I")
        self.md64 = md.cast("Q")
        self.md8 = md
        bl = self.mem[layout.buflet_off : layout.buflet_off + cfg.resolved_buflets() * BUFLET_SIZE]
        self.bl16 = bl.cast("H")
        self.bl32 = bl.cast("I")
        self.ring32 = self.mem[layout.ring_off : layout.ring_off + layout.ring_region_size].cast(
            "I"
        )
        self.ring16 = self.mem[layout.ring_off : layout.ring_off + layout.ring_region_size].cast(
            "H"
        )
        self.ring64 = self.mem[layout.ring_off : layout.ring_off + layout.ring_region_size].cast(
            "Q"
        )
        self.closed = False

    @classmethod
    def create(cls, cfg: PoolConfig) -> Arena:
        cfg.check()
        layout = Layout.compute(cfg)
        fd = os.memfd_create("vdev-pbufpool", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, layout.arena_size)
            arena = cls(fd, cfg, layout, owner=True)
        except BaseException:
            os.close(fd)
            raise
        hdr = ffi.cast("struct sk_arena_hdr *", ffi.from_buffer(arena.mm))
        hdr.magic = lib.SK_ARENA_MAGIC
        hdr.abi_version = lib.SK_ABI_VERSION
        hdr.num_packets = cfg.num_packets
        hdr.num_buflets = cfg.resolved_buflets()
        hdr.num_bufs = layout.num_bufs
        hdr.buf_size = cfg.buf_size
        hdr.num_large_bufs = cfg.num_large_bufs
        hdr.large_buf_size = cfg.large_buf_size
        hdr.max_frags = cfg.max_frags
        hdr.md_size = MD_SIZE
        hdr.md_off = layout.md_off
        hdr.buflet_off = layout.buflet_off
        hdr.buf_off = layout.buf_off
        hdr.large_buf_off = layout.large_buf_off
        hdr.ring_off = layout.ring_off
        hdr.ring_region_size = layout.ring_region_size
        hdr.arena_size = layout.arena_size
        del hdr
        return arena

    @classmethod
    def attach(cls, fd: int) -> Arena:
        """Map an existing arena from its fd, re-deriving and checking the layout."""
        size = os.fstat(fd).st_size
        if size < ARENA_HDR_SIZE:
            raise PoolError(f"fd {fd}: {size} bytes is too small for an arena")
        raw = os.pread(fd, ARENA_HDR_SIZE, 0)
        hdr = ffi.cast("struct sk_arena_hdr *", ffi.from_buffer(raw))
        if hdr.magic != lib.SK_ARENA_MAGIC or hdr.abi_version != lib.SK_ABI_VERSION:
            raise PoolError(f"fd {fd}: not a vdev arena (magic {hdr.magic:#x})")
        cfg = PoolConfig(
            num_packets=hdr.num_packets,
            buf_size=hdr.buf_size,
            max_frags=hdr.max_frags,
            num_buflets=hdr.num_buflets,
            num_large_bufs=hdr.num_large_bufs,
            large_buf_size=hdr.large_buf_size,
            num_ring_slots=0,
        )
        cfg.check()
        base = Layout.compute(cfg)
        layout = Layout(
            base.md_off,
            base.buflet_off,
            base.buf_off,
            base.large_buf_off,
            hdr.ring_off,
            hdr.ring_region_size,
            hdr.arena_size,
            base.num_bufs,
        )
        if (
            layout.ring_off != base.ring_off
            or layout.arena_size != layout.ring_off + layout.ring_region_size
            or layout.arena_size > size
            or hdr.md_size != MD_SIZE
        ):
            raise PoolError(f"fd {fd}: arena header layout is inconsistent")
        return cls(fd, cfg, layout, owner=False)

    def buf_view(self, buf_idx: int, large: bool) -> memoryview:
        """The whole default or large buffer ``buf_idx`` (caller checked the index)."""
        if large:
            size = self.cfg.large_buf_size
            off = self.layout.large_buf_off + buf_idx * size
        else:
            size = self.cfg.buf_size
            off = self.layout.buf_off + buf_idx * size
        return self.mem[off : off + size]

    def close(self) -> None:
        """Drop the views and the mapping; the fd is closed only by its creator."""
        if self.closed:
            return
        self.closed = True
        for name in ("md16", "md32", "md64", "md8", "bl16", "bl32", "ring32", "ring16", "ring64"):
            try:
                getattr(self, name).release()
            except BufferError:
                pass  # a derived view is still alive; it keeps the mapping until collected
        try:
            self.mem.release()
            self.mm.close()
        except BufferError:
            pass  # someone still holds a view; the mapping goes with the last one
        if self.owner:
            os.close(self.fd)
