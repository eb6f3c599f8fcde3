"""Where a probe lands: ELF symbols to (file, offset) as kernel uprobes key them, via pyelftools, capstone.

`resolve_target` turns an event's TARGET (None, a path, a library short name) into the realpath of an ELF
file; `resolve_probe` turns its LOCATION into a ResolvedProbe (file identity, virtual address, file
offset), checking that an offset lands on an instruction boundary; `list_functions` is `perf probe -F`.
Parsed ELF facts are cached per file version, so resolving many events on libc or libpython is cheap.
"""

from __future__ import annotations

import bisect
import contextlib
import difflib
import fnmatch
import functools
import os
import re
import stat
import subprocess
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from pmu.errors import FileError, LibraryError, PmuError, SymbolError, UsageError
from pmu.events.spec import ProbeKind, ProbeSpec
from pmu.events.usdt import UsdtArg

_ELF_MAGIC = b"\x7fELF"
_EM_X86_64 = 62
_MAX_INSN = 15
"""Longest x86-64 instruction, in bytes."""

LDCONFIG_PATHS = ("/sbin/ldconfig", "/usr/sbin/ldconfig")
"""The system's ldconfig, by absolute path only: pmu often runs as root, and an `ldconfig` found through
$PATH (a directory of the user's, the current one) would run as root too. Run with a fixed environment."""

_STANDARD_DIRS = (
    "/lib/x86_64-linux-gnu",
    "/usr/lib/x86_64-linux-gnu",
    "/lib64",
    "/usr/lib",
    "/usr/local/lib",
)

_STT_NOTYPE, _STT_FUNC, _STT_GNU_IFUNC = 0, 2, 10
_STB_LOCAL = 0
_SHN_UNDEF, _SHN_LORESERVE = 0, 0xFF00
_SHF_EXECINSTR = 0x4
_PF_X = 0x1
_VERSYM_HIDDEN = 0x8000
_SYM_DTYPE = np.dtype(
    [
        ("name", "<u4"),
        ("info", "u1"),
        ("other", "u1"),
        ("shndx", "<u2"),
        ("value", "<u8"),
        ("size", "<u8"),
    ]
)
"""Elf64_Sym, little-endian: symbol tables are read as numpy arrays (pyelftools' per-symbol parsing is
too slow for the tens of thousands of symbols of a large library)."""


@dataclass(frozen=True)
class FileKey:
    """How the kernel keys uprobes: the file's identity (device, inode), whatever path reached it."""

    dev: int
    """os.stat().st_dev of the file."""
    ino: int
    """os.stat().st_ino of the file."""

    @staticmethod
    def of(path: str) -> FileKey:
        """The identity of the file at `path` (FileError if it cannot be stat'ed)."""
        st = _stat(path)
        return FileKey(dev=st.st_dev, ino=st.st_ino)


def _stat(path: str) -> os.stat_result:
    """os.stat(path), its failures as one-line FileErrors."""
    try:
        return os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        raise FileError(f"no such file: {path}") from None
    except OSError as err:
        raise FileError(f"cannot read {path}: {err.strerror}") from None


@dataclass(frozen=True)
class ResolvedProbe:
    """A probe location in one file: what the breakpoint machinery needs, and how to name it."""

    path: str
    """Realpath of the ELF file."""
    key: FileKey
    """The file's identity; with file_offset, the probe's key."""
    vaddr: int
    """ELF virtual address of the probed instruction."""
    file_offset: int
    """Offset in the file, as kernel uprobes take it: vaddr - p_vaddr + p_offset of its executable PT_LOAD."""
    symbol: str | None
    """The function holding the probe (as the user named it), or None for an address outside any symbol."""
    sym_offset: int
    """Offset of the probe from the symbol's start (0 when symbol is None)."""
    description: str
    """How to name the location to a user, e.g. "work+0x4 in /tmp/hot"."""
    ifunc: bool = False
    """The symbol is a GNU indirect function: the probe is on its resolver (run once, at binding), not on
    the implementation it selects (libc's strlen, memcpy)."""
    sites: tuple[tuple[int, int], ...] = ()
    """A USDT probe's sites, (file offset, vaddr) each, the first being file_offset and vaddr; () for
    a uprobe (its one site)."""
    semaphore: int = 0
    """A USDT probe's semaphore (link-time vaddr of its u16), 0 when it has none."""
    usdt_args: tuple[UsdtArg, ...] = ()
    """A USDT probe's arguments, as the note's operands."""
    resolver: int = 0
    """For an IFUNC followed to its implementation: the resolver's vaddr (vaddr is the implementation's);
    0 otherwise."""

    def offsets(self) -> tuple[tuple[int, int], ...]:
        """(file offset, vaddr) of every site."""
        return self.sites or ((self.file_offset, self.vaddr),)


@dataclass(frozen=True)
class _Segment:
    """An executable PT_LOAD: the file bytes [offset, offset+filesz) mapped at [vaddr, vaddr+filesz)."""

    vaddr: int
    filesz: int
    offset: int

    def contains(self, vaddr: int) -> bool:
        return self.vaddr <= vaddr < self.vaddr + self.filesz


@dataclass(frozen=True)
class _Symbol:
    """A defined function symbol (aliases at one address are separate _Symbols)."""

    name: str
    value: int
    size: int
    """0 when unknown."""
    local: bool
    ifunc: bool
    section_end: int
    """End address of the symbol's section: a symbol of unknown size extends at most that far."""


@dataclass(frozen=True)
class _ElfInfo:
    """What resolution needs from one version of one ELF file."""

    path: str
    segments: tuple[_Segment, ...]
    """Executable PT_LOAD segments."""
    loads: tuple[_Segment, ...]
    """Every PT_LOAD segment (the read-only data of jump tables is in one of these)."""
    by_name: Mapping[str, tuple[_Symbol, ...]]
    """Function symbols by name (versioned dynamic names as `name@VER`/`name@@VER` too), one per address."""
    starts: tuple[int, ...]
    """Sorted distinct function start addresses."""
    at_start: tuple[_Symbol, ...]
    """The preferred name at each start (parallel to starts), with the largest size seen there."""
    entries: frozenset[int] = frozenset()
    """The starts as a set."""
    go: bool = False
    """A Go program (.go.buildinfo or .note.go.buildid): its goroutines' stacks move."""

    def segment(self, vaddr: int) -> _Segment | None:
        return next((seg for seg in self.segments if seg.contains(vaddr)), None)


def _one_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


def _elf_error(path: str, why: str) -> FileError:
    return FileError(f"not an ELF file: {path} ({why})")


def _open_checked(path: str) -> os.stat_result:
    """stat `path` for reading, mapping failures to FileError."""
    st = _stat(path)
    if stat.S_ISDIR(st.st_mode):
        raise _elf_error(path, "a directory")
    if not stat.S_ISREG(st.st_mode):
        raise _elf_error(path, "not a regular file")
    return st


def _read_head(path: str, n: int) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(n)
    except PermissionError:
        raise FileError(f"cannot read {path}: permission denied") from None
    except OSError as err:
        raise FileError(f"cannot read {path}: {err.strerror}") from None


def _check_elf_file(path: str) -> None:
    """FileError unless `path` is a readable regular file starting with the ELF magic."""
    _open_checked(path)
    if _read_head(path, 4) != _ELF_MAGIC:
        raise FileError(f"not an ELF file: {path}")


def _is_x86_64_elf(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(20)
    except OSError:
        return False
    return (
        len(head) == 20
        and head[:4] == _ELF_MAGIC
        and head[4] == 2  # ELFCLASS64
        and head[5] == 1  # ELFDATA2LSB
        and int.from_bytes(head[18:20], "little") == _EM_X86_64
    )


# ----------------------------------------------------------------------------------------------------
# Targets and libraries


def resolve_target(target: str | None, exe: str | None, mapped: Sequence[str] = ()) -> str:
    """The realpath of the ELF file an event's TARGET names.

    None is the command's executable `exe` (already resolved by the caller); a TARGET with '/' is a path
    that must be a readable ELF file; anything else is a library short name, looked up by
    `library_candidates` (first in `mapped`, the realpaths a running process maps).
    """
    if target is None:
        if exe is None:
            raise UsageError(
                "the event needs a target when no command is given (write uprobe:TARGET:LOCATION)"
            )
        return exe
    if "/" in target:
        _check_elf_file(target)
        return os.path.realpath(target)
    found = next(_iter_library_candidates(target, mapped), None)
    if found is None:
        message = f"unknown library '{target}': not mapped by the process, not in the ld.so cache"
        if os.path.exists(target):
            message += f" (for the file in the current directory, write ./{target})"
        raise LibraryError(message)
    return found


def library_candidates(name: str, mapped: Sequence[str] = ()) -> list[str]:
    """Realpaths of the x86-64 ELF libraries a short name may mean, best first, without duplicates.

    Searched in order: `mapped` (files a traced process maps), the ld.so cache (`ldconfig -p`), then the
    standard library directories. `name` matches a file named `name`, `name.so*`, `name.*` when name
    holds ".so" (libz.so.1 -> libz.so.1.2.13), or `name-VERSION.so` (old glibc's libc-2.31.so).
    """
    return list(_iter_library_candidates(name, mapped))


def _name_matches(name: str, basename: str) -> bool:
    if basename == name or basename.startswith(name + ".so"):
        return True
    if ".so" in name and basename.startswith(name + "."):
        return True
    return re.fullmatch(re.escape(name) + r"-[0-9][0-9.]*\.so", basename) is not None


def _iter_library_candidates(name: str, mapped: Sequence[str]) -> Iterator[str]:
    seen: set[str] = set()

    def fresh(path: str) -> str | None:
        real = os.path.realpath(path)
        if real in seen or not os.path.isfile(real) or not _is_x86_64_elf(real):
            return None
        seen.add(real)
        return real

    for group in (_mapped_matches(name, mapped), _ld_cache_matches(name), _directory_matches(name)):
        for path in group:
            real = fresh(path)
            if real is not None:
                yield real


def _mapped_matches(name: str, mapped: Sequence[str]) -> Iterator[str]:
    matches = [path for path in mapped if _name_matches(name, os.path.basename(path))]
    # An exact basename first; otherwise keep the process's mapping order.
    yield from sorted(matches, key=lambda path: os.path.basename(path) != name)


def _ld_cache_matches(name: str) -> Iterator[str]:
    entries = _ld_cache()
    exact = [path for soname, path in entries if soname == name]
    yield from exact
    yield from (path for soname, path in entries if soname != name and _name_matches(name, soname))


@functools.cache
def _ld_cache() -> tuple[tuple[str, str], ...]:
    """(soname, path) of the x86-64 libraries in the ld.so cache, in the cache's order."""
    ldconfig = next((p for p in LDCONFIG_PATHS if os.access(p, os.X_OK)), None)
    if ldconfig is None:
        return ()
    try:
        out = subprocess.run(
            [ldconfig, "-p"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
            env={"LC_ALL": "C", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return ()
    return parse_ldconfig(out)


_LDCONFIG_LINE = re.compile(r"^\s+(\S+)\s+\(([^)]*)\)\s+=>\s+(\S.*?)\s*$")


def parse_ldconfig(output: str) -> tuple[tuple[str, str], ...]:
    """Parse `ldconfig -p` output into (soname, path) pairs, keeping x86-64 libraries only.

    Lines look like `\tlibz.so.1 (libc6,x86-64) => /lib/x86_64-linux-gnu/libz.so.1`; 32-bit entries
    (`(libc6)`) and x32 ones (`(libc6,x32)`) are skipped.
    """
    entries: list[tuple[str, str]] = []
    for line in output.splitlines():
        m = _LDCONFIG_LINE.match(line)
        if m is None:
            continue
        flags = [flag.strip() for flag in m.group(2).split(",")]
        if "x86-64" in flags:
            entries.append((m.group(1), m.group(3)))
    return tuple(entries)


def _directory_matches(name: str) -> Iterator[str]:
    for directory in _STANDARD_DIRS:
        try:
            names = os.listdir(directory)
        except OSError:
            continue
        matches = [entry for entry in names if _name_matches(name, entry)]
        # Exact name first, then the highest version (libfoo.so.2 before libfoo.so.1).
        matches.sort(key=_version_key, reverse=True)
        matches.sort(key=lambda entry: entry != name)
        yield from (os.path.join(directory, entry) for entry in matches)


def _version_key(basename: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"[0-9]+", basename))


# ----------------------------------------------------------------------------------------------------
# ELF parsing (cached per file version)


def _load(path: str) -> _ElfInfo:
    st = _open_checked(path)
    return _parse_elf(path, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=32)
def _parse_elf(path: str, dev: int, ino: int, size: int, mtime_ns: int) -> _ElfInfo:
    """Parse `path` (the other arguments identify its version, for the cache)."""
    if _read_head(path, 4) != _ELF_MAGIC:
        raise FileError(f"not an ELF file: {path}")
    from elftools.elf.elffile import ELFFile

    try:
        with open(path, "rb") as f:
            return _read_elf(ELFFile(f), path, size)
    except PmuError:
        raise
    except OSError as err:
        raise FileError(f"cannot read {path}: {err.strerror}") from None
    except Exception as err:  # pyelftools and construct raise many kinds of errors on corrupt input
        raise _elf_error(path, f"corrupt or truncated: {_one_line(err)}") from None


def _section_bytes(section: Any, path: str, file_size: int) -> bytes:
    if section["sh_type"] == "SHT_NOBITS":
        return b""
    if section["sh_offset"] + section["sh_size"] > file_size:
        raise _elf_error(path, f"truncated: section {section.name} extends past the end of the file")
    data: bytes = section.data()
    return data


def _read_elf(elf: Any, path: str, file_size: int) -> _ElfInfo:
    machine = elf["e_machine"]
    if elf.elfclass != 64 or machine != "EM_X86_64" or not elf.little_endian:
        kind = f"{elf.elfclass}-bit {str(machine).removeprefix('EM_')}"
        raise FileError(f"not an x86-64 ELF file: {path} ({kind})")
    if elf["e_type"] not in ("ET_EXEC", "ET_DYN"):
        raise FileError(f"not an executable or shared library: {path} ({elf['e_type']})")

    segments = tuple(
        _Segment(vaddr=seg["p_vaddr"], filesz=seg["p_filesz"], offset=seg["p_offset"])
        for seg in elf.iter_segments()
        if seg["p_type"] == "PT_LOAD" and seg["p_flags"] & _PF_X
    )
    for seg in segments:
        if seg.offset + seg.filesz > file_size:
            raise _elf_error(path, "truncated: an executable segment extends past the end of the file")
    loads = tuple(
        _Segment(vaddr=seg["p_vaddr"], filesz=seg["p_filesz"], offset=seg["p_offset"])
        for seg in elf.iter_segments()
        if seg["p_type"] == "PT_LOAD" and seg["p_offset"] + seg["p_filesz"] <= file_size
    )
    sections = list(elf.iter_sections())
    executable = np.array([bool(sec["sh_flags"] & _SHF_EXECINSTR) for sec in sections] + [False])
    section_ends = [sec["sh_addr"] + sec["sh_size"] for sec in sections]

    versions = _version_names(path, sections, file_size)
    candidates: dict[str, dict[int, _Symbol]] = {}

    def add(name: str, symbol: _Symbol) -> None:
        at = candidates.setdefault(name, {})
        old = at.get(symbol.value)
        if old is None:
            at[symbol.value] = replace(symbol, name=name)
        else:  # the same function seen in .symtab and .dynsym: merge what each knows
            at[symbol.value] = _merge(replace(old, name=name), symbol)

    def scan(
        sections: list[Any],
        executable: Any,
        section_ends: list[int],
        versions: dict[int, Any],
        where: str,
        file_bytes: int,
    ) -> None:
        for index, section in enumerate(sections):
            if section["sh_type"] not in ("SHT_SYMTAB", "SHT_DYNSYM"):
                continue
            if section["sh_entsize"] != _SYM_DTYPE.itemsize:
                raise _elf_error(where, f"corrupt: {section.name} entry size {section['sh_entsize']}")
            if section["sh_link"] >= len(sections):
                raise _elf_error(where, f"corrupt: {section.name} links to no string table")
            data = _section_bytes(section, where, file_bytes)
            strtab = _section_bytes(sections[section["sh_link"]], where, file_bytes)
            syms = np.frombuffer(data, dtype=_SYM_DTYPE, count=len(data) // _SYM_DTYPE.itemsize)
            sym_type = syms["info"] & 0xF
            shndx = syms["shndx"]
            defined = (shndx != _SHN_UNDEF) & (shndx < _SHN_LORESERVE) & (syms["name"] != 0)
            in_exec = executable[np.minimum(shndx, len(sections))]
            wanted = defined & (
                (sym_type == _STT_FUNC) | (sym_type == _STT_GNU_IFUNC) | ((sym_type == _STT_NOTYPE) & in_exec)
            )
            indices = np.flatnonzero(wanted)
            columns = zip(
                indices.tolist(),
                syms["name"][indices].tolist(),
                syms["value"][indices].tolist(),
                syms["size"][indices].tolist(),
                (syms["info"][indices] >> 4).tolist(),
                sym_type[indices].tolist(),
                shndx[indices].tolist(),
                strict=True,
            )
            versym = versions.get(index)
            for i, name_at, value, size, bind, typ, sec in columns:
                name_end = strtab.find(b"\0", name_at)
                if name_end < 0:
                    raise _elf_error(
                        where, f"corrupt: symbol name outside {sections[section['sh_link']].name}"
                    )
                name = strtab[name_at:name_end].decode("utf-8", "replace")
                symbol = _Symbol(
                    name=name,
                    value=value,
                    size=size,
                    local=bind == _STB_LOCAL,
                    ifunc=typ == _STT_GNU_IFUNC,
                    section_end=section_ends[sec] if sec < len(section_ends) else value + size,
                )
                version = versym[i] if versym is not None and i < len(versym) else None
                if version is None:
                    add(name, symbol)
                    if "@@" in name:  # a default-versioned name in .symtab answers to its plain name too
                        add(name.split("@@", 1)[0], symbol)
                elif version[1]:  # a hidden (non-default) version: reachable only by its versioned name
                    add(f"{name}@{version[0]}", symbol)
                else:
                    add(name, symbol)
                    add(f"{name}@@{version[0]}", symbol)

    scan(sections, executable, section_ends, versions, path, file_size)
    if not any(sec["sh_type"] == "SHT_SYMTAB" for sec in sections):
        # Stripped: the full symbol table of its separate debug file (or MiniDebugInfo), as gdb finds it.
        found = _debug_symbols(elf, path, sections, file_size)
        if found is not None:
            dsections, dsize, where = found
            dexec = np.array([bool(sec["sh_flags"] & _SHF_EXECINSTR) for sec in dsections] + [False])
            dends = [sec["sh_addr"] + sec["sh_size"] for sec in dsections]
            with contextlib.suppress(PmuError):  # a corrupt debug file does not make the file unusable
                scan(dsections, dexec, dends, {}, where, dsize)
    by_name = {name: tuple(at.values()) for name, at in candidates.items()}
    best: dict[int, _Symbol] = {}
    for symbols in by_name.values():
        for symbol in symbols:
            old = best.get(symbol.value)
            if old is None:
                best[symbol.value] = symbol
            else:  # aliases at one address: name it by the best alias
                keep = min(old, symbol, key=_name_rank)
                best[symbol.value] = _merge(keep, symbol if keep is old else old)
    starts = tuple(sorted(best))
    return _ElfInfo(
        path=path,
        segments=segments,
        loads=loads,
        by_name=by_name,
        starts=starts,
        at_start=tuple(best[start] for start in starts),
        entries=frozenset(starts),
        go=any(sec.name in (".go.buildinfo", ".note.go.buildid") for sec in sections),
    )


DEBUG_ROOT = "/usr/lib/debug"
"""Where separate debug files live, as gdb looks for them (its debug-file-directory)."""


def debug_file(elf: Any, path: str) -> str | None:
    """The separate debug file of a stripped ELF file, as gdb finds it: by build ID
    (DEBUG_ROOT/.build-id/xx/rest.debug), then by .gnu_debuglink's name next to the file, in its .debug
    directory and under DEBUG_ROOT (the link's CRC checked)."""
    import zlib

    build_id = None
    for section in elf.iter_sections():
        if section["sh_type"] == "SHT_NOTE":
            for note in section.iter_notes():
                if note["n_type"] == "NT_GNU_BUILD_ID" and note["n_name"] == "GNU":
                    build_id = note["n_desc"]
    if isinstance(build_id, str) and len(build_id) > 2:
        candidate = os.path.join(DEBUG_ROOT, ".build-id", build_id[:2], build_id[2:] + ".debug")
        if os.path.isfile(candidate):
            return candidate
    link = elf.get_section_by_name(".gnu_debuglink")
    if link is None:
        return None
    data = link.data()
    name = data.split(b"\0", 1)[0].decode("utf-8", "replace")
    crc_at = (len(name) + 4) & ~3
    want = int.from_bytes(data[crc_at : crc_at + 4], "little") if len(data) >= crc_at + 4 else None
    here = os.path.dirname(os.path.realpath(path))
    for candidate in (
        os.path.join(here, name),
        os.path.join(here, ".debug", name),
        os.path.join(DEBUG_ROOT, here.lstrip("/"), name),
    ):
        if candidate != os.path.realpath(path) and os.path.isfile(candidate):
            try:
                with open(candidate, "rb") as f:
                    crc = zlib.crc32(f.read())
            except OSError:
                continue
            if want is None or crc == want:
                return candidate
    return None


def _debug_symbols(
    elf: Any, path: str, sections: list[Any], file_size: int
) -> tuple[list[Any], int, str] | None:
    """The sections of the symbol tables that complete a stripped file: its debug file's, else its
    MiniDebugInfo's (.gnu_debugdata, an xz-compressed ELF holding .symtab, as Fedora ships)."""
    import io
    import lzma

    from elftools.elf.elffile import ELFFile

    try:
        found = debug_file(elf, path)
        if found is not None:
            with open(found, "rb") as f:
                data = f.read()
            return list(ELFFile(io.BytesIO(data)).iter_sections()), len(data), found
        mini = elf.get_section_by_name(".gnu_debugdata")
        if mini is not None:
            data = lzma.decompress(_section_bytes(mini, path, file_size))
            return list(ELFFile(io.BytesIO(data)).iter_sections()), len(data), f"{path} (.gnu_debugdata)"
    except (OSError, lzma.LZMAError, ValueError):
        return None
    except Exception:  # a corrupt debug file is no reason to refuse the file itself
        return None
    return None


def _merge(keep: _Symbol, other: _Symbol) -> _Symbol:
    """keep, completed with what `other` (the same function under another entry) knows."""
    return replace(
        keep,
        size=max(keep.size, other.size),
        local=keep.local and other.local,
        ifunc=keep.ifunc or other.ifunc,
        section_end=max(keep.section_end, other.section_end),
    )


def _name_rank(symbol: _Symbol) -> tuple[bool, bool, int, int, str]:
    """Which alias names an address best: global, unversioned, fewest leading '_', shortest."""
    name = symbol.name
    return (symbol.local, "@" in name, len(name) - len(name.lstrip("_")), len(name), name)


def _version_names(
    path: str, sections: list[Any], file_size: int
) -> dict[int, list[tuple[str, bool] | None]]:
    """For each dynamic symbol table (by section index): per symbol, (version name, hidden) or None.

    .gnu.version_d is walked here with bounded loops: pyelftools' iterator never ends on a corrupt
    chain (vd_next or vda_next pointing back).
    """
    defined: dict[int, str] = {}
    for section in sections:
        if section["sh_type"] != "SHT_GNU_verdef" or section["sh_link"] >= len(sections):
            continue
        data = _section_bytes(section, path, file_size)
        strtab = _section_bytes(sections[section["sh_link"]], path, file_size)
        at = 0
        for _ in range(min(section["sh_info"], len(data) // 20)):
            if at + 20 > len(data):
                break
            flags, ndx, count = (int.from_bytes(data[at + i : at + i + 2], "little") for i in (2, 4, 6))
            aux = at + int.from_bytes(data[at + 12 : at + 16], "little")
            if count and aux + 8 <= len(data) and not flags & 0x1:  # skip VER_FLG_BASE (the soname)
                name_at = int.from_bytes(data[aux : aux + 4], "little")
                name_end = strtab.find(b"\0", name_at)
                if name_end >= 0:
                    defined[ndx] = strtab[name_at:name_end].decode("utf-8", "replace")
            step = int.from_bytes(data[at + 16 : at + 20], "little")
            if step == 0:
                break
            at += step
    result: dict[int, list[tuple[str, bool] | None]] = {}
    if not defined:
        return result
    for section in sections:
        if section["sh_type"] != "SHT_GNU_versym":
            continue
        data = _section_bytes(section, path, file_size)
        entries = np.frombuffer(data, dtype="<u2", count=len(data) // 2).tolist()
        result[section["sh_link"]] = [
            (defined[ver & 0x7FFF], bool(ver & _VERSYM_HIDDEN)) if ver & 0x7FFF in defined else None
            for ver in entries
        ]
    return result


# ----------------------------------------------------------------------------------------------------
# Probes


@functools.cache
def _disassembler() -> Any:
    import capstone

    return capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)


def _read_code(info: _ElfInfo, segment: _Segment, vaddr: int, length: int) -> bytes:
    length = max(0, min(length, segment.vaddr + segment.filesz - vaddr))
    try:
        with open(info.path, "rb") as f:
            f.seek(vaddr - segment.vaddr + segment.offset)
            return f.read(length)
    except OSError as err:
        raise FileError(f"cannot read {info.path}: {err.strerror}") from None


def _check_boundary(info: _ElfInfo, symbol: str, start: int, offset: int, what: str) -> None:
    """SymbolError unless start+offset begins an instruction when decoding from the symbol's start."""
    segment = info.segment(start)
    if segment is None:
        raise SymbolError(f"{symbol} is not in an executable segment of {info.path}")
    code = _read_code(info, segment, start, offset + _MAX_INSN)
    target = start + offset
    reached = start
    for address, insn_size, mnemonic, op_str in _disassembler().disasm_lite(code, start):
        if address == target:
            return
        if address < target < address + insn_size:
            insn = f"{mnemonic} {op_str}".strip()
            raise SymbolError(
                f"{what} is inside the instruction at {symbol}+{address - start:#x} ({insn}) in {info.path}"
            )
        reached = address + insn_size
        if reached > target:
            break
    raise SymbolError(
        f"cannot check that {what} is on an instruction boundary of {symbol} in {info.path}: "
        f"no instruction decodes at {symbol}+{reached - start:#x}"
    )


def _lookup(info: _ElfInfo, name: str) -> _Symbol:
    symbols = info.by_name.get(name)
    if not symbols:
        message = f"unknown symbol '{name}' in {info.path}"
        close = difflib.get_close_matches(name, list(info.by_name), n=3)
        if close:
            message += f" (did you mean: {', '.join(close)}?)"
        elif not info.by_name:
            message += " (it has no function symbols; probe an address, 0xADDR)"
        raise SymbolError(message)
    if len(symbols) > 1:
        globals_ = [symbol for symbol in symbols if not symbol.local]
        if len(globals_) == 1:
            return globals_[0]
        where = ", ".join(f"{symbol.value:#x}" for symbol in sorted(symbols, key=lambda s: s.value))
        raise SymbolError(
            f"symbol '{name}' is ambiguous in {info.path}: defined at {where} (probe one by address, 0xADDR)"
        )
    return symbols[0]


def _containing(info: _ElfInfo, vaddr: int, segment: _Segment) -> _Symbol | None:
    """The function holding vaddr; a symbol of unknown size extends to the next one (or its section's end)."""
    index = bisect.bisect_right(info.starts, vaddr) - 1
    for i in range(index, max(index - 8, -1), -1):
        symbol = info.at_start[i]
        if symbol.size:
            extent = symbol.size
        else:
            following = info.starts[i + 1] if i + 1 < len(info.starts) else symbol.section_end
            extent = min(following, symbol.section_end, segment.vaddr + segment.filesz) - symbol.value
        if symbol.value <= vaddr < symbol.value + extent and segment.contains(symbol.value):
            return symbol
        if not symbol.size:
            break
    return None


def _describe(symbol: str | None, offset: int, vaddr: int, path: str) -> str:
    if symbol is None:
        return f"{vaddr:#x} in {path}"
    return f"{symbol}+{offset:#x} in {path}" if offset else f"{symbol} in {path}"


def resolve_probe(spec: ProbeSpec, path: str) -> ResolvedProbe:
    """Resolve spec's LOCATION in the ELF file `path` (a realpath from resolve_target).

    Raises SymbolError for an unknown or ambiguous symbol, an offset past the symbol's end or inside an
    instruction, an address outside the executable segments, or a uretprobe not on a function entry;
    FileError when `path` is not a readable x86-64 ELF executable or shared library.
    """
    info = _load(path)
    ifunc = False
    if spec.kind is ProbeKind.USDT:
        return _resolve_usdt(spec, path, info)
    if spec.symbol is not None:
        found = _lookup(info, spec.symbol)
        symbol: str | None = spec.symbol
        offset = spec.offset
        ifunc = found.ifunc
        if found.size and offset >= found.size:
            raise SymbolError(
                f"offset {offset:#x} is past the end of {spec.symbol} (size {found.size:#x}) in {path}"
            )
        vaddr = found.value + offset
        segment = info.segment(vaddr)
        if segment is None:
            where = _describe(spec.symbol, offset, vaddr, path).removesuffix(f" in {path}")
            raise SymbolError(f"{where} is not in an executable segment of {path}")
        if offset:
            _check_boundary(info, spec.symbol, found.value, offset, f"offset {offset:#x}")
    else:
        assert spec.address is not None
        vaddr = spec.address
        segment = info.segment(vaddr)
        if segment is None:
            raise SymbolError(f"address {vaddr:#x} is not in an executable segment of {path}")
        holder = _containing(info, vaddr, segment)
        symbol, offset = None, 0
        if holder is not None:
            found = holder
            symbol, offset, ifunc = found.name, vaddr - found.value, found.ifunc
            if offset:
                _check_boundary(info, found.name, found.value, offset, f"address {vaddr:#x}")
        if spec.kind is ProbeKind.URETPROBE and offset:
            raise SymbolError(
                f"uretprobe at {vaddr:#x} is not on a function entry: it is {symbol}+{offset:#x} in {path}"
            )
    resolver = 0
    if ifunc and spec.symbol is not None and not offset:
        chosen = ifunc_choice(path, spec.symbol)
        if chosen is not None and info.segment(chosen) is not None:
            resolver, vaddr = vaddr, chosen
            segment = info.segment(vaddr)
            assert segment is not None
            holder = _containing(info, vaddr, segment)
            symbol = holder.name if holder is not None else None
    if spec.kind is ProbeKind.URETPROBE and info.go:
        raise SymbolError(
            f"uretprobe:{symbol or hex(vaddr)}: {path} is a Go program, whose goroutine stacks move as they"
            " grow and cannot carry a hijacked return address (kernel uretprobes crash it): probe the"
            " entry (uprobe:) instead"
        )
    return ResolvedProbe(
        path=path,
        key=FileKey.of(path),
        vaddr=vaddr,
        file_offset=vaddr - segment.vaddr + segment.offset,
        symbol=symbol,
        sym_offset=offset,
        description=(
            f"{spec.symbol}'s implementation {symbol or hex(vaddr)} (the IFUNC's choice) in {path}"
            if resolver
            else _describe(symbol, offset, vaddr, path)
        ),
        ifunc=ifunc,
        resolver=resolver,
    )


def ifunc_choice(path: str, name: str) -> int | None:
    """The vaddr in `path` of the implementation an IFUNC symbol resolves to on this machine, or None.

    Found in pmu's own process, which calls nothing for it: where pmu itself maps that very file (libc,
    libm: the libraries IFUNCs live in), dlsym of the name in it gives what the dynamic linker bound
    (the resolver ran when the library was loaded, on this CPU); that address, back in file terms, is
    the implementation any process of this machine binds to (the resolver's choice depends on the CPU's
    features; a GLIBC_TUNABLES setting that differs in the target is not seen)."""
    import ctypes

    key = FileKey.of(path)
    mine = [m for m in _self_maps() if (m.dev, m.ino) == (key.dev, key.ino)]
    if not mine:
        return None
    try:
        lib = ctypes.CDLL(path, mode=os.RTLD_NOLOAD | os.RTLD_LAZY)
        addr = ctypes.cast(getattr(lib, name.split("@")[0]), ctypes.c_void_p).value
    except (OSError, AttributeError):
        return None
    if not addr:
        return None
    for m in mine:
        if m.start <= addr < m.end:
            offset = addr - m.start + m.offset
            for seg in _load(path).segments:  # executable ones: an implementation is code
                if seg.offset <= offset < seg.offset + seg.filesz:
                    return offset - seg.offset + seg.vaddr
    return None


@dataclass(frozen=True)
class _Mapped:
    start: int
    end: int
    offset: int
    dev: int
    ino: int


def _self_maps() -> list[_Mapped]:
    """pmu's own file mappings (from /proc/self/maps)."""
    out = []
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split()
            if len(fields) < 6:
                continue
            start, end = (int(x, 16) for x in fields[0].split("-"))
            major, minor = (int(x, 16) for x in fields[3].split(":"))
            out.append(_Mapped(start, end, int(fields[2], 16), os.makedev(major, minor), int(fields[4])))
    return out


def _resolve_usdt(spec: ProbeSpec, path: str, info: _ElfInfo) -> ResolvedProbe:
    """A USDT probe's sites in path (every site of the name), its semaphore and arguments."""
    from pmu.events import usdt

    assert spec.symbol is not None
    found = usdt.find(path, spec.provider, spec.symbol)
    sites = []
    for note in found:
        segment = info.segment(note.pc)
        if segment is None:
            raise SymbolError(
                f"USDT probe {spec.symbol} at {note.pc:#x} is not in an executable segment of {path}"
            )
        sites.append((note.pc - segment.vaddr + segment.offset, note.pc))
    first = found[0]
    first_segment = info.segment(first.pc)
    assert first_segment is not None
    holder = _containing(info, first.pc, first_segment)
    where = f" (in {holder.name})" if holder is not None else ""
    return ResolvedProbe(
        path=path,
        key=FileKey.of(path),
        vaddr=first.pc,
        file_offset=sites[0][0],
        symbol=None,
        sym_offset=0,
        description=f"USDT {first.provider}:{first.name}{where} in {path}"
        + (f", {len(sites)} sites" if len(sites) > 1 else ""),
        sites=tuple(sites),
        semaphore=first.semaphore,
        usdt_args=first.args,
    )


def list_functions(path: str, pattern: str = "*") -> list[str]:
    """Sorted names of the function symbols defined in `path` that match the fnmatch glob `pattern`.

    Like `perf probe -F -x FILE`: .symtab and .dynsym, versioned dynamic names as name@@VER (default)
    and name@VER (hidden) besides the plain name. Every name listed can be probed.
    """
    info = _load(path)
    return sorted(name for name in info.by_name if fnmatch.fnmatchcase(name, pattern))


@dataclass(frozen=True)
class FunctionExtent:
    """The function holding a probe, as a jump patch needs it: where it starts, how long, its bytes, and
    for the jump-table check, the file's bytes at any mapped address and every function's start."""

    start: int
    """ELF virtual address of the function's first byte."""
    size: int
    code: bytes
    """The function's bytes as the file holds them (no breakpoint of ours in them)."""
    read: Callable[[int, int], bytes]
    """read(vaddr, size): the file's bytes there, as its PT_LOAD segments map them (ValueError if not
    all of them are in the file)."""
    entries: frozenset[int]
    """Every function symbol's start address."""
    pointed: Callable[[int, int], bool]
    """pointed(lo, hi): whether the file holds an address in [lo, hi) where code can take it from (see
    `code_pointers`)."""
    foreign: Callable[[int, int], tuple[int, int] | None] = lambda lo, hi: None
    """foreign(lo, hi): a direct branch of a nearby function into (lo, hi), as (its address, its
    target), or None (hand-written code jumps into its neighbours: glibc's mempcpy into memmove)."""


NEIGHBOURHOOD = 16384
"""How far around a function the code is searched for branches into it (`FunctionExtent.foreign`)."""


def function_extent(path: str, vaddr: int) -> FunctionExtent | None:
    """The function symbol holding `vaddr` in `path`, with its bytes; None outside any function."""
    info = _load(path)
    segment = info.segment(vaddr)
    if segment is None:
        return None
    symbol = _containing(info, vaddr, segment)
    if symbol is None:
        return None
    size = symbol.size
    if not size:
        index = info.starts.index(symbol.value)
        following = info.starts[index + 1] if index + 1 < len(info.starts) else symbol.section_end
        size = min(following, symbol.section_end, segment.vaddr + segment.filesz) - symbol.value
    code = _read_code(info, segment, symbol.value, size)
    return FunctionExtent(
        symbol.value,
        len(code),
        code,
        functools.partial(_read_mapped, info),
        info.entries,
        functools.partial(_pointed, info),
        functools.partial(_foreign_branch, info, segment, symbol.value, symbol.value + len(code)),
    )


def _foreign_branch(
    info: _ElfInfo, segment: _Segment, start: int, end: int, lo: int, hi: int
) -> tuple[int, int] | None:
    """A direct branch into (lo, hi) from the code of the other functions within NEIGHBOURHOOD of
    [start, end) (each decoded from its own start, once per file version)."""
    first = bisect.bisect_left(info.starts, max(segment.vaddr, start - NEIGHBOURHOOD))
    last = bisect.bisect_right(info.starts, min(segment.vaddr + segment.filesz, end + NEIGHBOURHOOD))
    for i in range(first, last):
        other = info.starts[i]
        if start <= other < end:
            continue
        following = info.starts[i + 1] if i + 1 < len(info.starts) else segment.vaddr + segment.filesz
        for address, target in _branches(info.path, other, min(following, segment.vaddr + segment.filesz)):
            if lo < target < hi and not start <= address < end:
                return address, target
    return None


@functools.lru_cache(maxsize=65536)
def _branches(path: str, start: int, end: int) -> tuple[tuple[int, int], ...]:
    """(address, target) of every direct jmp, jcc and call in the code [start, end) of path."""
    info = _load(path)
    segment = info.segment(start)
    if segment is None or end <= start:
        return ()
    try:
        code = _read_code(info, segment, start, end - start)
    except (OSError, ValueError, PmuError):
        return ()
    md = _capstone()
    out = []
    for address, _size, mnemonic, op_str in md.disasm_lite(code, start):
        if (
            mnemonic.startswith("j")
            or mnemonic == "call"
            or mnemonic.endswith(" jmp")
            or mnemonic.endswith(" call")
        ):
            try:
                out.append((address, int(op_str, 0)))
            except ValueError:
                continue
    return tuple(out)


@functools.cache
def _capstone() -> Any:
    import capstone

    return capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)


def _pointed(info: _ElfInfo, lo: int, hi: int) -> bool:
    return points_into(info.path, lo, hi)


def points_into(path: str, lo: int, hi: int) -> bool:
    """Whether `path` holds a code address in [lo, hi) (file addresses; see `code_pointers`)."""
    pointers, immediates = code_pointers(path)
    at = int(np.searchsorted(pointers, lo))
    if at < len(pointers) and pointers[at] < hi:
        return True
    return any(immediates(address) for address in range(lo, hi))


def code_pointers(path: str) -> tuple[np.ndarray, Callable[[int], bool]]:
    """Where the file says code may jump to without a direct branch: (the sorted addresses inside its
    executable segments that its data or relocations hold, a test of whether its code holds an address as
    a 32-bit immediate). A position-independent file (ET_DYN) holds every code pointer of its data in a
    relocation (R_X86_64_RELATIVE, IRELATIVE, 64, GLOB_DAT, JUMP_SLOT: their addends and symbols); an
    executable (ET_EXEC) holds them as they are, in its data (every aligned 4- and 8-byte value is taken
    for one) and in its code as immediates (mov edi, imm32). Addresses computed at run time from other
    values are not seen: jump tables are recognized apart (patchsafety)."""
    st = _open_checked(path)
    return _code_pointers(path, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _code_pointers(
    path: str, dev: int, ino: int, size: int, mtime_ns: int
) -> tuple[np.ndarray, Callable[[int], bool]]:
    from elftools.elf.elffile import ELFFile
    from elftools.elf.relocation import RelocationSection

    found: list[np.ndarray] = []
    relocated: list[int] = []
    code: list[tuple[int, bytes]] = []
    with open(path, "rb") as f:
        elf = ELFFile(f)
        loads = [seg for seg in elf.iter_segments() if seg["p_type"] == "PT_LOAD"]
        spans = [(seg["p_vaddr"], seg["p_vaddr"] + seg["p_memsz"]) for seg in loads if seg["p_flags"] & _PF_X]
        executable = elf["e_type"] == "ET_EXEC"
        for section in elf.iter_sections():
            if not isinstance(section, RelocationSection) or not section.is_RELA():
                continue
            symtab = elf.get_section(section["sh_link"]) if section["sh_link"] else None
            for rel in section.iter_relocations():
                value = int(rel["r_addend"])
                if rel["r_info_sym"] and symtab is not None and hasattr(symtab, "get_symbol"):
                    value += int(symtab.get_symbol(rel["r_info_sym"])["st_value"])
                relocated.append(value & 0xFFFF_FFFF_FFFF_FFFF)
        if executable:
            for seg in loads:
                data = seg.data()
                if seg["p_flags"] & _PF_X:
                    code.append((seg["p_vaddr"], data))
                    continue
                skip = -seg["p_vaddr"] % 8
                body = data[skip : skip + (len(data) - skip) // 8 * 8]
                found.append(np.frombuffer(body, dtype="<u8").astype(np.uint64))
                skip = -seg["p_vaddr"] % 4
                body = data[skip : skip + (len(data) - skip) // 4 * 4]
                found.append(np.frombuffer(body, dtype="<u4").astype(np.uint64))
    found.append(np.array(relocated, dtype=np.uint64))
    values = np.unique(np.concatenate(found))
    inside = np.zeros(len(values), dtype=bool)
    for lo, hi in spans:
        inside |= (values >= lo) & (values < hi)

    def immediate(address: int) -> bool:
        if not executable or not 0 < address < 1 << 32:
            return False
        pattern = address.to_bytes(4, "little")
        return any(pattern in data for _, data in code)

    return values[inside].astype(np.int64), immediate


def _read_mapped(info: _ElfInfo, vaddr: int, size: int) -> bytes:
    """The file's bytes at [vaddr, vaddr+size) by its PT_LOAD segments; ValueError outside them."""
    for seg in info.loads:
        if seg.vaddr <= vaddr and vaddr + size <= seg.vaddr + seg.filesz:
            try:
                with open(info.path, "rb") as f:
                    f.seek(vaddr - seg.vaddr + seg.offset)
                    data = f.read(size)
            except OSError as err:
                raise ValueError(f"cannot read {info.path}: {err.strerror}") from None
            if len(data) == size:
                return data
    raise ValueError(f"{vaddr:#x}+{size} is not in a loaded segment of {info.path}")
