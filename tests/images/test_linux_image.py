"""The Linux image recipe: content-hash cache reuse, initramfs contents and module order,
the cpio writer, and the VDEV_ACCEL override. Needs no running guest."""

from __future__ import annotations

import gzip
import shutil
import subprocess
from pathlib import Path

import pytest

from host import accel
from images.cpio import CpioWriter
from images.linux import LinuxImage, build_linux


def parse_newc(data: bytes) -> dict[str, tuple[int, bytes]]:
    """name -> (mode, data) for every entry of a newc archive (a reader independent of ours)."""
    out: dict[str, tuple[int, bytes]] = {}
    off = 0
    while True:
        assert data[off : off + 6] == b"070701", f"bad magic at {off}"
        fields = [int(data[off + 6 + 8 * i : off + 14 + 8 * i], 16) for i in range(13)]
        mode, filesize, namesize = fields[1], fields[6], fields[11]
        name_off = off + 110
        name = data[name_off : name_off + namesize - 1].decode()
        data_off = (name_off + namesize + 3) & ~3
        body = data[data_off : data_off + filesize]
        off = (data_off + filesize + 3) & ~3
        if name == "TRAILER!!!":
            return out
        out[name] = (mode, body)


def test_cpio_writer_roundtrip_with_cpio_tool(tmp_path: Path) -> None:
    w = CpioWriter()
    w.add_dir("bin")
    w.add_file("bin/hello", b"hello world\n", 0o755)
    w.add_symlink("bin/sh", "/bin/busybox")
    w.add_chardev("dev/console", 5, 1)
    entries = parse_newc(w.getvalue())
    assert entries["bin/hello"] == (0o100755, b"hello world\n")
    assert entries["bin/sh"][1] == b"/bin/busybox"
    with pytest.raises(ValueError, match="duplicate"):
        w.add_file("bin/hello", b"")
    if shutil.which("cpio"):
        listing = subprocess.run(
            ["cpio", "-it", "--quiet"], input=w.getvalue(), capture_output=True, timeout=30
        ).stdout.decode()
        assert listing.split() == ["bin", "bin/hello", "bin/sh", "dev/console"]


def test_second_build_is_a_cache_hit(linux_image: LinuxImage) -> None:
    """A hit rebuilds nothing: the artifact files are the very same (mtime unchanged)."""
    mtime = linux_image.kernel.stat().st_mtime_ns, linux_image.initrd.stat().st_mtime_ns
    again = build_linux(progress=lambda _msg: None)
    assert again.cache_hit
    assert again.hash == linux_image.hash and again.kernel == linux_image.kernel
    assert (again.kernel.stat().st_mtime_ns, again.initrd.stat().st_mtime_ns) == mtime


def test_initramfs_has_init_tools_and_modules_in_dependency_order(
    linux_image: LinuxImage,
) -> None:
    entries = parse_newc(gzip.decompress(linux_image.initrd.read_bytes()))
    assert entries["init"][0] & 0o777 == 0o755
    assert entries["dev/console"][0] & 0o170000 == 0o020000  # char device
    for tool in ("usr/bin/vdev-pktgen", "usr/bin/vdev-sink", "bin/busybox", "bin/sh"):
        assert tool in entries
    order = entries["etc/vdev/modules"][1].decode().split()
    for name in order:
        assert f"lib/modules/{name}.ko" in entries
    assert order.index("virtio_ring") < order.index("virtio") < order.index("virtio_pci")
    assert order.index("failover") < order.index("net_failover") < order.index("virtio_net")
    assert order.index("virtio") < order.index("virtio_net")
    assert linux_image.kernel.read_bytes()[0x202:0x206] == b"HdrS"  # bzImage boot header


def test_accel_env_override(monkeypatch: pytest.MonkeyPatch) -> None:
    for value, want in (("tcg", "tcg"), (" KVM ", "kvm"), ("", None)):
        monkeypatch.setenv("VDEV_ACCEL", value)
        assert accel.env_accel() == want
    monkeypatch.setenv("VDEV_ACCEL", "bogus")
    with pytest.raises(ValueError, match="VDEV_ACCEL"):
        accel.env_accel()
