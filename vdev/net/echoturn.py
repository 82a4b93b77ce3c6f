"""The echo turn: one NIC's TX burst to the responder and the replies' RX burst, one C call.

Why: a request through the built-in responder crosses five compiled stages (the TX burst,
the switch, the responder, the switch again, the RX burst), and the Python glue between
them cost 50-60 us of a 60-90 us round trip (benchmarks/RESULTS.md, "Echo latency: the
compiled part and the Python part").  ``ve_run`` (vdev/native/vqecho.c) makes the same
calls on the same state in the same order, writes the interrupts, and returns; this module
then books what it did (statistics, the FDB mirror, frees) exactly as the stage-by-stage
path would have, after the reply is already in the guest's ring.

It runs only when nothing needs the stage-by-stage path (:meth:`EchoTurn.ready`: no fault
rule, hook, capture or crash point on the NIC, no frames waiting for it, the switch and the
responder compiled); a stage whose outcome is not the plain one (a flood, a drop, a packet
the C cannot judge, a guest short of RX buffers) ends the call right after it, and the
general path resumes from that stage with the stage's results.  ``VDEV_ECHO_TURN=0`` turns
it off (the differential tests run both ways: tests/net/test_echo_turn.py).
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from vdev.abi import lib as abi
from vdev.native import structs
from vdev.net.nic import RX_BACKLOG, RX_BURST, TX_BUDGET
from vdev.net.threads import needs_world
from vdev.skywalk import fastglue
from vdev.virtio import fastqueue

if TYPE_CHECKING:
    from vdev.net.device import Device
    from vdev.net.nic import VirtioNet
    from vdev.virtio.queue import VirtQueue

ENABLED = os.environ.get("VDEV_ECHO_TURN", "1") != "0"

# How long one busy-poll wait spins in C for a TX chain (NicDatapath in poll mode) before
# the loop's Python iteration (other fds, timers, the other queues) runs again.
SPIN_NS = 200_000

# TX batches served stage by stage after a turn's traffic went elsewhere than the responder.
SKIP_BATCHES = 64

# vqecho.h's VE_* stages by name: where a turn ended (the stage that needed the general path).
STAGES = {1: "tx", 2: "forward", 3: "responder", 4: "forward_replies", 5: "rx", 6: "done"}


class EchoTurn:
    """A device's echo turn for its NICs: the ``struct ve_turn`` and scratch it fills."""

    def __init__(self, device: Device) -> None:
        self.device = device
        self.enabled = ENABLED
        # Turns made, by the stage each ended at (STAGES' names; "done": all the way).
        self.stages: Counter[str] = Counter()
        # Batches left to serve the stage-by-stage way, per NIC, after a turn found its
        # traffic was not for the responder: such traffic gains nothing from a turn, and
        # would hold the shared lock through its TX burst (threads.py) for nothing.
        self._skip: dict[str, int] = {}
        self._t: Any = None
        self._cap = 0

    def _scratch(self, n: int) -> Any:
        ffi = fastglue._fast.ffi
        if self._t is None:
            lib = fastglue._fast.lib
            names = (lib.VE_TX, lib.VE_FWD, lib.VE_RESP, lib.VE_FWD2, lib.VE_RX, lib.VE_DONE)
            if names != tuple(STAGES):  # pragma: no cover - the header and this module disagree
                raise AssertionError(f"vqecho.h's VE_* {names} are not STAGES' {tuple(STAGES)}")
            self._t = ffi.new("struct ve_turn *")
        if n > self._cap:
            self._cap = max(n, 256)
            self._macs = ffi.new("uint8_t[]", 6 * self._cap)
            self._replies = ffi.new("uint32_t[]", self._cap)
            self._t.macs = self._macs
            self._t.replies = self._replies
        return self._t

    def ready(self, nic: VirtioNet) -> int | None:
        """The RX queue the replies would go to, when a turn may run for ``nic`` now: the
        compiled switch and responder, nothing on the NIC that needs the stage-by-stage path
        (nor the world lock: ``needs_world``), and no skip running; else None."""
        if not self.enabled or fastglue._fast is None or self._skip.get(nic.name):
            return None
        if (
            needs_world(nic)
            or nic._notes
            or nic.backlog
            or nic.rx_gen is not None
            or nic._generating
        ):
            return None
        dev = self.device
        sw = dev.switch
        resp = dev.responder
        if sw._c is None or sw.taps or not resp.compiled or dev.pool._closed:
            return None
        if nic.name not in sw._ids or sw.endpoints.get(resp.name) is not resp:
            return None
        if nic.handoff is not None:
            dp = dev.datapaths.get(nic.name)
            if dp is None or dp.inbox or dp.refused:
                return None
        return nic._fast_rx_queue()

    def forwarded_by(self, src: str) -> None:
        """Endpoint ``src``'s batch went through the stage-by-stage path (Device.forward):
        one less batch for its skip to hold back.  Only batches with packets count, so an
        idle busy-poll loop, which tries a TX batch every iteration, does not end a skip."""
        skip = self._skip.get(src)
        if skip:
            self._skip[src] = skip - 1

    def wait(self, nic: VirtioNet, index: int, spin_ns: int = SPIN_NS) -> bool:
        """Busy-poll mode: spin in C (the GIL and the shared lock let go) until TX queue
        ``index`` has a chain, at most ``spin_ns``; whether it has."""
        vring = nic.vrings.get(index)
        queue = vring.queue if vring is not None else None
        if queue is None or not fastqueue.usable(queue):
            return False
        ctx = fastqueue._ctx(queue)
        unlocked = nic._unlocked()
        if unlocked is None:
            return bool(fastglue._fast.lib.ve_tx_wait(ctx.c, spin_ns))
        with unlocked:
            return bool(fastglue._fast.lib.ve_tx_wait(ctx.c, spin_ns))

    def run(
        self, nic: VirtioNet, queue: VirtQueue, index: int, rx_index: int, pkts: list[int]
    ) -> tuple[fastqueue.Burst, Callable[[], None] | None]:
        """The batch's first burst of TX ``queue`` as a turn: its :class:`Burst` (packets
        appended to ``pkts``; ``notify`` False when the C finished the queue and signalled
        it, already booked) and, when the turn went past the TX burst, what books the rest
        and resumes the general path (the caller's _forward is replaced by it)."""
        fast = fastglue._fast
        ffi, lib = fast.ffi, fast.lib
        dev = self.device
        sw, resp, pool = dev.switch, dev.responder, dev.pool
        swc = sw._c
        assert swc is not None
        txctx, pc, budget = fastqueue.tx_setup(queue, pool, TX_BUDGET)
        rxq = nic.vrings[rx_index].queue
        assert rxq is not None
        rxctx, _pc, flags = fastqueue.rx_setup(
            rxq,
            pool,
            nic.has(abi.VIRTIO_NET_F_MRG_RXBUF),
            nic.has(abi.VIRTIO_NET_F_GUEST_CSUM),
        )
        if budget > swc.cap:
            swc._grow(budget)
        rc = resp.compiled_state(budget)
        fctx = fastglue._ctx(pool)
        t = self._scratch(budget)
        vp = pc.vp
        t.txq, t.vp, t.hlen, t.budget = txctx.c, vp, nic.hdr_len, budget
        t.tx_out, t.txb = txctx.out, txctx.burst
        t.tx_fd = _fd(nic, index)
        t.p, t.sb, t.fdb = fctx.c, fctx.bufs, swc.fdb
        t.nic_id, t.resp_id = sw._ids[nic.name], sw._ids[resp.name]
        t.dest, t.lens, t.learned, t.order, t.groups, t.sr = (
            swc.dest,
            swc.lens,
            swc.learned,
            swc.order,
            swc.groups,
            swc.ret,
        )
        t.mac, t.ip, t.ports = resp._mac64, rc.ip, rc.ports
        t.n_sink, t.n_echo = rc.n_sink, rc.n_echo
        t.verdict, t.rr = rc.verdict, rc.ret
        t.rxq, t.bufs, t.large, t.rx_flags = rxctx.c, vp.bufs, vp.large, flags
        t.rx_max, t.rxb, t.rx_fd = min(RX_BURST, RX_BACKLOG), rxctx.burst, _fd(nic, rx_index)
        stage = lib.ve_run(t)
        self.stages[STAGES[stage]] += 1
        if stage == lib.VE_FWD:
            self._skip[nic.name] = SKIP_BATCHES
        finished = txctx.burst.stop in (fastqueue.C.EMPTY, fastqueue.C.BUDGET)
        burst = fastqueue.tx_result(queue, pool, txctx, pc, vp, pkts, False if finished else None)
        if t.tx_notify:
            nic.notified(index, _err(t.tx_errno))
        if stage == lib.VE_TX:
            return burst, None
        n = len(pkts)
        macs = bytes(ffi.buffer(t.macs, 6 * t.n_learned1))
        nbytes1 = int(t.nbytes1)

        def resume() -> None:
            self._book(nic, rx_index, rxq, rxctx, pkts, stage, macs, nbytes1, n)

        return burst, resume

    def _book(
        self,
        nic: VirtioNet,
        rx_index: int,
        rxq: VirtQueue,
        rxctx: Any,
        pkts: list[int],
        stage: int,
        macs: bytes,
        nbytes1: int,
        n: int,
    ) -> None:
        """What Device.forward(nic, pkts) would have done after the calls the turn made:
        each plain stage booked, the first other one resumed by the general path."""
        lib = fastglue._fast.lib
        dev = self.device
        sw, resp, pool = dev.switch, dev.responder, dev.pool
        t = self._t
        if stage == lib.VE_FWD:
            sw.forwarded(nic.name, pkts, int(t.sr.code), macs)
            dev.answer_rounds(16)
            return
        # The switch from the NIC, all to the responder (Switch.forward and _deliver).
        d = sw.fdb._d
        for j in range(0, len(macs), 6):
            d[macs[j : j + 6]] = nic.name
        src = sw.stats[nic.name]
        src.tx_frames += n
        src.tx_bytes += nbytes1
        rst = sw.stats[resp.name]
        rst.rx_frames += n
        rst.rx_bytes += nbytes1
        if stage == lib.VE_RESP:
            resp._answer_compiled(pkts, int(t.rr.done))
            dev.answer_rounds(16)
            return
        resp._take_verdicts(pkts, resp.compiled_state(n), t.rr)
        replies = resp.take_outbox()
        if len(replies) != t.n_replies:  # pragma: no cover - the C and the verdicts disagree
            raise AssertionError(f"echo turn: {t.n_replies} replies, the verdicts {len(replies)}")
        if not replies:  # nothing to answer: the turn is done
            dev.answer_rounds(16)
            return
        if stage == lib.VE_FWD2:
            sw.forwarded(resp.name, replies, int(t.sr.code))
            dev.answer_rounds(15)
            return
        # The replies' switch, all to the NIC: learned from the replies (intact until freed).
        ffi = fastglue._fast.ffi
        for i in structs.u32_list(ffi, t.learned, t.sr.n_learned):
            d[pool.packet_head(replies[i], 12)[6:12]] = resp.name
        m = len(replies)
        rst.tx_frames += m
        rst.tx_bytes += int(t.sr.nbytes)
        nst = sw.stats[nic.name]
        nst.rx_frames += m  # deliver_now admits them all: the backlog was empty (ready)
        nst.rx_bytes += int(t.sr.nbytes)
        rb = fastqueue.rx_result(rxq, rxctx)
        touched: set[int] = set()
        wrote = rb.count
        if wrote:
            pool.free_taken(replies[:wrote])
            nic.stats[rx_index].rx_burst(rb)
            touched.add(rx_index)
        if stage == lib.VE_RX:  # the drain goes on from this burst's outcome
            nic.backlog.extend(replies[wrote:])
            nic._drain_backlog(rb, touched)
        else:
            if t.rx_notify:
                nic.notified(rx_index, _err(t.rx_errno))
            low = nic.rx_low
            if low is not None and nic.rx_waiting() <= low[0]:
                low[1]()
        dev.answer_rounds(15)


def _fd(nic: VirtioNet, index: int) -> int:
    vring = nic.vrings.get(index)
    fd = vring.call_fd if vring is not None else None
    return -1 if fd is None else fd


def _err(errno: int) -> OSError | None:
    return OSError(errno, os.strerror(errno)) if errno else None


__all__ = ["ENABLED", "SKIP_BATCHES", "SPIN_NS", "STAGES", "EchoTurn"]
