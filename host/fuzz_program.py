"""What ``vdev fuzz-driver`` runs: a program of device misbehaviour and traffic, as data.

A program is a list of ``Op``s played in order against one running guest driver:

* ``fault``: install one fault rule (``vdev.faults.rules`` spec: ring faults, malformed RX
  vnet headers, bogus lengths and ids, reordered/duplicate/late completions, interrupt
  suppression and spurious interrupts, data-plane drops and corruption);
* ``link``: the device takes the link down or up (a configuration change interrupt);
* ``guest``: one console command of the guest driver (traffic: ``tx``/``rx``/``echo``; or
  the driver resetting the device mid-traffic, or renegotiating features under faults);
* ``send``: the host sends frames to the guest (RX traffic for the RX faults to bite on);
* ``clear``: every rule removed.

``fault`` and ``link`` ops are the program's *fault steps* (what a minimized finding counts);
the others are the traffic interleaved with them.  ``generate`` and ``mutate`` draw from the
vocabulary with a seeded ``random.Random``, so a campaign is reproducible from its seed.
``to_scenario`` writes a program as a scenario TOML (``[[step]]`` tables with ``after = 0``:
the same order, nothing timed), which ``vdev sandbox --scenario`` replays through the one
scenario player; ``from_scenario`` reads it back.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

FAULT_KINDS = ("fault", "link")
OP_KINDS = (*FAULT_KINDS, "guest", "send", "clear")
EPILOGUE = ("clear", "link up", "reset")  # what every execution ends with (see fuzz_target)

# Traffic commands keep their waits short: a stalled queue must not cost the default 5 s.
TX_WAIT_MS = 60
RX_WAIT_MS = 20


@dataclass(frozen=True)
class Op:
    """One step of a program: ``kind`` (OP_KINDS) and its arguments (plain data)."""

    kind: str
    args: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in OP_KINDS:
            raise ValueError(f"op kind {self.kind!r}: one of {', '.join(OP_KINDS)}")

    @property
    def is_fault(self) -> bool:
        return self.kind in FAULT_KINDS

    def describe(self) -> str:
        if self.kind == "fault":
            spec = ", ".join(f"{k}={v}" for k, v in self.args.items() if k not in ("id", "seed"))
            return f"fault {spec}"
        if self.kind == "link":
            return f"link {'up' if self.args.get('up') else 'down'}"
        if self.kind == "guest":
            return f"guest {self.args['command']}"
        if self.kind == "send":
            return f"send {self.args['count']}x{self.args['size']}"
        return self.kind

    def key(self) -> str:
        return json.dumps([self.kind, self.args], sort_keys=True)


Program = list[Op]


def fault_steps(prog: Program) -> int:
    return sum(1 for op in prog if op.is_fault)


# -- the vocabulary --------------------------------------------------------------------


def _q(r: random.Random, choices: tuple[str, ...] = ("rx", "tx", "both")) -> str:
    return r.choice(choices)


def _match(r: random.Random) -> dict[str, Any]:
    """When a ring rule fires: the n-th candidate, or every k-th; a few hits at most."""
    if r.random() < 0.6:
        return {"nth": r.randint(1, 4), "limit": 1}
    return {"every": r.randint(1, 4), "limit": r.randint(1, 4)}


def _ring(r: random.Random) -> dict[str, Any]:
    kind = r.choice(
        (
            "bad_used_id",
            "bad_used_len",
            "bad_vnet_hdr",
            "double_complete",
            "out_of_order",
            "delay_used",
            "stall",
            "suppress_irq",
            "delay_irq",
            "spurious_irq",
            "ignore_event_idx",
        )
    )
    spec: dict[str, Any] = {"action": kind}
    if kind == "bad_used_id":
        spec.update(
            queue=_q(r),
            mode=r.choice(("out_of_range", "not_outstanding")),
            replace=r.random() < 0.5,
        )
    elif kind == "bad_used_len":
        spec.update(queue=_q(r), mode=r.choice(("huge", "zero", "header")))
        if spec["mode"] == "huge":
            spec["extra"] = r.choice((1, 2, 64, 4096))
    elif kind == "bad_vnet_hdr":
        mode = r.choice(("gso", "csum_beyond", "num_buffers", "flags"))
        spec.update(queue="rx", mode=mode)
        if mode == "num_buffers":
            spec["value"] = r.choice((0, 2, 9, 64, 0xFFFF))
        elif mode == "csum_beyond":
            spec["value"] = r.choice((1, 16, 4096))
    elif kind == "out_of_order":
        spec.update(queue=_q(r), hold_ms=r.choice((1, 20)))
    elif kind == "delay_used":
        spec.update(queue=_q(r), ms=r.choice((5, 40)))
    elif kind == "stall":
        spec.update(queue=_q(r, ("tx", "rx")))
        return spec  # time-driven: no match keys
    elif kind == "delay_irq":
        spec.update(queue=_q(r), ms=r.choice((5, 30)))
    elif kind == "spurious_irq":
        spec.update(queue=_q(r), extra=r.randint(1, 3))
    else:
        spec.update(queue=_q(r))
    spec.update(_match(r))
    return spec


def _data(r: random.Random) -> dict[str, Any]:
    kind = r.choice(("drop", "corrupt", "truncate", "duplicate", "pad"))
    spec: dict[str, Any] = {"action": kind, "queue": _q(r, ("rx", "tx"))}
    if kind == "truncate":
        spec["length"] = r.choice((0, 13, 14, 20))
    elif kind == "corrupt":
        spec["flips"] = r.randint(1, 4)
    elif kind == "pad":
        spec["to"] = r.choice((1515, 2048, 4000))
    elif kind == "duplicate":
        spec["copies"] = r.randint(1, 3)
    spec.update(_match(r))
    return spec


FEATURE_ACTIONS = ("feature_offer", "feature_withdraw", "feature_assume", "refuse_features")
# Spec bit numbers (virtio 1.x "Feature Bits" and 5.1.3 "Feature bits" of the net device):
# 0 CSUM, 1 GUEST_CSUM, 10 GUEST_UFO, 15 MRG_RXBUF, 29 EVENT_IDX, 32 VERSION_1; 41 and 50
# are reserved for a net device.  Each set is one way a device lies about them.
_OFFER_EXTRA = ((50,), (41,), (10,), (50, 41))
_OFFER_CLEAR = ((1,), (15,), (29,), (32,))
_BEHAVE = ((29,), (15,), (32, 15), (1,), (0,), (10,))
_REFUSE_WHEN = ((), (29,), (15,), (32,))


def _features(r: random.Random) -> dict[str, Any]:
    """A feature-negotiation fault (vdev/faults/features.py).  It acts at the next
    negotiation, so ``traffic_for`` puts a driver reset right after it; no queue key."""
    kind = r.choice(FEATURE_ACTIONS)
    spec: dict[str, Any] = {"action": kind}
    if kind == "feature_offer":
        if r.random() < 0.5:
            spec["bits"] = list(r.choice(_OFFER_EXTRA))
        else:
            spec["clear"] = list(r.choice(_OFFER_CLEAR))
    elif kind == "refuse_features":
        when = r.choice(_REFUSE_WHEN)
        if when:
            spec["when"] = list(when)
    else:
        spec["bits"] = list(r.choice(_BEHAVE))
    spec["limit"] = r.randint(1, 2)
    return spec


def random_fault(r: random.Random, n: int) -> Op:
    """One fault step; ``n`` numbers the rule id and seed (replays are deterministic)."""
    if r.random() < 0.1:
        return Op("link", {"up": r.random() < 0.3})
    x = r.random()
    spec = _features(r) if x < 0.1 else _ring(r) if x < 0.8 else _data(r)
    spec["id"] = f"f{n}"
    spec["seed"] = r.randrange(1 << 16)
    return Op("fault", spec)


def random_traffic(r: random.Random) -> Op:
    x = r.random()
    if x < 0.3:
        n, size = r.choice((1, 2, 4, 8, 32)), r.choice((60, 200, 1514))
        return Op("guest", {"command": f"tx {n} {size} 32 wait={TX_WAIT_MS}"})
    if x < 0.6:
        return Op("send", {"count": r.choice((1, 2, 4, 16)), "size": r.choice((60, 300, 1514))})
    if x < 0.75:
        return Op("guest", {"command": f"rx {r.choice((1, 2, 4))} {RX_WAIT_MS}"})
    if x < 0.87:
        return Op("guest", {"command": "rx 0"})  # one RX sync: harvest what is there
    if x < 0.93:
        return Op("guest", {"command": "reset"})  # the driver resets mid-traffic
    if x < 0.97:
        ev, mrg = r.randint(0, 1), r.randint(0, 1)
        return Op("guest", {"command": f"features event_idx={ev} mrg_rxbuf={mrg}"})
    return Op("clear")


def traffic_for(r: random.Random, fault: Op) -> Program:
    """Traffic on the queue a fault targets, right after it: the device misbehaves while
    the driver is busy there (RX: the host sends and the guest harvests; TX: the guest
    sends)."""
    queue = str(fault.args.get("queue", "both"))
    out: Program = []
    if fault.args.get("action") in FEATURE_ACTIONS:
        # A feature fault bites at the next negotiation: the driver resets the device
        # (SET_FEATURES again), then traffic both ways runs under what was negotiated.
        out.append(Op("guest", {"command": "reset"}))
    if queue in ("rx", "both") or fault.kind == "link":
        n = r.choice((1, 2, 4, 16))
        out.append(Op("send", {"count": n, "size": r.choice((60, 300, 1514))}))
        out.append(Op("guest", {"command": f"rx {n} {RX_WAIT_MS}"}))
    if queue in ("tx", "both") or fault.kind == "link":
        n, size = r.choice((1, 2, 4, 8, 32)), r.choice((60, 200, 1514))
        out.append(Op("guest", {"command": f"tx {n} {size} 32 wait={TX_WAIT_MS}"}))
    return out


def generate(
    r: random.Random, max_len: int = 8, next_id: Callable[[], int] | None = None
) -> Program:
    """A fresh program: 1-3 faults, interleaved with traffic."""
    counter = next_id or _counter()
    prog: Program = []
    faults = r.randint(1, 3)
    for _ in range(faults):
        fault = random_fault(r, counter())
        prog.append(fault)
        prog.extend(traffic_for(r, fault))
        for _ in range(r.randint(0, 2)):
            op = random_traffic(r)
            prog.append(op)
            if op.kind == "send" and r.random() < 0.5:  # and the guest takes them
                prog.append(Op("guest", {"command": f"rx {op.args['count']} {RX_WAIT_MS}"}))
    return prog[:max_len]


def _counter() -> Callable[[], int]:
    state = [0]

    def nxt() -> int:
        state[0] += 1
        return state[0]

    return nxt


def tweak(r: random.Random, op: Op) -> Op:
    """The same fault with one parameter redrawn from its action's vocabulary (a corpus
    program that reached a check with ``extra=4096`` tries ``extra=1`` next)."""
    if op.kind != "fault":
        return op
    action = op.args.get("action")
    draw = (
        _data
        if action in ("drop", "corrupt", "truncate", "duplicate", "pad")
        else _features
        if action in FEATURE_ACTIONS
        else _ring
    )
    for _ in range(50):
        spec = draw(r)
        if spec.get("action") == action:
            # Parameters first (their boundary values), the trigger keys less often.
            keys = [k for k in spec if k not in ("action", "nth", "every", "limit")]
            if not keys or r.random() < 0.25:
                keys = [k for k in spec if k != "action"]
            if not keys:
                return op
            key = r.choice(keys)
            args = dict(op.args)
            args[key] = spec[key]
            if action == "feature_offer" and key in ("bits", "clear"):
                args.pop("clear" if key == "bits" else "bits", None)  # one change at a time
            if key in ("nth", "every"):  # one trigger key at a time
                args.pop("every" if key == "nth" else "nth", None)
                args["limit"] = spec.get("limit", args.get("limit", 1))
            return Op("fault", args)
    return op


def mutate(
    r: random.Random, prog: Program, next_id: Callable[[], int], max_len: int = 12
) -> Program:
    """One random edit: insert, delete, replace or swap ops, or splice in a fresh program."""
    out = list(prog)
    choice = r.random()
    if choice < 0.2 and len(out) < max_len:
        op = random_fault(r, next_id()) if r.random() < 0.5 else random_traffic(r)
        out.insert(r.randint(0, len(out)), op)
    elif choice < 0.3 and len(out) > 1:
        del out[r.randrange(len(out))]
    elif choice < 0.6 and any(op.kind == "fault" for op in out):
        i = r.choice([k for k, op in enumerate(out) if op.kind == "fault"])
        out[i] = tweak(r, out[i])
    elif choice < 0.7 and out:
        i = r.randrange(len(out))
        out[i] = random_fault(r, next_id()) if out[i].is_fault else random_traffic(r)
    elif choice < 0.85 and len(out) > 1:
        i, j = r.randrange(len(out)), r.randrange(len(out))
        out[i], out[j] = out[j], out[i]
    else:
        out = (out + generate(r, next_id=next_id))[:max_len]
    if not any(op.is_fault for op in out):
        out.insert(0, random_fault(r, next_id()))
    return out


# -- scenario TOML ---------------------------------------------------------------------


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # a TOML basic string is a JSON string for these values
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(f"no TOML form for {v!r}")


def signature_regex(signature: str) -> str:
    """A regex matching console lines with this normalized signature (N: any number)."""
    parts = signature.split("N")
    return r"\d+".join(re.escape(p) for p in parts)


def to_scenario(
    prog: Program,
    *,
    name: str,
    signature: str | None = None,
    description: str = "",
    comment: str = "",
    epilogue: str = "reset",
    prologue: str | None = None,
) -> str:
    """The program as a scenario TOML: steps in order (``after = 0``), then the epilogue
    every fuzz execution ends with; a finding's signature becomes ``[liveness] expect =
    "breaks"`` with the console line, so the replay's verdict is "it broke the same way"."""
    lines = [f"# {ln}" if ln else "#" for ln in comment.splitlines()]
    lines += [
        "[scenario]",
        f"name = {_toml_value(name)}",
        f"description = {_toml_value(description or 'vdev fuzz-driver program')}",
        "seed = 1",
        "timeout = 120.0",
        "",
    ]
    if prologue is not None:
        # What the target does once before its executions (Linux: a quiet guest).
        lines += ["[[step]]", "after = 0", 'do = "guest"', f"command = {_toml_value(prologue)}", ""]
    for op in prog:
        lines.append("[[step]]")
        lines.append("after = 0")
        if op.kind == "fault":
            # optional: a rule that never fires does not fail the replay's verdict (the
            # verdict is the console line alone).
            spec = {**op.args, "optional": True}
            lines.append('do = "add"')
            lines.append(f"rule = {_toml_value(spec)}")
        elif op.kind == "link":
            lines.append(f'do = "{"link_up" if op.args.get("up") else "link_down"}"')
        elif op.kind == "guest":
            lines.append('do = "guest"')
            lines.append(f"command = {_toml_value(op.args['command'])}")
        elif op.kind == "send":
            lines.append('do = "send"')
            lines.append(f"count = {op.args['count']}")
            lines.append(f"size = {op.args['size']}")
        else:
            lines.append('do = "clear"')
        lines.append("")
    # The epilogue (fuzz_target.EPILOGUE): faults off, link up, the driver re-initialized.
    lines += ["[[step]]", "after = 0", 'do = "clear"', ""]
    lines += ["[[step]]", "after = 0", 'do = "link_up"', ""]
    lines += ["[[step]]", "after = 0", 'do = "guest"', f"command = {_toml_value(epilogue)}", ""]
    if signature is not None:
        lines += [
            "[liveness]",
            'expect = "breaks"',
            "within = 2.0",
            f"console = {_toml_value(signature_regex(signature))}",
        ]
    else:
        lines += ["[liveness]", 'expect = "none"']
    return "\n".join(lines) + "\n"


def from_scenario(text: str, epilogue: str = "reset", prologue: str | None = None) -> Program:
    """A program back from ``to_scenario``'s TOML (the prologue and epilogue dropped)."""
    import tomllib

    data = tomllib.loads(text)
    prog: Program = []
    for step in data.get("step", []):
        do = step.get("do")
        if do == "add":
            prog.append(Op("fault", {k: v for k, v in step["rule"].items() if k != "optional"}))
        elif do in ("link_down", "link_up"):
            prog.append(Op("link", {"up": do == "link_up"}))
        elif do == "guest":
            prog.append(Op("guest", {"command": step["command"]}))
        elif do == "send":
            prog.append(Op("send", {"count": step["count"], "size": step["size"]}))
        elif do == "clear":
            prog.append(Op("clear"))
    # Drop the epilogue: clear, link_up, guest reset at the end.
    tail = [Op("clear"), Op("link", {"up": True}), Op("guest", {"command": epilogue})]
    if prog[-3:] == tail:
        prog = prog[:-3]
    if prologue is not None and prog[:1] == [Op("guest", {"command": prologue})]:
        prog = prog[1:]
    return prog


__all__ = [
    "EPILOGUE",
    "FAULT_KINDS",
    "FEATURE_ACTIONS",
    "OP_KINDS",
    "Op",
    "Program",
    "fault_steps",
    "from_scenario",
    "generate",
    "mutate",
    "random_fault",
    "random_traffic",
    "signature_regex",
    "to_scenario",
    "traffic_for",
    "tweak",
]
