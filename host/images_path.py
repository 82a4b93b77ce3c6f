"""Make the checkout's top-level ``images`` package importable.

The image recipes live in ``images/`` next to ``host/``. When vdev is pip-installed
(editable) and the package list in pyproject.toml does not include ``images*``, ``import
images`` only works from the checkout root. Importing this module appends the checkout to
``sys.path`` in that case (and does nothing once ``images`` is importable).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parent.parent


def ensure_images_importable() -> None:
    if (
        importlib.util.find_spec("images") is None
        and (CHECKOUT / "images" / "__init__.py").exists()
    ):
        sys.path.append(str(CHECKOUT))


ensure_images_importable()
