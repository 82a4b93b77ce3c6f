"""`vdev run --script FILE` runs FILE as one shell script in the Linux guest (issue 13, part 5):
loops and `cd` work, the exit status is the script's, `--errexit` stops at the first failing
command, a long script survives the console transfer, and `host`/`fault` lines in the same
file act on the device in step with the shell."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.qemu, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
GUEST_MAC = "52:54:00:12:34:56"


def vdev_run(
    tmp_path: Path, script: str, *args: str, timeout: float = 240
) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "script.sh"
    path.write_text(script)
    cmd = [sys.executable, "-m", "host.cli", "run", "--script", str(path), *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def test_one_script_with_host_lines(linux_image: object, tmp_path: Path) -> None:
    lines = "\n".join(f"echo line-{i:03d} $((i * 2))" for i in range(150))
    script = f"""
total=0
for i in 1 2 3 4; do total=$((total + i)); done
echo "total=$total"
cd /sys/class/net/eth0/statistics
echo "cwd=$(pwd)"
before=$(cat rx_packets)
host send 25 100
sleep 1
echo "rx_delta=$(( $(cat rx_packets) - before ))"
vdev-pktgen --raw eth0 --dst-mac 02:00:00:00:00:aa --count 30 --size 120 > /dev/null
host expect 30 5 from={GUEST_MAC} || echo "host expect failed"
i=0
{lines}
fault add action=drop queue=rx p=1.0 id=wall
fault list
fault remove wall
exit 9
"""
    res = vdev_run(tmp_path, script)
    out = res.stdout
    assert res.returncode == 9, out + res.stderr[-2000:]
    assert "total=10" in out  # a for loop: a syntax error line by line
    assert "cwd=/sys/class/net/eth0/statistics" in out  # cd persisted
    delta = int(out.split("rx_delta=")[1].split()[0])
    assert delta >= 25  # the guest counted the host's frames (plus any ARP noise)
    assert "OK host-send sent=25 bytes=2500" in out
    assert "OK host-expect received=" in out and "host expect failed" not in out
    assert [ln for ln in out.splitlines() if ln.startswith("line-")] == [
        f"line-{i:03d} 0" for i in range(150)
    ]  # ~6 KiB of script crossed the console in order ($i is 0 there)
    assert "OK fault-add id=wall action=drop queue=rx" in out
    assert "wall action=drop" in out and "OK fault-remove id=wall" in out
    assert out.rstrip().endswith("[exit 9]")


def test_errexit_stops_at_the_first_failure(linux_image: object, tmp_path: Path) -> None:
    script = "echo start\nhost expect 1 0.5 type=0x9999\necho not-reached\n"
    res = vdev_run(tmp_path, script, "--errexit")
    assert res.returncode == 1, res.stdout + res.stderr[-2000:]
    assert "start" in res.stdout and "ERR host-expect timeout received=0" in res.stdout
    assert "not-reached" not in res.stdout
    # Without --errexit the same script runs to its end and its status is the last echo's.
    res = vdev_run(tmp_path, script)
    assert res.returncode == 0 and "not-reached" in res.stdout


def test_errexit_needs_a_script(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "host.cli", "run", "--errexit"]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and res.stderr.strip() == "vdev run: --errexit: needs --script FILE"
