"""The device process of a soak run (``benchmarks/soak.py``): one NIC, one host channel.

The device runs in a process of its own so that the soak driver can read *its* open fds and
anonymous RSS from ``/proc/PID`` while a frontend (testpmd ``net_virtio_user`` or a Linux
guest under QEMU) pushes millions of frames through it.  What only the device knows (pool
``in_use``, progress, whether a frontend is connected) it prints as sample lines.

Roles, as in ``benchmarks/device_throughput.py``'s worker:

* ``sink`` (frames *to* the device, the frontend's TX): a host channel on the switch counts
  every frame it receives; progress is the frames taken off the TX virtqueue (``tx0``).
* ``source`` (frames *from* the device, the frontend's RX): the host channel sends exactly
  ``--frames`` frames to the guest's MAC, keeping the NIC's RX backlog at most half full;
  progress is the frames sent.

The fault scenario is driven by progress, not by time, so it covers the same part of every
run whatever the rate: when progress reaches ``--fault-start`` a seeded drop rule
(``--drop-p``) goes on the virtqueue of the row's direction together with one stall of
``--stall`` seconds; at ``--fault-end`` the drop rule is removed.

Protocol on stdout (one line per write):

* ``READY <pid>`` once the NIC listens;
* ``S <json>`` every ``--interval`` s: ``t``, ``progress``, ``in_use``, ``connected``,
  ``phase`` (``before``/``faults``/``after``), ``sent`` (source), ``drained`` (source: all
  sent and none still queued in the device);
* ``GONE`` once a frontend that had connected has disconnected;
* on SIGTERM: the host channel is closed (so the pool holds only what the device itself
  leaked), then ``FINAL <json>`` (``in_use`` then) and ``STATS <json>`` (device stats plus
  ``host_received``, ``host_sent`` and the fault engine's event counts), and exit 0.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

from vdev.faults import FaultEngine
from vdev.faults.rules import Rule
from vdev.net.device import Device
from vdev.net.nic import RX_BACKLOG, VirtioNet
from vdev.shutdown import stop_on_signals
from vdev.skywalk import chanbatch
from vdev.skywalk.channel import Channel
from vdev.testing.frames import GUEST_MAC, HOST_MAC, numbered
from vdev.testing.pools import streaming_pool

GUEST_MAC_STR = ":".join(f"{b:02x}" for b in GUEST_MAC)
ROLES = ("sink", "source")


@dataclass
class SoakConfig:
    """What one device process does (the command line, parsed)."""

    socket: str
    role: str
    frames: int
    size: int = 64
    seed: int = 1
    fault_start: int = 0
    fault_end: int = 0
    drop_p: float = 0.01
    stall: float = 0.2
    interval: float = 0.5


@dataclass
class Progress:
    """Counters the pump threads update; read by the sampler and the fault controller.

    Each field has one writer thread and is a plain int/str/bool, so readers need no lock:
    a sample a moment old is all they want."""

    received: int = 0  # sink: frames the host channel received
    sent: int = 0  # source: frames the host channel accepted
    phase: str = "before"
    ever_connected: bool = False


def _emit(tag: str, payload: dict[str, Any] | None = None) -> None:
    line = tag if payload is None else f"{tag} {json.dumps(payload, default=str)}"
    sys.stdout.write(line + "\n")  # one write: one line, whatever the threads do
    sys.stdout.flush()


class SoakDevice:
    """One device, its host channel and the threads that pump, sample and inject faults."""

    def __init__(self, cfg: SoakConfig) -> None:
        if cfg.role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, not {cfg.role!r}")
        self.cfg = cfg
        pool = streaming_pool()
        self.device = Device(pool=pool)
        self.nic: VirtioNet = self.device.add_nic(cfg.socket, mac=GUEST_MAC_STR)
        self.engine = FaultEngine.for_device(self.device, seed=cfg.seed)
        self.ch: Channel | None = self.device.open_channel(
            "host", ring_slots=4096 if cfg.role == "sink" else 512
        )
        self.progress = Progress()
        self.stop = threading.Event()
        self.rules: list[Rule] = []
        if cfg.role == "sink":
            # Teach the switch where HOST_MAC lives, before any guest frame arrives (the
            # flood to nic0 is dropped as rx_ring_down: nothing is connected yet).
            self.ch.send([numbered(b"\xff" * 6, HOST_MAC, 0)])
        else:
            # As if the guest had sent a frame: unicast to nic0, no copies to the responder.
            self.device.switch.fdb[GUEST_MAC] = self.nic.name

    # -- counters ---------------------------------------------------------------------------

    def connected(self) -> bool:
        return self.device.sockets[0].server.connected

    def done_progress(self) -> int:
        """Frames through the device so far, in the row's direction."""
        if self.cfg.role == "sink":
            return self.nic.stats[1].frames
        return self.progress.sent

    def drained(self) -> bool:
        """Source: every frame sent and each either written to the guest or dropped."""
        if self.cfg.role != "source" or self.progress.sent < self.cfg.frames:
            return False
        st = self.nic.stats[0]
        return st.frames + st.drops >= self.progress.sent and not self.nic.backlog

    # -- threads ----------------------------------------------------------------------------

    def _sink(self) -> None:
        ch = self.ch
        assert ch is not None
        while not self.stop.is_set():
            # Counted without copying the frames out when the compiled user half is there.
            if chanbatch.in_use():
                n = chanbatch.recv_count(ch, 4096, timeout=0.05)[0]
            else:
                n = len(ch.recv(4096, timeout=0.05))
            self.progress.received += n

    def _source(self) -> None:
        ch = self.ch
        assert ch is not None
        frames = [numbered(GUEST_MAC, HOST_MAC, i, self.cfg.size) for i in range(64)]
        while not self.stop.is_set() and self.progress.sent < self.cfg.frames:
            vring = self.nic.vrings.get(0)
            running = vring is not None and vring.enabled and vring.queue is not None
            # Frames handed to the NIC's thread wait in its inbox before the backlog: both
            # count (rx_waiting), or a burst overruns the backlog and the soak measures
            # refusals.
            if not running or self.nic.rx_waiting() >= RX_BACKLOG // 2:
                time.sleep(0.0002)
                continue
            left = self.cfg.frames - self.progress.sent
            self.progress.sent += ch.send(frames[: min(len(frames), left)])

    def _faults(self) -> None:
        """Switch the scenario on and off by progress (2 ms resolution)."""
        cfg, p = self.cfg, self.progress
        queue = "tx" if cfg.role == "sink" else "rx"
        nf = self.engine.nic(0)
        while not self.stop.wait(0.002):
            done = self.done_progress()
            if p.phase == "before" and done >= cfg.fault_start and cfg.fault_end > cfg.fault_start:
                self.rules = [nf.drop(p=cfg.drop_p, queue=queue, id="soak-drop")]
                if cfg.stall > 0:
                    nf.stall(queue=queue, seconds=cfg.stall, id="soak-stall")
                p.phase = "faults"
            elif p.phase == "faults" and done >= cfg.fault_end:
                for rule in self.rules:
                    nf.remove(rule)
                self.rules = []
                p.phase = "after"

    def _sampler(self) -> None:
        gone_said = False
        while not self.stop.is_set():
            connected = self.connected()
            if connected:
                self.progress.ever_connected = True
            _emit(
                "S",
                {
                    "t": round(time.monotonic(), 6),
                    "progress": self.done_progress(),
                    "in_use": self.device.pool.stats.in_use,
                    "connected": connected,
                    "phase": self.progress.phase,
                    "sent": self.progress.sent,
                    "drained": self.drained(),
                },
            )
            if self.progress.ever_connected and not connected and not gone_said:
                _emit("GONE")
                gone_said = True
            self.stop.wait(self.cfg.interval)

    # -- life cycle -------------------------------------------------------------------------

    def run(self) -> int:
        stop_on_signals(self.stop)
        pump = self._sink if self.cfg.role == "sink" else self._source
        threads = [threading.Thread(target=f, daemon=True) for f in (pump, self._faults)]
        threads.append(threading.Thread(target=self._sampler, daemon=True))
        _emit(f"READY {os.getpid()}")
        for t in threads:
            t.start()
        self.device.serve_forever(self.stop)
        for t in threads:
            t.join(5)
        return self.finish()

    def finish(self) -> int:
        """Close the host channel, then report what the pool still holds and every counter."""
        if self.ch is not None:
            self.ch.close()
            self.ch = None
        stats = self.device.stats()
        _emit("FINAL", {"in_use": self.device.pool.stats.in_use})
        stats["host_received"] = self.progress.received
        stats["host_sent"] = self.progress.sent
        stats["fault_counts"] = dict(self.engine.log.counts)
        self.engine.close()
        self.device.close()
        _emit("STATS", stats)
        return 0


def parse_args(argv: list[str] | None = None) -> SoakConfig:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--socket", required=True)
    ap.add_argument("--role", choices=ROLES, required=True)
    ap.add_argument("--frames", type=int, required=True, help="source: frames to send")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--fault-start", type=int, default=0, help="progress at which faults start")
    ap.add_argument("--fault-end", type=int, default=0, help="progress at which the drop ends")
    ap.add_argument("--drop-p", type=float, default=0.01)
    ap.add_argument("--stall", type=float, default=0.2, help="seconds; 0: no stall")
    ap.add_argument("--interval", type=float, default=0.5, help="seconds between samples")
    a = ap.parse_args(argv)
    return SoakConfig(
        a.socket,
        a.role,
        a.frames,
        a.size,
        a.seed,
        a.fault_start,
        a.fault_end,
        a.drop_p,
        a.stall,
        a.interval,
    )


def main(argv: list[str] | None = None) -> int:
    return SoakDevice(parse_args(argv)).run()


if __name__ == "__main__":
    sys.exit(main())
