"""Assemble pmu/trace/retprobe.S (GNU as) and write its bytes and entry points into pmu/trace/retprobe.py,
between the BEGIN/END GENERATED lines. `make retprobe` runs it; tests/unit/trace/test_retprobe.py checks
that the two agree wherever `as` is installed."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCE = os.path.join(HERE, "..", "pmu", "trace", "retprobe.S")
MODULE = os.path.join(HERE, "..", "pmu", "trace", "retprobe.py")


def assemble(source: str = SOURCE) -> tuple[bytes, dict[str, int]]:
    """The blob's bytes and its global symbols' offsets."""
    with tempfile.TemporaryDirectory() as tmp:
        obj, raw = os.path.join(tmp, "r.o"), os.path.join(tmp, "r.bin")
        subprocess.run(["as", "--64", "-o", obj, source], check=True)
        subprocess.run(["objcopy", "-O", "binary", "-j", ".text", obj, raw], check=True)
        out = subprocess.run(["nm", obj], check=True, capture_output=True, text=True).stdout
        with open(raw, "rb") as f:
            code = f.read()
    symbols = {}
    for line in out.splitlines():
        value, kind, name = line.split()
        if kind == "T":
            symbols[name] = int(value, 16)
    return code[: symbols["blob_end"]], symbols


def generated(code: bytes, symbols: dict[str, int]) -> str:
    lines = ["# BEGIN GENERATED", "CODE = bytes.fromhex("]
    text = code.hex()
    for i in range(0, len(text), 96):
        lines.append(f'    "{text[i : i + 96]}"')
    lines.append(")")
    lines.append(f"ENTRY = {symbols['entry']:#x}")
    lines.append(f"RET_TRAMP = {symbols['ret_tramp']:#x}")
    lines.append(f"SKIP_TRAP = {symbols['skip_trap']:#x}")
    lines.append("# END GENERATED")
    return "\n".join(lines)


def main() -> int:
    code, symbols = assemble()
    with open(MODULE) as f:
        text = f.read()
    new = re.sub(r"# BEGIN GENERATED.*?# END GENERATED", lambda _: generated(code, symbols), text, flags=re.S)
    with open(MODULE, "w") as f:
        f.write(new)
    print(f"retprobe.py: {len(code)} bytes, entry {symbols['entry']:#x}, ret_tramp {symbols['ret_tramp']:#x}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
