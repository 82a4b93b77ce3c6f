"""``vdev serve``: run the device until SIGINT/SIGTERM, then print per-queue stats."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import threading
from typing import Any

from host.cli_args import add_control_option, mtu, output_path, queue_pairs
from vdev.net.kickhold import DEFAULT_WINDOW_S, check_window
from vdev.net.rxbatch import DEFAULT_BATCH, check_batch
from vdev.shutdown import stop_on_signals


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
    p.add_argument(
        "--queues", type=queue_pairs, default=1, metavar="N", help="queue pairs per NIC, 1-8"
    )
    p.add_argument(
        "--mtu", type=mtu, default=1500, help="MTU offered to the driver, 68-65535 (default 1500)"
    )
    p.add_argument(
        "--pcap", metavar="FILE", type=output_path, help="write a pcapng capture of every NIC"
    )
    p.add_argument(
        "--client",
        action="store_true",
        help="connect to the sockets (frontend listens, e.g. QEMU server=on) instead of listening",
    )
    p.add_argument(
        "--responder-ip", default="10.0.2.2", help="IPv4 address of the built-in responder"
    )
    # Sockets are checked when they are created (exit 1, like --socket): vdev.socketpath
    # names a missing directory and refuses a path another live process listens on.
    add_control_option(
        p,
        create=False,
        help="serve the JSON fault-control socket here (mode 0600; see `vdev ctl`)",
    )
    p.add_argument(
        "--fault-log",
        metavar="FILE",
        type=output_path,
        help="append injected-fault events as JSON lines",
    )
    p.add_argument(
        "--fault-seed", type=int, default=42, help="seed of the fault engine (default 42)"
    )
    p.add_argument(
        "--json",
        action="store_true",
        help="print the final statistics as JSON (stdout is pure JSON; messages go to stderr)",
    )
    p.add_argument(
        "--poll",
        action="store_true",
        help="busy-poll every queue instead of waiting for kicks (like a DPDK PMD: lowest "
        "latency; with --threads per-nic each NIC's thread spins on its own queues, one core "
        "per NIC)",
    )
    p.add_argument(
        "--threads",
        choices=("per-nic", "single"),
        default=None,
        help="per-nic (default, or $VDEV_THREADS): each NIC's kicks are serviced by a "
        "datapath thread of its own, whose compiled bursts run in parallel with the other "
        "NICs'; single: one thread serves every NIC and the control plane",
    )
    p.add_argument(
        "--notify-watch",
        choices=("recover", "report", "off"),
        default="recover",
        help="lost kicks and interrupts (a driver/device notification race, e.g. a guest "
        "whose barriers are missing): make them up and log them (recover, default), only "
        "log and count them (report), or do not look (off)",
    )
    p.add_argument(
        "--kick-hold-us",
        metavar="US",
        type=kick_hold_us,
        default=DEFAULT_WINDOW_S,
        help="TX kick mitigation: a TX kick that comes less than US microseconds after the "
        "queue's previous drain switches its kicks off, and the device polls the ring (about "
        "every millisecond, at once while it takes whole rings) until a poll finds less than "
        "2 frames; a ping-pong backs off (default 100; 0: off, a kick per batch; at most "
        "10000)",
    )
    p.add_argument(
        "--rx-kick-batch",
        metavar="N",
        type=rx_kick_batch,
        default=DEFAULT_BATCH,
        help="RX kick batching: while frames wait for guest RX buffers, ask the driver "
        "(EVENT_IDX) for its refill kick only after N more buffers, or after all the frames "
        "waiting if fewer; a driver that posts fewer and waits gets them 2 ms later and the "
        "queue backs off (default 0: half the RX ring; 1: off, a kick per refill)",
    )
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv: debug)")
    p.set_defaults(func=run)


def rx_kick_batch(text: str) -> int:
    """``--rx-kick-batch`` as an int, or an argparse error naming the bad value."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of buffers") from None
    try:
        return check_batch(n)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def kick_hold_us(text: str) -> float:
    """``--kick-hold-us`` in seconds, or an argparse error naming the bad value."""
    try:
        us = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of microseconds") from None
    try:
        return check_window(us * 1e-6)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def run(args: argparse.Namespace) -> int:
    from vdev.net.device import Device

    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if len(args.mac) > len(args.socket):
        print(f"vdev serve: {len(args.mac)} --mac for {len(args.socket)} --socket", file=sys.stderr)
        return 2
    stop = threading.Event()
    stop_on_signals(stop)  # a second Ctrl-C must not hang the shutdown (vdev/shutdown.py)
    try:
        device = Device(
            pcap=args.pcap,
            responder_ip=args.responder_ip,
            threads=args.threads,
            notify_watch=args.notify_watch,
            kick_hold=args.kick_hold_us,
            rx_kick_batch=args.rx_kick_batch,
        )
    except OSError as exc:
        print(f"vdev serve: --pcap {args.pcap}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    except ValueError as exc:
        print(f"vdev serve: --responder-ip {args.responder_ip}: {exc}", file=sys.stderr)
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
                opt = f"--mac {mac}" if mac is not None else f"--socket {path}"
                raise ValueError(f"{opt}: {exc}") from exc
        control = None
        if args.control or args.fault_log:
            from vdev.faults import FaultEngine
            from vdev.faults.control import ControlServer

            try:
                engine = FaultEngine.for_device(device, seed=args.fault_seed, log=args.fault_log)
            except OSError as exc:
                raise OSError(f"--fault-log {args.fault_log}: {exc.strerror or exc}") from exc
            if args.control:
                try:
                    control = ControlServer(device, args.control, engine)
                except OSError as exc:
                    raise OSError(f"--control {args.control}: {exc.strerror or exc}") from exc
        # A banner, not a result: stderr, so that stdout (with --json) is pure JSON.
        print(
            f"vdev serve: {len(args.socket)} NIC(s) on {', '.join(args.socket)}"
            + (f"; control socket {args.control}" if args.control else "")
            + ("; busy-polling" if args.poll else "")
            + f"; threads {device.threads}"
            + f"; kick hold {device.kick_hold * 1e6:g} us"
            + f"; RX kick batch {device.rx_kick_batch or 'half the ring'}",
            file=sys.stderr,
            flush=True,
        )
        device.serve_forever(stop, poll=args.poll)
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
        f"udp_sink={r['udp_sink_packets']} bad_checksum ip={r['bad_ip_checksum']} "
        f"icmp={r['bad_icmp_checksum']} udp={r['bad_udp_checksum']}"
    )
    pool = stats["pool"]
    lines.append("pool: " + " ".join(f"{k}={v}" for k, v in pool.items()))
    return "\n".join(lines)
