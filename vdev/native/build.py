"""Build (or find in the cache) vdev's one compiled extension: every ``vdev/native/*.c``.

All of vdev's C lives in this directory and is linked into one cffi API-mode module
(``FFI().set_source`` + ``compile``), cached under ``$VDEV_CACHE_DIR`` (default
``~/.cache/vdev/``) as ``native-<hash>.so``.  Each ``*.h`` here contributes the block between
its ``FP-CDEF-BEGIN``/``FP-CDEF-END`` markers to the cdef, so adding a C file and its header
needs no change to this module.  The hash covers every C source and header here, the ABI
headers, this module, the compiler's version line, the Python version/ABI and the cffi
version.  A changed input gives a new file
name, so a stale build is never loaded.  Like ``images/bare.py``, the build runs under a
file lock in a temporary directory and the result is renamed into place, so concurrent
sessions never load a half-written library.

``VDEV_NATIVE_SANITIZE=asan`` (or ``1``) builds a separate variant with AddressSanitizer
and UndefinedBehaviorSanitizer (``-fsanitize=address,undefined``, cached as
``native-asan-<hash>``), ``=ubsan`` one with UBSan alone (``native-ubsan-<hash>``), for the
fuzzers (``scripts/fuzz.sh``).  A Python not itself built with ASan must load the ASan
runtime first (``LD_PRELOAD`` of :func:`asan_runtime`), which breaks atheris' coverage
feedback: the campaign fuzzes against the UBSan build and replays the corpus it found
under the ASan one.

Nothing is built at import time of ``vdev``: :func:`load` is called by ``fastglue.py`` and
builds once (announcing it on one stderr line); a machine without a compiler gets one
logged warning and the Python path.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.machinery
import importlib.util
import io
import logging
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path
from types import ModuleType

from vdev.abi import ABI_DIR
from vdev.errors import VdevError
from vdev.filelock import file_lock

log = logging.getLogger(__name__)

NATIVE_DIR = Path(__file__).resolve().parent
MODULE_NAME = "_vdev_native"
CDEF_BEGIN = "/* FP-CDEF-BEGIN */"
CDEF_END = "/* FP-CDEF-END */"
CFLAGS = ("-O2", "-std=gnu11", "-Wall", "-Wextra", "-fno-strict-aliasing")
SANITIZE_ENV = "VDEV_NATIVE_SANITIZE"
# VDEV_NATIVE_SANITIZE=asan (or 1): ASan + UBSan, needs the ASan runtime preloaded;
# =ubsan: UBSan alone (no preload: what a coverage-guided fuzzer can load).
SANITIZERS = {"asan": "address,undefined", "1": "address,undefined", "ubsan": "undefined"}


def sanitizer() -> str | None:
    """Which sanitized variant this process builds and loads (None: the plain build)."""
    value = os.environ.get(SANITIZE_ENV, "0")
    if value in ("", "0"):
        return None
    if value not in SANITIZERS:
        raise FastBuildError(f"{SANITIZE_ENV}={value!r}: want asan, ubsan or 0")
    return "asan" if value == "1" else value


def sanitize_flags() -> list[str]:
    kind = sanitizer()
    if kind is None:
        return []
    return [
        f"-fsanitize={SANITIZERS[kind]}",
        "-fno-sanitize-recover=undefined",  # a UB report aborts: the fuzzer counts a crash
        "-fno-omit-frame-pointer",
        "-g",
        "-O1",
    ]


def sanitized() -> bool:
    return sanitizer() is not None


def compile_flags() -> list[str]:
    return [*CFLAGS, *sanitize_flags()]


def asan_runtime() -> str | None:
    """The compiler's ASan runtime (what ``LD_PRELOAD`` must name for the sanitized build)."""
    cc = _compiler()
    if cc is None:
        return None
    try:
        out = subprocess.run(
            [cc, "-print-file-name=libasan.so"], capture_output=True, text=True, timeout=30
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return os.path.realpath(out) if out and os.path.isabs(out) and os.path.exists(out) else None


class FastBuildError(VdevError, RuntimeError):
    """The extension could not be built (no compiler, compile error, missing cffi)."""


def c_sources() -> list[Path]:
    return sorted(NATIVE_DIR.glob("*.c"))


def c_headers() -> list[Path]:
    return sorted(NATIVE_DIR.glob("*.h"))


def cdef_text() -> str:
    """The declarations between the FP-CDEF markers of every header (fed to ``ffi.cdef``)."""
    parts = []
    for header in c_headers():
        text = header.read_text()
        if CDEF_BEGIN not in text:
            continue  # a private header: nothing exported to Python
        begin = text.index(CDEF_BEGIN)
        end = text.index(CDEF_END)
        parts.append(f"/* {header.name} */\n" + text[begin + len(CDEF_BEGIN) : end])
    return "\n".join(parts)


def cache_dir() -> Path:
    env = os.environ.get("VDEV_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "vdev"


def _compiler() -> str | None:
    cc = (sysconfig.get_config_var("CC") or "cc").split()[0]
    return shutil.which(cc) or shutil.which("gcc") or shutil.which("cc")


def _compiler_version(cc: str) -> str:
    try:
        proc = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return ""
    return proc.stdout.splitlines()[0] if proc.stdout else ""


def input_hash(cc: str) -> str:
    import cffi

    h = hashlib.sha256()
    inputs = [*c_sources(), *c_headers(), *sorted(ABI_DIR.glob("*.h")), Path(__file__).resolve()]
    for path in inputs:
        h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    h.update(" ".join(compile_flags()).encode())
    h.update(_compiler_version(cc).encode())
    h.update(sys.version.encode())
    h.update(str(sysconfig.get_config_var("SOABI")).encode())
    h.update(cffi.__version__.encode())
    return h.hexdigest()[:24]


def _compile(tmpdir: Path) -> Path:
    from cffi import FFI

    ffibuilder = FFI()
    ffibuilder.cdef(cdef_text())
    ffibuilder.set_source(
        MODULE_NAME,
        "".join(f'#include "{h.name}"\n' for h in c_headers() if CDEF_BEGIN in h.read_text()),
        sources=[str(c) for c in c_sources()],
        include_dirs=[str(NATIVE_DIR), str(ABI_DIR)],
        extra_compile_args=compile_flags(),
        extra_link_args=sanitize_flags()[:1],
    )
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            so = ffibuilder.compile(tmpdir=str(tmpdir), verbose=False)
    except Exception as exc:
        raise FastBuildError(f"cffi compile failed: {exc}\n{out.getvalue()}") from exc
    return Path(so)


def build(force: bool = False) -> Path:
    """Return the cached extension, building it if missing (or if ``force``)."""
    cc = _compiler()
    if cc is None:
        raise FastBuildError("no C compiler on PATH (apt-get install gcc)")
    cdir = cache_dir()
    cdir.mkdir(parents=True, exist_ok=True)
    digest = input_hash(cc)
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    kind = sanitizer()
    variant = f"native-{kind}" if kind else "native"
    target = cdir / f"{variant}-{digest}{suffix}"
    if target.exists() and not force:
        return target
    with file_lock(cdir / ".native.lock"):
        if target.exists() and not force:
            return target  # another session built it while we waited
        print(f"vdev: building the compiled fast path into {target}", file=sys.stderr)
        with tempfile.TemporaryDirectory(dir=cdir, prefix=".native-") as tmp:
            so = _compile(Path(tmp))
            staged = Path(tmp) / target.name
            shutil.copyfile(so, staged)
            os.replace(staged, target)
    return target


def load_module(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(MODULE_NAME, path)
    if spec is None or spec.loader is None:
        raise FastBuildError(f"cannot load {path}")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


_loaded: ModuleType | None = None


def load() -> ModuleType | None:
    """The compiled module (``.ffi``, ``.lib``), or None with one warning if unavailable.

    Loaded once per process and shared: C state (memguard's registry of guest mappings and
    its SIGBUS handler) must be one, whichever Python module asks first."""
    global _loaded
    if _loaded is not None:
        return _loaded
    try:
        _loaded = load_module(build())
    except (FastBuildError, OSError, ImportError) as exc:
        log.warning("compiled fast path unavailable, using Python: %s", exc)
        return None
    return _loaded


if __name__ == "__main__":
    print(build(force="--force" in sys.argv))
