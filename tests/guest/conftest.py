"""Fixtures for the bare-metal driver tests: the built ELF and booted guests.

Until the vdev device exists the guests use QEMU's own virtio-net backend with
``-netdev socket,udp=...`` (see ``host.bare_console.UdpLink``): the test sends and receives raw
Ethernet frames as UDP datagrams. Every guest runs under a wall-clock limit and is killed when
the test ends.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from pathlib import Path

import pytest

from host.bare_console import (
    BareGuest,
    Machine,
    Transport,
    UdpLink,
    bare_guest_with_udp,
)

BootFn = Callable[..., AbstractContextManager[tuple[BareGuest, UdpLink]]]


# ``bare_elf`` (session) comes from the vdev pytest plugin (host/device_fixtures.py).


@pytest.fixture
def boot(bare_elf: Path) -> Iterator[BootFn]:
    """``with boot(machine=..., transport=..., append=...) as (guest, link):``"""

    def _boot(
        machine: Machine = "pc",
        transport: Transport = "pci",
        append: str = "",
        extra: Sequence[str] = (),
    ) -> AbstractContextManager[tuple[BareGuest, UdpLink]]:
        return bare_guest_with_udp(
            bare_elf, machine=machine, transport=transport, append=append, extra=extra
        )

    yield _boot
