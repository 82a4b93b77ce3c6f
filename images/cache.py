"""Content-hash cache for built guest images.

Each artifact is a directory ``images/cache/<name>-<hash16>/`` holding its files and a
``manifest.json``. The hash covers every recipe input (package versions, binaries, scripts,
tool sources), so an artifact is rebuilt exactly when an input changes and reused otherwise.
Builds go to a temporary directory and are renamed into place, and a file lock serialises
concurrent builders (several engineers and test sessions share one checkout).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vdev.filelock import file_lock

REPO_ROOT = Path(__file__).resolve().parent.parent


def cache_root() -> Path:
    """``$VDEV_IMAGE_CACHE`` or ``images/cache`` in the checkout."""
    env = os.environ.get("VDEV_IMAGE_CACHE")
    root = Path(env) if env else REPO_ROOT / "images" / "cache"
    root.mkdir(parents=True, exist_ok=True)
    return root


class Hasher:
    """sha256 over labelled inputs; labels keep ("ab", "c") and ("a", "bc") apart."""

    def __init__(self) -> None:
        self._h = hashlib.sha256()

    def add(self, label: str, data: bytes | str) -> None:
        raw = data.encode() if isinstance(data, str) else data
        self._h.update(f"{label}\0{len(raw)}\0".encode())
        self._h.update(raw)

    def add_file(self, label: str, path: Path) -> None:
        self.add(label, path.read_bytes())

    def hexdigest(self) -> str:
        return self._h.hexdigest()


def build_lock(timeout: float = 600.0) -> contextlib.AbstractContextManager[None]:
    """Exclusive lock over the cache while building; bounded so a stuck builder is reported."""
    return file_lock(cache_root() / ".lock", timeout)


@dataclass(frozen=True)
class Artifact:
    """One built image as recorded by its manifest."""

    name: str
    path: Path
    hash: str
    built_at: str
    files: dict[str, str]
    info: dict[str, Any]

    @property
    def size(self) -> int:
        return sum((self.path / f).stat().st_size for f in self.files.values())

    def file(self, role: str) -> Path:
        return self.path / self.files[role]


def artifact_dir(name: str, digest: str) -> Path:
    return cache_root() / f"{name}-{digest[:16]}"


def write_manifest(
    directory: Path, name: str, digest: str, files: dict[str, str], info: dict[str, Any]
) -> None:
    manifest = {
        "name": name,
        "hash": digest,
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "files": files,
        "info": info,
    }
    (directory / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))


def load_artifact(directory: Path) -> Artifact | None:
    """The artifact in ``directory`` if its manifest and all its files are present."""
    try:
        m = json.loads((directory / "manifest.json").read_text())
        art = Artifact(
            name=str(m["name"]),
            path=directory,
            hash=str(m["hash"]),
            built_at=str(m["built_at"]),
            files={str(k): str(v) for k, v in m["files"].items()},
            info=dict(m.get("info", {})),
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not all((directory / f).is_file() for f in art.files.values()):
        return None
    return art


def list_artifacts() -> list[Artifact]:
    """All complete artifacts in the cache, newest first."""
    arts = [a for d in cache_root().iterdir() if d.is_dir() and (a := load_artifact(d))]
    return sorted(arts, key=lambda a: a.built_at, reverse=True)


def prune(name: str, keep: int = 3) -> list[Path]:
    """Remove all but the ``keep`` newest artifacts called ``name``; returns what went.

    Keeping a few (not one) leaves images in use by a concurrent test session of an older
    checkout state alone.
    """
    import shutil

    old = [a for a in list_artifacts() if a.name == name][keep:]
    for a in old:
        shutil.rmtree(a.path, ignore_errors=True)
    return [a.path for a in old]


def human_size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"
