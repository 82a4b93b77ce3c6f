"""The control socket is private (issue 12 item 6): mode 0600 whatever the umask, set before
anyone can connect, and also when it replaces a stale socket file.

A permissive umask (0) would leave a bound socket at 0777; the mode must come from
``ControlServer`` itself.  "Before anyone can connect" is observed, not assumed: the test
wraps ``socket.listen`` and records each socket file's mode at the moment it starts
listening (the NIC's socket, made without a mode, shows what an unprotected one looks
like).
"""

from __future__ import annotations

import os
import socket
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from faults_helpers import device_with_nic

from vdev import socketpath
from vdev.faults.control import ControlServer, request


@pytest.fixture
def permissive_umask() -> Iterator[None]:
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def mode_of(path: str) -> int:
    st = os.stat(path)
    assert stat.S_ISSOCK(st.st_mode)
    return stat.S_IMODE(st.st_mode)


def test_mode_is_0600_under_umask_0_before_listen(
    tmp_path: Path, permissive_umask: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = str(tmp_path / "ctl.sock")
    seen: dict[str, int] = {}  # bound path -> its mode when listen() was called
    real = socketpath.socket.socket

    class Recording(real):  # type: ignore[misc, valid-type]
        def listen(self, *args: Any) -> None:
            name = self.getsockname()
            seen[name] = mode_of(name)
            super().listen(*args)

    monkeypatch.setattr(socketpath.socket, "socket", Recording)
    dev = device_with_nic(str(tmp_path))
    try:
        srv = ControlServer(dev, path)
        monkeypatch.setattr(socketpath.socket, "socket", real)
        assert seen[path] == 0o600 and mode_of(path) == 0o600
        # The NIC socket was made under the same umask without a mode: this check sees a
        # permissive socket when there is one.
        assert seen[str(tmp_path / "nic0.sock")] == 0o777
        dev.start()
        assert request(path, {"cmd": "ping"}) == {"ok": True, "pong": True}
        srv.close()
    finally:
        dev.close()


def test_a_stale_socket_is_replaced_private(tmp_path: Path, permissive_umask: None) -> None:
    path = str(tmp_path / "ctl.sock")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)  # a file left by a dead process, world-accessible under umask 0
    stale.close()
    assert mode_of(path) == 0o777
    dev = device_with_nic(str(tmp_path))
    try:
        srv = ControlServer(dev, path)
        assert mode_of(path) == 0o600
        srv.close()
    finally:
        dev.close()
