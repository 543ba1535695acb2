//! The guest memory map and boot structures of docs/boot.md: page tables, the boot GDT, boot info.

use quietvm_abi::boot::offset as info_at;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

use crate::devices::timer::abi::DEVICE_PAGE_SIZE;
use crate::devices::{DOORBELL_VECTOR, EXIT_PORT, REPORT_PORT, SERIAL_PORT, TIMER_PORT};

// The memory map and boot info of docs/boot.md are the guest ABI's (quietvm-abi).
pub use quietvm_abi::boot::{
    BOOT_GDT, BOOT_INFO, FIRST_PD, IMAGE_BASE, MAGIC as BOOT_MAGIC, PAGE_SIZE as PAGE, PDPT,
    PERCPU_SIZE, PML4, VERSION as BOOT_VERSION,
};
use quietvm_abi::boot::{CODE_SELECTOR, DATA_SELECTOR};
/// Free memory the built-in guest needs beyond its per-vCPU areas.
pub const MIN_FREE: u64 = 1 << 20;
/// The longest `args`: the boot info's field less its NUL.
pub const ARGS_MAX: usize = quietvm_abi::boot::ARGS_SIZE - 1;

/// Where everything goes, for a given image end, vCPU count and memory size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    pub mem_size: u64,
    pub vcpus: u32,
    pub device_pages: u64,
    pub percpu_base: u64,
    /// The timer device's state words (docs/timer-abi.md, "Queue mode"), after the per-vCPU areas.
    pub timer_states: u64,
    pub free_base: u64,
}

impl Layout {
    /// Places the device pages, the per-vCPU areas and the state words of `max_timers` timers after
    /// the image. `None` if they do not fit, with the bytes that would be needed.
    pub fn plan(image_end: u64, vcpus: u32, mem_size: u64, max_timers: u32) -> Result<Self, u64> {
        let device_pages = image_end.div_ceil(PAGE) * PAGE;
        let percpu_base = device_pages + DEVICE_PAGE_SIZE * u64::from(vcpus);
        let timer_states = percpu_base + PERCPU_SIZE * u64::from(vcpus);
        let free_base = timer_states + (8 * u64::from(max_timers)).div_ceil(PAGE) * PAGE;
        let needed = free_base + MIN_FREE;
        if needed > mem_size {
            return Err(needed);
        }
        Ok(Layout {
            mem_size,
            vcpus,
            device_pages,
            percpu_base,
            timer_states,
            free_base,
        })
    }

    /// Top of vCPU `index`'s per-vCPU area: its stack pointer at entry.
    pub fn stack_top(&self, index: u32) -> u64 {
        self.percpu_base + PERCPU_SIZE * (u64::from(index) + 1)
    }

    /// Writes the page tables, the boot GDT and the boot info. `tsc_khz` is the guest's TSC frequency
    /// (0 if KVM could not tell). `timer_device`: the VM has quietvm's timer device (not `kvm-lapic`),
    /// whose state words the boot info then points at.
    pub fn write_boot_structures(
        &self,
        mem: &GuestMemoryMmap,
        max_timers: u32,
        args: &str,
        tsc_khz: u32,
        timer_device: bool,
    ) -> Result<(), vm_memory::GuestMemoryError> {
        // Identity map of all memory with 2 MiB pages: present, writable, user (ring 3 uses it all).
        const P: u64 = 1;
        const RW: u64 = 1 << 1;
        const US: u64 = 1 << 2;
        const PS: u64 = 1 << 7;
        mem.write_obj(PDPT | P | RW | US, GuestAddress(PML4))?;
        let two_mib = 2 << 20;
        let pages = self.mem_size.div_ceil(two_mib);
        for i in 0..pages {
            let pd = FIRST_PD + (i / 512) * PAGE;
            if i % 512 == 0 {
                mem.write_obj(pd | P | RW | US, GuestAddress(PDPT + (i / 512) * 8))?;
            }
            mem.write_obj(
                (i * two_mib) | P | RW | US | PS,
                GuestAddress(pd + (i % 512) * 8),
            )?;
        }
        // Null, 64-bit code, data: each at its selector.
        let gdt: [(u16, u64); 3] = [
            (0, 0),
            (CODE_SELECTOR, 0x00af_9b00_0000_ffff),
            (DATA_SELECTOR, 0x00cf_9300_0000_ffff),
        ];
        for (selector, d) in gdt {
            mem.write_obj(d, GuestAddress(BOOT_GDT + u64::from(selector)))?;
        }
        let info = GuestAddress(BOOT_INFO);
        mem.write_obj(BOOT_MAGIC, info.unchecked_add(info_at::MAGIC))?;
        mem.write_obj(BOOT_VERSION, info.unchecked_add(info_at::VERSION))?;
        mem.write_obj(self.vcpus, info.unchecked_add(info_at::VCPUS))?;
        mem.write_obj(self.mem_size, info.unchecked_add(info_at::MEM_SIZE))?;
        mem.write_obj(self.device_pages, info.unchecked_add(info_at::DEVICE_PAGES))?;
        mem.write_obj(self.percpu_base, info.unchecked_add(info_at::PERCPU_BASE))?;
        mem.write_obj(PERCPU_SIZE, info.unchecked_add(info_at::PERCPU_SIZE))?;
        mem.write_obj(self.free_base, info.unchecked_add(info_at::FREE_BASE))?;
        mem.write_obj(SERIAL_PORT, info.unchecked_add(info_at::SERIAL_PORT))?;
        mem.write_obj(EXIT_PORT, info.unchecked_add(info_at::EXIT_PORT))?;
        mem.write_obj(TIMER_PORT, info.unchecked_add(info_at::TIMER_PORT))?;
        mem.write_obj(
            DOORBELL_VECTOR,
            info.unchecked_add(info_at::DOORBELL_VECTOR),
        )?;
        mem.write_obj(max_timers, info.unchecked_add(info_at::MAX_TIMERS))?;
        let args = &args.as_bytes()[..args.len().min(ARGS_MAX)];
        mem.write_obj(args.len() as u32, info.unchecked_add(info_at::ARGS_LEN))?;
        mem.write_slice(args, info.unchecked_add(info_at::ARGS))?;
        mem.write_obj(0u8, info.unchecked_add(info_at::ARGS + args.len() as u64))?;
        mem.write_obj(tsc_khz, info.unchecked_add(info_at::TSC_KHZ))?;
        mem.write_obj(REPORT_PORT, info.unchecked_add(info_at::REPORT_PORT))?;
        let states = if timer_device { self.timer_states } else { 0 };
        mem.write_obj(states, info.unchecked_add(info_at::TIMER_STATES))?;
        Ok(())
    }

    /// Places `payload` at `free_base` (boot info `payload_base` and `payload_len`)
    /// and moves the boot info's `free_base` past it; call after `write_boot_structures`. `Err` (one
    /// line) if it does not fit beside the guest's free memory.
    pub fn write_payload(&self, mem: &GuestMemoryMmap, payload: &[u8]) -> Result<(), String> {
        let len = payload.len() as u64;
        let free = (self.free_base + len).div_ceil(PAGE) * PAGE;
        if free + MIN_FREE > self.mem_size {
            return Err(format!(
                "a payload of {len} bytes needs {} MiB of guest memory",
                (free + MIN_FREE).div_ceil(1 << 20)
            ));
        }
        let info = GuestAddress(BOOT_INFO);
        let w = || -> Result<(), vm_memory::GuestMemoryError> {
            mem.write_slice(payload, GuestAddress(self.free_base))?;
            mem.write_obj(self.free_base, info.unchecked_add(info_at::PAYLOAD_BASE))?;
            mem.write_obj(len, info.unchecked_add(info_at::PAYLOAD_LEN))?;
            mem.write_obj(free, info.unchecked_add(info_at::FREE_BASE))
        };
        w().map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_places_areas_after_the_image_and_checks_size() {
        let l = Layout::plan(0x10_0123, 2, 64 << 20, 600).unwrap();
        assert_eq!(l.device_pages, 0x10_1000);
        assert_eq!(l.percpu_base, 0x10_3000);
        assert_eq!(l.stack_top(1), 0x10_3000 + 2 * PERCPU_SIZE);
        assert_eq!(l.timer_states, 0x10_3000 + 2 * PERCPU_SIZE);
        // 600 words: 4800 bytes, two pages.
        assert_eq!(l.free_base, l.timer_states + 2 * PAGE);
        assert!(Layout::plan(0x10_0000, 1024, 16 << 20, 64).is_err());
    }
}
