"""``vdev sandbox`` (the bare driver against the vdev device) and ``vdev inspect``.

A sandbox is one process holding both ends of a virtio-net link:

* the vdev device (``vdev.net.device.Device``) with one NIC on a vhost-user socket, its
  loop in a background thread, plus a fault control socket (``vdev.faults.control``) that
  also answers ``introspect``;
* QEMU (``host.machine.Machine``; KVM where it boots this ELF, else TCG) booting the
  freestanding driver ELF (``guest/build/vdev-bare.elf``) with ``-kernel``, its serial
  console on a Unix socket.

``vdev inspect`` asks a running sandbox's control socket for ``introspect``: the device reads
the driver's rings and counters out of guest RAM through its vhost-user memory map (see
``host.inspect_guest``) and replies with JSON. ``vdev ctl --control CTL`` works on the same
socket (fault rules at run time).

Exit status of ``vdev sandbox`` (``host.sandbox_script``, docs/sandbox.md): 0 ok, 1 a script
line answered ``ERR``, 2 usage, 3 the guest did not come up or QEMU died, 4 the device failed
under the guest (``host.device_watch``), 5 the scenario's verdict failed; the driver's
``quit CODE`` makes QEMU exit with ``(CODE << 1) | 1`` (isa-debug-exit), turned back into CODE.
Script lines may also act on the device (``host ...``, ``fault ...``: ``host.script_peer``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, TextIO

from host.bare_console import PROMPT, Reply, parse_reply
from host.cli_args import add_control_option, input_file, mtu, output_path, seconds
from host.console import bridge_terminal
from host.sandbox_script import ScriptResult

if TYPE_CHECKING:
    from host.device_watch import DeviceWatch
    from host.machine import Machine
    from host.script_peer import ScriptPeer
    from vdev.faults.control import ControlServer
    from vdev.net.device import Device
    from vdev.skywalk import Channel

GUEST_MAC = "52:54:00:12:34:56"
MACHINES = ("pc", "q35", "microvm")
CTL_ENV = "VDEV_SANDBOX_CTL"
_STATUS = re.compile(r"\n\r*(OK|ERR) [^\r\n]*\r*\n")
# microvm has no PCI: its NIC is virtio-net-device on virtio-mmio. QEMU 7.2 carries vhost-user
# over it (legacy mmio, version 1; the driver reports transport=mmio-legacy). Should a QEMU
# refuse it, the launch failure is reported with this hint and QEMU's own error line.
MICROVM_UNSUPPORTED = (
    "--machine microvm: QEMU could not run the vhost-user NIC on virtio-mmio "
    "({reason}); use --machine pc or q35 (virtio-net-pci)"
)


class SandboxError(RuntimeError):
    """The sandbox could not start, or the guest stopped answering."""


def default_ctl_path() -> Path:
    """``$VDEV_SANDBOX_CTL``, else ``$XDG_RUNTIME_DIR/vdev-sandbox.sock``, else /tmp."""
    env = os.environ.get(CTL_ENV)
    if env:
        return Path(env)
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    base = Path(runtime) if runtime and os.path.isdir(runtime) else Path(tempfile.gettempdir())
    return base / f"vdev-sandbox-{os.getuid()}.sock"


class Sandbox:
    """Device + bare-driver guest; a context manager that always stops QEMU and the device.

    ``cmd()`` runs one console command and parses its ``OK``/``ERR`` status line;
    ``channel()`` opens a host Skywalk channel on the device's switch (the guest's frames
    arrive there, frames sent there reach the guest); ``introspect()`` decodes the driver's
    state out of guest RAM.
    """

    def __init__(
        self,
        *,
        elf: Path | None = None,
        machine: str = "pc",
        append: str = "",
        pcap: str | None = None,
        ctl: Path | None = None,
        mac: str = GUEST_MAC,
        memory_mb: int = 64,
        ready_timeout: float = 30.0,
        console_log: Path | None = None,
        mtu: int | None = None,
    ) -> None:
        if machine not in MACHINES:
            raise SandboxError(f"--machine {machine}: one of {', '.join(MACHINES)}")
        from host.sandbox_options import DriverOptions, OptionError

        try:
            self.options = DriverOptions.parse(append)
            self._device_props = self.options.device_props(machine)
        except OptionError as exc:
            raise SandboxError(str(exc)) from None
        self.elf = elf
        self.machine_type = machine
        self.append = append
        self.pcap = pcap
        self.ctl_path = ctl
        self.mac = mac
        self.memory_mb = memory_mb
        self.ready_timeout = ready_timeout
        self.console_log = console_log
        self.mtu = mtu
        self.device: Device | None = None
        self.machine: Machine | None = None
        self.control: ControlServer | None = None
        self.start_to_prompt = 0.0
        self.exit_status: int | None = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._syms: Any = None
        self._cmd_lock = threading.Lock()
        self._held = False  # a background command (`CMD &`) holds the console
        self.prompt_lines: list[str] = []  # printed at the prompt before the last echo
        self.watch: DeviceWatch | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> Sandbox:
        from host.device_watch import DeviceWatch
        from host.inspect_guest import DriverSymbols
        from host.machine import Machine, Nic
        from vdev.faults.control import ControlServer
        from vdev.net.device import Device

        if self.elf is None:
            from images.bare import build_bare

            try:
                self.elf = build_bare()
            except Exception as exc:  # ToolError (no gcc), a compile error, ...
                raise SandboxError(f"building the guest driver failed: {exc}") from None
        try:
            self._syms = DriverSymbols.from_elf(self.elf)
        except Exception as exc:  # not an ELF, or not the vdev driver's (no symbols)
            raise SandboxError(f"--elf {self.elf}: not a vdev driver ELF ({exc})") from None
        self._tmp = tempfile.TemporaryDirectory(prefix="vdev-sandbox-")
        sock = Path(self._tmp.name) / "vhost.sock"
        t0 = time.monotonic()
        try:
            self.device = Device(pcap=self.pcap)
            self.device.add_nic(
                str(sock),
                mac=self.mac,
                mtu=self.mtu or 1500,
                queue_pairs=self.options.queue_pairs,
            )
            self.device.start()
            self.watch = DeviceWatch(self.device, self._qemu_alive)
            ctl = self.ctl_path or Path(self._tmp.name) / "ctl.sock"
            try:  # refuses a live listener (vdev.socketpath), like every vdev socket
                self.control = ControlServer(self.device, str(ctl))
            except OSError as exc:
                raise SandboxError(f"--control {ctl}: {exc.strerror or exc}") from None
            self.ctl_path = ctl
            self.control.add_command("introspect", set(), self._introspect_request)
            self.machine = Machine(
                self.elf,
                append=self.append,
                nics=[
                    Nic.vhost_user(
                        sock,
                        mac=self.mac,
                        mtu=self.mtu,
                        queues=self.options.queue_pairs,
                        device_props=self._device_props,
                    )
                ],
                machine=self.machine_type,
                memory_mb=self.memory_mb,
                ready_pattern=re.escape(PROMPT),
                ready_timeout=self.ready_timeout,
                input_check=("", re.escape(PROMPT)),  # an empty line: just a new prompt
                console_log=self.console_log,
                extra_args=["-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"],
                name="sandbox",
            )
            try:
                self.machine.launch()
            except Exception as exc:
                raise SandboxError(self._launch_failure(exc)) from exc
            # A one-time KVM probe is not part of the boot.
            self.start_to_prompt = time.monotonic() - t0 - self.machine.accel_seconds
        except BaseException:
            self.close()
            raise
        return self

    def _qemu_alive(self) -> bool:
        m = self.machine
        return m is not None and m.is_running()

    def msix_note(self) -> str | None:
        """Why ``msix=1`` will not give MSI-X here, if it will not: QEMU 7.2 crashes at
        DRIVER_OK with MSI-X vectors on a vhost-user NIC under TCG, so ``host.machine`` gives
        the NIC none there (``vectors=0``) and the driver falls back to INTx."""
        m = self.machine
        if not self.options.msix or m is None or m.accel == "kvm":
            return None
        return (
            f"--append msix=1: this guest runs under {m.accel} ({m.accel_reason}); a "
            "vhost-user NIC gets MSI-X vectors only under KVM (QEMU 7.2 crashes with them "
            "under TCG), so the driver uses INTx"
        )

    def _launch_failure(self, exc: Exception) -> str:
        text = str(exc)
        if self.machine_type == "microvm":
            stderr = self.machine.stderr_tail() if self.machine is not None else ""
            reason = _first_error_line(stderr) or _first_error_line(text) or "no prompt"
            return MICROVM_UNSUPPORTED.format(reason=reason) + "\n" + text
        return f"sandbox: the guest did not come up: {text}"

    def __enter__(self) -> Sandbox:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Stop QEMU, the control socket and the device; remove the temp dir. Idempotent."""
        if self.machine is not None:
            if self.exit_status is None:
                self.exit_status = self.machine.exitcode
            self.machine.shutdown(timeout=5.0)
            if self.exit_status is None:
                self.exit_status = self.machine.exitcode
            self.machine = None
        if self.control is not None:
            with contextlib.suppress(Exception):
                self.control.close()
            self.control = None
        if self.watch is not None:
            self.watch.close()
            self.watch = None
        if self.device is not None:
            self.device.close()
            self.device = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def _machine(self) -> Machine:
        if self.machine is None:
            raise SandboxError("sandbox is not running")
        return self.machine

    def _device(self) -> Device:
        if self.device is None:
            raise SandboxError("sandbox is not running")
        return self.device

    # ------------------------------------------------------------------ console
    def send_line(self, line: str) -> None:
        """Type a command without waiting for its reply (the guest echoes it; consumed)."""
        con = self._machine().console
        con.send(line + "\r")
        con.expect(re.escape(line), 10.0, fail_patterns=())
        # What the driver printed at the prompt before this echo: notices it printed while
        # idle (``! link down ...`` when a config interrupt came before the command).
        self.prompt_lines = [ln.strip("\r") for ln in con.before.split("\n") if ln.strip()]

    def wait_reply(self, timeout: float = 30.0) -> Reply:
        """Wait for the status line and the next prompt, and parse them."""
        con = self._machine().console
        m = con.expect(_STATUS, timeout, fail_patterns=())
        before = con.before
        con.expect(re.escape(PROMPT), 10.0, fail_patterns=())
        lines = [ln.strip("\r") for ln in before.split("\n") if ln.strip()]
        return parse_reply(m.group(0).strip(), lines)

    def cmd(self, line: str, timeout: float = 30.0, check: bool = True) -> Reply:
        """One console command; raises SandboxError on ``ERR`` when ``check``."""
        if self._held:
            raise SandboxError(f"{line!r}: the console is busy with a background command")
        with self._cmd_lock:
            self.send_line(line)
            reply = self.wait_reply(timeout)
        if check and not reply.ok:
            raise SandboxError(f"{line!r} failed: {reply.status_line}\n" + "\n".join(reply.lines))
        return reply

    def begin(self, line: str) -> None:
        """Start a command and keep the console (others' ``cmd`` wait) until ``finish``."""
        self._cmd_lock.acquire()
        try:
            self.send_line(line)
        except BaseException:
            self._cmd_lock.release()
            raise
        self._held = True

    def finish(self, timeout: float = 30.0) -> Reply:
        """The reply of the command ``begin`` started; gives the console back."""
        try:
            return self.wait_reply(timeout)
        finally:
            self._held = False
            self._cmd_lock.release()

    def stats(self) -> dict[str, int]:
        """The driver's own ``stats`` command as integers."""
        return {k: int(v, 0) for k, v in self.cmd("stats").pairs().items()}

    def quit(self, code: int = 0, timeout: float = 10.0) -> int:
        """``quit CODE``: waits for QEMU to exit; returns the guest's code (CODE), or -1."""
        m = self._machine()
        with contextlib.suppress(Exception):
            m.console.send(f"quit {code}\r")
        status = m.wait(timeout)
        self.exit_status = status
        return guest_code(status)

    # ------------------------------------------------------------------ host side
    def channel(self, name: str = "host", ring_slots: int = 1024, alloc_nbufs: int = 1) -> Channel:
        """A host Skywalk channel on the device's switch (in this process)."""
        return self._device().open_channel(name, ring_slots=ring_slots, alloc_nbufs=alloc_nbufs)

    def guest_memory(self) -> Any:
        """The vhost-user ``GuestMemory`` of the NIC (live guest RAM), once QEMU connected."""
        backend = self._device().sockets[0].backend
        mem = backend.mem if backend is not None else None
        if mem is None:
            raise SandboxError("QEMU has not sent its memory table yet")
        return mem

    def introspect(self) -> dict[str, Any]:
        """Decode the driver's stats, pool and rings out of guest RAM (see inspect_guest)."""
        from host.inspect_guest import memory_reader, snapshot

        with self._device().lock:
            return snapshot(memory_reader(self.guest_memory()), self._syms)

    def _introspect_request(self, req: dict[str, Any]) -> dict[str, Any]:
        from host.inspect_guest import IntrospectError
        from vdev.faults.control import RequestError, dump_rings

        try:
            snap = self.introspect()
        except (IntrospectError, SandboxError) as exc:
            raise RequestError(str(exc)) from exc
        device = self._device()
        snap["device"] = dump_rings(device.nics[0])
        snap["elf"] = str(self.elf)
        return snap

    # ------------------------------------------------------------------ script
    def run_script(
        self,
        lines: Iterable[str],
        out: TextIO,
        timeout: float = 60.0,
        peer: ScriptPeer | None = None,
    ) -> ScriptResult:
        """Run script lines (``host.sandbox_script``: guest commands, ``host``/``fault``
        lines through ``peer``, ``&``/``wait``, ``quit CODE``), printing the transcript.

        The device is checked after every line; a failure stops the script
        (``ScriptResult.failure``)."""
        from host.sandbox_script import ScriptRunner

        return ScriptRunner(self, out, timeout=timeout, peer=peer, watch=self.watch).run(lines)

    def script_peer(self) -> ScriptPeer:
        """The device side of a script (host channel + faults) for ``host``/``fault`` lines."""
        from host.script_peer import ScriptPeer

        return ScriptPeer(self._device(), bytes.fromhex(self.mac.replace(":", "")))

    # ------------------------------------------------------------------ interactive
    def interact(self, stdin: int = 0, stdout: int = 1) -> int | None:
        """Bridge the terminal and the guest console until Ctrl-] or QEMU exits.

        Returns the guest's quit code when QEMU exited, else None.
        """
        m = self._machine()
        watch = self.watch

        def running() -> bool:  # the bridge ends when QEMU exits or the device fails
            return m.is_running() and (watch is None or watch.check() is None)

        if not bridge_terminal(m.console, running, stdin, stdout, PROMPT.encode()):
            return None
        if watch is not None and watch.failure is not None:
            return None
        with contextlib.suppress(Exception):
            status = m.wait(5.0)
            self.exit_status = status
            return guest_code(status)
        return None


def guest_code(status: int | None) -> int:
    """QEMU's exit status after isa-debug-exit back to the driver's ``quit CODE`` (else -1)."""
    if status is None or status < 0 or status & 1 == 0:
        return -1
    return status >> 1


def _first_error_line(text: str) -> str:
    for line in text.splitlines():
        if "qemu-system" in line or "error" in line.lower() or "vhost" in line:
            return line.strip()
    return ""


@contextlib.contextmanager
def running_sandbox(**kw: Any) -> Iterator[Sandbox]:
    with Sandbox(**kw) as sb:
        yield sb


# ---------------------------------------------------------------------- CLI


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "sandbox",
        help="run the bare guest driver against the vdev device",
        description=(
            "Build the bare driver if needed, start the vdev device (in this process) and "
            "QEMU booting the driver, then give an interactive console (Ctrl-] leaves) or "
            "run a script. A control socket (--control) serves `vdev inspect` (the driver's "
            "rings and counters, read from guest RAM) and `vdev ctl` (fault rules)."
        ),
    )
    p.add_argument("--machine", choices=MACHINES, default="pc", help="QEMU machine (default pc)")
    p.add_argument(
        "--script",
        metavar="FILE",
        type=input_file,
        help="console commands, one per line (# comments); '-' reads stdin",
    )
    p.add_argument(
        "--scenario",
        metavar="FILE",
        type=input_file,
        help="play a fault scenario (TOML) during the run",
    )
    p.add_argument("--append", default="", metavar="ARGS", help="driver command line (-append)")
    p.add_argument(
        "--pcap",
        metavar="FILE",
        type=output_path,
        help="write a pcapng capture of the device's traffic",
    )
    p.add_argument("--mtu", type=mtu, default=None, help="MTU the device offers, 68-65535")
    add_control_option(
        p,
        aliases=("--ctl",),
        help=f"control socket for vdev inspect / vdev ctl (default ${CTL_ENV} or "
        f"{default_ctl_path()})",
    )
    p.add_argument(
        "--elf", metavar="FILE", type=input_file, help="driver ELF (default: build guest/driver)"
    )
    from images.bare import VARIANTS

    p.add_argument(
        "--variant",
        choices=list(VARIANTS),
        default="default",
        help="build this test-only driver variant instead (cov: coverage map; plant-*: a "
        "planted bug, what vdev fuzz-driver findings name)",
    )
    p.add_argument("--log", metavar="FILE", type=output_path, help="keep the console log here")
    p.add_argument(
        "--timeout",
        type=seconds(positive=True),
        default=60.0,
        help="per-command reply timeout in --script",
    )
    p.set_defaults(func=run_sandbox)

    i = subparsers.add_parser(
        "inspect",
        help="show a running sandbox's driver rings and counters (from guest RAM)",
        description=(
            "Ask a running `vdev sandbox` for the driver's state: TX/RX/ALLOC/FREE ring "
            "head/tail/khead, ready slots, pool in-use and the stats counters, read live out "
            "of guest RAM through the device's vhost-user memory map."
        ),
    )
    add_control_option(
        i,
        short=True,
        aliases=("--socket",),
        create=False,
        metavar="CTL",
        help=f"the sandbox's control socket (default ${CTL_ENV} or {default_ctl_path()})",
    )
    i.add_argument("--json", action="store_true", help="print the raw JSON snapshot")
    i.add_argument(
        "--watch",
        type=seconds(positive=True),
        metavar="SECONDS",
        help="repeat every SECONDS until Ctrl-C",
    )
    i.add_argument("--timeout", type=seconds(positive=True), default=5.0, help="reply timeout")
    i.set_defaults(func=run_inspect)


def run_sandbox(args: argparse.Namespace) -> int:
    return sandbox_main(
        machine=args.machine,
        script=args.script,
        scenario=args.scenario,
        append=args.append,
        pcap=args.pcap,
        ctl=args.control,
        elf=args.elf,
        mtu=args.mtu,
        log=args.log,
        timeout=args.timeout,
        variant=args.variant,
    )


def run_from_run(args: argparse.Namespace) -> int:
    """``vdev run --image bare``: the same as ``vdev sandbox`` on the pc machine."""
    return sandbox_main(
        machine="pc",
        script=getattr(args, "script", None),
        scenario=getattr(args, "scenario", None),
        append=getattr(args, "kernel_args", "") or "",
        pcap=getattr(args, "pcap", None),
        ctl=getattr(args, "control", None),
        as_json=bool(getattr(args, "json", False)),
        mtu=getattr(args, "mtu", None),
        log=getattr(args, "log", None),
        variant=getattr(args, "variant", "default"),
    )


def sandbox_main(
    *,
    machine: str = "pc",
    script: str | None = None,
    scenario: str | None = None,
    append: str = "",
    pcap: str | None = None,
    ctl: str | None = None,
    elf: str | None = None,
    log: str | None = None,
    timeout: float = 60.0,
    as_json: bool = False,
    mtu: int | None = None,
    variant: str = "default",
) -> int:
    """Start a sandbox, run the script (or the interactive console), return the status
    (``host.sandbox_script``: 0 ok, 1 ERR, 2 usage, 3 guest lost, 4 device failure,
    5 scenario failed, 130 interrupted, or the script's ``quit CODE``)."""
    from host.accel import qemu_binary
    from host.sandbox_script import EXIT_GUEST, EXIT_USAGE

    if qemu_binary() is None:
        print("vdev sandbox: qemu-system-x86_64 not found (apt-get install qemu-system-x86)",
              file=sys.stderr)  # fmt: skip
        return EXIT_USAGE
    lines: list[str] | None = None
    if script is not None:
        try:
            text = sys.stdin.read() if script == "-" else Path(script).read_text("utf-8")
        except OSError as exc:
            print(f"vdev sandbox: --script {script}: {exc.strerror or exc}", file=sys.stderr)
            return EXIT_USAGE
        except UnicodeDecodeError as exc:
            print(
                f"vdev sandbox: --script {script}: not UTF-8 text (byte offset {exc.start})",
                file=sys.stderr,
            )
            return EXIT_USAGE
        lines = text.splitlines()
    if scenario is not None:
        from vdev.faults.scenario import ScenarioError, load_scenario

        try:
            sc = load_scenario(scenario)
        except ScenarioError as exc:
            print(f"vdev sandbox: --scenario {exc}", file=sys.stderr)
            return EXIT_USAGE
        from host.scenario_guest import bare_unsupported

        for flow in sc.traffic:
            why = bare_unsupported(flow)
            if why is not None:
                print(f"vdev sandbox: --scenario {scenario}: traffic {flow.index}: {why}",
                      file=sys.stderr)  # fmt: skip
                return EXIT_USAGE
    if elf is None and variant != "default":
        from images.bare import build_bare

        try:
            elf = str(build_bare(variant=variant))
        except Exception as exc:  # no gcc, a compile error
            print(f"vdev sandbox: --variant {variant}: build failed: {exc}", file=sys.stderr)
            return EXIT_GUEST
    try:
        sb = Sandbox(
            elf=Path(elf) if elf else None,
            machine=machine,
            append=append,
            pcap=pcap,
            ctl=Path(ctl) if ctl else default_ctl_path(),
            console_log=Path(log) if log else None,
            mtu=mtu,
        )
    except SandboxError as exc:  # a bad --machine / --append value
        print(f"vdev sandbox: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        sb.start()
    except SandboxError as exc:
        print(f"vdev sandbox: {exc}", file=sys.stderr)
        return EXIT_GUEST
    try:
        return _session(
            sb, machine, lines, scenario, timeout, as_json, rules=len(sc.rules) if scenario else 0
        )
    except Exception as exc:  # MachineError, GuestTimeout, SandboxError...
        print(f"vdev sandbox: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_GUEST
    finally:
        sb.close()


def _session(
    sb: Sandbox,
    machine: str,
    lines: list[str] | None,
    scenario: str | None,
    timeout: float,
    as_json: bool,
    rules: int = 0,
) -> int:
    """The part of ``sandbox_main`` that runs with a started sandbox. ``rules``: how many
    rules the scenario installs at t=0 (the script starts once they are in place)."""
    import io

    from host.sandbox_script import EXIT_DEVICE, exit_status

    assert sb.machine is not None and sb.device is not None and sb.watch is not None
    info = ""
    with contextlib.suppress(Exception):
        info = f" (driver kmain-to-prompt {sb.introspect()['info']['boot_ms']} ms)"
    print(
        f"vdev sandbox: {machine} guest ready in {sb.start_to_prompt * 1000:.0f} ms"
        f"{info}; inspect: vdev inspect --control {sb.ctl_path}",
        file=sys.stderr,
        flush=True,
    )
    note = sb.msix_note()
    if note is not None:
        print(f"vdev sandbox: {note}", file=sys.stderr)
    failure = sb.watch.check()  # e.g. a ring refused at DRIVER_OK, during boot
    if failure is not None:
        print(f"vdev sandbox: device failure: {failure}", file=sys.stderr)
        return EXIT_DEVICE
    scen: threading.Thread | None = None
    scen_status: list[int] = []
    stop = threading.Event()
    report = io.StringIO()  # printed after the transcript, never inside it
    if scenario is not None:
        from host.scenario_guest import BareGuest, play_cli

        # The scenario's [traffic] and liveness probe drive the driver's console
        # (host.scenario_guest.BareGuest), interleaved with the script's commands.
        device, path, guest = sb.device, scenario, BareGuest(sb)

        def play() -> None:
            scen_status.append(
                play_cli(
                    path,
                    device,
                    guest,
                    prog="vdev sandbox",
                    as_json=as_json,
                    stop=stop,
                    out=report if lines is not None else None,
                )
            )

        scen = threading.Thread(target=play, name="vdev-scenario", daemon=True)
        scen.start()
        if lines is not None:
            _wait_for_rules(sb, rules, scen)
    res = ScriptResult()
    if lines is not None:
        peer = sb.script_peer()
        try:
            res = sb.run_script(lines, sys.stdout, timeout=timeout, peer=peer)
        finally:
            peer.close()
    elif scen is not None:
        # The scenario drives the console (traffic, probe): no terminal bridge.
        print(
            "vdev sandbox: playing the scenario (use --script FILE to run console commands "
            "alongside it)",
            file=sys.stderr,
        )
    else:
        quit_code = sb.interact()
        failure = sb.watch.check()
        if failure is not None:
            res.failure = failure
            print(f"\nvdev sandbox: device failure: {failure}", file=sys.stderr)
        elif quit_code is not None:
            res.quit_code = quit_code
    if scen is not None:
        if scen.is_alive():
            print("vdev sandbox: waiting for the scenario to finish", file=sys.stderr)
        try:
            deadline = time.monotonic() + 900
            while scen.is_alive() and time.monotonic() < deadline:
                scen.join(timeout=0.2)
        except KeyboardInterrupt:
            stop.set()  # the scenario prints its partial report
            print("vdev sandbox: interrupted: finishing the report", file=sys.stderr)
            scen.join(timeout=120)
            sys.stdout.write(report.getvalue())
            return 130
        sys.stdout.write(report.getvalue())
        sys.stdout.flush()
    return exit_status(res, scen_status[0] if scen_status else 0)


def _wait_for_rules(sb: Sandbox, count: int, scen: threading.Thread, limit: float = 10.0) -> None:
    """Hold the script until the scenario's t=0 rules are installed, so its first command
    meets the faults it was written against (the scenario thread starts concurrently)."""
    from vdev.faults import FaultEngine

    if count <= 0 or sb.device is None:
        return
    engine = FaultEngine.for_device(sb.device)
    deadline = time.monotonic() + limit
    while len(engine.rules()) < count and scen.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)


def run_inspect(args: argparse.Namespace) -> int:
    try:
        return _inspect(args)
    except BrokenPipeError:
        # `vdev inspect --watch 1 | head`: the reader has seen enough; stop quietly.
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _inspect(args: argparse.Namespace) -> int:
    from host.inspect_guest import format_snapshot
    from vdev.faults.control import request

    path = args.control or str(default_ctl_path())
    while True:
        try:
            reply = request(path, {"cmd": "introspect"}, timeout=args.timeout)
        except (OSError, ValueError) as exc:
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            print(
                f"vdev inspect: --control {path}: {why or type(exc).__name__} "
                "(is `vdev sandbox` running?)",
                file=sys.stderr,
            )
            return 2
        if not reply.get("ok"):
            print(f"vdev inspect: {reply.get('error')}", file=sys.stderr)
            return 1
        reply.pop("ok", None)
        if args.json:
            print(json.dumps(reply, indent=2), flush=True)
        else:
            print(format_snapshot(reply), flush=True)
            dev = reply.get("device", {})
            for vr in dev.get("vrings", []):
                print(
                    f"device {vr['kind']}{vr['index'] // 2}: last_avail_idx="
                    f"{vr.get('last_avail_idx')} used_idx={vr.get('used_idx')} "
                    f"in_flight={vr.get('in_flight')}",
                    flush=True,
                )
        if not args.watch:
            return 0
        try:
            time.sleep(args.watch)
        except KeyboardInterrupt:
            return 0
        print(flush=True)
