"""The bare-metal virtio-net driver against QEMU's own virtio-net (UDP socket backend).

Covers TX counted exactly on the host (sizes, sequence, bursts wrapping the ring), RX of
small/large/merged frames, EVENT_IDX and MRG_RXBUF on and off, PCI legacy and modern on pc
and q35, virtio-mmio on microvm, reset mid-traffic, device-violation recovery, and the
console protocol itself.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from host.bare_console import (
    BareGuest,
    Machine,
    UdpLink,
    bare_guest_with_udp,
    check_pattern_frame,
    pattern_frame,
)

from .conftest import BootFn

pytestmark = [pytest.mark.qemu, pytest.mark.slow]

STATS_KEYS = {
    "tx_packets",
    "tx_bytes",
    "tx_completions",
    "tx_syncs",
    "tx_kicks",
    "rx_packets",
    "rx_bytes",
    "rx_buffers",
    "rx_syncs",
    "rx_kicks",
    "resets",
    "recoveries",
    "viol_used_id_range",
    "viol_used_id_not_outstanding",
    "viol_used_len",
    "viol_double_completion",
    "viol_used_idx_jump",
    "viol_num_buffers",
    "violations",
    "pool_packets_in_use",
    "alloc_syncs",
    "free_syncs",
    "free_bad",
    "alloc_ring_ready",
}
RING = 256  # QEMU's default virtio-net queue size; the channel rings match it


def host_sends(guest: BareGuest, link: UdpLink, sizes: list[int], burst: int) -> None:
    """Start ``rx len(sizes)`` in the guest, send the frames in bursts, check the reply."""
    guest.send_line(f"rx {len(sizes)} 10000")
    time.sleep(0.05)
    for start in range(0, len(sizes), burst):
        # QEMU's UDP socket (rmem_default, 208 KiB: 255 small or 64 full-size datagrams)
        # is the only queue in between and drops when full: send a burst only once QEMU
        # has taken the previous one.
        link.wait_drained()
        for seq in range(start, min(start + burst, len(sizes))):
            link.send(pattern_frame(seq, sizes[seq]))
    reply = guest.wait_reply(timeout=20)
    assert reply.ok, reply.status_line
    assert reply.int("received") == len(sizes)
    assert reply.int("pattern") == len(sizes)
    assert reply.int("bad") == 0
    assert reply.int("bytes") == sum(sizes)
    assert reply.int("min") == min(sizes)
    assert reply.int("max") == max(sizes)


def guest_sends(guest: BareGuest, link: UdpLink, count: int, size: int, batch: int = 32) -> None:
    """``tx`` in the guest; the host must get exactly ``count`` intact frames, in order."""
    reply = guest.cmd(f"tx {count} {size} {batch}")
    assert reply.int("sent") == count
    assert reply.int("bytes") == count * size
    frames = link.recv(count, timeout=3)
    assert len(frames) == count
    assert {len(f) for f in frames} == {size}
    assert [check_pattern_frame(f) for f in frames] == list(range(count))
    assert link.recv(1, timeout=0.05) == []


def test_boot_console_and_stats(boot: BootFn) -> None:
    with boot() as (g, _link):
        # Start-to-prompt includes QEMU start-up, SeaBIOS and the multiboot ROM.
        assert g.start_to_prompt < 5.0
        assert any(line.startswith("OK boot transport=") for line in g.boot_lines)
        stats = g.stats()
        assert STATS_KEYS <= stats.keys()
        assert stats["violations"] == 0
        feats = g.cmd("features")
        assert feats.fields["transport"] == "modern"  # preferred when offered
        assert feats.fields["mac"] == "52:54:00:12:34:56"
        assert g.cmd("help").ok
        bad = g.cmd("frobnicate", check=False)
        assert not bad.ok and bad.verb == "unknown"
        assert not g.cmd("tx 1", check=False).ok
        assert not g.cmd("tx 1 8", check=False).ok  # below an Ethernet header
        assert g.quit(5) == (5 << 1) | 1


@pytest.mark.parametrize("batch", [1, 32, RING - 1])
def test_tx_bursts_wrap_ring(boot: BootFn, batch: int) -> None:
    with boot() as (g, link):
        # 8 full rings' worth: slot and descriptor indices wrap many times.
        guest_sends(g, link, 8 * (RING - 1), 60, batch)
        stats = g.stats()
        assert stats["tx_packets"] == stats["tx_completions"] == 8 * (RING - 1)
        assert stats["pool_packets_in_use"] == stats["alloc_ring_ready"]  # nothing leaked


def test_tx_sizes_and_dst_mac(boot: BootFn) -> None:
    with boot() as (g, link):
        for size in (14, 60, 1514, 9000):  # 9000: a multi-buflet packet, chained descriptors
            reply = g.cmd(f"tx 20 {size} 8")
            frames = link.recv(20, timeout=3)
            assert reply.int("sent") == 20 and [len(f) for f in frames] == [size] * 20
            if size >= 26:
                assert [check_pattern_frame(f) for f in frames] == list(range(20))
        g.cmd("tx 3 64 1 02:11:22:33:44:55")
        frames = link.recv(3, timeout=3)
        assert [f[:6] for f in frames] == [bytes.fromhex("021122334455")] * 3
        assert all(f[6:12] == bytes.fromhex("525400123456") for f in frames)


@pytest.mark.parametrize("mrg", [0, 1])
def test_rx_bursts_small_and_large(boot: BootFn, mrg: int) -> None:
    with boot(append=f"mrg_rxbuf={mrg}") as (g, link):
        assert g.cmd("features").fields["mrg_rxbuf"] == str(mrg)
        host_sends(g, link, [60] * 20, burst=1)
        host_sends(g, link, [60, 1514] * 64, burst=32)
        host_sends(g, link, [60] * 8 * (RING - 1), burst=RING - 1)
        host_sends(g, link, [1514] * 4 * (RING - 1), burst=64)
        stats = g.stats()
        assert stats["rx_buffers"] == stats["rx_packets"]  # 1514 fits one 2 KiB buffer
        assert stats["violations"] == 0


def test_rx_jumbo_needs_mrg_rxbuf(boot: BootFn) -> None:
    with boot(append="mrg_rxbuf=1") as (g, link):
        host_sends(g, link, [9000] * 200 + [4000, 60, 2100], burst=8)
        stats = g.stats()
        # 9000 bytes + header span five 2 KiB buffers, merged into one multi-buflet packet.
        assert stats["rx_buffers"] == 200 * 5 + 2 + 1 + 2
        assert stats["rx_packets"] == 203
        assert stats["pool_buflets_in_use"] == 0


MMIO_V2 = ("-global", "virtio-mmio.force-legacy=false")


@pytest.mark.parametrize(
    ("machine", "transport", "append", "extra", "expect"),
    [
        ("pc", "pci", "legacy", (), "legacy"),
        ("pc", "pci", "modern event_idx=0", (), "modern"),
        ("pc", "pci-modern", "mrg_rxbuf=0", (), "modern"),
        ("q35", "pci", "legacy event_idx=0 mrg_rxbuf=0", (), "legacy"),
        ("q35", "pci-modern", "", (), "modern"),
        ("microvm", "mmio", "", (), "mmio-legacy"),
        ("microvm", "mmio", "event_idx=0 mrg_rxbuf=0", (), "mmio-legacy"),
        ("microvm", "mmio", "mrg_rxbuf=0", MMIO_V2, "mmio"),
    ],
)
def test_transport_matrix(
    boot: BootFn, machine: str, transport: str, append: str, extra: tuple[str, ...], expect: str
) -> None:
    with boot(machine=machine, transport=transport, append=append, extra=extra) as (g, link):
        feats = g.cmd("features")
        assert feats.fields["transport"] == expect
        assert feats.fields["event_idx"] == ("0" if "event_idx=0" in append else "1")
        assert feats.fields["mrg_rxbuf"] == ("0" if "mrg_rxbuf=0" in append else "1")
        assert feats.fields["hdr_len"] == (
            "10" if expect.endswith("legacy") and "mrg_rxbuf=0" in append else "12"
        )
        guest_sends(g, link, 3 * RING, 60, RING - 1)
        host_sends(g, link, [60, 1514, 200] * 100, burst=32)
        # echo: frames come back with MACs swapped (zero-copy RX slot -> TX slot)
        g.send_line("echo 10 5000")
        time.sleep(0.05)
        sent = [pattern_frame(i, 100, dst=bytes.fromhex("525400123456")) for i in range(10)]
        for f in sent:
            link.send(f)
        assert g.wait_reply().int("echoed") == 10
        back = link.recv(10, timeout=3)
        assert back == [f[6:12] + f[:6] + f[12:] for f in sent]
        stats = g.stats()
        assert stats["violations"] == 0
        if "event_idx=0" not in append:
            assert stats["tx_kicks"] < stats["tx_packets"]  # EVENT_IDX suppresses kicks
        assert g.quit(0) == 1


def test_features_command_renegotiates(boot: BootFn) -> None:
    with boot() as (g, link):
        off = g.cmd("features event_idx=0 mrg_rxbuf=0")
        assert (off.fields["event_idx"], off.fields["mrg_rxbuf"]) == ("0", "0")
        guest_sends(g, link, 100, 60)
        host_sends(g, link, [1514] * 50, burst=25)
        on = g.cmd("features event_idx=1 mrg_rxbuf=1")
        assert (on.fields["event_idx"], on.fields["mrg_rxbuf"]) == ("1", "1")
        host_sends(g, link, [9000] * 10, burst=5)
        guest_sends(g, link, 100, 60)
        # A smaller ring (modern lets the driver choose): 63-slot bursts wrap it 10 times.
        small = g.cmd("features qsize=64")
        assert small.fields["rx_qsize"] == small.fields["tx_qsize"] == "64"
        guest_sends(g, link, 630, 60, 63)
        host_sends(g, link, [60] * 630, burst=63)
        assert not g.cmd("features transport=legacy", check=False).ok
        assert not g.cmd("features bogus=1", check=False).ok


def test_reset_mid_traffic(boot: BootFn) -> None:
    with boot() as (g, link):
        stop = threading.Event()

        def blast() -> None:
            seq = 0
            while not stop.is_set():
                link.send(pattern_frame(seq, 300))
                seq += 1
                if seq % 64 == 0:
                    time.sleep(0.002)

        sender = threading.Thread(target=blast, daemon=True)
        sender.start()
        try:
            for _ in range(3):
                g.cmd("rx 50 5000")
                # Frames are in the RX slots, the used ring and QEMU's queue right now.
                assert g.cmd("reset").ok
                g.cmd("tx 40 60 8")
        finally:
            stop.set()
            sender.join(5)
        # Swallow what is still queued; QEMU only reads its socket while the guest takes
        # frames, so drain with an rx running.
        g.send_line("rx 1000000 1000")
        link.wait_drained()
        assert g.wait_reply().verb == "rx"
        g.cmd("reset")
        g.cmd("rx 100000 200", check=False)  # and anything QEMU held across the reset
        link.drain()
        stats = g.stats()
        assert stats["resets"] == 4 and stats["recoveries"] == 0
        assert stats["pool_packets_in_use"] == stats["alloc_ring_ready"]  # nothing leaked
        guest_sends(g, link, 300, 128, 32)
        host_sends(g, link, [128] * 300, burst=32)


@pytest.mark.parametrize(
    ("kind", "counter"),
    [
        ("id_range", "viol_used_id_range"),
        ("not_outstanding", "viol_used_id_not_outstanding"),
        ("len", "viol_used_len"),
        ("double", "viol_double_completion"),
        ("jump", "viol_used_idx_jump"),
        ("num_buffers", "viol_num_buffers"),
    ],
)
def test_device_violation_recovery(boot: BootFn, kind: str, counter: str) -> None:
    with boot(append="legacy" if kind == "len" else "") as (g, link):
        reply = g.cmd(f"inject {kind}")
        assert any(f"violation {counter}" in line for line in reply.lines)
        stats = g.stats()
        assert stats[counter] == 1 and stats["violations"] == 1
        assert stats["recoveries"] == 1 and stats["resets"] == 1
        guest_sends(g, link, 100, 60)
        host_sends(g, link, [60, 1514] * 50, burst=32)


def test_forced_legacy_on_modern_only_device(boot: BootFn) -> None:
    with boot(transport="pci-modern", append="legacy") as (g, _link):
        assert any(line.startswith("ERR no usable virtio-net") for line in g.boot_lines)
        reply = g.cmd("tx 1 60", check=False)
        assert not reply.ok and reply.status_line == "ERR no device"


def test_pvh_entry(bare_elf: Path, tmp_path: Path) -> None:
    """Without the multiboot header QEMU falls back to the PVH note (32-bit ELF entry)."""
    data = bytearray(bare_elf.read_bytes())
    at = data.find((0x1BADB002).to_bytes(4, "little"))
    assert 0 <= at < 8192
    data[at : at + 4] = bytes(4)
    pvh = tmp_path / "pvh.elf"
    pvh.write_bytes(data)
    for machine, transport in (("pc", "pci"), ("microvm", "mmio")):
        with bare_guest_with_udp(
            pvh,
            machine=machine,
            transport=transport,
            append="event_idx=0",  # type: ignore[arg-type]
        ) as (g, link):
            assert g.boot_lines[0] == "vdev-bare: boot=pvh cmdline='event_idx=0'"
            guest_sends(g, link, 10, 60)


def test_alloc_and_free_rings(boot: BootFn) -> None:
    """Packets come from the alloc ring and go back through the free ring, both wrapping."""
    with boot() as (g, _link):
        ok = g.cmd("pool 1000")
        assert ok.int("allocated") == ok.int("freed") == 1000
        assert ok.int("in_use") == ok.int("alloc_ring_ready")
        # 9000-byte packets need 4 external buflets each: the 2048 buflets run out at 512.
        short = g.cmd("pool 2000 9000", check=False)
        assert not short.ok and short.int("allocated") == short.int("freed") == 512
        stats = g.stats()
        assert stats["pool_buflets_in_use"] == 0 and stats["free_bad"] == 0
        assert stats["pool_packets_in_use"] == stats["alloc_ring_ready"]
        assert stats["alloc_syncs"] > 5 and stats["free_syncs"] > 5


@pytest.mark.parametrize(
    ("machine", "append", "transport"),
    [("pc", "msix=1", "modern"), ("pc", "msix=1 legacy", "legacy"), ("q35", "msix=1", "modern")],
)
def test_msix_vectors_with_qemus_own_backend(
    boot: BootFn, machine: Machine, append: str, transport: str
) -> None:
    """MSI-X (msix=1) where QEMU 7.2 supports it under TCG: its own virtio-net backend.
    Config is entry 0, each queue its own entry; every frame sent one by one arrives as
    an interrupt on the RX vector (the legacy layout moves device config to offset 24
    while MSI-X is on, so the MAC still reads right)."""
    with boot(machine=machine, append=append) as (g, link):
        f = g.cmd("features").fields
        assert (f["irq"], f["transport"]) == ("msix", transport)
        assert int(f["irq_line"]) >= 3 and f["mac"] == "52:54:00:12:34:56"
        vq = {
            ln.split()[0]: dict(kv.split("=") for kv in ln.split()[1:]) for ln in g.cmd("vq").lines
        }
        assert vq["rxq0"]["msix_vector"] == "1" and vq["txq0"]["msix_vector"] == "2"
        g.send_line("rx 10 20000")
        time.sleep(0.05)
        for seq in range(10):
            link.send(pattern_frame(seq, 100))
            time.sleep(0.05)
        reply = g.wait_reply()
        assert reply.ok and reply.int("received") == 10
        irq = g.cmd("irq").fields
        assert irq["mode"] == "msix"
        assert 1 <= int(irq["rx"]) <= 10 and irq["isr_zero"] == "0" and irq["lost"] == "0"
        guest_sends(g, link, 300, 60)
