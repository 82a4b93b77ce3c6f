"""One root for vdev's error types (vdev/errors.py): every exception class the ``vdev``
package defines derives from VdevError, and the virtio and vhost layers take the shared
ring-contract errors from there, not from Skywalk."""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
from pathlib import Path

import vdev
from vdev.errors import DefunctError, KillReason, SyncError, SyncKind, VdevError

ROOT = Path(vdev.__file__).parent


def _vdev_modules() -> list[str]:
    names = []
    for info in pkgutil.walk_packages([str(ROOT)], prefix="vdev."):
        names.append(info.name)
    return names


def test_every_exception_class_derives_from_the_root() -> None:
    found = []
    for name in _vdev_modules():
        module = importlib.import_module(name)
        for _, obj in inspect.getmembers(module, inspect.isclass):
            if obj.__module__ == name and issubclass(obj, BaseException):
                found.append(obj)
                assert issubclass(obj, VdevError), f"{name}.{obj.__name__}"
    names = {c.__name__ for c in found}
    assert {"PoolError", "ProtocolError", "MemoryFault", "ChainViolation", "SpecError"} <= names
    assert len(found) >= 14


def test_skywalk_re_exports_the_shared_errors_unchanged() -> None:
    from vdev.skywalk import errors

    assert (errors.KillReason, errors.SyncKind) == (KillReason, SyncKind)
    assert (errors.SyncError, errors.DefunctError) == (SyncError, DefunctError)


def test_virtio_and_vhost_do_not_import_errors_from_skywalk() -> None:
    for sub in ("virtio", "vhost"):
        for path in (ROOT / sub).glob("*.py"):
            tree = ast.parse(path.read_text())
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom):
                    assert node.module != "vdev.skywalk.errors", path
