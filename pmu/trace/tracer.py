"""The tracer's event loop: launch or seize tasks, follow clone/fork/exec/exit, run breakpoints, clean up.

One stop per hit: at our int3 the tracer calls the breakpoint's consumers, points RIP at the
out-of-line slot (relocated displaced instruction + jump back) and resumes. Everything that is not ours
(the tracee's own SIGTRAPs, int3s and other signals) is passed on unchanged. The tracer knows nothing of
events: it reports lifecycle changes to a TraceListener and hits to breakpoint consumers.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from pmu.errors import ProcessError, TraceError, TracePermissionError
from pmu.ring import Ring
from pmu.trace import guard, inject, retprobe
from pmu.trace import ptrace_ops as pt
from pmu.trace.breakpoints import Breakpoints, write_first_byte_last
from pmu.trace.launch import exec_when_told
from pmu.trace.maps import status_field, tgid_of, threads_of
from pmu.trace.patches import Patches
from pmu.trace.returns import Returns
from pmu.trace.rtld import RT_ADD, RT_CONSISTENT, debug_state_address, link_map_state, r_debug_address
from pmu.trace.tasks import (
    AddressSpace,
    Breakpoint,
    JumpPatch,
    ReturnFrame,
    SlotArea,
    Task,
    TaskState,
)

WNOHANG = os.WNOHANG
SPIN = 20
"""Polls of waitpid before sleeping in it: a tracee hitting probes stops again within microseconds, and
a tracer that slept must be woken on another CPU (measured here: 60 µs a hit unpinned, 20 with the
polls). Not when pmu has a single CPU: polling would only take it from the tracee."""
PUSHF = b"\x9c"
POPF = b"\x9d"
TRAP_FLAG = 0x100
STARTUP_STOPS = 20000
"""Syscall stops a task may make in its start-up phase (see Tracer.starting) before it is resumed with
PTRACE_CONT anyway: a bound on the cost should the dynamic linker never say it is done."""
SYS_MPROTECT = 10
ENTER_RAX = -errno.ENOSYS & 0xFFFFFFFFFFFFFFFF
"""rax at a syscall-enter stop (x86-64 sets it before the stop); an exit stop holds the result."""


@dataclass
class StartUp:
    """Where a task is in the dynamic linker's start-up (see Tracer.starting)."""

    stops_left: int = STARTUP_STOPS
    added: bool = False
    """r_brk has reported RT_ADD for the program's link map: the next RT_CONSISTENT ends start-up."""


TrapHandler = Callable[[Task], bool]
"""Claims a trap stop of a task (True: handled and resumed) or passes it on (False)."""


class TraceListener(Protocol):
    """What the layer above (the evlist) hears from the tracer."""

    def task_new(self, task: Task, parent: Task, fork: bool) -> None:
        """`task` was created by `parent`: a thread (fork=False) or a process (fork=True)."""

    def task_exec(self, task: Task, former_tid: int) -> None:
        """`task` exec'd: its old address space and breakpoints are gone. If a non-leader thread exec'd,
        it now has the leader's tid and `former_tid` is the tid it had."""

    def task_exit(self, task: Task) -> None:
        """`task` is exiting (still inspectable) or has exited."""

    def maps_changed(self, mm: AddressSpace) -> None:
        """Files may have been mapped or unmapped in `mm` (exec, dlopen, dlclose)."""

    def wants(self, task: Task) -> bool:
        """Whether anything counts on a new process `task` (if not, the tracer lets it go)."""
        ...

    def awaits_mappings(self, mm: AddressSpace) -> bool:
        """Whether some probe of mm waits for its file to be mapped (then dlopen must be watched)."""
        ...


class Tracer(Breakpoints, Patches, Returns):
    """Owns every traced task; the only place that waits for and resumes them.

    Its jobs are split along modules, each a mixin of this class sharing its state: this module has the
    event loop, the tasks' lifecycle (clone, fork, exec, exit, the dynamic linker's start-up), stopping
    and resuming, and leaving; breakpoints.py the int3 probes, their slots and the trap guard;
    patches.py the jump patches and the memory shared with a tracee; returns.py return hijacking."""

    def __init__(self, listener: TraceListener) -> None:
        self.listener = listener
        self.tasks: dict[int, Task] = {}
        self.pending: deque[tuple[int, int]] = deque()
        """Wait statuses collected while stopping threads, handled before waiting again."""
        self.early: dict[int, int] = {}
        """First stops of new tasks that arrived before their parent's clone/fork event."""
        self.root: Task | None = None
        self.root_status: int | None = None
        self.stop_requested = False
        self.tick: Callable[[], None] | None = None
        """Called from the loop when tick_due is set (by a timer signal): drains rings while tracing."""
        self.tick_due = False
        self.watched: int | None = None
        self.watched_status: int | None = None
        self.ring_shape: tuple[int, int] | None = None
        """(pages, event indexes) of the rings recording trampolines write into; None when not recording."""
        self.rings: list[Ring] = []
        """The rings made in traced processes that some live process still maps."""
        self.retired: list[Ring] = []
        """Rings no process maps any more, to be drained to the end and closed by the consumer."""
        self.on_fs_base: Callable[[Task], None] | None = None
        """Called when a thread's FS base is seen to change (how recording trampolines name threads)."""
        self.trap_handlers: dict[int, list[TrapHandler]] = {
            signal.SIGTRAP: [self._trap],
            signal.SIGILL: [self._fault],
        }
        """Who claims a signal-delivery-stop of each trap signal, in order (see register_trap)."""
        self._stopping: dict[AddressSpace, int] = {}
        self._held: dict[int, int] = {}
        """Signals to deliver at detach, collected by `quiesce`."""
        self._stopped_by_us: dict[AddressSpace, list[Task]] = {}
        self.starting: dict[Task, StartUp] = {}
        """Tasks between their exec and the end of the dynamic linker's start-up, while a probe of theirs
        waits for its file. They are resumed
        with PTRACE_SYSCALL, so that each library is armed as soon as its code is mapped: ld.so runs IFUNC
        resolvers and __libc_early_init before r_brk first reports the libraries, and enable_on_exec
        counts them. Start-up ends at the first RT_CONSISTENT after an RT_ADD: an LD_AUDIT module's
        namespace is reported RT_CONSISTENT before the program's libraries are even mapped."""

    # ---- starting -------------------------------------------------------------------------------

    def launch(
        self,
        argv: Sequence[str],
        exe: str,
        child_signals: Mapping[int, signal.Handlers] | None = None,
        env: Mapping[str, str] | None = None,
    ) -> Task:
        """Fork a child that waits on a pipe, seize it, then let it exec `exe` with `argv`.

        `child_signals` are the dispositions the command starts with (by default SIGPIPE and SIGXFSZ,
        which Python ignores, go back to SIG_DFL, as any shell would give them); `env` its environment
        (by default pmu's).

        The child is stopped at its exec event when this returns, nothing of the command has run.
        """
        if child_signals is None:
            child_signals = {signal.SIGPIPE: signal.SIG_DFL, signal.SIGXFSZ: signal.SIG_DFL}
        rfd, wfd = os.pipe()
        pid = os.fork()
        if pid == 0:  # child
            exec_when_told(rfd, wfd, exe, argv, child_signals, os.environ if env is None else env)
        os.close(rfd)
        mm = AddressSpace(pid)
        try:
            pt.seize(pid, pt.TRACE_OPTIONS | pt.O_EXITKILL)
        except Exception as err:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise TraceError(f"cannot trace the command: {err}") from None
        task = Task(tid=pid, pid=pid, mm=mm, state=TaskState.RUNNING)
        mm.tasks.add(task)
        self.tasks[pid] = task
        self.root = task
        os.write(wfd, b"g")
        os.close(wfd)
        # Wait for the exec event (or the child's death if exec failed).
        while True:
            tid, status = pt.wait(pid)
            if os.WIFEXITED(status) or os.WIFSIGNALED(status):
                self.tasks.pop(pid, None)
                raise ProcessError(f"cannot run '{argv[0]}'")
            if status >> 16 == pt.EVENT_EXEC:
                task.state = TaskState.STOPPED
                self._exec_mm(task)
                return task
            if status >> 16 == 0:
                pt.cont(pid, os.WSTOPSIG(status))
            else:
                pt.cont(pid, 0)

    def attach(self, pid: int, only_tid: int | None = None) -> list[Task]:
        """Seize every thread of process `pid` and stop them all; returns the tasks (leader first).

        Every thread is traced even for `-t TID`: the breakpoints live in memory all threads share, so
        each thread's traps must be ours to handle. The caller opens events on the tasks it counts.
        """
        check_traceable(pid)
        mm: AddressSpace | None = None
        seized: dict[int, Task] = {}
        try:
            while True:  # threads may be created while we attach: list again until none is new
                tids = _threads(pid)
                if only_tid is not None and only_tid not in tids:
                    raise ProcessError(f"no thread {only_tid} in process {pid}")
                new = [t for t in tids if t not in seized]
                if not new:
                    break
                for tid in new:
                    try:
                        pt.seize(tid, pt.TRACE_OPTIONS)
                    except pt.PtraceError as err:
                        if tid == pid or not pt.is_gone(err):
                            raise _permission(pid, err) from None
                        continue
                    if mm is None:
                        mm = AddressSpace(pid)
                    task = Task(tid=tid, pid=pid, mm=mm, state=TaskState.RUNNING)
                    mm.tasks.add(task)
                    self.tasks[tid] = task
                    seized[tid] = task
        except BaseException:
            for task in seized.values():
                with contextlib.suppress(pt.PtraceError):
                    pt.detach(task.tid)
                self._forget(task)
            raise
        assert mm is not None
        self._stop_all(mm)
        for task in seized.values():
            self.fs_base(task)
        leader = seized[pid]
        return [leader, *(t for tid, t in seized.items() if tid != pid)]

    def start(self, task: Task) -> None:
        """Arm the dynamic linker hook in the task's image if a probe waits for a file to be mapped,
        and let every thread of it run. (Attached to a process whose probed files are all mapped, no
        int3 is left in it: with jump patches only, it survives even a SIGKILL of pmu.)"""
        if self.listener.awaits_mappings(task.mm) or not task.fs_base:
            self._hook_rtld(task)  # (no TLS yet: ld.so's first r_brk call comes once it is set up)
        self.listener.maps_changed(task.mm)
        self._hook_unwinder(task.mm)
        self._watch_startup(task)
        for t in list(task.mm.tasks):
            if t.state is TaskState.STOPPED:
                self._resume(t)

    # ---- the loop -------------------------------------------------------------------------------

    def run(self) -> None:
        """Handle stops until no traced task is left, a watched child exits, or a stop is requested."""
        self._loop(False)

    def run_until_root_exits(self) -> None:
        """Handle stops until the launched command itself has exited (as perf stat waits for it)."""
        self._loop(True)

    def request_stop(self) -> None:
        """Ask the loop to return (safe from a signal handler: the blocking wait is interrupted)."""
        self.stop_requested = True

    def watch(self, pid: int) -> None:
        """Return from the loop when child `pid` (an untraced command, such as `sleep 1`) exits."""
        self.watched = pid

    def _loop(self, root_only: bool) -> None:
        handle = self._handle
        wait = pt.wait
        pending = self.pending
        spin = SPIN if len(os.sched_getaffinity(0)) > 1 else 0
        while self.tasks and not (root_only and self.root_status is not None):
            if self.stop_requested or self.watched_status is not None:
                break
            if self.tick_due:
                self.tick_due = False
                if self.tick is not None:
                    self.tick()
            if pending:
                tid, status = pending.popleft()
            else:
                try:
                    tid = 0
                    for _ in range(spin):  # a stop usually follows soon: poll before sleeping
                        tid, status = wait(-1, WNOHANG, True)
                        if tid:
                            break
                    if not tid and self.tick_due:  # the last tick left work: no sleeping
                        tid, status = wait(-1, WNOHANG, True)
                        if not tid:
                            continue
                    if not tid:
                        tid, status = wait(-1, 0, True)
                except InterruptedError:
                    continue  # a signal: the loop condition looks at stop_requested
                except ChildProcessError:
                    break
                if tid == self.watched:
                    self.watched_status = status
                    break
            handle(tid, status)

    def _handle(self, tid: int, status: int) -> None:
        task = self.tasks.get(tid)
        if task is None:
            self._unknown(tid, status)
            return
        if (status & 0xFF) == 0x7F:  # stopped
            sig = (status >> 8) & 0xFF
            event = status >> 16
            if event == 0:
                if sig == pt.SYSCALL_TRAP:
                    self._syscall_stop(task)
                    return
                for handler in self.trap_handlers.get(sig, ()):
                    if handler(task):
                        return
                self._signal(task, sig)
            else:
                task.state = TaskState.STOPPED
                self._event(task, event, sig)
        else:
            self._exited(task, status)

    def register_trap(self, sig: int, handler: TrapHandler) -> None:
        """Give a backend the signal-delivery-stops of `sig` (SIGTRAP, SIGILL) that no handler before
        it claimed (the breakpoints' own come first). A handler returns True if the stop was its trap
        (and has resumed the task), False to pass it on; a stop nobody claims is delivered unchanged."""
        self.trap_handlers.setdefault(sig, []).append(handler)

    def _signal(self, task: Task, sig: int) -> None:
        """A signal-delivery-stop for a signal that is not ours: deliver it unchanged."""
        task.state = TaskState.STOPPED
        self._resume(task, sig)

    def fs_base(self, task: Task) -> int:
        """The task's FS base: read now if it is stopped, else as last seen."""
        if task.state is TaskState.STOPPED:
            with contextlib.suppress(pt.PtraceError):
                fs = pt.peek_user(task.tid, pt.FS_BASE)
                if fs != task.fs_base:
                    task.fs_base = fs
                    if self.on_fs_base is not None:
                        self.on_fs_base(task)
                    self._check_identity(task.mm, task)
        return task.fs_base

    def _event(self, task: Task, event: int, sig: int) -> None:
        if event == pt.EVENT_STOP:
            self.fs_base(task)
            self._check_shared_fs(task)
            self._check_identity(task.mm, task)
            if task.detach_on_stop:
                self._detach_task(task)
                return
            if sig in (signal.SIGSTOP, signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU):
                task.state = TaskState.GROUP_STOPPED
                with contextlib.suppress(pt.PtraceError):
                    pt.listen(task.tid)
                return
            self._resume(task)
        elif event in (pt.EVENT_CLONE, pt.EVENT_FORK, pt.EVENT_VFORK):
            self._new_task(task, event)
            self._resume(task)
        elif event == pt.EVENT_EXEC:
            execed = self._exec(task)
            if execed is not None:
                self._resume(execed)
        elif event == pt.EVENT_EXIT:
            task.remember_comm()
            self.fs_base(task)
            self.listener.task_exit(task)
            self._free_shadow_row(task)  # its memory is still there at the exit stop
            self._resume(task)
            task.state = TaskState.EXITING
        else:
            self._resume(task)

    def _unknown(self, tid: int, status: int) -> None:
        """A stop of a task whose parent's clone/fork event we have not seen yet: hold it."""
        if (status & 0xFF) == 0x7F:
            self.early[tid] = status

    # ---- lifecycle ------------------------------------------------------------------------------

    def _new_task(self, parent: Task, event: int) -> None:
        child_tid = pt.event_msg(parent.tid)
        thread = False
        if event == pt.EVENT_CLONE:
            thread = tgid_of(child_tid) == parent.pid
            self.fs_base(parent)  # current, for the child's first stop to compare with
        if thread or event == pt.EVENT_VFORK:
            mm = parent.mm  # shared memory: a thread, or a vfork child until it execs
        else:
            mm = AddressSpace(child_tid)
            # The child holds a copy of every breakpoint and slot; nobody owns them until re-added.
            for addr, bp in parent.mm.breakpoints.items():
                mm.breakpoints[addr] = Breakpoint(addr, bp.orig, bp.slot, bp.length)
            mm.areas = [SlotArea(a.base, a.size, a.used) for a in parent.mm.areas]
            mm.internal = dict(parent.mm.internal)
            mm.inherited = {a: n for a, n in parent.mm.semaphores.items() if n > 0}
            mm.ret_tramp = parent.mm.ret_tramp
            mm.guard = parent.mm.guard.copy() if parent.mm.guard is not None else None
            mm.jumps = {a: _copy_patch(p) for a, p in parent.mm.jumps.items()}
            mm.returns = parent.mm.returns  # until the child gets its own return area, below
            if mm.returns is not None:
                mm.returns.area.users += 1
            mm.counters = parent.mm.counters  # until the child gets its own, below
            mm.ring = parent.mm.ring  # shared with the parent: records carry the child's own pid
            if mm.ring is not None:
                mm.ring.users += 1
            mm.columns = parent.mm.columns
            mm.locked = parent.mm.locked
            internal = {
                "r_brk": self._rtld_hit,
                "unwind": self._unwinding,
                "catch": self._caught,
                "skip": self._skipped_entry,
            }
            for addr, purpose in mm.internal.items():
                mm.breakpoints[addr].consumers.append(internal[purpose])
        child = Task(tid=child_tid, pid=parent.pid if thread else child_tid, mm=mm)
        if mm is not parent.mm:  # the child's stack is a copy: so are the hijacked returns on it
            child.fs_base = self.fs_base(parent)  # and its TLS: its shadow row is its parent's
            child.shadow = [
                ReturnFrame(f.rsp, f.orig, f.handler, f.entry_ns, f.chained, f.restored)
                for f in parent.shadow
            ]
        mm.tasks.add(child)
        self.tasks[child_tid] = child
        self.listener.task_new(child, parent, fork=not thread)
        if mm is not parent.mm:
            if not self.listener.wants(child):
                # Nobody counts this child: take every byte of ours out of its memory and let it go.
                for bp in list(mm.breakpoints.values()):
                    bp.consumers.clear()
                for patch in mm.jumps.values():
                    patch.users = 0
                self._unhijack(child)
                child.detach_on_stop = True
                mm.counters = None
                if mm.returns is not None:
                    mm.returns.area.fold()
                    mm.returns = None
                if mm.ring is not None:
                    mm.ring.users -= 1
                    mm.ring = None
            elif mm.counters is not None:
                with contextlib.suppress(TraceError, OSError, pt.PtraceError):
                    # If it fails, the child keeps counting in its parent's area: totals stay right.
                    self._own_counters(child, mm.counters)
                if mm.returns is not None:
                    with contextlib.suppress(TraceError, OSError, pt.PtraceError):
                        self._own_returns(child, mm.returns)
            self.collect(mm)  # whatever no event re-added is restored in the child
        early = self.early.pop(child_tid, None)
        if early is not None:
            self.pending.append((child_tid, early))

    def _exec(self, task: Task) -> Task | None:
        """The exec event, reported under the leader's tid. Returns the task that now runs the image, or
        None if nothing counts on it any more and it was let go."""
        former = pt.event_msg(task.tid)
        if former != task.tid:
            # A non-leader thread exec'd and took the leader's tid: the leader is gone, and the thread
            # that exec'd (our Task for `former`) goes on under the leader's tid.
            execer = self.tasks.get(former)
            if execer is not None and execer is not task:
                leader = task
                if leader.state not in (TaskState.EXITED, TaskState.EXITING):
                    self.listener.task_exit(leader)
                self._forget(leader)
                del self.tasks[former]
                execer.tid = leader.tid
                execer.state = TaskState.STOPPED
                self.tasks[execer.tid] = execer
                task = execer
        # Every other thread of the old image is gone.
        for other in list(task.mm.tasks):
            if other is not task and other.pid == task.pid:
                if other.state not in (TaskState.EXITED, TaskState.EXITING):
                    self.listener.task_exit(other)
                self._forget(other)
        self.starting.pop(task, None)
        self._exec_mm(task)
        self.listener.task_exec(task, former)
        if not self.listener.wants(task):
            # A vfork child nobody counts (--no-inherit) has left its parent's memory: let it go.
            self._detach_task(task)
            return None
        self._hook_rtld(task)
        self.listener.maps_changed(task.mm)
        self._hook_unwinder(task.mm)
        self._watch_startup(task)
        return task

    def _exec_mm(self, task: Task) -> None:
        old = task.mm
        old.tasks.discard(task)
        if not old.tasks:
            self._mm_dead(old)
            old.close()
        task.pid = task.tid
        task.shadow.clear()
        task.mm = AddressSpace(task.tid)
        task.mm.tasks.add(task)
        self._leave_exec_syscall(task)
        self.fs_base(task)  # the new image's (0 until ld.so sets up TLS), not the old one's

    def _leave_exec_syscall(self, task: Task) -> None:
        """At its exec stop a thread is still inside execve, whose return value the kernel writes to rax
        once it resumes: a syscall run in it now would run as syscall 0 (read). One step takes the
        thread out to the new image's first instruction, where syscalls can be run in it."""
        try:
            pt.singlestep(task.tid)
            tid, status = pt.wait(task.tid)
        except (pt.PtraceError, ChildProcessError):
            return
        if (status & 0xFF) != 0x7F:
            self.pending.append((tid, status))
        elif status >> 16 or (status >> 8) & 0xFF != signal.SIGTRAP:
            self.pending.append((tid, status))  # a real stop: handled by the loop later

    def _exited(self, task: Task, status: int) -> None:
        if task.state not in (TaskState.EXITED, TaskState.EXITING):
            self.listener.task_exit(task)
            self._free_shadow_row(task)
        if task is self.root:
            self.root_status = status
        self._forget(task)

    def _forget(self, task: Task) -> None:
        self.starting.pop(task, None)
        if task.state is not TaskState.EXITED:
            task.remember_comm()
        task.state = TaskState.EXITED
        if self.tasks.get(task.tid) is task:
            del self.tasks[task.tid]
        task.mm.tasks.discard(task)
        if not task.mm.tasks:
            self._mm_dead(task.mm)
            task.mm.close()

    def _mm_dead(self, mm: AddressSpace) -> None:
        """mm has no task left: a ring nobody maps any more is retired (drained to the end, then closed by
        the consumer), so that a run that execs thousands of programs does not keep thousands of rings."""
        mm.dead = True
        if mm.returns is not None:
            mm.returns.area.fold()  # what its processes counted stays, the mapping goes
        shared = mm.ring
        mm.ring = None
        if shared is not None:
            shared.users -= 1
            if shared.users <= 0 and shared.ring in self.rings:
                self.rings.remove(shared.ring)
                self.retired.append(shared.ring)

    # ---- the dynamic linker rendezvous ----------------------------------------------------------

    def _hook_rtld(self, task: Task) -> None:
        """Break on the dynamic linker's _dl_debug_state, called after every change of the link map."""
        addr = debug_state_address(task.pid)
        if addr is not None and addr not in task.mm.breakpoints:
            self.insert(task.mm, addr, self._rtld_hit)
            task.mm.internal[addr] = "r_brk"

    def _rtld_hit(self, task: Task) -> None:
        self.fs_base(task)  # the dynamic linker has set up the main thread's TLS by its second call
        self.listener.maps_changed(task.mm)
        self._hook_unwinder(task.mm)
        phase = self.starting.get(task)
        if phase is not None:
            state = self._rtld_state(task)
            if state is None:
                del self.starting[task]  # cannot tell: r_brk alone arms, as without this phase
            elif state == (1, RT_ADD):
                phase.added = True
            elif state == (1, RT_CONSISTENT) and phase.added:
                del self.starting[task]  # start-up is over

    def _watch_startup(self, task: Task) -> None:
        """At an exec (or the start of a launched command): if the dynamic linker has not run yet and a
        probe waits for its file, follow the task's syscalls until ld.so is done (see `starting`)."""
        mm = task.mm
        if "r_brk" not in mm.internal.values() or not self.listener.awaits_mappings(mm):
            return
        with contextlib.suppress(OSError):
            r_debug = r_debug_address(task.pid)
            if r_debug is not None and link_map_state(mm.read, r_debug)[0] == 0:
                self.starting[task] = StartUp()

    def _rtld_state(self, task: Task) -> tuple[int, int] | None:
        """(whether ld.so has begun the program's link map, its r_state): from the base namespace's
        r_debug; None if unknown."""
        try:
            r_debug = r_debug_address(task.pid)
            if r_debug is None:
                return None
            r_map, r_state = link_map_state(task.mm.read, r_debug)
        except OSError:
            return None
        return int(r_map != 0), r_state

    def _syscall_stop(self, task: Task) -> None:
        """A syscall-enter or -exit stop of a task in its start-up phase. After an mmap or mprotect that
        made file code executable, the probes waiting for that file are armed before any of it runs (its
        bytes are the file's from the mapping on; relocation writes only data). Every signal still goes
        through the loop unchanged: a syscall stop is never one."""
        task.state = TaskState.STOPPED
        phase = self.starting.get(task)
        if phase is not None:
            try:
                regs = pt.get_regs(task.tid)
            except pt.PtraceError as err:
                if not pt.is_gone(err):
                    raise
                return
            result = int(regs.rax)
            if (
                result != ENTER_RAX
                and regs.orig_rax in (inject.SYS_MMAP, SYS_MPROTECT)
                and regs.rdx & inject.PROT_EXEC
                and result < (1 << 64) - 4096  # not -errno
            ):
                self.listener.maps_changed(task.mm)
                self._hook_unwinder(task.mm)
            phase.stops_left -= 1
            if phase.stops_left <= 0:
                del self.starting[task]  # enough: the r_brk hook does the rest, as without this phase
        self._resume(task)

    # ---- stopping and resuming ------------------------------------------------------------------

    @contextlib.contextmanager
    def stopped(self, mm: AddressSpace) -> Iterator[int]:
        """Every thread of mm stopped for the duration; yields the tid of one stopped thread."""
        depth = self._stopping.get(mm, 0)
        self._stopping[mm] = depth + 1
        if depth == 0:
            self._stopped_by_us[mm] = self._stop_all(mm)
        try:
            stopped = [t for t in mm.tasks if t.state in (TaskState.STOPPED, TaskState.NEW)]
            yield stopped[0].tid if stopped else mm.pid
        finally:
            self._stopping[mm] = depth
            if depth == 0:
                del self._stopping[mm]
                for t in self._stopped_by_us.pop(mm):
                    if t.state is TaskState.STOPPED:
                        self._resume(t)

    def _stop_all(self, mm: AddressSpace) -> list[Task]:
        """PTRACE_INTERRUPT every running thread of mm and wait until each is stopped."""
        waiting = []
        for t in list(mm.tasks):
            if t.state in (TaskState.RUNNING, TaskState.GROUP_STOPPED):
                try:
                    pt.interrupt(t.tid)
                    waiting.append(t)
                except pt.PtraceError:
                    pass
        ours = []
        for t in waiting:
            while True:
                try:
                    tid, status = pt.wait(t.tid)
                except ChildProcessError:
                    self._forget(t)
                    break
                if (status & 0xFF) != 0x7F:
                    self.pending.append((tid, status))
                    t.state = TaskState.STOPPED
                    break
                t.state = TaskState.STOPPED
                if status >> 16 == pt.EVENT_STOP and (status >> 8) & 0xFF == signal.SIGTRAP:
                    if self._trap_queued(t):
                        continue  # its trap's stop comes next: a real stop, for the loop
                    ours.append(t)  # our interrupt: resume when done
                else:
                    self.pending.append((tid, status))  # a real stop: the loop handles it later
                break
        return ours

    @staticmethod
    def _trap_queued(task: Task) -> bool:
        """At its interrupt stop, has `task` raised a trap (int3 or UD) it has not yet reported? Then
        resume it into that trap's signal-delivery-stop and return True.

        A thread that executes an int3 just as PTRACE_INTERRUPT reaches it reports the interrupt stop
        first, with RIP past the int3 and the SIGTRAP still queued to it. Left so, the trap is invisible:
        a thread detached there dies of the SIGTRAP once pmu's guard is gone, and a syscall run in it
        swallows the trap and resumes it in the middle of the probed instruction."""
        try:
            queued = pt.pending_signals(task.tid)
        except pt.PtraceError:
            return False
        traps = {int(signal.SIGTRAP): pt.SI_KERNEL, int(signal.SIGILL): guard.ILL_ILLOPN}
        faults = {sig for sig, code in queued if traps.get(sig) == code}
        # The kernel unblocks the signal of a trap it raises; one that is blocked was queued by other
        # means (rt_tgsigqueueinfo to itself), and resuming the thread would not stop it.
        if not faults or faults & _blocked(task.tid):
            return False
        pt.cont(task.tid, 0)  # the queued fault is taken before the thread runs an instruction
        return True

    def _resume(self, task: Task, sig: int = 0) -> None:
        if self._stopping.get(task.mm):
            # Patching is under way: the thread resumes when the patch is done.
            if task not in self._stopped_by_us.get(task.mm, []):
                self._stopped_by_us.setdefault(task.mm, []).append(task)
            if sig:
                self.pending.append((task.tid, (sig << 8) | 0x7F))
            return
        try:
            self._cont(task, sig)
            task.state = TaskState.RUNNING
        except pt.PtraceError as err:
            if not pt.is_gone(err):
                raise

    def _cont(self, task: Task, sig: int = 0) -> None:
        """PTRACE_CONT, or PTRACE_SYSCALL while the task is in its start-up phase."""
        if task in self.starting:
            pt.syscall(task.tid, sig)
        else:
            pt.cont(task.tid, sig)

    # ---- leaving --------------------------------------------------------------------------------

    def _detach_task(self, task: Task) -> None:
        with contextlib.suppress(pt.PtraceError):
            pt.detach(task.tid)
        self._forget(task)

    def quiesce(self) -> None:
        """Stop every thread until `detach_all`, none left inside an out-of-line slot or a trampoline: what
        the counter areas and rings hold is then final, every hit counted and recorded alike."""
        mms = {t.mm for t in self.tasks.values() if not t.mm.dead}
        for mm in mms:
            with contextlib.suppress(OSError, pt.PtraceError, TraceError):
                self._stop_all(mm)
                self._stop_new(mm)
        self._held.update(self._settle_pending())
        for mm in mms:
            if not mm.jumps:
                continue  # int3 probes count at the stop: no hit is ever half done
            for t in list(mm.tasks):
                if t.state is TaskState.STOPPED:
                    with contextlib.suppress(OSError, pt.PtraceError, TraceError):
                        self._unhijack(t)  # as _leave_mm does: no thread is left at the return int3
                        self._step_out_of_slots(t, self._held)

    def detach_all(self) -> None:
        """Leave every task as if we had never been there (detach, Ctrl-C, errors, the end of a run).

        Every thread is stopped; a trap of ours that is still queued is rewound to the probed
        instruction; a thread inside an out-of-line slot is stepped out of it; every byte we wrote is
        restored and every area we mapped unmapped; then each thread is detached, with a signal that
        arrived meanwhile delivered unchanged.
        """
        mms = {t.mm for t in self.tasks.values() if not t.mm.dead}
        for mm in mms:
            with contextlib.suppress(OSError, pt.PtraceError, TraceError):
                self._stop_all(mm)
                self._stop_new(mm)
        deliver = self._settle_pending()
        for tid, sig in self._held.items():
            deliver.setdefault(tid, sig)
        self._held.clear()
        for mm in mms:
            with contextlib.suppress(OSError, pt.PtraceError, TraceError):
                self._leave_mm(mm, deliver)
        for tid in list(self.early):  # new tasks whose parent's event we never saw
            with contextlib.suppress(pt.PtraceError):
                pt.detach(tid)
        self.early.clear()
        for task in list(self.tasks.values()):
            with contextlib.suppress(pt.PtraceError):  # gone already
                pt.detach(task.tid, deliver.get(task.tid, 0))
            self._forget(task)

    def _stop_new(self, mm: AddressSpace) -> None:
        """Wait for the first stop of tasks whose clone/fork we saw but which have not stopped yet."""
        for t in list(mm.tasks):
            if t.state is TaskState.NEW:
                tid, status = pt.wait(t.tid)
                t.state = TaskState.STOPPED
                if (status & 0xFF) != 0x7F or status >> 16 != pt.EVENT_STOP:
                    self.pending.append((tid, status))

    def _settle_pending(self) -> dict[int, int]:
        """Handle queued stops without resuming anyone; returns {tid: signal to deliver at detach}."""
        deliver: dict[int, int] = {}
        while self.pending:
            tid, status = self.pending.popleft()
            task = self.tasks.get(tid)
            if task is None:
                continue
            if (status & 0xFF) != 0x7F:
                self._exited(task, status)
                continue
            task.state = TaskState.STOPPED
            sig = (status >> 8) & 0xFF
            if status >> 16 or sig == pt.SYSCALL_TRAP:
                continue  # an event or syscall stop: nothing to deliver
            if sig == signal.SIGTRAP:
                with contextlib.suppress(pt.PtraceError):
                    rip = pt.peek_user(tid, pt.RIP)
                    mm = task.mm
                    ours = rip - 1 in mm.breakpoints or rip - 1 in mm.removed or rip - 1 == mm.ret_tramp
                    if ours and pt.siginfo_code(tid)[1] == pt.SI_KERNEL:
                        pt.poke_user(tid, pt.RIP, rip - 1)  # run the original instruction after detach
                        continue
            if sig == signal.SIGILL:
                with contextlib.suppress(pt.PtraceError):
                    rip = pt.peek_user(tid, pt.RIP)
                    ours = rip in task.mm.breakpoints or rip in task.mm.removed
                    if ours and pt.siginfo_code(tid)[1] == guard.ILL_ILLOPN:
                        continue  # a UD of ours: the original instruction runs there after detach
            deliver[tid] = sig
        return deliver

    def _leave_mm(self, mm: AddressSpace, deliver: dict[int, int]) -> None:
        """With every thread of mm stopped: step threads out of slots, restore bytes, unmap areas."""
        for t in list(mm.tasks):
            self._unhijack(t)
            self._step_out_of_slots(t, deliver)
        for t in list(mm.tasks):
            with contextlib.suppress(OSError, pt.PtraceError):
                self._restore_inprocess(t)  # frames pushed by an entry routine stepped out of
        for bp in list(mm.breakpoints.values()):
            with contextlib.suppress(OSError):
                write_first_byte_last(mm, bp.addr, bp.orig)
        for patch in mm.jumps.values():
            with contextlib.suppress(OSError):
                mm.write(patch.addr, patch.orig)
        mm.breakpoints.clear()
        mm.internal.clear()
        mm.jumps.clear()
        stopped = [t for t in mm.tasks if t.state is TaskState.STOPPED]
        if stopped and mm.counters is not None:
            for bank in mm.counters.banks:
                self._syscall(stopped[0].tid, mm, inject.SYS_MUNMAP, bank.address, bank.size)
            mm.counters = None
        if stopped and mm.returns is not None:  # pmu's mapping of the return area stays
            self._syscall(
                stopped[0].tid, mm, inject.SYS_MUNMAP, mm.returns.area.address, mm.returns.area.size
            )
            self._syscall(stopped[0].tid, mm, inject.SYS_MUNMAP, mm.returns.shadow, retprobe.SHADOW_BYTES)
            mm.returns.area.fold()
            mm.returns = None
        if stopped and mm.ring is not None:  # pmu's own mapping stays, to drain what is in it
            self._syscall(stopped[0].tid, mm, inject.SYS_MUNMAP, mm.ring.address, mm.ring.size)
            mm.ring = None
        if stopped:
            for area in mm.areas:
                self._syscall(stopped[0].tid, mm, inject.SYS_MUNMAP, area.base, area.size)
            self._unguard(mm, stopped[0].tid)
            while self.pending and self.pending[-1][0] == stopped[0].tid:  # signals that came meanwhile
                _, status = self.pending.pop()
                deliver.setdefault(stopped[0].tid, (status >> 8) & 0xFF)
        mm.areas.clear()

    def _step_out_of_slots(self, task: Task, deliver: dict[int, int]) -> None:
        """Single-step a thread whose RIP is inside an out-of-line area until it is back in real code."""
        for _ in range(65536):  # a trampoline is about 40 instructions, its row searches loops
            rip = pt.peek_user(task.tid, pt.RIP)
            if not any(a.base <= rip < a.base + a.size for a in task.mm.areas):
                return
            # Single-stepping a popf leaves the trap flag set and no longer marked as the debugger's (the
            # kernel's step bookkeeping), so the thread would die of SIGTRAP once detached: emulate it.
            op = task.mm.read(rip, 1)
            if op == POPF:
                regs = pt.get_regs(task.tid)
                value = int.from_bytes(task.mm.read(regs.rsp, 8), "little")
                regs.eflags = value & ~TRAP_FLAG
                regs.rsp += 8
                regs.rip = rip + 1
                pt.set_regs(task.tid, regs)
                continue
            # A pushf stepped over saves the trap flag single-stepping sets: clear it on the stack.
            pushf = op == PUSHF
            pt.singlestep(task.tid)
            _, status = pt.wait(task.tid)
            if (status & 0xFF) != 0x7F:
                self._exited(task, status)
                return
            sig = (status >> 8) & 0xFF
            if status >> 16 == 0 and sig != signal.SIGTRAP:
                deliver.setdefault(task.tid, sig)
            if pushf and pt.peek_user(task.tid, pt.RIP) == rip + 1:
                rsp = pt.peek_user(task.tid, pt.RSP)
                flags = int.from_bytes(task.mm.read(rsp, 8), "little")
                task.mm.write(rsp, (flags & ~TRAP_FLAG).to_bytes(8, "little"))
        raise TraceError(f"thread {task.tid} did not leave the out-of-line area")

    def kill_all(self) -> None:
        """SIGKILL every launched task that is still alive (EXITKILL would do it when we exit)."""
        for task in list(self.tasks.values()):
            with contextlib.suppress(OSError):
                os.kill(task.tid, signal.SIGKILL)


def _copy_patch(p: JumpPatch) -> JumpPatch:
    """A forked child's copy of a jump patch (and of the entry probe its stub counts): no users yet."""
    guest = _copy_patch(p.guest) if p.guest is not None else None
    return JumpPatch(
        p.addr, p.orig, p.tramp, p.column, p.moves, users=0, lock_at=p.lock_at, ret=p.ret, guest=guest
    )


def check_traceable(pid: int) -> None:
    """Raise the one-line error a user needs if `pid` cannot be traced (before trying)."""
    if not os.path.exists(f"/proc/{pid}"):
        raise ProcessError(f"no process with pid {pid}")
    tracer = status_field(pid, "TracerPid")
    if tracer is None:
        raise ProcessError(f"no process with pid {pid}")
    if int(tracer) != 0:
        raise TracePermissionError(f"process {pid} is already traced by pid {tracer} (a debugger?)")


def _threads(pid: int) -> list[int]:
    tids = threads_of(pid)
    if not tids:
        raise ProcessError(f"no process with pid {pid}")
    return tids


def _permission(pid: int, err: BaseException) -> TracePermissionError | ProcessError:
    code = getattr(err, "errno", None)
    if code == errno.ESRCH:
        return ProcessError(f"no process with pid {pid}")
    scope = ""
    try:
        with open("/proc/sys/kernel/yama/ptrace_scope") as f:
            scope = f.read().strip()
    except OSError:
        pass
    if scope and scope != "0" and os.geteuid() != 0:
        return TracePermissionError(
            f"cannot trace process {pid}: kernel.yama.ptrace_scope is {scope} "
            "(run as root, or: sysctl kernel.yama.ptrace_scope=0)"
        )
    return TracePermissionError(
        f"cannot trace process {pid}: permission denied (it belongs to another user? run pmu as its owner "
        "or as root)"
    )


def _blocked(tid: int) -> set[int]:
    """The signals thread `tid` blocks (every one if it cannot be read: nothing is then resumed)."""
    value = status_field(tid, "SigBlk")
    if value is None:
        return set(range(1, 65))
    mask = int(value, 16)
    return {sig for sig in range(1, 65) if mask >> (sig - 1) & 1}
