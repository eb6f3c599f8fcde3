"""The environment of the commands pmu runs: as pmu found it, without what pmu set for its own process."""

from __future__ import annotations

import os
from typing import Final

OWN: Final = {"OPENBLAS_NUM_THREADS": "1"}
"""Set for pmu's process only: numpy's OpenBLAS threads otherwise spin for ~0.1 s of CPU at start-up, on
the CPU the traced program starts on. Set before numpy is imported; a value the user gave is kept."""

_added: set[str] = set()


def set_own() -> None:
    """Set OWN's variables that are not set already (call before importing numpy)."""
    for key, value in OWN.items():
        if key not in os.environ:
            os.environ[key] = value
            _added.add(key)


def for_commands() -> dict[str, str]:
    """The environment for a command pmu runs: pmu's own, without what `set_own` added."""
    return {k: v for k, v in os.environ.items() if k not in _added}
