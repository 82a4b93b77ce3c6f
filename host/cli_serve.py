"""``vdev serve``: run the device until SIGINT/SIGTERM, then print per-queue stats."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from typing import Any


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "serve",
        help="run the vhost-user virtio-net device",
        description=(
            "Run the vhost-user virtio-net device. Each --socket is one NIC; all NICs, the "
            "built-in responder and host channels share one L2 switch. Stops on SIGINT or "
            "SIGTERM, prints per-queue statistics and removes its sockets."
        ),
    )
    p.add_argument(
        "--socket",
        action="append",
        required=True,
        metavar="PATH",
        help="vhost-user socket of one NIC (repeat for several NICs)",
    )
    p.add_argument(
        "--mac",
        action="append",
        default=[],
        metavar="MAC",
        help="MAC address of the NIC at the same position as --socket (default 52:54:00:12:34:5N)",
    )
    p.add_argument("--queues", type=int, default=1, metavar="N", help="queue pairs per NIC, 1-8")
    p.add_argument("--mtu", type=int, default=1500, help="MTU offered to the driver (default 1500)")
    p.add_argument("--pcap", metavar="FILE", help="write a pcapng capture of every NIC")
    p.add_argument(
        "--client",
        action="store_true",
        help="connect to the sockets (frontend listens, e.g. QEMU server=on) instead of listening",
    )
    p.add_argument(
        "--responder-ip", default="10.0.2.2", help="IPv4 address of the built-in responder"
    )
    p.add_argument(
        "--control",
        metavar="PATH",
        help="serve the JSON fault-control socket here (mode 0600; see `vdev ctl`)",
    )
    p.add_argument("--fault-log", metavar="FILE", help="append injected-fault events as JSON lines")
    p.add_argument(
        "--fault-seed", type=int, default=42, help="seed of the fault engine (default 42)"
    )
    p.add_argument("--json", action="store_true", help="print the final statistics as JSON")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv: debug)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from vdev.net.device import Device

    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if len(args.mac) > len(args.socket):
        print(f"vdev serve: {len(args.mac)} --mac for {len(args.socket)} --socket", file=sys.stderr)
        return 2
    if not 1 <= args.queues <= 8:
        print(f"vdev serve: --queues {args.queues}: must be 1 to 8", file=sys.stderr)
        return 2
    if not 68 <= args.mtu <= 65535:
        print(f"vdev serve: --mtu {args.mtu}: must be 68 to 65535", file=sys.stderr)
        return 2
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        device = Device(pcap=args.pcap, responder_ip=args.responder_ip)
    except (OSError, ValueError) as exc:
        print(f"vdev serve: {exc}", file=sys.stderr)
        return 1
    try:
        for i, path in enumerate(args.socket):
            mac = args.mac[i] if i < len(args.mac) else None
            try:
                device.add_nic(
                    path, mac=mac, queue_pairs=args.queues, mtu=args.mtu, client=args.client
                )
            except OSError as exc:
                raise OSError(f"--socket {path}: {exc.strerror or exc}") from exc
            except ValueError as exc:
                raise ValueError(f"--socket {path}: {exc}") from exc
        control = None
        if args.control or args.fault_log:
            from vdev.faults import FaultEngine
            from vdev.faults.control import ControlServer

            engine = FaultEngine.for_device(device, seed=args.fault_seed, log=args.fault_log)
            if args.control:
                control = ControlServer(device, args.control, engine)
        print(f"vdev serve: {len(args.socket)} NIC(s) on {', '.join(args.socket)}", flush=True)
        device.serve_forever(stop)
        if control is not None:
            control.close()
    except (OSError, ValueError) as exc:
        print(f"vdev serve: {exc}", file=sys.stderr)
        device.close()
        return 1
    stats = device.stats()
    device.close()
    if args.json:
        print(json.dumps(stats, indent=2))
    else:
        print(format_stats(stats))
    return 0


def format_stats(stats: dict[str, Any]) -> str:
    """Per-queue table: frames, bytes, drops (with reasons), notifications, kill reasons."""
    header = f"{'nic':8} {'queue':6} {'frames':>10} {'bytes':>12} {'drops':>7} {'irqs':>7}"
    lines = [header + "  kills / drop reasons"]
    for nic in stats["nics"]:
        for qname, q in nic["queues"].items():
            notes = [f"{k}={v}" for k, v in q["kills"].items()]
            notes += [f"{k}={v}" for k, v in q["drop_reasons"].items()]
            lines.append(
                f"{nic['name']:8} {qname:6} {q['frames']:>10} {q['bytes']:>12} {q['drops']:>7} "
                f"{q['notifications']:>7}  {' '.join(notes)}"
            )
    r = stats["responder"]
    lines.append(
        f"responder: arp={r['arp_replies']} icmp={r['icmp_replies']} udp_echo={r['udp_replies']} "
        f"udp_sink={r['udp_sink_packets']}"
    )
    pool = stats["pool"]
    lines.append("pool: " + " ".join(f"{k}={v}" for k, v in pool.items()))
    return "\n".join(lines)
