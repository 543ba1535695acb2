//! The IDT, one per vCPU at the start of its per-vCPU area (`ring0.s` loaded it, still empty).
//! Written from ring 3, where it costs nothing, before interrupts are first enabled.

use super::{layout, selector};

extern "C" {
    static quietvm_fatal_table: [u64; 32];
    fn quietvm_gp_stub();
    fn quietvm_doorbell_stub();
    fn quietvm_lapic_stub();
    fn quietvm_spurious_stub();
}

/// A 64-bit interrupt gate (type 0xE: clears IF on entry), DPL 0, present.
fn gate(handler: u64) -> [u64; 2] {
    let low = (handler & 0xffff)
        | (u64::from(selector::KERNEL_CS) << 16)
        | (0x8e << 40)
        | (((handler >> 16) & 0xffff) << 48);
    [low, handler >> 32]
}

/// Fills this vCPU's IDT: exceptions are fatal except #GP (the halt path), `doorbell_vector` goes
/// to the doorbell stub, `lapic_vector`, the guest's own LAPIC timer vector (used only under
/// `policy=kvm-lapic`), to the stub that EOIs it and then acts as the doorbell, every other vector to
/// a stub that just returns.
pub fn init(area_base: usize, doorbell_vector: u8, lapic_vector: u8) {
    let idt = (area_base + layout::IDT) as *mut [u64; 2];
    for vector in 0..=255u8 {
        let handler = match vector {
            13 => quietvm_gp_stub as *const () as u64,
            // SAFETY: a table of 32 addresses defined in ring0.s, never written.
            0..=31 => unsafe { quietvm_fatal_table[usize::from(vector)] },
            v if v == doorbell_vector => quietvm_doorbell_stub as *const () as u64,
            v if v == lapic_vector => quietvm_lapic_stub as *const () as u64,
            _ => quietvm_spurious_stub as *const () as u64,
        };
        // SAFETY: the IDT is this vCPU's own page in its per-vCPU area; nothing else writes it.
        unsafe { idt.add(usize::from(vector)).write_volatile(gate(handler)) };
    }
}
