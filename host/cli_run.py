"""``vdev run``: start the device and a guest together.

With ``--script`` the file runs as one shell script in the guest (``host.run_script``: output
streamed, the exit status is the script's, ``--errexit`` stops at the first failure, ``host``
and ``fault`` lines act on the device); with ``--scenario`` a fault scenario plays against the
running guest while it pings the responder in the background; with neither, the terminal is
attached to the guest console until the guest powers off or the user types Ctrl-].
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

GUEST_MAC = "52:54:00:12:34:56"


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "run",
        help="start the device and a guest together",
        description=(
            "Start the vdev device and boot a guest against it. --script runs the file's lines "
            "in the guest (Linux: shell commands; bare: driver console commands) and exits with "
            "their status; --scenario plays a fault scenario while the guest pings the "
            "responder; otherwise the console is attached to this terminal."
        ),
    )
    p.add_argument("--image", choices=("linux", "bare"), default="linux", help="guest to boot")
    p.add_argument("--scenario", metavar="FILE", help="TOML fault scenario to play")
    p.add_argument(
        "--script",
        metavar="FILE",
        help="Linux: FILE runs as one shell script in the guest (its exit status is vdev run's; "
        "`host ...`/`fault ...` lines act on the device); bare: driver console commands",
    )
    p.add_argument(
        "--errexit",
        action="store_true",
        help="with --script (Linux): stop at the first failing command (set -e)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=600.0,
        metavar="S",
        help="with --script (Linux): give up after S seconds (default 600)",
    )
    p.add_argument("--pcap", metavar="FILE", help="write a pcapng capture of the NIC")
    p.add_argument("--queues", type=int, default=1, metavar="N", help="queue pairs (Linux)")
    p.add_argument("--mtu", type=int, default=None, help="MTU offered to the guest (host_mtu)")
    p.add_argument("--kernel-args", default="", help="extra Linux kernel command line")
    p.add_argument("--control", metavar="PATH", help="also serve the fault control socket here")
    p.add_argument("--json", action="store_true", help="scenario report as JSON")
    p.set_defaults(func=run)


def _read_script(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError as exc:
        raise SystemExit(f"vdev run: --script {path}: {exc.strerror or exc}") from None


def run(args: argparse.Namespace) -> int:
    if args.image == "bare":
        if getattr(args, "errexit", False):
            print("vdev run: --errexit: only for Linux scripts (--image linux)", file=sys.stderr)
            return 2
        # The bare-metal driver has its own console protocol; the sandbox speaks it.
        from host import cli_sandbox

        return int(cli_sandbox.run_from_run(args))
    if getattr(args, "errexit", False) and not args.script:
        print("vdev run: --errexit: needs --script FILE", file=sys.stderr)
        return 2
    if args.script and args.scenario:
        print("vdev run: use --script or --scenario, not both", file=sys.stderr)
        return 2
    if not 1 <= args.queues <= 8:
        print(f"vdev run: --queues {args.queues}: must be 1 to 8", file=sys.stderr)
        return 2
    script = _read_script(args.script) if args.script else None
    if args.scenario:
        from vdev.faults.scenario import ScenarioError, load_scenario

        try:
            load_scenario(args.scenario)  # fail before booting anything
        except ScenarioError as exc:
            print(f"vdev run: {exc}", file=sys.stderr)
            return 2
    if script is None and not args.scenario and not sys.stdin.isatty():
        print(
            "vdev run: stdin is not a terminal; use --script FILE or --scenario FILE",
            file=sys.stderr,
        )
        return 2

    from host.errors import MachineError
    from host.machine import Machine, Nic
    from images.linux import build_linux
    from vdev.net.device import Device

    image = build_linux(progress=lambda msg: print(f"vdev run: {msg}", file=sys.stderr))
    with tempfile.TemporaryDirectory(prefix="vdev-run-") as tmp:
        sock = Path(tmp) / "nic0.sock"
        with Device(pcap=args.pcap) as device:
            device.add_nic(str(sock), mac=GUEST_MAC, queue_pairs=args.queues, mtu=args.mtu or 1500)
            control = None
            if args.control:
                from vdev.faults.control import ControlServer

                control = ControlServer(device, args.control)
            device.start()
            machine = Machine.linux(
                image,
                nics=[Nic.vhost_user(sock, mac=GUEST_MAC, queues=args.queues, mtu=args.mtu)],
                kernel_args=f"vdev.ip=10.0.2.15/24 vdev.gw=10.0.2.2 {args.kernel_args}".strip(),
                cpus=min(args.queues, 2),
            )
            try:
                with machine:
                    print(f"vdev run: guest ready in {machine.boot_seconds:.1f} s", file=sys.stderr)
                    if script is not None:
                        return _run_script(machine, device, script, args)
                    if args.scenario:
                        return _play(machine, device, args.scenario, args.json)
                    return _interact(machine)
            except MachineError as exc:
                print(f"vdev run: {exc}", file=sys.stderr)
                return 1
            finally:
                if control is not None:
                    control.close()


def _run_script(machine: Any, device: Any, text: str, args: argparse.Namespace) -> int:
    """The whole file as one guest shell script (host/run_script.py); its status is ours."""
    from host.host_peer import HostPeer
    from host.run_script import run_guest_script

    peer = HostPeer(device, bytes.fromhex(GUEST_MAC.replace(":", "")))
    try:
        return run_guest_script(
            machine,
            text,
            peer=peer,
            errexit=bool(getattr(args, "errexit", False)),
            timeout=float(getattr(args, "timeout", 600.0)),
            out=sys.stdout,
        )
    finally:
        peer.close()


def _play(machine: Any, device: Any, path: str, as_json: bool) -> int:
    from vdev.faults.scenario import play_and_print

    # Background traffic so data-plane rules have something to act on.
    machine.run("ping -i 0.2 10.0.2.2 > /dev/null 2>&1 &", timeout=10)
    return int(play_and_print(path, device, machine.console, machine.qmp, as_json=as_json))


def _interact(machine: Any) -> int:
    from host.console import bridge_terminal

    print("vdev run: console attached; Ctrl-] detaches and shuts the guest down", file=sys.stderr)
    machine.console.sendline("")
    bridge_terminal(machine.console, machine.is_running)
    return 0
