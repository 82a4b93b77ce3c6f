"""Fault injection for vdev: the device misbehaving, scriptably and reproducibly.

``FaultEngine(device).nic(0)`` (or ``device.nics[0].faults`` once an engine exists) is the
Python API; ``scenario.play`` runs TOML timelines; ``control.ControlServer`` serves the
``vdev ctl`` JSON protocol.  See docs/faults.md.
"""

from vdev.faults.engine import DeviceFault, FaultEngine, ManualClock, NicFaults, engine_stats
from vdev.faults.events import EventLog, FaultEvent
from vdev.faults.rules import Rule, SpecError, build_rule

__all__ = [
    "DeviceFault",
    "EventLog",
    "FaultEngine",
    "FaultEvent",
    "ManualClock",
    "NicFaults",
    "Rule",
    "SpecError",
    "build_rule",
    "engine_stats",
]
