"""Notice the vdev device failing under a running guest, and say why in one line.

A driver can carry on "successfully" against a device that has given up on it: with
``--append qsize=7`` the device refuses the ring (not a power of 2) and drops the
vhost-user connection, QEMU falls back to dropping the frames itself, and every ``tx`` still
answers OK. The watch turns that into a named failure:

* a queue the device killed for a ring-contract violation (``VirtioNet.kill_log``:
  ``HEAD_OOB``, ``INTERNALIZE_FAILED``, ...);
* a vhost-user connection that went away while QEMU still runs, or a request the device
  refused (the backend logs both at ERROR: ``vhost-user: SET_VRING_NUM num: 7 is not a
  power of 2 <= 32768; disconnecting``), with that message as the reason.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vdev.net.device import Device

_LOGGERS = ("vdev.vhost", "vdev.net")
DISCONNECT_GRACE = 1.0  # seconds for QEMU to exit after the socket closes (a guest quit)


class _Capture(logging.Handler):
    def __init__(self, sink: list[str], lock: threading.Lock) -> None:
        super().__init__(level=logging.ERROR)
        self.sink = sink
        self.sink_lock = lock  # (logging.Handler holds its own self.lock around emit)

    def emit(self, record: logging.LogRecord) -> None:
        with self.sink_lock:
            self.sink.append(record.getMessage())


class DeviceWatch:
    """``check()`` returns the first device failure since the watch started, else None."""

    def __init__(self, device: Device, qemu_alive: Callable[[], bool], nic_index: int = 0) -> None:
        self.device = device
        self.qemu_alive = qemu_alive
        self.nic_index = nic_index
        self.failure: str | None = None
        self._records: list[str] = []
        self._lock = threading.Lock()
        self._handler = _Capture(self._records, self._lock)
        for name in _LOGGERS:
            logging.getLogger(name).addHandler(self._handler)
        self._kills_seen = len(device.nics[nic_index].kill_log)
        self._connected = False

    def close(self) -> None:
        for name in _LOGGERS:
            logging.getLogger(name).removeHandler(self._handler)

    def _last_error(self) -> str:
        with self._lock:
            return self._records[-1] if self._records else ""

    def check(self) -> str | None:
        if self.failure is not None:
            return self.failure
        nic = self.device.nics[self.nic_index]
        with self.device.lock:
            kills = nic.kill_log[self._kills_seen :]
            entry = self.device.sockets[self.nic_index]
            backend = entry.backend
            up = backend is not None and not getattr(backend, "closed", False)
            ever = getattr(entry, "connections", 0) > 0
        if kills:
            index, err = kills[0]
            kind = "rx" if index % 2 == 0 else "tx"
            self.failure = f"the device killed queue {index} ({kind}{index // 2}): {err}"
            return self.failure
        if up:
            self._connected = True
            with self._lock:
                refused = [r for r in self._records if "failure reply" in r]
            if refused:
                self.failure = f"the device refused a request: {refused[0]}"
            return self.failure
        if self._connected or ever:
            # Closed while QEMU runs is a failure; closed because QEMU is exiting (the
            # guest quit) is not: give QEMU a moment to go.
            end = time.monotonic() + DISCONNECT_GRACE
            while self.qemu_alive() and time.monotonic() < end:
                time.sleep(0.05)
            if self.qemu_alive():
                reason = self._last_error() or "the connection closed"
                self.failure = f"the device dropped its vhost-user connection: {reason}"
        return self.failure


__all__ = ["DeviceWatch"]
