"""The driver's exported state is findable by symbol and decodable from guest RAM with cffi.

This is the contract the host relies on later (vdev reading the guest's Skywalk pool and
rings): ELF symbols give guest-physical addresses (no paging), ``stats.h``'s CDEF block and
``vdev/abi/skywalk.h`` give the layouts, and nothing is described twice.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from host.bare_console import bare_guest_with_udp, driver_ffi, elf_symbols, pattern_frame
from vdev.abi import lib

RINGS = ("vdev_tx_ring", "vdev_rx_ring", "vdev_alloc_ring", "vdev_free_ring")
EXPORTED = ("vdev_stats", "vdev_info", "vdev_pool_arena", *RINGS)


def test_symbols_match_cffi_layouts(bare_elf: Path) -> None:
    syms = elf_symbols(bare_elf)
    assert set(EXPORTED) <= syms.keys()
    ffi = driver_ffi()
    assert syms["vdev_stats"][1] == ffi.sizeof("struct vdev_stats")
    assert syms["vdev_info"][1] == ffi.sizeof("struct vdev_info")
    for name in ("vdev_pool_arena", *RINGS):
        assert syms[name][1] == 4  # guest-physical addresses, 32-bit


@pytest.mark.qemu
def test_decode_pool_and_rings_from_guest_ram(bare_elf: Path, tmp_path: Path) -> None:
    syms = elf_symbols(bare_elf)
    ffi = driver_ffi()
    # ffi.from_buffer("struct X *", data) keeps `data` alive; ffi.cast(...) of an untyped
    # from_buffer would not.
    with bare_guest_with_udp(bare_elf, monitor=tmp_path / "mon.sock") as (g, link):
        g.cmd("tx 300 100 32")
        g.send_line("rx 40 5000")
        time.sleep(0.05)
        for i in range(50):  # 10 more than the guest takes: they wait in RX slots
            link.send(pattern_frame(i, 200 + i))
        g.wait_reply()
        g.cmd("rx 0")  # a sync that harvests the rest into the ring
        console = g.stats()

        def read(name: str) -> bytes:
            addr, size = syms[name]
            return g.read_memory(addr, size)

        def u32(name: str) -> int:
            return int.from_bytes(read(name), "little")

        stats = ffi.from_buffer("struct vdev_stats *", read("vdev_stats"))
        assert stats.magic == 0x53544456
        for key in ("tx_packets", "tx_completions", "rx_packets", "rx_bytes", "violations"):
            assert getattr(stats, key) == console[key], key
        info = ffi.from_buffer("struct vdev_info *", read("vdev_info"))
        assert info.transport == 2  # VDEV_TRANSPORT_PCI_MODERN
        assert bytes(info.mac) == bytes.fromhex("525400123456")
        assert info.hdr_len == 12 and info.rx_qsize == info.tx_qsize == 256

        arena_addr = u32("vdev_pool_arena")
        hdr_bytes = g.read_memory(arena_addr, ffi.sizeof("struct sk_arena_hdr"))
        hdr = ffi.from_buffer("struct sk_arena_hdr *", hdr_bytes)
        assert hdr.magic == lib.SK_ARENA_MAGIC and hdr.abi_version == lib.SK_ABI_VERSION
        assert hdr.md_size == ffi.sizeof("struct sk_md_obj")
        md = g.read_memory(arena_addr + hdr.md_off, hdr.num_packets * hdr.md_size)
        objs = ffi.from_buffer("struct sk_md_obj *", md)
        for i in range(hdr.num_packets):
            assert objs[i].pre.redzone == lib.SK_REDZONE_SEED ^ i
            assert objs[i].pkt.idx == i

        rings = {}
        for name in RINGS:
            addr = u32(name)
            assert hdr.ring_off <= addr - arena_addr < hdr.ring_off + hdr.ring_region_size
            raw = g.read_memory(addr, ffi.sizeof("struct sk_ring"))
            rings[name] = ffi.from_buffer("struct sk_ring *", raw)
        tx, rx = rings["vdev_tx_ring"], rings["vdev_rx_ring"]
        alloc, free = rings["vdev_alloc_ring"], rings["vdev_free_ring"]
        assert tx.ring_kind == lib.SK_RING_TX and rx.ring_kind == lib.SK_RING_RX
        assert alloc.ring_kind == lib.SK_RING_ALLOC and free.ring_kind == lib.SK_RING_FREE
        # The 300 TX packets came through the alloc ring: what is left there is attached.
        ready = (alloc.ring_tail - alloc.ring_head) % alloc.ring_num_slots
        assert ready == console["alloc_ring_ready"] > 0
        aslots_raw = g.read_memory(
            arena_addr + alloc.slots_off, alloc.ring_num_slots * ffi.sizeof("struct sk_slot")
        )
        aslots = ffi.from_buffer("struct sk_slot *", aslots_raw)
        for k in range(ready):
            slot = aslots[(alloc.ring_head + k) % alloc.ring_num_slots]
            assert slot.sd_flags & lib.SK_SD_VALID and slot.sd_md_idx < hdr.num_packets
        assert tx.ring_num_slots == rx.ring_num_slots == 256
        assert tx.ring_head == tx.ring_khead == 300 % 256  # everything sent was consumed
        # The 10 extra frames sit in RX slots [head, tail): decode them from the pool.
        assert (rx.ring_tail - rx.ring_head) % 256 == 10
        slots_raw = g.read_memory(arena_addr + rx.slots_off, 256 * ffi.sizeof("struct sk_slot"))
        slots = ffi.from_buffer("struct sk_slot *", slots_raw)
        for k in range(10):
            slot = slots[(rx.ring_head + k) % 256]
            assert slot.sd_flags & lib.SK_SD_VALID
            pkt = objs[slot.sd_md_idx].pkt
            assert pkt.len == slot.sd_len == 200 + 40 + k
            buf = arena_addr + hdr.buf_off + pkt.buf0.buf_idx * hdr.buf_size + pkt.buf0.doff
            assert g.read_memory(buf, pkt.len) == pattern_frame(40 + k, 200 + 40 + k)
