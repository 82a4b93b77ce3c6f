"""``Machine``: one QEMU guest as a context manager (in the style of QEMU's python/qemu/machine).

It builds the command line (q35, shared guest RAM for vhost-user, one netdev per NIC, a
serial console and a QMP socket on Unix sockets we listen on), starts QEMU, and always
cleans up: process, sockets and the temp dir go away on normal exit, exceptions, test
failures and Ctrl-C. QEMU runs in its own session (so Ctrl-C reaches Python, which then shuts
it down) and with PR_SET_PDEATHSIG, so even a SIGKILLed test runner leaves no QEMU behind.

Example::

    img = images.linux.build_linux()
    with Machine.linux(img, nics=[Nic.vhost_user("/tmp/vdev.sock")],
                       kernel_args="vdev.ip=10.0.0.2/24") as m:
        out, status = m.run("cat /sys/class/net/eth0/address")
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Literal

from qemu.qmp.legacy import QEMUMonitorProtocol

from host import accel as accel_policy
from host.accel import qemu_binary
from host.console import PROMPT, Console, ErrorContext
from host.errors import GuestCrashed, GuestStalled, GuestTimeout, MachineError, tail_lines

if TYPE_CHECKING:
    from images.linux import LinuxImage

NicKind = Literal["vhost-user", "user", "none"]
# Kernel options every Linux guest gets: console on the first UART, no reboot loops
# (panic=-1 reboots, -no-reboot turns that into a QEMU exit), quiet boot.
# A ready guest under KVM must answer typed input within this (see ``input_check``).
INPUT_CHECK_S = 10.0
LINUX_BASE_ARGS = "console=ttyS0 quiet panic=-1 oops=panic"
_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class Nic:
    """One virtio-net-pci NIC and its backend.

    ``kind="vhost-user"``: ``socket`` is the vhost-user Unix socket path. By default QEMU is
    the client (the device must listen first; with ``reconnect=True`` QEMU waits and
    reconnects after a backend crash); ``server=True`` makes QEMU listen on the path.
    ``kind="user"``: QEMU's slirp (guest 10.0.2.15/24, gateway 10.0.2.2), no device needed.
    ``mac``: defaults to 52:54:00:12:34:(56+index). ``queues > 1`` turns on ``mq``.
    """

    kind: NicKind = "vhost-user"
    socket: str | Path | None = None
    mac: str | None = None
    mtu: int | None = None
    queues: int = 1
    reconnect: bool = False
    server: bool = False
    device_props: str = ""  # extra ",key=value" for -device virtio-net-pci

    @classmethod
    def vhost_user(cls, path: str | Path, **kw: object) -> Nic:
        return cls(kind="vhost-user", socket=path, **kw)  # type: ignore[arg-type]

    @classmethod
    def user(cls, **kw: object) -> Nic:
        return cls(kind="user", **kw)  # type: ignore[arg-type]

    @staticmethod
    def coerce(nic: Nic | str | Path) -> Nic:
        """A plain path means a vhost-user socket."""
        return nic if isinstance(nic, Nic) else Nic(kind="vhost-user", socket=nic)


_LIVE: weakref.WeakSet[Machine] = weakref.WeakSet()


def live_machines() -> list[Machine]:
    """Machines launched and not yet shut down (for failure reports and atexit cleanup)."""
    return list(_LIVE)


@atexit.register
def _shutdown_all() -> None:
    # Last resort when a caller forgot shutdown() or the interpreter is exiting on an
    # exception outside any context manager. PDEATHSIG covers SIGKILL of this process.
    for m in list(_LIVE):
        with contextlib.suppress(Exception):
            m.shutdown()


_ANSI = re.compile(r"\x1b(\[[0-9;?]*[A-Za-z]|.)")


def _printable(text: str) -> str:
    """``text`` without terminal escapes and control characters (for one-line messages)."""
    return "".join(c for c in _ANSI.sub("", text) if c.isprintable()).strip()


def default_mac(index: int) -> str:
    return f"52:54:00:12:34:{0x56 + index:02x}"


def _set_pdeathsig() -> None:
    """Child side of fork: die with the parent, whatever killed it."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


class Machine:
    """A QEMU x86_64 guest. Use as a context manager; ``launch()`` / ``shutdown()`` also work.

    Parameters (all keyword except the boot files):
      kernel, initrd, append: what ``-kernel/-initrd/-append`` get (``append`` only with a
        kernel). ``Machine.linux(image, ...)`` fills them for the vdev Linux image.
      nics: NICs in PCI order (guest eth0, eth1, ...); a str/Path is a vhost-user socket.
      memory_mb: guest RAM; always a shared backend, as vhost-user needs.
      shared_memory: ``"memfd"`` (default) or ``"file"``: RAM in a file under /dev/shm
        (``memory_path``) that host code can mmap to look at guest memory.
      machine: ``q35`` (default) or ``pc``; ``microvm`` builds virtio-mmio NICs, but the
        Debian kernel under TCG can hang in TSC calibration there (no PIT/HPET): untested.
      accel: ``kvm``/``tcg`` forces one (no fallback). Default (None): ``$VDEV_ACCEL`` if
        set, else KVM only where the cached or freshly probed verdict for this image says
        it works (:func:`host.accel.choose`), with a one-time relaunch under TCG when the
        KVM guest fails in a KVM way (see :meth:`launch`). ``accel`` and ``accel_reason``
        say what was used and why once launched.
      ready_pattern: regex printed when the guest is usable; ``launch`` waits for it (None:
        do not wait). ``wait_prompt``: also wait for the shell prompt after it.
      input_check: ``(line, reply_regex)``: under KVM, after the ready marker, type ``line``
        and require ``reply_regex`` within ``INPUT_CHECK_S``. A marker proves the vCPU ran,
        not that interrupts and timers work: on a nested KVM the bare driver printed its
        prompt and then never saw a key (microvm), so the probe and the run-time fallback
        both count a guest deaf to its console as a KVM failure. Not done under TCG.
      console_log: where the console log is written (kept after shutdown); default
        ``console.log`` in the machine's temp dir (removed at shutdown).
      extra_args: appended to the QEMU command line.
    """

    def __init__(
        self,
        kernel: Path | str | None = None,
        initrd: Path | str | None = None,
        append: str = "",
        *,
        nics: Sequence[Nic | str | Path] = (),
        memory_mb: int = 256,
        cpus: int = 1,
        shared_memory: Literal["memfd", "file"] = "memfd",
        machine: str = "q35",
        accel: str | None = None,
        ready_pattern: str | None = None,
        wait_prompt: bool = False,
        ready_timeout: float = 90.0,
        input_check: tuple[str, str] | None = None,
        console_log: Path | str | None = None,
        extra_args: Sequence[str] = (),
        name: str = "vdev",
    ) -> None:
        self.kernel = Path(kernel) if kernel is not None else None
        self.initrd = Path(initrd) if initrd is not None else None
        self.append = append
        self.nics = [Nic.coerce(n) for n in nics]
        self.memory_mb = memory_mb
        self.cpus = cpus
        self.shared_memory = shared_memory
        self.machine_type = machine
        self.requested_accel = accel
        self.accel = accel
        self.accel_reason = ""
        self.ready_pattern = ready_pattern
        self.wait_prompt = wait_prompt
        self.ready_timeout = ready_timeout
        self.input_check = input_check
        self.console_log = Path(console_log) if console_log is not None else None
        self.extra_args = list(extra_args)
        self.name = name

        self.temp_dir: Path | None = None
        self.memory_path: Path | None = None
        self.cmdline: list[str] = []
        self.ready_line = ""
        self.boot_seconds = 0.0
        self.accel_seconds = 0.0  # spent choosing the accelerator (a KVM probe, if one ran)
        self._proc: subprocess.Popen[bytes] | None = None
        self._console: Console | None = None
        self._qmp: QEMUMonitorProtocol | None = None
        self._console_listener: socket.socket | None = None
        self._stderr_file: Path | None = None
        self._stderr_kept = ""  # QEMU's stderr, read before shutdown removes the temp dir
        self._shm_dir: Path | None = None
        self._qmp_ready = False
        self._t0 = 0.0
        self._accel_choice: accel_policy.Choice | None = None
        self._pending_verdict: accel_policy.Verdict | None = None

    # ------------------------------------------------------------------ constructors
    @classmethod
    def linux(
        cls,
        image: LinuxImage,
        *,
        nics: Sequence[Nic | str | Path] = (),
        kernel_args: str = "",
        **kw: object,
    ) -> Machine:
        """A Machine for the vdev Linux image: waits for ``VDEV-READY`` and the prompt.

        ``kernel_args`` are appended to :data:`LINUX_BASE_ARGS`; see ``images/init.sh``
        for the ``vdev.*`` options (``vdev.ip=``, ``vdev.gw=``, ``vdev.mtu=``, ...).
        """
        from host.console import READY_PATTERN

        kw.setdefault("ready_pattern", READY_PATTERN)
        kw.setdefault("wait_prompt", True)
        kw.setdefault("name", "linux")
        return cls(
            image.kernel,
            image.initrd,
            f"{LINUX_BASE_ARGS} {kernel_args}".strip(),
            nics=nics,
            **kw,  # type: ignore[arg-type]
        )

    # ------------------------------------------------------------------ command line
    def _is_tcg(self) -> bool:
        return (self.accel or "tcg") == "tcg"

    # QEMU before 8.1 drops a TCG guest's memory barriers when the guest cannot have more
    # than one vCPU (tcg_gen_mb() emits a fence only for CF_PARALLEL translation blocks;
    # fixed upstream by "tcg: Do not elide memory barriers for !CF_PARALLEL in system
    # mode", June 2023).  A vhost-user back-end is a second thread on another core, so the
    # driver's "publish, mb(), re-check" of virtio 2.7.10 / 2.8.10 becomes a plain store and
    # load that the host CPU reorders: the driver reads a stale avail_event or used idx
    # while the device reads a stale avail idx or used_event, and both wait for good (seen
    # as a Linux TX queue that stopped with nothing in flight on the device side).  Multi-
    # threaded TCG with room for a second vCPU makes every translation block CF_PARALLEL,
    # so the barriers are real fences again; only ``cpus`` vCPUs are started.
    # VDEV_TCG_BARRIERS=0 gives the plain options back, to reproduce the QEMU bug.
    def _tcg_barriers(self) -> bool:
        return self._is_tcg() and os.environ.get("VDEV_TCG_BARRIERS", "1") != "0"

    def _accel_arg(self) -> str:
        if self._tcg_barriers():
            return "tcg,thread=multi"
        return self.accel or "tcg"

    def _smp_arg(self) -> str:
        if self._tcg_barriers():
            return f"{self.cpus},maxcpus={max(self.cpus, 2)}"
        return str(self.cpus)

    def build_cmdline(self) -> list[str]:
        """The QEMU argv (needs ``temp_dir``; ``launch`` sets it)."""
        qemu = qemu_binary()
        if qemu is None:
            raise MachineError(
                "qemu-system-x86_64 not found: `apt-get install qemu-system-x86` (or set VDEV_QEMU)"
            )
        assert self.temp_dir is not None
        mem = f"{self.memory_mb}M"
        if self.shared_memory == "file":
            assert self.memory_path is not None
            backend = f"memory-backend-file,id=mem,size={mem},mem-path={self.memory_path},share=on"
        else:
            backend = f"memory-backend-memfd,id=mem,size={mem},share=on"
        args = [
            qemu,
            "-name", self.name,
            "-accel", self._accel_arg(),
            "-machine", f"{self.machine_type},memory-backend=mem",
            "-object", backend,
            "-m", mem,
            "-smp", self._smp_arg(),
            "-nographic", "-nodefaults", "-no-reboot", "-no-user-config",
            "-chardev", f"socket,id=con0,path={self.temp_dir / 'console.sock'}",
            "-serial", "chardev:con0",
            "-qmp", f"unix:{self.temp_dir / 'qmp.sock'}",
        ]  # fmt: skip
        if self.accel == "kvm":
            args += ["-cpu", "host"]
        if self.kernel is not None:
            args += ["-kernel", str(self.kernel)]
            if self.initrd is not None:
                args += ["-initrd", str(self.initrd)]
            if self.append:
                args += ["-append", self.append]
        for i, nic in enumerate(self.nics):
            args += self._nic_args(i, nic)
        return args + self.extra_args

    def _nic_args(self, i: int, nic: Nic) -> list[str]:
        mmio = self.machine_type == "microvm"
        dev = "virtio-net-device" if mmio else "virtio-net-pci"
        props = [f"netdev=n{i}", f"id=nic{i}", f"mac={nic.mac or default_mac(i)}"]
        if not mmio:
            props.append("romfile=")
        if nic.mtu is not None:
            props.append(f"host_mtu={nic.mtu}")
        if nic.kind == "vhost-user":
            if nic.socket is None:
                raise ValueError(f"NIC {i}: vhost-user needs a socket path")
            chardev = f"socket,id=c{i},path={nic.socket}"
            if nic.server:
                chardev += ",server=on,wait=off"
            elif nic.reconnect:
                chardev += ",reconnect=1"
            netdev = f"vhost-user,id=n{i},chardev=c{i}"
            if nic.queues > 1:
                netdev += f",queues={nic.queues}"
            if not mmio:
                # QEMU 7.2 under TCG segfaults at DRIVER_OK with MSI-X vectors on a
                # vhost-user NIC (irqfd path is KVM-only): vectors=0 avoids it.
                vectors = 0 if self._is_tcg() else 2 * nic.queues + 2
                props.append(f"vectors={vectors}")
            if nic.queues > 1:
                props.append("mq=on")
            out = ["-chardev", chardev, "-netdev", netdev]
        elif nic.kind == "user":
            out = ["-netdev", f"user,id=n{i}"]
        else:
            raise ValueError(f"NIC {i}: unknown kind {nic.kind!r}")
        dev_arg = ",".join([dev, *props]) + nic.device_props
        return [*out, "-device", dev_arg]

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> Machine:
        self.launch()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.shutdown()

    def _context(self) -> ErrorContext:
        return ErrorContext(
            cmdline=self.cmdline,
            stderr_tail=self.stderr_tail(),
            log_path=self.console_log_path,
        )

    def _error(self, cls: type[MachineError], message: str) -> MachineError:
        ctx = self._context()
        console_tail = self._console.tail() if self._console else ""
        return cls(
            message,
            cmdline=ctx.cmdline,
            console_tail=console_tail,
            stderr_tail=ctx.stderr_tail,
            log_path=ctx.log_path,
        )

    @property
    def console_log_path(self) -> Path | None:
        """The live console log: ``console_log`` if given, else in the temp dir."""
        if self.console_log is not None:
            return self.console_log
        return self.temp_dir / "console.log" if self.temp_dir else None

    def stderr_tail(self, lines: int = 20) -> str:
        if self._stderr_file is None:
            return ""
        try:
            return tail_lines(self._stderr_file.read_text(errors="replace"), lines)
        except OSError:
            return tail_lines(self._stderr_kept, lines)

    def launch(self, wait: bool = True) -> None:
        """Start QEMU and attach the console; by default also QMP and wait until ready.

        ``wait=False`` returns as soon as QEMU runs: QEMU sets up netdevs before its
        monitor and blocks until every vhost-user backend is connected, so a backend that
        must connect after QEMU starts (``Nic(server=True)``) is started next, then
        :meth:`wait_ready` is called.

        The accelerator is chosen first (see ``accel`` in the class docstring). When KVM
        was chosen automatically and the guest fails in a KVM way before it is ready (QEMU
        reports a KVM internal/emulation error, dumps registers, hits the MSR assertion,
        or the console stops moving for ``host.accel.KVM_STALL_S``), QEMU is stopped and
        relaunched once under TCG, one line on stderr says so, and the verdict is cached
        once TCG is up. Any other failure (a panic, a timeout under TCG, a bad option) is
        raised as it is. (With ``Nic(server=True)`` the backend must reconnect to the
        relaunched QEMU.)
        """
        if self._proc is not None:
            raise MachineError("machine already launched")
        t_choose = time.monotonic()
        _LIVE.add(self)
        try:
            self._choose_accel()
            self._t0 = time.monotonic()
            self.accel_seconds = self._t0 - t_choose
            try:
                self._spawn()
                if wait:
                    self._wait_ready_once(None)
            except MachineError as exc:
                self._fall_back_or_raise(exc, wait, None)
        except BaseException:
            self.shutdown()
            raise

    def wait_ready(self, timeout: float | None = None) -> None:
        """Attach QMP, then wait for ``ready_pattern`` (and the prompt if ``wait_prompt``).

        After ``launch(wait=False)``, this is where a KVM failure falls back to TCG.
        """
        try:
            self._wait_ready_once(timeout)
        except MachineError as exc:
            self._fall_back_or_raise(exc, True, timeout)

    def _wait_ready_once(self, timeout: float | None) -> None:
        limit = self.ready_timeout if timeout is None else timeout
        self._attach_qmp(limit)
        if self.ready_pattern is not None:
            m = self._expect_boot(self.ready_pattern, limit)
            self.ready_line = m.group(0).strip()
            if self.wait_prompt:
                self.console.expect(re.escape(PROMPT), limit)
            self._check_input()
        self.boot_seconds = time.monotonic() - self._t0
        choice, verdict = self._accel_choice, self._pending_verdict
        if verdict is not None and choice is not None and choice.key is not None:
            # Only now, with TCG up, is it certain the failure was KVM's, not the guest's.
            accel_policy.record(choice.key, verdict)
            self._pending_verdict = None

    def _check_input(self) -> None:
        """Under KVM, prove the ready guest hears its console (see ``input_check``)."""
        if self.input_check is None or self.accel != "kvm":
            return
        line, reply = self.input_check
        self.console.send(line + "\r")
        try:
            self.console.expect(reply, INPUT_CHECK_S)
        except GuestTimeout:
            raise self._error(
                GuestStalled,
                f"the guest printed its ready marker under KVM but did not answer {line!r} "
                f"on its console within {INPUT_CHECK_S:g} s (no interrupts or timer)",
            ) from None

    # ------------------------------------------------------------------ accelerator
    def _workload(self) -> accel_policy.Workload:
        return accel_policy.Workload(self.kernel, self.initrd, self.machine_type)

    def _choose_accel(self) -> None:
        requested = self.requested_accel
        if requested is not None:
            if requested not in ("kvm", "tcg"):
                raise MachineError(f"accel={requested!r}: expected 'kvm' or 'tcg'")
            choice = accel_policy.Choice(requested, "requested by the caller", forced=True)
        else:
            probe = self.probe_kvm if self.ready_pattern is not None else None
            try:
                choice = accel_policy.choose(self._workload(), probe)
            except accel_policy.AccelError as exc:
                raise MachineError(str(exc)) from None
        self._accel_choice = choice
        self.accel = choice.accel
        self.accel_reason = choice.reason

    def probe_kvm(self) -> accel_policy.Verdict | None:
        """Boot this Machine's image under KVM without NICs until its ready marker.

        The real workload (kernel, initrd, command line, machine type, memory), because a
        synthetic program proved nothing on hosts with a broken nested KVM. Returns a KVM
        verdict when the marker appears, a TCG verdict for a KVM-shaped failure, and None
        when the guest failed in its own way (say nothing about KVM).
        """
        bound = accel_policy.PROBE_TIMEOUT_S
        probe = Machine(
            self.kernel,
            self.initrd,
            self.append,
            memory_mb=self.memory_mb,
            machine=self.machine_type,
            accel="kvm",
            ready_pattern=self.ready_pattern,
            wait_prompt=self.wait_prompt,
            ready_timeout=bound,
            input_check=self.input_check,
            name="kvm-probe",
        )
        t0 = time.monotonic()
        try:
            probe.launch()
        except GuestTimeout as exc:
            # The probe's bound is the point: a KVM guest not ready in time is no use.
            reason = probe._kvm_fault(exc) or f"not ready within {bound:g} s: {exc.message}"
            return accel_policy.Verdict("tcg", reason)
        except MachineError as exc:
            fault = probe._kvm_fault(exc)
            return None if fault is None else accel_policy.Verdict("tcg", fault)
        finally:
            probe.shutdown()
        return accel_policy.Verdict(
            "kvm", f"the guest reached its ready marker under KVM in {time.monotonic() - t0:.1f} s"
        )

    def _kvm_fault(self, exc: MachineError) -> str | None:
        """Why ``exc`` is KVM's fault (QEMU's words, or a stuck console), or None."""
        if self.accel != "kvm":
            return None
        if isinstance(exc, GuestStalled):
            return exc.message
        if self._proc is not None and self._proc.poll() is None and isinstance(exc, GuestCrashed):
            self._wait_exit(2.0)  # the console closed: let QEMU finish writing stderr
        fault = accel_policy.kvm_fault(self.stderr_tail(200))
        return f"QEMU: {fault}" if fault is not None else None

    def _fall_back_or_raise(self, exc: MachineError, wait: bool, timeout: float | None) -> None:
        """Relaunch under TCG after a KVM-shaped failure of an auto-chosen KVM; else raise."""
        choice = self._accel_choice
        reason = self._kvm_fault(exc)
        if reason is None or choice is None or not choice.fallback:
            env = accel_policy.ACCEL_ENV
            if reason is not None and choice is not None and choice.reason.startswith(env):
                exc.message += (
                    f" [KVM failed ({reason}); {choice.reason} forces KVM, so there is no TCG "
                    f"fallback: unset {env} or set {env}=tcg]"
                )
                exc.args = (exc.message,)
            raise exc
        accel_policy.announce(accel_policy.fallback_line(reason, "runtime"))
        self.shutdown()
        self._reset_launch_state()
        if self.console_log is not None:
            with contextlib.suppress(OSError), open(self.console_log, "a") as log:
                log.write(f"\n[vdev] KVM failed ({reason}): relaunching under TCG\n")
        self.accel = "tcg"
        self.accel_reason = f"fell back from KVM at run time: {reason}"
        self._accel_choice = accel_policy.Choice("tcg", self.accel_reason, key=choice.key)
        self._pending_verdict = accel_policy.Verdict(
            "tcg", reason, "runtime", time.time(), self._workload().label()
        )
        _LIVE.add(self)
        try:
            self._spawn()
            if wait:
                self._wait_ready_once(timeout)
        except MachineError as tcg_exc:
            tcg_exc.message += f" (under TCG, after KVM failed: {reason})"
            tcg_exc.args = (tcg_exc.message,)
            raise

    def _reset_launch_state(self) -> None:
        """Forget a stopped QEMU so the same Machine can be spawned again (fallback)."""
        self._proc = None
        self._console = None
        self._console_listener = None
        self._qmp = None
        self._qmp_ready = False
        self._stderr_file = None
        self._stderr_kept = ""
        self._shm_dir = None
        self.temp_dir = None
        self.memory_path = None
        self.cmdline = []

    def _expect_boot(self, pattern: str, limit: float) -> re.Match[str]:
        """Wait for the ready pattern; under KVM also watch QEMU's stderr and the console.

        A KVM internal error may leave QEMU paused rather than exiting, and a stuck vCPU
        prints nothing: both would otherwise cost the whole ready timeout.
        """
        console = self.console
        if self.accel != "kvm":
            return console.expect(pattern, limit)
        # Not min(stall, limit): a caller's short timeout is no evidence against KVM.
        stall = accel_policy.KVM_STALL_S
        deadline = time.monotonic() + limit
        seen, last_change = console.log_offset(), time.monotonic()
        while True:
            step = min(0.5, max(deadline - time.monotonic(), 0.01))
            with contextlib.suppress(GuestTimeout):
                return console.expect(pattern, step)
            now = time.monotonic()
            fault = accel_policy.kvm_fault(self.stderr_tail(200))
            if fault is not None:
                raise self._error(GuestCrashed, f"KVM failed before the guest was ready: {fault}")
            if console.log_offset() != seen:
                seen, last_change = console.log_offset(), now
            elif now - last_change >= stall:
                last = _printable(console.tail(1)) or "(nothing)"
                raise self._error(
                    GuestStalled,
                    f"no console output for {stall:g} s under KVM (last line: {last!r})",
                )
            if now >= deadline:
                raise self._error(
                    GuestTimeout, f"timed out after {limit:g} s waiting for {pattern!r}"
                )

    def _spawn(self) -> None:
        self.temp_dir = Path(tempfile.mkdtemp(prefix=f"vdev-{self.name}-"))
        if self.shared_memory == "file":
            shm_root = Path("/dev/shm") if Path("/dev/shm").is_dir() else self.temp_dir
            self._shm_dir = Path(tempfile.mkdtemp(prefix="vdev-ram-", dir=shm_root))
            self.memory_path = self._shm_dir / "guest.ram"
        self.cmdline = self.build_cmdline()
        # Listen before QEMU starts: QEMU connects as a client, so no early output is lost
        # and no connect-retry loop is needed.
        self._console_listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._console_listener.bind(str(self.temp_dir / "console.sock"))
        self._console_listener.listen(1)
        self._qmp = QEMUMonitorProtocol(str(self.temp_dir / "qmp.sock"), server=True)
        self._stderr_file = self.temp_dir / "qemu.stderr"
        with open(self._stderr_file, "wb") as err:
            self._proc = subprocess.Popen(
                self.cmdline,
                stdin=subprocess.DEVNULL,
                stdout=err,
                stderr=err,
                start_new_session=True,
                preexec_fn=_set_pdeathsig,
            )
        conn = self._accept_console(timeout=30.0)
        assert self.console_log_path is not None
        self.console_log_path.parent.mkdir(parents=True, exist_ok=True)
        self._console = Console(conn, self.console_log_path, self._context)

    def _attach_qmp(self, timeout: float) -> None:
        if self._qmp_ready:
            return
        assert self._qmp is not None
        try:
            self._qmp.accept(timeout=timeout)
        except Exception as e:
            status = self._wait_exit(2.0)
            if status is not None:
                raise self._error(
                    GuestCrashed, f"QEMU exited at startup with status {status}"
                ) from e
            socks = [str(n.socket) for n in self.nics if n.kind == "vhost-user"]
            hint = (
                f" (QEMU starts its monitor only after every vhost-user backend is "
                f"connected: {', '.join(socks)})"
                if socks
                else ""
            )
            raise self._error(MachineError, f"QMP did not come up: {e!r}{hint}") from e
        self._qmp.settimeout(30.0)
        self._qmp_ready = True

    def _wait_exit(self, timeout: float) -> int | None:
        """QEMU's exit status if it exits within ``timeout``, else None."""
        assert self._proc is not None
        try:
            return self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def _accept_console(self, timeout: float) -> socket.socket:
        assert self._console_listener is not None and self._proc is not None
        deadline = time.monotonic() + timeout
        self._console_listener.settimeout(0.1)
        while True:
            try:
                conn, _ = self._console_listener.accept()
                conn.setblocking(True)
                return conn
            except TimeoutError:
                pass
            status = self._proc.poll()
            if status is not None:
                raise self._error(GuestCrashed, f"QEMU exited at startup with status {status}")
            if time.monotonic() > deadline:
                raise self._error(GuestTimeout, f"QEMU did not connect its console in {timeout} s")

    @property
    def console(self) -> Console:
        if self._console is None:
            raise MachineError("machine not launched")
        return self._console

    @property
    def qmp(self) -> QEMUMonitorProtocol:
        """The QMP connection (attached on first use after ``launch(wait=False)``)."""
        if self._qmp is None or self._proc is None:
            raise MachineError("machine not launched")
        self._attach_qmp(self.ready_timeout)
        return self._qmp

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def exitcode(self) -> int | None:
        return self._proc.poll() if self._proc else None

    def wait(self, timeout: float) -> int:
        """Wait for QEMU to exit by itself (e.g. guest ``poweroff -f``); returns its status."""
        assert self._proc is not None
        try:
            return self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise self._error(GuestTimeout, f"QEMU still running after {timeout} s") from None

    # ------------------------------------------------------------------ guest helpers
    def run(self, cmd: str, timeout: float = 30.0, check: bool = False) -> tuple[str, int]:
        """Run a shell command in the guest: (output, exit status). See Console.run."""
        return self.console.run(cmd, timeout=timeout, check=check)

    def expect(self, pattern: str, timeout: float = 30.0) -> str:
        """Wait for a regex on the console; returns the matched text."""
        return self.console.expect(pattern, timeout).group(0)

    # ------------------------------------------------------------------ QMP
    def qmp_cmd(self, command: str, /, **args: object) -> object:
        """Execute a QMP command; failures raise MachineError with the usual context."""
        try:
            return self.qmp.cmd(command, **args)
        except Exception as e:
            raise self._error(MachineError, f"QMP {command} failed: {e!r}") from e

    def set_link(self, nic: int | str, up: bool) -> None:
        """Link state of NIC ``nic`` (index or QEMU id); the guest sees carrier change."""
        name = f"nic{nic}" if isinstance(nic, int) else nic
        self.qmp_cmd("set_link", name=name, up=up)

    def system_reset(self, wait_ready: bool = True, timeout: float | None = None) -> None:
        """Hard-reset the guest (QMP ``system_reset``), by default waiting until it is ready.

        ``-no-reboot`` turns every reset request into a shutdown, QMP's included, and
        SeaBIOS answers a warm reset with a second (guest) reset of its own. So the reboot
        action is ``reset`` until the guest is ready again, then back to ``shutdown`` so a
        later panic still ends QEMU. With ``wait_ready=False`` it stays ``reset``.
        """
        self.qmp_cmd("set-action", reboot="reset")
        self.qmp_cmd("system_reset")
        self.console.reset_shell_state()
        if not wait_ready or self.ready_pattern is None:
            return
        limit = self.ready_timeout if timeout is None else timeout
        m = self.console.expect(self.ready_pattern, limit)
        self.ready_line = m.group(0).strip()
        if self.wait_prompt:
            self.console.expect(re.escape(PROMPT), limit)
        self.qmp_cmd("set-action", reboot="shutdown")

    def quit(self) -> None:
        """Ask QEMU to exit (QMP ``quit``) and wait for it."""
        with contextlib.suppress(Exception):
            self.qmp.cmd("quit")
        if self._proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(10)

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop QEMU (QMP quit, then SIGTERM, then SIGKILL) and remove every temp file.

        Idempotent and safe at any stage of a failed launch.
        """
        _LIVE.discard(self)
        proc = self._proc
        if proc is not None and proc.poll() is None:
            steps: list[tuple[signal.Signals | None, float]] = []
            if self._qmp is not None and self._qmp_ready:
                with contextlib.suppress(Exception):
                    self._qmp.settimeout(min(timeout, 5.0))
                    self._qmp.cmd("quit")
                    steps.append((None, timeout))
            # Without a monitor QEMU may be stuck in startup (waiting for a vhost-user
            # backend), where it ignores SIGTERM: do not wait long before SIGKILL.
            steps += [(signal.SIGTERM, 3.0 if steps else 1.0), (signal.SIGKILL, 10.0)]
            for sig, wait_s in steps:
                if sig is not None:
                    with contextlib.suppress(ProcessLookupError):
                        proc.send_signal(sig)
                try:
                    proc.wait(wait_s)
                    break
                except subprocess.TimeoutExpired:
                    continue
        if self._qmp is not None:
            with contextlib.suppress(Exception):
                self._qmp.close()
            self._qmp = None
            self._qmp_ready = False
        if self._console is not None:
            with contextlib.suppress(Exception):
                self._console.close()
        if self._console_listener is not None:
            self._console_listener.close()
            self._console_listener = None
        if self._shm_dir is not None:
            shutil.rmtree(self._shm_dir, ignore_errors=True)
            self._shm_dir = None
        if self.temp_dir is not None:
            if self._stderr_file is not None:
                with contextlib.suppress(OSError):
                    self._stderr_kept = self._stderr_file.read_text(errors="replace")
            shutil.rmtree(self.temp_dir, ignore_errors=True)
        # Keep _proc and temp_dir set so exitcode and error messages still work afterwards.
