"""Run one harness under libFuzzer (atheris): ``python -m fuzz.run TARGET [libFuzzer args]``.

The harness and every ``vdev`` module it imports are instrumented for coverage (atheris
instruments Python bytecode at import).  The compiled module is not instrumented for
coverage (gcc has no ``-fsanitize=fuzzer``); for the C paths the campaign loads the
ASan/UBSan build instead (``VDEV_NATIVE_SANITIZE=1``, see ``vdev/native/build.py``), so
memory errors and undefined behaviour there abort and count as crashes.
"""

from __future__ import annotations

import importlib
import sys

TARGETS = {
    "vhost": "fuzz.t_vhost",
    "virtqueue": "fuzz.t_virtqueue",
    "skywalk": "fuzz.t_skywalk",
    "scenario": "fuzz.t_scenario",
    "control": "fuzz.t_control",
}


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in TARGETS:
        sys.exit(f"usage: python -m fuzz.run {{{','.join(TARGETS)}}} [libFuzzer args]")
    import atheris

    name = sys.argv[1]
    with atheris.instrument_imports(include=["vdev", "fuzz"]):
        mod = importlib.import_module(TARGETS[name])
    setup = getattr(mod, "setup", None)
    if setup is not None:
        setup()
    atheris.Setup([sys.argv[0], *sys.argv[2:]], mod.one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
