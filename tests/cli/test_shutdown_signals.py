"""Repeated stop signals end a long-running command instead of hanging it (vdev/shutdown.py).

The hang this guards against: a handler that calls ``Event.set`` runs again when a second
signal lands while the first is inside ``set``, and waits for the condition lock its own
thread holds.  A benchmark worker signalled by ``timeout`` and by its parent hung so, with
its socket open, for good."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from vdev.shutdown import StopOnSignals


def test_a_second_signal_inside_the_first_handlers_set_returns_at_once() -> None:
    """The nested delivery is made while the event's condition lock is held, exactly where
    a real second signal lands; it must not wait for that lock."""
    stop = threading.Event()
    handler = StopOnSignals(stop, signals=())
    real_set = stop.set
    nested: list[bool] = []

    def set_interrupted() -> None:
        if not nested:
            with stop._cond:  # type: ignore[attr-defined]  # as Event.set holds it
                nested.append(True)
                handler._handle(signal.SIGTERM, None)  # the second signal, mid-set
        real_set()

    stop.set = set_interrupted  # type: ignore[method-assign]
    t = threading.Thread(target=handler._handle, args=(signal.SIGINT, None), daemon=True)
    t.start()
    t.join(5)
    assert not t.is_alive(), "the nested handler waited for the lock its thread holds"
    assert nested and stop.is_set()
    assert handler.received is signal.SIGINT  # the first one is the one reported


def test_a_burst_of_signals_stops_vdev_serve_and_cleans_up(tmp_path: Path) -> None:
    sock = tmp_path / "serve.sock"
    proc = subprocess.Popen(
        [sys.executable, "-m", "host.cli", "serve", "--socket", str(sock)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while not sock.exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert sock.exists(), proc.stderr.read() if proc.poll() is not None else "no socket"
        for i in range(40):  # Ctrl-C held down, then a TERM from a supervisor
            proc.send_signal(signal.SIGINT if i % 4 else signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert "rx0" in out and not sock.exists()
