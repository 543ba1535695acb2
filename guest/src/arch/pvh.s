// The standard boot entry (PVH, as QEMU, Firecracker and Cloud Hypervisor start an ELF kernel), for
// running this same image under a foreign VMM (docs/qemu.md). quietvm's own direct entry (`_start`,
// ring0.s) is unchanged: this file only gets the machine into the state docs/boot.md promises there,
// then jumps to `_start`. Ring 0 is emulated on the project's hosts, so every path here is short.
// Placeholders in braces are constants from arch/mod.rs.

// ---------------------------------------------------------------------------------------------------------
// The Xen ELF note XEN_ELFNOTE_PHYS32_ENTRY: where the VMM enters in 32-bit protected mode. The address is
// a quad, as Linux has it: QEMU reads 8 bytes there. 4-byte alignment: QEMU finds the descriptor by
// aligning the name to the note segment's alignment.
// ---------------------------------------------------------------------------------------------------------
.section .note.Xen, "a", @note
.balign 4
.long 4                                     // name size: "Xen\0"
.long 8                                     // descriptor size
.long {XEN_ELFNOTE_PHYS32_ENTRY}
.asciz "Xen"
.balign 4
.quad quietvm_pvh_start

// What the 32-bit entry copies out of the VMM's start info before it overwrites low memory (the boot GDT,
// boot info and page tables of docs/boot.md go where the VMM may have put the start info or the command
// line). Zero in the image (.bss), so quietvm's own entry finds `quietvm_pvh_booted` = 0.
.section .bss.pvh, "aw", @nobits
.balign 8
.global quietvm_pvh_booted, quietvm_pvh_cmdline, quietvm_pvh_memmap, quietvm_pvh_memmap_entries
.global quietvm_pvh_module
quietvm_pvh_booted: .space 4
quietvm_pvh_memmap_entries: .space 4
quietvm_pvh_module: .space 16              // the first module's paddr and size (the payload)
quietvm_pvh_cmdline: .space {CMDLINE_SIZE}
quietvm_pvh_memmap: .space {MEMMAP_MAX} * 24

// The GDT of the way to long mode: null, 0x08 64-bit code, 0x10 data (docs/boot.md's boot selectors,
// which `_start` keeps in CS and SS).
.section .rodata.pvh, "a"
.balign 8
quietvm_pvh_gdt:
.quad 0
.quad 0x00af9a000000ffff
.quad 0x00cf92000000ffff
quietvm_pvh_gdtr:
.word 23
.long quietvm_pvh_gdt

// ---------------------------------------------------------------------------------------------------------
// vCPU 0 (the only one the VMM starts): 32-bit protected mode, paging off, IF=0, ebx = hvm_start_info.
// Copies the command line and memory map, writes the page tables (docs/boot.md: PML4 at 0x1_0000, first
// 4 GiB identity-mapped with 2 MiB user pages), the boot info fields that `_start` and the ring-0 fatal
// printer read (percpu_base just after the image, percpu_size, the ports), enters long mode with the
// control registers of docs/boot.md's entry state and jumps to `_start`. Ring 3 fills in the rest of
// the boot info from the command line (runtime::pvh) and starts the other vCPUs.
// ---------------------------------------------------------------------------------------------------------
.section .text.pvh, "ax"
.code32
.global quietvm_pvh_start
quietvm_pvh_start:
    cli
    cld
    mov dword ptr [quietvm_pvh_booted], 1
    // hvm_start_info: +0x18 cmdline_paddr, +0x28 memmap_paddr, +0x30 memmap_entries (version >= 1;
    // after +0x20 rsdp_paddr, as Xen's public start_info.h lays it out).
    // Addresses below 4 GiB: only their low halves are used.
    mov esi, [ebx + 0x18]
    test esi, esi
    jz 1f
    mov edi, offset quietvm_pvh_cmdline
    mov ecx, {CMDLINE_SIZE} - 1             // the last byte stays 0; ring 3 stops at the first NUL
    rep movsb
1:
    // +0x0c nr_modules, +0x10 modlist_paddr: the first module (paddr, size; 32 bytes each) is the
    // payload (`-initrd`). It stays where the VMM put it; only its place is copied.
    cmp dword ptr [ebx + 0x0c], 0
    je 4f
    mov esi, [ebx + 0x10]
    test esi, esi
    jz 4f
    mov eax, [esi]
    mov [quietvm_pvh_module], eax
    mov eax, [esi + 4]
    mov [quietvm_pvh_module + 4], eax
    mov eax, [esi + 8]
    mov [quietvm_pvh_module + 8], eax
    mov eax, [esi + 12]
    mov [quietvm_pvh_module + 12], eax
4:
    cmp dword ptr [ebx + 4], 1
    jb 2f
    mov ecx, [ebx + 0x30]
    cmp ecx, {MEMMAP_MAX}
    jbe 3f
    mov ecx, {MEMMAP_MAX}
3:
    mov [quietvm_pvh_memmap_entries], ecx
    imul ecx, ecx, 24
    mov esi, [ebx + 0x28]
    mov edi, offset quietvm_pvh_memmap
    rep movsb
2:
    // Page tables: PML4 and PDPT zeroed, then 4 page directories of 2 MiB pages (present, writable,
    // user, large), as quietvm's.
    mov edi, {PML4}
    xor eax, eax
    mov ecx, 2048                           // two pages of dwords
    rep stosd
    mov dword ptr [{PML4}], {PDPT} + 7
    mov dword ptr [{PDPT}], {FIRST_PD} + 7
    mov dword ptr [{PDPT} + 8], {FIRST_PD} + 0x1007
    mov dword ptr [{PDPT} + 16], {FIRST_PD} + 0x2007
    mov dword ptr [{PDPT} + 24], {FIRST_PD} + 0x3007
    mov edi, {FIRST_PD}
    mov eax, 0x87
    mov ecx, 2048
4:
    mov [edi], eax
    mov dword ptr [edi + 4], 0
    add eax, 0x200000
    add edi, 8
    dec ecx
    jnz 4b

    // Boot info: what `_start` and the fatal printer read before ring 3 completes it.
    mov eax, offset quietvm_image_end
    add eax, 0xfff
    and eax, -4096
    mov [{BOOT_INFO} + {BI_PERCPU_BASE}], eax
    mov dword ptr [{BOOT_INFO} + {BI_PERCPU_BASE} + 4], 0
    mov dword ptr [{BOOT_INFO} + {BI_PERCPU_SIZE}], {PERCPU_SIZE}
    mov dword ptr [{BOOT_INFO} + {BI_PERCPU_SIZE} + 4], 0
    mov word ptr [{BOOT_INFO} + {BI_SERIAL_PORT}], {SERIAL_PORT}
    mov word ptr [{BOOT_INFO} + {BI_EXIT_PORT}], {DEBUG_EXIT_PORT}

    lgdt [quietvm_pvh_gdtr]
    mov eax, {CR4}
    mov cr4, eax
    mov eax, {PML4}
    mov cr3, eax
    mov ecx, {MSR_EFER}
    rdmsr
    or eax, {EFER_LME}
    wrmsr
    mov eax, {CR0}
    mov cr0, eax
    .byte 0xea                              // ljmp 0x08:quietvm_pvh_start64
    .long quietvm_pvh_start64
    .word 0x08

.code64
quietvm_pvh_start64:
    mov ax, 0x10
    mov ds, ax
    mov es, ax
    mov ss, ax
    mov fs, ax
    mov gs, ax
    xor edi, edi                            // vCPU 0
    jmp quietvm_pvh_enter

// ---------------------------------------------------------------------------------------------------------
// The other vCPUs: vCPU 0 copies this trampoline to {TRAMPOLINE} and sends INIT and SIPI (runtime::pvh).
// Real mode, CS = {TRAMPOLINE} >> 4, IP = 0. Straight to long mode (PE and PG at once) on vCPU 0's page
// tables and GDT, then to the 64-bit code below. Position-independent: the only memory operand is
// relative to CS, and the far jump's target is absolute.
// ---------------------------------------------------------------------------------------------------------
.section .rodata.pvh, "a"
.balign 16
.global quietvm_ap_trampoline, quietvm_ap_trampoline_end
quietvm_ap_trampoline:
.code16
    cli
    mov ax, cs
    mov ds, ax
    .byte 0x66, 0x0f, 0x01, 0x16            // lgdt with a 32-bit base, [disp16]: the copy below
    .word quietvm_ap_gdtr - quietvm_ap_trampoline
    mov eax, {CR4}
    mov cr4, eax
    mov eax, {PML4}
    mov cr3, eax
    mov ecx, {MSR_EFER}
    rdmsr
    or eax, {EFER_LME}
    wrmsr
    mov eax, {CR0}
    mov cr0, eax
    .byte 0x66, 0xea                        // ljmp 0x08:quietvm_ap_start64 (32-bit offset)
    .long quietvm_ap_start64
    .word 0x08
.balign 4
quietvm_ap_gdtr:
.word 23
.long quietvm_pvh_gdt
quietvm_ap_trampoline_end:
.code64

.section .text.pvh, "ax"
// Long mode on another vCPU: its index is its initial APIC id (QEMU numbers a flat -smp topology
// 0 .. n-1, as the LAPIC backend's IPIs assume). The boot info is complete by now (vCPU 0 filled it in
// before it sent the SIPI).
quietvm_ap_start64:
    mov ax, 0x10
    mov ds, ax
    mov es, ax
    mov ss, ax
    mov fs, ax
    mov gs, ax
    mov eax, 1
    cpuid
    shr ebx, 24
    mov edi, ebx

// rdi = vCPU index: docs/boot.md's entry state (rsi = boot info, rsp = the top of this vCPU's area).
quietvm_pvh_enter:
    mov esi, {BOOT_INFO}
    mov rax, [rsi + {BI_PERCPU_SIZE}]
    lea rcx, [rdi + 1]
    imul rax, rcx
    add rax, [rsi + {BI_PERCPU_BASE}]
    mov rsp, rax
    jmp _start
