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
from dataclasses import dataclass, field
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


KNOWN_SYMBOLS = ("vdev_stats", "vdev_info", "vdev_pool_arena", "vdev_vqs", *RING_SYMBOLS.values())
_INT_SIZES = (1, 2, 4, 8)


@dataclass(frozen=True)
class DriverSymbols:
    """The global data symbols of one driver ELF: name -> guest-physical address (and size).

    The vdev driver exports ``vdev_stats``, ``vdev_info``, ``vdev_vqs`` and the ring pointers;
    a driver of your own (guest/template) may export any subset of them, plus whatever
    integers it likes, which the snapshot shows as ``globals``.
    """

    addrs: Mapping[str, int]
    sizes: Mapping[str, int] = field(default_factory=dict)

    @classmethod
    def from_elf(cls, elf: Path) -> DriverSymbols:
        syms = elf_symbols(elf)
        return cls({n: a for n, (a, _) in syms.items()}, {n: z for n, (_, z) in syms.items()})

    def has(self, name: str) -> bool:
        return name in self.addrs

    def require(self, *names: str) -> None:
        missing = [n for n in names if n not in self.addrs]
        if missing:
            raise IntrospectError(f"driver ELF: missing symbols {', '.join(missing)}")


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


VQF_ACTIVE, VQF_PACKED, VQF_EVENT_IDX, VQF_INDIRECT, VQF_ARMED, VQF_BROKEN, VQF_CTRL = (
    1,
    2,
    4,
    8,
    16,
    32,
    64,
)
_P_AVAIL, _P_USED, _D_NEXT = 1 << 7, 1 << 15, 1


def snapshot(read: ReadFn, syms: DriverSymbols) -> dict[str, Any]:
    """Decode what the driver exports through ``read(gpa, len)``.

    ``stats``/``info`` (vdev_stats, vdev_info), ``pool`` and ``rings`` (the Skywalk arena),
    ``queues`` (vdev_vqs plus each ring decoded from guest RAM, split or packed) and
    ``globals`` (every other small integer symbol). Missing symbols leave their part empty.
    """
    f = ffi()
    a = syms.addrs

    def struct(ctype: str, gpa: int) -> Any:
        return f.from_buffer(f"{ctype} *", read(gpa, f.sizeof(ctype)))

    def u32(gpa: int) -> int:
        return int.from_bytes(read(gpa, 4), "little")

    out: dict[str, Any] = {"stats": {}, "info": {}, "rings": {}, "pool": {}, "queues": []}
    out["globals"] = _globals(read, syms)
    counters: dict[str, int] = {}
    if syms.has("vdev_stats"):
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
        out["stats"] = counters
    if syms.has("vdev_info"):
        info = struct("struct vdev_info", a["vdev_info"])
        out["info"] = {
            "transport": TRANSPORTS.get(int(info.transport), str(info.transport)),
            "mac": bytes(f.buffer(info.mac)).hex(":"),
            "hdr_len": int(info.hdr_len),
            "rx_qsize": int(info.rx_qsize),
            "tx_qsize": int(info.tx_qsize),
            "driver_features": int(info.driver_features),
            "boot_ms": int(info.boot_ms),
            "irq_mode": IRQ_MODES.get(int(info.irq_mode), str(info.irq_mode)),
            "irq_line": int(info.irq_line),
            "pairs": int(info.pairs),
            "max_pairs": int(info.max_pairs),
            "packed": int(info.packed),
            "indirect": int(info.indirect),
        }
    if syms.has("vdev_vqs"):
        n = ffi().sizeof("struct vdev_vq_info")
        out["queues"] = decode_queues(read, a["vdev_vqs"], syms.sizes.get("vdev_vqs", 0) // n)
    arena = u32(a["vdev_pool_arena"]) if syms.has("vdev_pool_arena") else 0
    if arena == 0:
        return out  # no device found (yet), or not exported: no pool, no rings
    hdr = struct("struct sk_arena_hdr", arena)
    out["pool"] = {
        "arena": arena,
        "num_packets": int(hdr.num_packets),
        "num_bufs": int(hdr.num_bufs),
        "packets_in_use": counters.get("pool_packets_in_use", 0),
        "buflets_in_use": counters.get("pool_buflets_in_use", 0),
        "bufs_in_use": counters.get("pool_bufs_in_use", 0),
    }
    for name, sym in RING_SYMBOLS.items():
        addr = u32(a[sym]) if syms.has(sym) else 0
        if addr:
            out["rings"][name] = ring_state(name, struct("struct sk_ring", addr)) | {"gpa": addr}
    return out


IRQ_MODES = {0: "poll", 1: "intx-pic", 2: "intx-ioapic", 3: "msix"}


def _globals(read: ReadFn, syms: DriverSymbols) -> dict[str, int]:
    """Every exported integer-sized object that is not one of the known structures."""
    out: dict[str, int] = {}
    for name, addr in sorted(syms.addrs.items()):
        size = syms.sizes.get(name, 0)
        if name in KNOWN_SYMBOLS or size not in _INT_SIZES:
            continue
        try:
            out[name] = int.from_bytes(read(addr, size), "little")
        except Exception:  # outside guest RAM (e.g. an MMIO address): leave it out
            continue
    return out


def decode_queues(read: ReadFn, table: int, count: int) -> list[dict[str, Any]]:
    """``vdev_vqs``: the driver's view of each virtqueue, plus the ring itself decoded from
    guest RAM (2.7 split: avail/used indices and suppression fields; 2.8 packed: a walk of
    the descriptors between the driver's used and avail positions)."""
    f = ffi()
    n = f.sizeof("struct vdev_vq_info")
    if count <= 0:
        return []
    raw = read(table, n * count)
    infos = f.from_buffer("struct vdev_vq_info[]", raw)
    out: list[dict[str, Any]] = []
    for i in range(count):
        q = infos[i]
        size = int(q.size)
        if size == 0:
            continue
        flags = int(q.flags)
        index = int(q.index)
        kind = "ctrl" if flags & VQF_CTRL else ("tx" if index % 2 else "rx")
        entry: dict[str, Any] = {
            "index": index,
            "kind": kind,
            "pair": index // 2 if kind != "ctrl" else None,
            "size": size,
            "packed": bool(flags & VQF_PACKED),
            "event_idx": bool(flags & VQF_EVENT_IDX),
            "indirect": bool(flags & VQF_INDIRECT),
            "armed": bool(flags & VQF_ARMED),
            "broken": bool(flags & VQF_BROKEN),
            "msix_vector": int(q.msix_vector),
            "driver": {
                name: int(getattr(q, name))
                for name, _ in f.typeof("struct vdev_vq_info").fields
                if name not in ("index", "size", "flags", "msix_vector", "_pad")
            },
        }
        try:
            if flags & VQF_PACKED:
                entry["ring"] = _decode_packed(read, q)
            else:
                entry["ring"] = _decode_split(read, q)
        except Exception as exc:  # the ring memory is not readable: say so, keep the rest
            entry["ring"] = {"error": str(exc)}
        out.append(entry)
    return out


def _u16(data: bytes, off: int) -> int:
    return int.from_bytes(data[off : off + 2], "little")


def _decode_split(read: ReadFn, q: Any) -> dict[str, int]:
    size, last_used = int(q.size), int(q.last_used)
    avail = read(int(q.driver), 4 + 2 * size + 2)
    used = read(int(q.device), 4 + 8 * size + 2)
    avail_idx, used_idx = _u16(avail, 2), _u16(used, 2)
    return {
        "avail_flags": _u16(avail, 0),
        "avail_idx": avail_idx,
        "used_event": _u16(avail, 4 + 2 * size),
        "used_flags": _u16(used, 0),
        "used_idx": used_idx,
        "avail_event": _u16(used, 4 + 8 * size),
        # Buffers the device has not used yet, and used ones the driver has not consumed.
        "device_owned": (avail_idx - used_idx) & 0xFFFF,
        "used_unconsumed": (used_idx - last_used) & 0xFFFF,
    }


def _decode_packed(read: ReadFn, q: Any) -> dict[str, Any]:
    """Walk from the driver's used position to its avail position (2.8.1 wrap counters):
    a used descriptor (AVAIL == USED == wrap) is one used buffer, followed by the rest of
    its chain (same id, still marked available); an available one (AVAIL == wrap != USED)
    starts a buffer the device still owns (chained with NEXT)."""
    size = int(q.size)
    ring = read(int(q.desc), 16 * size)
    drv_ev, dev_ev = read(int(q.driver), 4), read(int(q.device), 4)
    pos, wrap = int(q.last_used) & 0x7FFF, int(q.last_used) >> 15
    end = (int(q.avail_idx) & 0x7FFF, int(q.avail_idx) >> 15)
    used = owned = steps = 0
    consistent = True

    def desc(p: int) -> tuple[int, int]:
        return _u16(ring, 16 * p + 12), _u16(ring, 16 * p + 14)  # id, flags

    def step(p: int, w: int) -> tuple[int, int]:
        return (0, w ^ 1) if p + 1 == size else (p + 1, w)

    while (pos, wrap) != end and steps <= size:
        ident, fl = desc(pos)
        a, u = bool(fl & _P_AVAIL), bool(fl & _P_USED)
        steps += 1
        if a == u == bool(wrap):
            used += 1
            pos, wrap = step(pos, wrap)
            while (pos, wrap) != end and steps <= size:
                tid, tfl = desc(pos)
                if tid != ident or bool(tfl & _P_AVAIL) == bool(tfl & _P_USED):
                    break
                pos, wrap = step(pos, wrap)
                steps += 1
        elif a == bool(wrap) and u != bool(wrap):
            owned += 1
            while fl & _D_NEXT and (pos, wrap) != end and steps <= size:
                pos, wrap = step(pos, wrap)
                _, fl = desc(pos)
                steps += 1
            pos, wrap = step(pos, wrap)
        else:
            consistent = False
            break
    return {
        "driver_event_off_wrap": _u16(drv_ev, 0),
        "driver_event_flags": _u16(drv_ev, 2),
        "device_event_off_wrap": _u16(dev_ev, 0),
        "device_event_flags": _u16(dev_ev, 2),
        "device_owned": owned,
        "used_unconsumed": used,
        "consistent": consistent,
    }


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
    queues = snap.get("queues", [])
    if queues:
        lines.append(
            f"{'vq':8} {'size':>5} {'layout':6} {'avail':>6} {'used':>6} {'inflt':>6} "
            f"{'dev':>5} {'unc':>5} {'irqs':>7} {'lost':>5} {'packets':>9}"
        )
        for q in queues:
            name = f"{q['kind']}{q['pair']}" if q["pair"] is not None else q["kind"]
            d, r = q["driver"], q.get("ring", {})
            lines.append(
                f"{name + '/' + str(q['index']):8} {q['size']:>5} "
                f"{'packed' if q['packed'] else 'split':6} {d['avail_idx']:>6} "
                f"{d['last_used']:>6} {d['in_flight']:>6} {r.get('device_owned', '?'):>5} "
                f"{r.get('used_unconsumed', '?'):>5} {d['irqs']:>7} {d['irq_lost']:>5} "
                f"{d['packets']:>9}"
            )
    glob = snap.get("globals", {})
    if glob and not snap.get("stats"):
        lines.append("globals: " + "  ".join(f"{k}={v}" for k, v in glob.items()))
    stats = snap.get("stats", {})
    if stats:
        lines.append("stats:")
        items = [f"{k}={v}" for k, v in stats.items()]
        for i in range(0, len(items), 4):
            lines.append("  " + "  ".join(items[i : i + 4]))
    return "\n".join(lines)


__all__ = [
    "KNOWN_SYMBOLS",
    "DriverSymbols",
    "IntrospectError",
    "decode_queues",
    "format_snapshot",
    "memory_reader",
    "ring_state",
    "snapshot",
]
