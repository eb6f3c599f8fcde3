"""Whether a site may take a jump patch: the checks run, with capstone, before any byte of code is patched.

A jump-optimized probe overwrites the whole instructions at a site (at least 5 bytes) with `jmp rel32` to a
trampoline that counts the hit, runs the relocated displaced instructions and jumps back. That is safe only
if nothing else can land inside the overwritten bytes and every displaced instruction runs the same out of
line. `check_jump_patch` decodes the whole function linearly from its start (up to the symbol's size) and
returns a `PatchPlan`, or raises `PatchRefused` (a `RelocationError`) naming one `Refusal`.

What is not checked, because it cannot be seen in one function's bytes: branches from other functions into
this one (other symbols starting inside the patch are refused when the caller passes `known_entries`), code
addresses held in data (C++ landing pads, computed gotos), and an indirect jump through a GOT entry
(`jmp [rip+X]` without an index), which is taken for a tail call to the start of another function.
"""

from __future__ import annotations

import enum
import functools
import re
from collections.abc import Collection
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
) -> PatchPlan:
    """Decide whether `patch_len` bytes at `site` can be replaced by a jump, before anything is patched.

    `code` holds the function's bytes from `func_start` (at least `func_size` of them); `site` lies in the
    function. The displaced instructions are the fewest whole ones from `site` covering `patch_len` bytes.
    Refused (PatchRefused, naming a `Refusal`) when: the size is unknown (0); the function does not decode
    linearly to exactly its end; `site` is not an instruction boundary; the displaced bytes pass the end; a
    symbol in `known_entries` starts inside them; a call other than the last displaced instruction; a
    displaced instruction `relocate` refuses; `trampoline` (when given) or a RIP-relative operand is out of
    rel32 reach; a direct branch elsewhere in the function lands in (site, site + length) (the first byte is
    fine, it becomes the jump); an indirect jump other than through a GOT entry.
    Without `trampoline`, relocation is checked at an address just past the function.
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

    for address, _size, mnemonic, op_str in linear:
        if site <= address < patch_end:
            continue  # a branch of the displaced run is relocated with it (to the copy of its target)
        kind = mnemonic.split()[-1]
        if kind not in _BRANCHES:
            continue
        target = _target(op_str)
        if target is not None:
            if site < target < patch_end:
                raise PatchRefused(
                    site,
                    Refusal.BRANCH_INTO_PATCH,
                    f"'{mnemonic} {op_str}' at 0x{address:x} lands at 0x{target:x}, "
                    f"inside [0x{site:x}, 0x{patch_end:x})",
                )
        elif kind == "ljmp" or (kind == "jmp" and not _GOT_JUMP.fullmatch(op_str)):
            raise PatchRefused(
                site,
                Refusal.INDIRECT_JUMP,
                f"'{mnemonic} {op_str}' at 0x{address:x} may reach any instruction of the function",
            )

    boundaries = tuple(insn[0] - site for insn in displaced)
    return PatchPlan(
        site=site,
        length=length,
        count=len(displaced),
        boundaries=boundaries,
        insns=tuple(decode(at_site, site, len(displaced))),
    )
