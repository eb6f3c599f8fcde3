"""ELF resolution: symbols to (file, offset), checked against nm, readelf and objdump run independently."""

from __future__ import annotations

import os
import random
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from pmu.errors import FileError, LibraryError, PmuError, SymbolError, UsageError
from pmu.events import symbols
from pmu.events.spec import parse_event
from pmu.events.symbols import (
    FileKey,
    ResolvedProbe,
    library_candidates,
    list_functions,
    parse_ldconfig,
    resolve_probe,
    resolve_target,
)

TARGETS = Path(__file__).resolve().parents[2] / "targets"
LIBC = "/usr/lib/x86_64-linux-gnu/libc.so.6"
PYTHON = "/usr/bin/python3.11"

pytestmark = pytest.mark.skipif(
    not all(shutil.which(tool) for tool in ("gcc", "nm", "readelf", "objdump")),
    reason="needs gcc and binutils",
)


def _run(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The sym_* targets, compiled once: a non-PIE and a PIE executable, a versioned library, and more."""
    out = tmp_path_factory.mktemp("sym")
    src = str(TARGETS / "sym_funcs.c")
    paths = {
        "nopie": str(out / "funcs_nopie"),
        "pie": str(out / "funcs_pie"),
        "dup": str(out / "dup"),
        "lib": str(out / "libsymtest.so.1"),
        "obj": str(out / "funcs.o"),
        "stripped": str(out / "funcs_stripped"),
    }
    _run("gcc", "-O1", "-no-pie", "-o", paths["nopie"], src)
    _run("gcc", "-O1", "-fPIE", "-pie", "-o", paths["pie"], src)
    _run("gcc", "-O1", "-c", "-o", paths["obj"], src)
    _run("gcc", "-O1", "-o", paths["dup"], str(TARGETS / "sym_dup_a.c"), str(TARGETS / "sym_dup_b.c"))
    _run(
        "gcc", "-O1", "-shared", "-fPIC", f"-Wl,--version-script={TARGETS / 'sym_lib.map'}",
        "-Wl,-soname,libsymtest.so.1", "-o", paths["lib"], str(TARGETS / "sym_lib.c"),
    )  # fmt: skip
    shutil.copy(paths["pie"], paths["stripped"])
    _run("strip", "--strip-all", paths["stripped"])
    return paths


# --- independent views of the files -------------------------------------------------------------------


@dataclass(frozen=True)
class Load:
    offset: int
    vaddr: int
    filesz: int
    flags: str


def readelf_loads(path: str) -> list[Load]:
    loads = []
    for line in _run("readelf", "-lW", path).splitlines():
        fields = line.split()
        if fields and fields[0] == "LOAD":
            flags = "".join(f for f in fields[6:-1])
            loads.append(Load(int(fields[1], 16), int(fields[2], 16), int(fields[4], 16), flags))
    return loads


def expected_file_offset(path: str, vaddr: int) -> int:
    (load,) = [
        ld for ld in readelf_loads(path) if "E" in ld.flags and ld.vaddr <= vaddr < ld.vaddr + ld.filesz
    ]
    return vaddr - load.vaddr + load.offset


def nm_symbols(path: str) -> dict[str, tuple[int, int]]:
    """name -> (address, size) of nm's defined text symbols."""
    table: dict[str, tuple[int, int]] = {}
    for line in _run("nm", "-S", "--defined-only", path).splitlines():
        fields = line.split()
        if len(fields) == 4 and fields[2] in "TtWi":
            table[fields[3]] = (int(fields[0], 16), int(fields[1], 16))
        elif len(fields) == 3 and fields[1] in "TtWi":
            table[fields[2]] = (int(fields[0], 16), 0)
    return table


_INSN = re.compile(r"^\s*([0-9a-f]+):\t((?:[0-9a-f]{2} )+)\s*\t?(.*)$")


def objdump_insns(path: str, symbol: str) -> list[tuple[int, bytes]]:
    """(address, bytes) of each instruction of `symbol`, by objdump."""
    insns = []
    for line in _run("objdump", "-d", "--insn-width=16", f"--disassemble={symbol}", path).splitlines():
        m = _INSN.match(line)
        if m:
            insns.append((int(m.group(1), 16), bytes.fromhex(m.group(2).replace(" ", ""))))
    assert insns, f"objdump found no {symbol} in {path}"
    return insns


def file_bytes(path: str, offset: int, n: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(n)


# --- resolve_probe ------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["nopie", "pie"])
@pytest.mark.parametrize("name", ["work", "work2", "main", "helper", "_ZN3foo3barEv", "_start"])
def test_symbol_entry_matches_binutils(built: dict[str, str], variant: str, name: str) -> None:
    path = built[variant]
    probe = resolve_probe(parse_event(f"{path}:{name}"), path)
    address, _ = nm_symbols(path)[name]
    assert probe.vaddr == address
    assert probe.file_offset == expected_file_offset(path, address)
    first_addr, first_bytes = objdump_insns(path, name)[0]
    assert first_addr == address
    assert file_bytes(path, probe.file_offset, len(first_bytes)) == first_bytes
    assert probe.symbol == name and probe.sym_offset == 0
    assert probe.description == f"{name} in {path}"
    assert probe.path == path
    st = os.stat(path)
    assert probe.key == FileKey(st.st_dev, st.st_ino) == FileKey.of(path)


def test_non_pie_offsets_differ_from_addresses(built: dict[str, str]) -> None:
    """The p_vaddr - p_offset translation is really exercised (not the identity of a PIE)."""
    probe = resolve_probe(parse_event("work"), built["nopie"])
    assert probe.vaddr >= 0x400000 and probe.file_offset < 0x100000


@pytest.mark.parametrize("variant", ["nopie", "pie"])
def test_every_instruction_boundary_of_work(built: dict[str, str], variant: str) -> None:
    path = built[variant]
    insns = objdump_insns(path, "work")
    start = insns[0][0]
    for address, code in insns:
        offset = address - start
        probe = resolve_probe(parse_event(f"work+{offset:#x}"), path)
        assert (probe.vaddr, probe.sym_offset, probe.symbol) == (address, offset, "work")
        assert probe.file_offset == expected_file_offset(path, address)
        assert file_bytes(path, probe.file_offset, len(code)) == code
        if offset:
            assert probe.description == f"work+{offset:#x} in {path}"
        by_address = resolve_probe(parse_event(f"{address:#x}"), path)
        assert by_address.file_offset == probe.file_offset
        assert (by_address.symbol, by_address.sym_offset) == ("work", offset)


@pytest.mark.parametrize("variant", ["nopie", "pie"])
def test_offsets_inside_instructions_are_refused(built: dict[str, str], variant: str) -> None:
    path = built[variant]
    insns = objdump_insns(path, "work")
    start = insns[0][0]
    checked = 0
    for address, code in insns:
        for inside in range(1, len(code)):
            offset = address - start + inside
            with pytest.raises(SymbolError) as err:
                resolve_probe(parse_event(f"work+{offset}"), path)
            pattern = (
                rf"offset {offset:#x} is inside the instruction at work\+{address - start:#x} \(.+\) in "
            )
            assert re.fullmatch(pattern + re.escape(path), str(err.value))
            with pytest.raises(
                SymbolError, match=rf"^address {address + inside:#x} is inside the instruction"
            ):
                resolve_probe(parse_event(f"{address + inside:#x}"), path)
            checked += 1
    assert checked > 10  # work starts with a 10-byte movabs


def test_inside_instruction_message_names_the_instruction(built: dict[str, str]) -> None:
    path = built["nopie"]
    with pytest.raises(SymbolError) as err:
        resolve_probe(parse_event("work+3"), path)
    assert str(err.value) == (
        f"offset 0x3 is inside the instruction at work+0x0 (movabs rax, 0x1122334455667788) in {path}"
    )


def test_offset_past_the_end(built: dict[str, str]) -> None:
    path = built["nopie"]
    _, size = nm_symbols(path)["work"]
    with pytest.raises(SymbolError) as err:
        resolve_probe(parse_event(f"work+{size:#x}"), path)
    assert str(err.value) == f"offset {size:#x} is past the end of work (size {size:#x}) in {path}"
    with pytest.raises(SymbolError, match=r"^offset 0x40000 is past the end of work "):
        resolve_probe(parse_event("work+0x40000"), path)


def test_unknown_symbol_suggests_close_names(built: dict[str, str]) -> None:
    path = built["nopie"]
    with pytest.raises(SymbolError) as err:
        resolve_probe(parse_event("wrk"), path)
    assert str(err.value) == f"unknown symbol 'wrk' in {path} (did you mean: work, work2?)"
    with pytest.raises(SymbolError) as err:
        resolve_probe(parse_event("zzzzqqq"), path)
    assert str(err.value) == f"unknown symbol 'zzzzqqq' in {path}"
    assert err.value.exit_status == 2


def test_undefined_and_data_symbols_are_not_functions(built: dict[str, str]) -> None:
    path = built["nopie"]
    for name in ("printf", "atoi", "_edata", "__bss_start", "data_start"):
        with pytest.raises(SymbolError, match=rf"^unknown symbol '{name}' in "):
            resolve_probe(parse_event(name), path)


def test_stripped_file_has_no_symbols(built: dict[str, str]) -> None:
    path = built["stripped"]
    with pytest.raises(SymbolError) as err:
        resolve_probe(parse_event("work"), path)
    assert (
        str(err.value)
        == f"unknown symbol 'work' in {path} (it has no function symbols; probe an address, 0xADDR)"
    )
    address, _ = nm_symbols(built["pie"])["work"]  # same code, same addresses
    probe = resolve_probe(parse_event(f"{address:#x}"), path)
    assert probe.symbol is None and probe.sym_offset == 0
    assert probe.file_offset == expected_file_offset(path, address)
    assert probe.description == f"{address:#x} in {path}"


def test_address_outside_executable_segments(built: dict[str, str]) -> None:
    path = built["nopie"]
    (first, *_) = readelf_loads(path)
    assert "E" not in first.flags
    address = first.vaddr + 0x10
    with pytest.raises(SymbolError) as err:
        resolve_probe(parse_event(f"{address:#x}"), path)
    assert str(err.value) == f"address {address:#x} is not in an executable segment of {path}"
    with pytest.raises(SymbolError, match=r"^address 0xdead0000 is not in an executable segment of "):
        resolve_probe(parse_event("0xdead0000"), path)


def test_address_in_code_without_a_symbol(built: dict[str, str]) -> None:
    """The PLT holds code but no symbol; _init (size 0) before it must not swallow it."""
    path = built["nopie"]
    sections = _run("readelf", "-SW", path)
    m = re.search(r"\] \.plt\s+PROGBITS\s+([0-9a-f]+)", sections)
    if m is None:
        pytest.skip("no .plt in this toolchain's output")
    plt = int(m.group(1), 16)
    probe = resolve_probe(parse_event(f"{plt:#x}"), path)
    assert (probe.symbol, probe.sym_offset) == (None, 0)
    assert probe.file_offset == expected_file_offset(path, plt)


def test_uretprobe_needs_a_function_entry(built: dict[str, str]) -> None:
    path = built["nopie"]
    insns = objdump_insns(path, "work")
    entry, (second, _) = insns[0][0], insns[1]
    assert resolve_probe(parse_event(f"uretprobe:{entry:#x}"), path).symbol == "work"
    with pytest.raises(SymbolError) as err:
        resolve_probe(parse_event(f"uretprobe:{second:#x}"), path)
    assert str(err.value) == (
        f"uretprobe at {second:#x} is not on a function entry: it is work+{second - entry:#x} in {path}"
    )


def test_notype_label_in_text(built: dict[str, str]) -> None:
    """A bare assembly label (STT_NOTYPE, size 0) is probed and extends to the next symbol."""
    path = built["nopie"]
    address, _ = nm_symbols(path)["sym_notype"]
    probe = resolve_probe(parse_event("sym_notype"), path)
    assert probe.vaddr == address
    # nop (1 byte), then movl $1, %eax (5 bytes), then ret
    assert resolve_probe(parse_event("sym_notype+1"), path).vaddr == address + 1
    assert resolve_probe(parse_event("sym_notype+6"), path).vaddr == address + 6
    with pytest.raises(
        SymbolError, match=r"^offset 0x2 is inside the instruction at sym_notype\+0x1 \(mov eax, 1\)"
    ):
        resolve_probe(parse_event("sym_notype+2"), path)
    assert resolve_probe(parse_event(f"{address + 6:#x}"), path).symbol == "sym_notype"


def test_ifunc_is_flagged(built: dict[str, str]) -> None:
    path = built["nopie"]
    probe = resolve_probe(parse_event("fast"), path)
    assert probe.ifunc
    assert probe.vaddr == nm_symbols(path)["fast"][0]
    assert not resolve_probe(parse_event("work"), path).ifunc


def test_ambiguous_static_functions(built: dict[str, str]) -> None:
    path = built["dup"]
    addresses = sorted(a for a, _ in _dup_addresses(path))
    with pytest.raises(SymbolError) as err:
        resolve_probe(parse_event("dup"), path)
    where = ", ".join(f"{a:#x}" for a in addresses)
    assert (
        str(err.value)
        == f"symbol 'dup' is ambiguous in {path}: defined at {where} (probe one by address, 0xADDR)"
    )
    assert resolve_probe(parse_event(f"{addresses[1]:#x}"), path).symbol == "dup"


def _dup_addresses(path: str) -> list[tuple[int, str]]:
    lines = _run("nm", "--defined-only", path).splitlines()
    return [(int(f[0], 16), f[2]) for f in (line.split() for line in lines) if len(f) == 3 and f[2] == "dup"]


def test_versioned_library_symbols(built: dict[str, str]) -> None:
    path = built["lib"]
    table = nm_symbols(path)
    new_api, old_api = table["new_api"][0], table["old_api"][0]
    assert new_api != old_api
    assert resolve_probe(parse_event("api"), path).vaddr == new_api
    assert resolve_probe(parse_event("api@@VERS_2"), path).vaddr == new_api
    assert resolve_probe(parse_event("api@VERS_1"), path).vaddr == old_api
    assert resolve_probe(parse_event("lib_entry"), path).vaddr == table["lib_entry"][0]
    names = list_functions(path)
    assert {"api", "api@@VERS_2", "api@VERS_1", "lib_entry", "old_api", "new_api"} <= set(names)


# --- list_functions -----------------------------------------------------------------------------------


def readelf_function_names(path: str) -> set[str]:
    """Defined FUNC/IFUNC names of .symtab and .dynsym, by readelf."""
    names = set()
    for line in _run("readelf", "-Ws", "--dyn-syms", path).splitlines():
        fields = line.split()
        if len(fields) >= 8 and fields[3] in ("FUNC", "IFUNC") and fields[6] != "UND":
            names.add(fields[7])
    return names


@pytest.mark.parametrize("variant", ["nopie", "pie", "dup"])
def test_list_functions_matches_readelf(built: dict[str, str], variant: str) -> None:
    path = built[variant]
    names = list_functions(path)
    assert names == sorted(set(names))
    expected = readelf_function_names(path)
    if variant != "dup":
        expected.add("sym_notype")  # a NOTYPE label in .text, which readelf calls NOTYPE
    assert set(names) == expected


def test_list_functions_pattern(built: dict[str, str]) -> None:
    path = built["nopie"]
    assert list_functions(path, "work*") == ["work", "work2"]
    assert list_functions(path, "_ZN*") == ["_ZN3foo3barEv"]
    assert list_functions(path, "[fh]*") == ["fast", "fast_impl", "frame_dummy", "helper"]
    assert list_functions(path, "nothing*") == []
    assert list_functions(path, "WORK") == []  # case matters, as in symbol names


def test_list_functions_of_libc_has_versions() -> None:
    if not os.path.exists(LIBC):
        pytest.skip(f"no {LIBC}")
    names = list_functions(LIBC, "memcpy*")
    assert "memcpy" in names
    assert any(name.startswith("memcpy@@GLIBC_") for name in names)
    assert "malloc" in list_functions(LIBC, "mall*")


# --- bad files ----------------------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    path = str(tmp_path / "nope")
    for call in (lambda: resolve_probe(parse_event("work"), path), lambda: list_functions(path)):
        with pytest.raises(FileError) as err:
            call()
        assert str(err.value) == f"no such file: {path}"


def test_text_file_is_not_elf(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("hello\n")
    with pytest.raises(FileError) as err:
        list_functions(str(path))
    assert str(err.value) == f"not an ELF file: {path}"
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    with pytest.raises(FileError, match=r"^not an ELF file: "):
        resolve_probe(parse_event("work"), str(empty))


def test_directory_is_not_elf(tmp_path: Path) -> None:
    with pytest.raises(FileError) as err:
        list_functions(str(tmp_path))
    assert str(err.value) == f"not an ELF file: {tmp_path} (a directory)"


def test_relocatable_object_is_refused(built: dict[str, str]) -> None:
    with pytest.raises(FileError) as err:
        list_functions(built["obj"])
    assert str(err.value) == f"not an executable or shared library: {built['obj']} (ET_REL)"


def test_other_machine_is_refused(built: dict[str, str], tmp_path: Path) -> None:
    data = bytearray(Path(built["pie"]).read_bytes())
    data[18:20] = (183).to_bytes(2, "little")  # EM_AARCH64
    path = tmp_path / "arm"
    path.write_bytes(bytes(data))
    with pytest.raises(FileError) as err:
        list_functions(str(path))
    assert str(err.value) == f"not an x86-64 ELF file: {path} (64-bit AARCH64)"


def test_truncated_files_give_file_errors(built: dict[str, str], tmp_path: Path) -> None:
    data = Path(built["nopie"]).read_bytes()
    path = tmp_path / "cut"
    cuts = sorted({4, 16, 52, 63, 64, 100, 1000, 4096, len(data) // 2, len(data) - 100, len(data) - 1})
    for cut in cuts:
        path.write_bytes(data[:cut])
        os.utime(path, ns=(cut, cut))  # a new version for the cache even when the size repeats
        try:
            list_functions(str(path))
            resolve_probe(parse_event("work"), str(path))
        except FileError as err:
            assert str(err).startswith(f"not an ELF file: {path}"), str(err)
            assert "\n" not in str(err)
        except SymbolError:
            pass  # the symbol tables were cut off before the headers that point to them


def test_corrupt_files_never_raise_parser_exceptions(built: dict[str, str], tmp_path: Path) -> None:
    data = Path(built["nopie"]).read_bytes()
    shoff = int.from_bytes(data[0x28:0x30], "little")
    rng = random.Random(1234)
    path = tmp_path / "mangled"
    for n in range(150):
        mangled = bytearray(data)
        region = (0, 0x40) if n % 3 == 0 else (shoff, len(data))  # ELF header, or the section headers
        for _ in range(rng.randint(1, 8)):
            mangled[rng.randrange(*region)] = rng.randrange(256)
        path.write_bytes(bytes(mangled))
        os.utime(path, ns=(n, n))
        for call in (
            lambda: list_functions(str(path)),
            lambda: resolve_probe(parse_event("work+4"), str(path)),
        ):
            try:
                call()
            except PmuError as err:
                assert isinstance(err, (FileError, SymbolError)), repr(err)
                assert "\n" not in str(err)


def test_cache_sees_a_rewritten_file(built: dict[str, str], tmp_path: Path) -> None:
    path = tmp_path / "exe"
    shutil.copy(built["nopie"], path)
    assert "work" in list_functions(str(path))
    shutil.copy(built["dup"], path)
    os.utime(path, ns=(1, 1))
    assert "work" not in list_functions(str(path))
    assert "dup_a" in list_functions(str(path))


# --- resolve_target -----------------------------------------------------------------------------------


def test_target_none_is_the_command(built: dict[str, str]) -> None:
    assert resolve_target(None, built["pie"]) == built["pie"]
    with pytest.raises(UsageError) as err:
        resolve_target(None, None)
    assert (
        str(err.value) == "the event needs a target when no command is given (write uprobe:TARGET:LOCATION)"
    )


def test_target_path(built: dict[str, str], tmp_path: Path) -> None:
    link = tmp_path / "link"
    link.symlink_to(built["pie"])
    assert resolve_target(str(link), None) == os.path.realpath(built["pie"])
    cwd = os.getcwd()
    os.chdir(os.path.dirname(built["pie"]))
    try:
        assert resolve_target("./funcs_pie", None) == os.path.realpath(built["pie"])
    finally:
        os.chdir(cwd)


def test_target_path_errors(tmp_path: Path) -> None:
    missing = str(tmp_path / "missing")
    with pytest.raises(FileError) as err:
        resolve_target(missing, None)
    assert str(err.value) == f"no such file: {missing}"
    text = tmp_path / "script.sh"
    text.write_text("#!/bin/sh\n")
    with pytest.raises(FileError) as err:
        resolve_target(str(text), None)
    assert str(err.value) == f"not an ELF file: {text}"
    with pytest.raises(FileError) as err:
        resolve_target(str(tmp_path) + "/", None)
    assert str(err.value) == f"not an ELF file: {tmp_path}/ (a directory)"


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads everything")
def test_unreadable_target(built: dict[str, str], tmp_path: Path) -> None:
    path = tmp_path / "secret"
    shutil.copy(built["pie"], path)
    path.chmod(0)
    with pytest.raises(FileError) as err:
        resolve_target(str(path), None)
    assert str(err.value) == f"cannot read {path}: permission denied"


def test_library_from_mapped_files_first(built: dict[str, str]) -> None:
    lib = built["lib"]
    assert resolve_target("libsymtest", None, mapped=[built["pie"], lib]) == lib
    assert resolve_target("libsymtest.so.1", None, mapped=[lib]) == lib
    assert library_candidates("libsymtest", [lib])[0] == lib
    with pytest.raises(LibraryError) as err:
        resolve_target("libsymtest", None)
    assert str(err.value) == "unknown library 'libsymtest': not mapped by the process, not in the ld.so cache"


def test_unknown_library() -> None:
    with pytest.raises(LibraryError) as err:
        resolve_target("libfoo_pmu_nonexistent", None)
    assert str(err.value) == (
        "unknown library 'libfoo_pmu_nonexistent': not mapped by the process, not in the ld.so cache"
    )
    assert err.value.exit_status == 2


def test_library_name_is_not_a_prefix_match() -> None:
    assert symbols._name_matches("libc", "libc.so.6")
    assert symbols._name_matches("libc", "libc-2.31.so")
    assert symbols._name_matches("libz.so.1", "libz.so.1.2.13")
    assert symbols._name_matches("libsqlite3", "libsqlite3.so.0.8.6")
    assert symbols._name_matches("libpython3.11", "libpython3.11.so.1.0")
    assert not symbols._name_matches("libc", "libcrypt.so.1")
    assert not symbols._name_matches("libz", "libz3.so.4")
    assert not symbols._name_matches("libz.so.1", "libz.so.10")
    assert not symbols._name_matches("c", "libc.so.6")


def test_system_libc() -> None:
    if not os.path.exists(LIBC):
        pytest.skip(f"no {LIBC}")
    path = resolve_target("libc", None)
    assert os.path.basename(path).startswith("libc")
    assert os.path.samefile(path, LIBC)
    assert path == os.path.realpath(path)
    assert resolve_target("libc.so.6", None) == path


def test_system_libz() -> None:
    found = [
        d for d in ("/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu") if os.path.exists(f"{d}/libz.so.1")
    ]
    if not found:
        pytest.skip("no libz.so.1")
    path = resolve_target("libz.so.1", None)
    assert os.path.samefile(path, f"{found[0]}/libz.so.1")
    assert resolve_target("libz", None) == path


def test_parse_ldconfig() -> None:
    output = (
        "4 libs found in cache `/etc/ld.so.cache'\n"
        "\tlibz.so.1 (libc6,x86-64) => /lib/x86_64-linux-gnu/libz.so.1\n"
        "\tlibc.so.6 (libc6,x86-64, OS ABI: Linux 3.2.0) => /lib/x86_64-linux-gnu/libc.so.6\n"
        "\tlibc.so.6 (libc6, OS ABI: Linux 3.2.0) => /lib32/libc.so.6\n"
        "\tlibfoo.so (libc6,x32) => /libx32/libfoo.so\n"
        "Cache generated by: ldconfig (Debian GLIBC 2.36-9) stable release version 2.36\n"
    )
    assert parse_ldconfig(output) == (
        ("libz.so.1", "/lib/x86_64-linux-gnu/libz.so.1"),
        ("libc.so.6", "/lib/x86_64-linux-gnu/libc.so.6"),
    )


def _fake_ldconfig(tmp_path: Path) -> tuple[Path, Path]:
    """A directory holding an `ldconfig` that leaves a mark when run and claims that libpmufake.so.1 is
    libc; and the mark's path."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    mark = tmp_path / "ran"
    fake = bindir / "ldconfig"
    fake.write_text(
        f"#!/bin/sh\ntouch {mark}\n"
        f"printf '1 libs found\\n\\tlibpmufake.so.1 (libc6,x86-64) => {os.path.realpath(LIBC)}\\n'\n"
    )
    fake.chmod(0o755)
    return bindir, mark


def test_ld_cache_uses_the_system_ldconfig_not_one_in_path(tmp_path: Path, monkeypatch) -> None:
    """pmu runs as root: an `ldconfig` planted first in $PATH (or in the current directory) is never run."""
    bindir, mark = _fake_ldconfig(tmp_path)
    subprocess.run([bindir / "ldconfig"], check=True, capture_output=True)  # the fake works when run
    assert mark.exists()
    mark.unlink()
    monkeypatch.setenv("PATH", f"{bindir}:.:{os.environ['PATH']}")
    monkeypatch.chdir(bindir)
    symbols._ld_cache.cache_clear()
    try:
        assert library_candidates("libpmufake") == []
        assert not mark.exists()
        # ... and the system's is: its cache is what `/sbin/ldconfig -p` prints.
        system = next(p for p in symbols.LDCONFIG_PATHS if os.access(p, os.X_OK))
        assert symbols._ld_cache() == parse_ldconfig(_run(system, "-p"))
        assert symbols._ld_cache()
    finally:
        symbols._ld_cache.cache_clear()


# --- big files ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("path", "event"), [(LIBC, "malloc"), (PYTHON, "PyObject_Malloc")])
def test_resolve_on_big_files(path: str, event: str) -> None:
    """Big files resolve right, cold and from the cache (speed is for benchmarks, not tests)."""
    if not os.path.exists(path):
        pytest.skip(f"no {path}")
    symbols._parse_elf.cache_clear()
    first = resolve_probe(parse_event(event), path)
    again = resolve_probe(parse_event(f"{event}+0"), path)
    assert first.vaddr == again.vaddr == nm_dynamic_address(path, event)
    assert first.file_offset == expected_file_offset(path, first.vaddr)


def nm_dynamic_address(path: str, name: str) -> int:
    for line in _run("nm", "-D", "--defined-only", path).splitlines():
        fields = line.split()
        if len(fields) == 3 and (fields[2] == name or fields[2].startswith(f"{name}@@")):
            return int(fields[0], 16)
    raise AssertionError(f"nm -D found no {name} in {path}")


def test_resolved_probe_is_frozen(built: dict[str, str]) -> None:
    probe = resolve_probe(parse_event("work"), built["pie"])
    assert isinstance(probe, ResolvedProbe)
    with pytest.raises(AttributeError):
        probe.vaddr = 0  # type: ignore[misc]
