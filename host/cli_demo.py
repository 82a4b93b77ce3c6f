"""``vdev demo``: the main job.  Boot a Linux guest against the device, exercise it, inject a
fault, print per-queue ring statistics and a summary.

Every step is checked; the exit status is 0 only when all checks pass.  Everything started
here (the device loop, QEMU, sockets, temp files) is torn down on every path.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from host.cli_args import output_dir, output_path

GUEST_MAC = "52:54:00:12:34:56"
GUEST_IP = "10.0.2.15"
RESPONDER_IP = "10.0.2.2"
HOST_IP = "10.0.2.3"  # source address of the frames the host channel sends
SINK_PORT = 9  # the responder counts UDP sent to this port
GUEST_SINK_PORT = 5000
BURST = 500


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


@dataclass
class Report:
    checks: list[Check] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    def check(self, name: str, ok: bool, detail: str) -> bool:
        self.checks.append(Check(name, ok, detail))
        mark = "ok " if ok else "FAIL"
        print(f"  [{mark}] {name}: {detail}", flush=True)
        return ok

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "demo",
        help="boot a Linux guest against the device, inject faults, report",
        description=(
            "Build (or reuse) the Linux guest image, start the device, boot the guest with the "
            "stock virtio_net driver, ping the built-in responder, send a UDP burst each way, "
            "inject seeded packet loss, and print per-queue ring statistics and a summary."
        ),
    )
    p.add_argument(
        "--pcap", metavar="FILE", type=output_path, help="write a pcapng capture of the NIC"
    )
    p.add_argument(
        "--keep", metavar="DIR", type=output_dir, help="keep the console log and capture in DIR"
    )
    p.add_argument("--seed", type=int, default=7, help="seed of the injected loss (default 7)")
    p.set_defaults(func=run)


@contextmanager
def _step(report: Report, title: str) -> Iterator[None]:
    print(f"-- {title}", flush=True)
    t0 = time.monotonic()
    try:
        yield
    finally:
        report.timings[title] = time.monotonic() - t0


def run(args: argparse.Namespace) -> int:
    from host.cli_serve import format_stats
    from host.errors import MachineError
    from host.machine import Machine, Nic
    from images.linux import build_linux
    from vdev.net.device import Device

    report = Report()
    t_start = time.monotonic()
    workdir = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="vdev-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    sock = workdir / "nic0.sock"
    try:
        with _step(report, "guest image"):
            image = build_linux(progress=lambda msg: print(f"   {msg}", flush=True))
            print(f"   kernel {image.kernel_version}, {'cached' if image.cache_hit else 'built'}")
        device = Device(pcap=args.pcap)
        try:
            nic = device.add_nic(str(sock), mac=GUEST_MAC)
            device.start()
            host = device.open_channel("host", ring_slots=1024)
            with _step(report, "boot"):
                machine = Machine.linux(
                    image,
                    nics=[Nic.vhost_user(sock, mac=GUEST_MAC)],
                    kernel_args=f"vdev.ip={GUEST_IP}/24 vdev.gw={RESPONDER_IP}",
                    console_log=workdir / "console.log" if args.keep else None,
                )
                machine.launch()
            try:
                print(
                    f"   guest up in {report.timings['boot']:.1f} s "
                    f"(QEMU {machine.accel}: {machine.accel_reason})"
                )
                _exercise(report, device, nic, host, machine, args.seed)
            finally:
                with _step(report, "shutdown"):
                    machine.shutdown()
            host.close()
            stats = device.stats()
        finally:
            device.close()
    except (MachineError, OSError, RuntimeError) as exc:
        report.check("run", False, str(exc).splitlines()[0] if str(exc) else repr(exc))
        print(str(exc), file=sys.stderr)
        return 1
    finally:
        if not args.keep:
            for f in workdir.iterdir():
                f.unlink()
            workdir.rmdir()

    print("\n== per-queue ring statistics")
    print(format_stats(stats))
    _print_ring_stats(stats)
    total = time.monotonic() - t_start
    passed = sum(c.ok for c in report.checks)
    print(f"\n== summary: {passed}/{len(report.checks)} checks passed in {total:.1f} s")
    if args.pcap:
        print(f"   capture: {args.pcap}")
    return 0 if report.ok else 1


def _wait(pred: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.02)
    return pred()


def _exercise(report: Report, device: Any, nic: Any, host: Any, machine: Any, seed: int) -> None:
    from vdev.faults import FaultEngine
    from vdev.testing.frames import tools_payload, udp

    guest = machine.console
    with _step(report, "ping"):
        out, status = guest.run(f"ping -c 5 -i 0.2 -W 2 {RESPONDER_IP}", timeout=30)
        loss = _ping_loss(out)
        report.check("ping responder", status == 0 and loss == 0, f"{loss}% loss")

    with _step(report, "guest->device UDP"):
        before = device.responder.stats.udp_sink_packets
        out, status = guest.run(
            f"vdev-pktgen --udp {RESPONDER_IP}:{SINK_PORT} --count {BURST} --size 256", timeout=60
        )
        _wait(lambda: device.responder.stats.udp_sink_packets - before >= BURST, 5)
        got = device.responder.stats.udp_sink_packets - before
        report.check(
            "guest->device UDP burst", status == 0 and got == BURST, f"{got}/{BURST} counted"
        )

    with _step(report, "device->guest UDP"):
        guest.sendline(f"vdev-sink --udp {GUEST_SINK_PORT} --count {BURST} --timeout-ms 10000")
        guest.expect("sink ready", timeout=10)
        gmac = bytes.fromhex(GUEST_MAC.replace(":", ""))
        frames = [
            udp(
                GUEST_SINK_PORT,
                tools_payload(i, 256),
                dst_mac=gmac,
                src_mac=bytes.fromhex("0200000000aa"),
                src_ip=bytes(map(int, HOST_IP.split("."))),
                dst_ip=bytes(map(int, GUEST_IP.split("."))),
            )
            for i in range(BURST)
        ]
        sent = 0
        deadline = time.monotonic() + 20
        while sent < BURST and time.monotonic() < deadline:
            sent += host.send(frames[sent : sent + 32])
            time.sleep(0.002)
        m = guest.expect(r"sink rx_packets=(\d+)", timeout=20)
        got = int(m.group(1))
        guest.expect(re.escape("vdev-guest# "), timeout=10)
        report.check("device->guest UDP burst", got == BURST, f"{got}/{BURST} counted by the guest")

    with _step(report, "fault injection"):
        engine = FaultEngine.for_device(device, seed=seed)
        count = 40
        with engine.nic(0).drop(p=0.25, queue="rx", seed=seed) as rule:
            out, _status = guest.run(f"ping -c {count} -i 0.05 -W 1 {RESPONDER_IP}", timeout=60)
        received = _ping_received(out)
        report.check(
            f"RX loss p=0.25 seed {seed}: each dropped reply is a lost ping",
            rule.hits > 0 and received == count - rule.hits,
            f"rule dropped {rule.hits} replies, ping got {received}/{count}",
        )


def _ping_loss(out: str) -> int:
    m = re.search(r"(\d+)% packet loss", out)
    return int(m.group(1)) if m else 100


def _ping_received(out: str) -> int:
    m = re.search(r"(\d+) packets received", out)
    return int(m.group(1)) if m else -1


def _print_ring_stats(stats: dict[str, Any]) -> None:
    print("\n== switch ports")
    for name, st in stats["switch"].items():
        print(
            f"  {name:10} to-port {st['rx_frames']:>7} frames {st['rx_bytes']:>10} B   "
            f"from-port {st['tx_frames']:>7} frames {st['tx_bytes']:>10} B   drops {st['drops']}"
        )
