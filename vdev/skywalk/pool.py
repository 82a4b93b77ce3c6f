"""Pbufpool: packets, buflets and buffers in the shared arena, with kernel-trusted bookkeeping.

The arena is shared with untrusted clients, so nothing the pool relies on is stored there:
which objects are allocated, each packet's buflet chain and buffer indices, data windows,
lengths, offload fields and the owner of each packet live in Python arrays below.  The
shared metadata is only the *user copy*: written from the trusted state when a packet is
handed to a client (externalize) and re-validated when it comes back (internalize, in
``slotwork.py``).  A client scribbling on shared memory can therefore only damage data
bytes it could write anyway, never the pool's accounting.

Owner tracking follows pbufpool.c's user packet pool ("upp"): every packet a channel holds is
recorded under the channel's owner id, a slot naming a packet the channel does not hold is
refused, and closing the channel purges everything it held.
"""

from __future__ import annotations

import logging
from array import array
from dataclasses import dataclass, field
from typing import Any, Protocol

from vdev.abi import lib

from .arena import (
    MD_W64,
    NO_INDEX,
    REDZONE_SEED,
    Arena,
    MdOff,
    PoolConfig,
)
from .errors import PoolError
from .freelist import FreeList

log = logging.getLogger(__name__)

KERNEL = -1  # owner id of packets held by trusted code (device, rings' kernel side)
# The compiled bulk loops (fastglue.py, poolbatch.c), bound by validate.set_backend("c");
# None runs the Python loops below, which stay the reference.
FAST: Any = None
_FREE = 0
_ALLOCATED = 1


@dataclass
class PoolStats:
    """Counters a test or the device reads to see pressure and leaks.

    ``in_use``, ``buflets_in_use`` and ``large_in_use`` are not counters: they are read
    from the free lists (objects in the pool minus objects on its free list), so they stay
    true even if alloc/free code forgets to move an object (a counter updated by that same
    code would be wrong in the same way).  ``Pbufpool.audit`` checks the rest: every
    object is either free or held by exactly one live packet (or is a spare buflet).
    """

    high_water: int = 0
    alloc_failures: int = 0
    allocs: int = 0
    frees: int = 0
    redzone_faults: int = 0

    def bind(self, pool: Pbufpool) -> PoolStats:
        self._pool = pool
        return self

    @property
    def in_use(self) -> int:
        """Packets not on the free list."""
        return self._pool.num_packets - len(self._pool._free_pkts)

    @property
    def buflets_in_use(self) -> int:
        """External buflets (chained after buf0, or spare) not on the free list."""
        return self._pool.num_ext - len(self._pool._free_ext)

    @property
    def large_in_use(self) -> int:
        """Large buffers not on the free list."""
        return self._pool.config.num_large_bufs - len(self._pool._free_large)


@dataclass
class LeakReport:
    """What was still allocated when the pool closed (empty means no leak).

    ``buflets_in_use`` and ``large_in_use`` come from the free lists, so a buflet or large
    buffer that a free path lost (neither free nor attached to anything) is a leak even when
    every packet was freed; ``problems`` is what ``Pbufpool.audit`` found."""

    packets: list[int] = field(default_factory=list)
    by_owner: dict[int, int] = field(default_factory=dict)
    buflets: list[int] = field(default_factory=list)  # spare buflets never freed
    buflets_in_use: int = 0
    large_in_use: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def leaked(self) -> bool:
        return bool(
            self.packets or self.buflets or self.buflets_in_use or self.large_in_use
        ) or bool(self.problems)

    def __str__(self) -> str:
        if not self.leaked:
            return "no leaks"
        owners = ", ".join(f"owner {o}: {n}" for o, n in sorted(self.by_owner.items()))
        text = (
            f"{len(self.packets)} packets leaked ({owners}), {len(self.buflets)} spare buflets, "
            f"{self.buflets_in_use} external buflets and {self.large_in_use} large buffers "
            "not on the free lists"
        )
        if self.problems:
            shown = "; ".join(self.problems[:5])
            more = f" (+{len(self.problems) - 5} more)" if len(self.problems) > 5 else ""
            text += f"; audit: {shown}{more}"
        return text


class _Closable(Protocol):
    def close(self) -> None: ...


class Pbufpool:
    """A packet pool over one memfd arena (see the module docstring for the trust split)."""

    def __init__(
        self,
        num_packets: int = 4096,
        buf_size: int = 2048,
        max_frags: int = 4,
        num_buflets: int | None = None,
        num_large_bufs: int = 0,
        large_buf_size: int = 16384,
        num_ring_slots: int = 8192,
    ) -> None:
        self.config = PoolConfig(
            num_packets,
            buf_size,
            max_frags,
            num_buflets,
            num_large_bufs,
            large_buf_size,
            num_ring_slots,
        )
        self.arena = Arena.create(self.config)
        cfg = self.config
        p = cfg.num_packets
        e = cfg.resolved_buflets()
        self.num_packets = p
        self.num_ext = e
        self.max_frags = cfg.max_frags
        self.buf_size = cfg.buf_size
        self.large_buf_size = cfg.large_buf_size
        nb = p + e
        # Trusted buflet state, indexed by global buflet id: packet i's inline buf0 is id i,
        # external buflet j is id p + j.  Default buffer g belongs to buflet g for life.
        self.b_buf = array("I", range(nb))
        self.b_large = bytearray(nb)
        self.b_doff = array("I", bytes(4 * nb))
        self.b_dlen = array("I", bytes(4 * nb))
        self.b_next = array("I", [NO_INDEX]) * nb
        # Trusted packet state.
        self.pkt_state = bytearray(p)
        self.pkt_owner = array("i", [KERNEL]) * p
        self.pkt_len = array("I", bytes(4 * p))
        self.pkt_nbufs = array("H", bytes(2 * p))
        self.pkt_pflags = array("H", bytes(2 * p))
        self.pkt_l2 = array("H", bytes(2 * p))
        self.pkt_cstart = array("H", bytes(2 * p))
        self.pkt_cstuff = array("H", bytes(2 * p))
        self.pkt_vnet = bytearray(MdOff.VNET_LEN * p)
        # Free lists (stacks: recently freed objects are reused first, cache-warm).
        # C arrays (freelist.py) the compiled bursts pop in place.
        self._free_pkts = FreeList("packet", p, range(p - 1, -1, -1))
        self._free_ext = FreeList("buflet", e, range(e - 1, -1, -1))
        nl = cfg.num_large_bufs
        self._free_large = FreeList("large buffer", nl, range(nl - 1, -1, -1))
        self._loose: set[int] = set()  # spare buflets handed out by alloc_buflets
        self.stats = PoolStats().bind(self)
        self._closed = False
        # The compiled fast path's view of this pool (fastglue.py), released on close.
        self.fast_ctx: _Closable | None = None
        # Ring region allocator (bump pointer plus exact-size reuse).
        self._ring_next = 0
        self._ring_free: dict[int, list[int]] = {}
        md64 = self.arena.md64
        for i in range(p):
            md64[i * MD_W64 + MdOff.REDZONE_W64] = REDZONE_SEED ^ i

    # ----------------------------------------------------------------- properties
    @property
    def fd(self) -> int:
        """The arena memfd: pass it (e.g. with ``pass_fds``) to let another process attach."""
        return self.arena.fd

    @property
    def max_packet_len(self) -> int:
        """Largest frame ``packet_from_bytes`` can ever hold with this configuration."""
        small = self.buf_size * self.max_frags
        if self.config.num_large_bufs:
            return max(small, self.large_buf_size * min(self.max_frags, self.config.num_large_bufs))
        return small

    def _check_open(self) -> None:
        if self._closed:
            raise PoolError("pool is closed")

    def _check_idx(self, idx: int) -> None:
        if not (0 <= idx < self.num_packets) or self.pkt_state[idx] != _ALLOCATED:
            raise PoolError(f"packet {idx} is not allocated")

    # ----------------------------------------------------------------- alloc / free
    def alloc_packets(self, n: int, nbufs: int = 1) -> list[int]:
        """Allocate up to ``n`` packets of ``nbufs`` buflets each (may return fewer).

        Packets come back kernel-owned with empty data windows; shortfalls are counted in
        ``stats.alloc_failures`` so pool pressure is visible without exceptions.
        """
        self._check_open()
        if not 1 <= nbufs <= self.max_frags:
            raise PoolError(f"nbufs {nbufs} not in 1..{self.max_frags}")
        want = n
        n = min(n, len(self._free_pkts))
        if nbufs > 1:
            n = min(n, len(self._free_ext) // (nbufs - 1))
        out: list[int] = []
        if n > 0:
            fp = self._free_pkts
            out = fp[len(fp) - n :]
            del fp[len(fp) - n :]
            out.reverse()
            fast = FAST
            if fast is not None and n >= fast.C_MIN_POOL_BATCH:
                ext: list[int] = []
                if nbufs > 1:  # what _init_packet's fe.pop() calls would take, in that order
                    fe = self._free_ext
                    m = n * (nbufs - 1)
                    ext = fe[len(fe) - m :]
                    del fe[len(fe) - m :]
                    ext.reverse()
                fast.init_packets(self, out, nbufs, ext)
            else:
                for idx in out:
                    self._init_packet(idx, nbufs)
            self._count_alloc(n)
        if n < want:
            self.stats.alloc_failures += want - n
        return out

    def _init_packet(self, idx: int, nbufs: int) -> None:
        self.pkt_state[idx] = _ALLOCATED
        self.pkt_owner[idx] = KERNEL
        self.pkt_len[idx] = 0
        self.pkt_nbufs[idx] = nbufs
        self.pkt_pflags[idx] = 0
        self.pkt_l2[idx] = 0
        self.pkt_cstart[idx] = 0
        self.pkt_cstuff[idx] = 0
        self.b_doff[idx] = 0
        self.b_dlen[idx] = 0
        prev = idx
        fe = self._free_ext
        p = self.num_packets
        for _ in range(nbufs - 1):
            j = fe.pop()
            g = p + j
            self.b_next[prev] = j
            self.b_doff[g] = 0
            self.b_dlen[g] = 0
            prev = g
        self.b_next[prev] = NO_INDEX

    def _count_alloc(self, npkts: int) -> None:
        st = self.stats
        st.allocs += npkts
        st.high_water = max(st.high_water, st.in_use)

    def free_packets(self, idxs: list[int]) -> None:
        """Return kernel-held packets to the pool (double free or client-held is a bug)."""
        self._check_open()
        self.check_kernel_held(idxs)
        self._release(idxs)

    def free_taken(self, idxs: list[int]) -> None:
        """Free packets the kernel half has just taken back from a ring (a TX sync that
        failed, the FREE ring, a ring's reclaim): known allocated and no longer the user's,
        so the per-packet ownership checks of :meth:`free_packets` are skipped on this hot
        path; a double free is still a PoolError."""
        self._release(idxs)

    def _release(self, idxs: list[int]) -> None:
        """Free packets already known to be allocated (trusted callers only)."""
        fast = FAST
        if fast is not None and len(idxs) >= fast.C_MIN_POOL_BATCH:
            try:
                _done, faults, twice = fast.release(self, idxs)
            except OverflowError:
                pass  # not all uint32 (nothing freed yet): the loop below words it
            else:
                self.stats.redzone_faults += faults
                if twice is not None:
                    if twice >= self.num_packets:
                        raise IndexError("bytearray index out of range")
                    raise PoolError(f"packet {twice} freed twice")
                self.stats.frees += len(idxs)
                return
        p = self.num_packets
        md64 = self.arena.md64
        fe = self._free_ext
        fl = self._free_large
        st = self.stats
        for idx in idxs:
            if idx < 0:  # would index from the end: another packet's state, not this one's
                raise IndexError("bytearray index out of range")
            if self.pkt_state[idx] != _ALLOCATED:
                raise PoolError(f"packet {idx} freed twice")
            self.pkt_state[idx] = _FREE
            self.pkt_owner[idx] = KERNEL
            rz = idx * MD_W64 + MdOff.REDZONE_W64
            if md64[rz] != REDZONE_SEED ^ idx:
                st.redzone_faults += 1
                md64[rz] = REDZONE_SEED ^ idx
            g = idx
            while True:
                if self.b_large[g]:
                    fl.append(self.b_buf[g])
                    self.b_large[g] = 0
                    self.b_buf[g] = g
                j = self.b_next[g]
                self.b_next[g] = NO_INDEX
                if j == NO_INDEX:
                    break
                fe.append(j)
                g = p + j
            self._free_pkts.append(idx)
        st.frees += len(idxs)

    def alloc_buflets(self, n: int) -> list[int]:
        """Allocate up to ``n`` spare external buflets (not attached to any packet)."""
        self._check_open()
        fe = self._free_ext
        k = min(n, len(fe))
        out = fe[len(fe) - k :]
        del fe[len(fe) - k :]
        for j in out:
            g = self.num_packets + j
            self.b_doff[g] = 0
            self.b_dlen[g] = 0
            self.b_next[g] = NO_INDEX
        self._loose.update(out)
        if k < n:
            self.stats.alloc_failures += n - k
        return out

    def free_buflets(self, idxs: list[int]) -> None:
        """Return spare buflets from :meth:`alloc_buflets` (anything else is a PoolError)."""
        self._check_open()
        for j in idxs:
            if j not in self._loose:
                raise PoolError(f"buflet {j} is not a spare allocated buflet")
        for j in idxs:
            self._loose.discard(j)
            g = self.num_packets + j
            if self.b_large[g]:
                self._free_large.append(self.b_buf[g])
                self.b_large[g] = 0
                self.b_buf[g] = g
            self._free_ext.append(j)

    # ----------------------------------------------------------------- data in / out
    def packet_from_bytes(self, data: bytes, vnet: bytes | None = None) -> int | None:
        """Allocate a packet holding ``data`` (chaining buflets or large buffers as needed).

        Returns None when the pool is exhausted; a frame that can never fit this pool's
        configuration (see ``max_packet_len``) is a PoolError, so it is not mistaken for
        transient pressure.
        """
        self._check_open()
        n = len(data)
        if vnet is not None and len(vnet) != MdOff.VNET_LEN:
            raise PoolError(f"vnet header must be {MdOff.VNET_LEN} bytes, got {len(vnet)}")
        bs = self.buf_size
        use_large = False
        nbufs = max(1, -(-n // bs))
        if nbufs > self.max_frags or (n > bs and self.config.num_large_bufs):
            nlarge = max(1, -(-n // self.large_buf_size))
            if self.config.num_large_bufs and nlarge <= self.max_frags:
                if nlarge <= len(self._free_large):
                    use_large = True
                    nbufs = nlarge
                elif nbufs > self.max_frags:
                    self.stats.alloc_failures += 1
                    return None
            elif nbufs > self.max_frags:
                raise PoolError(f"frame of {n} bytes exceeds max_packet_len {self.max_packet_len}")
        got = self.alloc_packets(1, nbufs)
        if not got:
            return None
        idx = got[0]
        mem = self.arena.mem
        lay = self.arena.layout
        p = self.num_packets
        g = idx
        pos = 0
        while True:
            if use_large:
                lb = self._free_large.pop()
                self.b_buf[g] = lb
                self.b_large[g] = 1
                size = self.large_buf_size
                base = lay.large_buf_off + lb * size
            else:
                size = bs
                base = lay.buf_off + self.b_buf[g] * bs
            chunk = min(size, n - pos)
            if chunk:
                mem[base : base + chunk] = data[pos : pos + chunk]
            self.b_doff[g] = 0
            self.b_dlen[g] = chunk
            pos += chunk
            j = self.b_next[g]
            if j == NO_INDEX:
                break
            g = p + j
        self.pkt_len[idx] = n
        if vnet is not None:
            o = idx * MdOff.VNET_LEN
            self.pkt_vnet[o : o + MdOff.VNET_LEN] = vnet
            self.pkt_pflags[idx] = lib.SK_PKT_VNET_HDR
        return idx

    def _buflet_base(self, g: int) -> tuple[int, int]:
        """Arena offset and size of buflet ``g``'s buffer, from trusted state."""
        lay = self.arena.layout
        if self.b_large[g]:
            return lay.large_buf_off + self.b_buf[g] * self.large_buf_size, self.large_buf_size
        return lay.buf_off + self.b_buf[g] * self.buf_size, self.buf_size

    def packet_segments(self, idx: int) -> list[memoryview]:
        """Views of the packet's data windows, as the kernel last validated them."""
        self._check_open()
        self._check_idx(idx)
        mem = self.arena.mem
        out: list[memoryview] = []
        g = idx
        p = self.num_packets
        while True:
            base, _ = self._buflet_base(g)
            d = base + self.b_doff[g]
            if self.b_dlen[g]:
                out.append(mem[d : d + self.b_dlen[g]])
            j = self.b_next[g]
            if j == NO_INDEX:
                return out
            g = p + j

    def packet_bytes(self, idx: int) -> bytes:
        """A copy of the packet's data (safe to keep after the packet is freed)."""
        segs = self.packet_segments(idx)
        if len(segs) == 1:
            return bytes(segs[0])
        return b"".join(segs)

    def packet_head(self, idx: int, n: int) -> bytes:
        """The first ``n`` bytes (fewer if the packet is shorter), e.g. for header parsing."""
        out = b""
        for seg in self.packet_segments(idx):
            out += bytes(seg[: n - len(out)])
            if len(out) >= n:
                break
        return out

    def packet_copy(self, idx: int) -> int | None:
        """A new kernel-owned packet with the same data and vnet header (None if exhausted)."""
        return self.packet_from_bytes(self.packet_bytes(idx), self.packet_vnet(idx))

    def stats_dict(self) -> dict[str, int]:
        """Counters as a plain dict (for JSON status output)."""
        st = self.stats
        return {
            "in_use": st.in_use,
            "high_water": st.high_water,
            "alloc_failures": st.alloc_failures,
            "buflets_in_use": st.buflets_in_use,
            "large_in_use": st.large_in_use,
            "num_buflets": self.num_ext,
            "num_large_bufs": self.config.num_large_bufs,
            "allocs": st.allocs,
            "frees": st.frees,
            "redzone_faults": st.redzone_faults,
            "num_packets": self.num_packets,
        }

    def packet_len(self, idx: int) -> int:
        self._check_open()
        self._check_idx(idx)
        return self.pkt_len[idx]

    def packet_vnet(self, idx: int) -> bytes | None:
        """The 12-byte virtio_net_hdr stored with the packet, or None if it has none."""
        self._check_open()
        self._check_idx(idx)
        if not self.pkt_pflags[idx] & lib.SK_PKT_VNET_HDR:
            return None
        o = idx * MdOff.VNET_LEN
        return bytes(self.pkt_vnet[o : o + MdOff.VNET_LEN])

    def packet_nbufs(self, idx: int) -> int:
        self._check_open()
        self._check_idx(idx)
        return self.pkt_nbufs[idx]

    def check_kernel_held(self, idxs: list[int]) -> None:
        """PoolError unless every packet is allocated, held by trusted code, and listed once."""
        fast = FAST
        if fast is not None and len(idxs) >= fast.C_MIN_POOL_BATCH:
            try:
                verdict = fast.check_kernel_held(self, idxs)
            except (OverflowError, TypeError):
                verdict = ("python", 0, 0)  # not all uint32: the loop below words it
            if verdict is None:
                return
            what, idx, owner = verdict
            if what == "twice":
                raise PoolError("the same packet appears twice in one batch")
            if what == "unallocated":
                raise PoolError(f"packet {idx} is not allocated")
            if what == "held":
                raise PoolError(f"packet {idx} is held by owner {owner}")
        if len(set(idxs)) != len(idxs):
            raise PoolError("the same packet appears twice in one batch")
        for idx in idxs:
            self._check_idx(idx)
            if self.pkt_owner[idx] != KERNEL:
                raise PoolError(f"packet {idx} is held by owner {self.pkt_owner[idx]}")

    # ----------------------------------------------------------------- upp owner tracking
    def owner_insert(self, owner_id: int, idx: int) -> None:
        """Record that client ``owner_id`` now holds packet ``idx``."""
        self._check_idx(idx)
        if self.pkt_owner[idx] != KERNEL:
            raise PoolError(f"packet {idx} already held by owner {self.pkt_owner[idx]}")
        self.pkt_owner[idx] = owner_id

    def owner_remove(self, owner_id: int, idx: int) -> bool:
        """Take packet ``idx`` back from ``owner_id``; False if that owner does not hold it.

        ``idx`` may come straight from shared memory, so any integer is accepted.
        """
        if not (0 <= idx < self.num_packets) or self.pkt_state[idx] != _ALLOCATED:
            return False
        if self.pkt_owner[idx] != owner_id:
            return False
        self.pkt_owner[idx] = KERNEL
        return True

    def owner_holds(self, owner_id: int, idx: int) -> bool:
        return (
            0 <= idx < self.num_packets
            and self.pkt_state[idx] == _ALLOCATED
            and self.pkt_owner[idx] == owner_id
        )

    def _held_by(self, owner_id: int) -> list[int]:
        """The allocated packets ``owner_id`` holds, in index order (a scan of the trusted
        owner array: the per-packet owner is the one record, kept by the Python loops and
        the compiled ones alike, so there is no second set to keep in step per packet)."""
        owner, state = self.pkt_owner, self.pkt_state
        return [
            i for i in range(self.num_packets) if owner[i] == owner_id and state[i] == _ALLOCATED
        ]

    @property
    def owners(self) -> dict[int, set[int]]:
        """Client owner id -> the packets it holds (a snapshot, for audits and tests)."""
        out: dict[int, set[int]] = {}
        owner, state = self.pkt_owner, self.pkt_state
        for i in range(self.num_packets):
            if owner[i] != KERNEL and state[i] == _ALLOCATED:
                out.setdefault(owner[i], set()).add(i)
        return out

    def owner_purge(self, owner_id: int) -> int:
        """Free everything ``owner_id`` holds (the client went away); returns the count."""
        idxs = self._held_by(owner_id)
        if not idxs:
            return 0
        for idx in idxs:
            self.pkt_owner[idx] = KERNEL
        self._release(idxs)
        return len(idxs)

    def owner_count(self, owner_id: int) -> int:
        return len(self._held_by(owner_id))

    # ----------------------------------------------------------------- ring region
    def ring_alloc(self, nbytes: int) -> int:
        """Reserve ``nbytes`` (8-aligned) of the ring region; returns the arena offset."""
        self._check_open()
        nbytes = (nbytes + 63) // 64 * 64
        reuse = self._ring_free.get(nbytes)
        if reuse:
            off = reuse.pop()
        else:
            if self._ring_next + nbytes > self.arena.layout.ring_region_size:
                raise PoolError(
                    f"ring region full ({self.arena.layout.ring_region_size} bytes); "
                    "raise num_ring_slots"
                )
            off = self._ring_next
            self._ring_next += nbytes
        lay = self.arena.layout
        self.arena.mem[lay.ring_off + off : lay.ring_off + off + nbytes] = bytes(nbytes)
        return lay.ring_off + off

    def ring_release(self, arena_off: int, nbytes: int) -> None:
        nbytes = (nbytes + 63) // 64 * 64
        self._ring_free.setdefault(nbytes, []).append(arena_off - self.arena.layout.ring_off)

    # ----------------------------------------------------------------- teardown
    def audit(self) -> list[str]:
        """Check every object against the free lists; returns what is wrong (empty: sound).

        Independent of the alloc/free code paths: each packet is free exactly when it is on
        the packet free list; each external buflet and large buffer is on its free list, or
        attached to exactly one allocated packet's trusted chain, or a spare buflet, and
        never two of those.  Used by ``close()`` (the leak report) and by tests after each
        scenario, so a free path that forgets or double-returns an object is caught."""
        out: list[str] = []
        p, e, nl = self.num_packets, self.num_ext, self.config.num_large_bufs

        def free_set(name: str, free: FreeList, n: int) -> set[int]:
            items = list(free)
            got = set(items)
            if len(got) != len(items):
                out.append(f"{name} free list holds duplicates")
            bad = sorted(i for i in got if not 0 <= i < n)
            if bad:
                out.append(f"{name} free list holds out-of-range {bad[:5]}")
            return got - set(bad)

        free_p = free_set("packet", self._free_pkts, p)
        free_e = free_set("buflet", self._free_ext, e)
        free_l = free_set("large buffer", self._free_large, nl)
        ext_owner: dict[int, str] = {}  # external buflet -> who holds it
        large_owner: dict[int, str] = {}  # large buffer -> who holds it

        def claim(g: int, who: str) -> None:
            if self.b_large[g]:
                lb = self.b_buf[g]
                if lb in large_owner or lb in free_l or not 0 <= lb < nl:
                    where = large_owner.get(lb, "the free list" if lb in free_l else "range")
                    out.append(f"large buffer {lb}: held by {who} and by {where}")
                large_owner.setdefault(lb, who)

        for idx in range(p):
            allocated = self.pkt_state[idx] == _ALLOCATED
            if allocated == (idx in free_p):
                state = "allocated and on" if allocated else "free and off"
                out.append(f"packet {idx} is {state} the free list")
            if not allocated:
                continue
            who = f"packet {idx}"
            claim(idx, who)
            g, k = idx, 1
            while (j := self.b_next[g]) != NO_INDEX:
                if not 0 <= j < e:
                    out.append(f"{who}: chain names buflet {j} out of range")
                    break
                if j in ext_owner or j in free_e or j in self._loose:
                    where = ext_owner.get(j, "the free list" if j in free_e else "the spares")
                    out.append(f"buflet {j}: in the chain of {who} and held by {where}")
                    break
                ext_owner[j] = who
                g = p + j
                claim(g, who)
                k += 1
            if k != self.pkt_nbufs[idx]:
                out.append(f"{who}: chain of {k} buflets, nbufs says {self.pkt_nbufs[idx]}")
        for j in self._loose:
            if j in free_e:
                out.append(f"buflet {j}: spare and on the free list")
            ext_owner.setdefault(j, "the spares")
            claim(p + j, f"spare buflet {j}")
        stale = [g for g in free_p if self.b_large[g]]
        stale += [p + j for j in free_e if self.b_large[p + j]]
        if stale:
            out.append(f"free buflets still hold large buffers: {sorted(stale)[:8]}")
        lost = sorted(set(range(e)) - free_e - ext_owner.keys())
        if lost:
            out.append(f"{len(lost)} buflets neither free nor held (lost): {lost[:8]}")
        lost_l = sorted(set(range(nl)) - free_l - large_owner.keys())
        if lost_l:
            out.append(f"{len(lost_l)} large buffers neither free nor held (lost): {lost_l[:8]}")
        return out

    def check(self) -> None:
        """PoolError naming every audit problem (for tests and debug builds)."""
        problems = self.audit()
        if problems:
            raise PoolError("pool accounting broken: " + "; ".join(problems[:8]))

    def leaks(self) -> LeakReport:
        rep = LeakReport()
        for idx in range(self.num_packets):
            if self.pkt_state[idx] == _ALLOCATED:
                rep.packets.append(idx)
                o = self.pkt_owner[idx]
                rep.by_owner[o] = rep.by_owner.get(o, 0) + 1
        rep.buflets = sorted(self._loose)
        rep.buflets_in_use = self.stats.buflets_in_use
        rep.large_in_use = self.stats.large_in_use
        rep.problems = self.audit()
        return rep

    def close(self) -> LeakReport:
        """Unmap the arena and report what was never freed (the caller decides if fatal)."""
        if self._closed:
            return LeakReport()
        rep = self.leaks()
        self._closed = True
        if self.fast_ctx is not None:
            ctx, self.fast_ctx = self.fast_ctx, None
            ctx.close()
        self.arena.close()
        if rep.leaked:
            log.warning("pbufpool closed with leaks: %s", rep)
        return rep

    def __enter__(self) -> Pbufpool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["KERNEL", "LeakReport", "Pbufpool", "PoolStats"]
