"""The dynamic linker's rendezvous: where `_dl_debug_state` (r_debug.r_brk) and `_r_debug` live in a process.

ld.so calls _dl_debug_state after every change of the link map (startup, dlopen, dlclose), as debuggers
rely on; a breakpoint there tells the tracer when to look at the mappings again, without stopping the
tracee on every mmap. `_r_debug` says where ld.so is: before it ran (r_map still 0), adding objects
(RT_ADD), or done (RT_CONSISTENT).
"""

from __future__ import annotations

import functools
import os
import struct
from collections.abc import Callable

from elftools.elf.elffile import ELFFile
from elftools.elf.sections import SymbolTableSection

from pmu.trace.maps import read_maps

AT_BASE = 7
_DEBUG_STATE = "_dl_debug_state"
_R_DEBUG = "_r_debug"
RT_CONSISTENT = 0
"""r_debug.r_state when the link map is complete (after start-up and after each dlopen/dlclose)."""
RT_ADD = 1
"""r_debug.r_state while objects are being added (start-up, dlopen)."""
_R_DEBUG_LAYOUT = struct.Struct("<i4xQQi")
"""struct r_debug's head on x86-64: r_version, r_map, r_brk, r_state."""


def interpreter_base(pid: int) -> int:
    """AT_BASE from the auxiliary vector: the load address of the dynamic linker (0 if static)."""
    with open(f"/proc/{pid}/auxv", "rb") as f:
        data = f.read()
    for key, value in struct.iter_unpack("<QQ", data):
        if key == AT_BASE:
            return int(value)
        if key == 0:
            break
    return 0


@functools.lru_cache(maxsize=16)
def _symbol_vaddr(path: str, mtime: float, symbol: str = _DEBUG_STATE) -> tuple[int, int] | None:
    """(symbol vaddr, lowest PT_LOAD vaddr) of `symbol` in the dynamic linker at `path`."""
    with open(path, "rb") as f:
        elf = ELFFile(f)
        low = min(seg["p_vaddr"] for seg in elf.iter_segments() if seg["p_type"] == "PT_LOAD")
        for name in (".dynsym", ".symtab"):
            section = elf.get_section_by_name(name)
            if not isinstance(section, SymbolTableSection):
                continue
            for sym in section.get_symbol_by_name(symbol) or []:
                if sym["st_value"]:
                    return int(sym["st_value"]), int(low)
    return None


def _address(pid: int, symbol: str) -> int | None:
    base = interpreter_base(pid)
    if base == 0:
        return None
    for m in read_maps(pid):
        if m.start == base and m.path.startswith("/"):
            found = _symbol_vaddr(m.path, os.stat(m.path).st_mtime, symbol)
            if found is None:
                return None
            vaddr, low = found
            return base + vaddr - low
    return None


def debug_state_address(pid: int) -> int | None:
    """Run-time address of _dl_debug_state in process `pid`, or None (static binary, unknown ld.so)."""
    return _address(pid, _DEBUG_STATE)


def r_debug_address(pid: int) -> int | None:
    """Run-time address of the dynamic linker's `_r_debug` in process `pid`, or None."""
    return _address(pid, _R_DEBUG)


def link_map_state(read: Callable[[int, int], bytes], r_debug: int) -> tuple[int, int]:
    """(r_map, r_state) of the r_debug at `r_debug`, read with `read(addr, size)`: r_map is 0 until the
    dynamic linker has begun to start the program."""
    _, r_map, _, r_state = _R_DEBUG_LAYOUT.unpack(read(r_debug, _R_DEBUG_LAYOUT.size))
    return int(r_map), int(r_state)
