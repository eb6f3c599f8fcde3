"""Where the unwinder of C++ exceptions (and of forced unwinds: pthread_cancel, pthread_exit) starts in a
process: its entry points in whichever mapped file defines them (libgcc_s, LLVM's libunwind, or a
program linked with -static-libgcc).

A hijacked return address is no code the unwinder knows (no FDE covers the return trampoline), so an
exception thrown through a frame whose return pmu hijacked ends in std::terminate, with pmu's return
probes as with the kernel's uretprobes. The tracer breaks at these entries and puts every hijacked return
address of the throwing thread back first, as uftrace does before unwinding, and at the handler's
__cxa_begin_catch hijacks again the frames the exception left alive (those below the catching frame
were unwound: dropped, as frames left by longjmp).
"""

from __future__ import annotations

import functools
import os

from elftools.elf.elffile import ELFFile
from elftools.elf.sections import SymbolTableSection

from pmu.trace.maps import addresses_of, read_maps

UNWIND = ("_Unwind_RaiseException", "_Unwind_Resume_or_Rethrow", "_Unwind_ForcedUnwind")
"""Where an unwind begins (phase 1 of a throw, a rethrow, a forced unwind): _Unwind_Resume continues
one whose frames were put back already."""
CATCH = ("__cxa_begin_catch",)
"""Where a C++ handler begins: the stack is unwound to the catching frame."""
ENTRIES = UNWIND + CATCH


@functools.lru_cache(maxsize=1024)  # by file version: a process maps a few hundred files at most
def _entry_offsets(path: str, dev: int, ino: int, mtime_ns: int) -> tuple[tuple[str, int], ...]:
    """(name, file offset) of the unwinder entries `path` defines (none for most files)."""
    try:
        with open(path, "rb") as f:
            elf = ELFFile(f)
            loads = [seg for seg in elf.iter_segments() if seg["p_type"] == "PT_LOAD"]
            found: set[tuple[str, int]] = set()
            for name in (".dynsym", ".symtab"):
                section = elf.get_section_by_name(name)
                if not isinstance(section, SymbolTableSection):
                    continue
                for entry in ENTRIES:
                    for sym in section.get_symbol_by_name(entry) or []:
                        if sym["st_value"] and sym["st_shndx"] != "SHN_UNDEF":
                            found.add((entry, int(sym["st_value"])))
            offsets = []
            for entry, vaddr in sorted(found):
                for seg in loads:
                    if seg["p_vaddr"] <= vaddr < seg["p_vaddr"] + seg["p_filesz"]:
                        offsets.append((entry, vaddr - seg["p_vaddr"] + seg["p_offset"]))
            return tuple(offsets)
    except Exception:  # not an ELF file, or one pyelftools cannot read: it defines no unwinder
        return ()


def entry_addresses(pid: int) -> dict[int, str]:
    """Run-time addresses of the unwinder's entries in process `pid`, with each one's name."""
    maps = read_maps(pid)
    out: dict[int, str] = {}
    seen: set[tuple[int, int]] = set()
    for m in maps:
        if not (m.executable and m.path.startswith("/") and m.ino) or (m.dev, m.ino) in seen:
            continue
        seen.add((m.dev, m.ino))
        try:
            st = os.stat(m.path)
        except OSError:
            continue
        if (st.st_dev, st.st_ino) != (m.dev, m.ino):
            continue  # replaced on disk since it was mapped
        for name, offset in _entry_offsets(m.path, st.st_dev, st.st_ino, st.st_mtime_ns):
            for addr in addresses_of(maps, m.dev, m.ino, offset):
                out[addr] = name
    return out
