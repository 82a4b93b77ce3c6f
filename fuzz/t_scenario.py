"""Scenario TOML files (``vdev/faults/scenario.py``): any bytes either parse into a
Scenario or raise the named ``ScenarioError``; nothing else may escape.

A scenario file is as untrusted as any other input a user hands ``vdev run``; a parse that
succeeds is parsed again from the same bytes and must describe the same scenario (no state
leaks between parses).
"""

from __future__ import annotations

from vdev.faults.scenario import ScenarioError, parse_scenario_bytes


def one_input(data: bytes) -> None:
    try:
        sc = parse_scenario_bytes(data, "fuzz.toml")
    except ScenarioError as exc:
        assert str(exc).startswith("fuzz.toml"), f"error does not name the file: {exc}"
        return
    again = parse_scenario_bytes(data, "fuzz.toml")
    assert (sc.rules, sc.steps, sc.expects, sc.traffic, sc.liveness) == (
        again.rules, again.steps, again.expects, again.traffic, again.liveness,
    ), "the same bytes parsed twice differ"  # fmt: skip
