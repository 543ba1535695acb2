// Ring-3 half of the upcall (ring0.s, make_upcall): runs natively.
// Stack on entry: interrupted rflags, interrupted rip, 128 bytes of the interrupted code's red zone, then
// the interrupted stack. Saves everything the Rust handler may clobber (caller-saved registers, SSE/x87
// state), calls it, restores, and returns to the interrupted code (popfq: its arithmetic flags and DF).
.section .text.upcall, "ax"
.global quietvm_upcall
quietvm_upcall:
    push rbp
    mov rbp, rsp
    push rax
    push rcx
    push rdx
    push rsi
    push rdi
    push r8
    push r9
    push r10
    push r11
    and rsp, -16                            // the interrupted rsp had any alignment
    sub rsp, 512
    fxsave64 [rsp]
    cld                                     // the ABI wants DF=0; popfq restores the interrupted DF
    call {doorbell}
    fxrstor64 [rsp]
    lea rsp, [rbp - 72]
    pop r11
    pop r10
    pop r9
    pop r8
    pop rdi
    pop rsi
    pop rdx
    pop rcx
    pop rax
    pop rbp
    popfq
    ret 128                                 // and skip the red zone
