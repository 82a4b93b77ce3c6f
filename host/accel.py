"""Choose the QEMU accelerator: KVM when it really runs guest code, else TCG.

On some hosts ``/dev/kvm`` opens but a KVM guest never makes progress (measured: a Linux
guest hung for 60 s with its vCPU in the kernel), so "KVM exists" is not enough. The probe
boots a tiny multiboot kernel (through SeaBIOS and QEMU's multiboot option ROM into 32-bit
protected mode, the path where KVM hangs here) whose only instruction writes to
``isa-debug-exit``: QEMU exits with a known status in a fraction of a second if KVM works,
and the probe times out if it does not. (Real-mode code alone runs fine under the broken
KVM, so a BIOS-only probe would lie.) The result is cached for the process and in a small
file keyed by the host boot id and the QEMU binary, so each ``vdev`` command does not pay
the timeout again. ``VDEV_ACCEL=tcg|kvm`` overrides the probe.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import struct
import subprocess
import tempfile
from pathlib import Path

QEMU = "qemu-system-x86_64"
PROBE_TIMEOUT_S = 3.0
# 32-bit code: mov al,1; out 0xf4,al; hlt; jmp $.
_PROBE_CODE = bytes([0xB0, 0x01, 0xE6, 0xF4, 0xF4, 0xEB, 0xFE])
_MB_LOAD = 0x100000
# isa-debug-exit turns the byte 1 into exit status (1 << 1) | 1.
_EXPECTED_STATUS = 3


def qemu_binary() -> str | None:
    """Path of qemu-system-x86_64 (``$VDEV_QEMU`` overrides), or None when missing."""
    env = os.environ.get("VDEV_QEMU")
    if env:
        return env if Path(env).exists() else None
    return shutil.which(QEMU)


def probe_kernel() -> bytes:
    """A multiboot v1 image using the a.out kludge (flag bit 16): header, then the code."""
    magic, flags = 0x1BADB002, 0x00010000
    end = _MB_LOAD + 32 + len(_PROBE_CODE)
    header = struct.pack(
        "<8I",
        magic,
        flags,
        -(magic + flags) & 0xFFFFFFFF,
        _MB_LOAD,  # header_addr
        _MB_LOAD,  # load_addr
        end,  # load_end_addr
        end,  # bss_end_addr
        _MB_LOAD + 32,  # entry_addr
    )
    return header + _PROBE_CODE


def _probe(qemu: str, accel: str, timeout: float) -> bool:
    with tempfile.TemporaryDirectory(prefix="vdev-accel-") as tmp:
        kernel = Path(tmp) / "probe.bin"
        kernel.write_bytes(probe_kernel())
        cmd = [
            qemu, "-accel", accel, "-machine", "pc", "-m", "16", "-kernel", str(kernel),
            "-display", "none", "-serial", "none", "-monitor", "none", "-nodefaults",
            "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04",
        ]  # fmt: skip
        try:
            proc = subprocess.run(cmd, capture_output=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return False
        return proc.returncode == _EXPECTED_STATUS


def kvm_works(timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether a KVM guest actually runs here (opening /dev/kvm is not enough)."""
    qemu = qemu_binary()
    if qemu is None or not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False
    return _probe(qemu, "kvm", timeout)


def _cache_file() -> Path:
    return Path(tempfile.gettempdir()) / f"vdev-accel-{os.getuid()}.json"


def _cache_key(qemu: str) -> str:
    try:
        boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        st = os.stat(qemu)
    except OSError:
        return ""
    return f"{boot_id}:{qemu}:{st.st_mtime_ns}:{st.st_size}"


@functools.cache
def _probed_accel() -> str:
    qemu = qemu_binary()
    if qemu is None:
        return "tcg"
    key = _cache_key(qemu)
    try:
        saved = json.loads(_cache_file().read_text())
        if key and saved.get("key") == key and saved.get("accel") in ("kvm", "tcg"):
            return str(saved["accel"])
    except (OSError, ValueError, AttributeError):
        pass
    accel = "kvm" if kvm_works() else "tcg"
    if key:
        with contextlib.suppress(OSError):
            _cache_file().write_text(json.dumps({"key": key, "accel": accel}))
    return accel


def select_accel() -> str:
    """``"kvm"`` or ``"tcg"``: ``$VDEV_ACCEL`` if set, else the (cached) probe result."""
    env = os.environ.get("VDEV_ACCEL", "").strip().lower()
    if env in ("kvm", "tcg"):
        return env
    if env:
        raise ValueError(f"VDEV_ACCEL={env!r}: expected 'kvm' or 'tcg'")
    return _probed_accel()
