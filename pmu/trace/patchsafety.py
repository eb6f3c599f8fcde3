"""Whether a site may take a jump patch: the checks run, with capstone, before any byte of code is patched.

A jump-optimized probe overwrites the whole instructions at a site (at least 5 bytes) with `jmp rel32` to a
trampoline that counts the hit, runs the relocated displaced instructions and jumps back. That is safe only
if nothing else can land inside the overwritten bytes and every displaced instruction runs the same out of
line. `check_jump_patch` decodes the whole function linearly from its start (up to the symbol's size) and
returns a `PatchPlan`, or raises `PatchRefused` (a `RelocationError`) naming one `Refusal`.

Indirect jumps are refused, except two kinds whose targets are known: a jump through one pointer
(`jmp [rip+X]`, a GOT entry: a tail call to the start of a function), and gcc's jump tables, recognized with
their bounding `cmp; ja` and read from the file when the caller passes `read` (`jump_tables` lists them).

What is not checked, because it cannot be seen in one function's bytes: branches from other functions into
this one (other symbols starting inside the patch are refused when the caller passes `known_entries`), and
code addresses held in data (C++ landing pads, computed gotos: they come with an indirect jump, refused).
"""

from __future__ import annotations

import enum
import functools
import re
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

import capstone
from capstone import x86

from pmu.errors import RelocationError
from pmu.trace.relocate import Insn, decode, relocate

JUMP_PATCH_LEN: int = 5
"""Length of `jmp rel32`, the patch a jump-optimized probe writes."""

_REL32 = 1 << 31

_CONDITIONAL = frozenset(
    {"jo", "jno", "jb", "jae", "je", "jne", "jbe", "ja", "js", "jns", "jp", "jnp", "jl", "jge", "jle", "jg"}
    | {"jrcxz", "jecxz", "jcxz", "loop", "loope", "loopne"}
)
_BRANCHES = _CONDITIONAL | {"jmp", "ljmp", "call", "xbegin"}
_GOT_JUMP = re.compile(r"(?:qword ptr )?\[rip(?: [+-] (?:0x[0-9a-f]+|[0-9]+))?\]")
"""`jmp [rip+X]`: a jump through one pointer (a GOT entry), i.e. a tail call; a jump table needs an index."""


class Refusal(enum.Enum):
    """Why a site cannot take a jump patch. The value is the one-line explanation."""

    UNKNOWN_SIZE = "the function's size is unknown, so its branches cannot be checked"
    UNDECODABLE = "the function does not decode as instructions up to its end"
    NOT_ON_BOUNDARY = "the site is not on an instruction boundary of the function"
    PAST_SYMBOL_END = "the patch would pass the end of the function"
    ENTRY_IN_PATCH = "another symbol starts inside the patched bytes"
    CALL_IN_PATCH = "a call that is not the last displaced instruction would return into the patched bytes"
    UNRELOCATABLE = "a displaced instruction cannot run out of line"
    OUT_OF_REACH = "the trampoline is out of rel32 reach of the site or of a RIP-relative operand"
    BRANCH_INTO_PATCH = "a branch lands inside the patched bytes"
    INDIRECT_JUMP = "the function has an indirect jump (a jump table?) whose targets are unknown"

    @property
    def label(self) -> str:
        """How messages name the reason: "branch-into-patch"."""
        return self.name.lower().replace("_", "-")


class PatchRefused(RelocationError):
    """A site that cannot take a jump patch; `refusal` says why, `detail` says where."""

    def __init__(self, site: int, refusal: Refusal, detail: str) -> None:
        super().__init__(f"cannot place a jump at 0x{site:x} ({refusal.label}): {detail}")
        self.site = site
        self.refusal = refusal
        self.detail = detail


@dataclass(frozen=True)
class PatchPlan:
    """A site that can take a jump patch: what the patch displaces."""

    site: int
    """Address of the first patched byte (the probe's address)."""
    length: int
    """Bytes displaced: whole instructions, at least the patch's length; the patch is padded to it."""
    count: int
    """Number of displaced instructions."""
    boundaries: tuple[int, ...]
    """Offset from `site` of each displaced instruction (boundaries[0] == 0): a thread stopped with RIP at
    site + boundaries[i] is moved to the relocated copy of instruction i before the patch is written."""
    insns: tuple[Insn, ...]
    """The displaced instructions."""


@functools.cache
def _lite() -> Any:
    return capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)


@functools.cache
def _detailed() -> Any:
    md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
    md.detail = True
    return md


def _target(op_str: str) -> int | None:
    """The target of a branch whose operand is an immediate (capstone prints small ones in decimal)."""
    try:
        return int(op_str, 0)
    except ValueError:
        return None


def _fits_rel32(value: int) -> bool:
    return -_REL32 <= value < _REL32


def check_jump_patch(
    code: bytes,
    func_start: int,
    func_size: int,
    site: int,
    patch_len: int = JUMP_PATCH_LEN,
    *,
    trampoline: int | None = None,
    known_entries: Collection[int] = (),
    read: Callable[[int, int], bytes] | None = None,
    pointed: Callable[[int, int], bool] | None = None,
) -> PatchPlan:
    """Decide whether `patch_len` bytes at `site` can be replaced by a jump, before anything is patched.

    `code` holds the function's bytes from `func_start` (at least `func_size` of them); `site` lies in the
    function. The displaced instructions are the fewest whole ones from `site` covering `patch_len` bytes.
    Refused (PatchRefused, naming a `Refusal`) when: the size is unknown (0); the function does not decode
    linearly to exactly its end; `site` is not an instruction boundary; the displaced bytes pass the end; a
    symbol in `known_entries` starts inside them; a call other than the last displaced instruction; a
    displaced instruction `relocate` refuses; `trampoline` (when given) or a RIP-relative operand is out of
    rel32 reach; a direct branch elsewhere in the function lands in (site, site + length) (the first byte is
    fine, it becomes the jump); an indirect jump other than through a GOT entry, unless it is one of gcc's
    jump tables and `read` is given: then the table is read and its entries are checked as branches; or,
    with `pointed`, unless no address inside the patched bytes can be where it goes: `pointed(lo, hi)` says
    whether the file holds a code address in [lo, hi) (a pointer in its data or relocations, an immediate
    in its code), and no instruction of the function makes one (lea [rip+X], an immediate). A jump through
    a pointer is then a tail call or a jump to a label whose address was taken, never into the patch.
    Without `trampoline`, relocation is checked at an address just past the function. `read(address, size)`
    returns the file's bytes at an address (the same addresses as `site`'s), as the file maps them.
    ValueError for a `site` outside the function, `code` shorter than `func_size`, or `patch_len` < 1.
    """
    if patch_len < 1:
        raise ValueError(f"patch_len must be positive, not {patch_len}")
    if func_size == 0:
        raise PatchRefused(site, Refusal.UNKNOWN_SIZE, Refusal.UNKNOWN_SIZE.value)
    func_end = func_start + func_size
    if not func_start <= site < func_end:
        raise ValueError(f"site 0x{site:x} is not in the function [0x{func_start:x}, 0x{func_end:x})")
    if len(code) < func_size:
        raise ValueError(f"code holds {len(code)} bytes of a {func_size}-byte function")

    linear: list[tuple[int, int, str, str]] = list(_lite().disasm_lite(code[:func_size], func_start))
    reached = linear[-1][0] + linear[-1][1] if linear else func_start
    if reached != func_end:
        stuck = code[reached - func_start : reached - func_start + 15]
        raise PatchRefused(
            site,
            Refusal.UNDECODABLE,
            f"decoding from 0x{func_start:x} stops at 0x{reached:x} (bytes {stuck.hex(' ')}), "
            f"before the function's end at 0x{func_end:x}",
        )

    first = next((i for i, insn in enumerate(linear) if insn[0] >= site), len(linear))
    if first == len(linear) or linear[first][0] != site:
        raise PatchRefused(
            site,
            Refusal.NOT_ON_BOUNDARY,
            f"0x{site:x} is inside the instruction at 0x{linear[first - 1][0]:x}",
        )
    last = first
    while linear[last][0] + linear[last][1] - site < patch_len:
        last += 1
        if last == len(linear):
            raise PatchRefused(
                site,
                Refusal.PAST_SYMBOL_END,
                f"{patch_len} bytes from 0x{site:x} pass the function's end at 0x{func_end:x}",
            )
    displaced = linear[first : last + 1]
    length = displaced[-1][0] + displaced[-1][1] - site
    patch_end = site + length

    inside = sorted(entry for entry in known_entries if site < entry < patch_end)
    if inside:
        raise PatchRefused(
            site,
            Refusal.ENTRY_IN_PATCH,
            f"a symbol starts at 0x{inside[0]:x}, inside [0x{site:x}, 0x{patch_end:x})",
        )
    for address, size, mnemonic, op_str in displaced[:-1]:
        if mnemonic.split()[-1] == "call":
            raise PatchRefused(
                site,
                Refusal.CALL_IN_PATCH,
                f"'{mnemonic} {op_str}' at 0x{address:x} returns to 0x{address + size:x}, "
                f"inside [0x{site:x}, 0x{patch_end:x})",
            )

    at_site = code[site - func_start : patch_end - func_start]
    new_address = trampoline if trampoline is not None else (func_end + 0xFFF) & ~0xFFF
    if trampoline is not None and not _fits_rel32(trampoline - (site + patch_len)):
        raise PatchRefused(
            site,
            Refusal.OUT_OF_REACH,
            f"the trampoline at 0x{trampoline:x} is out of rel32 reach of the site",
        )
    for ci in _detailed().disasm(at_site, site):
        for op in ci.operands:
            if op.type == x86.X86_OP_MEM and op.mem.base == x86.X86_REG_RIP:
                target = ci.address + ci.size + op.mem.disp
                if trampoline is not None and not _fits_rel32(target - (trampoline + ci.size)):
                    raise PatchRefused(
                        site,
                        Refusal.OUT_OF_REACH,
                        f"'{ci.mnemonic} {ci.op_str}' at 0x{ci.address:x} reads 0x{target:x}, out of rel32 "
                        f"reach of the trampoline at 0x{trampoline:x}",
                    )
    try:
        relocate(at_site, site, new_address, len(displaced))
    except RelocationError as err:
        raise PatchRefused(site, Refusal.UNRELOCATABLE, err.message) from None

    direct: dict[int, int] = {}  # target -> address of a branch there
    indirect: list[int] = []  # indices in `linear` of indirect jumps
    for index, (address, _size, mnemonic, op_str) in enumerate(linear):
        kind = mnemonic.split()[-1]
        if kind not in _BRANCHES:
            continue
        target = _target(op_str)
        if target is not None:
            direct.setdefault(target, address)
            if site < target < patch_end and not site <= address < patch_end:
                # (a branch of the displaced run itself is relocated to the copy of its target)
                raise PatchRefused(
                    site,
                    Refusal.BRANCH_INTO_PATCH,
                    f"'{mnemonic} {op_str}' at 0x{address:x} lands at 0x{target:x}, "
                    f"inside [0x{site:x}, 0x{patch_end:x})",
                )
        elif kind == "ljmp" or (kind == "jmp" and not _GOT_JUMP.fullmatch(op_str)):
            indirect.append(index)
    untargeted: bool | None = None  # no address inside the patch is held or made (computed once)
    for index in indirect:
        address, _size, mnemonic, op_str = linear[index]
        table = _jump_table(linear, index, direct, read) if read is not None else None
        if table is None:
            if pointed is not None and untargeted is None:
                untargeted = not pointed(site + 1, patch_end) and not _makes_address(linear, site, patch_end)
            if untargeted:
                continue  # a jump through a pointer: a tail call, or to a taken label, not into the patch
            why = (
                "may reach any instruction of the function"
                if pointed is None
                else "may land in the patch: the file holds, or the function makes, an address inside it"
            )
            raise PatchRefused(site, Refusal.INDIRECT_JUMP, f"'{mnemonic} {op_str}' at 0x{address:x} {why}")
        for n, target in enumerate(table.targets):
            if site < target < patch_end:
                raise PatchRefused(
                    site,
                    Refusal.BRANCH_INTO_PATCH,
                    f"entry {n} of the jump table at 0x{table.address:x} (used by '{mnemonic} {op_str}' at "
                    f"0x{address:x}) lands at 0x{target:x}, inside [0x{site:x}, 0x{patch_end:x})",
                )

    boundaries = tuple(insn[0] - site for insn in displaced)
    return PatchPlan(
        site=site,
        length=length,
        count=len(displaced),
        boundaries=boundaries,
        insns=tuple(decode(at_site, site, len(displaced))),
    )


def _makes_address(linear: list[tuple[int, int, str, str]], site: int, end: int) -> bool:
    """Whether an instruction of the function computes an address in (site, end): a RIP-relative lea
    (computed goto: `lea rax, [rip + label]`) or an immediate operand."""
    for address, size, mnemonic, op_str in linear:
        if mnemonic == "lea":
            rip = _LEA_RIP.search(op_str)
            if rip is not None:
                disp = int(rip.group(2), 0)
                target = address + size + (disp if rip.group(1) == "+" else -disp)
                if site < target < end:
                    return True
            continue
        operand = op_str.rsplit(", ", 1)[-1]
        if _IMMEDIATE.fullmatch(operand) and site < int(operand, 0) < end:
            return True
    return False


_IMMEDIATE = re.compile(r"0x[0-9a-f]+|[0-9]+")


# --- jump tables ------------------------------------------------------------------------------------------

_FAMILIES = {
    **{f"r{r}x": f"r{r}x" for r in "abcd"},
    **{f"e{r}x": f"r{r}x" for r in "abcd"},
    **{f"{r}x": f"r{r}x" for r in "abcd"},
    **{f"{r}l": f"r{r}x" for r in "abcd"},
    **{f"{r}h": f"r{r}x" for r in "abcd"},
    **{f"r{r}": f"r{r}" for r in ("si", "di", "bp", "sp")},
    **{f"e{r}": f"r{r}" for r in ("si", "di", "bp", "sp")},
    **{r: f"r{r}" for r in ("si", "di", "bp", "sp")},
    **{f"{r}l": f"r{r}" for r in ("si", "di", "bp", "sp")},
    **{f"r{n}{suffix}": f"r{n}" for n in range(8, 16) for suffix in ("", "d", "w", "b")},
}
"""Register name -> the 64-bit register it is part of."""
_WIDE = frozenset(
    {f"{p}{r}x" for p in "re" for r in "abcd"}
    | {f"{p}{r}" for p in "re" for r in ("si", "di", "bp", "sp")}
    | {f"r{n}{suffix}" for n in range(8, 16) for suffix in ("", "d")}
)
"""Names of 32- and 64-bit registers."""

_WRITES_FIRST = frozenset(
    {"mov", "movzx", "movsxd", "movsx", "lea", "add", "sub", "and", "or", "xor", "imul", "shl", "shr", "sar"}
    | {"neg", "not", "inc", "dec", "pop"}
)
"""Instructions whose only register effect is on their first operand."""
_WRITES_NOTHING = frozenset({"cmp", "test", "nop", "push"})
_ZERO_EXTENDING = frozenset({"mov", "movzx"})
_LEA_RIP = re.compile(r"\[rip ([+-]) (0x[0-9a-f]+|[0-9]+)\]")
_PIC_LOAD = re.compile(r"dword ptr \[(\w+) \+ (\w+)\*4\]")
_ABS_JUMP = re.compile(r"qword ptr \[(\w+)\*8 \+ (0x[0-9a-f]+)\]")
_WINDOW = 16
_MAX_ENTRIES = 1 << 16


@dataclass(frozen=True)
class JumpTable:
    """One of gcc's jump tables, recognized in the code and read from the file: where its jump can go."""

    jump: int
    """Address of the indirect jump through the table."""
    start: int
    """Address of the first instruction of the recognized sequence (the bounding `cmp`, or the `lea` of the
    table's address when it comes first): from there to the jump, the code is straight-line."""
    index: str
    """The compared operand, as capstone prints it ("edi", "byte ptr [r10 + 8]")."""
    address: int
    """Where the table is."""
    targets: tuple[int, ...]
    """Where each entry sends the jump."""


def jump_tables(
    code: bytes, func_start: int, func_size: int, read: Callable[[int, int], bytes]
) -> tuple[JumpTable, ...]:
    """The jump tables `check_jump_patch` recognizes in a function (its other indirect jumps are left out);
    empty when the function does not decode to its end."""
    linear = list(_lite().disasm_lite(code[:func_size], func_start))
    if not linear or linear[-1][0] + linear[-1][1] != func_start + func_size:
        return ()
    direct = _direct_targets(linear)
    tables = []
    for index, (_, _, mnemonic, op_str) in enumerate(linear):
        if mnemonic.split()[-1] == "jmp" and _target(op_str) is None:
            table = _jump_table(linear, index, direct, read)
            if table is not None:
                tables.append(table)
    return tuple(tables)


def _direct_targets(linear: list[tuple[int, int, str, str]]) -> dict[int, int]:
    """Target -> address of a direct branch there."""
    direct: dict[int, int] = {}
    for address, _size, mnemonic, op_str in linear:
        if mnemonic.split()[-1] in _BRANCHES:
            target = _target(op_str)
            if target is not None:
                direct.setdefault(target, address)
    return direct


def _operands(op_str: str) -> list[str]:
    return op_str.split(", ") if op_str else []


def _jump_table(
    linear: list[tuple[int, int, str, str]],
    index: int,
    direct: dict[int, int],
    read: Callable[[int, int], bytes],
) -> JumpTable | None:
    """The table of the indirect jump linear[index] if it is one of gcc's, bounded by a `cmp X, imm; ja`:
    `lea rB, [rip+T]; ...; movsxd rD, dword [rB + rI*4]; add rD, rB; jmp rD` (entries: int32 from T) or
    `jmp qword [rI*8 + T]` (entries: absolute addresses), rI holding the compared value. The instructions
    from the first one used to the jump must be straight-line code that no direct branch enters. None when
    the code does not match (or the table cannot be read)."""
    for start in range(index - 1, max(index - _WINDOW, 0) - 1, -1):
        address, _size, mnemonic, op_str = linear[start]
        if mnemonic != "cmp":
            continue
        if start + 1 >= index or linear[start + 1][2] not in ("ja", "jae"):
            continue
        ops = _operands(op_str)
        try:
            bound = int(ops[1], 0)
        except (ValueError, IndexError):
            continue
        count = bound + 1 if linear[start + 1][2] == "ja" else bound
        if not 0 < count <= _MAX_ENTRIES:
            return None
        found = _follow(linear, start, index, ops[0])
        if found is None:
            return None
        first_used, table, pic = found
        # no direct branch may enter the sequence past its start (it would skip the bound or the base)
        if any(linear[first_used][0] < target <= linear[index][0] for target in direct):
            return None
        size = 4 if pic else 8
        try:
            data = read(table, count * size)
        except Exception:  # noqa: BLE001 - whatever the reader raises, the table is unknown
            return None
        if len(data) != count * size:
            return None
        entries = [
            int.from_bytes(data[i : i + size], "little", signed=pic) for i in range(0, len(data), size)
        ]
        return JumpTable(
            jump=linear[index][0],
            start=linear[first_used][0],
            index=ops[0],
            address=table,
            targets=tuple(table + e if pic else e for e in entries),
        )
    return None


def _follow(
    linear: list[tuple[int, int, str, str]], cmp_index: int, jump_index: int, compared: str
) -> tuple[int, int, bool] | None:
    """Simulate the straight-line code before the jump: (index of the first instruction used, table address,
    whether its entries are int32 offsets from it) if the jump goes through the table with the compared
    value as index, else None."""
    # Table bases set before the compare count too: walk back to the start of the straight-line code.
    begin = cmp_index
    while begin > max(jump_index - _WINDOW, 0):
        mnemonic = linear[begin - 1][2]
        if mnemonic not in _WRITES_FIRST and mnemonic not in _WRITES_NOTHING:
            break
        begin -= 1
    alias: set[str] = set()  # registers holding the compared value (zero-extended)
    memory = compared if compared not in _FAMILIES else None  # a memory operand compared
    bases: dict[str, tuple[int, int]] = {}  # register -> (table address, index of its lea)
    loaded: dict[str, tuple[int, int]] = {}  # register -> (table, lea index): an entry of the table
    summed: dict[str, tuple[int, int]] = {}  # register -> (table, lea index): entry + table
    for i in range(begin, jump_index + 1):
        address, size, mnemonic, op_str = linear[i]
        ops = _operands(op_str)
        if i == cmp_index:
            if compared in _FAMILIES:
                alias = {_FAMILIES[compared]}
            continue
        if i == cmp_index + 1:
            continue  # the ja/jae
        if i == jump_index:
            target = ops[0] if ops else ""
            if _FAMILIES.get(target) in summed:
                table, lea = summed[_FAMILIES[target]]
                return min(lea, cmp_index), table, True
            m = _ABS_JUMP.fullmatch(target)
            if m and _FAMILIES.get(m.group(1)) in alias:
                return cmp_index, int(m.group(2), 16), False
            return None
        if mnemonic in _WRITES_NOTHING:
            if mnemonic == "push" and i > cmp_index:
                memory = None  # a store to the stack
            continue
        if mnemonic not in _WRITES_FIRST or not ops or (mnemonic == "imul" and len(ops) == 1):
            return None  # (one-operand imul writes rdx:rax)
        dest = _FAMILIES.get(ops[0])
        if dest is None:  # a store: after the compare, it may change a compared memory operand
            if i > cmp_index:
                memory = None
            continue
        source = ops[1] if len(ops) > 1 else ""
        # a copy of the index: a 32- or 64-bit destination (8- and 16-bit writes keep the upper bits)
        copies = mnemonic in _ZERO_EXTENDING and len(ops) == 2 and i > cmp_index and ops[0] in _WIDE
        new_alias = copies and (_FAMILIES.get(source) in alias or (memory is not None and source == memory))
        new_base = None
        if mnemonic == "lea" and (m := _LEA_RIP.fullmatch(source)):
            disp = int(m.group(2), 0)
            new_base = (address + size + (disp if m.group(1) == "+" else -disp), i)
        new_loaded = None
        if mnemonic == "movsxd" and (m := _PIC_LOAD.fullmatch(source)):
            base, idx = _FAMILIES.get(m.group(1)), _FAMILIES.get(m.group(2))
            if base in bases and idx in alias:
                new_loaded = bases[base]
        new_summed = None
        if mnemonic == "add" and len(ops) == 2:
            other = _FAMILIES.get(ops[1])
            if dest in loaded and other in bases and bases[other] == loaded[dest]:
                new_summed = loaded[dest]
            elif dest in bases and other in loaded and loaded[other] == bases[dest]:
                new_summed = bases[dest]
        alias.discard(dest)
        for state in (bases, loaded, summed):
            state.pop(dest, None)
        if memory is not None and i > cmp_index and dest in memory:
            memory = None  # a register of the compared operand changed after the compare
        if new_alias:
            alias.add(dest)
        if new_base is not None:
            bases[dest] = new_base
        if new_loaded is not None:
            loaded[dest] = new_loaded
        if new_summed is not None:
            summed[dest] = new_summed
    return None
