"""Control socket: JSON round trips through a running Device loop, malformed requests."""

from __future__ import annotations

import argparse
import json
import os
import socket
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from faults_helpers import device_with_nic, push_tx, udp_frame

from host import cli_ctl
from vdev.faults import FaultEngine
from vdev.faults.control import ControlServer, request
from vdev.faults.events import EVENT_LOG_KEEP


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Any, str]]:
    dev = device_with_nic(str(tmp_path))
    path = str(tmp_path / "ctl.sock")
    srv = ControlServer(dev, path)
    dev.start()
    yield dev, path
    srv.close()
    dev.close()
    assert not os.path.exists(path)


def test_socket_is_private(served: tuple[Any, str]) -> None:
    _, path = served
    mode = os.stat(path).st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600


def test_round_trips(served: tuple[Any, str]) -> None:
    dev, path = served
    assert request(path, {"cmd": "ping", "seq": 7}) == {"ok": True, "pong": True, "seq": 7}
    reply = request(path, {"cmd": "add", "rule": {"action": "drop", "every": 2, "id": "half"}})
    assert reply["ok"] and reply["rule"]["id"] == "half" and reply["rule"]["hits"] == 0
    push_tx(dev, [udp_frame(dport=i) for i in range(10)])
    (rule,) = request(path, {"cmd": "list"})["rules"]
    assert (rule["id"], rule["action"], rule["hits"], rule["seen"]) == ("half", "drop", 5, 10)
    assert rule["match"] == {"every": 2}
    stats = request(path, {"cmd": "stats"})
    assert stats["faults"]["events"]["drop"] == 5
    assert stats["device"]["nics"][0]["queues"]["tx0"]["drop_reasons"] == {"fault": 5}
    events = request(path, {"cmd": "events", "since": 2, "limit": 2})["events"]
    assert [e["seq"] for e in events] == [3, 4] and events[0]["kind"] == "drop"
    assert request(path, {"cmd": "remove", "id": "half"}) == {"ok": True, "removed": "half"}
    assert request(path, {"cmd": "list"})["rules"] == []


def test_device_level_commands(served: tuple[Any, str]) -> None:
    dev, path = served
    reply = request(path, {"cmd": "link", "nic": 0, "up": False})
    assert reply["ok"] and dev.nics[0].link_up is False
    assert request(path, {"cmd": "link", "nic": "nic0", "up": True})["link_up"] is True
    assert dev.nics[0].link_up is True
    reply = request(path, {"cmd": "pool", "packets": 4, "id": "tight"})
    assert reply["fault"]["id"] == "tight"
    assert dev.pool.num_packets - dev.pool.stats.in_use == 4
    assert request(path, {"cmd": "remove", "id": "tight"})["ok"]
    assert dev.pool.stats.in_use == 0
    rings = request(path, {"cmd": "rings"})["nics"]
    assert rings[0]["nic"] == "nic0" and rings[0]["vrings"] == []
    assert request(path, {"cmd": "crash", "nic": 0})["ok"]


@pytest.mark.parametrize(
    ("line", "error"),
    [
        (b"this is not json", "not valid JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (b"{}", "cmd: missing"),
        (b'{"cmd": "format_disk"}', "unknown command 'format_disk'"),
        (b'{"cmd": "list", "verbose": 1}', "verbose: unknown field"),
        (b'{"cmd": "add"}', "rule: missing"),
        (b'{"cmd": "add", "rule": {"action": "__import__"}}', "unknown action '__import__'"),
        (b'{"cmd": "add", "rule": {"action": "drop", "p": 2}}', "p: 2"),
        (b'{"cmd": "add", "rule": {"action": "drop", "nic": 5}}', "nic: no NIC 5"),
        (b'{"cmd": "remove", "id": "nope"}', "no rule or device fault 'nope'"),
        (b'{"cmd": "events", "since": "x"}', "since: 'x' is not an integer"),
        (b'{"cmd": "link", "up": "yes"}', "up: 'yes' must be true or false"),
        (b'{"cmd": "ping", "seq": [1]}', "seq: [1]"),
        (b"\xff\xfe", "not valid JSON"),
    ],
)
def test_malformed_requests(served: tuple[Any, str], line: bytes, error: str) -> None:
    _, path = served
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(path)
        s.sendall(line + b"\n")
        reply = json.loads(s.makefile("rb").readline())
    assert reply["ok"] is False
    assert error in reply["error"], reply["error"]


def test_pipelined_requests_and_oversized(served: tuple[Any, str]) -> None:
    _, path = served
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(path)
        s.sendall(b'{"cmd": "ping", "seq": 1}\n{"cmd": "ping", "seq": 2}\n')
        f = s.makefile("rb")
        assert [json.loads(f.readline())["seq"] for _ in range(2)] == [1, 2]
        s.sendall(b"x" * (70 * 1024))
        reply = json.loads(f.readline())
        assert not reply["ok"] and "longer than" in reply["error"]
        assert f.readline() == b""  # and the server hung up
    assert request(path, {"cmd": "ping"})["ok"]  # still serving others


def ctl(path: str, *argv: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser(prog="vdev")
    cli_ctl.register(parser.add_subparsers())
    args = parser.parse_args(["ctl", "--socket", path, *argv])
    rc = int(args.func(args))
    out, err = capsys.readouterr()
    return rc, out, err


def test_vdev_ctl_client(served: tuple[Any, str], capsys: pytest.CaptureFixture[str]) -> None:
    dev, path = served
    rc, out, _ = ctl(path, "add", "action=corrupt", "every=3", "flips=2", "id=c", capsys=capsys)
    assert rc == 0 and json.loads(out)["rule"]["params"] == {"flips": 2, "skip": 0}
    push_tx(dev, [udp_frame()] * 6)
    rc, out, _ = ctl(path, "list", capsys=capsys)
    assert rc == 0 and out.splitlines()[1].split()[:5] == ["c", "nic0", "corrupt", "both", "2"]
    rc, out, _ = ctl(path, "events", "--since", "1", capsys=capsys)
    assert [json.loads(x)["kind"] for x in out.splitlines()] == ["corrupt", "corrupt"]
    rc, _, err = ctl(path, "add", "action=drop", "p=7", capsys=capsys)
    assert rc == 1 and "p: 7" in err
    rc, _, err = ctl(path, "remove", "zzz", capsys=capsys)
    assert rc == 1 and "zzz" in err
    rc, out, _ = ctl(path, "--json", "raw", '{"cmd": "ping"}', capsys=capsys)
    assert rc == 0 and json.loads(out) == {"ok": True, "pong": True}
    rc, _, err = ctl(path + ".missing", "ping", capsys=capsys)
    assert rc == 2


def test_large_reply_is_buffered_not_blocking(served: tuple[Any, str]) -> None:
    dev, path = served
    engine = FaultEngine.for_device(dev)
    pad = "x" * 400  # the log keeps EVENT_LOG_KEEP events: big ones make the reply big
    with dev.lock:
        for i in range(EVENT_LOG_KEEP + 10):
            engine.log.emit("drop", rule="bulk", nic="nic0", queue=1, n=i, pad=pad)
    reply = request(path, {"cmd": "events", "limit": 20000}, timeout=10)
    # ~2 MB: sent in pieces as the client reads; the ring holds the newest events only.
    assert len(reply["events"]) == EVENT_LOG_KEEP
    assert reply["events"][0]["detail"]["n"] == 10
    assert request(path, {"cmd": "ping"})["ok"]


def test_crash_point_over_the_socket_and_ctl(
    served: tuple[Any, str], capsys: pytest.CaptureFixture[str]
) -> None:
    """``vdev ctl crash --after-frames N --in-flight K --mode drop`` arms a crash point on the
    NIC's data path (it fires later); a bad value is refused by name and arms nothing."""
    dev, path = served
    rc, out, _ = ctl(
        path, "--json", "crash", "--after-frames", "7", "--in-flight", "0", "--mode", "drop",
        capsys=capsys,
    )  # fmt: skip
    assert rc == 0 and json.loads(out)["armed"] == {
        "after_frames": 7, "in_flight": 0, "mode": "drop",
    }  # fmt: skip
    assert dev.nics[0].take_hook is not None
    kinds = [e["kind"] for e in request(path, {"cmd": "events"})["events"]]
    assert kinds == ["crash_armed"]  # armed, not fired: no frame was taken yet
    reply = request(path, {"cmd": "crash", "nic": 0, "mode": "boom"})
    assert not reply["ok"] and "mode: 'boom' must be one of exit, drop" in reply["error"]
    reply = request(path, {"cmd": "crash", "nic": 0, "in_flight": -1})
    assert not reply["ok"] and "in_flight: -1 must be an integer >= 0" in reply["error"]
