"""``vdev fuzz-driver --target linux``: the stock Debian virtio_net as the fuzzed driver.

One Linux guest (the vdev image, ``images.linux``, under TCG here) is booted once and
reused.  A program's ``guest`` ops are the bare driver's vocabulary translated to what a
Linux guest does on its shell (``LINUX_COMMANDS``): ``tx`` becomes a burst of pings to the
device's responder, ``rx`` a read of the RX counter (NAPI harvests by itself), ``reset``
an unbind/bind of virtio_net (the device is reset and the driver probes again), and
``features`` an ``ip link`` down/up (the driver frees and refills its rings).  The epilogue
is that rebind plus the address, and the liveness probe one ping.

Novelty has no guest agent and no KCOV kernel: it is the device-observed behaviour. Every
counter the device keeps (``Device.stats()``: per-queue frames, drops by reason, interrupts,
kills, the responder's replies...) is diffed across the execution and bucketed like an
edge's hit count, plus the kinds of fault events that fired.  Oracles are the kernel's own
console lines (``BUG_PATTERNS`` and virtio_ring's ``input.N:id N out of range`` /
``is not a head`` errors) and the liveness ping.
"""

from __future__ import annotations

import re
import tempfile
import time
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from host.fuzz_program import Op, Program
from host.fuzz_target import _BUCKETS, ExecResult, _events_since, normalize
from vdev.faults.scenario_play import SEND_SETTLE

if TYPE_CHECKING:
    from host.machine import Machine
    from vdev.faults.traffic import HostPeer
    from vdev.net.device import Device

GUEST_MAC = "52:54:00:12:34:56"
GUEST_IP = "10.0.2.15/24"
RESPONDER = "10.0.2.2"
REBIND = (
    "d=$(ls /sys/bus/virtio/drivers/virtio_net | grep virtio | head -1); "
    "echo $d > /sys/bus/virtio/drivers/virtio_net/unbind; "
    "echo $d > /sys/bus/virtio/drivers/virtio_net/bind; "
    f"ip addr add {GUEST_IP} dev eth0 2>/dev/null; ip link set eth0 up; echo rebind=$d"
)
PROBE = f"ping -c 1 -W 2 {RESPONDER} >/dev/null 2>&1; echo alive=$?"
# A quiet guest: no IPv6 (router solicitations, MLD, DAD after every rebind), so the only
# frames on the rings are the ones the program makes.  Background traffic racing a rule
# ("the first TX completion after install") made replays depend on timing.  ``default``
# covers the eth0 that every rebind creates anew.
QUIET = (
    "for f in /proc/sys/net/ipv6/conf/*/disable_ipv6; do echo 1 > $f; done 2>/dev/null; echo quiet"
)
LINUX_PATTERNS = re.compile(
    r"(?:^.*virtio_net \S+: (?:input|output)\.\d+:.*$)|(?:^.*(?:BUG: |Kernel panic|Oops|"
    r"general protection fault|WARNING: |virtqueue .*broken).*$)",
    re.M,
)


def linux_command(command: str) -> str:
    """The Linux shell line for one bare-driver vocabulary command."""
    verb = command.split()[0]
    if verb == "tx":
        n = max(1, min(8, int(command.split()[1])))
        return f"ping -c {n} -i 0.02 -W 1 {RESPONDER} >/dev/null 2>&1; echo ping=$?"
    if verb == "rx":
        return "cat /sys/class/net/eth0/statistics/rx_packets"
    if verb == "reset":
        return REBIND
    if verb == "features":
        return "ip link set eth0 down; ip link set eth0 up; echo relink"
    return command


def linux_program(prog: Program) -> Program:
    return [
        Op("guest", {"command": linux_command(str(op.args["command"]))})
        if op.kind == "guest"
        and not str(op.args["command"]).startswith(("ping", "cat", "d=", "ip", "for f"))
        else op
        for op in prog
    ]


def _flatten(d: Any, prefix: str, out: dict[str, int]) -> None:
    if isinstance(d, dict):
        for k, v in d.items():
            _flatten(v, f"{prefix}.{k}", out)
    elif isinstance(d, list):
        for i, v in enumerate(d):
            _flatten(v, f"{prefix}[{i}]", out)
    elif isinstance(d, int) and not isinstance(d, bool):
        out[prefix] = d


def behaviour(before: dict[str, int], after: dict[str, int], kinds: set[str]) -> set[int]:
    """Device-observed features of one execution: (counter, bucketed delta) and event kinds."""
    out: set[int] = set()
    for key in set(before) | set(after):
        delta = after.get(key, 0) - before.get(key, 0)
        if delta > 0:
            h = zlib.crc32(key.encode()) & 0xFFFFFFF
            out.add(h << 4 | _BUCKETS[min(delta, 255)])
    for kind in kinds:
        out.add((zlib.crc32(b"ev:" + kind.encode()) & 0xFFFFFFF) << 4)
    return out


class LinuxTarget:
    """The Debian virtio_net in one reused vdev Linux guest (see the module docstring)."""

    kind = "linux"

    def __init__(self, *, cmd_timeout: float = 15.0, log: Path | None = None) -> None:
        self.cmd_timeout = cmd_timeout
        self.log = log
        self.device: Device | None = None
        self.machine: Machine | None = None
        self.peer: HostPeer | None = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self.boots = 0
        self.boot_seconds = 0.0
        self.mac = bytes.fromhex(GUEST_MAC.replace(":", ""))

    def start(self) -> LinuxTarget:
        from host.machine import Machine, Nic
        from images.linux import build_linux
        from vdev.faults.traffic import HostPeer
        from vdev.net.device import Device

        t0 = time.monotonic()
        image = build_linux()
        self._tmp = tempfile.TemporaryDirectory(prefix="vdev-fuzz-linux-")
        sock = Path(self._tmp.name) / "nic0.sock"
        self.device = Device()
        self.device.add_nic(str(sock), mac=GUEST_MAC)
        self.device.start()
        self.machine = Machine.linux(
            image,
            nics=[Nic.vhost_user(sock, mac=GUEST_MAC)],
            kernel_args=f"vdev.ip={GUEST_IP} vdev.gw={RESPONDER}",
            console_log=self.log,
        )
        self.machine.launch()
        self.machine.run(QUIET, timeout=self.cmd_timeout)
        self.peer = HostPeer(self.device, name="fuzz-peer")
        self.boots += 1
        self.boot_seconds += time.monotonic() - t0
        return self

    def close(self) -> None:
        if self.peer is not None:
            self.peer.close()
            self.peer = None
        if self.machine is not None:
            self.machine.shutdown()
            self.machine = None
        if self.device is not None:
            self.device.close()
            self.device = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def reboot(self) -> None:
        self.close()
        self.start()

    def __enter__(self) -> LinuxTarget:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _engine(self) -> Any:
        from vdev.faults import FaultEngine

        assert self.device is not None
        return FaultEngine.for_device(self.device)

    def _sh(self, line: str, res: ExecResult) -> str:
        assert self.machine is not None
        out, _ = self.machine.run(line, timeout=self.cmd_timeout)
        res.lines.extend(ln for ln in out.splitlines() if ln.strip())
        return out

    def run(self, prog: Program) -> ExecResult:
        from host.errors import MachineError
        from vdev.faults import build_rule

        res = ExecResult()
        t0 = time.monotonic()
        if self.machine is None:
            self.start()
        assert self.machine is not None and self.device is not None and self.peer is not None
        eng = self._engine()
        seq0 = eng.log._seq
        log0 = self.machine.console.log_offset()
        before: dict[str, int] = {}
        _flatten(self.device.stats(), "", before)
        lost: str | None = None
        try:
            for op in linux_program(prog):
                if op.kind == "fault":
                    eng.nic(0).add(build_rule(op.args))
                elif op.kind == "link":
                    eng.nic(0).link_up() if op.args.get("up") else eng.nic(0).link_down()
                elif op.kind == "clear":
                    eng.clear()
                elif op.kind == "send":
                    self.peer.send_frames(
                        self.mac, int(op.args["count"]), int(op.args["size"]), settle=SEND_SETTLE
                    )
                else:
                    self._sh(str(op.args["command"]), res)
            eng.clear()
            eng.nic(0).link_up()
            self._sh(REBIND, res)
            out = self._sh(PROBE, res)
            if "alive=0" not in out:
                lost = "liveness: no ping answer after the driver rebound"
        except MachineError as exc:
            lost = "hang: shell" if self.machine.is_running() else "crash: guest exited"
            res.errors.append(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        console = self.machine.console.log_since(log0) if self.machine is not None else ""
        res.events = _events_since(eng.log, seq0)
        after: dict[str, int] = {}
        if self.device is not None:
            _flatten(self.device.stats(), "", after)
        res.coverage = behaviour(before, after, {str(e.get("kind")) for e in res.events})
        m = LINUX_PATTERNS.search(console)
        if m is not None:
            res.line = m.group(0).strip()
            res.signature = normalize(re.sub(r"^\[[\s\d.]+\]\s*", "", res.line))
        elif lost is not None:
            res.line = res.signature = lost
        res.lines = [ln for ln in console.splitlines() if ln.strip()][-200:]
        if lost is not None and not lost.startswith("liveness"):
            self.reboot()
            res.rebooted = True
        elif res.signature is not None:
            # virtio_ring marks the queue broken and the driver does not recover; a rebind
            # resets the device.  Reboot when even that left it broken (next run clean).
            out = self._probe_after_finding()
            if "alive=0" not in out:
                self.reboot()
                res.rebooted = True
        res.seconds = time.monotonic() - t0
        return res

    def _probe_after_finding(self) -> str:
        assert self.machine is not None
        try:
            out, _ = self.machine.run(f"{REBIND}; {PROBE}", timeout=self.cmd_timeout)
        except Exception:
            return ""
        return out

    def replay(self, prog: Program, signature: str) -> str | None:
        """Replay ``prog`` as its scenario TOML (what ``vdev run --scenario`` plays: the
        quiet prologue, the program, the rebind epilogue, ``expect = "breaks"`` with the
        signature's line) through the scenario player on this guest; the signature it
        produced, if the verdict held.  The guest is rebooted when the rebind left it dead,
        so every replay starts from a working driver."""
        from host.fuzz_program import to_scenario
        from host.scenario_guest import LinuxGuest
        from vdev.faults.scenario_play import play

        if self.machine is None:
            self.start()
        assert self.machine is not None and self.device is not None
        text = to_scenario(
            linux_program(prog),
            name="replay",
            signature=signature,
            epilogue=REBIND,
            prologue=QUIET,
        )
        log0 = self.machine.console.log_offset()
        got: str | None = None
        with tempfile.TemporaryDirectory(prefix="vdev-fuzz-linux-") as tmp:
            path = Path(tmp) / "replay.toml"
            path.write_text(text)
            try:
                guest = LinuxGuest(self.machine, ip=GUEST_IP.split("/")[0], mac=GUEST_MAC)
                report = play(str(path), self.device, guest=guest)
                m = LINUX_PATTERNS.search(self.machine.console.log_since(log0))
                if report.ok and m is not None:
                    got = normalize(re.sub(r"^\[[\s\d.]+\]\s*", "", m.group(0).strip()))
            except Exception:  # the guest stopped answering mid-replay
                got = None
        if "alive=0" not in self._probe_after_finding():
            self.reboot()
        return got


__all__ = ["QUIET", "REBIND", "LinuxTarget", "behaviour", "linux_command", "linux_program"]
