"""``vdev ctl`` (talk to a running device's fault control socket) and ``vdev scenario check``.

``vdev ctl`` is a thin client of the JSON-lines protocol in ``vdev.faults.control``: each
subcommand builds one request, prints the reply (a table for ``list``, JSON otherwise or
with ``--json``) and exits 0 when the device said ok, 1 when it refused the request (the
error names the problem), 2 when the socket cannot be reached.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from typing import Any

from host.cli_args import Parser, add_control_option, input_file, int_range, seconds

DEFAULT_SOCKET_ENV = "VDEV_CTL_SOCKET"


def register(subparsers: Any) -> None:
    _register_ctl(subparsers)
    _register_scenario(subparsers)


def _register_ctl(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "ctl",
        help="control fault injection on a running device",
        description=(
            "Send one request to a running device's fault control socket (a "
            "vdev.faults.control.ControlServer, see docs/faults.md). Rules use the same "
            "keys as the Python API and scenario files, given as KEY=VALUE (VALUE parsed "
            "as JSON when it is valid JSON, else taken as a string)."
        ),
    )
    _common_options(p, default_socket=os.environ.get(DEFAULT_SOCKET_ENV), timeout=5.0)
    # The same options after the request (`vdev ctl list -s PATH --json`): SUPPRESS keeps
    # a value given before the request unless it is given again after it.
    common = Parser(add_help=False)
    _common_options(common, default_socket=argparse.SUPPRESS, timeout=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="ctl_command", metavar="REQUEST", required=True)
    sub.add_parser("ping", parents=[common], help="check the device answers")
    sub.add_parser("list", parents=[common], help="list rules and device faults with hit counts")
    sub.add_parser("stats", parents=[common], help="device and fault statistics")
    r = sub.add_parser("rings", parents=[common], help="dump virtqueue state")
    r.add_argument("--nic", help="NIC index or name (default: all)")
    e = sub.add_parser("events", parents=[common], help="fault events (JSON lines)")
    e.add_argument("--since", type=int_range(0), default=0, help="only events after this seq")
    e.add_argument("--limit", type=int_range(1), default=1000, help="events per request")
    e.add_argument("-f", "--follow", action="store_true", help="keep polling for new events")
    a = sub.add_parser(
        "add",
        parents=[common],
        help="add a rule: vdev ctl add action=drop queue=rx p=0.1",
        description="Add a rule. Example: vdev ctl add nic=0 action=corrupt every=10 flips=2",
    )
    a.add_argument("fields", nargs="*", metavar="KEY=VALUE")
    a.add_argument("--rule", metavar="JSON", help="the whole rule as a JSON object")
    rm = sub.add_parser("remove", parents=[common], help="remove a rule or device fault by id")
    rm.add_argument("id")
    sub.add_parser("clear", parents=[common], help="remove every rule and device fault")
    lk = sub.add_parser("link", parents=[common], help="carrier up/down (device side)")
    lk.add_argument("state", choices=["up", "down"])
    lk.add_argument("--nic", default="0")
    po = sub.add_parser(
        "pool", parents=[common], help="shrink the pbufpool to N free packets (remove ID undoes)"
    )
    po.add_argument("packets", type=int_range(0), help="free packets to leave in the pool")
    po.add_argument("--id", help="id of the fault (default d<N>)")
    cr = sub.add_parser(
        "crash",
        parents=[common],
        help="drop a NIC's vhost-user connection abruptly, or arm a crash point",
        description=(
            "Without options: drop the connection now. With --after-frames/--in-flight/"
            "--mode: arm a crash point that fires from the TX data path (docs/faults.md): "
            "after N chains, at the first batch holding K taken and unpublished (0: at the "
            "end of the batch); mode exit SIGKILLs the device process, drop drops the "
            "connection. Example: vdev ctl crash --after-frames 1000 --in-flight 4"
        ),
    )
    cr.add_argument("--nic", default="0")
    cr.add_argument("--after-frames", type=int_range(0), metavar="N")
    cr.add_argument("--in-flight", type=int_range(0), metavar="K")
    cr.add_argument("--mode", choices=["exit", "drop"])
    gen = sub.add_parser(
        "generate",
        parents=[common],
        help="device-generated RX traffic: numbered frames into a guest's RX buffers",
        description=(
            "Make the NIC itself send to its guest: numbered frames of --size bytes, as fast "
            "as the driver posts RX buffers, --count of them (default: until `vdev ctl "
            "generate --stop`). Example: vdev ctl generate --nic 0 --size 64 --count 1000000"
        ),
    )
    gen.add_argument("--nic", default="0")
    gen.add_argument("--size", type=int, metavar="BYTES")
    gen.add_argument("--count", type=int_range(0), metavar="N")
    gen.add_argument("--stop", action="store_true", help="stop it; prints the frames sent")
    raw = sub.add_parser("raw", parents=[common], help="send a raw JSON request")
    raw.add_argument("request", metavar="JSON")
    p.set_defaults(func=run_ctl)


def _common_options(p: argparse.ArgumentParser, *, default_socket: Any, timeout: Any) -> None:
    add_control_option(
        p,
        short=True,
        default=default_socket,
        aliases=("--socket",),
        create=False,
        help=f"the device's control socket (default ${DEFAULT_SOCKET_ENV})",
    )
    p.add_argument(
        "--json",
        action="store_true",
        default=argparse.SUPPRESS if default_socket is argparse.SUPPRESS else False,
        help="print raw JSON replies",
    )
    p.add_argument(
        "--timeout",
        type=seconds(positive=True),
        default=timeout,
        help="reply timeout in seconds (default 5)",
    )


def _register_scenario(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "scenario",
        help="fault scenario files",
        description="Tools for TOML fault scenarios (see docs/faults.md).",
    )
    sub = p.add_subparsers(dest="scenario_command", metavar="ACTION", required=True)
    c = sub.add_parser(
        "check",
        help="validate scenario files",
        description="Parse and validate scenario files; errors name the file, line and key.",
    )
    c.add_argument("files", nargs="+", metavar="FILE", type=input_file)
    c.add_argument("-q", "--quiet", action="store_true", help="print errors only")
    c.set_defaults(func=run_scenario_check)


def _value(text: str) -> Any:
    """KEY=VALUE values: JSON when valid (numbers, true, lists, objects), else a string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _nic(text: str) -> int | str:
    return int(text) if text.isdigit() else text


def build_request(args: argparse.Namespace) -> dict[str, Any]:
    cmd = args.ctl_command
    if cmd in ("ping", "list", "stats", "clear"):
        return {"cmd": cmd}
    if cmd == "rings":
        return {"cmd": "rings"} | ({"nic": _nic(args.nic)} if args.nic is not None else {})
    if cmd == "events":
        return {"cmd": "events", "since": args.since, "limit": args.limit}
    if cmd == "add":
        rule: dict[str, Any] = {}
        if args.rule:
            parsed = _value(args.rule)
            if not isinstance(parsed, dict):
                raise ValueError("--rule: not a JSON object")
            rule.update(parsed)
        for field in args.fields:
            key, sep, val = field.partition("=")
            if not sep or not key:
                raise ValueError(f"{field!r}: expected KEY=VALUE")
            rule[key] = _value(val)
        return {"cmd": "add", "rule": rule}
    if cmd == "remove":
        return {"cmd": "remove", "id": args.id}
    if cmd == "link":
        return {"cmd": "link", "nic": _nic(args.nic), "up": args.state == "up"}
    if cmd == "pool":
        return {"cmd": "pool", "packets": args.packets} | ({"id": args.id} if args.id else {})
    if cmd == "crash":
        req = {"cmd": "crash", "nic": _nic(args.nic)}
        for key in ("after_frames", "in_flight", "mode"):
            if getattr(args, key) is not None:
                req[key] = getattr(args, key)
        return req
    if cmd == "generate":
        req = {"cmd": "generate", "nic": _nic(args.nic)}
        if args.stop:
            return req | {"stop": True}
        for key in ("size", "count"):
            if getattr(args, key) is not None:
                req[key] = getattr(args, key)
        return req
    req = _value(args.request)
    if not isinstance(req, dict):
        raise ValueError("raw: request must be a JSON object")
    return req


def format_rules(reply: dict[str, Any]) -> str:
    lines = [f"{'id':10} {'nic':6} {'action':16} {'queue':6} {'hits':>7} {'seen':>7}  match/params"]
    for r in reply.get("rules", []):
        extra = {**r.get("match", {}), **r.get("params", {})}
        if r.get("limit") is not None:
            extra["limit"] = r["limit"]
        desc = " ".join(f"{k}={json.dumps(v)}" for k, v in extra.items())
        lines.append(
            f"{r['id']:10} {r.get('nic')!s:6} {r['action']:16} {r.get('queue', ''):6} "
            f"{r['hits']:>7} {r.get('seen', 0):>7}  {desc}"
        )
    for d in reply.get("device_faults", []):
        desc = " ".join(f"{k}={v}" for k, v in d.items() if k not in ("id", "action", "kind"))
        lines.append(
            f"{d['id']:10} {'-':6} {d['action']:16} {'-':6} {d['hits']:>7} {'':>7}  {desc}"
        )
    return "\n".join(lines)


def run_ctl(args: argparse.Namespace) -> int:
    from vdev.faults.control import request

    if not args.control:
        print(f"vdev ctl: no socket: give --control or set ${DEFAULT_SOCKET_ENV}", file=sys.stderr)
        return 2
    try:
        req = build_request(args)
    except ValueError as exc:
        print(f"vdev ctl: {exc}", file=sys.stderr)
        return 2
    try:
        reply = request(args.control, req, timeout=args.timeout)
    except (OSError, ValueError) as exc:
        print(f"vdev ctl: --control {args.control}: {_why(exc)}", file=sys.stderr)
        return 2
    if not reply.get("ok"):
        print(f"vdev ctl: {reply.get('error', 'request failed')}", file=sys.stderr)
        return 1
    if args.ctl_command == "events":
        return _print_events(args, reply)
    if args.ctl_command == "list" and not args.json:
        print(format_rules(reply))
    else:
        print(json.dumps(reply, indent=None if args.json else 2))
    return 0


def _why(exc: BaseException) -> str:
    """An OSError as its message alone (no ``[Errno N]``), anything else as its text."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    if isinstance(exc, TimeoutError | socket.timeout):
        return "no reply (timed out)"
    return str(exc) or type(exc).__name__


def _print_events(args: argparse.Namespace, reply: dict[str, Any]) -> int:
    from vdev.faults.control import request

    since = args.since
    while True:
        for ev in reply.get("events", []):
            print(json.dumps(ev, sort_keys=True), flush=True)
            since = max(since, int(ev.get("seq", since)))
        if not args.follow:
            return 0
        time.sleep(0.5)
        try:
            reply = request(
                args.control,
                {"cmd": "events", "since": since, "limit": args.limit},
                timeout=args.timeout,
            )
        except (OSError, ValueError) as exc:
            print(f"vdev ctl: --control {args.control}: {_why(exc)}", file=sys.stderr)
            return 2


def run_scenario_check(args: argparse.Namespace) -> int:
    from vdev.faults.scenario import ScenarioError, load_scenario, summary

    status = 0
    for path in args.files:
        try:
            sc = load_scenario(path)
        except ScenarioError as exc:
            print(f"vdev scenario check: {exc}", file=sys.stderr)
            status = 1
            continue
        if not args.quiet:
            print(summary(sc))
    return status
