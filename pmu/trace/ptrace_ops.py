"""The only module that issues ptrace requests: thin wrappers over python-ptrace's low-level binding.

python-ptrace 0.9.9 lacks PTRACE_SEIZE, PTRACE_INTERRUPT, PTRACE_LISTEN and PTRACE_O_EXITKILL; their
values come from <sys/ptrace.h>. Everything here is a direct `ptrace.binding.func.ptrace` call, cheap
enough for the hot loop (the high-level debugger objects cost tens of microseconds a call).
"""

from __future__ import annotations

import ctypes
import errno as _errno
import os
from typing import Any

from ptrace.binding import func as _func
from ptrace.binding.func import ptrace_registers_t
from ptrace.error import PtraceError

# Requests, from <sys/ptrace.h>.
PTRACE_PEEKUSER = 3
PTRACE_POKEUSER = 6
PTRACE_CONT = 7
PTRACE_SINGLESTEP = 9
PTRACE_SYSCALL = 24
PTRACE_GETREGS = 12
PTRACE_SETREGS = 13
PTRACE_DETACH = 17
PTRACE_SETOPTIONS = 0x4200
PTRACE_GETEVENTMSG = 0x4201
PTRACE_GETSIGINFO = 0x4202
PTRACE_SEIZE = 0x4206
PTRACE_INTERRUPT = 0x4207
PTRACE_LISTEN = 0x4208
PTRACE_PEEKSIGINFO = 0x4209

# Options.
O_TRACESYSGOOD = 0x1
O_TRACEFORK = 0x2
O_TRACEVFORK = 0x4
O_TRACECLONE = 0x8
O_TRACEEXEC = 0x10
O_TRACEVFORKDONE = 0x20
O_TRACEEXIT = 0x40
O_EXITKILL = 0x100000

TRACE_OPTIONS = O_TRACESYSGOOD | O_TRACEFORK | O_TRACEVFORK | O_TRACECLONE | O_TRACEEXEC | O_TRACEEXIT

SYSCALL_TRAP = 0x80 | 5  # SIGTRAP
"""WSTOPSIG of a syscall-enter or syscall-exit stop (SIGTRAP | 0x80 with TRACESYSGOOD), which only a
PTRACE_SYSCALL resume produces: never a signal to deliver."""

# Events, as reported in status >> 16.
EVENT_FORK = 1
EVENT_VFORK = 2
EVENT_CLONE = 3
EVENT_EXEC = 4
EVENT_VFORK_DONE = 5
EVENT_EXIT = 6
EVENT_STOP = 128

WALL = 0x40000000
"""__WALL for waitpid: wait for threads as well as processes."""

SI_KERNEL = 0x80
"""si_code of the SIGTRAP an int3 raises."""

# Offsets into struct user_regs_struct (x86-64).
_REG_NAMES = [
    "r15",
    "r14",
    "r13",
    "r12",
    "rbp",
    "rbx",
    "r11",
    "r10",
    "r9",
    "r8",
    "rax",
    "rcx",
    "rdx",
    "rsi",
    "rdi",
    "orig_rax",
    "rip",
    "cs",
    "eflags",
    "rsp",
    "ss",
    "fs_base",
    "gs_base",
    "ds",
    "es",
    "fs",
    "gs",
]
REG_OFFSET = {name: 8 * i for i, name in enumerate(_REG_NAMES)}
RIP = REG_OFFSET["rip"]
RSP = REG_OFFSET["rsp"]
RAX = REG_OFFSET["rax"]
FS_BASE = REG_OFFSET["fs_base"]

_ptrace = _func.ptrace

Regs = Any
"""python-ptrace's ctypes user_regs_struct."""


class _SigInfo(ctypes.Structure):
    _fields_ = [
        ("si_signo", ctypes.c_int),
        ("si_errno", ctypes.c_int),
        ("si_code", ctypes.c_int),
        ("_pad", ctypes.c_int),
        ("rest", ctypes.c_byte * 112),
    ]


_siginfo = _SigInfo()
_siginfo_addr = ctypes.addressof(_siginfo)
_msg = ctypes.c_ulong()
_msg_addr = ctypes.addressof(_msg)


def seize(pid: int, options: int) -> None:
    _ptrace(PTRACE_SEIZE, pid, 0, options)


def interrupt(tid: int) -> None:
    _ptrace(PTRACE_INTERRUPT, tid, 0, 0)


def listen(tid: int) -> None:
    _ptrace(PTRACE_LISTEN, tid, 0, 0)


def cont(tid: int, sig: int = 0) -> None:
    _ptrace(PTRACE_CONT, tid, 0, sig)


def syscall(tid: int, sig: int = 0) -> None:
    """Resume like cont, but stop at the next syscall entry or exit (reported as SYSCALL_TRAP)."""
    _ptrace(PTRACE_SYSCALL, tid, 0, sig)


def singlestep(tid: int, sig: int = 0) -> None:
    _ptrace(PTRACE_SINGLESTEP, tid, 0, sig)


def detach(tid: int, sig: int = 0) -> None:
    _ptrace(PTRACE_DETACH, tid, 0, sig)


def set_options(tid: int, options: int) -> None:
    _ptrace(PTRACE_SETOPTIONS, tid, 0, options)


def peek_user(tid: int, offset: int) -> int:
    return int(_ptrace(PTRACE_PEEKUSER, tid, offset, 0, True))


def poke_user(tid: int, offset: int, value: int) -> None:
    _ptrace(PTRACE_POKEUSER, tid, offset, value)


def get_regs(tid: int) -> Regs:
    regs = ptrace_registers_t()
    _ptrace(PTRACE_GETREGS, tid, 0, ctypes.addressof(regs))
    return regs


def set_regs(tid: int, regs: Regs) -> None:
    _ptrace(PTRACE_SETREGS, tid, 0, ctypes.addressof(regs))


def copy_regs(regs: Regs) -> Regs:
    return ptrace_registers_t.from_buffer_copy(regs)


def event_msg(tid: int) -> int:
    _ptrace(PTRACE_GETEVENTMSG, tid, 0, _msg_addr)
    return int(_msg.value)


def siginfo_code(tid: int) -> tuple[int, int]:
    """(si_signo, si_code) of the signal that stopped `tid`."""
    _ptrace(PTRACE_GETSIGINFO, tid, 0, _siginfo_addr)
    return _siginfo.si_signo, _siginfo.si_code


class _PeekSigInfoArgs(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("flags", ctypes.c_uint32), ("nr", ctypes.c_int32)]


_PEEK_MAX = 8
_peek_args = _PeekSigInfoArgs(0, 0, _PEEK_MAX)  # flags 0: the thread's own queue, not the process's
_peek_buf = (_SigInfo * _PEEK_MAX)()


def pending_signals(tid: int) -> list[tuple[int, int]]:
    """(si_signo, si_code) of the first signals queued to stopped thread `tid` itself (a fault or trap
    it raised, which the kernel queues to the thread, comes first), not yet delivered."""
    n = int(_ptrace(PTRACE_PEEKSIGINFO, tid, ctypes.addressof(_peek_args), ctypes.addressof(_peek_buf)))
    return [(_peek_buf[i].si_signo, _peek_buf[i].si_code) for i in range(n)]


def is_gone(err: BaseException) -> bool:
    """True if a ptrace failure means the task no longer exists (or is no longer stopped for us)."""
    return isinstance(err, PtraceError) and getattr(err, "errno", None) == _errno.ESRCH


_libc = ctypes.CDLL(None, use_errno=True)
_waitpid = _libc.waitpid
_waitpid.argtypes = (ctypes.c_int, ctypes.POINTER(ctypes.c_int), ctypes.c_int)
_waitpid.restype = ctypes.c_int
_wstatus = ctypes.c_int()
_wstatus_ref = ctypes.byref(_wstatus)


_syscall = _libc.syscall
_syscall.restype = ctypes.c_long
SYS_PIDFD_GETFD = 438


def fd_of(pid: int, target_fd: int) -> int:
    """A copy of process pid's descriptor target_fd (pidfd_getfd: needs the right to ptrace it)."""
    pidfd = os.pidfd_open(pid)
    try:
        fd = int(_syscall(SYS_PIDFD_GETFD, pidfd, target_fd, 0))
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"pidfd_getfd: {os.strerror(err)}")
        return fd
    finally:
        os.close(pidfd)


def wait(pid: int = -1, flags: int = 0, interruptible: bool = False) -> tuple[int, int]:
    """waitpid with __WALL; returns (tid, status), (0, 0) with WNOHANG and nothing ready.

    Called through ctypes rather than os.waitpid so that a Python signal handler never runs between
    the kernel handing us a status and our receiving it (os.waitpid would lose the status if the
    handler raised). With `interruptible`, a signal makes it raise InterruptedError (the caller checks
    its flags); otherwise it waits again. ChildProcessError when there is nothing to wait for.
    """
    while True:
        tid = _waitpid(pid, _wstatus_ref, WALL | flags)
        if tid >= 0:
            return tid, _wstatus.value
        err = ctypes.get_errno()
        if err == _errno.EINTR:
            if interruptible:
                raise InterruptedError
            continue
        if err == _errno.ECHILD:
            raise ChildProcessError(err, os.strerror(err))
        raise OSError(err, os.strerror(err))


__all__ = ["PtraceError"]
