"""One guest driver that ``vdev fuzz-driver`` runs programs against, and its oracles.

``BareTarget`` keeps one ``vdev sandbox`` (the bare driver, in-process vdev device) alive
across executions: each execution plays a program (``host.fuzz_program``), then the
epilogue (every rule removed, link up, the driver's ``reset``: the device is reset and the
driver re-initializes queues, pool and rings), then the liveness probe.  The guest is
rebooted only when it stopped answering (hang, QEMU gone).

Oracles, in order (the first that speaks gives the finding's signature):

1. console: the first line of the execution's console output matching ``BUG_PATTERNS``
   (the driver's ``BUG:`` memory-safety checks, guest/driver/fuzz.c; panics, oopses and
   ``virtqueue ... broken`` for kernels);
2. a command that did not answer within its bound (``hang: <verb>``) or QEMU exiting;
3. the liveness probe after the epilogue: ``tx`` of two frames must complete within
   ``probe_timeout`` (``liveness: ...``).

Feedback: builds with the coverage map (images/bare.py variants ``cov`` and ``plant-*``)
export ``vdev_cov_map``; the host reads it out of guest RAM through its ELF symbol
(pyelftools, as ``vdev inspect`` does) before and after each execution and keeps the
AFL-style (edge, hit-count bucket) pairs that moved.  The device's own fault events of the
execution (``EventLog``) are kept with it, for the finding's event log.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from host.fuzz_program import Op, Program

if TYPE_CHECKING:
    from host.cli_sandbox import Sandbox
    from vdev.faults.traffic import HostPeer

BUG_PATTERNS = (
    r"^BUG: .*",
    r"Kernel panic.*",
    r"Oops.*",
    r"general protection fault.*",
    r"virtqueue .*broken.*",
    r"WARNING: .*",
)
_BUG = re.compile("|".join(f"(?:{p})" for p in BUG_PATTERNS), re.M)
_NUM = re.compile(r"0x[0-9a-fA-F]+|\d+")
COV_SYMBOL = "vdev_cov_map"
# AFL's hit-count buckets: a loop running 5 times instead of 3 is new behaviour, 6 vs 7 not.
_BUCKETS = bytes(
    0 if n == 0 else 1 if n == 1 else 2 if n == 2 else 3 if n == 3 else
    4 if n < 8 else 5 if n < 16 else 6 if n < 32 else 7 if n < 128 else 8
    for n in range(256)
)  # fmt: skip


def normalize(line: str) -> str:
    """A signature from a console line: numbers (decimal or hex) become N, space trimmed."""
    return _NUM.sub("N", line.strip())


@dataclass
class ExecResult:
    """What one execution did: the finding (``signature`` None when nothing broke), the
    console lines, the coverage it touched and the device's fault events."""

    signature: str | None = None
    line: str = ""
    lines: list[str] = field(default_factory=list)
    coverage: set[int] = field(default_factory=set)  # edge << 4 | bucket
    events: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    rebooted: bool = False
    errors: list[str] = field(default_factory=list)  # ERR status lines (not findings)


class TargetLost(RuntimeError):
    """The guest stopped answering (hang or QEMU exit): the target reboots it."""


class BareTarget:
    """The bare driver in a reused sandbox (see the module docstring)."""

    kind = "bare"

    def __init__(
        self,
        *,
        variant: str = "cov",
        elf: Path | None = None,
        append: str = "",
        cmd_timeout: float = 3.0,
        probe_timeout: float = 3.0,
        pcap: str | None = None,
    ) -> None:
        self.variant = variant
        self._elf = elf
        self.append = append
        self.cmd_timeout = cmd_timeout
        self.probe_timeout = probe_timeout
        self.pcap = pcap
        self.sb: Sandbox | None = None
        self.peer: HostPeer | None = None
        self.boots = 0
        self.boot_seconds = 0.0
        self._cov_addr: int | None = None
        self._cov_size = 0
        self.mac = b""

    @property
    def elf(self) -> Path:
        if self._elf is None:
            from images.bare import build_bare

            self._elf = build_bare(variant=self.variant)
        return self._elf

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> BareTarget:
        from host.cli_sandbox import Sandbox
        from host.inspect_guest import DriverSymbols

        t0 = time.monotonic()
        syms = DriverSymbols.from_elf(self.elf)
        self._cov_addr = syms.addrs.get(COV_SYMBOL)
        self._cov_size = syms.sizes.get(COV_SYMBOL, 0) if self._cov_addr is not None else 0
        from vdev.faults.traffic import HostPeer

        self.sb = Sandbox(elf=self.elf, append=self.append, pcap=self.pcap).start()
        assert self.sb.device is not None
        # The same host sender as a scenario's ``send`` step, so a replay sends the same.
        self.peer = HostPeer(self.sb.device, name="fuzz-peer")
        self.mac = bytes.fromhex(self.sb.mac.replace(":", ""))
        self.boots += 1
        self.boot_seconds += time.monotonic() - t0
        return self

    def close(self) -> None:
        if self.peer is not None:
            self.peer.close()
            self.peer = None
        if self.sb is not None:
            self.sb.close()
            self.sb = None

    def reboot(self) -> None:
        self.close()
        self.start()

    def __enter__(self) -> BareTarget:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def has_coverage(self) -> bool:
        return self._cov_addr is not None and self._cov_size > 0

    def coverage_map(self) -> bytes:
        """The guest's edge map, read from guest RAM through its ELF symbol."""
        if self.sb is None or self._cov_addr is None:
            return b""
        mem = self.sb.guest_memory()
        return bytes(mem.read(self._cov_addr, self._cov_size))

    # -- one execution ------------------------------------------------------------------

    def _sandbox(self) -> Sandbox:
        if self.sb is None:
            self.start()
        assert self.sb is not None
        return self.sb

    def _engine(self) -> Any:
        from vdev.faults import FaultEngine

        assert self.sb is not None and self.sb.device is not None
        return FaultEngine.for_device(self.sb.device)

    def _cmd(self, line: str, res: ExecResult, timeout: float | None = None) -> str:
        sb = self._sandbox()
        try:
            reply = sb.cmd(line, timeout=timeout or self.cmd_timeout, check=False)
        except Exception as exc:  # GuestTimeout / GuestCrashed / SandboxError
            alive = sb.machine is not None and sb.machine.is_running()
            verb = line.split()[0]
            raise TargetLost(f"hang: {verb}" if alive else "crash: QEMU exited") from exc
        res.lines.extend(reply.lines)
        res.lines.append(reply.status_line)
        if not reply.ok:
            res.errors.append(reply.status_line)
        return str(reply.status_line)

    def _op(self, op: Op, res: ExecResult) -> None:
        eng = self._engine()
        if op.kind == "fault":
            from vdev.faults import build_rule

            eng.nic(0).add(build_rule(op.args))
        elif op.kind == "link":
            if op.args.get("up"):
                eng.nic(0).link_up()
            else:
                eng.nic(0).link_down()
        elif op.kind == "clear":
            eng.clear()
        elif op.kind == "send":
            assert self.peer is not None
            self.peer.send_frames(self.mac, int(op.args["count"]), int(op.args["size"]), 1.0)
        else:
            self._cmd(str(op.args["command"]), res)

    def run(self, prog: Program) -> ExecResult:
        """Play ``prog`` and the epilogue; classify what happened (never raises for a
        finding: a lost guest is rebooted and reported in the result)."""
        res = ExecResult()
        t0 = time.monotonic()
        self._sandbox()
        eng = self._engine()
        seq0 = eng.log._seq
        before = self.coverage_map()
        lost: str | None = None
        try:
            for op in prog:
                self._op(op, res)
            # Epilogue: faults off, link up, the driver resets the device and re-inits.
            eng.clear()
            eng.nic(0).link_up()
            self._cmd("reset", res)
            after = self.coverage_map()  # before the probe: the probe's path is always run
            # Liveness: the driver answers and transmits within the bound.  (Not `stats`:
            # its 60 lines cost 12 ms of emulated serial output per execution.)
            status = self._cmd(
                f"tx 2 60 32 wait={int(self.probe_timeout * 1000)}", res, self.probe_timeout + 1
            )
            if not status.startswith("OK"):
                lost = f"liveness: tx after reset: {normalize(status)}"
        except TargetLost as exc:
            lost = str(exc)
            after = b""
        res.events = _events_since(eng.log, seq0)
        m = _BUG.search("\n".join(res.lines))
        if m is not None:
            res.line = m.group(0).strip()
            res.signature = normalize(res.line)
        elif lost is not None:
            res.line = lost
            res.signature = lost
        if after and before and len(after) == len(before):
            res.coverage = _edges(before, after)
        if lost is not None and (lost.startswith("hang") or lost.startswith("crash")):
            self.reboot()
            res.rebooted = True
        res.seconds = time.monotonic() - t0
        return res

    def replay(self, prog: Program, signature: str) -> str | None:
        """Replay ``prog`` as its scenario TOML through the scenario player (the path of
        ``vdev sandbox --scenario``) on this guest; the signature it produced, if the
        verdict ("broke as declared") held."""
        import tempfile

        from host.fuzz_findings import replay_scenario
        from host.fuzz_program import to_scenario

        text = to_scenario(prog, name="replay", signature=signature)
        with tempfile.TemporaryDirectory(prefix="vdev-fuzz-") as tmp:
            path = Path(tmp) / "replay.toml"
            path.write_text(text)
            try:
                sig, ok = replay_scenario(self._sandbox(), path)
            except Exception:  # the guest stopped answering mid-replay
                self.reboot()
                return None
        return sig if ok else None


def _events_since(log: Any, seq0: int) -> list[dict[str, Any]]:
    """The fault events after ``seq0``; the device thread may append meanwhile."""
    for _ in range(10):
        try:
            return [e.as_dict() for e in list(log.events) if e.seq > seq0]
        except RuntimeError:  # deque mutated during iteration: try again
            time.sleep(0.001)
    return []


def _edges(before: bytes, after: bytes) -> set[int]:
    out: set[int] = set()
    if before == after:
        return out
    for i, (a, b) in enumerate(zip(before, after, strict=True)):
        if a != b:
            d = (b - a) & 0xFF
            out.add(i << 4 | _BUCKETS[d])
    return out


__all__ = ["BUG_PATTERNS", "BareTarget", "ExecResult", "TargetLost", "normalize"]
