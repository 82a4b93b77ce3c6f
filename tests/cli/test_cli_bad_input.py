"""Every ``vdev`` subcommand answers bad input with one line naming it, never a traceback.

The subcommands and their options are enumerated from the argparse parser itself, so a
new subcommand gets the generic checks (an unknown option, a non-number for every numeric
option and argument, an impossible path for every path option) without touching this
file, and a new path option that nobody validates fails ``test_path_options_are_checked``.
Each case runs ``python3 -m host.cli`` as a subprocess with stdin closed: exit status
non-zero, stderr exactly one line naming the option and the bad value, no "Traceback".
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from host.cli import build_parser
from host.cli_args import input_dir, input_file, output_dir, output_path

REPO = Path(__file__).resolve().parents[2]
GOOD_SCENARIO = REPO / "scenarios" / "flaky-link.toml"
PATH_TYPES = (input_file, input_dir, output_path, output_dir)
# Options that name a path but are checked when used, not by argparse: a client socket
# (ctl, inspect: the connect fails and says so), and serve's sockets (created at start,
# vdev.socketpath names the missing directory); images boot --nic takes "user" too.
CHECKED_AT_USE = {
    ("ctl", "--control"),
    ("inspect", "--control"),
    ("serve", "--socket"),
    ("serve", "--control"),
    ("images boot", "--nic"),
}
PATHY_METAVARS = {"FILE", "PATH", "DIR", "CTL", "BZIMAGE", "SOCK|user", "SOCK"}


@dataclass
class Leaf:
    path: list[str]
    parser: argparse.ArgumentParser

    @property
    def name(self) -> str:
        return " ".join(self.path)

    def options(self) -> Iterator[argparse.Action]:
        for a in self.parser._actions:
            if a.option_strings and a.help != argparse.SUPPRESS and a.dest != "help":
                yield a

    def positionals(self) -> list[argparse.Action]:
        return [
            a
            for a in self.parser._actions
            if not a.option_strings and not isinstance(a, argparse._SubParsersAction)
        ]


def leaves(parser: argparse.ArgumentParser, path: list[str] | None = None) -> list[Leaf]:
    path = path or []
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        return [Leaf(path, parser)]
    out = []
    for sub in subs:
        for name, child in sub.choices.items():
            out.extend(leaves(child, [*path, name]))
    return out


LEAVES = leaves(build_parser())


def numeric(action: argparse.Action) -> bool:
    if action.type is None or action.type in PATH_TYPES or action.type in (str, Path):
        return False
    try:
        return isinstance(action.type("1"), int | float)  # type: ignore[operator]
    except (ValueError, TypeError, argparse.ArgumentTypeError):
        return False


def pathy(action: argparse.Action) -> bool:
    return action.type in PATH_TYPES or str(action.metavar) in PATHY_METAVARS


def base_args(leaf: Leaf, tmp: Path) -> list[str]:
    """The leaf's required arguments with harmless valid values."""
    args: list[str] = []
    for a in leaf.parser._actions:
        # serve --socket: one per call, and so per case (they run at once); a case must not
        # reuse another's, or one case's serve can be listening on it when the other starts.
        if a.option_strings and a.required:
            args += [a.option_strings[-1], str(tmp / f"ok-{uuid.uuid4().hex[:8]}.sock")]
    for a in leaf.positionals():
        if a.nargs in ("?", "*"):
            continue
        if a.choices:
            args.append(str(next(iter(a.choices))))
        elif numeric(a):
            args.append("1")
        elif pathy(a):
            args.append(str(GOOD_SCENARIO))
        elif a.metavar == "JSON":
            args.append('{"cmd": "ping"}')
        else:
            args.append("x")
    return args


@dataclass
class Case:
    id: str
    argv: list[str]
    must_name: list[str]  # what the one error line must mention


def run_case(case: Case, tmp: Path) -> str | None:
    """None when the case behaves; else what went wrong."""
    env = dict(os.environ, VDEV_CTL_SOCKET="", VDEV_SANDBOX_CTL=str(tmp / "none.sock"))
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "host.cli", *case.argv],
            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=90, cwd=tmp,
            env=env,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        return f"{case.id}: still running after 90 s (the bad value was accepted)"
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    problems = []
    if proc.returncode == 0:
        problems.append("exit status 0")
    if "Traceback" in proc.stderr + proc.stdout:
        problems.append("a traceback")
    if len(lines) != 1:
        problems.append(f"{len(lines)} stderr lines")
    missing = [w for w in case.must_name if w not in proc.stderr]
    if missing:
        problems.append(f"stderr does not name {missing}")
    if problems:
        return f"{case.id} {case.argv}: {', '.join(problems)}:\n{proc.stderr}{proc.stdout[-500:]}"
    return None


def run_all(cases: list[Case], tmp: Path) -> None:
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda c: run_case(c, tmp), cases))
    failures = [r for r in results if r is not None]
    assert not failures, "\n\n".join(failures)


@pytest.fixture
def files(tmp_path: Path) -> Path:
    (tmp_path / "plain").write_text("a regular file\n")
    (tmp_path / "latin1.toml").write_bytes(b'[scenario]\nname = "caf\xe9"\n\xff\xfe\n')
    return tmp_path


def test_the_parser_has_the_known_subcommands() -> None:
    names = {leaf.name for leaf in LEAVES}
    assert {"serve", "run", "sandbox", "inspect", "ctl add", "scenario check", "demo"} <= names


def test_unknown_options_and_bad_numbers(files: Path) -> None:
    cases = []
    for leaf in LEAVES:
        cases.append(Case(f"{leaf.name} unknown",
                          [*leaf.path, *base_args(leaf, files), "--no-such-opt"],
                          ["--no-such-opt"]))  # fmt: skip
        for a in leaf.options():
            if numeric(a):
                opt = a.option_strings[-1]
                cases.append(Case(f"{leaf.name} {opt}",
                                  [*leaf.path, *base_args(leaf, files), opt, "x1"],
                                  [opt, "x1"]))  # fmt: skip
        for i, a in enumerate(leaf.positionals()):
            if numeric(a):
                bad = base_args(leaf, files)
                bad[i] = "x1"
                cases.append(Case(f"{leaf.name} <{a.dest}>", [*leaf.path, *bad], ["x1"]))
    run_all(cases, files)


def test_path_options_are_checked() -> None:
    """Every option that takes a path validates it (or is listed as checked at use)."""
    unchecked = [
        f"{leaf.name} {a.option_strings[-1]}"
        for leaf in LEAVES
        for a in leaf.options()
        if str(a.metavar) in PATHY_METAVARS
        and a.type not in PATH_TYPES
        and (leaf.name, a.option_strings[-1]) not in CHECKED_AT_USE
        and (leaf.path[0], a.option_strings[-1]) not in CHECKED_AT_USE
    ]
    assert unchecked == []


def test_impossible_paths(files: Path) -> None:
    """A path in a missing directory (under a regular file for options that create
    directories) for every path option and positional."""
    cases = []
    for leaf in LEAVES:
        for a in leaf.options():
            if not pathy(a):
                continue
            opt = a.option_strings[-1]
            # output_dir creates missing parents: for it, a path under a regular file.
            v = str(files / ("plain" if a.type is output_dir else "missing-dir") / "x")
            argv = [*leaf.path, *base_args(leaf, files), opt, v]
            cases.append(Case(f"{leaf.name} {opt} {v}", argv, [v]))
        for i, a in enumerate(leaf.positionals()):
            if pathy(a):
                bad = base_args(leaf, files)
                bad[i] = str(files / "missing-dir" / "x")
                cases.append(Case(f"{leaf.name} <{a.dest}>", [*leaf.path, *bad], [bad[i]]))
    run_all(cases, files)


def test_non_utf8_input_files(files: Path) -> None:
    bad = str(files / "latin1.toml")
    cases = []
    for leaf in LEAVES:
        for a in leaf.options():
            if a.type is input_file:
                opt = a.option_strings[-1]
                argv = [*leaf.path, *base_args(leaf, files), opt, bad]
                cases.append(Case(f"{leaf.name} {opt}", argv, [bad]))
        for i, a in enumerate(leaf.positionals()):
            if a.type is input_file:
                argv = base_args(leaf, files)
                argv[i] = bad
                cases.append(Case(f"{leaf.name} <{a.dest}>", [*leaf.path, *argv], [bad]))
    assert len(cases) >= 6  # run/sandbox --script/--scenario, --elf, scenario check, ...
    run_all(cases, files)


def test_targeted_bad_values(files: Path) -> None:
    unknown = files / "unknown-key.toml"
    unknown.write_text('[scenario]\nname = "u"\n[[rule]]\naction = "drop"\ncolour = "red"\n')
    cases = [
        Case("run mtu high", ["run", "--mtu", "70000"], ["--mtu", "70000"]),
        Case(
            "run mtu low", ["run", "--mtu", "10", "--script", str(files / "plain")], ["--mtu", "10"]
        ),
        Case("serve mtu", ["serve", "--socket", "a.sock", "--mtu", "67"], ["--mtu", "67"]),
        Case("sandbox mtu", ["sandbox", "--mtu", "65536"], ["--mtu", "65536"]),
        Case("run queues", ["run", "--queues", "9"], ["--queues", "9"]),
        Case("inspect watch", ["inspect", "--watch", "-1"], ["--watch", "-1"]),
        Case("ctl timeout after", ["ctl", "list", "--timeout", "0"], ["--timeout", "0"]),
        Case("scenario unknown key", ["scenario", "check", str(unknown)], ["colour", ":5:"]),
        Case("run unknown key", ["run", "--scenario", str(unknown)], ["colour"]),
        Case("sandbox unknown key", ["sandbox", "--scenario", str(unknown)], ["colour"]),
        Case("sandbox elf", ["sandbox", "--elf", "/missing.elf"], ["--elf", "/missing.elf"]),
        Case(
            "sandbox not elf",
            ["sandbox", "--elf", str(files / "plain"), "--script", "-"],
            ["--elf", str(files / "plain")],
        ),
        Case("sandbox ctl", ["sandbox", "--ctl", "/nodir/x.sock"], ["/nodir/x.sock"]),
        Case("run control", ["run", "--control", "/nodir/x.sock"], ["--control", "/nodir"]),
        Case(
            "serve control",
            ["serve", "--socket", "a.sock", "--control", "/nodir/c.sock"],
            ["--control /nodir/c.sock", "directory /nodir does not exist"],
        ),
        Case(
            "serve socket",
            ["serve", "--socket", "/nodir/a.sock"],
            ["--socket /nodir/a.sock", "directory /nodir does not exist"],
        ),
        Case("serve mac", ["serve", "--socket", "a.sock", "--mac", "zz:00"], ["--mac", "zz:00"]),
        Case("ctl no socket", ["ctl", "list"], ["--control"]),
        Case(
            "ctl dead socket",
            ["ctl", "-s", str(files / "plain"), "ping"],
            ["--control", str(files / "plain")],
        ),
        Case("inspect dead", ["inspect", "--control", str(files / "none.sock")], ["none.sock"]),
        Case(
            "images kernel",
            ["images", "build", "--kernel", str(files / "plain")],
            ["--kernel", "HdrS"],
        ),
        Case("images nic", ["images", "boot", "--nic", "/nodir/n.sock"], ["/nodir/n.sock"]),
        Case("unknown command", ["frobnicate"], ["frobnicate"]),
        Case("ctl unknown request", ["ctl", "frob"], ["frob"]),
    ]
    run_all(cases, files)
