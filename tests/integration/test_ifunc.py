"""A probe on an IFUNC symbol (libc's memcpy) counts the implementation its resolver picked, as the program
calls it: the same address the program's own dynamic linker bound (the target prints it, from dladdr),
and the same count as a kernel uprobe there. pmu says so in one line."""

from __future__ import annotations

import re
import subprocess

from pmu.events.spec import parse_event
from pmu.events.symbols import resolve_probe, resolve_target
from tests.conftest import run_pmu, stat_counts


def test_memcpy_counts_the_chosen_implementation(build, kernel_uprobes):
    exe = str(build("ifunc", "-ldl"))
    bare = subprocess.run([exe, "3000"], capture_output=True, text=True, timeout=60)
    bound = int(re.search(r"memcpy=(0x[0-9a-f]+)", bare.stdout).group(1), 16)
    libc = resolve_target("libc", None, [])
    probe = resolve_probe(parse_event("uprobe:libc:memcpy"), libc)
    assert probe.resolver and probe.vaddr == bound  # what the program's dynamic linker bound
    kname = kernel_uprobes.add("ifunc_memcpy", libc, probe.file_offset)
    perf = kernel_uprobes.stat([kname], [exe, "3000"])
    r = run_pmu("stat", "-x,", "-e", "uprobe:libc:memcpy", "--", exe, "3000")
    assert r.returncode == 0, r.stderr
    assert stat_counts(r.stderr) == {"uprobe:libc:memcpy": perf[kname]}
    assert perf[kname] >= 3000
    assert "uprobe:libc:memcpy: an IFUNC: counted at the implementation its resolver picks" in r.stderr
