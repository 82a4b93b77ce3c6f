"""The CLI never takes over another instance, keeps stdout pure with --json, and its
options mean the same everywhere (subprocesses, as a user runs them)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vdev.testing.frames import icmp_echo

REPO = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "host.cli"]


def cli(*args: str, timeout: float = 60, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args], capture_output=True, text=True, timeout=timeout, cwd=REPO,
        stdin=subprocess.DEVNULL, **kw,  # type: ignore[call-overload]
    )  # fmt: skip


def wait_for(cond: object, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():  # type: ignore[operator]
            return True
        time.sleep(0.05)
    return False


class Serve:
    """``vdev serve`` in the background; ``stop()`` returns (status, stdout, stderr)."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [*CLI, "serve", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            cwd=REPO, stdin=subprocess.DEVNULL,
        )  # fmt: skip

    def stop(self) -> tuple[int, str, str]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            out, err = self.proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, err = self.proc.communicate()
        return self.proc.returncode, out, err


@pytest.fixture
def first(tmp_path: Path) -> Iterator[tuple[Serve, Path, Path]]:
    nic, ctl = tmp_path / "a.sock", tmp_path / "c.sock"
    serve = Serve("--socket", str(nic), "--control", str(ctl), "--json")
    try:
        assert wait_for(lambda: cli("ctl", "-s", str(ctl), "ping").returncode == 0), serve.stop()
        yield serve, nic, ctl
    finally:
        serve.stop()


def test_a_second_serve_does_not_steal_the_control_socket(
    first: tuple[Serve, Path, Path], tmp_path: Path
) -> None:
    serve, _nic, ctl = first
    second = cli("serve", "--socket", str(tmp_path / "b.sock"), "--control", str(ctl))
    assert second.returncode == 1
    assert second.stderr.strip().splitlines() == [
        f"vdev serve: --control {ctl}: another process is listening on this socket "
        "(stop it, or choose another path)"
    ]
    assert ctl.exists() and not (tmp_path / "b.sock").exists()  # the loser cleaned up its own
    pong = cli("ctl", "-s", str(ctl), "ping")  # the first still owns and answers its socket
    assert pong.returncode == 0 and json.loads(pong.stdout)["pong"] is True
    status, _out, _err = serve.stop()
    assert status == 0 and not ctl.exists()  # and removes it itself on exit


def test_a_second_serve_does_not_steal_the_nic_socket_or_its_guest(
    first: tuple[Serve, Path, Path],
) -> None:
    from vdev.testing.frontend import VirtioNetFrontend

    _serve, nic, ctl = first
    with VirtioNetFrontend(str(nic)) as fe:
        fe.send([icmp_echo(1)])
        assert len(fe.recv(1, timeout=5)) == 1
        # Another serve on the same NIC socket: refused, and its liveness probe (connect,
        # close) must not cost the connected guest its NIC.
        second = cli("serve", "--socket", str(nic))
        assert second.returncode == 1 and "another process is listening" in second.stderr
        assert len(second.stderr.strip().splitlines()) == 1
        fe.send([icmp_echo(2)])
        assert len(fe.recv(1, timeout=5)) == 1, "the first guest lost its connection"
    stats = json.loads(cli("ctl", "-s", str(ctl), "stats", "--json").stdout)
    assert stats["device"]["nics"][0]["connections"] == 1  # the probe was not a frontend


def test_stale_sockets_are_replaced(tmp_path: Path) -> None:
    import socket

    ctl = tmp_path / "stale.sock"
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(str(ctl))
    dead.close()  # left behind by a crashed instance: nobody listens
    serve = Serve("--socket", str(tmp_path / "n.sock"), "--control", str(ctl))
    try:
        assert wait_for(lambda: cli("ctl", "-s", str(ctl), "ping").returncode == 0)
    finally:
        status, _, err = serve.stop()
    assert status == 0, err


def test_serve_json_stdout_is_pure_json(first: tuple[Serve, Path, Path]) -> None:
    serve, nic, _ctl = first
    status, out, err = serve.stop()
    assert status == 0, err
    stats = json.loads(out)  # the whole of stdout, nothing before or after
    assert stats["nics"][0]["socket"] == str(nic)
    assert "vdev serve: 1 NIC(s) on" in err  # the banner went to stderr


def test_ctl_options_before_and_after_the_request(first: tuple[Serve, Path, Path]) -> None:
    _serve, _nic, ctl = first
    for argv in (
        ["ctl", "-s", str(ctl), "--json", "list"],
        ["ctl", "list", "-s", str(ctl), "--json"],
        ["ctl", "--json", "list", "--control", str(ctl)],
        ["ctl", "--socket", str(ctl), "list", "--json"],  # the old spelling still works
    ):
        proc = cli(*argv)
        assert proc.returncode == 0, (argv, proc.stderr)
        assert json.loads(proc.stdout)["rules"] == [], argv
    table = cli("ctl", "list", "-s", str(ctl))
    assert table.stdout.startswith("id ")  # without --json: the table
    env = dict(os.environ, VDEV_CTL_SOCKET=str(ctl))
    assert cli("ctl", "ping", "--timeout", "2", env=env).returncode == 0


def test_ctl_refuses_queues_and_keys_the_nic_does_not_have(
    first: tuple[Serve, Path, Path],
) -> None:
    _serve, _nic, ctl = first
    for field, named in (("queue=rx1", "'rx1'"), ("queue=tx3", "'tx3'"), ("queue=5", "5")):
        proc = cli("ctl", "-s", str(ctl), "add", "action=drop", field)
        assert proc.returncode == 1, proc.stdout
        assert proc.stderr.strip() == (
            f"vdev ctl: queue: {named}: nic0 has 1 queue pair(s) (rx0..rx0, tx0..tx0)"
        )
    bad = cli("ctl", "-s", str(ctl), "add", "action=drop", "colour=red")
    assert bad.returncode == 1 and "colour: unknown key" in bad.stderr
    good = cli("ctl", "-s", str(ctl), "add", "action=drop", "queue=rx0", "--json")
    assert good.returncode == 0 and json.loads(good.stdout)["rule"]["queue"] == "rx0"


def test_control_option_has_one_name() -> None:
    """--control everywhere; the old names are accepted but not advertised."""
    for command, hidden in (("run", None), ("sandbox", "--ctl"), ("inspect", "--socket")):
        helptext = cli(command, "--help").stdout
        assert "--control" in helptext, command
        if hidden:
            assert hidden not in helptext, command
    assert "--socket" not in cli("ctl", "--help").stdout.replace("-s, --control", "")
    old = cli("sandbox", "--ctl", "/nodir/x.sock")
    assert old.returncode == 2 and "/nodir/x.sock" in old.stderr


def test_version() -> None:
    from importlib import metadata

    proc = cli("--version")
    assert proc.returncode == 0
    assert proc.stdout.strip() == f"vdev {metadata.version('vdev')}"


def test_internal_errors_are_one_line_unless_debugging(tmp_path: Path) -> None:
    code = (
        "import sys, host.cli_ctl as c\n"
        "def boom(args): raise RuntimeError('boom\\nsecond line')\n"
        "c.run_scenario_check = boom\n"
        "import host.cli\n"
        f"sys.exit(host.cli.main(['scenario', 'check', {str(REPO / 'README.md')!r}]))\n"
    )
    plain = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           cwd=REPO, timeout=60)  # fmt: skip
    assert plain.returncode == 70
    assert plain.stderr.strip().splitlines() == [
        "vdev scenario: internal error: RuntimeError: boom "
        "(run with -v or VDEV_DEBUG=1 for the traceback)"
    ]
    debug = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           cwd=REPO, timeout=60, env=dict(os.environ, VDEV_DEBUG="1"))  # fmt: skip
    assert debug.returncode == 70 and "Traceback" in debug.stderr and "boom" in debug.stderr


@pytest.mark.qemu
def test_inspect_watch_into_a_closed_pipe(bare_guest: object) -> None:
    ctl = bare_guest.ctl_path  # type: ignore[attr-defined]
    err = subprocess.run(
        ["bash", "-c", f"set -o pipefail; {sys.executable} -m host.cli inspect --control {ctl} "
         "--watch 0.1 | head -n 3 > /dev/null"],
        capture_output=True, text=True, timeout=60, cwd=REPO,
    )  # fmt: skip
    assert err.returncode == 0, err.stderr
    assert err.stderr == ""  # no BrokenPipeError, no "Exception ignored"
