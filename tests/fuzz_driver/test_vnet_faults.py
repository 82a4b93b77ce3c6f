"""The fault actions added for the fuzzer, judged by the bare driver's own counters.

``bad_vnet_hdr`` rewrites the RX vnet header in the guest buffer before the used element is
published; ``bad_used_len mode=header`` reports a frame of the header alone.  The oracle is
the driver (guest/driver/net.c): it counts ``num_buffers`` it cannot accept
(viol_num_buffers), GSO frames (rx_gso), partial checksums (rx_csum_partial) and reports
the received frame lengths (``rx`` min/max).  Each test also checks the other side: the
same traffic without the rule moves none of those counters.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest

from host.fuzz_target import BareTarget
from vdev.faults import FaultEngine, build_rule

pytestmark = [pytest.mark.qemu]


@pytest.fixture(scope="module")
def target() -> Iterator[BareTarget]:
    for tool in ("gcc", "ld", "qemu-system-x86_64"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not installed")
    with BareTarget(variant="default") as t:
        yield t


def _stats(t: BareTarget) -> dict[str, int]:
    assert t.sb is not None
    return t.sb.stats()


def _rx(t: BareTarget, spec: dict[str, object] | None, n: int = 2, size: int = 300) -> str:
    assert t.sb is not None and t.sb.device is not None and t.peer is not None
    eng = FaultEngine.for_device(t.sb.device)
    if spec is not None:
        eng.nic(0).add(build_rule(spec))
    try:
        t.peer.send_frames(t.mac, n, size)
        return str(t.sb.cmd(f"rx {n} 500", check=False).status_line)
    finally:
        eng.clear()
        t.sb.cmd("reset")


@pytest.mark.parametrize(
    ("spec", "counter"),
    [
        ({"mode": "num_buffers", "value": 64}, "viol_num_buffers"),
        ({"mode": "num_buffers", "value": 0}, "viol_num_buffers"),
        ({"mode": "gso"}, "rx_gso"),
        ({"mode": "csum_beyond", "value": 16}, "rx_csum_partial"),
    ],
    ids=["num_buffers-64", "num_buffers-0", "gso", "csum_beyond"],
)
def test_bad_vnet_hdr_reaches_the_driver(
    target: BareTarget, spec: dict[str, object], counter: str
) -> None:
    s0 = _stats(target)
    _rx(target, None)
    assert _stats(target)[counter] == s0[counter]  # without the rule: untouched
    _rx(target, {"action": "bad_vnet_hdr", "queue": "rx", "nth": 1, "limit": 1, **spec})
    assert _stats(target)[counter] == s0[counter] + 1


def test_num_buffers_within_the_chain_is_accepted(target: BareTarget) -> None:
    """num_buffers = 1 is what the device wrote anyway: no violation (the boundary)."""
    s0 = _stats(target)
    spec = {"action": "bad_vnet_hdr", "queue": "rx", "mode": "num_buffers", "value": 1}
    status = _rx(target, {**spec, "nth": 1, "limit": 1})
    assert status.startswith("OK rx received=2")
    assert _stats(target)["viol_num_buffers"] == s0["viol_num_buffers"]


def test_header_only_length_is_a_zero_length_frame(target: BareTarget) -> None:
    status = _rx(target, {"action": "bad_used_len", "queue": "rx", "mode": "header",
                          "nth": 1, "limit": 1}, n=2, size=300)  # fmt: skip
    assert "received=2" in status and " min=0 " in status and " max=300" in status
    status = _rx(target, None, n=2, size=300)
    assert " min=300 max=300" in status
