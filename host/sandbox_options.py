"""The bare driver's command line (``vdev sandbox --append``) and what it asks of QEMU.

The driver reads ``key=value`` words from its boot command line (guest/driver/README.md).
Most of them only change what the driver negotiates, but some features must also be
offered by QEMU's virtio-net-pci and by the vdev device, so the sandbox derives those from
the same words (one switch, both ends):

* ``packed=1``: QEMU offers VIRTIO_F_RING_PACKED only with ``packed=on``;
* ``mq=N`` (N > 1): QEMU needs ``mq=on`` and a vhost-user netdev with ``queues=N``, and the
  vdev NIC ``N`` queue pairs;
* ``msix=1``: QEMU needs MSI-X vectors, which QEMU 7.2 under TCG cannot combine with a
  vhost-user NIC (it crashes at DRIVER_OK: the irqfd path is KVM-only), so ``host.machine``
  gives the NIC vectors only under KVM; under TCG the driver finds no MSI-X capability and
  uses INTx, and the sandbox says so (``Sandbox.msix_note``).

Values the driver would ignore or reject are refused here with a one-line error naming
the word, so a typo does not boot a driver that silently runs with the defaults.
"""

from __future__ import annotations

from dataclasses import dataclass

MAX_PAIRS = 8  # the vdev NIC and the driver: up to 8 queue pairs
_BOOL_KEYS = (
    "event_idx",
    "mrg_rxbuf",
    "packed",
    "indirect",
    "csum",
    "tso",
    "irq",
    "msix",
)
_WORDS = ("legacy", "modern", "mmio")


class OptionError(ValueError):
    """A driver option with a bad value: the message names the word."""


@dataclass(frozen=True)
class DriverOptions:
    """The subset of the driver's options that the host side must follow."""

    packed: bool = False
    mq: int = 1
    msix: bool = False
    irq: bool = True
    legacy: bool = False

    @classmethod
    def parse(cls, append: str) -> DriverOptions:
        """Parse ``--append`` words; raises OptionError on a bad value of a known key."""
        values: dict[str, int] = {}
        legacy = False
        for word in append.split():
            if word in _WORDS:
                legacy = legacy or word == "legacy"
                continue
            key, eq, value = word.partition("=")
            if not eq:
                raise OptionError(f"--append {word!r}: expected key=value or legacy|modern|mmio")
            if key in _BOOL_KEYS:
                if value not in ("0", "1"):
                    raise OptionError(f"--append {word}: {key} is 0 or 1")
                values[key] = int(value)
            elif key == "mq":
                if not value.isdigit() or not 1 <= int(value) <= MAX_PAIRS:
                    raise OptionError(f"--append {word}: mq is 1..{MAX_PAIRS} queue pairs")
                values[key] = int(value)
            elif key == "transport":
                if value not in ("auto", *_WORDS):
                    raise OptionError(f"--append {word}: transport is auto|legacy|modern|mmio")
                legacy = legacy or value == "legacy"
            elif key in ("qsize", "irq_wd", "mmio_irq"):
                if not value.isdigit():
                    raise OptionError(f"--append {word}: {key} is a number")
            elif key == "intx":
                if value not in ("pic", "ioapic"):
                    raise OptionError(f"--append {word}: intx is pic or ioapic")
            # Anything else passes through: the driver ignores words it does not know.
        return cls(
            packed=bool(values.get("packed", 0)),
            mq=values.get("mq", 1),
            msix=bool(values.get("msix", 0)),
            irq=bool(values.get("irq", 1)),
            legacy=legacy,
        )

    def device_props(self, machine: str) -> str:
        """Extra ``-device virtio-net-*`` properties (``,key=value...``) QEMU needs."""
        props = ""
        if self.packed:
            if self.legacy:
                raise OptionError(
                    "--append packed=1 legacy: packed rings need a modern (VERSION_1) device"
                )
            props += ",packed=on"
        if self.msix and machine == "microvm":
            raise OptionError("--append msix=1: microvm's virtio-mmio has no MSI-X (use pc or q35)")
        return props

    @property
    def queue_pairs(self) -> int:
        return self.mq


__all__ = ["MAX_PAIRS", "DriverOptions", "OptionError"]
