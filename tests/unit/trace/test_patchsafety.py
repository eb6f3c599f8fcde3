"""Tests for pmu.trace.patchsafety on small functions built with gcc (tests/targets/ps_sites.c).

Each refusal reason has a function made to hit it; typical prologues (a frame, endbr64, a RIP-relative load,
a call, a conditional branch) must be accepted with the right displaced instructions. Addresses are the
ELF's shifted to a typical PIE load address, as the tracer would pass them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from pmu.errors import RelocationError
from pmu.events.symbols import points_into
from pmu.trace.patchsafety import JUMP_PATCH_LEN, PatchPlan, PatchRefused, Refusal, check_jump_patch
from pmu.trace.relocate import relocate

BASE = 0x5555_5555_4000
GIB = 1 << 30


@dataclass(frozen=True)
class Image:
    """A built target: its function symbols and its bytes, at BASE."""

    path: Path
    symbols: dict[str, tuple[int, int]]
    """name -> (loaded address, size)."""
    segments: tuple[tuple[int, bytes], ...]
    """(loaded address, file bytes) of each PT_LOAD."""

    def read(self, address: int, size: int) -> bytes:
        for start, data in self.segments:
            if start <= address and address + size <= start + len(data):
                return data[address - start : address - start + size]
        raise ValueError(f"{address:#x} is not in the file")

    def function(self, name: str) -> tuple[bytes, int, int]:
        """(code, start, size) of a function; the code runs 32 bytes past an unknown size."""
        start, size = self.symbols[name]
        return self.read(start, size or 32), start, size

    def check(self, name: str, offset: int = 0, **kwargs: object) -> PatchPlan:
        code, start, size = self.function(name)
        return check_jump_patch(code, start, size, start + offset, **kwargs)  # type: ignore[arg-type]

    def pointed(self, lo: int, hi: int) -> bool:
        """Whether the file holds a code address in [lo, hi) (pmu.events.symbols.points_into)."""
        return points_into(str(self.path), lo - BASE, hi - BASE)

    @property
    def entries(self) -> set[int]:
        return {start for start, _ in self.symbols.values()}


def load_image(path: Path) -> Image:
    from elftools.elf.elffile import ELFFile

    with open(path, "rb") as f:
        elf = ELFFile(f)
        segments = tuple(
            (BASE + seg["p_vaddr"], seg.data()) for seg in elf.iter_segments() if seg["p_type"] == "PT_LOAD"
        )
        symbols = {
            sym.name: (BASE + sym["st_value"], sym["st_size"])
            for sym in elf.get_section_by_name(".symtab").iter_symbols()
            if sym["st_info"]["type"] == "STT_FUNC" and sym["st_shndx"] != "SHN_UNDEF"
        }
    return Image(path, symbols, segments)


@pytest.fixture(scope="module", params=["plain", "cet"])
def image(request: pytest.FixtureRequest, build: Callable[..., Path]) -> Image:
    """ps_sites built with -O2, and with -fcf-protection=full (endbr64 prologues, `notrack jmp` tables)."""
    flags = ("-O2", "-fcf-protection=full") if request.param == "cet" else ("-O2", "-fcf-protection=none")
    return load_image(build("ps_sites", *flags, suffix=f"_{request.param}"))


# --- sites that take a jump patch -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "offset", "length", "texts"),
    [
        ("ps_ok_frame", 0, 8, ["push rbp", "mov rbp, rsp", "sub rsp, 0x10"]),
        ("ps_ok_frame", 1, 7, ["mov rbp, rsp", "sub rsp, 0x10"]),  # a site inside a function
        ("ps_ok_endbr", 0, 6, ["endbr64", "push r15"]),
        ("ps_ok_call_last", 0, 6, ["push rbx", "call"]),
        ("ps_ok_jcc", 0, 5, ["test rdi, rdi", "je"]),
        ("ps_ok_loop_to_entry", 0, 5, ["add rax, 1", "nop"]),
        ("ps_two_entries", 0, 8, ["push rbx", "mov rax, rdi", "add rax, 1"]),  # its inner entry not given
    ],
)
def test_typical_prologues_take_a_jump(
    image: Image, name: str, offset: int, length: int, texts: list[str]
) -> None:
    plan = image.check(name, offset)
    _, start, _ = image.function(name)
    assert plan.site == start + offset
    assert plan.length == length >= JUMP_PATCH_LEN
    assert plan.count == len(texts) == len(plan.boundaries) == len(plan.insns)
    assert [insn.text[: len(t)] for insn, t in zip(plan.insns, texts, strict=True)] == texts
    assert plan.boundaries == tuple(insn.address - plan.site for insn in plan.insns)
    assert plan.boundaries[0] == 0 and plan.insns[-1].address + plan.insns[-1].size == plan.site + length


def test_rip_relative_prologue_takes_a_jump_in_reach(image: Image) -> None:
    plan = image.check("ps_ok_riprel", trampoline=image.symbols["ps_ok_riprel"][0] - 0x4000_0000)
    assert (plan.length, plan.count, plan.boundaries) == (7, 1, (0,))
    assert "rip" in plan.insns[0].op_str


def test_compiled_c_functions_take_a_jump(image: Image) -> None:
    """gcc's own prologues (-O2, with and without endbr64)."""
    plan = image.check("helper")
    assert plan.length >= 5
    assert image.check("ps_switch", read=image.read, known_entries=image.entries).length >= 5


def test_plan_length_is_what_relocate_displaces(image: Image) -> None:
    for name in ("ps_ok_frame", "ps_ok_endbr", "ps_ok_riprel", "ps_ok_call_last", "ps_ok_jcc"):
        code, start, _ = image.function(name)
        plan = image.check(name)
        _, length = relocate(code, start, start + 0x10_0000, plan.count)
        assert length == plan.length


def test_a_longer_patch_displaces_more(image: Image) -> None:
    plan = image.check("ps_ok_frame", patch_len=1)
    assert (plan.length, plan.count) == (1, 1)
    plan = image.check("ps_ok_frame", patch_len=12)
    assert (plan.length, plan.count) == (12, 5)


# --- sites that cannot ------------------------------------------------------------------------------------

REFUSALS = [
    # (function, offset, check_jump_patch keywords, reason, message)
    ("ps_no_size", 0, {}, Refusal.UNKNOWN_SIZE, r"size is unknown"),
    ("ps_undecodable", 0, {}, Refusal.UNDECODABLE, r"stops at 0x[0-9a-f]+ \(bytes 06 5d c3"),
    ("ps_ok_frame", 2, {}, Refusal.NOT_ON_BOUNDARY, r"is inside the instruction at"),
    ("ps_tiny", 0, {}, Refusal.PAST_SYMBOL_END, r"5 bytes from 0x[0-9a-f]+ pass the function's end"),
    ("ps_ok_frame", 11, {}, Refusal.PAST_SYMBOL_END, r"pass the function's end"),  # leave; ret
    (
        "ps_two_entries",
        0,
        {"entries": True},
        Refusal.ENTRY_IN_PATCH,
        r"a symbol starts at 0x[0-9a-f]+, inside",
    ),
    ("ps_call_in_patch", 0, {}, Refusal.CALL_IN_PATCH, r"'call rax' at 0x[0-9a-f]+ returns to 0x"),
    ("ps_xbegin", 0, {}, Refusal.UNRELOCATABLE, r"cannot relocate 'xbegin .*transaction"),
    ("ps_ok_riprel", 0, {"far": 3 * GIB}, Refusal.OUT_OF_REACH, r"out of rel32 reach of the site"),
    (
        "ps_ok_riprel",
        0,
        {"far": -2 * GIB + 0x100},
        Refusal.OUT_OF_REACH,
        r"reads 0x[0-9a-f]+, out of rel32 reach",
    ),
    ("ps_branch_into", 0, {}, Refusal.BRANCH_INTO_PATCH, r"'jne 0x[0-9a-f]+' at 0x[0-9a-f]+ lands at 0x"),
    ("ps_table_into", 0, {"read": True}, Refusal.BRANCH_INTO_PATCH, r"entry 2 of the jump table at 0x"),
    ("ps_jmp_reg", 0, {"read": True}, Refusal.INDIRECT_JUMP, r"'jmp rax' at 0x[0-9a-f]+ may reach any"),
    ("ps_table_into", 0, {}, Refusal.INDIRECT_JUMP, r"'jmp rcx' .* may reach any"),  # the table is not read
    ("ps_switch", 0, {}, Refusal.INDIRECT_JUMP, r"jmp rax' at 0x[0-9a-f]+ may reach any"),
    ("ps_ptr_into", 0, {"pointed": True}, Refusal.INDIRECT_JUMP, r"'jmp rdx' .* may land in the patch"),
    ("ps_lea_into", 0, {"pointed": True}, Refusal.INDIRECT_JUMP, r"'jmp rdx' .* may land in the patch"),
]


@pytest.mark.parametrize(
    ("name", "offset", "options", "reason", "message"),
    REFUSALS,
    ids=[f"{r[3].name}-{r[0]}+{r[1]}" for r in REFUSALS],
)
def test_refusals_name_their_reason(
    image: Image, name: str, offset: int, options: dict[str, int], reason: Refusal, message: str
) -> None:
    _, start, _ = image.function(name)
    kwargs: dict[str, object] = {}
    if options.get("entries"):
        kwargs["known_entries"] = image.entries
    if options.get("read"):
        kwargs["read"] = image.read
    if options.get("pointed"):
        kwargs["pointed"] = image.pointed
    if "far" in options:
        kwargs["trampoline"] = start + options["far"]
    with pytest.raises(PatchRefused, match=message) as info:
        image.check(name, offset, **kwargs)
    err = info.value
    assert err.refusal is reason
    assert isinstance(err, RelocationError)
    assert err.message.startswith(f"cannot place a jump at 0x{start + offset:x} ({reason.label}): ")
    assert err.site == start + offset and err.detail in err.message


def test_every_refusal_has_a_site() -> None:
    assert {r[3] for r in REFUSALS} == set(Refusal)


def test_indirect_jump_through_a_got_entry_is_a_tail_call(image: Image) -> None:
    """ps_ok_loop_to_entry ends in `jmp [rip + fp]`: one pointer, no index, so no jump table."""
    code, start, size = image.function("ps_ok_loop_to_entry")
    assert code[size - 6 : size - 4] == b"\xff\x25"
    image.check("ps_ok_loop_to_entry")


def test_a_tail_call_through_a_pointer_takes_a_jump_when_nothing_points_into_the_patch(image: Image) -> None:
    """ps_jmp_reg ends in `jmp rax` with rax loaded from a pointer: refused without `pointed`, accepted
    with it, as no pointer of the file and no address the function makes lands in its first 5 bytes;
    the file's pointer to 3 bytes into ps_ptr_into is seen (its refusal is in REFUSALS)."""
    with pytest.raises(PatchRefused):
        image.check("ps_jmp_reg", read=image.read)
    assert image.check("ps_jmp_reg", read=image.read, pointed=image.pointed).length >= 5
    start = image.symbols["ps_ptr_into"][0]
    assert image.pointed(start + 3, start + 4) and not image.pointed(start + 1, start + 3)
    helper = image.symbols["helper"][0]
    assert image.pointed(helper, helper + 1)  # fp's initial value


def test_a_table_that_cannot_be_read_is_an_unknown_jump(image: Image) -> None:
    def unreadable(address: int, size: int) -> bytes:
        raise OSError("gone")

    with pytest.raises(PatchRefused) as info:
        image.check("ps_switch", read=unreadable)
    assert info.value.refusal is Refusal.INDIRECT_JUMP
    with pytest.raises(PatchRefused) as info:
        image.check("ps_switch", read=lambda address, size: b"")
    assert info.value.refusal is Refusal.INDIRECT_JUMP


# --- hand-made code: the checks the compiler does not make easy ------------------------------------------

A = 0x5555_5555_4000


def test_branch_to_the_first_byte_is_fine_and_into_the_rest_is_not() -> None:
    # 0: push rbp; 1: mov rbp, rsp; 4: sub rsp, 8; 8: jmp 0 / jmp 1 / jmp 8; 10: ret
    body = bytes.fromhex("554889e54883ec08")
    for rel, ok in ((-10, True), (-9, False), (-2, True)):
        code = body + b"\xeb" + rel.to_bytes(1, "little", signed=True) + b"\xc3"
        if ok:
            assert check_jump_patch(code, A, len(code), A).length == 8
        else:
            with pytest.raises(PatchRefused, match=r"lands at 0x555555554001,") as info:
                check_jump_patch(code, A, len(code), A)
            assert info.value.refusal is Refusal.BRANCH_INTO_PATCH


def test_branch_inside_the_displaced_run_is_relocated_with_it() -> None:
    # 0: test edi, edi; 2: je 5 (the next but one); 4: nop; 5: ret — the je is displaced with its target
    code = bytes.fromhex("85ff740190c3")
    assert check_jump_patch(code, A, len(code), A, patch_len=5).boundaries == (0, 2, 4)


def test_an_indirect_jump_in_the_displaced_run_is_refused_too() -> None:
    # 0: mov rax, [rdi]; 3: jmp rax — a thunk whose target is unknown
    code = bytes.fromhex("488b07ffe0") + b"\x90" * 3
    with pytest.raises(PatchRefused, match=r"\(indirect-jump\)"):
        check_jump_patch(code, A, len(code), A)


def test_caller_errors_are_value_errors() -> None:
    code = bytes.fromhex("554889e5c3")
    with pytest.raises(ValueError, match="not in the function"):
        check_jump_patch(code, A, len(code), A + len(code))
    with pytest.raises(ValueError, match="holds 5 bytes of a 6-byte function"):
        check_jump_patch(code, A, 6, A)
    with pytest.raises(ValueError, match="patch_len"):
        check_jump_patch(code, A, len(code), A, patch_len=0)


def test_refusal_labels_and_texts() -> None:
    assert Refusal.BRANCH_INTO_PATCH.label == "branch-into-patch"
    assert Refusal.INDIRECT_JUMP.value.startswith("the function has an indirect jump")
    assert len({r.value for r in Refusal}) == len(Refusal)
