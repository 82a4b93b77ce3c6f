"""Argument types and the parser class shared by every ``vdev`` subcommand.

Bad input must come back as one line naming the option and the value, before anything is
started (no device, no QEMU): ``vdev run: argument --mtu: 70000: must be 68 to 65535``.
argparse's own errors print a usage block first; ``Parser`` makes them one line too.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Callable
from typing import NoReturn

# virtio-net MTU (5.1.4 "Device configuration layout": mtu) as the NIC and the vhost-user
# NET_SET_MTU handler accept it: 68 (the IPv4 minimum, RFC 791) to 65535.
MTU_MIN, MTU_MAX = 68, 65535


class Parser(argparse.ArgumentParser):
    """``ArgumentParser`` whose usage errors are a single line on stderr (exit status 2)."""

    def error(self, message: str) -> NoReturn:
        # "argument -s/--control: /x: no such file" -> "--control /x: no such file", the
        # shape every other vdev error has (option, value, then what is wrong).
        m = re.match(r"argument ([^:]+): (.*)", message)
        if m:
            name, rest = m.group(1).split("/")[-1], m.group(2)
            v = re.match(r"([^\s:']+): (.*)", rest)
            message = f"{name} {v.group(1)}: {v.group(2)}" if v else f"{name}: {rest}"
        hint = ""
        if message.startswith(("unrecognized", "the following arguments", "COMMAND", "REQUEST")):
            hint = f" (see {self.prog} --help)"
        self.exit(2, f"{self.prog}: {message}{hint}\n")


def int_range(lo: int, hi: int | None = None, what: str = "") -> Callable[[str], int]:
    """An argparse ``type``: an integer in ``lo..hi`` (``hi`` None: no upper bound)."""

    def parse(text: str) -> int:
        try:
            value = int(text, 0)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < lo or (hi is not None and value > hi):
            rng = f"{lo} to {hi}" if hi is not None else f">= {lo}"
            raise argparse.ArgumentTypeError(f"{value}: must be {rng}{what}")
        return value

    parse.__name__ = "integer"
    return parse


def seconds(*, positive: bool = False) -> Callable[[str], float]:
    """An argparse ``type``: a finite number of seconds, > 0 or >= 0."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
        if value != value or value in (float("inf"), float("-inf")):
            raise argparse.ArgumentTypeError(f"{text}: must be a finite number of seconds")
        if value < 0 or (positive and value == 0):
            raise argparse.ArgumentTypeError(f"{text}: must be {'>' if positive else '>='} 0")
        return value

    parse.__name__ = "seconds"
    return parse


mtu = int_range(MTU_MIN, MTU_MAX, " (the virtio-net MTU range)")
queue_pairs = int_range(1, 8, " (queue pairs per NIC)")


def input_file(text: str) -> str:
    """An argparse ``type``: an existing, readable regular file (``-`` passes through)."""
    if text == "-":
        return text
    if not os.path.exists(text):
        raise argparse.ArgumentTypeError(f"{text}: no such file")
    if os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text}: is a directory, not a file")
    if not os.access(text, os.R_OK):
        raise argparse.ArgumentTypeError(f"{text}: not readable")
    return text


def output_path(text: str) -> str:
    """An argparse ``type``: a path whose directory exists (files and sockets we create)."""
    if not text:
        raise argparse.ArgumentTypeError("empty path")
    parent = os.path.dirname(os.path.abspath(text))
    if not os.path.isdir(parent):
        what = "is not a directory" if os.path.exists(parent) else "does not exist"
        raise argparse.ArgumentTypeError(f"{text}: directory {parent} {what}")
    if os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text}: is a directory")
    return text


def output_dir(text: str) -> str:
    """An argparse ``type``: a directory we may create (with its parents): nothing on the
    way may be an existing non-directory."""
    path = os.path.abspath(text)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    if not os.path.isdir(path):
        where = "exists" if path == os.path.abspath(text) else f"is under {path}, which exists"
        raise argparse.ArgumentTypeError(f"{text}: {where} and is not a directory")
    return text


def input_dir(text: str) -> str:
    """An argparse ``type``: an existing directory."""
    if not os.path.isdir(text):
        what = "is not a directory" if os.path.exists(text) else "no such directory"
        raise argparse.ArgumentTypeError(f"{text}: {what}")
    return text


def add_control_option(
    p: argparse.ArgumentParser,
    *,
    help: str,
    default: str | None = None,
    short: bool = False,
    aliases: tuple[str, ...] = (),
    metavar: str = "PATH",
    create: bool = True,
) -> None:
    """``--control PATH``: the one name of the fault-control socket in every subcommand.

    ``aliases`` are the names older releases used (``--ctl``, ``--socket``): still accepted,
    hidden from ``--help``.  ``create``: this command creates the socket (its directory
    must exist); otherwise it connects to one (errors come from the connect)."""
    kind = output_path if create else str
    names = ("-s", "--control") if short else ("--control",)
    p.add_argument(*names, dest="control", default=default, metavar=metavar, type=kind, help=help)
    for alias in aliases:
        p.add_argument(
            alias,
            dest="control",
            default=argparse.SUPPRESS,
            metavar=metavar,
            type=kind,
            help=argparse.SUPPRESS,
        )


def fail(prog: str, message: str, status: int = 2) -> int:
    """Print ``prog: message`` on stderr and return ``status`` (for ``return fail(...)``)."""
    print(f"{prog}: {message}", file=sys.stderr)
    return status
