"""Device faults whose id is refused must leave no trace (found by fuzz/t_control.py).

``pool`` with an id already in use allocated the packets it would hold, then refused the id:
the packets were held by nobody, the pool shrunk for good (a leak the fuzzer's pool check
caught).  ``link_down`` with a taken id dropped the link first, then refused: the carrier
stayed down with no fault to remove.  Each is checked through the public path and against
the other side (a fresh id is accepted and undone).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from faults_helpers import device_with_nic

from vdev.faults.control import ControlServer
from vdev.faults.engine import FaultEngine
from vdev.faults.rules import SpecError


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[Any, ControlServer]]:
    dev = device_with_nic(str(tmp_path))
    srv = ControlServer(dev, str(tmp_path / "ctl.sock"))
    yield dev, srv
    srv.close()
    dev.close()


def test_pool_fault_with_a_taken_id_holds_nothing(server: tuple[Any, ControlServer]) -> None:
    dev, srv = server
    assert srv.handle({"cmd": "pool", "packets": 11, "id": "p"})["ok"]
    held = dev.pool.stats.in_use
    assert held == dev.pool.num_packets - 11
    reply = srv.handle({"cmd": "pool", "packets": 10, "id": "p"})
    assert reply == {"ok": False, "error": "id: 'p' is already in use"}
    assert dev.pool.stats.in_use == held  # the refused request took nothing
    assert srv.handle({"cmd": "clear"}) == {"ok": True, "removed": 1}
    assert dev.pool.stats.in_use == 0
    # The other side: a fresh id shrinks the pool, and clearing gives it all back.
    assert srv.handle({"cmd": "pool", "packets": 10, "id": "q"})["ok"]
    assert dev.pool.stats.in_use == dev.pool.num_packets - 10
    srv.handle({"cmd": "clear"})
    assert dev.pool.stats.in_use == 0


def test_pool_fault_id_taken_by_a_rule_holds_nothing(server: tuple[Any, ControlServer]) -> None:
    dev, srv = server
    assert srv.handle({"cmd": "add", "rule": {"action": "drop", "id": "x"}})["ok"]
    reply = srv.handle({"cmd": "pool", "packets": 0, "id": "x"})
    assert not reply["ok"] and "already in use" in reply["error"]
    assert dev.pool.stats.in_use == 0


def test_link_down_with_a_taken_id_keeps_the_link(tmp_path: Path) -> None:
    dev = device_with_nic(str(tmp_path))
    try:
        engine = FaultEngine.for_device(dev)
        nic = dev.nics[0]
        engine.nic(0).drop(id="x")
        with pytest.raises(SpecError, match="'x' is already in use"):
            engine.nic(0).link_down(fault_id="x")
        assert nic.link_up and "x" not in engine.device_faults
        fault = engine.nic(0).link_down(fault_id="y")  # the other side: a free id works
        assert not nic.link_up and engine.device_faults["y"] is fault
        fault.remove()
        assert nic.link_up
        engine.close()
    finally:
        dev.close()
