"""images/bare.py and the console helpers, without booting anything."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from host.bare_console import check_pattern_frame, parse_reply, pattern_frame
from images import bare


def test_missing_tool_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    real = shutil.which
    monkeypatch.setattr(bare.shutil, "which", lambda t: None if t == "ld" else real(t))
    with pytest.raises(bare.BareBuildError, match=r"'ld' not found.*apt-get install binutils"):
        bare.build_bare()


def test_build_is_cached_and_exports_symbols(bare_elf: Path) -> None:
    mtime = bare_elf.stat().st_mtime_ns
    assert bare.build_bare() == bare_elf
    assert bare_elf.stat().st_mtime_ns == mtime  # inputs unchanged: no rebuild
    data = bare_elf.read_bytes()
    assert data[:4] == b"\x7fELF" and data[4] == 1  # ELFCLASS32
    assert data.find((0x1BADB002).to_bytes(4, "little")) < 8192  # multiboot header in reach


def test_sources_cover_shared_abi() -> None:
    names = {p.name for p in bare.sources()}
    assert {"skywalk.h", "virtio.h", "stats.h", "link.ld", "boot.S", "main.c"} <= names


def test_parse_reply() -> None:
    r = parse_reply("OK rx received=3 bytes=180 min=60", ["! violation viol_used_len a=1 b=2"])
    assert r.ok and r.verb == "rx" and r.int("received") == 3 and r.fields["min"] == "60"
    assert r.pairs() == {"a": "1", "b": "2"}
    e = parse_reply("ERR unknown command 'x'", [])
    assert not e.ok and e.verb == "unknown"


def test_pattern_frame_roundtrip() -> None:
    f = pattern_frame(7, 100)
    assert len(f) == 100 and check_pattern_frame(f) == 7
    with pytest.raises(ValueError):
        check_pattern_frame(f[:-1])
    with pytest.raises(ValueError):
        check_pattern_frame(f[:50] + bytes([f[50] ^ 1]) + f[51:])
