"""The ``vdev fuzz-driver`` search: generate, run, keep what is new, shrink what breaks.

``Campaign(target, seed).run(budget)`` loops: a fresh program (``fuzz_program.generate``)
or a mutation of one from the corpus (programs that reached coverage no earlier program
did), run on the target, judged by its oracles (``fuzz_target``).  A new signature is a
finding: its program is shrunk (``shrink``: delta debugging, then dropping traffic) to
the smallest program that still gives the same signature, checked to replay
``replays`` times out of as many, and written to the findings directory
(``fuzz_findings``).  Progress (executions/s, edges, findings) is sampled for the
benchmark table.

``shrink`` is ddmin (Zeller and Hildebrandt, "Simplifying and Isolating Failure-Inducing
Input", 2002) over the op list with ``test(ops) -> bool``; it is independent of the
target so its tests run against a pure predicate.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from host.fuzz_program import Op, Program, fault_steps, generate, mutate
from host.fuzz_target import ExecResult


class Target(Protocol):
    kind: str

    def run(self, prog: Program) -> ExecResult: ...

    def replay(self, prog: Program, signature: str) -> str | None: ...


def shrink(ops: list[Op], test: Callable[[list[Op]], bool], max_tests: int = 200) -> list[Op]:
    """The smallest sub-list (1-minimal, within ``max_tests`` runs) of ``ops`` for which
    ``test`` still holds; ``test(ops)`` must hold."""
    tests = 0

    def check(cand: list[Op]) -> bool:
        nonlocal tests
        tests += 1
        return test(cand)

    cur = list(ops)
    n = 2
    while len(cur) >= 2 and tests < max_tests:
        chunk = max(1, len(cur) // n)
        subsets = [cur[i : i + chunk] for i in range(0, len(cur), chunk)]
        progressed = False
        for sub in subsets:  # reduce to a subset
            if tests >= max_tests:
                break
            if len(subsets) > 1 and check(sub):
                cur, n, progressed = sub, 2, True
                break
        if not progressed:
            for i in range(len(subsets)):  # reduce to a complement
                if tests >= max_tests:
                    break
                comp = [op for j, s in enumerate(subsets) if j != i for op in s]
                if comp and check(comp):
                    cur, n, progressed = comp, max(n - 1, 2), True
                    break
        if not progressed:
            if n >= len(cur):
                break
            n = min(len(cur), 2 * n)
    # ddmin ends with n >= len(cur) having tried every complement of one op: 1-minimal.
    return cur


@dataclass
class Finding:
    signature: str
    line: str
    program: Program
    minimized: Program
    first_exec: int
    seconds: float  # campaign time to the first hit
    result: ExecResult
    replays_ok: int = 0
    replays: int = 0
    shrink_runs: int = 0
    hits: int = 1

    @property
    def fault_steps(self) -> int:
        return fault_steps(self.minimized)


@dataclass
class Sample:
    seconds: float
    execs: int
    edges: int
    findings: int


@dataclass
class Campaign:
    """One search (see the module docstring)."""

    target: Target
    seed: int = 1
    replays: int = 10
    shrink_budget: int = 120
    # Runs a shrink candidate must give the signature in, each: 1 for the bare driver
    # (deterministic), more for Linux, where one lucky run must not make a step look
    # unneeded (the minimized program would then replay by chance).
    confirm: int = 1
    energy: int = 16
    on_finding: Callable[[Finding], None] | None = None
    progress: Callable[[str], None] | None = None
    findings: dict[str, Finding] = field(default_factory=dict)
    corpus: list[Program] = field(default_factory=list)
    edges: set[int] = field(default_factory=set)
    samples: list[Sample] = field(default_factory=list)
    execs: int = 0
    exec_seconds: float = 0.0  # time inside target.run for search executions only
    reboots: int = 0
    shrink_seconds: float = 0.0  # spent shrinking and replaying (not search time)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self._ids = 0
        self._fresh: list[tuple[Program, int]] = []
        self.t0 = time.monotonic()

    def next_id(self) -> int:
        self._ids += 1
        return self._ids

    def _candidate(self) -> Program:
        # Energy (AFL's idea, simplified): a program that just reached new coverage gets
        # the next ``energy`` mutations, so the search stays near new behaviour.
        while self._fresh and self._fresh[-1][1] <= 0:
            self._fresh.pop()
        if self._fresh and self.rng.random() < 0.7:
            prog, left = self._fresh[-1]
            self._fresh[-1] = (prog, left - 1)
            return mutate(self.rng, prog, self.next_id)
        if not self.corpus or self.rng.random() < 0.3:
            return generate(self.rng, next_id=self.next_id)
        return mutate(self.rng, self.rng.choice(self.corpus), self.next_id)

    def run(
        self,
        budget_execs: int | None = None,
        budget_seconds: float | None = None,
        stop_when: Callable[[Campaign], bool] | None = None,
    ) -> Campaign:
        """Search until either budget is spent or ``stop_when(self)`` holds."""
        self.t0 = time.monotonic()
        next_sample = 0.0
        while True:
            elapsed = time.monotonic() - self.t0
            if budget_execs is not None and self.execs >= budget_execs:
                break
            if budget_seconds is not None and elapsed >= budget_seconds:
                break
            if stop_when is not None and stop_when(self):
                break
            prog = self._candidate()
            res = self.target.run(prog)
            self.execs += 1
            self.exec_seconds += res.seconds
            self.reboots += int(res.rebooted)
            new = res.coverage - self.edges
            if new:
                known_edges = {e >> 4 for e in self.edges}
                new_edges = {e >> 4 for e in new} - known_edges
                self.edges |= new
                if res.signature is None:
                    self.corpus.append(prog)
                    # A new edge (code never run before) earns more mutations than a new
                    # hit count on a known edge.
                    energy = self.energy * 4 if new_edges else self.energy // 2
                    self._fresh.append((prog, energy))
            if res.signature is not None:
                self._found(prog, res)
            if elapsed >= next_sample:
                self.samples.append(self.sample())
                next_sample = elapsed + 1.0
                if self.progress is not None:
                    self.progress(self.status())
        self.samples.append(self.sample())
        return self

    def sample(self) -> Sample:
        return Sample(
            round(time.monotonic() - self.t0, 2), self.execs, self.edge_count, len(self.findings)
        )

    @property
    def edge_count(self) -> int:
        return len({e >> 4 for e in self.edges})

    @property
    def execs_per_second(self) -> float:
        return self.execs / self.exec_seconds if self.exec_seconds else 0.0

    def status(self) -> str:
        return (
            f"{self.execs} execs, {self.execs_per_second:.1f}/s, {self.edge_count} edges, "
            f"corpus {len(self.corpus)}, {len(self.findings)} findings, {self.reboots} reboots"
        )

    def _found(self, prog: Program, res: ExecResult) -> None:
        assert res.signature is not None
        known = self.findings.get(res.signature)
        if known is not None:
            known.hits += 1
            return
        t_found = time.monotonic()
        seconds = t_found - self.t0 - self.shrink_seconds
        sig = res.signature
        runs = 0

        def same(cand: list[Op]) -> bool:
            nonlocal runs
            for _ in range(max(1, self.confirm)):
                runs += 1
                if self.target.run(cand).signature != sig:
                    return False
            return True

        minimized = shrink(prog, same, self.shrink_budget)
        # The replays go through the scenario TOML and the scenario player: what a user
        # replays, not the search's own executor.
        ok = 0
        for _ in range(self.replays):
            ok += self.target.replay(minimized, sig) == sig
        self.shrink_seconds += time.monotonic() - t_found
        f = Finding(
            sig, res.line, prog, minimized, self.execs, seconds, res, ok, self.replays, runs
        )
        self.findings[sig] = f
        if self.progress is not None:
            self.progress(
                f"finding after {self.execs} execs ({seconds:.1f} s): {sig} -> "
                f"{len(minimized)} ops ({f.fault_steps} fault steps), replays {ok}/{self.replays}"
            )
        if self.on_finding is not None:
            self.on_finding(f)

    def adopt(self, prog: Program) -> str | None:
        """Run a program from elsewhere (an older finding's) and, when it gives a signature
        this campaign has not got, shrink, replay and report it as a finding of its own:
        ``vdev fuzz-driver --from-findings``.  Returns the signature it gave."""
        res = self.target.run(prog)
        self.execs += 1
        self.exec_seconds += res.seconds
        if res.signature is not None:
            self._found(prog, res)
        return res.signature

    def summary(self) -> dict[str, Any]:
        return {
            "execs": self.execs,
            "execs_per_second": round(self.execs_per_second, 1),
            "edges": self.edge_count,
            "corpus": len(self.corpus),
            "reboots": self.reboots,
            "findings": [
                {
                    "signature": f.signature,
                    "first_exec": f.first_exec,
                    "seconds": round(f.seconds, 2),
                    "ops": len(f.minimized),
                    "fault_steps": f.fault_steps,
                    "replays": f"{f.replays_ok}/{f.replays}",
                    "hits": f.hits,
                }
                for f in self.findings.values()
            ],
        }


__all__ = ["Campaign", "Finding", "Sample", "Target", "shrink"]
