"""``vdev doctor``: both exit statuses, the accelerator report and ``--probe``."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from host import accel
from host.cli import main
from tests.e2e.qemu_stand_in import accel_host, install


def _require_demo_tools() -> None:
    for tool, package in (
        ("qemu-system-x86_64", "qemu-system-x86"),
        ("gcc", "gcc"),
        ("apt-cache", "apt"),
    ):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not installed (apt-get install {package})")
    if not Path("/bin/busybox").is_file():
        pytest.skip("/bin/busybox not installed (apt-get install busybox-static)")


def test_doctor_passes_on_a_complete_host(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _require_demo_tools()
    cache = accel_host(tmp_path, monkeypatch)
    monkeypatch.delenv("VDEV_QEMU", raising=False)
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    for section in ("== tools", "== python", "== images", "== accelerator", "== caches"):
        assert section in out
    assert "qemu-system-x86_64" in out and "QEMU emulator version" in out
    assert f"accelerator verdicts      {cache}" in out
    assert "fast-path build cache" in out and "image cache" in out
    assert out.rstrip().endswith("everything `vdev demo` needs is here")


def test_doctor_fails_and_names_a_missing_qemu(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    accel_host(tmp_path, monkeypatch)
    missing = tmp_path / "no-qemu-here"
    monkeypatch.setenv("VDEV_QEMU", str(missing))
    assert main(["doctor"]) == 1
    captured = capsys.readouterr()
    assert f"MISS qemu-system-x86_64   VDEV_QEMU={missing} does not exist" in captured.out
    (last,) = captured.err.strip().splitlines()
    assert last.startswith("vdev doctor: missing for `vdev demo`: qemu-system-x86_64")
    assert str(missing) in last


def test_doctor_fails_on_a_bad_vdev_accel(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _require_demo_tools()
    accel_host(tmp_path, monkeypatch)
    monkeypatch.setenv("VDEV_ACCEL", "fast")
    assert main(["doctor"]) == 1
    assert "VDEV_ACCEL='fast': expected 'kvm' or 'tcg'" in capsys.readouterr().err


def test_doctor_probe_boots_the_bare_image_and_caches_the_verdict(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from host.device_fixtures import bare_elf_or_skip

    bare_elf_or_skip()  # doctor reports (and probes) only images that are built
    cache = accel_host(tmp_path, monkeypatch)
    qemu = install(tmp_path, monkeypatch, "msr", "all")
    main(["doctor"])
    before = capsys.readouterr().out
    assert "bare                      not probed yet" in before
    assert [x for x in qemu.launches() if x.startswith("kvm")] == []  # no probe without --probe
    main(["doctor", "--probe"])
    out = capsys.readouterr().out
    assert "bare                      tcg: probe verdict" in out
    assert "failed to set MSR 0x10a to 0x69" in out
    assert "kvm kvm-probe" in qemu.launches()
    verdicts = accel.cached_verdicts()
    assert cache.exists() and any("|pc:" in key for key in verdicts)  # the bare ELF's key
    assert all(v.accel == "tcg" and v.source == "probe" for v in verdicts.values())
