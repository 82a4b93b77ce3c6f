"""Choose the QEMU accelerator: KVM only where it really boots the guest, else TCG.

Why it is this elaborate: ``/dev/kvm`` opening says nothing. Measured on hosts like ours:
one nested KVM ran a tiny 32-bit program fine and then died booting Linux (register dump at
``lock cmpxchg16b``); another hung in 32-bit code; on this one ``-cpu host`` aborts with
``failed to set MSR 0x10a`` and ``-cpu qemu64`` hangs after "Booting from ROM...". No
synthetic probe tells the truth, so:

* the **probe** boots the real workload, the image the :class:`~host.machine.Machine` is
  about to run, under KVM without NICs, until its ready marker, within ``PROBE_TIMEOUT_S``
  (the probe itself is :meth:`host.machine.Machine.probe_kvm`; this module decides when to
  run it and what its outcome means);
* the verdict is **cached** per host boot id, QEMU binary (path, mtime, size), machine type
  and image content, in one small JSON file (:func:`cache_path`), so the good path costs a
  file read, not a boot; a corrupt or foreign file counts as no cache;
* the launcher still **falls back at run time**: a KVM guest that fails in a KVM way
  (:func:`kvm_fault` on QEMU's stderr, or no console progress) is relaunched once under TCG,
  KVM is remembered as broken, and one line says so (:func:`fallback_line`).

``VDEV_ACCEL=tcg`` skips all of it; ``VDEV_ACCEL=kvm`` forces KVM and never falls back.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vdev.filelock import file_lock

QEMU = "qemu-system-x86_64"
ACCEL_ENV = "VDEV_ACCEL"
CACHE_ENV = "VDEV_ACCEL_CACHE"
KVM_DEVICE = "/dev/kvm"
# The probe boots the real image to its ready marker: a working KVM gets a Linux guest there
# in 1-2 s (no NIC, no carrier wait); 20 s leaves room for a loaded host.
PROBE_TIMEOUT_S = 20.0
# At run time, a KVM guest whose console prints nothing for this long is stuck (a quiet
# Linux boot under working KVM is silent for at most a few seconds).
KVM_STALL_S = 20.0
CACHE_FORMAT = "vdev-accel/2"  # the old probe's /tmp/vdev-accel-UID.json is never read
MAX_ENTRIES = 32
_LOCK_TIMEOUT_S = 180.0
_QEMU_PREFIX = re.compile(r"^\S*qemu-system-\S+: ")

# QEMU's own words when KVM (not the guest) failed: internal and emulation errors, the
# register dump it prints with them, a vCPU run failure, and the MSR assertion of nested
# KVM. Matched line by line on QEMU's stderr.
_KVM_FAULT_PATTERNS: tuple[re.Pattern[str], ...] = tuple(
    re.compile(p)
    for p in (
        r"KVM internal error",
        r"(?i)emulation failure",
        r"INTERNAL_ERROR",
        r"(?i)kvm run failed",
        r"KVM: entry failed",
        r"failed to set MSR",
        r"kvm_buf_set_msrs",
        r"^\s*(RAX|EAX)=[0-9a-fA-F]{8,16}\b",
        r"\b(EIP|RIP)=[0-9a-fA-F]{8,16}\b",
        r"(?i)\bkvm\w*\b.*\b(error|failed|assertion)\b",
    )
)


class AccelError(ValueError):
    """``VDEV_ACCEL`` holds something other than ``kvm`` or ``tcg``."""


@dataclass(frozen=True)
class Workload:
    """What a Machine boots, as far as KVM's verdict is concerned: the image and machine."""

    kernel: Path | None
    initrd: Path | None
    machine: str = "q35"

    def key(self) -> str | None:
        """``machine:content-hash`` of kernel + initrd; None when there is nothing to hash."""
        if self.kernel is None:
            return None
        files = [self.kernel, *([self.initrd] if self.initrd is not None else [])]
        try:
            digest = _content_hash(tuple(files))
        except OSError:
            return None
        return f"{self.machine}:{digest}"

    def label(self) -> str:
        """A short name for messages: the image's cache directory or the kernel file name."""
        if self.kernel is None:
            return "(no kernel)"
        parent = self.kernel.parent.name
        return parent if parent.startswith("linux-") else self.kernel.name


@dataclass(frozen=True)
class Verdict:
    """Whether KVM ran this workload here. ``source``: ``probe`` or ``runtime`` fallback."""

    accel: str
    reason: str
    source: str = "probe"
    at: float = 0.0
    label: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "accel": self.accel,
            "reason": self.reason,
            "source": self.source,
            "at": self.at,
            "label": self.label,
        }

    @classmethod
    def from_json(cls, raw: object) -> Verdict | None:
        if not isinstance(raw, dict) or raw.get("accel") not in ("kvm", "tcg"):
            return None
        try:
            return cls(
                accel=str(raw["accel"]),
                reason=str(raw.get("reason", "")),
                source=str(raw.get("source", "probe")),
                at=float(raw.get("at", 0.0)),
                label=str(raw.get("label", "")),
            )
        except (TypeError, ValueError):
            return None

    def when(self) -> str:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.at)) if self.at else "?"


@dataclass(frozen=True)
class Choice:
    """The accelerator a launch uses and why.

    ``fallback``: KVM was chosen automatically, so a KVM-shaped failure relaunches under
    TCG. ``forced``: the user (``VDEV_ACCEL``) or the caller asked for it explicitly.
    ``key``: the cache key of the verdict (auto mode only).
    """

    accel: str
    reason: str
    fallback: bool = False
    forced: bool = False
    key: str | None = None


# ---------------------------------------------------------------------------- environment
def qemu_binary() -> str | None:
    """Path of qemu-system-x86_64 (``$VDEV_QEMU`` overrides), or None when missing."""
    env = os.environ.get("VDEV_QEMU")
    if env:
        return env if Path(env).exists() else None
    return shutil.which(QEMU)


def env_accel() -> str | None:
    """``kvm``/``tcg`` from ``$VDEV_ACCEL``, None when unset; raises AccelError otherwise."""
    env = os.environ.get(ACCEL_ENV, "").strip().lower()
    if env in ("kvm", "tcg"):
        return env
    if env:
        raise AccelError(f"{ACCEL_ENV}={env!r}: expected 'kvm' or 'tcg'")
    return None


def kvm_unavailable() -> str | None:
    """Why KVM cannot even be tried here (no device, no permission), or None."""
    if not os.path.exists(KVM_DEVICE):
        return f"{KVM_DEVICE} does not exist"
    if not os.access(KVM_DEVICE, os.R_OK | os.W_OK):
        return f"{KVM_DEVICE} is not readable and writable by uid {os.getuid()}"
    return None


def boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:
        return None


def qemu_identity(qemu: str) -> str | None:
    """``path:mtime_ns:size`` of the QEMU binary (an upgrade invalidates the verdict)."""
    try:
        st = os.stat(qemu)
    except OSError:
        return None
    return f"{os.path.abspath(qemu)}:{st.st_mtime_ns}:{st.st_size}"


_HASHES: dict[tuple[tuple[str, int, int, int], ...], str] = {}


def _content_hash(files: tuple[Path, ...]) -> str:
    """sha256 (16 hex digits) of the files' bytes, memoised per (path, inode, mtime, size)."""
    stamp = tuple((str(p), (st := os.stat(p)).st_ino, st.st_mtime_ns, st.st_size) for p in files)
    cached = _HASHES.get(stamp)
    if cached is None:
        h = hashlib.sha256()
        for p in files:
            data = p.read_bytes()
            h.update(f"{len(data)}\0".encode())
            h.update(data)
        cached = _HASHES[stamp] = h.hexdigest()[:16]
    return cached


def cache_key(qemu: str, workload: Workload) -> str | None:
    """The verdict's key without the boot id (which scopes the whole file)."""
    ident = qemu_identity(qemu)
    wkey = workload.key()
    if ident is None or wkey is None:
        return None
    return f"{ident}|{wkey}"


# ---------------------------------------------------------------------------- cache file
def cache_path() -> Path:
    """``$VDEV_ACCEL_CACHE``, else ``accel.json`` in vdev's cache dir (``$VDEV_CACHE_DIR`` or
    ``~/.cache/vdev``), else a per-user file in the temp dir when that is not writable."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env)
    from vdev.native.build import cache_dir

    directory = cache_dir()
    with contextlib.suppress(OSError):
        directory.mkdir(parents=True, exist_ok=True)
        if os.access(directory, os.W_OK):
            return directory / "accel.json"
    return Path(tempfile.gettempdir()) / f"vdev-accel-v2-{os.getuid()}.json"


def _read_file(path: Path) -> dict[str, Verdict]:
    """Verdicts of this boot; anything unreadable, foreign or from another boot is empty."""
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return {}
    if not isinstance(raw, dict) or raw.get("format") != CACHE_FORMAT:
        return {}
    if raw.get("boot_id") != boot_id() or not isinstance(raw.get("verdicts"), dict):
        return {}
    out: dict[str, Verdict] = {}
    for key, value in raw["verdicts"].items():
        verdict = Verdict.from_json(value)
        if isinstance(key, str) and verdict is not None:
            out[key] = verdict
    return out


def cached_verdicts() -> dict[str, Verdict]:
    """Every verdict cached for this host boot (key -> verdict)."""
    return _read_file(cache_path())


def lookup(key: str) -> Verdict | None:
    return cached_verdicts().get(key)


@contextlib.contextmanager
def _locked() -> Iterator[Path | None]:
    """The cache path, with its lock held; None (no lock, no caching) when the cache dir
    cannot be created or the lock is not free in time: a probe then simply is not shared."""
    path = cache_path()
    with contextlib.ExitStack() as stack:
        locked = True
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            stack.enter_context(file_lock(path.with_name(path.name + ".lock"), _LOCK_TIMEOUT_S))
        except (OSError, TimeoutError):
            locked = False
        yield path if locked else None


def _write_unlocked(path: Path | None, key: str, verdict: Verdict) -> None:
    if path is None:
        return
    verdicts = _read_file(path)
    verdicts[key] = verdict
    newest = sorted(verdicts.items(), key=lambda kv: kv[1].at)[-MAX_ENTRIES:]
    body = {
        "format": CACHE_FORMAT,
        "boot_id": boot_id(),
        "verdicts": {k: v.to_json() for k, v in newest},
    }
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(body, indent=1, sort_keys=True))
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)


def record(key: str, verdict: Verdict) -> None:
    """Remember ``verdict`` for ``key`` (atomically, under the cache lock; errors ignored:
    a read-only cache only costs a probe next time)."""
    with _locked() as path:
        _write_unlocked(path, key, verdict)


# ---------------------------------------------------------------------------- decisions
def kvm_fault(stderr: str) -> str | None:
    """The first line of QEMU's stderr that says KVM itself failed, or None."""
    for line in stderr.splitlines():
        if any(p.search(line) for p in _KVM_FAULT_PATTERNS):
            return _QEMU_PREFIX.sub("", line.strip())[:200]
    return None


def fallback_line(reason: str, source: str) -> str:
    """The one line printed when a workload falls back from KVM to TCG."""
    where = "KVM probe" if source == "probe" else "KVM guest"
    return (
        f"vdev: falling back to TCG: {where} failed: {reason} "
        f"(remembered for this boot in {cache_path()})"
    )


def announce(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def choose(
    workload: Workload,
    probe: Callable[[], Verdict | None] | None,
    qemu: str | None = None,
) -> Choice:
    """The accelerator for ``workload``: forced by ``$VDEV_ACCEL``, else the cached verdict,
    else ``probe()`` (run under the cache lock, so concurrent test workers probe once).

    ``probe`` returns a TCG verdict when KVM failed in a KVM way, a KVM verdict when the guest
    reached its marker, and None when the outcome says nothing about KVM (e.g. the guest
    panicked): then KVM is used, uncached, and the run reports the guest's own failure.
    """
    forced = env_accel()
    if forced is not None:
        return Choice(forced, f"{ACCEL_ENV}={forced}", forced=True)
    qemu = qemu or qemu_binary()
    if qemu is None:
        return Choice("tcg", "QEMU not found")
    why = kvm_unavailable()
    if why is not None:
        return Choice("tcg", why)
    key = cache_key(qemu, workload)
    if key is None:
        return Choice("tcg", "no kernel image to probe KVM with")
    verdict = lookup(key)
    if verdict is None and probe is not None:
        with _locked() as path:
            # Another process may have probed while we waited for the lock.
            verdict = _read_file(path).get(key) if path is not None else None
            if verdict is None:
                verdict = probe()
                if verdict is None:
                    return Choice("kvm", "KVM probe inconclusive", fallback=True, key=key)
                verdict = Verdict(
                    verdict.accel, verdict.reason, "probe", time.time(), workload.label()
                )
                _write_unlocked(path, key, verdict)
                if verdict.accel == "tcg":
                    announce(fallback_line(verdict.reason, "probe"))
                return Choice(
                    verdict.accel, f"probed: {verdict.reason}", verdict.accel == "kvm", key=key
                )
    if verdict is None:
        return Choice("tcg", "KVM not probed (no ready marker to probe with)", key=key)
    return Choice(
        verdict.accel,
        f"cached {verdict.source} verdict from {verdict.when()}: {verdict.reason}",
        fallback=verdict.accel == "kvm",
        key=key,
    )


def reprobe(workload: Workload, probe: Callable[[], Verdict | None]) -> Verdict | None:
    """Run ``probe`` now (``vdev doctor --probe``) and cache a conclusive verdict."""
    qemu = qemu_binary()
    key = cache_key(qemu, workload) if qemu is not None else None
    with _locked() as path:
        verdict = probe()
        if verdict is None:
            return None
        verdict = Verdict(verdict.accel, verdict.reason, "probe", time.time(), workload.label())
        if key is not None:
            _write_unlocked(path, key, verdict)
        return verdict


def explain(workload: Workload) -> tuple[str, str]:
    """What :func:`choose` would answer for ``workload`` without probing: (accel, why).

    The accel is ``"?"`` when KVM has not been probed for it on this boot yet.
    """
    forced = env_accel()
    if forced is not None:
        return forced, f"{ACCEL_ENV}={forced}"
    qemu = qemu_binary()
    if qemu is None:
        return "tcg", "QEMU not found"
    why = kvm_unavailable()
    if why is not None:
        return "tcg", why
    key = cache_key(qemu, workload)
    if key is None:
        return "tcg", "no kernel image to probe KVM with"
    verdict = lookup(key)
    if verdict is None:
        return "?", f"the first boot (or `vdev doctor --probe`) probes KVM; cache key {key}"
    return verdict.accel, (
        f"{verdict.source} verdict from {verdict.when()}: {verdict.reason} (cache key {key})"
    )
