"""Build the static guest tools in ``guest/tools/`` with the host gcc.

They are linked statically against glibc so they run in the busybox initramfs, which has no
shared libraries. ``-Werror`` keeps them warning-free under ``-Wall -Wextra``.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from images.cache import REPO_ROOT, Hasher

TOOLS_DIR = REPO_ROOT / "guest" / "tools"
CFLAGS = ("-static", "-O2", "-Wall", "-Wextra", "-Werror", "-std=gnu11")


class ToolError(RuntimeError):
    """A host tool is missing or a build step failed; the message says how to fix it."""


def require_tool(name: str, package: str, hint: str = "") -> str:
    """Path of a host program, or a ToolError naming the package (or ``hint``) to get it."""
    path = shutil.which(name)
    if path is None:
        how = hint or f"install it with `apt-get install {package}`"
        raise ToolError(f"'{name}' not found: {how}")
    return path


def tool_sources() -> list[Path]:
    """The programs (one ``.c`` each) and the headers they share."""
    return sorted(p for p in TOOLS_DIR.iterdir() if p.suffix in (".c", ".h"))


def hash_tool_inputs(h: Hasher) -> None:
    for src in tool_sources():
        h.add_file(f"tool:{src.name}", src)
    h.add("cflags", " ".join(CFLAGS))
    h.add("gcc", gcc_version())


def gcc_version() -> str:
    gcc = require_tool("gcc", "gcc")
    return subprocess.run(
        [gcc, "-dumpfullversion"], check=True, capture_output=True, text=True, timeout=30
    ).stdout.strip()


def build_tools(out_dir: Path) -> dict[str, Path]:
    """Compile every ``guest/tools/*.c`` into ``out_dir``; returns program name -> path."""
    gcc = require_tool("gcc", "gcc")
    out_dir.mkdir(parents=True, exist_ok=True)
    built: dict[str, Path] = {}
    for src in tool_sources():
        if src.suffix != ".c":
            continue
        out = out_dir / src.stem
        proc = subprocess.run(
            [gcc, *CFLAGS, "-o", str(out), str(src)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        if proc.returncode != 0:
            hint = ""
            if "cannot find -lc" in proc.stderr:
                hint = " (static glibc missing: `apt-get install libc6-dev`)"
            raise ToolError(f"building {src.name} failed{hint}:\n{proc.stderr}")
        built[src.stem] = out
    return built
