"""Accelerator choice and the KVM -> TCG fallback, with a stand-in QEMU.

See ``qemu_stand_in`` for what the stand-in simulates under ``-accel kvm``: a probe or guest
that never prints (``silent``), an internal error with a register dump (``regdump``), the
MSR assertion (``msr``), or a KVM that works. Every QEMU start is logged, so the tests count
probes, retries and relaunches. Guests are the bare driver ELF (a ~0.3 s boot under TCG)
and, for the panic cases, the real Linux image under TCG.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import TypeVar

import pytest

from host import accel
from host.bare_console import PROMPT
from host.errors import GuestCrashed, GuestStalled, GuestTimeout, MachineError
from host.machine import Machine
from images.linux import LinuxImage
from tests.e2e.qemu_stand_in import StandIn, accel_host, install

pytestmark = [pytest.mark.qemu]

REPO = Path(__file__).resolve().parents[2]
FALLBACK = "falling back to TCG"


@pytest.fixture
def host_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    return accel_host(tmp_path, monkeypatch)


def stand_in(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str, phase: str) -> StandIn:
    return install(tmp_path, monkeypatch, mode, phase)


@pytest.fixture(scope="module")
def elf() -> Path:
    from host.device_fixtures import bare_elf_or_skip

    return bare_elf_or_skip()


def bare(elf: Path, ready_timeout: float = 30.0) -> Machine:
    """The bare driver ELF without a NIC: it prints its prompt ~0.3 s after QEMU starts."""
    return Machine(
        elf,
        machine="pc",
        memory_mb=64,
        ready_pattern=re.escape(PROMPT),
        ready_timeout=ready_timeout,
        name="bare",
    )


E = TypeVar("E", bound=MachineError)


def launch_expecting_failure(m: Machine, exc: type[E]) -> pytest.ExceptionInfo[E]:
    """``m.launch()`` must raise ``exc``; QEMU and the temp dir go away even if it does not."""
    try:
        with pytest.raises(exc) as info:
            m.launch()
    finally:
        m.shutdown()
    return info


def fallback_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if FALLBACK in line]


def only_verdict(cache: Path) -> dict[str, object]:
    raw = json.loads(cache.read_text())
    assert raw["format"] == accel.CACHE_FORMAT
    (verdict,) = raw["verdicts"].values()
    assert isinstance(verdict, dict)
    return verdict


def assert_guest_answers(m: Machine) -> None:
    m.console.send("help\r")
    m.console.expect(r"OK help", 10.0, fail_patterns=())


# ------------------------------------------------------------------------------ fallback
FAILURES = {
    "silent": "no console output for 1.5 s under KVM",
    "regdump": "KVM internal error",
    "msr": "failed to set MSR 0x10a to 0x69",
}


@pytest.mark.parametrize("mode", sorted(FAILURES))
def test_probe_failure_uses_tcg_says_so_once_and_caches_it(
    elf: Path,
    host_env: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    mode: str,
) -> None:
    """(a) the probe hangs, (b) reports an internal error, (d) dies at once: TCG, told once."""
    qemu = stand_in(tmp_path, monkeypatch, mode, "all")
    with bare(elf) as m:
        assert m.accel == "tcg"
        assert_guest_answers(m)
    assert qemu.launches() == ["kvm kvm-probe", "tcg bare"]  # probed once, never retried
    (line,) = fallback_lines(capsys.readouterr().err)
    assert "KVM probe failed" in line and FAILURES[mode] in line and str(host_env) in line
    verdict = only_verdict(host_env)
    assert verdict["accel"] == "tcg" and verdict["source"] == "probe"
    assert FAILURES[mode] in str(verdict["reason"])
    # The next launch trusts the cache: no probe, no KVM attempt, no second line.
    with bare(elf) as m2:
        assert m2.accel == "tcg" and "cached probe verdict" in m2.accel_reason
    assert qemu.launches() == ["kvm kvm-probe", "tcg bare", "tcg bare"]
    assert fallback_lines(capsys.readouterr().err) == []


@pytest.mark.parametrize("mode", sorted(FAILURES))
def test_runtime_kvm_failure_relaunches_once_under_tcg(
    elf: Path,
    host_env: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    mode: str,
) -> None:
    """The probe passes but the real KVM run fails: one relaunch under TCG, told once."""
    qemu = stand_in(tmp_path, monkeypatch, mode, "run")
    with bare(elf) as m:
        assert m.accel == "tcg" and "fell back from KVM" in m.accel_reason
        assert_guest_answers(m)
    assert qemu.launches() == ["kvm kvm-probe", "kvm bare", "tcg bare"]
    (line,) = fallback_lines(capsys.readouterr().err)
    assert "KVM guest failed" in line and FAILURES[mode] in line
    verdict = only_verdict(host_env)
    assert verdict["accel"] == "tcg" and verdict["source"] == "runtime"
    assert FAILURES[mode] in str(verdict["reason"])
    with bare(elf) as m2:
        assert m2.accel == "tcg"
    assert qemu.launches()[3:] == ["tcg bare"]
    assert fallback_lines(capsys.readouterr().err) == []


def test_sandbox_with_the_device_survives_the_fallback(
    elf: Path, host_env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The vhost-user device serves the relaunched TCG QEMU after the stuck KVM one."""
    from host.cli_sandbox import Sandbox
    from tests.guest.sandbox_support import drain, guest_frames

    qemu = stand_in(tmp_path, monkeypatch, "silent", "run")
    with Sandbox(elf=elf) as sb:
        assert sb.machine is not None and sb.machine.accel == "tcg"
        host = sb.channel("host")
        try:
            assert sb.cmd("tx 20 80").int("sent") == 20
            assert guest_frames(drain(host)) == list(range(20))
        finally:
            host.close()
    assert qemu.launches() == ["kvm kvm-probe", "kvm sandbox", "tcg sandbox"]


@pytest.mark.parametrize(
    ("phase", "launches"),
    [
        ("probe", ["kvm kvm-probe", "tcg sandbox"]),
        ("run", ["kvm kvm-probe", "kvm sandbox", "tcg sandbox"]),
    ],
)
def test_a_guest_deaf_to_its_console_under_kvm_means_tcg(
    elf: Path,
    host_env: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    phase: str,
    launches: list[str],
) -> None:
    """A ready marker is not enough: the prompt came but no typed key reached the guest.
    The probe (phase probe) or the run-time check (phase run) sees it; the sandbox then
    runs under TCG and answers commands."""
    from host import machine
    from host.cli_sandbox import Sandbox

    monkeypatch.setattr(machine, "INPUT_CHECK_S", 2.0)
    qemu = stand_in(tmp_path, monkeypatch, "deaf", phase)
    with Sandbox(elf=elf) as sb:
        assert sb.machine is not None and sb.machine.accel == "tcg"
        assert sb.cmd("features").status_line.startswith("OK features")
    assert qemu.launches() == launches
    (line,) = fallback_lines(capsys.readouterr().err)
    assert "did not answer ''" in line and "within 2 s" in line
    verdict = only_verdict(host_env)
    assert verdict["accel"] == "tcg" and "did not answer" in str(verdict["reason"])


def test_a_deaf_console_passes_when_nobody_checks_input(
    elf: Path, host_env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The other side: a Machine without ``input_check`` trusts the marker, so the deaf
    KVM guest is used (what the sandbox did before it checked its console)."""
    qemu = stand_in(tmp_path, monkeypatch, "deaf", "all")
    with bare(elf) as m:
        assert m.accel == "kvm"
    assert qemu.launches() == ["kvm kvm-probe", "kvm bare"]


def test_a_short_caller_timeout_under_kvm_is_not_blamed_on_kvm(
    elf: Path, host_env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Silent for less than KVM_STALL_S: the caller's own timeout, raised as it is."""
    qemu = stand_in(tmp_path, monkeypatch, "silent", "run")
    m = bare(elf, ready_timeout=0.8)
    info = launch_expecting_failure(m, GuestTimeout)
    assert not isinstance(info.value, GuestStalled)
    assert qemu.launches() == ["kvm kvm-probe", "kvm bare"]  # no relaunch
    assert only_verdict(host_env)["accel"] == "kvm"


def test_probe_not_ready_within_its_bound_means_tcg(
    linux_image: LinuxImage,
    host_env: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A KVM guest that prints but is not ready within PROBE_TIMEOUT_S: TCG it is."""
    qemu = stand_in(tmp_path, monkeypatch, "msr", "none")  # a "KVM" as slow as TCG
    monkeypatch.setattr(accel, "PROBE_TIMEOUT_S", 1.0)
    monkeypatch.setattr(accel, "KVM_STALL_S", 30.0)
    with Machine.linux(linux_image, name="slow") as m:
        assert m.accel == "tcg"
    assert qemu.launches() == ["kvm kvm-probe", "tcg slow"]
    (line,) = fallback_lines(capsys.readouterr().err)
    assert "not ready within 1 s" in line
    assert "not ready within 1 s" in str(only_verdict(host_env)["reason"])


# ------------------------------------------------------------------------------ KVM works
def test_working_kvm_is_used_and_probed_once(
    elf: Path,
    host_env: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    qemu = stand_in(tmp_path, monkeypatch, "msr", "none")  # "none": KVM never misbehaves
    for _ in range(3):
        with bare(elf) as m:
            assert m.accel == "kvm"
            assert "-cpu" in m.cmdline and "host" in m.cmdline
            assert_guest_answers(m)
    assert qemu.launches() == ["kvm kvm-probe", "kvm bare", "kvm bare", "kvm bare"]
    verdict = only_verdict(host_env)
    assert verdict["accel"] == "kvm" and "ready marker" in str(verdict["reason"])
    assert fallback_lines(capsys.readouterr().err) == []


def test_verdict_is_keyed_by_qemu_and_image(
    elf: Path, host_env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    qemu = stand_in(tmp_path, monkeypatch, "msr", "none")
    with bare(elf):
        pass
    # Same QEMU, same image: cached. A rebuilt QEMU (new mtime): probed again.
    with bare(elf):
        pass
    st = qemu.path.stat()
    os.utime(qemu.path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    with bare(elf):
        pass
    # Another image (same bytes plus one): probed again.
    other = tmp_path / "other.elf"
    other.write_bytes(elf.read_bytes() + b"\0")
    with bare(other):
        pass
    probes = [x for x in qemu.launches() if x.endswith("kvm-probe")]
    assert len(probes) == 3, qemu.launches()
    assert len(json.loads(host_env.read_text())["verdicts"]) == 3


@pytest.mark.parametrize(
    "content",
    [
        "{not json",
        '{"key": "boot:/usr/bin/qemu:1:2", "accel": "kvm"}',  # the old probe's format
        "[1, 2]",
        "",
    ],
    ids=["corrupt", "old-format", "not-an-object", "empty"],
)
def test_unusable_cache_file_means_probe_again(
    elf: Path,
    host_env: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    content: str,
) -> None:
    qemu = stand_in(tmp_path, monkeypatch, "msr", "all")
    host_env.write_text(content)
    with bare(elf) as m:
        assert m.accel == "tcg"
    assert qemu.launches()[0] == "kvm kvm-probe"
    assert only_verdict(host_env)["accel"] == "tcg"  # rewritten in the new format


def test_verdict_from_another_boot_is_not_trusted(
    elf: Path, host_env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    qemu = stand_in(tmp_path, monkeypatch, "msr", "none")
    with bare(elf):
        pass
    raw = json.loads(host_env.read_text())
    raw["boot_id"] = "another-boot"
    host_env.write_text(json.dumps(raw))
    with bare(elf):
        pass
    assert [x for x in qemu.launches() if x.endswith("kvm-probe")] == ["kvm kvm-probe"] * 2


# ------------------------------------------------------------------------------ overrides
@pytest.mark.parametrize("mode", ["msr", "regdump"])
def test_forced_kvm_fails_loudly_without_fallback(
    elf: Path,
    host_env: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    mode: str,
) -> None:
    qemu = stand_in(tmp_path, monkeypatch, mode, "all")
    monkeypatch.setenv("VDEV_ACCEL", "kvm")
    m = bare(elf)
    info = launch_expecting_failure(m, MachineError)
    text = str(info.value)
    assert FAILURES[mode] in text
    assert "VDEV_ACCEL=kvm forces KVM" in text and "no TCG fallback" in text
    assert qemu.launches() == ["kvm bare"]  # no probe, no relaunch
    assert fallback_lines(capsys.readouterr().err) == []
    assert not host_env.exists()  # nothing cached
    assert not m.is_running()


def test_forced_tcg_skips_the_probe(
    elf: Path, host_env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    qemu = stand_in(tmp_path, monkeypatch, "msr", "all")
    monkeypatch.setenv("VDEV_ACCEL", "tcg")
    with bare(elf) as m:
        assert m.accel == "tcg" and m.accel_reason == "VDEV_ACCEL=tcg"
    assert qemu.launches() == ["tcg bare"]
    assert not host_env.exists()


def test_bad_vdev_accel_is_one_line_error(
    elf: Path, host_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VDEV_ACCEL", "hvf")
    info = launch_expecting_failure(bare(elf), MachineError)
    assert str(info.value) == "VDEV_ACCEL='hvf': expected 'kvm' or 'tcg'"


def test_no_kvm_device_means_tcg_without_probe(
    elf: Path, host_env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    qemu = stand_in(tmp_path, monkeypatch, "msr", "all")
    monkeypatch.setattr(accel, "KVM_DEVICE", str(tmp_path / "no-such-kvm"))
    with bare(elf) as m:
        assert m.accel == "tcg" and "does not exist" in m.accel_reason
    assert qemu.launches() == ["tcg bare"]


# ------------------------------------------------------------------------------ real panics
def test_panic_under_tcg_fails_the_run_and_is_not_blamed_on_kvm(
    linux_image: LinuxImage,
    host_env: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    qemu = stand_in(tmp_path, monkeypatch, "msr", "all")
    m = Machine.linux(linux_image, kernel_args="rdinit=/nonexistent", name="panic")
    info = launch_expecting_failure(m, GuestCrashed)
    assert "Kernel panic" in info.value.console_tail
    assert "after KVM failed" not in str(info.value)
    assert qemu.launches() == ["kvm kvm-probe", "tcg panic"]  # the TCG run is not retried
    assert len(fallback_lines(capsys.readouterr().err)) == 1  # the probe's, nothing more
    assert only_verdict(host_env)["source"] == "probe"


def test_real_panic_under_kvm_is_not_retried_or_cached(
    linux_image: LinuxImage,
    host_env: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A working KVM and a guest that panics by itself: the panic is the verdict."""
    qemu = stand_in(tmp_path, monkeypatch, "msr", "none")
    # The stand-in's "KVM" is TCG, where a quiet Linux boot is silent for seconds.
    monkeypatch.setattr(accel, "KVM_STALL_S", 30.0)
    monkeypatch.setattr(accel, "PROBE_TIMEOUT_S", 60.0)
    m = Machine.linux(linux_image, kernel_args="rdinit=/nonexistent", name="panic")
    info = launch_expecting_failure(m, GuestCrashed)
    assert "Kernel panic" in info.value.console_tail
    assert qemu.launches() == ["kvm kvm-probe", "kvm panic"]
    assert fallback_lines(capsys.readouterr().err) == []
    assert not host_env.exists() or json.loads(host_env.read_text())["verdicts"] == {}


# ------------------------------------------------------------------------------ the CLI
_CLI = textwrap.dedent(
    """
    import sys
    import host.accel
    host.accel.KVM_DEVICE = sys.argv[1]
    from host.cli import main
    sys.exit(main(sys.argv[2:]))
    """
)


def test_cli_boot_falls_back_and_says_so_once(
    linux_image: LinuxImage, host_env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``vdev images boot`` (the Linux image, no VDEV_ACCEL) on a host whose KVM dumps
    registers at run time: it boots under TCG and says so in one line."""
    qemu = stand_in(tmp_path, monkeypatch, "regdump", "run")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-c", _CLI, accel.KVM_DEVICE, "images", "boot", "--halt"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    (line,) = fallback_lines(proc.stderr)
    assert "KVM internal error" in line
    assert "accel tcg" in proc.stderr and "Traceback" not in proc.stderr
    assert qemu.launches() == ["kvm kvm-probe", "kvm linux", "tcg linux"]
    assert only_verdict(host_env)["accel"] == "tcg"


def test_unwritable_cache_still_boots_and_probes_each_time(
    elf: Path, host_env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cache path that cannot be created costs a probe per launch, never the launch."""
    qemu = stand_in(tmp_path, monkeypatch, "msr", "all")
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("VDEV_ACCEL_CACHE", str(blocker / "sub" / "accel.json"))
    for _ in range(2):
        with bare(elf) as m:
            assert m.accel == "tcg"
    assert qemu.launches() == ["kvm kvm-probe", "tcg bare"] * 2
