"""The environment of the commands pmu runs: as pmu found it, without what pmu set for its own process."""

from __future__ import annotations

import os
import resource
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


START_ADDRESS_SPACE: Final = 80 << 20
"""Address space pmu must still be able to map when it starts: numpy's OpenBLAS maps a buffer of tens of MiB
when numpy is imported and, if it cannot, prints its own message and exits 1 from C, where pmu cannot
answer; with less than this left under `ulimit -v`, pmu could not run anyway (numpy alone takes ~130)."""


def check_address_space() -> None:
    """MemoryError if an address-space limit (ulimit -v) leaves less than START_ADDRESS_SPACE to map (call
    before importing numpy); nothing to do, and nothing done, without a limit."""
    import mmap

    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY:
        return
    try:
        probe = mmap.mmap(
            -1,
            START_ADDRESS_SPACE,
            flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
            prot=0,  # PROT_NONE: reserved, never touched
        )
    except OSError:
        raise MemoryError("address space limit") from None
    probe.close()
