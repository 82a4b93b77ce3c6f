"""Feature-negotiation faults: a device that is not consistent about its feature bits.

Virtio 1.x "Feature Bits" (2.2) makes feature negotiation a contract: the device offers a
set, the driver acks a subset, and from FEATURES_OK on both sides use exactly the acked
set.  "Device Initialization" (3.1.1, step 6) has the driver re-read the status after
setting FEATURES_OK, because a device that cannot work with the subset refuses it by not
keeping FEATURES_OK ("Device Requirements: Feature Bits": the device SHOULD accept any
valid subset, otherwise it MUST fail to set FEATURES_OK).  Four ways to break it:

* ``feature_offer``: GET_FEATURES answers with ``bits`` added to the offer (unknown or
  reserved bits, or bits that conflict with the device: 5.1.3.1 "Feature bit requirements",
  e.g. GUEST_TSO4 without GUEST_CSUM once GUEST_CSUM is cleared) and ``clear`` removed from
  it.  Every GET_FEATURES is a candidate for the match keys.  A later GET_FEATURES that
  offers less than what a driver acked before is the "offer changed between resets" case.
* ``feature_withdraw``: the driver acks ``bits`` but the device behaves as if they were not
  negotiated (VERSION_1 + MRG_RXBUF withdrawn: it writes the 10-byte legacy header into a
  modern driver's buffers; EVENT_IDX withdrawn: it ignores used_event and never writes
  avail_event).
* ``feature_assume``: the device behaves as if ``bits`` were negotiated although the driver
  did not ack them (EVENT_IDX: it reads a used_event the driver never maintains;
  MRG_RXBUF on a legacy driver: the 12-byte header).
* ``refuse_features``: when the acked set holds every bit of ``when`` (default: any set),
  the device does not keep FEATURES_OK in its status (SET_STATUS keeps the other bits;
  GET_STATUS reads back without FEATURES_OK).

``feature_withdraw`` and ``feature_assume`` are decided at SET_FEATURES (each one is a
candidate) and last until the next SET_FEATURES, as a negotiation is a moment, not a
state: removing the rule does not change a running device's view, the driver's next
reset does.  The ring layout bit (VIRTIO_F_RING_PACKED) is not accepted there: the
backend builds the rings from what was acked, and a device that parsed another layout
would not be a feature fault but garbage.  Bit 30 is vhost-user's own
(VHOST_USER_F_PROTOCOL_FEATURES), never a virtio feature, and is refused everywhere.

What QEMU 7.2 lets a guest see of these is in docs/faults.md ("Feature negotiation").
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from vdev.abi import lib
from vdev.faults.predicates import PacketInfo
from vdev.faults.ring import RingAction

if TYPE_CHECKING:
    from vdev.faults.rules import Rule
    from vdev.net.nic import VirtioNet

STATUS_FEATURES_OK = 8  # 2.1 "Device Status Field"
VHOST_USER_F_PROTOCOL_FEATURES = 30
FEATURE_ACTIONS = ("feature_offer", "feature_withdraw", "feature_assume", "refuse_features")


def mask(bits: Sequence[int]) -> int:
    out = 0
    for b in bits:
        out |= 1 << b
    return out


def check_bits(name: str, bits: Sequence[int], *, layout_ok: bool) -> tuple[int, ...]:
    """``bits`` as a tuple, or ValueError naming the bad one (see the module docstring)."""
    for b in bits:
        if not 0 <= b <= 63:
            raise ValueError(f"bits: {b} is not a feature bit 0-63")
        if b == VHOST_USER_F_PROTOCOL_FEATURES:
            raise ValueError("bits: 30 is VHOST_USER_F_PROTOCOL_FEATURES, not a virtio feature")
        if b == lib.VIRTIO_F_RING_PACKED and not layout_ok:
            raise ValueError(f"bits: {name} cannot change the ring layout (34, RING_PACKED)")
    return tuple(bits)


class FeatureAction(RingAction):
    """Base of the feature actions: driven by the negotiation, not by a queue."""

    kind = "features"


@dataclass
class FeatureOffer(FeatureAction):
    bits: tuple[int, ...] = ()
    clear: tuple[int, ...] = ()
    name = "feature_offer"

    def __post_init__(self) -> None:
        check_bits(self.name, self.bits, layout_ok=True)
        check_bits(self.name, self.clear, layout_ok=True)
        if not self.bits and not self.clear:
            raise ValueError("bits: feature_offer needs bits to add or clear to remove")

    def params(self) -> dict[str, Any]:
        return {"bits": list(self.bits), "clear": list(self.clear)}


@dataclass
class _DeviceViewBits(FeatureAction):
    """Bits the device's own view of the negotiation differs in (withdraw, assume): never
    the ring layout, which the rings were built for."""

    bits: tuple[int, ...] = (lib.VIRTIO_RING_F_EVENT_IDX,)

    def __post_init__(self) -> None:
        check_bits(self.name, self.bits, layout_ok=False)

    def params(self) -> dict[str, Any]:
        return {"bits": list(self.bits)}


@dataclass
class FeatureWithdraw(_DeviceViewBits):
    name = "feature_withdraw"


@dataclass
class FeatureAssume(_DeviceViewBits):
    name = "feature_assume"


@dataclass
class RefuseFeatures(FeatureAction):
    when: tuple[int, ...] = ()
    name = "refuse_features"

    def __post_init__(self) -> None:
        check_bits(self.name, self.when, layout_ok=True)

    def params(self) -> dict[str, Any]:
        return {"when": list(self.when)}


class FeatureFaultSet:
    """The feature hooks of one NIC (``nic.feature_faults``), fed by the engine's rules.

    The NIC calls ``offer`` for every GET_FEATURES, ``negotiate`` for every SET_FEATURES
    (it returns the set the device will behave by) and ``status`` for every SET_STATUS."""

    def __init__(
        self, rules: Callable[[], list[Rule]], *, emit: Callable[..., Any], now: Callable[[], float]
    ) -> None:
        self._rules = rules
        self.emit = emit
        self.now = now
        self.refusing: str | None = None  # the rule that refused this negotiation

    def _fire(self, name: str) -> list[Rule]:
        out = []
        for rule in self._rules():
            if rule.action.name == name and rule.select(PacketInfo(None, self.now())):
                out.append(rule)
        return out

    def _hit(self, rule: Rule, nic: VirtioNet, kind: str, **detail: Any) -> None:
        rule.hits += 1
        self.emit(kind, rule=rule.id, nic=nic.name, queue=None, **detail)

    def offer(self, nic: VirtioNet, base: int) -> int:
        value = base
        for rule in self._fire("feature_offer"):
            action = rule.action
            assert isinstance(action, FeatureOffer)
            value = (value | mask(action.bits)) & ~mask(action.clear)
            self._hit(rule, nic, "feature_offer", base=hex(base), offered=hex(value))
        return value

    def negotiate(self, nic: VirtioNet, acked: int) -> int:
        value = acked
        self.refusing = None
        for rule in self._fire("feature_withdraw"):
            assert isinstance(rule.action, FeatureWithdraw)
            gone = acked & mask(rule.action.bits)
            value &= ~gone
            self._hit(rule, nic, "feature_withdraw", acked=hex(acked), withdrawn=hex(gone))
        for rule in self._fire("feature_assume"):
            assert isinstance(rule.action, FeatureAssume)
            extra = mask(rule.action.bits) & ~acked
            value |= extra
            self._hit(rule, nic, "feature_assume", acked=hex(acked), assumed=hex(extra))
        for rule in self._rules():
            action = rule.action
            if not isinstance(action, RefuseFeatures):
                continue
            want = mask(action.when)
            if acked & want == want and rule.select(PacketInfo(None, self.now())):
                self.refusing = rule.id
                self._hit(rule, nic, "features_refused", acked=hex(acked))
                break
        return value

    def status(self, nic: VirtioNet, value: int) -> int:
        if self.refusing is not None and value & STATUS_FEATURES_OK:
            self.emit(
                "features_ok_cleared", rule=self.refusing, nic=nic.name, queue=None, status=value
            )
            return value & ~STATUS_FEATURES_OK
        return value


def build(name: str, spec: Any, int_list: Callable[[Any, str], tuple[int, ...]]) -> FeatureAction:
    """The action for a rule spec (``rules.ACTIONS`` calls this with its list parser)."""

    def bits(key: str, default: tuple[int, ...]) -> tuple[int, ...]:
        return int_list(spec, key) if key in spec else default

    if name == "feature_offer":
        return FeatureOffer(bits("bits", ()), bits("clear", ()))
    if name == "feature_withdraw":
        return FeatureWithdraw(bits("bits", (lib.VIRTIO_RING_F_EVENT_IDX,)))
    if name == "feature_assume":
        return FeatureAssume(bits("bits", (lib.VIRTIO_RING_F_EVENT_IDX,)))
    if name == "refuse_features":
        return RefuseFeatures(bits("when", ()))
    raise ValueError(f"{name}: not a feature action")


__all__ = [
    "FEATURE_ACTIONS",
    "STATUS_FEATURES_OK",
    "FeatureAction",
    "FeatureAssume",
    "FeatureFaultSet",
    "FeatureOffer",
    "FeatureWithdraw",
    "RefuseFeatures",
    "build",
    "mask",
]
