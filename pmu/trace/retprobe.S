# Return probes inside the traced process: the entry routine and the return trampoline.
#
# The one source of the machine code in pmu/trace/retprobe.py (CODE there is this file assembled:
# `make retprobe` rewrites it, tests/unit/trace/test_retprobe.py checks they agree). The layouts are
# retprobe.py's docstring; the constants below are the same names there.
#
# A probed function's entry is a jump patch to a stub (retprobe.stub):
#     lea rsp, [rsp-0x80]; push r11; movabs r11, DESC; call [ENTRY]; pop r11; lea rsp, [rsp+0x80]
#     <the displaced instructions>; jmp back
# `entry` pushes a frame (the return-address slot, the real return address, the counter cell, the
# site's descriptor, the entry time and arguments if needed) on the thread's shadow stack and points
# the return address at `ret_tramp`, which pops it, counts, and jumps to the real return address.
# Every register and flag is kept (flags with lahf/seto, restored with add al,0x7f/sahf: a few cycles,
# where pushfq/popfq cost ~5 ns on AMD Zen); no stop, no syscall.

    .intel_syntax noprefix
    .text

    .equ NSLOTS_MASK, 1023
    .equ NSLOTS, 1024
    .equ B_KEYS, 0x1000          # counter bank (trampoline.py): row owners
    .equ B_ROWS, 0x3000          #   per-thread counters, 512-byte rows
    .equ B_PID, 0x800            #   the process's pid
    .equ S_ROWS, 0x2000          # shadow area: rows after the keys
    .equ S_ROW_SHIFT, 18         #   256 KiB a thread
    .equ R_DEPTH, 0x00           # shadow row: frames in use
    .equ R_GNEXT, 0x08           #   graveyard insertion count
    .equ R_GRAVE, 0x40           #   64 buried frames of 32 bytes (slot, orig, cell, desc)
    .equ R_FRAMES, 0x1000        #   frames of 128 bytes
    .equ MAXDEPTH, 2016
    .equ DROP_LIMIT, 4096        # an entry drops only frames at most this far below its slot
    .equ F_SLOT, 0
    .equ F_ORIG, 8
    .equ F_TSC, 16
    .equ F_CELL, 24
    .equ F_DESC, 32
    .equ F_STATE, 40
    .equ F_ARGS, 48
    .equ A_LOST, 0x0000          # return area (shared): frames dropped, per return site
    .equ A_SKIPPED, 0x0200       #   entries not hijacked, per return site
    .equ A_MULT, 0x0400          #   ns = ticks * MULT >> 32
    .equ A_USED, 0x1800          #   u8[1024]: the rows whose histograms hold something
    .equ A_HIST, 0x2000          #   [1024 rows][64 sites][64 buckets] u64, a row a thread's
    .equ A_SUMNS, 0x2002000      #   [1024 rows][64 sites] u64
    .equ D_BANK, 0               # site descriptor
    .equ D_SITE, 8
    .equ D_RET, 12
    .equ D_FLAGS, 16             #   1 latency, 2 record
    .equ D_NARGS, 20
    .equ D_RING, 24
    .equ D_IP, 32
    .equ D_EVENT, 40
    .equ D_PERIOD, 44
    .equ D_EBANK, 48             #   the entry's counter bank (0: entries not counted here)
    .equ D_ESITE, 56             #   and site: an entry probe on the same function
    .equ B_MISS, 0x40            # counter bank: hits of threads with no row, per site

# The thread's row in the key table rdx (rax = its FS base): where it hashes to, at once (the common
# case), else find_row's search. rcx = the row, ZF set if found.
    .macro FIND_ROW
    mov rcx, rax
    shr rcx, 12
    and ecx, NSLOTS_MASK
    cmp [rdx+rcx*8], rax
    je 9f
    call find_row
9:
    .endm

    .globl blob
blob:
shadow_base:  .quad 0            # 0x00 the shadow area
ret_area:     .quad 0            # 0x08 the return area
locked:       .quad 0            # 0x10 non-zero: two live threads share an FS base (no new frames)
    .balign 64

# Called by a stub with r11 = the site's descriptor; [rsp] = the stub's return, [rsp+8] = r11 saved,
# then the 128-byte red zone, then the probed function's return address (its slot, S).
    .globl entry
entry:
    push rax
    lahf
    seto al
    push rax                     # the flags
    push rcx
    push rdx
    push r8
    push r9
    push r10                     # S = rsp + 0xC8
    mov rdx, [r11+D_EBANK]       # an entry probe of the same function counts here first
    test rdx, rdx
    jz .Lreturns
    mov ecx, [r11+D_ESITE]
    cmp byte ptr [rdx+rcx], 0
    je .Lreturns
    mov r9, rcx
    rdfsbase rax
    test rax, rax
    jz .Lemiss
    add rdx, B_KEYS
    FIND_ROW
    jne .Lemiss_keys
    shl rcx, 9
    add rcx, rdx
    lock inc qword ptr [rcx+r9*8+B_ROWS-B_KEYS]
    jmp .Lreturns
.Lemiss_keys:
    sub rdx, B_KEYS
.Lemiss:
    lock inc qword ptr [rdx+r9*8+B_MISS]
.Lreturns:
    mov rdx, [r11+D_BANK]
    mov ecx, [r11+D_SITE]
    cmp byte ptr [rdx+rcx], 0    # the site's enabled byte
    je .Lout
    cmp qword ptr [rip+locked], 0
    jne .Lskip
    rdfsbase rax                 # this thread
    test rax, rax
    je .Lskip                    # no TLS yet
    mov r9, rcx                  # the site
    add rdx, B_KEYS
    FIND_ROW                     # in the counter bank: rcx = the row
    jne .Lskip
    shl rcx, 9
    lea r10, [rdx+rcx+B_ROWS-B_KEYS]
    lea r10, [r10+r9*8]          # the thread's counter cell of the site
    mov rdx, [rip+shadow_base]
    FIND_ROW                     # in the shadow keys
    jne .Lskip
    shl rcx, S_ROW_SHIFT
    lea r9, [rdx+rcx+S_ROWS]     # the thread's shadow row
    mov rcx, [r9+R_DEPTH]
    lea r8, [rsp+0xC8]           # S
.Ldrop:                          # frames whose slot lies below ours are dead (longjmp, exceptions)
    test rcx, rcx
    jz .Lpush
    mov rax, rcx
    shl rax, 7
    lea rdx, [r9+rax+R_FRAMES-128]
    cmp [rdx+F_SLOT], r8
    ja .Lpush                    # above ours: alive
    jb .Lbelow
    lea rax, [rip+.Lret_tramp]     # our very slot: a tail call out of that frame's function keeps it
    cmp [r8], rax
    je .Lpush
    jmp .Lbury
.Lbelow:                         # far below: perhaps another stack's (we may be a signal handler on
    mov rax, r8                  # an alternate stack above the thread's): a return will judge it
    sub rax, [rdx+F_SLOT]
    cmp rax, DROP_LIMIT
    ja .Lpush
.Lbury:
    call bury
    dec rcx
    jmp .Ldrop
.Lpush:
    mov [r9+R_DEPTH], rcx
    cmp rcx, MAXDEPTH
    jae .Lskip                   # no room: this return is not probed
    mov rax, rcx
    shl rax, 7
    lea rdx, [r9+rax+R_FRAMES]   # the new frame
    mov qword ptr [rdx+F_SLOT], -1   # reserved: alive to any entry, the frame of no return
    inc rcx
    mov [r9+R_DEPTH], rcx        # ours now: a signal handler's probed calls go above it
    mov [rdx+F_CELL], r10
    mov r10, rdx
    mov rax, [r8]
    mov [r10+F_ORIG], rax
    mov [r10+F_DESC], r11
    mov qword ptr [r10+F_STATE], 0
    test dword ptr [r11+D_FLAGS], 3
    jz .Lin
    rdtsc
    shl rdx, 32
    or rax, rdx
    mov [r10+F_TSC], rax         # the entry time, for the latency
    test dword ptr [r11+D_FLAGS], 2
    jz .Lin
    mov [r10+F_ARGS], rdi        # the arguments, for the record
    mov [r10+F_ARGS+8], rsi
    mov rax, [rsp+24]
    mov [r10+F_ARGS+16], rax     # rdx
    mov rax, [rsp+32]
    mov [r10+F_ARGS+24], rax     # rcx
    mov rax, [rsp+16]
    mov [r10+F_ARGS+32], rax     # r8
    mov rax, [rsp+8]
    mov [r10+F_ARGS+40], rax     # r9
.Lin:
    mov [r10+F_SLOT], r8         # the frame is whole,
    lea rax, [rip+.Lret_tramp]
    mov [r8], rax                # and only then does the function return to the trampoline
    jmp .Lout
.Lskip:                          # not served here: pmu's int3 on this nop hijacks it (ptrace)
    mov rdx, [rip+ret_area]
    mov eax, [r11+D_RET]
    lock inc qword ptr [rdx+rax*8+A_SKIPPED]
    .globl skip_trap
skip_trap:                       # S = rsp + 0xC8 here too, r11 the descriptor
    xchg ax, ax
.Lout:
    pop r10
    pop r9
    pop r8
    pop rdx
    pop rcx
    pop rax
    add al, 0x7f                 # OF back
    sahf                         # SF ZF AF PF CF back
    pop rax
    ret

# rax = the thread's FS base, rdx = a key table (a counter bank's keys or the shadow area's): rcx =
# the thread's row, found or claimed, ZF set; ZF clear if every row is another's. Keeps the rest.
find_row:
    push r8
    push r9
    mov rcx, rax
    shr rcx, 12
    and ecx, NSLOTS_MASK
    mov r8d, NSLOTS
2:  cmp [rdx+rcx*8], rax
    je 4f
    cmp qword ptr [rdx+rcx*8], 0
    jne 3f
    mov r9, rax
    xor eax, eax
    lock cmpxchg [rdx+rcx*8], r9
    mov rax, r9
    je 4f                        # claimed a free row
3:  inc ecx
    and ecx, NSLOTS_MASK
    dec r8d
    jnz 2b
    or r8d, 1                    # every row taken: ZF clear
4:  pop r9
    pop r8
    ret

# rdx = a frame of shadow row r9 left without returning: into the row's graveyard (the last 16 kept,
# where a return that finds no frame looks), counted lost. Keeps every register but the flags.
bury:
    push rax
    push rcx
    mov rax, [r9+R_GNEXT]
    lea rcx, [rax+1]
    mov [r9+R_GNEXT], rcx
    and eax, 63
    shl eax, 5
    lea rax, [r9+rax+R_GRAVE]
    mov rcx, [rdx+F_SLOT]
    mov [rax], rcx
    mov rcx, [rdx+F_ORIG]
    mov [rax+8], rcx
    mov rcx, [rdx+F_CELL]
    mov [rax+16], rcx
    mov rcx, [rdx+F_DESC]
    mov [rax+24], rcx
    mov ecx, [rcx+D_RET]
    mov rax, [rip+ret_area]
    lock inc qword ptr [rax+rcx*8+A_LOST]
    pop rcx
    pop rax
    ret

# A hijacked function returned here: rsp = S + 8, rax:rdx its return value.
    .globl ret_tramp
ret_tramp:
.Lret_tramp:
    lea rsp, [rsp-0x80]
    push rax
    lahf
    seto al
    push rax                     # the flags
    push rdx
    push rcx
    push r8
    push r9
    push r10
    push r11                     # S = rsp + 0xB8
    lea r8, [rsp+0xB8]           # S
    rdfsbase rax
    mov rdx, [rip+shadow_base]
    FIND_ROW
    jne .Lglobal
    shl rcx, S_ROW_SHIFT
    lea r9, [rdx+rcx+S_ROWS]     # the thread's shadow row
    mov rcx, [r9+R_DEPTH]
    mov rax, rcx
.Lfind:                          # the innermost frame of this slot
    test rax, rax
    jz .Lgrave
    dec rax
    mov r10, rax
    shl r10, 7
    lea r10, [r9+r10+R_FRAMES]
    cmp [r10+F_SLOT], r8
    jne .Lfind
.Labove:                         # frames above it were left without returning
    lea rdx, [rax+1]
    cmp rdx, rcx
    jae .Lmatch
    dec rcx
    mov rdx, rcx
    shl rdx, 7
    lea rdx, [r9+rdx+R_FRAMES]
    call bury
    jmp .Labove
.Lgrave:                         # none on the stack: a frame buried by mistake (another stack's),
    mov rdx, [r9+R_GNEXT]        # the most recently buried first
    xor eax, eax
1:  lea r10, [rdx-1]
    sub r10, rax
    and r10d, 63
    shl r10, 5
    lea r10, [r9+r10+R_GRAVE]
    cmp [r10], r8
    je 2f
    inc eax
    cmp eax, 64
    jb 1b
    jmp .Lglobal
2:  mov qword ptr [r10], 0       # taken back out: no longer lost
    mov rdx, [r10+24]
    mov edx, [rdx+D_RET]
    mov r11, [rip+ret_area]
    lock dec qword ptr [r11+rdx*8+A_LOST]
    mov rdx, [r10+8]
    mov [r8], rdx
    mov rcx, [r10+16]
    inc qword ptr [rcx]          # count the return
    mov r8, [r9+R_DEPTH]         # the stack stays as it is
    jmp .Lpop
.Lmatch:                         # r10 = the frame, rax = its index
    mov rdx, [r10+F_ORIG]
    mov [r8], rdx                # the real return address, where the last jmp takes it from
    mov r8, rax                  # the depth once this frame is popped
    mov rcx, [r10+F_CELL]
    inc qword ptr [rcx]          # count the return
    mov r11, [r10+F_DESC]
    test dword ptr [r11+D_FLAGS], 3
    jz .Lpop
    rdtsc
    shl rdx, 32
    or rax, rdx
    push rax                     # now (TSC)
    sub rax, [r10+F_TSC]
    mov rdx, [rip+ret_area]
    mul qword ptr [rdx+A_MULT]
    shrd rax, rdx, 32            # the latency in ns
    test dword ptr [r11+D_FLAGS], 1
    jz .Lrecord
    push rax
    mov rcx, r9
    sub rcx, [rip+shadow_base]
    shr rcx, S_ROW_SHIFT         # the thread's row: its histograms are its own (no lock)
    mov rdx, [rip+ret_area]
    mov byte ptr [rdx+rcx+A_USED], 1
    shl ecx, 6
    add ecx, [r11+D_RET]
    add [rdx+rcx*8+A_SUMNS], rax
    shl ecx, 6
    bsr rax, rax
    jz 1f
    inc eax                      # bucket: the latency's bit length (at most 63)
    cmp eax, 63
    jbe 2f
    mov eax, 63
    jmp 2f
1:  xor eax, eax
2:  add ecx, eax
    inc qword ptr [rdx+rcx*8+A_HIST]
    pop rax
.Lrecord:
    test dword ptr [r11+D_FLAGS], 2
    jz .Ltimed
    mov rcx, [r10+F_CELL]
    mov rcx, [rcx]               # the thread's count at the site: the period applies to it
    mov edx, [r11+D_PERIOD]
    cmp edx, 1
    jbe 1f
    push rax
    mov rax, rcx
    mov ecx, edx
    xor edx, edx
    div rcx
    pop rax
    test rdx, rdx
    jnz .Ltimed
1:  push rdi
    push rsi
    push rax                     # latency +0, rsi +8, rdi +16, now +24, saved rax +88
    mov rdi, [r11+D_RING]
.Lreserve:                       # pmu/ring.py's producer protocol, as trampoline.py's
    mov rcx, [rdi+0x100]
    mov rax, [rdi+0x80]
    mov rdx, rax
    sub rdx, rcx
    cmp rdx, [rdi+0x18]
    jae .Lfull
    lea rdx, [rax+1]
    lock cmpxchg [rdi+0x80], rdx
    jne .Lreserve
    and rax, [rdi+0x20]
    shl rax, 7
    lea rsi, [rdi+rax+0x1000]    # the record
    mov rax, [rsp+24]
    mov [rsi+0x08], rax          # time
    rdfsbase rax
    mov [rsi+0x10], rax          # thread
    mov rax, [r11+D_BANK]
    mov eax, [rax+B_PID]
    mov [rsi+0x18], eax          # pid
    mov eax, [r11+D_EVENT]
    mov [rsi+0x1c], eax          # event
    mov rax, [r11+D_IP]
    mov [rsi+0x20], rax          # ip
    mov ecx, [r11+D_NARGS]
    .irp i, 0, 1, 2, 3, 4, 5
    xor eax, eax
    cmp ecx, \i
    jbe 3f
    mov rax, [r10+F_ARGS+8*\i]
3:  mov [rsi+0x28+8*\i], rax     # the entry's arguments
    .endr
    mov rax, [rsp+88]
    mov [rsi+0x58], rax          # retval
    mov rax, [rsp]
    mov [rsi+0x60], rax          # latency
    mov qword ptr [rsi+0x68], 1  # flags: a return
    mov qword ptr [rsi+0x70], 0
    mov qword ptr [rsi+0x78], 0
    mov [rsi], rdx               # commit: seq = h + 1, the last store
    jmp 4f
.Lfull:
    lock inc qword ptr [rdi+0x180]
    mov eax, [r11+D_EVENT]
    lock inc qword ptr [rdi+rax*8+0x200]
4:  pop rax
    pop rsi
    pop rdi
.Ltimed:
    add rsp, 8                   # now
.Lpop:
    mov [r9+R_DEPTH], r8         # popped, once all of it has been read
.Lleave:
    pop r11
    pop r10
    pop r9
    pop r8
    pop rcx
    pop rdx
    pop rax
    add al, 0x7f
    sahf
    pop rax
    lea rsp, [rsp+0x80]
    jmp qword ptr [rsp-8]
.Lglobal:                        # in no frame of this thread's row: the thread changed its FS base
    mov rdx, [rip+shadow_base]   # inside the function (arch_prctl): every row is searched
    xor ecx, ecx
3:  cmp qword ptr [rdx+rcx*8], 0
    je 5f
    mov r9, rcx
    shl r9, S_ROW_SHIFT
    lea r9, [rdx+r9+S_ROWS]
    mov rax, [r9+R_DEPTH]
    cmp rax, MAXDEPTH
    ja 5f
4:  test rax, rax
    jz 5f
    dec rax
    mov r10, rax
    shl r10, 7
    lea r10, [r9+r10+R_FRAMES]
    cmp [r10+F_SLOT], r8
    jne 4b
    mov rax, [r10+F_ORIG]        # found in the row of its old FS base, which may be another live
    mov [r8], rax                # thread's now: only the frame's slot is written (dead: 0)
    mov rax, [r10+F_CELL]
    lock inc qword ptr [rax]     # count the return
    mov qword ptr [r10+F_SLOT], 0
    jmp .Lleave
5:  inc ecx
    cmp ecx, NSLOTS
    jb 3b
.Lnoframe:                       # nowhere to return to: stop (never reached by design)
    ud2
    .globl blob_end
blob_end:
