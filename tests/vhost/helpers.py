"""Shared helpers: QEMU 7.2's start sequence through the front-end, ring allocation."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from vdev.vhost.codec import Request
from vdev.vhost.frontend import FrontendMemory, VhostUserFrontend
from vdev.virtio.driver import DriverQueue


@dataclass
class Ring:
    index: int
    num: int
    desc: int
    avail: int
    used: int
    kick: int
    call: int
    driver: DriverQueue | None = field(default=None, repr=False)


def alloc_ring(mem: FrontendMemory, index: int, num: int) -> Ring:
    desc = mem.alloc(16 * num, 16)
    avail = mem.alloc(6 + 2 * num, 2)
    used = mem.alloc(6 + 8 * num, 4)
    kick = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    call = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    return Ring(index, num, desc, avail, used, kick, call)


def qemu_start(
    fe: VhostUserFrontend,
    mem: FrontendMemory,
    *,
    num: int = 256,
    bases: tuple[int, int] = (0, 0),
    handshake: bool = True,
    drivers: bool = True,
) -> list[Ring]:
    """Handshake, then what QEMU 7.2 does at DRIVER_OK: features, status, memory, per ring
    NUM/BASE/ADDR/KICK/CALL, status DRIVER_OK, then SET_VRING_ENABLE 1 per ring."""
    if handshake:
        fe.handshake()
    fe.start(mem)
    rings = [alloc_ring(mem, i, num) for i in range(2)]
    for r in rings:
        if drivers:
            r.driver = DriverQueue(
                mem,
                num,
                r.desc,
                r.avail,
                r.used,
                features=fe.acked_features,
                start_idx=bases[r.index],
                init=True,
            )
        fe.setup_vring(r.index, num, r.desc, r.avail, r.used, r.kick, r.call, bases[r.index],
                       enable=False)  # fmt: skip
    fe.driver_ok()
    for r in rings:
        fe.set_vring_enable(r.index, True)
    return rings


def close_rings(rings: list[Ring]) -> None:
    for r in rings:
        if r.driver is not None:
            r.driver.close()
        os.close(r.kick)
        os.close(r.call)


QEMU_HANDSHAKE = [
    Request.GET_FEATURES,
    Request.GET_PROTOCOL_FEATURES,
    Request.SET_PROTOCOL_FEATURES,
    Request.GET_QUEUE_NUM,
    Request.GET_MAX_MEM_SLOTS,
    Request.SET_OWNER,
    Request.GET_FEATURES,
    Request.SET_VRING_CALL,
    Request.SET_VRING_ERR,
    Request.SET_VRING_CALL,
    Request.SET_VRING_ERR,
    Request.SET_VRING_ENABLE,
    Request.SET_VRING_ENABLE,
]

RING_SETUP = [
    Request.SET_VRING_NUM,
    Request.SET_VRING_BASE,
    Request.SET_VRING_ADDR,
    Request.SET_VRING_KICK,
    Request.SET_VRING_CALL,
]
