"""A small learning L2 switch between the device's endpoints.

Endpoints are the guest side of each NIC, host channel ports opened by test code and the
built-in responder.  Packets are pbufpool indices; handing a list to ``deliver`` moves
ownership, and whatever an endpoint does not take is freed here and counted as a drop, so
nothing leaks whatever the receiver does.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, MutableMapping
from dataclasses import dataclass
from typing import Protocol

from vdev.native import structs
from vdev.skywalk import Pbufpool, fastglue

log = logging.getLogger("vdev.switch")

BROADCAST = b"\xff" * 6


class Endpoint(Protocol):
    """Anything the switch can hand packets to."""

    name: str

    def deliver(self, pkts: list[int]) -> int:
        """Take ownership of a prefix of ``pkts``; return how many were taken."""
        ...


@dataclass
class EndpointStats:
    """Per-endpoint counters, as seen from the switch."""

    rx_frames: int = 0  # frames the switch handed to the endpoint
    rx_bytes: int = 0
    tx_frames: int = 0  # frames the endpoint sent into the switch
    tx_bytes: int = 0
    drops: int = 0  # frames the endpoint refused (backpressure, ring down)


_FLOOD = -1  # switch.h's SW_FLOOD / SW_SHORT / SW_HAIRPIN (checked against the module)
_SHORT = -2
_HAIRPIN = -3

# A tap sees every frame the switch forwards: (source name, frame bytes).
Tap = Callable[[str, bytes], None]


# VDEV_FASTPATH=0 keeps every switch on the Python reference (as for the Skywalk path).
COMPILED_DEFAULT = os.environ.get("VDEV_FASTPATH", "1") != "0"


class Fdb(MutableMapping[bytes, str]):
    """The forwarding database: MAC -> endpoint name, as a dict, kept in step with the
    compiled table (``switch.c``'s ``struct sw_fdb``, MAC -> endpoint id) when there is one.

    Writes from Python (tests pinning an entry, ``detach``) go to both; what the compiled
    loop learns is written back here by :meth:`Switch.forward`, so the dict is always the
    whole truth and the Python reference can take over at any burst.
    """

    def __init__(self, switch: Switch) -> None:
        self._d: dict[bytes, str] = {}
        self._sw = switch

    def __getitem__(self, mac: bytes) -> str:
        return self._d[mac]

    def __setitem__(self, mac: bytes, name: str) -> None:
        self._d[mac] = name
        self._sw._fdb_set(mac, name)

    def __delitem__(self, mac: bytes) -> None:
        del self._d[mac]
        self._sw._fdb_rebuild()

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._d)

    def __len__(self) -> int:
        return len(self._d)

    def __repr__(self) -> str:
        return repr(self._d)


class _Compiled:
    """The switch as ``switch.c`` sees it: the FDB table, scratch arrays, the pool's buffers."""

    def __init__(self) -> None:
        ffi, lib = fastglue._fast.ffi, fastglue._fast.lib
        if (lib.SW_FLOOD, lib.SW_SHORT, lib.SW_HAIRPIN) != (_FLOOD, _SHORT, _HAIRPIN):
            raise AssertionError("switch.h's drop codes differ from switch.py's")
        self.fdb = ffi.new("struct sw_fdb *")
        self.ret = ffi.new("struct sw_ret *")
        self.cap = 0
        self._grow(256)

    def _grow(self, n: int) -> None:
        ffi = fastglue._fast.ffi
        self.cap = n
        self.dest = ffi.new("int32_t[]", n)
        self.lens = ffi.new("uint32_t[]", n)
        self.learned = ffi.new("uint32_t[]", n)
        self.order = ffi.new("uint32_t[]", n)
        self.groups = ffi.new("int32_t[]", 2 * n)


class Switch:
    """MAC-learning switch with flooding for broadcast, multicast and unknown unicast.

    Each burst is decided by ``switch.c`` (learning and lookup in packet order, one call)
    when the compiled module is available and no tap is attached; ``compiled=False`` (or
    ``VDEV_FASTPATH=0``) keeps the Python loop of :meth:`forward_py`, the reference.  Both
    make the same decisions, statistics and deliveries (tests/net/test_switch_compiled.py).
    """

    def __init__(self, pool: Pbufpool, *, compiled: bool | None = None) -> None:
        self.pool = pool
        self.endpoints: dict[str, Endpoint] = {}
        self.stats: dict[str, EndpointStats] = {}
        self.taps: list[Tap] = []
        self._ids: dict[str, int] = {}  # endpoint name -> id in the compiled table
        self._names: dict[int, str] = {}
        self._next_id = 0
        want = COMPILED_DEFAULT if compiled is None else compiled
        self._c: _Compiled | None = _Compiled() if want and fastglue.load() else None
        self.fdb: Fdb = Fdb(self)

    @property
    def compiled(self) -> bool:
        """Whether bursts are decided by the compiled loop."""
        return self._c is not None

    def attach(self, endpoint: Endpoint) -> None:
        if endpoint.name in self.endpoints:
            raise ValueError(f"switch already has an endpoint named {endpoint.name!r}")
        self.endpoints[endpoint.name] = endpoint
        self.stats[endpoint.name] = EndpointStats()
        self._ids[endpoint.name] = self._next_id
        self._names[self._next_id] = endpoint.name
        self._next_id += 1
        self._fdb_rebuild()  # entries naming it (set before it attached) now resolve

    def detach(self, name: str) -> None:
        self.endpoints.pop(name, None)
        eid = self._ids.pop(name, None)
        if eid is not None:
            del self._names[eid]
        d = self.fdb._d
        for mac in [m for m, n in d.items() if n == name]:
            del d[mac]
        self._fdb_rebuild()

    # -- the compiled table ----------------------------------------------------------------

    def _fdb_value(self, name: str) -> int:
        eid = self._ids.get(name)
        return eid if eid is not None else int(fastglue._fast.lib.SW_UNKNOWN)

    def _fdb_set(self, mac: bytes, name: str) -> None:
        c = self._c
        if c is None:
            return
        lib = fastglue._fast.lib
        if len(mac) != 6 or lib.sw_fdb_set(
            c.fdb, int.from_bytes(mac, "big"), self._fdb_value(name)
        ):
            self._give_up("an FDB entry the compiled table cannot hold")

    def _fdb_rebuild(self) -> None:
        c = self._c
        if c is None:
            return
        fastglue._fast.lib.sw_fdb_clear(c.fdb)
        for mac, name in self.fdb._d.items():
            self._fdb_set(mac, name)
            if self._c is None:
                return

    def _give_up(self, why: str) -> None:
        """Fall back to the Python reference for good (the dict stays the whole FDB)."""
        log.info("switch: compiled forwarding off: %s", why)
        self._c = None

    # -- forwarding ------------------------------------------------------------------------

    def forward(self, src: str, pkts: list[int]) -> None:
        """Switch packets sent by endpoint ``src``; ownership of every packet moves here."""
        if not pkts:
            return
        c = self._c
        if c is None or self.taps or src not in self._ids:
            self.forward_py(src, pkts)
            return
        fast = fastglue._fast
        lib = fast.lib
        pool = self.pool
        n = len(pkts)
        if n > c.cap:
            c._grow(n)
        pctx = fastglue._ctx(pool)
        sid = self._ids[src]
        ret = c.ret
        code = lib.sw_forward(
            pctx.c,
            pctx.bufs,
            c.fdb,
            sid,
            fastglue._idx_buf(pkts),
            n,
            c.dest,
            c.lens,
            c.learned,
            c.order,
            c.groups,
            ret,
        )
        self.forwarded(src, pkts, code)

    def forwarded(self, src: str, pkts: list[int], code: int, macs: bytes | None = None) -> None:
        """The rest of :meth:`forward` once ``sw_forward`` decided ``pkts`` (its results in
        the switch's scratch arrays): the FDB mirror, the counters, the deliveries.  The echo
        turn (vdev/net/echoturn.py) calls it when a burst it switched in C was not all for
        the responder; ``macs``: the learned source MACs, 6 bytes each, when the packets no
        longer hold them."""
        c = self._c
        assert c is not None
        fast = fastglue._fast
        ffi, lib = fast.ffi, fast.lib
        pool = self.pool
        n = len(pkts)
        ret = c.ret
        d = self.fdb._d
        if macs is None:
            for i in structs.u32_list(ffi, c.learned, ret.n_learned):
                d[pool.packet_head(pkts[i], 12)[6:12]] = src
        else:
            for j in range(0, len(macs), 6):
                d[macs[j : j + 6]] = src
        if code != lib.SW_OK:
            self._give_up("the FDB is full")
            self.forward_py(src, pkts)
            return
        src_stats = self.stats[src]
        src_stats.tx_frames += n
        src_stats.tx_bytes += int(ret.nbytes)
        if ret.n_special == 0:
            groups = structs.u32_list(ffi, c.groups, 2 * ret.n_groups, "i")
            if len(groups) == 2:  # one destination: the burst as it came, its byte count
                self._deliver(self._names[groups[0]], pkts[:], None, int(ret.nbytes))
                return
            order = structs.u32_list(ffi, c.order, n)
            pos = 0
            for g in range(0, len(groups), 2):
                count = groups[g + 1]
                batch = order[pos : pos + count]
                pos += count
                self._deliver(self._names[groups[g]], batch, None)
            return
        dests = structs.u32_list(ffi, c.dest, n, "i")
        if ret.n_special == n and dests.count(_FLOOD) == n:
            targets = [name for name in self.endpoints if name != src]
            if len(targets) == 1:  # all flooded, one other port: it takes them as they came
                self._deliver(targets[0], pkts[:], None, int(ret.nbytes))
                return
        self._dispatch(src, pkts, dests)

    def _dispatch(self, src: str, pkts: list[int], dests: list[int]) -> None:
        """The rest of :meth:`forward_py` for decisions already made (a burst with floods or
        drops), in packet order so the batches are the reference's."""
        pool = self.pool
        src_stats = self.stats[src]
        batches: dict[str, list[int]] = {}
        names = self._names
        targets = [n for n in self.endpoints if n != src]  # a flood's, once per burst
        for pkt, dst in zip(pkts, dests, strict=True):
            if dst >= 0:
                batches.setdefault(names[dst], []).append(pkt)
                continue
            if dst == _SHORT or dst == _HAIRPIN:
                pool.free_packets([pkt])
                src_stats.drops += 1
                continue
            self._flood_to(targets, pkt, batches)
        for name, batch in batches.items():
            self._deliver(name, batch, None)

    def _flood(self, src: str, pkt: int, batches: dict[str, list[int]]) -> None:
        self._flood_to([n for n in self.endpoints if n != src], pkt, batches)

    def _flood_to(self, targets: list[str], pkt: int, batches: dict[str, list[int]]) -> None:
        if not targets:
            self.pool.free_packets([pkt])
            return
        # Flood: the first target takes the original, the others get copies.
        for name in targets[1:]:
            copy = self.pool.packet_copy(pkt)
            if copy is None:
                self.stats[name].drops += 1
                continue
            batches.setdefault(name, []).append(copy)
        batches.setdefault(targets[0], []).append(pkt)

    def forward_py(self, src: str, pkts: list[int]) -> None:
        """The Python reference of :meth:`forward` (also the path when a tap is attached)."""
        if not pkts:
            return
        pool = self.pool
        src_stats = self.stats.get(src)
        batches: dict[str, list[int]] = {}
        for pkt in pkts:
            head = pool.packet_head(pkt, 14)
            length = pool.packet_len(pkt)
            if src_stats is not None:
                src_stats.tx_frames += 1
                src_stats.tx_bytes += length
            if len(head) < 14:
                pool.free_packets([pkt])
                if src_stats is not None:
                    src_stats.drops += 1
                continue
            dst_mac, src_mac = head[0:6], head[6:12]
            if not src_mac[0] & 1 and self.fdb.get(src_mac) != src:
                self.fdb[src_mac] = src  # (and into the compiled table, if any)
            if self.taps:
                frame = pool.packet_bytes(pkt)
                for tap in self.taps:
                    tap(src, frame)
            out = self.fdb.get(dst_mac) if not dst_mac[0] & 1 else None
            if out is not None and out != src and out in self.endpoints:
                batches.setdefault(out, []).append(pkt)
                continue
            if out == src:
                # The destination lives behind the sender: no hairpin, counted as a drop.
                pool.free_packets([pkt])
                if src_stats is not None:
                    src_stats.drops += 1
                continue
            self._flood(src, pkt, batches)
        for name, batch in batches.items():
            self._deliver(name, batch, None)

    def refused(self, name: str, pkts: list[int]) -> None:
        """Endpoint ``name`` took ``pkts`` (counted as delivered) but then refused them (a
        NIC's datapath thread, after a hand-off): counted as refused at delivery, freed."""
        stats = self.stats.get(name)
        if stats is not None:
            plen = self.pool.pkt_len
            stats.rx_frames -= len(pkts)
            stats.rx_bytes -= sum(plen[p] for p in pkts)
            stats.drops += len(pkts)
        self.pool.free_packets(pkts)

    def _deliver(
        self, name: str, batch: list[int], lengths: list[int] | None, nbytes: int = -1
    ) -> None:
        """Hand ``batch`` to endpoint ``name`` and count what it took (``nbytes``: the
        batch's byte total when known, so a batch taken whole is counted without a pass
        over its packets)."""
        stats = self.stats[name]
        plen = self.pool.pkt_len
        if lengths is None and nbytes < 0:
            lengths = [plen[p] for p in batch]
        try:
            taken = self.endpoints[name].deliver(batch)
        except Exception:
            log.exception("endpoint %s failed to take %d frames", name, len(batch))
            taken = 0
        stats.rx_frames += taken
        if lengths is None:
            if taken == len(batch):
                stats.rx_bytes += nbytes
            else:
                stats.rx_bytes += sum(plen[p] for p in batch[:taken])
        else:
            stats.rx_bytes += sum(lengths[:taken])
        if taken < len(batch):
            stats.drops += len(batch) - taken
            self.pool.free_packets(batch[taken:])
