"""``vdev doctor``: what this host has, what vdev will do with it, and what is missing.

A new user's first question on a fresh machine is "will the demo run here, and how?". This
answers it without building or booting anything: the tools and Python packages installed,
the images built, which accelerator each guest will get and why (the cached KVM verdict of
:mod:`host.accel`, or "not probed yet"; ``--probe`` boots the real images under KVM now),
and every cache path. The exit status is 1 when something ``vdev demo`` needs is missing,
and the last line names it.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# (import name, distribution name, needed by the demo?, what for)
PYTHON_DEPS: tuple[tuple[str, str, bool, str], ...] = (
    ("cffi", "cffi", True, "shared-memory ABI and the compiled fast path"),
    ("elftools", "pyelftools", True, "busybox check, driver symbols"),
    ("pexpect", "pexpect", True, "guest consoles"),
    ("qemu.qmp", "qemu.qmp", True, "QEMU monitor"),
    ("pytest", "pytest", False, "the test suite"),
    ("hypothesis", "hypothesis", False, "property tests"),
    ("pytest_timeout", "pytest-timeout", False, "test timeouts"),
    ("xdist", "pytest-xdist", False, "parallel tests (-n auto, --tx)"),
    ("dpkt", "dpkt", False, "packet oracles in tests"),
    ("ruff", "ruff", False, "lint"),
    ("mypy", "mypy", False, "type check"),
)


@dataclass
class Item:
    name: str
    ok: bool
    detail: str
    required: bool  # by `vdev demo`


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "doctor",
        help="check the host: tools, images, accelerator, caches",
        description=(
            "Show what is installed (QEMU, DPDK testpmd, tshark, gcc, busybox-static, the "
            "Python packages), which images are built, which accelerator guests will use and "
            "why, and the cache paths. Exits 1 when something `vdev demo` needs is missing."
        ),
    )
    p.add_argument(
        "--probe",
        action="store_true",
        help="boot the built images under KVM now and cache the verdict (a few seconds)",
    )
    p.set_defaults(func=run)


def _first_line(cmd: list[str]) -> str:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"({exc})"
    out = (proc.stdout or proc.stderr).strip().splitlines()
    return out[0].strip() if out else f"(exit {proc.returncode})"


def _program(name: str, required: bool, version: list[str] | None, hint: str) -> Item:
    path = shutil.which(name)
    if path is None:
        return Item(name, False, f"missing: {hint}", required)
    detail = path if version is None else f"{path}  {_first_line([path, *version])}"
    return Item(name, True, detail, required)


def _qemu() -> Item:
    from host.accel import qemu_binary

    env = os.environ.get("VDEV_QEMU")
    qemu = qemu_binary()
    if qemu is None:
        why = (
            f"VDEV_QEMU={env} does not exist"
            if env
            else "missing: apt-get install qemu-system-x86 (or set VDEV_QEMU)"
        )
        return Item("qemu-system-x86_64", False, why, True)
    return Item("qemu-system-x86_64", True, f"{qemu}  {_first_line([qemu, '--version'])}", True)


def _busybox() -> Item:
    from images.linux import check_busybox
    from images.tools import ToolError

    try:
        path = check_busybox()
    except ToolError as exc:
        return Item("busybox-static", False, str(exc), True)
    return Item("busybox-static", True, f"{path} (static)", True)


def _kvm() -> Item:
    from host import accel

    why = accel.kvm_unavailable()
    return Item(accel.KVM_DEVICE, why is None, why or "opens read/write", False)


def tools() -> list[Item]:
    return [
        _qemu(),
        _kvm(),
        _program("gcc", True, ["--version"], "apt-get install gcc (guest tools, driver)"),
        _busybox(),
        _program("apt-cache", True, None, "the Linux image takes Debian's kernel through apt"),
        _program(
            "dpdk-testpmd",
            False,
            None,
            "apt-get install dpdk-dev (DPDK interop tests only)",
        ),
        _program("tshark", False, ["--version"], "apt-get install tshark (reading captures)"),
    ]


def python_deps() -> list[Item]:
    items: list[Item] = []
    for module, dist, required, why in PYTHON_DEPS:
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            items.append(Item(dist, False, f"missing ({why}): pip install -e .[dev]", required))
            continue
        try:
            version = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            version = "?"
        items.append(Item(dist, True, f"{version}  ({why})", required))
    return items


@dataclass
class Image:
    name: str
    built: bool
    detail: str
    machine: Callable[[], Any] | None  # builds the Machine that would boot it


def images() -> list[Image]:
    import re

    from host.bare_console import PROMPT
    from host.machine import Machine
    from images.bare import BUILD_DIR, ELF_NAME
    from images.cache import list_artifacts
    from images.linux import LinuxImage

    out: list[Image] = []
    linux = [a for a in list_artifacts() if a.name == "linux"]
    if linux:
        art = linux[0]
        img = LinuxImage.from_artifact(art, cache_hit=True)
        out.append(
            Image(
                "linux",
                True,
                f"{art.path} (kernel {img.kernel_version}, built {art.built_at})",
                lambda: Machine.linux(img, kernel_args="vdev.halt=1"),
            )
        )
    else:
        out.append(Image("linux", False, "not built (vdev demo or vdev images build)", None))
    elf = BUILD_DIR / ELF_NAME
    if elf.is_file():
        out.append(
            Image(
                "bare",
                True,
                str(elf),
                lambda: Machine(elf, machine="pc", memory_mb=64, ready_pattern=re.escape(PROMPT)),
            )
        )
    else:
        out.append(Image("bare", False, "not built (vdev images build bare)", None))
    return out


def _mark(item: Item) -> str:
    if item.ok:
        return "ok  "
    return "MISS" if item.required else "--  "


def run(args: argparse.Namespace) -> int:
    from host import accel
    from images.cache import cache_root
    from vdev.native.build import cache_dir

    missing: list[str] = []

    def section(title: str, items: list[Item]) -> None:
        print(f"== {title}")
        for it in items:
            print(f"  {_mark(it)} {it.name:<20} {it.detail}")
            if it.required and not it.ok:
                missing.append(f"{it.name} ({it.detail})")

    section("tools", tools())
    section("python", python_deps())

    print("== images")
    imgs = images()
    for im in imgs:
        print(f"  {'ok  ' if im.built else '--  '} {im.name:<20} {im.detail}")

    print("== accelerator")
    try:
        accel.env_accel()
    except accel.AccelError as exc:
        print(f"  MISS {accel.ACCEL_ENV:<20} {exc}")
        missing.append(str(exc))
    else:
        for im in imgs:
            if im.machine is None:
                print(f"  {im.name:<25} decided at its first boot (image not built)")
                continue
            machine = im.machine()
            workload = accel.Workload(machine.kernel, machine.initrd, machine.machine_type)
            if args.probe and accel.env_accel() is None and accel.kvm_unavailable() is None:
                if accel.qemu_binary() is not None:
                    verdict = accel.reprobe(workload, machine.probe_kvm)
                    if verdict is None:
                        print(f"  {im.name:<25} KVM probe inconclusive (the guest failed itself)")
            used, why = accel.explain(workload)
            shown = "not probed yet" if used == "?" else used
            print(f"  {im.name:<25} {shown}: {why}")

    print("== caches")
    print(f"  {'image cache':<25} {cache_root()}")
    print(f"  {'fast-path build cache':<25} {cache_dir()}")
    print(f"  {'accelerator verdicts':<25} {accel.cache_path()}")

    if missing:
        print(f"vdev doctor: missing for `vdev demo`: {'; '.join(missing)}", file=sys.stderr)
        return 1
    print("vdev doctor: everything `vdev demo` needs is here")
    return 0
