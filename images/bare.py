"""Build the bare-metal virtio-net driver (``guest/driver``) into a multiboot ELF.

``build_bare()`` compiles with the system ``gcc`` and links with ``ld`` into
``guest/build/vdev-bare.elf`` (git-ignored). The flags match ``guest/Makefile``: a 32-bit
freestanding image linked at 1 MiB, because QEMU's ``-kernel`` loads a 32-bit multiboot v1
ELF (pc, q35, microvm) without any bootloader. Rebuilds happen only when a source, the shared
ABI headers, the flags or the compiler change (a content hash is kept next to the ELF). The
build goes to a temporary file renamed into place, under a lock, so concurrent test sessions
never see a half-written ELF.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from vdev.filelock import file_lock

REPO_ROOT = Path(__file__).resolve().parent.parent
DRIVER_DIR = REPO_ROOT / "guest" / "driver"
ABI_DIR = REPO_ROOT / "vdev" / "abi"
BUILD_DIR = REPO_ROOT / "guest" / "build"
ELF_NAME = "vdev-bare.elf"
OBJECTS = (
    "boot.S",
    "lib.c",
    "fuzz.c",
    "transport.c",
    "virtq.c",
    "channel.c",
    "net.c",
    "irq.c",
    "main.c",
)
# Test-only builds for ``vdev fuzz-driver`` (guest/driver/fuzz.c): "cov" adds the edge
# coverage map; each "plant-*" is "cov" plus one planted driver bug the fuzzer must find.
# Each variant is its own ELF with its own hash stamp, so they are cached side by side.
COVERAGE_FLAGS = ("-fsanitize-coverage=trace-pc",)
# The driver's logic.  Not irq.c (its timer tick and idle loop would make every run look
# new) and never fuzz.c (the callback would recurse).
COVERED = ("virtq.c", "net.c", "channel.c")
VARIANTS: dict[str, tuple[str, ...]] = {
    "default": (),
    "cov": (),
    "plant-rx-off-by-one": ("-DPLANT_RX_OFF_BY_ONE",),
    "plant-no-used-id-check": ("-DPLANT_NO_USED_ID_CHECK",),
    "plant-reset-leak": ("-DPLANT_RESET_LEAK",),
}
PLANTED = tuple(v for v in VARIANTS if v.startswith("plant-"))
CFLAGS = (
    "-m32",
    "-march=i686",
    "-ffreestanding",
    "-fno-pic",
    "-fno-pie",
    "-fno-stack-protector",
    "-fno-builtin",
    "-nostdlib",
    "-fno-asynchronous-unwind-tables",
    "-O2",
    "-g",
    "-Wall",
    "-Wextra",
    "-Werror",
    "-DVDEV_FREESTANDING",
)
LDFLAGS = ("-m", "elf_i386", "-nostdlib", "--no-warn-rwx-segments")
_INSTALL_HINT = {
    "gcc": "apt-get install gcc (32-bit code needs no multilib: the driver uses no libgcc)",
    "ld": "apt-get install binutils",
}


class BareBuildError(RuntimeError):
    """A tool is missing or compiling/linking failed; the message says which and how to fix."""


def _require(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        raise BareBuildError(f"'{tool}' not found on PATH: {_INSTALL_HINT[tool]}")
    return path


def sources() -> list[Path]:
    """Every input of the build: driver sources, headers, linker script, shared ABI headers."""
    files = [p for p in DRIVER_DIR.iterdir() if p.suffix in (".c", ".h", ".S", ".ld")]
    files += [ABI_DIR / "skywalk.h", ABI_DIR / "virtio.h"]
    return sorted(files)


def _tool_version(tool: str) -> str:
    proc = subprocess.run([tool, "--version"], capture_output=True, text=True, timeout=30)
    return proc.stdout.splitlines()[0] if proc.stdout else ""


def elf_name(variant: str = "default") -> str:
    """``vdev-bare.elf``, or ``vdev-bare-VARIANT.elf`` for a test-only variant."""
    if variant not in VARIANTS:
        raise BareBuildError(f"variant {variant!r}: one of {', '.join(VARIANTS)}")
    return ELF_NAME if variant == "default" else f"vdev-bare-{variant}.elf"


def _object_flags(variant: str, name: str) -> tuple[str, ...]:
    if variant == "default":
        return ()
    cov = COVERAGE_FLAGS if name in COVERED else ()
    return (*cov, *VARIANTS[variant])


def input_hash(gcc: str, ld: str, variant: str = "default") -> str:
    h = hashlib.sha256()
    h.update(variant.encode() + b"\0")
    for name in OBJECTS:
        h.update(" ".join(_object_flags(variant, name)).encode() + b"\0")
    for path in sources():
        h.update(f"{path.relative_to(REPO_ROOT)}\0".encode())
        h.update(path.read_bytes())
        h.update(b"\0")
    h.update(" ".join((*CFLAGS, *LDFLAGS)).encode())
    h.update(_tool_version(gcc).encode())
    h.update(_tool_version(ld).encode())
    return h.hexdigest()


def _run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if proc.returncode != 0 or proc.stderr.strip():
        # -Werror makes warnings fatal; any other stderr output (e.g. linker warnings) is
        # reported too, so the build stays warning-free.
        what = "failed" if proc.returncode else "printed warnings"
        raise BareBuildError(f"{' '.join(cmd)} {what}:\n{proc.stderr}{proc.stdout}")


def build_bare(force: bool = False, variant: str = "default") -> Path:
    """Return the driver ELF, (re)building it if any input changed or ``force`` is set.

    ``variant`` picks a test-only build (``VARIANTS``: coverage, planted bugs)."""
    name_out = elf_name(variant)
    gcc, ld = _require("gcc"), _require("ld")
    BUILD_DIR.mkdir(parents=True, exist_ok=True)
    elf = BUILD_DIR / name_out
    stamp = BUILD_DIR / (name_out + ".hash")
    with file_lock(BUILD_DIR / ".bare.lock"):
        digest = input_hash(gcc, ld, variant)
        if not force and elf.exists() and stamp.exists() and stamp.read_text() == digest:
            return elf
        with tempfile.TemporaryDirectory(dir=BUILD_DIR, prefix=".bare-") as tmp:
            tmpdir = Path(tmp)
            objs: list[str] = []
            for name in OBJECTS:
                obj = tmpdir / (Path(name).stem + ".o")
                _run(
                    [
                        gcc,
                        *CFLAGS,
                        *_object_flags(variant, name),
                        f"-I{ABI_DIR}",
                        f"-I{DRIVER_DIR}",
                        "-c",
                        str(DRIVER_DIR / name),
                        "-o",
                        str(obj),
                    ]
                )
                objs.append(str(obj))
            out = tmpdir / name_out
            _run([ld, *LDFLAGS, "-T", str(DRIVER_DIR / "link.ld"), "-o", str(out), *objs])
            os.replace(out, elf)
        stamp.write_text(digest)
    return elf


if __name__ == "__main__":
    print(build_bare(force=True))
