"""``vdev images``: build, list and boot the guest images.

vdev images build [linux|bare|all] [--kernel BZIMAGE [--modules DIR]] [--force]
vdev images list
vdev images boot [--nic SOCK|user]... [--kernel-args ARGS] [--halt | --interactive]
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
import time
from pathlib import Path
from typing import Any

from host.cli_args import input_dir, input_file, int_range
from images.tools import ToolError


def register(subparsers: Any) -> None:
    p: argparse.ArgumentParser = subparsers.add_parser(
        "images", help="build, list and boot guest images"
    )
    sub = p.add_subparsers(dest="images_command", metavar="ACTION")
    b = sub.add_parser("build", help="build images (cached by content hash)")
    b.add_argument("which", nargs="?", default="linux", choices=("linux", "bare", "all"))
    b.add_argument(
        "--kernel",
        type=input_file,
        metavar="BZIMAGE",
        help="use this bzImage instead of Debian's kernel",
    )
    b.add_argument(
        "--modules", type=input_dir, metavar="DIR", help="module tree (.ko files) for --kernel"
    )
    b.add_argument("--force", action="store_true", help="rebuild even on a cache hit")
    b.set_defaults(func=cmd_build)
    ls = sub.add_parser("list", help="list cached images")
    ls.set_defaults(func=cmd_list)
    pr = sub.add_parser("prune", help="remove old cached images")
    pr.add_argument("--keep", type=int_range(0), default=1, help="newest images to keep per name")
    pr.set_defaults(func=cmd_prune)
    boot = sub.add_parser("boot", help="boot the Linux image (measures boot time)")
    boot.add_argument(
        "--nic",
        action="append",
        default=[],
        metavar="SOCK|user",
        help="vhost-user socket path, or 'user' for QEMU slirp (repeatable: eth0, eth1...)",
    )
    boot.add_argument("--kernel-args", default="", help="extra kernel/vdev.* arguments")
    mode = boot.add_mutually_exclusive_group()
    mode.add_argument("--halt", action="store_true", help="power off once ready")
    mode.add_argument("--interactive", action="store_true", help="attach to the console")
    boot.set_defaults(func=cmd_boot)

    def usage(_args: argparse.Namespace) -> int:
        p.print_help()
        return 2

    p.set_defaults(func=usage)


def cmd_build(args: argparse.Namespace) -> int:
    from images.linux import build_linux

    if args.modules and not args.kernel:
        print("vdev images: --modules needs --kernel", file=sys.stderr)
        return 2
    if args.kernel:
        why = _not_a_bzimage(args.kernel)
        if why:
            print(f"vdev images build: --kernel {args.kernel}: {why}", file=sys.stderr)
            return 2
    status = 0
    try:
        if args.which in ("linux", "all"):
            kernel = Path(args.kernel) if args.kernel else None
            modules = Path(args.modules) if args.modules else None
            img = build_linux(kernel=kernel, modules_dir=modules, force=args.force)
            print(f"linux: {img.path} (kernel {img.kernel_version}, hash {img.hash[:16]})")
        if args.which in ("bare", "all"):
            status = _build_bare()
    except (ToolError, TimeoutError) as e:
        print(f"vdev images: {e}", file=sys.stderr)
        return 1
    return status


def _not_a_bzimage(path: str) -> str | None:
    """Why ``path`` is not an x86 bzImage (Linux boot protocol: "HdrS" at 0x202), or None."""
    try:
        with open(path, "rb") as f:
            f.seek(0x202)
            magic = f.read(4)
    except OSError as exc:
        return exc.strerror or str(exc)
    if magic != b"HdrS":
        return "not an x86 Linux kernel image (no 'HdrS' boot header at offset 0x202)"
    return None


def _build_bare() -> int:
    if importlib.util.find_spec("images.bare") is None:
        print(
            "vdev images: the bare-metal recipe (images/bare.py, build_bare()) is not "
            "available in this checkout yet",
            file=sys.stderr,
        )
        return 1
    result = importlib.import_module("images.bare").build_bare()
    print(f"bare: {result}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from images.cache import cache_root, human_size, list_artifacts

    arts = list_artifacts()
    if not arts:
        print(f"no images in {cache_root()} (run `vdev images build`)")
        return 0
    print(f"{'NAME':<8} {'SIZE':>10}  {'HASH':<16}  {'BUILT (UTC)':<20}  PATH")
    for a in arts:
        print(f"{a.name:<8} {human_size(a.size):>10}  {a.hash[:16]}  {a.built_at:<20}  {a.path}")
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    from images.cache import list_artifacts, prune

    for name in sorted({a.name for a in list_artifacts()}):
        for path in prune(name, keep=max(args.keep, 0)):
            print(f"removed {path}")
    return 0


def cmd_boot(args: argparse.Namespace) -> int:
    from host.errors import MachineError
    from host.machine import Machine, Nic
    from images.linux import build_linux

    for n in args.nic:
        # QEMU is the vhost-user client here: the device must already listen on the path.
        if n != "user" and not os.path.exists(n):
            print(
                f"vdev images boot: --nic {n}: no such socket (start `vdev serve --socket {n}` "
                "first, or use --nic user)",
                file=sys.stderr,
            )
            return 2
    nics = [Nic.user() if n == "user" else Nic.vhost_user(n) for n in args.nic]
    kargs = args.kernel_args + (" vdev.halt=1" if args.halt else "")
    try:
        img = build_linux()
        t0 = time.monotonic()
        with Machine.linux(img, nics=nics, kernel_args=kargs, wait_prompt=not args.halt) as m:
            ready = time.monotonic() - t0
            print(f"{m.ready_line}\nready in {ready:.2f} s (accel {m.accel})", file=sys.stderr)
            if args.halt:
                m.wait(30)
                print(f"powered off after {time.monotonic() - t0:.2f} s", file=sys.stderr)
            elif args.interactive:
                print("console attached; Ctrl-] detaches and stops the guest", file=sys.stderr)
                m.console.sendline("")
                m.console.child.interact()
    except (ToolError, MachineError) as e:
        print(f"vdev images boot: {e}", file=sys.stderr)
        return 1
    return 0
