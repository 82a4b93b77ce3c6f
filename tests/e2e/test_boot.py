"""Boot the vdev Linux guest and drive it: console run(), network config, guest tools, QMP.

No vhost-user device is involved: the NIC is QEMU's own slirp backend behind a
virtio-net-pci, which proves the module load order and eth0 configuration of the image.
One guest serves the whole module (boots cost seconds under TCG); the last tests boot
their own short-lived guests to check failure reporting and cleanup.
"""

from __future__ import annotations

import mmap
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from host.errors import CommandFailed, GuestCrashed, GuestTimeout, MachineError
from host.linux_fixtures import LinuxGuestFactory
from host.machine import Machine, Nic
from images.linux import LinuxImage

pytestmark = [pytest.mark.qemu, pytest.mark.slow]

GUEST_ARGS = "vdev.ip=10.0.2.15/24 vdev.gw=10.0.2.2 vdev.ip1=10.0.3.15/24 vdev.mtu1=1400"


def counters(output: str, prefix: str) -> dict[str, int]:
    """``key=value`` integers from the tool's result line (``prefix k=v k=v ...``)."""
    for line in reversed(output.splitlines()):
        if line.startswith(prefix + " ") and "=" in line:
            return {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", line)}
    raise AssertionError(f"no {prefix!r} line in:\n{output}")


@pytest.fixture(scope="module")
def guest(linux_guest_factory: LinuxGuestFactory) -> Machine:
    # Two slirp NICs prove per-interface options (eth1); RAM in a /dev/shm file lets the
    # host look into guest memory.
    return linux_guest_factory(
        nics=[Nic.user(), Nic.user()], kernel_args=GUEST_ARGS, shared_memory="file"
    )


def test_ready_line_reports_eth0_with_carrier(guest: Machine) -> None:
    assert "ifaces=eth0,eth1" in guest.ready_line
    assert "carrier=eth0:1,eth1:1" in guest.ready_line
    out, status = guest.run("readlink /sys/class/net/eth0/device/driver; lsmod")
    assert status == 0
    assert out.splitlines()[0].endswith("/virtio_net")
    for mod in ("virtio_ring", "virtio_pci", "net_failover", "virtio_net"):
        assert re.search(rf"^{mod}\s", out, re.M), out


def test_run_returns_output_and_status(guest: Machine) -> None:
    assert guest.run("echo hello; echo err >&2; exit 3") == ("hello\nerr\n", 3)
    assert guest.run("printf abc") == ("abc", 0)
    assert guest.run("true") == ("", 0)
    # Quotes, newlines, syntax errors and long lines must not desynchronise the console.
    assert guest.run("if true; then\n  echo 'a \"b\" $c'\nfi") == ('a "b" $c\n', 0)
    out, status = guest.run("if then fi")
    assert status == 2 and "syntax error" in out
    long_arg = "x" * 5000
    assert guest.run(f"echo {long_arg} | wc -c") == ("5001\n", 0)
    # A command reading stdin gets EOF instead of hanging on the console.
    assert guest.run("cat") == ("", 0)
    assert guest.run("echo still in sync") == ("still in sync\n", 0)


def test_run_timeout_interrupts_the_command_and_resyncs(guest: Machine) -> None:
    with pytest.raises(GuestTimeout):
        guest.run("sleep 30", timeout=1.0)
    assert guest.run("echo after timeout") == ("after timeout\n", 0)


def test_run_check_raises_with_context(guest: Machine) -> None:
    with pytest.raises(CommandFailed) as info:
        guest.run("echo nope; exit 5", check=True)
    assert info.value.status == 5 and info.value.output == "nope\n"
    assert "qemu-system-x86_64" in str(info.value)


def test_eth0_configured_from_kernel_cmdline(guest: Machine) -> None:
    out, _ = guest.run("ip addr show eth0; ip route; cat /sys/class/net/eth0/mtu")
    assert "inet 10.0.2.15/24" in out
    assert "link/ether 52:54:00:12:34:56" in out
    assert "default via 10.0.2.2 dev eth0" in out
    assert out.splitlines()[-1] == "1500"
    out, status = guest.run("ping -c 1 -W 5 10.0.2.2", timeout=20)
    assert status == 0, out


def test_second_nic_gets_its_own_options(guest: Machine) -> None:
    out, _ = guest.run("ip addr show eth1; cat /sys/class/net/eth1/mtu")
    assert "inet 10.0.3.15/24" in out
    assert "link/ether 52:54:00:12:34:57" in out
    assert out.splitlines()[-1] == "1400"


def test_host_sees_guest_ram_in_shm_file(guest: Machine) -> None:
    marker = f"vdev-ram-marker-{os.getpid()}-{time.monotonic_ns()}"
    # Split in the command so the console echo/pexpect buffers never hold the full marker
    # anywhere in guest RAM except the tmpfs page we write.
    guest.run(f"echo {marker[:9]}''{marker[9:]} > /tmp/marker", check=True)
    assert guest.memory_path is not None
    assert guest.memory_path.stat().st_size == 256 << 20
    with open(guest.memory_path, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as mm:
        assert mm.find(marker.encode()) >= 0


def test_pktgen_udp_through_the_nic(guest: Machine) -> None:
    before = int(guest.run("cat /sys/class/net/eth0/statistics/tx_packets")[0])
    out, status = guest.run("vdev-pktgen --udp 10.0.2.2:9 --count 200 --size 100")
    assert status == 0, out
    c = counters(out, "pktgen")
    assert (c["tx_packets"], c["tx_bytes"], c["errors"]) == (200, 20000, 0)
    after = int(guest.run("cat /sys/class/net/eth0/statistics/tx_packets")[0])
    assert after - before >= 200


def test_udp_sink_counts_exactly_on_lo(guest: Machine) -> None:
    out, status = guest.run(
        "vdev-sink --udp 9000 --count 1000 --timeout-ms 20000 > /tmp/sink.out 2>&1 &\n"
        "while ! grep -q ready /tmp/sink.out; do usleep 10000; done\n"
        "vdev-pktgen --udp 127.0.0.1:9000 --count 1000 --size 64\n"
        "wait $!; echo sink_status=$?; cat /tmp/sink.out",
        timeout=40,
    )
    assert status == 0, out
    assert "sink_status=0" in out, out
    assert counters(out, "pktgen")["tx_packets"] == 1000
    sink = counters(out, "sink")
    assert (sink["rx_packets"], sink["rx_bytes"], sink["dups"]) == (1000, 64000, 0), out


def test_raw_sink_counts_exactly_on_lo(guest: Machine) -> None:
    out, status = guest.run(
        "vdev-sink --raw lo --count 300 --timeout-ms 20000 > /tmp/raw.out 2>&1 &\n"
        "while ! grep -q ready /tmp/raw.out; do usleep 10000; done\n"
        "vdev-pktgen --raw lo --dst-mac ff:ff:ff:ff:ff:ff --count 300 --size 60\n"
        "wait $!; echo sink_status=$?; cat /tmp/raw.out",
        timeout=40,
    )
    assert status == 0 and "sink_status=0" in out, out
    assert counters(out, "pktgen")["tx_packets"] == 300
    sink = counters(out, "sink")
    assert (sink["rx_packets"], sink["rx_bytes"], sink["dups"]) == (300, 18000, 0), out


def test_sink_times_out_with_status_1(guest: Machine) -> None:
    out, status = guest.run("vdev-sink --udp 9001 --count 5 --timeout-ms 200")
    assert status == 1
    assert counters(out, "sink")["rx_packets"] == 0


def wait_carrier(guest: Machine, want: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        out, _ = guest.run("cat /sys/class/net/eth0/carrier")
        if out.strip() == want:
            return
        assert time.monotonic() < deadline, f"carrier stayed {out.strip()}, wanted {want}"
        time.sleep(0.1)


def test_qmp_set_link(guest: Machine) -> None:
    guest.set_link(0, False)
    wait_carrier(guest, "0")
    guest.set_link(0, True)
    wait_carrier(guest, "1")


def test_system_reset_reboots_to_a_fresh_shell(guest: Machine) -> None:
    guest.run("touch /tmp/before-reset", check=True)
    guest.system_reset()
    assert "ifaces=eth0,eth1" in guest.ready_line
    assert guest.run("ls /tmp/before-reset")[1] != 0  # a fresh initramfs
    assert guest.run("echo again") == ("again\n", 0)


def test_expect_timeout_carries_cmdline_and_console(guest: Machine) -> None:
    with pytest.raises(GuestTimeout) as info:
        guest.expect("this will never be printed", timeout=0.3)
    text = str(info.value)
    assert "QEMU command line:" in text and "-netdev user" in text
    assert "vdev-guest#" in info.value.console_tail
    assert info.value.log_path is not None
    assert "VDEV-READY" in info.value.log_path.read_text()
    assert info.value.cmdline[0].endswith("qemu-system-x86_64")


def test_panic_is_reported_and_everything_cleaned_up(linux_image: LinuxImage) -> None:
    with pytest.raises(GuestCrashed) as info:
        with Machine.linux(linux_image, name="panic") as m:
            pid, temp_dir = m.pid, m.temp_dir
            assert pid is not None and temp_dir is not None and temp_dir.is_dir()
            m.console.sendline("echo c > /proc/sysrq-trigger")
            m.expect("never printed: the panic pattern wins", timeout=60)
    assert "Kernel panic" in str(info.value) or "sysrq" in str(info.value)
    assert "QEMU command line:" in str(info.value)
    assert temp_dir is not None and pid is not None
    assert not temp_dir.exists()
    assert not os.path.exists(f"/proc/{pid}") or _is_zombie_free(pid)


def _is_zombie_free(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return "qemu" not in f.read()
    except OSError:
        return True


def test_startup_failure_carries_qemu_stderr(linux_image: LinuxImage) -> None:
    m = Machine.linux(linux_image, nics=["/nonexistent/vdev.sock"], name="nosock")
    with pytest.raises(MachineError) as info:
        m.launch()
    assert "/nonexistent/vdev.sock" in str(info.value)
    assert not m.is_running()
    assert m.temp_dir is not None and not m.temp_dir.exists()


def test_cmdline_for_vhost_user_nics(tmp_path: Path) -> None:
    """The vhost-user recipe from the machine notes, without booting anything."""
    m = Machine(
        "/k",
        nics=[
            "/run/a.sock",
            Nic.vhost_user(
                "/run/b.sock", reconnect=True, mtu=9000, queues=2, mac="02:00:00:00:00:02"
            ),
        ],
        accel="tcg",
        memory_mb=128,
    )
    m.temp_dir = tmp_path
    args = " ".join(m.build_cmdline())
    assert "-object memory-backend-memfd,id=mem,size=128M,share=on" in args
    assert "-machine q35,memory-backend=mem" in args
    assert "-chardev socket,id=c0,path=/run/a.sock -netdev vhost-user,id=n0,chardev=c0" in args
    assert "virtio-net-pci,netdev=n0,id=nic0,mac=52:54:00:12:34:56,romfile=,vectors=0" in args
    assert "-chardev socket,id=c1,path=/run/b.sock,reconnect=1" in args
    assert "-netdev vhost-user,id=n1,chardev=c1,queues=2" in args
    assert "mac=02:00:00:00:00:02,romfile=,host_mtu=9000,vectors=0,mq=on" in args
    assert "-no-reboot" in args and "-nographic" in args


@pytest.mark.parametrize("cpus", [1, 2, 3])
def test_tcg_guests_keep_their_memory_barriers(
    tmp_path: Path, cpus: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """QEMU < 8.1 elides a TCG guest's barriers unless the machine can have two vCPUs and
    TCG is multi-threaded (Machine._accel_arg): the driver/device index handshake of
    virtio 2.7.10 needs them.  KVM guests run real barriers and get the plain options."""
    tcg = Machine("/k", nics=["/run/a.sock"], accel="tcg", cpus=cpus)
    tcg.temp_dir = tmp_path
    argv = tcg.build_cmdline()
    assert argv[argv.index("-accel") + 1] == "tcg,thread=multi"
    assert argv[argv.index("-smp") + 1] == f"{cpus},maxcpus={max(cpus, 2)}"
    monkeypatch.setenv("VDEV_TCG_BARRIERS", "0")  # the plain options, to reproduce the bug
    argv = tcg.build_cmdline()
    assert argv[argv.index("-accel") + 1] == "tcg"
    assert argv[argv.index("-smp") + 1] == str(cpus)
    monkeypatch.delenv("VDEV_TCG_BARRIERS")
    kvm = Machine("/k", nics=["/run/a.sock"], accel="kvm", cpus=cpus)
    kvm.temp_dir = tmp_path
    argv = kvm.build_cmdline()
    assert argv[argv.index("-accel") + 1] == "kvm"
    assert argv[argv.index("-smp") + 1] == str(cpus)


@pytest.fixture
def testpmd_vhost_backend(tmp_path: Path) -> Iterator[tuple[Path, subprocess.Popen[str]]]:
    """DPDK testpmd as a third-party vhost-user backend (rxonly), until vdev's device lands.

    testpmd pins one core while it runs: keep the test short. It is stopped with SIGINT
    (prints its stats) and killed if that does not work; its EAL runtime dir is removed.
    """
    testpmd = shutil.which("dpdk-testpmd")
    if testpmd is None:
        pytest.skip("dpdk-testpmd not found (apt-get install dpdk-dev)")
    sock = tmp_path / "vh.sock"
    prefix = f"vdev-boot-{os.getpid()}"
    cmd = [
        testpmd, "--no-huge", "-m", "512", "--no-pci", "--file-prefix", prefix,
        "-l", "0,1", "--vdev", f"net_vhost0,iface={sock},queues=1", "--",
        "--total-num-mbufs", "16384", "--forward-mode=rxonly", "--auto-start",
    ]  # fmt: skip
    proc = subprocess.Popen(
        cmd,
        stdin=subprocess.PIPE,  # testpmd exits on EOF of stdin ("Press enter to exit")
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 20
        while not sock.exists():
            assert proc.poll() is None, f"testpmd exited: {proc.communicate()[0]}"
            assert time.monotonic() < deadline, "testpmd did not create its socket"
            time.sleep(0.1)
        yield sock, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        shutil.rmtree(f"/var/run/dpdk/{prefix}", ignore_errors=True)


@pytest.mark.dpdk
def test_vhost_user_nic_with_testpmd_backend(
    linux_image: LinuxImage, testpmd_vhost_backend: tuple[Path, subprocess.Popen[str]]
) -> None:
    """The vhost-user NIC recipe (memfd RAM, vectors=0 under TCG) with a real backend."""
    sock, proc = testpmd_vhost_backend
    # ipv6.disable=1: otherwise the guest's own IPv6 autoconf frames (MLD report, router
    # solicitation) land in testpmd's count too, whenever a loaded host delays them into
    # the pktgen window (seen as RX-packets 502 under a parallel run).
    args = "vdev.ip=10.0.0.2/24 ipv6.disable=1"
    with Machine.linux(linux_image, nics=[sock], kernel_args=args) as m:
        assert "carrier=eth0:1" in m.ready_line
        out, status = m.run(
            "vdev-pktgen --raw eth0 --dst-mac 02:00:00:00:00:01 --count 500 --size 60"
        )
        assert status == 0 and counters(out, "pktgen")["tx_packets"] == 500, out
    proc.send_signal(signal.SIGINT)
    stats, _ = proc.communicate(timeout=20)
    rx = [int(n) for n in re.findall(r"RX-packets:\s*(\d+)", stats)]
    assert rx and max(rx) == 500, stats


_CHILD = """
import sys, threading, time
from pathlib import Path
from host.machine import Machine
from images.linux import LinuxImage

img = LinuxImage(Path(sys.argv[1]), Path(sys.argv[2]), "", "", (), Path("."), True)
m = Machine.linux(img, name="interrupted")

def report() -> None:
    while m.pid is None or m.temp_dir is None:
        time.sleep(0.02)
    print(m.pid, m.temp_dir, flush=True)

threading.Thread(target=report, daemon=True).start()
m.launch()
time.sleep(60)
"""


def _qemu_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return False
    return fields[0] != "Z"


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["ctrl-c", "sigkill"])
def test_interrupted_runner_leaves_no_qemu(linux_image: LinuxImage, sig: signal.Signals) -> None:
    """Ctrl-C (KeyboardInterrupt mid-boot) cleans up; SIGKILL of the runner kills QEMU too."""
    import sys

    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(linux_image.kernel), str(linux_image.initrd)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    )
    try:
        assert child.stdout is not None
        pid_s, temp_dir = child.stdout.readline().split()
        pid = int(pid_s)
        time.sleep(0.5)
        child.send_signal(sig)
        child.wait(30)
        deadline = time.monotonic() + 10
        while _qemu_alive(pid):
            assert time.monotonic() < deadline, f"QEMU {pid} survived {sig.name}"
            time.sleep(0.1)
        if sig == signal.SIGINT:
            assert not Path(temp_dir).exists()
        else:  # nobody could clean up after SIGKILL: remove the test's litter
            shutil.rmtree(temp_dir, ignore_errors=True)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(10)


def test_qemu_as_vhost_user_server_waits_for_the_backend(
    linux_image: LinuxImage, tmp_path: Path
) -> None:
    """launch(wait=False) returns while QEMU waits for a backend on its server socket."""
    sock = tmp_path / "server.sock"
    m = Machine.linux(linux_image, nics=[Nic.vhost_user(sock, server=True)], name="server")
    try:
        m.launch(wait=False)
        deadline = time.monotonic() + 20
        while not sock.exists():
            assert m.is_running() and time.monotonic() < deadline, m.stderr_tail()
            time.sleep(0.05)
        with pytest.raises(MachineError, match="vhost-user backend"):
            m.wait_ready(timeout=1.0)
    finally:
        m.shutdown()
    assert not m.is_running()
