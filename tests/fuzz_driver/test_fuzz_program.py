"""vdev fuzz-driver's pure parts: programs as scenarios, signatures, the shrinker.

Oracles are independent of the code under test: the scenario parser (vdev.faults.scenario)
validates every generated TOML; the shrinker's result is checked against a brute-force
search over all sub-lists for the smallest one the predicate accepts.
"""

from __future__ import annotations

import itertools
import random
import re

import pytest

from host.fuzz_campaign import shrink
from host.fuzz_program import (
    Op,
    fault_steps,
    from_scenario,
    generate,
    mutate,
    signature_regex,
    to_scenario,
    tweak,
)
from host.fuzz_target import _edges, normalize
from vdev.faults.rules import build_rule
from vdev.faults.scenario import parse_scenario


def _ids() -> object:
    it = itertools.count(1)
    return lambda: next(it)


@pytest.mark.parametrize("seed", range(40))
def test_generated_programs_are_valid_scenarios_and_round_trip(seed: int) -> None:
    r = random.Random(seed)
    nxt = _ids()
    prog = generate(r, next_id=nxt)  # type: ignore[arg-type]
    for _ in range(5):
        prog = mutate(r, prog, nxt)  # type: ignore[arg-type]
    assert fault_steps(prog) >= 1
    for op in prog:
        if op.kind == "fault":
            build_rule(op.args)  # every fault the vocabulary draws is a valid rule spec
    text = to_scenario(prog, name="t", signature="BUG: x a=N at net.c:N")
    sc = parse_scenario(text)  # the scenario parser accepts it (raises otherwise)
    assert [s.do for s in sc.steps][-3:] == ["clear", "link_up", "guest"]
    assert len(sc.steps) == len(prog) + 3
    assert from_scenario(text) == prog


def test_no_signature_means_no_breakage_declared() -> None:
    prog = [Op("guest", {"command": "tx 1 60"})]
    sc = parse_scenario(to_scenario(prog, name="t"))
    assert sc.liveness.expect == "none"


def test_normalize_and_signature_regex() -> None:
    line = "BUG: rx used len overruns its buffer a=2049 b=2048 at net.c:583"
    sig = normalize(line)
    assert sig == "BUG: rx used len overruns its buffer a=N b=N at net.c:N"
    assert normalize("  BUG: id 0x1f0 bad  ") == "BUG: id N bad"
    rx = re.compile(signature_regex(sig))
    assert rx.search(line)
    assert rx.search("BUG: rx used len overruns its buffer a=7 b=8 at net.c:9")
    # Both sides: another check, or the same words with a non-number, do not match.
    assert not rx.search("BUG: rx used len overruns its buffer a=x b=2048 at net.c:583")
    assert not rx.search("BUG: pool leak after reset a=1 b=0 at net.c:298")


def test_tweak_keeps_the_action_and_changes_one_key() -> None:
    r = random.Random(3)
    op = Op("fault", {"action": "bad_used_len", "queue": "rx", "mode": "huge", "extra": 4096,
                      "nth": 1, "limit": 1, "id": "f1", "seed": 5})  # fmt: skip
    seen_extra = set()
    for _ in range(300):
        t = tweak(r, op)
        assert t.args["action"] == "bad_used_len" and t.args["id"] == "f1"
        diff = {k for k in set(op.args) | set(t.args) if op.args.get(k) != t.args.get(k)}
        assert len(diff - {"every", "nth", "limit"}) <= 1
        seen_extra.add(t.args.get("extra"))
    assert {1, 2, 64, 4096} <= seen_extra


def test_edges_bucket_hit_counts() -> None:
    before = bytes(16)
    after = bytes([0, 1, 3, 200] + [0] * 12)
    got = _edges(before, after)
    assert got == {1 << 4 | 1, 2 << 4 | 3, 3 << 4 | 8}
    assert _edges(after, after) == set()
    # AFL's bucket edges, both sides: 3|4, 7|8, 15|16, 31|32, 127|128.
    for hits, bucket in ((3, 3), (4, 4), (7, 4), (8, 5), (15, 5), (16, 6), (31, 6), (32, 7),
                         (127, 7), (128, 8)):  # fmt: skip
        assert _edges(bytes(1), bytes([hits])) == {bucket}, hits
    # Counters saturate at 255 in the guest; a wrap from 250 to 4 reads as 10 hits.
    assert _edges(bytes([250]), bytes([4])) == {0 << 4 | 5}


def _brute_min(ops: list[int], pred: object) -> int:
    for n in range(1, len(ops) + 1):
        for combo in itertools.combinations(ops, n):
            if pred(list(combo)):  # type: ignore[operator]
                return n
    return len(ops)


@pytest.mark.parametrize("seed", range(25))
def test_shrink_reaches_the_brute_force_minimum(seed: int) -> None:
    r = random.Random(seed)
    n = r.randint(3, 10)
    ops = [Op("guest", {"command": f"c{i}"}) for i in range(n)]
    need = set(r.sample(range(n), r.randint(1, min(3, n))))

    def pred(cand: list[Op]) -> bool:  # fails when all the needed ops are there, in order
        idx = [int(op.args["command"][1:]) for op in cand]
        return need <= set(idx) and idx == sorted(idx)

    calls = []

    def counted(cand: list[Op]) -> bool:
        calls.append(1)
        return pred(cand)

    out = shrink(ops, counted)
    assert pred(out)
    assert len(out) == len(need) == _brute_min(list(range(n)), lambda c: need <= set(c))
    # 1-minimal: removing any op loses the failure.
    for i in range(len(out)):
        assert not pred(out[:i] + out[i + 1 :])
    assert len(calls) <= 200


def test_shrink_respects_its_budget() -> None:
    ops = [Op("guest", {"command": f"c{i}"}) for i in range(30)]
    calls = []

    def pred(cand: list[Op]) -> bool:
        calls.append(1)
        return len(cand) >= 15

    shrink(ops, pred, max_tests=10)
    assert len(calls) <= 10


def test_cli_bad_input_and_empty_report(
    tmp_path: object, capsys: pytest.CaptureFixture[str]
) -> None:
    from host.cli import main

    assert main(["fuzz-driver", "--execs", "0"]) == 2
    assert "--execs 0: must be >= 1" in capsys.readouterr().err
    assert main(["fuzz-driver", "--replays", "0"]) == 2
    assert "--replays 0" in capsys.readouterr().err
    assert main(["fuzz-driver", "--report", "--findings", str(tmp_path)]) == 0
    assert "no findings under" in capsys.readouterr().out
    scenario = tmp_path / "x.toml"  # type: ignore[operator]
    scenario.write_text('[scenario]\nname = "x"\n')
    assert main(["run", "--variant", "cov", "--scenario", str(scenario)]) == 2
    assert "--variant: only with --image bare" in capsys.readouterr().err


def test_feature_faults_are_in_the_vocabulary_and_replay_as_scenarios() -> None:
    """The generator draws every feature action; each is followed by a driver reset (the
    negotiation it acts on), parses as a rule, and survives the scenario TOML round trip
    (bit lists included)."""
    from host.fuzz_program import FEATURE_ACTIONS, random_fault, traffic_for

    r = random.Random(5)
    seen: dict[str, Op] = {}
    for n in range(2000):
        op = random_fault(r, n)
        if op.kind == "fault" and op.args["action"] in FEATURE_ACTIONS:
            seen.setdefault(op.args["action"], op)
    assert set(seen) == set(FEATURE_ACTIONS)
    for action, op in seen.items():
        assert "queue" not in op.args
        rule = build_rule(op.args)
        assert rule.kind == "features"
        traffic = traffic_for(r, op)
        assert traffic[0] == Op("guest", {"command": "reset"}), action
        prog = [op, *traffic]
        text = to_scenario(prog, name=action, signature="BUG: x N")
        parse_scenario(text)
        assert from_scenario(text) == prog
        tweaked = [tweak(r, op) for _ in range(20)]
        assert all(t.args["action"] == action for t in tweaked)
        assert any(t != op for t in tweaked), f"tweak never changed {action}"
        for t in tweaked:
            build_rule(t.args)


class _FlakyTarget:
    """A target whose signature needs ops "a" and "b"; without "b" it still breaks, but
    only on every other run (a timing-dependent reproduction)."""

    kind = "fake"

    def __init__(self) -> None:
        self.runs = 0

    def run(self, prog: list[Op]) -> object:
        from host.fuzz_target import ExecResult

        self.runs += 1
        cmds = {str(op.args.get("command")) for op in prog}
        res = ExecResult()
        if "a" in cmds and ("b" in cmds or self.runs % 2 == 0):
            res.signature = res.line = "BUG: x"
        return res

    def replay(self, prog: list[Op], signature: str) -> str | None:
        return getattr(self.run(prog), "signature", None)


@pytest.mark.parametrize("confirm", [1, 3])
def test_confirm_keeps_steps_a_lucky_run_would_drop(confirm: int) -> None:
    """With one run per shrink candidate, a run where the flaky path broke makes "b" look
    unneeded, and the minimized program replays only half the time; confirming each
    candidate three times keeps "b" (the oracle is the target's own rule above)."""
    from host.fuzz_campaign import Campaign

    prog = [Op("guest", {"command": c}) for c in ("a", "x", "b", "y")]
    found: list[object] = []
    camp = Campaign(_FlakyTarget(), replays=4, confirm=confirm, on_finding=found.append)  # type: ignore[arg-type]
    assert camp.adopt(prog) == "BUG: x"
    (f,) = found
    kept = [op.args["command"] for op in f.minimized]  # type: ignore[attr-defined]
    if confirm == 1:
        assert kept == ["a"]  # the lucky shrink: drops "b"
    else:
        assert kept == ["a", "b"]
        assert f.replays_ok == 4  # type: ignore[attr-defined]


def test_prologue_round_trips() -> None:
    prog = [
        Op("fault", {"action": "drop", "queue": "rx", "id": "f1"}),
        Op("send", {"count": 1, "size": 60}),
    ]
    text = to_scenario(prog, name="p", signature="BUG: N", epilogue="E", prologue="Q")
    parse_scenario(text)
    assert text.index('command = "Q"') < text.index('do = "add"')
    assert from_scenario(text, epilogue="E", prologue="Q") == prog
