"""vdev fuzz-driver's Linux target: the known breakage of Debian's virtio_net, and not more.

A bogus used id on TX makes virtio_ring print ``output.N:id N out of range`` and mark the
queue broken (benchmarks/fuzz-findings-linux); the same traffic without the fault gives no
signature and keeps the liveness ping answering, on the same reused guest.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from host.fuzz_linux import LinuxTarget, linux_program
from host.fuzz_program import Op

pytestmark = [pytest.mark.qemu, pytest.mark.slow]


@pytest.fixture(scope="module")
def target(linux_image: object) -> Iterator[LinuxTarget]:
    with LinuxTarget() as t:
        yield t


def test_bogus_tx_used_id_breaks_linux_and_clean_traffic_does_not(target: LinuxTarget) -> None:
    clean = [Op("guest", {"command": "tx 4 60"}), Op("send", {"count": 2, "size": 60})]
    res = target.run(clean)
    assert res.signature is None, res.line
    assert res.coverage  # the device saw the traffic (counters moved)
    spec = {"id": "f1", "seed": 1, "action": "bad_used_id", "queue": "tx"}
    spec.update({"mode": "out_of_range", "nth": 2, "limit": 1})
    bad = [Op("fault", spec), Op("guest", {"command": "tx 8 60"})]
    res = target.run(bad)
    assert res.signature == "virtio_net virtioN: output.N:id N out of range", res.lines[-5:]
    # The next execution starts from a working guest again (rebind or reboot).
    assert target.run(clean).signature is None


def test_linux_program_translates_the_bare_vocabulary() -> None:
    bare = [Op("guest", {"command": "tx 32 60 32 wait=60"}), Op("guest", {"command": "reset"})]
    prog = linux_program([*bare, Op("clear")])
    cmds = [op.args.get("command", "") for op in prog]
    assert cmds[0].startswith("ping -c 8 ")  # bounded to 8 pings
    assert "virtio_net/unbind" in cmds[1] and "virtio_net/bind" in cmds[1]
    assert prog[2] == Op("clear")
    assert linux_program(prog) == prog  # idempotent
