"""The shared-memory ABI, read by cffi from the same C headers the guest driver compiles.

There is no second copy of any layout: the text between ``/* CDEF-BEGIN */`` and
``/* CDEF-END */`` in each header is handed to ``ffi.cdef`` verbatim (with integer
``#define`` constants, which cffi understands).  ``ffi`` works in ABI mode, so nothing is
compiled to read the layouts; struct sizes are checked against the C compiler's in tests.
"""

from __future__ import annotations

import re
from pathlib import Path

from cffi import FFI

ABI_DIR = Path(__file__).resolve().parent
HEADERS = ("skywalk.h", "virtio.h")
_CDEF_BLOCK = re.compile(r"/\* CDEF-BEGIN \*/(.*?)/\* CDEF-END \*/", re.S)


def cdef_text(name: str) -> str:
    """Return the cffi-parsable block of one header in this directory."""
    text = (ABI_DIR / name).read_text()
    match = _CDEF_BLOCK.search(text)
    if match is None:
        raise RuntimeError(f"{name}: no CDEF-BEGIN/CDEF-END block")
    # cffi cannot parse integer suffixes such as ULL in #define values.
    return re.sub(r"\b(0x[0-9a-fA-F]+|\d+)U?L?L?\b", r"\1", match.group(1))


def _build() -> FFI:
    ffi = FFI()
    for name in HEADERS:
        ffi.cdef(cdef_text(name))
    return ffi


ffi: FFI = _build()
# ABI-mode constants live on a "library" object; dlopen(None) gives one with no symbols.
lib = ffi.dlopen(None)

__all__ = ["ABI_DIR", "HEADERS", "cdef_text", "ffi", "lib"]
