"""USDT probes (SystemTap's SDT, as DTrace's): the `.note.stapsdt` notes of an ELF file, and their
argument operands.

Each note (owner "stapsdt", type 3) describes one probe site: its address (a `nop` the compiler left in
the code), the link-time address of `.stapsdt.base` (where the file was prelinked or moved, the note's
addresses move by the difference with the section's address now), the address of the probe's
semaphore (a u16 in `.probes` the program tests before it computes the arguments; 0 when none), the
provider, the name, and the arguments as GNU as operands with their sizes: `-4@%eax`, `8@-16(%rbp)`,
`8@sym+8(%rip)`, `4@$5`, `8@(%rax,%rdx,8)`. One probe name may have several sites (inlined copies).
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass

from pmu.errors import FileError, SymbolError

NT_STAPSDT = 3

# x86-64 register names as SDT operands spell them, to (pt_regs field, byte offset, width in bytes).
_REG64 = ["rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp", "r8", "r9", "r10", "r11", "r12", "r13"]
_REG64 += ["r14", "r15", "rip"]
_ALIASES: dict[str, tuple[str, int, int]] = {}
for _r in _REG64:
    _ALIASES[_r] = (_r, 0, 8)
for _a, _b in (("ax", "rax"), ("bx", "rbx"), ("cx", "rcx"), ("dx", "rdx")):
    _ALIASES["e" + _a] = (_b, 0, 4)
    _ALIASES[_a] = (_b, 0, 2)
    _ALIASES[_a[0] + "l"] = (_b, 0, 1)
    _ALIASES[_a[0] + "h"] = (_b, 1, 1)
for _a, _b in (("si", "rsi"), ("di", "rdi"), ("bp", "rbp"), ("sp", "rsp")):
    _ALIASES["e" + _a] = (_b, 0, 4)
    _ALIASES[_a] = (_b, 0, 2)
    _ALIASES[_a + "l"] = (_b, 0, 1)
for _n in range(8, 16):
    _ALIASES[f"r{_n}d"] = (f"r{_n}", 0, 4)
    _ALIASES[f"r{_n}w"] = (f"r{_n}", 0, 2)
    _ALIASES[f"r{_n}b"] = (f"r{_n}", 0, 1)

_OPERAND = re.compile(
    r"^(?:\$(?P<imm>-?(?:0x[0-9a-fA-F]+|\d+))"
    r"|%(?P<reg>[a-z0-9]+)"
    r"|(?P<disp>[-+]?(?:0x[0-9a-fA-F]+|\d+)?)(?:(?P<sym>[A-Za-z_.$][\w.$@]*)(?P<symoff>[-+](?:0x[0-9a-fA-F]+|\d+))?)?"
    r"\((?:%(?P<base>[a-z0-9]+))?(?:,%(?P<index>[a-z0-9]+)(?:,(?P<scale>[1248]))?)?\))$"
)


@dataclass(frozen=True)
class UsdtArg:
    """One argument: `size` bytes (negative: signed), read from a register, an immediate or memory."""

    text: str
    size: int
    imm: int | None = None
    reg: tuple[str, int, int] | None = None
    """(pt_regs field, byte offset in it, width) of a register operand, or of a memory operand's base."""
    disp: int = 0
    symbol: str | None = None
    """A RIP-relative operand's symbol (its link-time address added by the resolver: `sym_vaddr`)."""
    sym_vaddr: int = 0
    index: tuple[str, int, int] | None = None
    scale: int = 1
    memory: bool = False

    def value(self, regs: object, read: object, bias: int) -> int:
        """The argument at a hit: `regs` the thread's registers (attributes named as pt_regs), `read`
        a function (address, size) -> bytes or None, `bias` the file's load bias in the process."""
        if self.imm is not None:
            raw = self.imm & (1 << 64) - 1
        elif not self.memory:
            assert self.reg is not None
            field, shift, width = self.reg
            raw = (getattr(regs, field) >> (8 * shift)) & ((1 << (8 * width)) - 1)
        else:
            if self.symbol is not None:
                addr = bias + self.sym_vaddr + self.disp
            else:
                addr = self.disp
                if self.reg is not None:
                    addr += getattr(regs, self.reg[0])
                if self.index is not None:
                    addr += getattr(regs, self.index[0]) * self.scale
            data = read(addr & (1 << 64) - 1, abs(self.size))  # type: ignore[operator]
            if not data or len(data) < abs(self.size):
                return 0
            raw = int.from_bytes(data, "little")
        width = abs(self.size)
        raw &= (1 << (8 * width)) - 1
        if self.size < 0 and raw >> (8 * width - 1):
            raw -= 1 << (8 * width)
        return raw & (1 << 64) - 1


@dataclass(frozen=True)
class UsdtNote:
    provider: str
    name: str
    pc: int
    """The site's link-time address, moved by .stapsdt.base's difference."""
    semaphore: int
    """The semaphore's link-time address (moved likewise), 0 if the probe has none."""
    args: tuple[UsdtArg, ...]
    arg_text: str


def _number(text: str) -> int:
    negative = text.startswith("-")
    text = text.lstrip("+-")
    value = int(text, 16) if text[:2].lower() == "0x" else int(text or "0")
    return -value if negative else value


def _register(name: str, text: str) -> tuple[str, int, int]:
    found = _ALIASES.get(name)
    if found is None:
        raise SymbolError(f"USDT argument '{text}': register %{name} is not understood")
    return found


def parse_arg(text: str) -> UsdtArg:
    """One `SIZE@OPERAND` argument (SIZE may be absent in old notes: 8 then)."""
    size_text, at, operand = text.partition("@")
    if not at:
        size_text, operand = "8", text
    try:
        size = int(size_text)
    except ValueError:
        raise SymbolError(f"USDT argument '{text}': bad size") from None
    if abs(size) not in (1, 2, 4, 8):
        raise SymbolError(f"USDT argument '{text}': size {size} is not 1, 2, 4 or 8")
    m = _OPERAND.match(operand)
    if m is None:
        raise SymbolError(f"USDT argument '{text}': operand not understood")
    if m["imm"] is not None:
        return UsdtArg(text, size, imm=_number(m["imm"]))
    if m["reg"] is not None:
        return UsdtArg(text, size, reg=_register(m["reg"], text))
    disp = _number(m["disp"]) if m["disp"] else 0
    base = _register(m["base"], text) if m["base"] else None
    index = _register(m["index"], text) if m["index"] else None
    if m["sym"]:
        if base is None or base[0] != "rip":
            raise SymbolError(f"USDT argument '{text}': a symbol is understood RIP-relative only")
        disp += _number(m["symoff"]) if m["symoff"] else 0
        return UsdtArg(text, size, disp=disp, symbol=m["sym"], memory=True)
    return UsdtArg(text, size, reg=base, disp=disp, index=index, scale=int(m["scale"] or 1), memory=True)


def notes(path: str) -> list[UsdtNote]:
    """The USDT notes of an ELF file, in file order ([] when it has none)."""
    from elftools.common.exceptions import ELFError
    from elftools.elf.elffile import ELFFile

    try:
        with open(path, "rb") as f:
            elf = ELFFile(f)
            section = elf.get_section_by_name(".note.stapsdt")
            if section is None:
                return []
            base_section = elf.get_section_by_name(".stapsdt.base")
            base_now = base_section["sh_addr"] if base_section is not None else None
            symbols = _symbol_values(elf)
            out = []
            for note in section.iter_notes():  # type: ignore[attr-defined]
                if note["n_name"] != "stapsdt" or note["n_type"] not in (NT_STAPSDT, "NT_GNU_BUILD_ID"):
                    continue
                desc = note["n_desc"]
                if not isinstance(desc, bytes) or len(desc) < 24:
                    continue
                pc, base, sem = struct.unpack_from("<QQQ", desc)
                provider, name, args_text = (desc[24:].split(b"\0") + [b"", b""])[:3]
                shift = base_now - base if base_now is not None and base else 0
                args = tuple(_resolve_symbol(parse_arg(a), symbols) for a in args_text.decode().split())
                out.append(
                    UsdtNote(
                        provider.decode(),
                        name.decode(),
                        pc + shift,
                        sem + shift if sem else 0,
                        args,
                        args_text.decode(),
                    )
                )
            return out
    except (OSError, ELFError) as err:
        raise FileError(f"cannot read USDT notes of {path}: {err}") from None


def _symbol_values(elf: object) -> dict[str, int]:
    values: dict[str, int] = {}
    for name in (".symtab", ".dynsym"):
        table = elf.get_section_by_name(name)  # type: ignore[attr-defined]
        if table is None:
            continue
        for sym in table.iter_symbols():
            if sym.name and sym["st_value"]:
                values.setdefault(sym.name, sym["st_value"])
    return values


def _resolve_symbol(arg: UsdtArg, symbols: dict[str, int]) -> UsdtArg:
    if arg.symbol is None:
        return arg
    vaddr = symbols.get(arg.symbol)
    if vaddr is None:
        raise SymbolError(f"USDT argument '{arg.text}': no symbol {arg.symbol}")
    return UsdtArg(arg.text, arg.size, disp=arg.disp, symbol=arg.symbol, sym_vaddr=vaddr, memory=True)


def find(path: str, provider: str | None, name: str) -> list[UsdtNote]:
    """The sites of probe [provider:]name in path; SymbolError (listing some that exist) if none."""
    all_notes = notes(path)
    found = [n for n in all_notes if n.name == name and (provider is None or n.provider == provider)]
    if found:
        providers = {n.provider for n in found}
        if len(providers) > 1:
            raise SymbolError(
                f"USDT probe {name} in {path} is in several providers ({', '.join(sorted(providers))}):"
                " write usdt:TARGET:PROVIDER:NAME"
            )
        return found
    if not all_notes:
        raise SymbolError(f"{path} has no USDT probes (no .note.stapsdt section)")
    names = sorted({f"{n.provider}:{n.name}" for n in all_notes})
    shown = ", ".join(names[:8]) + (f", ... ({len(names)} in all)" if len(names) > 8 else "")
    want = f"{provider}:{name}" if provider else name
    raise SymbolError(f"no USDT probe {want} in {path} (it has {shown})")
