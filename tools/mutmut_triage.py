"""Run mutmut's mutants against a few test files, one fork per mutant (quick verdicts).

``mutmut run`` spends most of a whole-module run of backend.py on mutants whose function
every vhost and net test reaches.  This runs them inside mutmut's working copy
(``mutants/``, the mutant chosen by MUTANT_UNDER_TEST, which the trampolines read at each
call) against the given test files only: the parent imports pytest and the tests once,
each mutant runs in a forked child with ``-x``, on the tests of those files that
``mutants/mutmut-stats.json`` says reach its function (every test of the files with
``--all``), fastest first, and is killed after ``--limit`` seconds (a mutant that loops).

A KILLED verdict holds for mutmut's whole selection too (the files are part of it); a
SURVIVED one only says these files do not kill it.  Nothing under vdev/ is touched, so it
may run beside a ``mutmut run``; new test files must be copied into ``mutants/tests``
first (under a name of their own, so that the running mutmut is not affected).

    python3 tools/mutmut_triage.py tests/vhost/test_backend_rules.py < names > verdicts

Prints one line per mutant named on stdin: KILLED (with the first failing test), SURVIVED
or TIMEOUT.  ``none`` as a name runs the unmutated code (it must survive).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MUTANTS = ROOT / "mutants"
PYTEST_ARGS = ["-x", "-q", "-p", "no:cacheprovider", "-p", "no:xdist", "-p", "no:randomly"]


def _quiet_collect(files: list[str]) -> list[str]:
    """Import the tests once in this process; return their node ids."""
    import pytest

    ids: list[str] = []

    class Collect:
        def pytest_collection_finish(self, session: pytest.Session) -> None:
            ids.extend(item.nodeid for item in session.items)

    saved = os.dup(1), os.dup(2)
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 1)
        os.dup2(null.fileno(), 2)
        try:
            pytest.main([*PYTEST_ARGS, "--collect-only", *files], plugins=[Collect()])
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
    return ids


def _run(name: str, tests: list[str], limit: float) -> str:
    import pytest

    with tempfile.TemporaryFile("w+") as out:
        start = time.monotonic()
        pid = os.fork()
        if pid == 0:
            os.dup2(out.fileno(), 1)
            os.dup2(out.fileno(), 2)
            os.environ["MUTANT_UNDER_TEST"] = name
            os._exit(int(pytest.main([*PYTEST_ARGS, *tests])))
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() - start > limit:
                os.kill(pid, signal.SIGKILL)
            time.sleep(0.05)
        out.seek(0)
        text = out.read()
    if os.WIFSIGNALED(status):
        return f"TIMEOUT  {name}  signal {os.WTERMSIG(status)} after {limit:.0f} s"
    if os.WEXITSTATUS(status) == 0:
        return f"SURVIVED {name}"
    fails = (ln for ln in text.splitlines() if ln.startswith(("FAILED tests/", "ERROR tests/")))
    first = next(fails, "")
    return f"KILLED   {name}  {first[:160]}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("files", nargs="+", help="test files, relative to the repository root")
    ap.add_argument("--all", action="store_true", help="every test of the files, not the stats'")
    ap.add_argument("--limit", type=float, default=40.0, help="seconds per mutant (wall clock)")
    args = ap.parse_args(argv)
    if not (MUTANTS / "mutmut-stats.json").exists():
        ap.error("no mutants/mutmut-stats.json: run scripts/mutate.sh first")
    os.chdir(MUTANTS)
    sys.path.insert(0, str(MUTANTS))
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT]
    os.environ.update(CI="1", MUTANT_UNDER_TEST="")
    stats = json.loads((MUTANTS / "mutmut-stats.json").read_text())
    reach: dict[str, list[str]] = stats["tests_by_mangled_function_name"]
    duration: dict[str, float] = stats["duration_by_test"]
    ids = sorted(_quiet_collect(args.files), key=lambda t: duration.get(t, 1.0))
    for line in sys.stdin:
        name = line.strip()
        if not name:
            continue
        # the stats name tests by file::function; a copy under another name matches by test
        hit = {t.rsplit("::", 1)[-1] for t in reach.get(name.rsplit("__mutmut_", 1)[0], [])}
        tests = ids if args.all else [t for t in ids if t.rsplit("::", 1)[-1] in hit] or ids
        print(_run(name, tests, args.limit), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
