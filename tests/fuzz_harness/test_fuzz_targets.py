"""The fuzz harnesses (``fuzz/``) in the test suite: the seed corpus replayed in-process
through every harness (no atheris needed), then each target fuzzed briefly under libFuzzer
(20,000 executions or 20 s, whichever comes first), asserting the campaign's own verdict:
0 crashes, hangs and leaks.  The long campaigns are ``bash scripts/fuzz.sh --runs 1000000``
(benchmarks/RESULTS.md).

The harness oracles can fail: ``test_harness_catches_a_leak`` runs the control harness
against a pool fault that keeps its packets (the bug it found, put back) and expects its
FuzzLeak.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from fuzz import campaign
from fuzz.common import FuzzLeak
from fuzz.run import TARGETS

ROOT = Path(__file__).resolve().parents[2]
CORPUS = ROOT / "fuzz" / "corpus"
RUNS = int(os.environ.get("VDEV_FUZZ_CI_RUNS", "20000"))
SECONDS = int(os.environ.get("VDEV_FUZZ_CI_SECONDS", "20"))


@pytest.fixture(autouse=True)
def _restore_vdev_logging() -> Iterator[None]:
    """The harnesses quiet vdev's loggers for million-run campaigns (no propagation, level
    ERROR, their own handler); replayed in-process, that would outlive the test and hide the
    records later tests on this worker read through caplog."""
    names = [n for n in logging.root.manager.loggerDict if n == "vdev" or n.startswith("vdev.")]
    names += ["vdev", "vdev.vhost", "vdev.net", "vdev.virtio", "vdev.skywalk", "vdev.faults"]
    saved = {}
    for n in set(names):
        lg = logging.getLogger(n)
        saved[n] = (lg.level, lg.propagate, list(lg.handlers), lg.disabled)
    yield
    for n in set(logging.root.manager.loggerDict) | set(saved):
        if not (n == "vdev" or n.startswith("vdev.")):
            continue
        lg = logging.getLogger(n)
        level, propagate, handlers, disabled = saved.get(n, (logging.NOTSET, True, [], False))
        lg.setLevel(level)
        lg.propagate = propagate
        lg.handlers[:] = handlers
        lg.disabled = disabled


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_seed_corpus_replays_clean(target: str) -> None:
    mod = importlib.import_module(TARGETS[target])
    files = sorted((CORPUS / target).iterdir())
    assert len(files) >= 5, f"fuzz/corpus/{target} needs seeds"
    for f in files:
        mod.one_input(f.read_bytes())


def test_harness_catches_a_leak(monkeypatch: pytest.MonkeyPatch) -> None:
    from fuzz import t_control
    from vdev.faults import engine

    real = engine.FaultEngine._claim_id

    def claim_late(self: engine.FaultEngine, fault_id: str | None) -> str:
        return str(fault_id or self.next_id("d"))  # the old order: effect first, check later

    t_control.one_input(b'{"cmd":"ping"}\n')  # set up before the bug goes in
    monkeypatch.setattr(engine.FaultEngine, "_claim_id", claim_late)
    original = engine.FaultEngine._device_fault

    def check_late(self: engine.FaultEngine, fid: str, *a: object, **kw: object) -> object:
        real(self, fid)  # refuses the taken id only now, after the packets were taken
        return original(self, fid, *a, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(engine.FaultEngine, "_device_fault", check_late)
    crash = (CORPUS / "control" / "regress-pool-id-reuse").read_bytes()
    with pytest.raises(FuzzLeak, match="pool in_use"):
        t_control.one_input(crash)
    monkeypatch.undo()
    t_control._state["srv"].close()  # the leaked packets go with this device
    t_control._state["dev"].close()
    t_control._state.clear()  # the next input sets up a fresh one


@pytest.mark.skipif(importlib.util.find_spec("atheris") is None, reason="atheris not installed")
@pytest.mark.parametrize("target", sorted(TARGETS))
def test_brief_fuzz_run_is_clean(target: str, tmp_path: Path) -> None:
    r = campaign.run_target(target, RUNS, max_time=SECONDS, quiet=True, artifacts=tmp_path)
    log = (tmp_path / f"{target}.log").read_text()
    assert r.execs > 0 and r.cov > 0, log[-3000:]
    assert (r.crashes, r.hangs, r.leaks) == (0, 0, 0), f"{r}\n{log[-3000:]}"
