"""The single ``vdev`` command: each area registers its own subcommands.

A subcommand module exposes ``register(subparsers)``, which adds a parser whose
``func`` default is called with the parsed namespace and returns the exit status.

Errors are one line on stderr.  Each subcommand reports the errors it expects (bad
options, missing files, refused sockets) itself, naming the option and the value; what is
left, a bug, becomes ``vdev SUBCOMMAND: internal error: ...`` here, and ``-v`` (or
``VDEV_DEBUG=1``) shows the traceback too.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback
from collections.abc import Sequence

from host.cli_args import Parser

# Modules that contribute subcommands, in the order they appear in --help.
SUBCOMMAND_MODULES: tuple[str, ...] = (
    "host.cli_demo",
    "host.cli_serve",
    "host.cli_images",
    "host.cli_ctl",
    "host.cli_run",
    "host.cli_sandbox",
    "host.cli_fuzz",
    "host.cli_doctor",
)


def package_version() -> str:
    """The installed distribution's version; pyproject.toml's in a plain checkout."""
    from importlib import metadata

    try:
        return metadata.version("vdev")
    except metadata.PackageNotFoundError:
        import tomllib
        from pathlib import Path

        pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
        try:
            return str(tomllib.loads(pyproject.read_text())["project"]["version"])
        except (OSError, KeyError, tomllib.TOMLDecodeError):
            return "unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="vdev",
        description="vhost-user virtio-net device and driver test bench",
    )
    parser.add_argument("--version", action="version", version=f"vdev {package_version()}")
    parser.add_argument(
        "-v",
        "--verbose",
        dest="debug",
        action="count",
        default=0,
        help="show a traceback for internal errors (also VDEV_DEBUG=1)",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def _debug(args: argparse.Namespace) -> bool:
    return bool(args.debug or getattr(args, "verbose", 0) or os.environ.get("VDEV_DEBUG"))


def _quiet_stdout() -> None:
    """The reader of our stdout went away (``| head``): drop further output silently,
    including the interpreter's final flush."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    prog = f"vdev {args.command}"
    try:
        return int(func(args))
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        _quiet_stdout()
        return 141  # 128 + SIGPIPE, what a shell reports for a killed pipe writer
    except SystemExit:
        raise
    except Exception as exc:
        if _debug(args):
            traceback.print_exc()
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        hint = "" if _debug(args) else " (run with -v or VDEV_DEBUG=1 for the traceback)"
        print(
            f"{prog}: internal error: {type(exc).__name__}{': ' + detail if detail else ''}{hint}",
            file=sys.stderr,
        )
        return 70  # EX_SOFTWARE


if __name__ == "__main__":
    sys.exit(main())
