"""The dynamic linker's rendezvous: where `_dl_debug_state` (r_debug.r_brk) lives in a process.

ld.so calls it after every change of the link map (startup, dlopen, dlclose), as debuggers rely on;
a breakpoint there tells the tracer when to look at the mappings again, without stopping the tracee on
every mmap.
"""

from __future__ import annotations

import functools
import struct

from elftools.elf.elffile import ELFFile
from elftools.elf.sections import SymbolTableSection

from pmu.trace.maps import read_maps

AT_BASE = 7
_SYMBOL = "_dl_debug_state"


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


@functools.lru_cache(maxsize=8)
def _symbol_vaddr(path: str, mtime: float) -> tuple[int, int] | None:
    """(symbol vaddr, lowest PT_LOAD vaddr) of _dl_debug_state in the dynamic linker at `path`."""
    with open(path, "rb") as f:
        elf = ELFFile(f)
        low = min(seg["p_vaddr"] for seg in elf.iter_segments() if seg["p_type"] == "PT_LOAD")
        for name in (".dynsym", ".symtab"):
            section = elf.get_section_by_name(name)
            if not isinstance(section, SymbolTableSection):
                continue
            for sym in section.get_symbol_by_name(_SYMBOL) or []:
                if sym["st_value"]:
                    return int(sym["st_value"]), int(low)
    return None


def debug_state_address(pid: int) -> int | None:
    """Run-time address of _dl_debug_state in process `pid`, or None (static binary, unknown ld.so)."""
    import os

    base = interpreter_base(pid)
    if base == 0:
        return None
    for m in read_maps(pid):
        if m.start == base and m.path.startswith("/"):
            found = _symbol_vaddr(m.path, os.stat(m.path).st_mtime)
            if found is None:
                return None
            vaddr, low = found
            return base + vaddr - low
    return None
