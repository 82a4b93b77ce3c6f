"""A stand-in QEMU for accelerator tests: ``VDEV_QEMU`` points at a script written here.

Launched with ``-accel tcg`` it execs the real QEMU; launched with ``-accel kvm`` it either
behaves like a working KVM (execs the real QEMU under TCG) or simulates one of the KVM
failures seen on real hosts:

* ``silent``: QEMU is up (console, QMP) but the vCPU never runs (``-S``): the probe hangs, or
  the guest never prints;
* ``regdump``: KVM reports an internal error with a register dump and QEMU exits;
* ``msr``: the nested-KVM MSR assertion kills QEMU at once;
* ``deaf``: the guest runs and prints, but never receives a byte typed on its console (seen
  with the bare driver on microvm under a nested KVM: its prompt came, no key ever did). The
  stand-in puts itself between QEMU and the console socket and forwards one way only.

``phase`` says which KVM launches misbehave: ``all``, only the ``probe`` (QEMU ``-name
kvm-probe``), only the real ``run`` (the probe passes, the run-time fallback must save the
run), or ``none`` (a KVM that works). Every launch is logged as ``kvm NAME``/``tcg NAME``.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

from host import accel

STAND_IN = '''\
#!{python}
"""Stand-in QEMU for vdev's accelerator tests (mode {mode}, phase {phase})."""
import ctypes, os, re, signal, socket, subprocess, sys, threading, time

REAL, MODE, PHASE, LOG = {real!r}, {mode!r}, {phase!r}, {log!r}
args = sys.argv[1:]


def value(flag):
    return args[args.index(flag) + 1] if flag in args else ""


kvm = value("-accel") == "kvm" or any("accel=kvm" in a for a in args)
name = value("-name")
with open(LOG, "a") as f:
    f.write(("kvm" if kvm else "tcg") + " " + name + "\\n")


def as_tcg(extra=()):
    out, i = [], 0
    while i < len(args):
        if args[i] in ("-accel", "-cpu"):
            out += ["-accel", "tcg"] if args[i] == "-accel" else []
            i += 2
            continue
        out.append(re.sub(r"vectors=\\d+", "vectors=0", args[i]))
        i += 1
    return [REAL, *out, *extra]


probe = name == "kvm-probe"
misbehave = kvm and (PHASE == "all" or (PHASE == "probe") == probe and PHASE != "none")
if not misbehave:
    os.execv(REAL, as_tcg() if kvm else [REAL, *args])
if MODE == "msr":
    sys.stderr.write(
        "qemu-system-x86_64: error: failed to set MSR 0x10a to 0x69\\n"
        "qemu-system-x86_64: ../../target/i386/kvm/kvm.c:3183: kvm_buf_set_msrs: "
        "Assertion `ret == cpu->kvm_msr_buf->nmsrs' failed.\\n"
    )
    sys.stderr.flush()
    os.abort()
if MODE == "silent":
    os.execv(REAL, as_tcg(["-S"]))  # console and QMP come up; the vCPU never runs


def pdeathsig():
    ctypes.CDLL(None).prctl(1, signal.SIGKILL, 0, 0, 0)


if MODE == "deaf":
    i = next(i for i, a in enumerate(args) if a.startswith("socket,id=con0,"))
    host_path = re.search(r"path=([^,]+)", args[i]).group(1)
    mine = host_path + ".deaf"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(mine)
    listener.listen(1)
    args[i] = args[i].replace("path=" + host_path, "path=" + mine)
    child = subprocess.Popen(as_tcg(), preexec_fn=pdeathsig)
    guest, _ = listener.accept()
    host = socket.socket(socket.AF_UNIX)
    host.connect(host_path)

    def guest_to_host():
        while data := guest.recv(4096):
            host.sendall(data)

    def swallow_host():
        while host.recv(4096):
            pass  # typed input never reaches the guest

    for fn in (guest_to_host, swallow_host):
        threading.Thread(target=fn, daemon=True).start()
    sys.exit(child.wait())
if MODE == "regdump":

    child = subprocess.Popen(as_tcg(["-S"]), preexec_fn=pdeathsig)
    time.sleep(1.0)
    child.kill()
    child.wait()
    sys.stderr.write(
        "KVM internal error. Suberror: 1\\n"
        "emulation failure\\n"
        "RAX=0000000000000000 RBX=0000000000000000 RCX=0000000000000000 RDX=0000000000000000\\n"
        "RIP=ffffffff8103a2b1 RFL=00010046 [---Z-P-] CPL=0 II=0 A20=1 SMM=0 HLT=0\\n"
        "Code=f0 48 0f c7 0e <0f> 94 c0 c3\\n"
    )
    sys.exit(1)
sys.exit("stand-in: unknown mode " + MODE)
'''


class StandIn:
    """The wrapper script and its launch log."""

    def __init__(self, tmp_path: Path, mode: str, phase: str) -> None:
        real = shutil.which("qemu-system-x86_64")
        if real is None:
            pytest.skip("qemu-system-x86_64 not found (apt-get install qemu-system-x86)")
        self.log = tmp_path / "launches.log"
        self.path = tmp_path / "qemu-stand-in"
        self.path.write_text(
            STAND_IN.format(
                python=sys.executable, real=real, mode=mode, phase=phase, log=str(self.log)
            )
        )
        self.path.chmod(0o755)

    def launches(self) -> list[str]:
        """``kvm NAME`` / ``tcg NAME`` per QEMU start, in order."""
        return self.log.read_text().splitlines() if self.log.exists() else []


def install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str, phase: str) -> StandIn:
    s = StandIn(tmp_path, mode, phase)
    monkeypatch.setenv("VDEV_QEMU", str(s.path))
    return s


def accel_host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private accel cache, a /dev/kvm that opens, short bounds, no VDEV_ACCEL."""
    kvm = tmp_path / "kvm"
    kvm.write_text("")
    monkeypatch.setattr(accel, "KVM_DEVICE", str(kvm))
    monkeypatch.setattr(accel, "PROBE_TIMEOUT_S", 6.0)
    monkeypatch.setattr(accel, "KVM_STALL_S", 1.5)
    monkeypatch.delenv("VDEV_ACCEL", raising=False)
    cache = tmp_path / "accel.json"
    monkeypatch.setenv("VDEV_ACCEL_CACHE", str(cache))
    return cache
