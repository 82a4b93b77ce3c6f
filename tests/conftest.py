"""Suite-wide settings.

Under CI (``CI`` set, as .ci/run is started) hypothesis runs derandomized, so a CI run is
reproducible; local runs keep exploring new examples (and print the seed of any failure).
"""

from __future__ import annotations

import os

from hypothesis import settings

settings.register_profile("ci", derandomize=True, print_blob=True)
settings.register_profile("dev", print_blob=True)
settings.load_profile("ci" if os.environ.get("CI") else "dev")
