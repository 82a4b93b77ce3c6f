"""cffi's idea of every struct in vdev/abi/*.h must equal gcc's, on x86_64 and i386."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from vdev.abi import ABI_DIR, HEADERS, ffi


def _c_program() -> tuple[str, list[str]]:
    lines = ["#include <stdio.h>", "#include <stddef.h>"]
    lines += [f'#include "{h}"' for h in HEADERS]
    lines.append("int main(void) {")
    expected: list[str] = []
    for name in ffi.list_types()[1]:
        t = ffi.typeof(f"struct {name}")
        lines.append(f'printf("{name} size %zu\\n", sizeof(struct {name}));')
        expected.append(f"{name} size {ffi.sizeof(t)}")
        for fname, field in t.fields:
            lines.append(f'printf("{name}.{fname} %zu\\n", offsetof(struct {name}, {fname}));')
            expected.append(f"{name}.{fname} {field.offset}")
    lines += ["return 0;", "}"]
    return "\n".join(lines), expected


@pytest.mark.parametrize("arch", ["-m64", "-m32"])
def test_cffi_layout_matches_gcc(arch: str, tmp_path: Path) -> None:
    if shutil.which("gcc") is None:
        pytest.skip("gcc not installed")
    src, expected = _c_program()
    (tmp_path / "t.c").write_text(src)
    exe = tmp_path / "t"
    res = subprocess.run(
        [
            "gcc",
            arch,
            "-std=c99",
            "-Wall",
            "-I",
            str(ABI_DIR),
            "-o",
            str(exe),
            str(tmp_path / "t.c"),
        ],
        capture_output=True,
        text=True,
    )
    if res.returncode != 0:
        if arch == "-m32":
            pytest.skip(f"gcc -m32 cannot build/link (gcc-multilib missing?): {res.stderr[-300:]}")
        pytest.fail(res.stderr)
    out = subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout
    assert out.split("\n")[:-1] == expected
