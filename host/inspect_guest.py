"""Read the bare driver's Skywalk rings and counters live out of guest RAM.

The driver (``guest/driver``) runs without paging, so the address of each exported ELF symbol
(found with pyelftools, :func:`host.bare_console.elf_symbols`) is a guest-physical address.
The host maps guest RAM anyway: vhost-user hands the device every RAM region at
``SET_MEM_TABLE``, and ``GuestMemory.gpa_view(gpa, len)`` is a live view of it. So the device
process reads the driver's state directly, with no QEMU monitor round trip, and decodes it
with the same cffi ABI the driver is compiled against (``vdev/abi/skywalk.h`` for
``struct sk_ring`` / ``struct sk_slot`` / ``struct sk_arena_hdr``, ``guest/driver/stats.h``
for ``struct vdev_stats`` / ``struct vdev_info``), built by :func:`host.bare_console.driver_ffi`
(a fresh FFI: never ``ffi.include`` the device's shared one).

Each call copies the bytes it decodes (one ``bytes(view)`` per structure), so a snapshot is
consistent per structure but not across structures: the guest keeps running.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from host.bare_console import driver_ffi, elf_symbols

RING_SYMBOLS = {
    "tx": "vdev_tx_ring",
    "rx": "vdev_rx_ring",
    "alloc": "vdev_alloc_ring",
    "free": "vdev_free_ring",
}
STATS_MAGIC = 0x53544456  # VDEV_STATS_MAGIC
TRANSPORTS = {0: "none", 1: "legacy", 2: "modern", 3: "mmio-legacy", 4: "mmio-modern"}
# sk_ring.ring_kind (vdev/abi/skywalk.h SK_RING_*): TX and FREE are user-produced.
_USER_PRODUCED = ("tx", "free")

ReadFn = Callable[[int, int], bytes]


class IntrospectError(RuntimeError):
    """The driver's state cannot be read (not booted yet, wrong ELF, no guest memory)."""


_FFI: Any = None


def ffi() -> Any:
    """The driver ABI FFI (built once per process, separate from ``vdev.abi.ffi``)."""
    global _FFI
    if _FFI is None:
        _FFI = driver_ffi()
    return _FFI


@dataclass(frozen=True)
class DriverSymbols:
    """The exported symbols of one driver ELF: name -> guest-physical address."""

    addrs: Mapping[str, int]

    @classmethod
    def from_elf(cls, elf: Path) -> DriverSymbols:
        syms = elf_symbols(elf)
        wanted = ("vdev_stats", "vdev_info", "vdev_pool_arena", *RING_SYMBOLS.values())
        missing = [s for s in wanted if s not in syms]
        if missing:
            raise IntrospectError(f"{elf}: missing symbols {', '.join(missing)}")
        return cls({name: syms[name][0] for name in wanted})


def ring_state(name: str, ring: Any) -> dict[str, int]:
    """One ``struct sk_ring`` as plain ints, plus the user's view (sk_available_slot_count)."""
    n = int(ring.ring_num_slots)
    head, tail, khead = int(ring.ring_head), int(ring.ring_tail), int(ring.ring_khead)
    if n == 0:
        available = 0
    elif name in _USER_PRODUCED:
        available = n - (head - khead) % n - 1  # free slots the user may still fill
    else:
        available = (tail - head) % n  # slots the user may consume
    return {
        "head": head,
        "tail": tail,
        "khead": khead,
        "num_slots": n,
        "kind": int(ring.ring_kind),
        "ready_slots": int(ring.ready_slots),
        "ready_bytes": int(ring.ready_bytes),
        "pending": (head - khead) % n if n else 0,  # handed over, not yet consumed by kernel
        "available": available,
    }


def snapshot(read: ReadFn, syms: DriverSymbols) -> dict[str, Any]:
    """Decode stats, info, arena header and the four rings through ``read(gpa, len)``."""
    f = ffi()
    a = syms.addrs

    def struct(ctype: str, gpa: int) -> Any:
        return f.from_buffer(f"{ctype} *", read(gpa, f.sizeof(ctype)))

    def u32(gpa: int) -> int:
        return int.from_bytes(read(gpa, 4), "little")

    stats = struct("struct vdev_stats", a["vdev_stats"])
    if stats.magic != STATS_MAGIC:
        raise IntrospectError(
            f"vdev_stats at {a['vdev_stats']:#x} has magic {stats.magic:#x}: "
            "the driver has not initialised yet, or this is not the ELF QEMU booted"
        )
    counters = {
        name: int(getattr(stats, name))
        for name, _ in f.typeof("struct vdev_stats").fields
        if name not in ("magic", "version")
    }
    info = struct("struct vdev_info", a["vdev_info"])
    out: dict[str, Any] = {
        "stats": counters,
        "info": {
            "transport": TRANSPORTS.get(int(info.transport), str(info.transport)),
            "mac": bytes(f.buffer(info.mac)).hex(":"),
            "hdr_len": int(info.hdr_len),
            "rx_qsize": int(info.rx_qsize),
            "tx_qsize": int(info.tx_qsize),
            "driver_features": int(info.driver_features),
            "boot_ms": int(info.boot_ms),
        },
        "rings": {},
        "pool": {},
    }
    arena = u32(a["vdev_pool_arena"])
    if arena == 0:
        return out  # no device found (yet): no pool, no rings
    hdr = struct("struct sk_arena_hdr", arena)
    out["pool"] = {
        "arena": arena,
        "num_packets": int(hdr.num_packets),
        "num_bufs": int(hdr.num_bufs),
        "packets_in_use": counters["pool_packets_in_use"],
        "buflets_in_use": counters["pool_buflets_in_use"],
        "bufs_in_use": counters["pool_bufs_in_use"],
    }
    for name, sym in RING_SYMBOLS.items():
        addr = u32(a[sym])
        if addr:
            out["rings"][name] = ring_state(name, struct("struct sk_ring", addr)) | {"gpa": addr}
    return out


def memory_reader(mem: Any) -> ReadFn:
    """``read(gpa, len)`` over a vhost-user ``GuestMemory`` (``backend.mem``): a copy of a
    live ``gpa_view``."""

    def read(gpa: int, length: int) -> bytes:
        view = mem.gpa_view(gpa, length)
        try:
            return bytes(view)
        finally:
            view.release()

    return read


def format_snapshot(snap: Mapping[str, Any]) -> str:
    """The human table ``vdev inspect`` prints."""
    lines: list[str] = []
    info = snap.get("info", {})
    if info:
        lines.append(
            f"driver: transport={info['transport']} mac={info['mac']} hdr_len={info['hdr_len']} "
            f"rx_qsize={info['rx_qsize']} tx_qsize={info['tx_qsize']}"
        )
    rings = snap.get("rings", {})
    if rings:
        lines.append(
            f"{'ring':6} {'head':>6} {'tail':>6} {'khead':>6} {'slots':>6} "
            f"{'ready':>6} {'pending':>8} {'avail':>6}"
        )
        for name, r in rings.items():
            lines.append(
                f"{name:6} {r['head']:>6} {r['tail']:>6} {r['khead']:>6} {r['num_slots']:>6} "
                f"{r['ready_slots']:>6} {r['pending']:>8} {r['available']:>6}"
            )
    pool = snap.get("pool", {})
    if pool:
        lines.append(
            f"pool: packets_in_use={pool['packets_in_use']}/{pool['num_packets']} "
            f"buflets_in_use={pool['buflets_in_use']} bufs_in_use={pool['bufs_in_use']}"
        )
    stats = snap.get("stats", {})
    if stats:
        lines.append("stats:")
        items = [f"{k}={v}" for k, v in stats.items()]
        for i in range(0, len(items), 4):
            lines.append("  " + "  ".join(items[i : i + 4]))
    return "\n".join(lines)


__all__ = [
    "DriverSymbols",
    "IntrospectError",
    "format_snapshot",
    "memory_reader",
    "ring_state",
    "snapshot",
]
