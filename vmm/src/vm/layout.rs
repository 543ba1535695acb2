//! The guest memory map and boot structures of docs/boot.md: page tables, the boot GDT, boot info.

use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

use crate::devices::{DOORBELL_VECTOR, EXIT_PORT, REPORT_PORT, SERIAL_PORT, TIMER_PORT};

pub const BOOT_GDT: u64 = 0x1000;
pub const BOOT_INFO: u64 = 0x2000;
pub const PML4: u64 = 0x1_0000;
pub const PDPT: u64 = 0x1_1000;
pub const FIRST_PD: u64 = 0x1_2000;
/// The lowest address a guest segment may use.
pub const IMAGE_BASE: u64 = 0x10_0000;
pub const PAGE: u64 = 4096;
pub const PERCPU_SIZE: u64 = 128 * 1024;
/// Free memory the built-in guest needs beyond its per-vCPU areas.
pub const MIN_FREE: u64 = 1 << 20;
pub const BOOT_MAGIC: u64 = 0x3154_4f4f_424d_5651;
pub const ARGS_MAX: usize = 511;

/// Where everything goes, for a given image end, vCPU count and memory size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    pub mem_size: u64,
    pub vcpus: u32,
    pub device_pages: u64,
    pub percpu_base: u64,
    pub free_base: u64,
}

impl Layout {
    /// Places the device pages and per-vCPU areas after the image. `None` if they do not fit, with
    /// the bytes that would be needed.
    pub fn plan(image_end: u64, vcpus: u32, mem_size: u64) -> Result<Self, u64> {
        let device_pages = image_end.div_ceil(PAGE) * PAGE;
        let percpu_base = device_pages + PAGE * u64::from(vcpus);
        let free_base = percpu_base + PERCPU_SIZE * u64::from(vcpus);
        let needed = free_base + MIN_FREE;
        if needed > mem_size {
            return Err(needed);
        }
        Ok(Layout {
            mem_size,
            vcpus,
            device_pages,
            percpu_base,
            free_base,
        })
    }

    /// Top of vCPU `index`'s per-vCPU area: its stack pointer at entry.
    pub fn stack_top(&self, index: u32) -> u64 {
        self.percpu_base + PERCPU_SIZE * (u64::from(index) + 1)
    }

    /// Writes the page tables, the boot GDT and the boot info. `tsc_khz` is the guest's TSC frequency
    /// (0 if KVM could not tell).
    pub fn write_boot_structures(
        &self,
        mem: &GuestMemoryMmap,
        max_timers: u32,
        args: &str,
        tsc_khz: u32,
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
        // Null, 64-bit code (0x08), data (0x10).
        let gdt: [u64; 3] = [0, 0x00af_9b00_0000_ffff, 0x00cf_9300_0000_ffff];
        for (i, d) in gdt.iter().enumerate() {
            mem.write_obj(*d, GuestAddress(BOOT_GDT + 8 * i as u64))?;
        }
        let info = GuestAddress(BOOT_INFO);
        mem.write_obj(BOOT_MAGIC, info)?;
        mem.write_obj(1u32, info.unchecked_add(0x08))?;
        mem.write_obj(self.vcpus, info.unchecked_add(0x0c))?;
        mem.write_obj(self.mem_size, info.unchecked_add(0x10))?;
        mem.write_obj(self.device_pages, info.unchecked_add(0x18))?;
        mem.write_obj(self.percpu_base, info.unchecked_add(0x20))?;
        mem.write_obj(PERCPU_SIZE, info.unchecked_add(0x28))?;
        mem.write_obj(self.free_base, info.unchecked_add(0x30))?;
        mem.write_obj(SERIAL_PORT, info.unchecked_add(0x38))?;
        mem.write_obj(EXIT_PORT, info.unchecked_add(0x3a))?;
        mem.write_obj(TIMER_PORT, info.unchecked_add(0x3c))?;
        mem.write_obj(DOORBELL_VECTOR, info.unchecked_add(0x3e))?;
        mem.write_obj(max_timers, info.unchecked_add(0x40))?;
        let args = &args.as_bytes()[..args.len().min(ARGS_MAX)];
        mem.write_obj(args.len() as u32, info.unchecked_add(0x44))?;
        mem.write_slice(args, info.unchecked_add(0x48))?;
        mem.write_obj(0u8, info.unchecked_add(0x48 + args.len() as u64))?;
        // After the 512 bytes of `args`.
        mem.write_obj(tsc_khz, info.unchecked_add(0x248))?;
        mem.write_obj(REPORT_PORT, info.unchecked_add(0x24c))?;
        Ok(())
    }

    /// Places `payload` at `free_base` (boot info `payload_base` at 0x250, `payload_len` at 0x258)
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
            mem.write_obj(self.free_base, info.unchecked_add(0x250))?;
            mem.write_obj(len, info.unchecked_add(0x258))?;
            mem.write_obj(free, info.unchecked_add(0x30))
        };
        w().map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_places_areas_after_the_image_and_checks_size() {
        let l = Layout::plan(0x10_0123, 2, 64 << 20).unwrap();
        assert_eq!(l.device_pages, 0x10_1000);
        assert_eq!(l.percpu_base, 0x10_3000);
        assert_eq!(l.stack_top(1), 0x10_3000 + 2 * PERCPU_SIZE);
        assert!(Layout::plan(0x10_0000, 1024, 16 << 20).is_err());
    }
}
