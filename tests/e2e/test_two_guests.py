"""Two Linux guests on one device process ping each other through the switch."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from vdev.net.device import Device

pytestmark = [pytest.mark.qemu, pytest.mark.slow]


@pytest.fixture(scope="module")
def guests(
    linux_image: object, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Device, list[object]]]:
    from host.machine import Machine, Nic

    d = tmp_path_factory.mktemp("two-guests")
    device = Device()
    machines: list[Machine] = []
    try:
        for i in range(2):
            device.add_nic(str(d / f"nic{i}.sock"), mac=f"52:54:00:12:34:{0x56 + i:02x}")
        device.start()
        for i, ip in enumerate(("10.0.2.15", "10.0.2.16")):
            mac = f"52:54:00:12:34:{0x56 + i:02x}"
            m = Machine.linux(
                linux_image,  # type: ignore[arg-type]
                nics=[Nic.vhost_user(d / f"nic{i}.sock", mac=mac)],
                kernel_args=f"vdev.ip={ip}/24 vdev.gw=10.0.2.2",
                name=f"guest{i}",
            )
            m.launch(wait=False)  # boot both at once
            machines.append(m)
        for m in machines:
            m.wait_ready()
        yield device, list(machines)
    finally:
        for m in machines:
            m.shutdown()
        device.close()


def test_guests_ping_each_other(guests: tuple[Device, list[object]]) -> None:
    device, (a, b) = guests
    out, status = a.run("ping -c 5 -i 0.2 -W 2 10.0.2.16", timeout=30)  # type: ignore[attr-defined]
    assert status == 0 and "5 packets received, 0% packet loss" in out, out
    out, status = b.run("ping -c 5 -i 0.2 -W 2 10.0.2.15", timeout=30)  # type: ignore[attr-defined]
    assert status == 0 and "5 packets received, 0% packet loss" in out, out
    # Both MACs were learned on their own NIC port, and the switch saw the traffic.
    fdb = device.switch.fdb
    assert fdb[bytes.fromhex("525400123456")] == "nic0"
    assert fdb[bytes.fromhex("525400123457")] == "nic1"
    assert device.switch.stats["nic0"].rx_frames >= 10
    assert device.switch.stats["nic1"].rx_frames >= 10


def test_udp_between_guests_exact(guests: tuple[Device, list[object]]) -> None:
    _device, (a, b) = guests
    b.console.sendline("vdev-sink --udp 6000 --count 300 --timeout-ms 15000")  # type: ignore[attr-defined]
    b.console.expect("sink ready", timeout=10)  # type: ignore[attr-defined]
    out, status = a.run("vdev-pktgen --udp 10.0.2.16:6000 --count 300 --size 512", timeout=60)  # type: ignore[attr-defined]
    assert status == 0, out
    m = b.console.expect(r"sink rx_packets=(\d+)", timeout=30)  # type: ignore[attr-defined]
    assert int(m.group(1)) == 300
