"""The runnable example in docs/skywalk.md stays runnable."""

from __future__ import annotations

import re
from pathlib import Path

DOC = Path(__file__).resolve().parents[2] / "docs" / "skywalk.md"


def test_docs_example_runs(capsys: object) -> None:
    text = DOC.read_text().split("## Example", 1)[1]
    match = re.search(r"```python\n(.*?)```", text, re.S)
    assert match is not None
    exec(compile(match.group(1), str(DOC), "exec"), {})
