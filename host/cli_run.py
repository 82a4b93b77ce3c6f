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

from host.cli_args import add_control_option, input_file, mtu, output_path, queue_pairs, seconds

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
    p.add_argument(
        "--scenario", metavar="FILE", type=input_file, help="TOML fault scenario to play"
    )
    p.add_argument(
        "--script",
        metavar="FILE",
        type=input_file,
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
        type=seconds(positive=True),
        default=600.0,
        metavar="S",
        help="with --script (Linux): give up after S seconds (default 600)",
    )
    p.add_argument(
        "--pcap", metavar="FILE", type=output_path, help="write a pcapng capture of the NIC"
    )
    p.add_argument(
        "--queues", type=queue_pairs, default=1, metavar="N", help="queue pairs 1-8 (Linux)"
    )
    p.add_argument(
        "--mtu", type=mtu, default=None, help="MTU offered to the guest (host_mtu), 68-65535"
    )
    p.add_argument("--kernel-args", default="", help="extra Linux kernel command line")
    from images.bare import VARIANTS

    p.add_argument(
        "--variant",
        choices=list(VARIANTS),
        default="default",
        help="--image bare: a test-only driver build (cov, plant-*: what fuzz-driver "
        "findings name)",
    )
    add_control_option(p, help="also serve the fault control socket here")
    p.add_argument(
        "--log", metavar="FILE", type=output_path, help="keep the guest console log here"
    )
    p.add_argument(
        "--json", action="store_true", help="scenario report as JSON (stdout is pure JSON)"
    )
    p.set_defaults(func=run)


def _read_script(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise SystemExit(f"vdev run: --script {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise SystemExit(
            f"vdev run: --script {path}: not UTF-8 text (byte offset {exc.start})"
        ) from None


def run(args: argparse.Namespace) -> int:
    if args.variant != "default" and args.image != "bare":
        print("vdev run: --variant: only with --image bare", file=sys.stderr)
        return 2
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
        try:
            device = Device(pcap=args.pcap)
        except OSError as exc:
            print(f"vdev run: --pcap {args.pcap}: {exc.strerror or exc}", file=sys.stderr)
            return 1
        with device:
            device.add_nic(str(sock), mac=GUEST_MAC, queue_pairs=args.queues, mtu=args.mtu or 1500)
            control = None
            if args.control:
                from vdev.faults.control import ControlServer

                try:  # refuses a socket another live process listens on (vdev.socketpath)
                    control = ControlServer(device, args.control)
                except OSError as exc:
                    print(f"vdev run: --control {args.control}: {exc.strerror or exc}",
                          file=sys.stderr)  # fmt: skip
                    return 1
            device.start()
            machine = Machine.linux(
                image,
                # reconnect=1: after a backend crash (or a device restart) QEMU connects
                # again and replays the vhost-user setup (scenarios/backend-crash.toml).
                nics=[
                    Nic.vhost_user(
                        sock, mac=GUEST_MAC, queues=args.queues, mtu=args.mtu, reconnect=True
                    )
                ],
                kernel_args=f"vdev.ip=10.0.2.15/24 vdev.gw=10.0.2.2 {args.kernel_args}".strip(),
                cpus=min(args.queues, 2),
                console_log=Path(args.log) if args.log else None,
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
                if not args.log:  # the default log lives in a temp dir removed on exit
                    exc.log_path = None
                hint = "" if args.log else "\n(run with --log FILE to keep the console log)"
                print(f"vdev run: {exc}{hint}", file=sys.stderr)
                return 1
            finally:
                if control is not None:
                    control.close()


def _run_script(machine: Any, device: Any, text: str, args: argparse.Namespace) -> int:
    """The whole file as one guest shell script (host/run_script.py); its status is ours."""
    from host.run_script import run_guest_script
    from host.script_peer import ScriptPeer

    peer = ScriptPeer(device, bytes.fromhex(GUEST_MAC.replace(":", "")))
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
    from host.scenario_guest import LinuxGuest, play_cli

    # The traffic is the scenario's own [traffic] section, played by the same code as in
    # the tests (host.scenario_guest), so the verdict does not depend on who plays it.
    return play_cli(path, device, LinuxGuest(machine), prog="vdev run", as_json=as_json)


def _interact(machine: Any) -> int:
    from host.console import bridge_terminal

    print("vdev run: console attached; Ctrl-] detaches and shuts the guest down", file=sys.stderr)
    machine.console.sendline("")
    bridge_terminal(machine.console, machine.is_running)
    return 0
