"""Calls the dynamic linker makes while it starts the program are counted, as perf's enable_on_exec counts
them: IFUNC resolvers during relocation, __libc_early_init, in both engines, compared with perf stat on
kernel uprobes at the same file offsets (issue 9, item 3).

Before the fix pmu armed a library's probes at the first r_brk report of the library, after all of that
had run: /bin/true counted __libc_early_init 0 times (perf: 1).
"""

from __future__ import annotations

import contextlib
import re
import subprocess
from collections.abc import Iterator

import pytest

from pmu.events.spec import parse_event
from pmu.events.symbols import resolve_probe, resolve_target
from tests.conftest import (
    KPROBE_GROUP,
    NO_OPTIMIZE,
    TARGETS,
    KernelUprobes,
    _tracefs_write,
    have_kernel_uprobes,
    run_pmu,
    stat_counts,
)

TRUE = "/bin/true"
SH = "/bin/sh"
EARLY_INIT = "uprobe:libc:__libc_early_init"
MEMCPY = "uprobe:libc:{:#x}".format(
    resolve_probe(parse_event("uprobe:libc:memcpy"), resolve_target("libc", None)).resolver
)
"""memcpy's resolver, by its address: an IFUNC, whose name pmu follows to the implementation its resolver
picks (test_ifunc.py), has its resolver run once per relocation."""
ENGINES = ["jump", "int3"]
N = 25


@pytest.fixture
def perf() -> Iterator[KernelUprobes]:
    reason = have_kernel_uprobes()
    if reason:
        pytest.skip(reason)
    k = KernelUprobes()
    try:
        yield k
    finally:
        k.clear()


@pytest.fixture(scope="module")
def startup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """startup_main linked to libstartup.so (-z now, an IFUNC it calls itself), an LD_AUDIT module, and
    a statically linked hot (no dynamic linker at all)."""
    out = tmp_path_factory.mktemp("startup")
    cc = ["gcc", "-O1", "-g"]
    lib, audit, main, static = (
        out / n for n in ("libstartup.so", "libaudit.so", "startup_main", "hot_static")
    )
    subprocess.run([*cc, "-shared", "-fPIC", "-Wl,-z,now", "-o", lib, TARGETS / "startup_lib.c"], check=True)
    subprocess.run([*cc, "-shared", "-fPIC", "-o", audit, TARGETS / "startup_audit.c"], check=True)
    subprocess.run(
        [*cc, "-o", main, TARGETS / "startup_main.c", f"-L{out}", "-lstartup", f"-Wl,-rpath,{out}"],
        check=True,
    )
    subprocess.run([*cc, "-static", "-o", static, TARGETS / "hot.c"], check=True)
    return {"lib": str(lib), "audit": str(audit), "main": str(main), "static": str(static)}


def _fsgsbase() -> bool:
    with open("/proc/cpuinfo") as f:
        return any(line.startswith("flags") and " fsgsbase" in line for line in f)


def _pmu(engine: str, events: list[str], argv: list[str]) -> tuple[dict[str, int], str]:
    """pmu stat -v in `engine` ("jump": the default, "int3": --no-optimize); checks how each probe ran."""
    args = ["stat", "-v", "-x,"] + (["--no-optimize"] if engine == "int3" else [])
    for e in events:
        args += ["-e", e]
    r = run_pmu(*args, "--", *argv, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    jumps = engine == "jump" and not NO_OPTIMIZE and _fsgsbase()
    for e in events:
        how = re.search(rf"^pmu: {re.escape(e)}: (.*)$", r.stderr, re.M)
        assert how, r.stderr
        assert how[1].startswith("optimized (jump patch") == jumps, how[1]
    return stat_counts(r.stderr), r.stderr


def _perf(perf: KernelUprobes, events: list[str], argv: list[str], exe: str | None = None) -> dict[str, int]:
    names = {}
    for i, e in enumerate(events):
        spec = parse_event(e)
        probe = resolve_probe(spec, resolve_target(spec.target, exe))
        with contextlib.suppress(OSError):  # left over by a run that was killed
            _tracefs_write(f"-:{KPROBE_GROUP}/startup{i}\n")
        names[e] = perf.add(f"startup{i}", probe.path, probe.file_offset)
    counts = perf.stat(list(names.values()), argv)
    perf.clear()
    return {e: counts.get(k, -1) for e, k in names.items()}


@pytest.mark.parametrize("engine", ENGINES)
def test_libc_early_init_of_true_equals_perf(perf, engine):
    theirs = _perf(perf, [EARLY_INIT], [TRUE])
    ours, _ = _pmu(engine, [EARLY_INIT], [TRUE])
    assert ours == theirs == {EARLY_INIT: 1}


@pytest.mark.parametrize("engine", ENGINES)
def test_ifunc_resolver_of_a_z_now_library_equals_perf(perf, startup, engine):
    """ld.so runs pick_resolver once, relocating libstartup.so (-z now) before main; pick_impl is then
    called N times through the resolved PLT slot."""
    resolver, impl = f"uprobe:{startup['lib']}:pick_resolver", f"uprobe:{startup['lib']}:pick_impl"
    argv = [startup["main"], str(N)]
    theirs = _perf(perf, [resolver, impl], argv)
    ours, _ = _pmu(engine, [resolver, impl], argv)
    assert ours == theirs == {resolver: 1, impl: N}


@pytest.mark.parametrize("engine", ENGINES)
def test_libc_memcpy_resolver_under_ls_equals_perf(perf, engine):
    """Each object that links memcpy (ls, libselinux, libc...) makes ld.so run its resolver once."""
    argv = ["ls", "/"]
    theirs = _perf(perf, [MEMCPY], argv)
    ours, _ = _pmu(engine, [MEMCPY], argv)
    assert theirs[MEMCPY] > 1  # before the fix pmu counted only the calls after start-up
    assert ours == theirs


@pytest.mark.parametrize("engine", ENGINES)
def test_start_up_of_followed_execs_equals_perf(perf, startup, engine):
    """A shell forks and execs: each exec'd image's start-up is counted, the shell's own as well."""
    resolver = f"uprobe:{startup['lib']}:pick_resolver"
    argv = [SH, "-c", f"{TRUE}; {startup['main']} 3; {startup['main']} 4"]
    theirs = _perf(perf, [EARLY_INIT, resolver], argv)
    ours, _ = _pmu(engine, [EARLY_INIT, resolver], argv)
    assert theirs[EARLY_INIT] >= 3 and theirs[resolver] == 2
    assert ours == theirs


@pytest.mark.parametrize("engine", ENGINES)
def test_signals_during_start_up_are_delivered_and_audit_namespaces_counted(perf, startup, engine):
    """An LD_AUDIT module raises SIGUSR1 while ld.so loads the program (its handler counts them); it
    brings a libc of its own, reported RT_CONSISTENT before the program's libraries are mapped."""
    resolver = f"uprobe:{startup['lib']}:pick_resolver"
    argv = ["/usr/bin/env", f"LD_AUDIT={startup['audit']}", startup["main"], str(N)]
    theirs = _perf(perf, [EARLY_INIT, resolver], argv)
    ours, stderr = _pmu(engine, [EARLY_INIT, resolver], argv)
    audit = re.findall(r"^audit: raised=(\d+) handled=(\d+)$", stderr, re.M)
    assert len(audit) == 1 and int(audit[0][0]) >= 3, stderr
    assert audit[0][0] == audit[0][1]
    # env's libc, the audit namespace's and the program's; the resolver once.
    assert theirs == {EARLY_INIT: 3, resolver: 1}
    assert ours == theirs


@pytest.mark.parametrize("engine", ENGINES)
def test_static_program_has_no_start_up_to_follow(perf, startup, engine):
    """No dynamic linker: a probe of the program counts as usual, and one on libc.so (never mapped)
    counts 0, as perf's does."""
    work = "uprobe:work"
    argv = [startup["static"], str(N)]
    theirs = _perf(perf, [work], argv, exe=startup["static"])
    args = ["stat", "-x,", "-e", work, "-e", EARLY_INIT] + (["--no-optimize"] if engine == "int3" else [])
    r = run_pmu(*args, "--", *argv, timeout=60)
    assert r.returncode == 0, r.stderr
    assert stat_counts(r.stderr) == {work: theirs[work], EARLY_INIT: 0}
    assert theirs == {work: N}
