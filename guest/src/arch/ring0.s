// Ring-0 code of the guest. On nested KVM without hardware support ring 0 is emulated at about 1 us per
// instruction and cannot run SSE/x87, so ring 0 is only this file: a few integer instructions per path.
// Everything else runs at ring 3 (docs/guest.md). Placeholders in braces are constants from arch/mod.rs.

// ---------------------------------------------------------------------------------------------------------
// Entry, on every vCPU at once (docs/boot.md): long mode, CPL 0, IF=0,
// rdi = vCPU index, rsi = boot info, rsp = top of this vCPU's per-vCPU area.
// Builds this vCPU's GDT and TSS, loads them and the (still empty) IDT, and drops to ring 3.
// The IDT gates are written by ring 3 (arch/idt.rs) before it enables interrupts: 256 gates are cheap
// there and would cost milliseconds here.
// ---------------------------------------------------------------------------------------------------------
.section .text.entry, "ax"
.global _start
_start:
    mov rbx, rsp
    sub rbx, [rsi + {BI_PERCPU_SIZE}]       // rbx = base of the per-vCPU area
    lea rsp, [rbx + {R0_STACK_TOP}]         // ring 0 only ever runs on this one-page stack
    mov [rbx + {CPU_INDEX}], rdi            // for the fatal-exception printer

    // GDT. Entry 0 (null) is already zero: the area starts zeroed.
    lea rcx, [rbx + {GDT}]
    mov rax, 0x00af9a000000ffff             // 0x08: kernel code, 64-bit
    mov [rcx + 0x08], rax
    mov rax, 0x00cf92000000ffff             // 0x10: kernel data
    mov [rcx + 0x10], rax
    mov rax, 0x00cff2000000ffff             // 0x18: user data, DPL 3
    mov [rcx + 0x18], rax
    mov rax, 0x00affa000000ffff             // 0x20: user code, 64-bit, DPL 3
    mov [rcx + 0x20], rax

    // 0x28: 16-byte TSS descriptor. Low quadword: limit 0x67, base[23:0] at bit 16, type 9 (available
    // 64-bit TSS) and P at bits 40..47, base[31:24] at bit 56. High quadword: base[63:32].
    lea rdx, [rbx + {TSS}]
    mov rax, rdx
    shl rax, 40
    shr rax, 24                             // base[23:0] -> bits 16..39
    mov r8, rdx
    shr r8, 24
    shl r8, 56                              // base[31:24] -> bits 56..63
    or rax, r8
    mov r8, {TSS_DESC_LOW}
    or rax, r8
    mov [rcx + 0x28], rax
    mov rax, rdx
    shr rax, 32
    mov [rcx + 0x30], rax

    // TSS: RSP0 is where the CPU switches to when ring 3 traps. Then an I/O permission bitmap allowing
    // every port (all zero, as the area starts), ended by an all-ones byte: ring 3 does port I/O through
    // it, as IOPL 3 is not available at ring 3 on every host (docs/guest.md).
    mov [rdx + 4], rsp
    mov word ptr [rdx + 0x66], {IOPB_OFFSET}
    mov byte ptr [rdx + {IOPB_END}], 0xff

    // lgdt / lidt take a 10-byte operand (16-bit limit, 64-bit base): build it on the stack.
    sub rsp, 16
    mov word ptr [rsp + 6], {GDT_LIMIT}
    mov [rsp + 8], rcx
    lgdt [rsp + 6]
    lea rax, [rbx + {IDT}]
    mov word ptr [rsp + 6], {IDT_LIMIT}
    mov [rsp + 8], rax
    lidt [rsp + 6]
    mov ax, {TSS_SEL}
    ltr ax
    // Data segments: the user data segment is usable at every CPL, so nothing changes on iretq.
    // CS (0x08) and SS (0x10) keep their boot values, which are also our GDT's kernel descriptors.
    mov ax, {USER_DS}
    mov ds, ax
    mov es, ax
    mov fs, ax
    mov gs, ax

    // iretq to ring 3: guest_main(rdi = vCPU index, rsi = boot info) on the rest of the area, IF=1
    // (ring 3 cannot change IF; it masks the doorbell in software, see below). Nothing interrupts it
    // before it has filled the IDT: the only interrupt is the doorbell, and no timer is armed yet.
    // The stack top holds a zero "return address", so guest_main sees an ABI-aligned rsp.
    mov rax, [rsi + {BI_PERCPU_SIZE}]
    lea rax, [rbx + rax - 8]
    push {USER_DS}                          // ss
    push rax                                // rsp
    push {RFLAGS_USER}                      // rflags
    push {USER_CS}                          // cs
    lea rax, [rip + {guest_main}]
    push rax                                // rip
    iretq

// ---------------------------------------------------------------------------------------------------------
// Ring 3 cannot use cli/sti (IOPL 3 is not available at ring 3 on every host: nested KVM forces IOPL 0
// and IF=1 there), so it masks the doorbell in software, like a paravirtual event mask: two u32 flags at
// the start of its per-vCPU data page, found from the ring-0 stack pointer. While `masked` is set the
// doorbell stub only sets `pending`; ring 3 runs the handler itself when it unmasks.
//
// The upcall. Turns the ring-3 iret frame at [rsp + f] (rip, cs, rflags, rsp, ss) into a call of the
// ring-3 trampoline quietvm_upcall (arch/upcall.s), like a Unix signal: the interrupted rflags and rip are
// stored below the interrupted stack, past its 128-byte red zone (the prebuilt core library uses one).
// Clobbers rax and rcx.
// ---------------------------------------------------------------------------------------------------------
.macro make_upcall f
    mov rax, [rsp + \f + 24]                // interrupted rsp
    sub rax, 144                            // red zone (128) + rflags + rip
    mov rcx, [rsp + \f]
    mov [rax + 8], rcx                      // interrupted rip
    mov rcx, [rsp + \f + 16]
    mov [rax], rcx                          // interrupted rflags
    mov [rsp + \f + 24], rax
    lea rcx, [rip + quietvm_upcall]
    mov [rsp + \f], rcx
.endm

.section .text.ring0, "ax"

// #GP. Ring 3 halts by executing hlt, which traps here; for ring 3 it means "unmask the doorbell and
// halt", atomically (ring 0 runs with IF=0). Step over it, unmask, and unless a doorbell is already
// pending, halt for real with interrupts on (the exit to quietvm, or the kernel's halt with an in-kernel
// irqchip). Once the doorbell has woken us, return to ring 3 through the upcall so that the expired
// timers are handled. A wrmsr from ring 3 (the LAPIC timer backend, runtime::lapic) is executed here
// and stepped over: ring 3 is this guest's own trusted code, so the stub only keeps the emulated path
// short. Anything else is fatal.
// Frame: error code, rip, cs, rflags, rsp, ss.
.global quietvm_gp_stub
quietvm_gp_stub:
    push rax
    test byte ptr [rsp + 24], 3             // from ring 3?
    jz 2f
    mov rax, [rsp + 16]
    cmp byte ptr [rax], 0xf4                // a hlt?
    jne 3f
    inc rax
    mov [rsp + 16], rax                     // resume after it
    mov rax, rsp
    and rax, -4096                          // the ring-0 stack page
    mov dword ptr [rax - {R0_STACK} + {PERCPU_DATA} + {IRQ_MASKED}], 0
    cmp dword ptr [rax - {R0_STACK} + {PERCPU_DATA} + {IRQ_PENDING}], 0
    jne 1f                                  // a doorbell came while masked: handle it now
    inc qword ptr [rax - {R0_STACK} + {PERCPU_DATA} + {HALTS}]   // halts, for the guest's own count
    sti
    hlt                                     // sleeps in quietvm; the doorbell stub returns here
    cli
1:
    push rcx
    make_upcall 24                          // frame now: rcx, rax, error code, rip, ...
    pop rcx
    pop rax
    add rsp, 8                              // the error code
    iretq
3:
    cmp word ptr [rax], 0x300f              // a wrmsr (0f 30)? ecx and edx are still ring 3's
    jne 2f
    add rax, 2
    mov [rsp + 16], rax                     // resume after it
    pop rax                                 // and eax too
    wrmsr
    add rsp, 8                              // the error code
    iretq
2:
    pop rax
    jmp quietvm_fatal_13

// The doorbell: expired timers wait for this vCPU. From ring 3: if masked, note it as pending; else
// upcall to the trampoline. From ring 0 it can only have woken the hlt of the #GP path (ring 0 otherwise
// runs with IF=0), which does the upcall itself: just return there. No EOI: quietvm injects the vector
// directly, there is no local APIC.
// Frame: rip, cs, rflags, rsp, ss.
.global quietvm_doorbell_stub
quietvm_doorbell_stub:
    test byte ptr [rsp + 8], 3
    jz 2f
    push rax
    mov rax, rsp
    and rax, -4096                          // the ring-0 stack page
    cmp dword ptr [rax - {R0_STACK} + {PERCPU_DATA} + {IRQ_MASKED}], 0
    jne 1f
    push rcx
    make_upcall 16                          // frame now: rcx, rax, rip, ...
    pop rcx
    pop rax
    iretq
1:
    mov dword ptr [rax - {R0_STACK} + {PERCPU_DATA} + {IRQ_PENDING}], 1
    pop rax
2:
    iretq

// The guest's LAPIC timer (and the IPI that stands for it) under the kvm-lapic backend: EOI at once, so
// the next one can come while ring 3 handles this one, then treat it as the doorbell. The handler
// expires the software timers and programs the next deadline (runtime::soft_timers).
.global quietvm_lapic_stub
quietvm_lapic_stub:
    push rax
    push rcx
    push rdx
    mov ecx, {MSR_X2APIC_EOI}
    xor eax, eax
    xor edx, edx
    wrmsr
    pop rdx
    pop rcx
    pop rax
    jmp quietvm_doorbell_stub

// Any other vector: nothing to do.
.global quietvm_spurious_stub
quietvm_spurious_stub:
    iretq

// ---------------------------------------------------------------------------------------------------------
// Exceptions 0-31: push the vector (and a zero error code where the CPU pushes none) and report.
// quietvm_fatal_table lists the 32 entry points for arch/idt.rs.
// ---------------------------------------------------------------------------------------------------------
.irp v, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
    .balign 16
quietvm_fatal_\v:
    .if ((0x60227d00 >> \v) & 1) == 0      // vectors 8, 10-14, 17, 21, 29, 30 push an error code
    push 0
    .endif
    push \v
    jmp fatal_common
.endr

// Frame: vector, error code, rip, cs, rflags, rsp, ss. Prints
//   guest: exception <vector> at <rip> on vcpu <n>
//   guest: error code <hex> cr2 <hex>
// and writes 90 to the exit port. Boot info is at its fixed address (docs/boot.md).
fatal_common:
    // The triple-fault workload asks for a triple fault with ud2 and the magic in rax: load an empty
    // IDT, then fault again. The #UD cannot be delivered, nor the #GP that causes, nor the #DF.
    cmp qword ptr [rsp], 6
    jne 1f
    mov rcx, {TRIPLE_FAULT_MAGIC}
    cmp rax, rcx
    jne 1f
    push 0
    push 0
    lidt [rsp + 6]                          // limit 0
    ud2
1:
    movzx edx, word ptr [{BOOT_INFO} + {BI_SERIAL_PORT}]
    lea rsi, [rip + msg_exception]
    call put_str
    mov rax, [rsp]
    call put_dec
    lea rsi, [rip + msg_at]
    call put_str
    mov rax, [rsp + 16]
    call put_hex
    lea rsi, [rip + msg_on]
    call put_str
    mov rax, rsp
    and rax, -4096                          // the ring-0 stack page
    mov rax, [rax - {R0_STACK} + {CPU_INDEX}]
    call put_dec
    lea rsi, [rip + msg_error]
    call put_str
    mov rax, [rsp + 8]
    call put_hex
    lea rsi, [rip + msg_cr2]
    call put_str
    mov rax, cr2
    call put_hex
    mov al, 10
    out dx, al
    movzx edx, word ptr [{BOOT_INFO} + {BI_EXIT_PORT}]
    mov eax, {EXIT_EXCEPTION}
    out dx, eax
3:
    cli
    hlt
    jmp 3b

// put_str: the NUL-terminated string at rsi to port dx. Clobbers rax, rsi.
put_str:
    mov al, [rsi]
    test al, al
    jz 1f
    out dx, al
    inc rsi
    jmp put_str
1:
    ret

// put_hex: rax as 0x and 16 hex digits to port dx. Clobbers rax, rcx, r8.
put_hex:
    mov r8, rax
    mov al, '0'
    out dx, al
    mov al, 'x'
    out dx, al
    mov ecx, 16
1:
    rol r8, 4
    mov eax, r8d
    and eax, 15
    add eax, '0'
    cmp eax, '9'
    jbe 2f
    add eax, 'a' - '9' - 1
2:
    out dx, al
    dec ecx
    jnz 1b
    ret

// put_dec: rax in decimal to port dx. Clobbers rax, rcx, r8, r9 (digits go on the stack).
put_dec:
    mov r9, rdx
    mov r8, 10
    xor ecx, ecx
1:
    xor edx, edx
    div r8
    add edx, '0'
    push rdx
    inc ecx
    test rax, rax
    jnz 1b
    mov rdx, r9
2:
    pop rax
    out dx, al
    dec ecx
    jnz 2b
    ret

.section .rodata.ring0, "a"
.balign 8
.global quietvm_fatal_table
quietvm_fatal_table:
.irp v, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
    .quad quietvm_fatal_\v
.endr
msg_exception: .asciz "guest: exception "
msg_at:        .asciz " at "
msg_on:        .asciz " on vcpu "
msg_error:     .asciz "\nguest: error code "
msg_cr2:       .asciz " cr2 "
