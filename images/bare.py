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
OBJECTS = ("boot.S", "lib.c", "transport.c", "virtq.c", "channel.c", "net.c", "irq.c", "main.c")
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


def input_hash(gcc: str, ld: str) -> str:
    h = hashlib.sha256()
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


def build_bare(force: bool = False) -> Path:
    """Return the driver ELF, (re)building it if any input changed or ``force`` is set."""
    gcc, ld = _require("gcc"), _require("ld")
    BUILD_DIR.mkdir(parents=True, exist_ok=True)
    elf = BUILD_DIR / ELF_NAME
    stamp = BUILD_DIR / (ELF_NAME + ".hash")
    with file_lock(BUILD_DIR / ".bare.lock"):
        digest = input_hash(gcc, ld)
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
                        f"-I{ABI_DIR}",
                        f"-I{DRIVER_DIR}",
                        "-c",
                        str(DRIVER_DIR / name),
                        "-o",
                        str(obj),
                    ]
                )
                objs.append(str(obj))
            out = tmpdir / ELF_NAME
            _run([ld, *LDFLAGS, "-T", str(DRIVER_DIR / "link.ld"), "-o", str(out), *objs])
            os.replace(out, elf)
        stamp.write_text(digest)
    return elf


if __name__ == "__main__":
    print(build_bare(force=True))
