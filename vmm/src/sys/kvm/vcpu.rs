//! One vCPU: its boot state, `KVM_RUN` mapped to quietvm's own exit type, and interrupt injection.

use std::fs::File;
use std::os::fd::FromRawFd;
use std::os::unix::fs::FileExt;

use kvm_bindings::{
    kvm_fpu, kvm_interrupt, kvm_mp_state, kvm_regs, kvm_segment, CpuId, KVM_MP_STATE_RUNNABLE,
};
use kvm_ioctls::{VcpuExit, VcpuFd};
use quietvm_abi::boot::{CODE_SELECTOR, DATA_SELECTOR};
use vmm_sys_util::ioctl::{ioctl, ioctl_with_ptr, ioctl_with_ref};
use vmm_sys_util::{ioctl_io_nr, ioctl_iow_nr};

use super::kick::guest_sigmask_without_kick;
use super::{ioctl_err, KvmError};

const KVMIO: u32 = 0xAE;
// kvm-ioctls wraps neither of these (docs/kvm-host.md): define them as the kernel's uapi does.
ioctl_iow_nr!(KVM_INTERRUPT, KVMIO, 0x86, kvm_interrupt);
ioctl_iow_nr!(
    KVM_SET_SIGNAL_MASK,
    KVMIO,
    0x8b,
    kvm_bindings::kvm_signal_mask
);
// Nor this one (binary statistics, Linux 5.14+).
ioctl_io_nr!(KVM_GET_STATS_FD, KVMIO, 0xce);
// Nor reading a vCPU attribute (the TSC offset, Linux 5.16+); kvm-ioctls has it for devices only.
ioctl_iow_nr!(
    KVM_GET_DEVICE_ATTR,
    KVMIO,
    0xe2,
    kvm_bindings::kvm_device_attr
);

/// Why `KVM_RUN` returned, with the data quietvm needs, owned (no borrow of `kvm_run`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exit {
    /// `out` to `port`: `size` bytes of `value`.
    IoOut { port: u16, size: u8, value: u32 },
    /// `in` from `port`; already answered by the handler given to [`Vcpu::run`].
    IoIn { port: u16, size: u8 },
    /// The guest executed `hlt`.
    Hlt,
    /// A kick (signal) interrupted `KVM_RUN`.
    Interrupted,
    /// The guest can take an interrupt now (asked for with `request_interrupt_window`).
    InterruptWindow,
    /// The guest touched an address with no memory behind it.
    Mmio { addr: u64, write: bool },
    /// Triple fault.
    Shutdown,
    /// KVM could not emulate an instruction (or another internal error).
    InternalError { suberror: u32 },
    /// VM entry failed.
    FailEntry { reason: u64 },
    /// Any other exit; quietvm treats it as a guest error.
    Other(String),
}

impl Exit {
    /// Short name for statistics.
    pub fn kind(&self) -> &'static str {
        match self {
            Exit::IoOut { .. } => "io_out",
            Exit::IoIn { .. } => "io_in",
            Exit::Hlt => "hlt",
            Exit::Interrupted => "kick",
            Exit::InterruptWindow => "irq_window",
            Exit::Mmio { .. } => "mmio",
            Exit::Shutdown => "shutdown",
            Exit::InternalError { .. } => "internal_error",
            Exit::FailEntry { .. } => "fail_entry",
            Exit::Other(_) => "other",
        }
    }
}

/// Reads the statistics `names` from a KVM binary statistics file: a header, then descriptors (flags,
/// exponent, size, offset, bucket size, then a NUL-padded name of `name_size` bytes), then the data
/// block, where each statistic's first u64 lies at the descriptor's offset (Documentation/virt/kvm/api.rst,
/// "KVM_GET_STATS_FD").
fn read_named_stats(file: &File, names: &[&str]) -> std::io::Result<Vec<Option<u64>>> {
    let u32_at = |buf: &[u8], at: usize| u32::from_le_bytes(buf[at..at + 4].try_into().unwrap());
    let mut header = [0u8; 24];
    file.read_exact_at(&mut header, 0)?;
    let name_size = u32_at(&header, 4) as usize;
    let num_desc = u32_at(&header, 8) as usize;
    let desc_offset = u64::from(u32_at(&header, 16));
    let data_offset = u64::from(u32_at(&header, 20));
    let desc_size = 16 + name_size;
    let mut descs = vec![0u8; desc_size.saturating_mul(num_desc).min(1 << 20)];
    file.read_exact_at(&mut descs, desc_offset)?;
    let mut values = vec![None; names.len()];
    for desc in descs.chunks_exact(desc_size) {
        let raw_name = &desc[16..];
        let name = &raw_name[..raw_name
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(raw_name.len())];
        let Some(i) = names.iter().position(|n| n.as_bytes() == name) else {
            continue;
        };
        let offset = u64::from(u32_at(desc, 8));
        let mut value = [0u8; 8];
        file.read_exact_at(&mut value, data_offset + offset)?;
        values[i] = Some(u64::from_le_bytes(value));
    }
    Ok(values)
}

/// Registers a vCPU starts with (see docs/boot.md).
#[derive(Debug, Clone, Copy)]
pub struct BootState {
    pub entry: u64,
    pub stack_top: u64,
    pub index: u64,
    pub boot_info: u64,
    pub gdt_base: u64,
    pub page_table_root: u64,
}

/// A vCPU file descriptor, used only by its own thread.
pub struct Vcpu {
    fd: VcpuFd,
}

impl Vcpu {
    pub(crate) fn new(fd: VcpuFd) -> Self {
        Vcpu { fd }
    }

    /// Puts the vCPU in 64-bit long mode at the guest entry, as docs/boot.md describes.
    pub fn set_boot_state(&self, cpuid: &CpuId, boot: &BootState) -> Result<(), KvmError> {
        let mut cpuid = cpuid.clone();
        for entry in cpuid.as_mut_slice() {
            // Leaf 1 EBX[31:24] is the initial APIC id: make it the vCPU index.
            if entry.function == 1 {
                entry.ebx = (entry.ebx & 0x00ff_ffff) | ((boot.index as u32 & 0xff) << 24);
            }
            if entry.function == 0xb {
                entry.edx = boot.index as u32;
            }
        }
        self.fd
            .set_cpuid2(&cpuid)
            .map_err(ioctl_err("set vCPU CPUID"))?;

        let mut sregs = self.fd.get_sregs().map_err(ioctl_err("get vCPU sregs"))?;
        let code = kvm_segment {
            base: 0,
            limit: 0xffff_ffff,
            selector: CODE_SELECTOR,
            type_: 0xb,
            present: 1,
            dpl: 0,
            db: 0,
            s: 1,
            l: 1,
            g: 1,
            avl: 0,
            unusable: 0,
            padding: 0,
        };
        let data = kvm_segment {
            selector: DATA_SELECTOR,
            type_: 0x3,
            l: 0,
            db: 1,
            ..code
        };
        sregs.cs = code;
        sregs.ds = data;
        sregs.es = data;
        sregs.fs = data;
        sregs.gs = data;
        sregs.ss = data;
        sregs.tr = kvm_segment {
            base: 0,
            limit: 0x67,
            selector: 0,
            type_: 0xb,
            present: 1,
            s: 0,
            l: 0,
            db: 0,
            g: 0,
            ..code
        };
        sregs.gdt.base = boot.gdt_base;
        sregs.gdt.limit = 3 * 8 - 1;
        sregs.idt.base = 0;
        sregs.idt.limit = 0;
        const CR0_PE: u64 = 1;
        const CR0_MP: u64 = 1 << 1;
        const CR0_ET: u64 = 1 << 4;
        const CR0_NE: u64 = 1 << 5;
        const CR0_WP: u64 = 1 << 16;
        const CR0_PG: u64 = 1 << 31;
        const CR4_PAE: u64 = 1 << 5;
        const CR4_OSFXSR: u64 = 1 << 9;
        const CR4_OSXMMEXCPT: u64 = 1 << 10;
        const EFER_LME: u64 = 1 << 8;
        const EFER_LMA: u64 = 1 << 10;
        sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG;
        sregs.cr3 = boot.page_table_root;
        sregs.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT;
        sregs.efer = EFER_LME | EFER_LMA;
        self.fd
            .set_sregs(&sregs)
            .map_err(ioctl_err("set vCPU sregs"))?;

        let fpu = kvm_fpu {
            fcw: 0x37f,
            mxcsr: 0x1f80,
            ..Default::default()
        };
        self.fd.set_fpu(&fpu).map_err(ioctl_err("set vCPU FPU"))?;

        let regs = kvm_regs {
            rip: boot.entry,
            rsp: boot.stack_top,
            rdi: boot.index,
            rsi: boot.boot_info,
            rflags: 0x2,
            ..Default::default()
        };
        self.fd
            .set_regs(&regs)
            .map_err(ioctl_err("set vCPU registers"))
    }

    /// Makes the vCPU runnable at once. With an in-kernel irqchip KVM holds every vCPU but the first in
    /// "wait for INIT/SIPI"; quietvm starts them all at the entry point instead (docs/boot.md).
    pub fn set_runnable(&self) -> Result<(), KvmError> {
        self.fd
            .set_mp_state(kvm_mp_state {
                mp_state: KVM_MP_STATE_RUNNABLE,
            })
            .map_err(ioctl_err("set the vCPU runnable"))
    }

    /// The guest's TSC frequency in kHz (`KVM_GET_TSC_KHZ`).
    pub fn tsc_khz(&self) -> Result<u32, KvmError> {
        self.fd
            .get_tsc_khz()
            .map_err(ioctl_err("read the TSC frequency"))
    }

    /// What KVM adds to the host TSC to make this vCPU's TSC (`KVM_VCPU_TSC_OFFSET`, wrapping). quietvm's
    /// device clock is the guest TSC, read on the host as `rdtsc + offset` (docs/timer-abi.md, "The
    /// clock"). Fails on a KVM without vCPU TSC attributes.
    pub fn tsc_offset(&self) -> Result<u64, KvmError> {
        let mut offset: u64 = 0;
        let attr = kvm_bindings::kvm_device_attr {
            group: kvm_bindings::KVM_VCPU_TSC_CTRL,
            attr: u64::from(kvm_bindings::KVM_VCPU_TSC_OFFSET),
            addr: &mut offset as *mut u64 as u64,
            flags: 0,
        };
        // SAFETY: the fd is a vCPU fd; KVM_GET_DEVICE_ATTR reads `attr` and writes one u64 to `addr`,
        // which points at `offset`, alive for the whole call.
        let rc = unsafe { ioctl_with_ref(&self.fd, KVM_GET_DEVICE_ATTR(), &attr) };
        if rc != 0 {
            return Err(KvmError::Ioctl {
                what: "KVM_GET_DEVICE_ATTR(KVM_VCPU_TSC_OFFSET)",
                source: kvm_ioctls::Error::last(),
            });
        }
        Ok(offset)
    }

    /// The current values of the vCPU's KVM statistics called `names` (for example `halt_exits`), from
    /// its binary statistics file (`KVM_GET_STATS_FD`); `None` for a name this kernel does not have.
    /// The counters start at zero when the vCPU is created.
    pub fn kernel_stats(&self, names: &[&str]) -> Result<Vec<Option<u64>>, KvmError> {
        // SAFETY: the fd is a vCPU fd and KVM_GET_STATS_FD takes no argument.
        let fd = unsafe { ioctl(&self.fd, KVM_GET_STATS_FD()) };
        if fd < 0 {
            return Err(KvmError::Ioctl {
                what: "KVM_GET_STATS_FD",
                source: kvm_ioctls::Error::last(),
            });
        }
        // SAFETY: KVM just returned this new file descriptor; nothing else owns it.
        let file = unsafe { File::from_raw_fd(fd) };
        read_named_stats(&file, names).map_err(|source| KvmError::Os {
            what: "read the vCPU's KVM statistics",
            source,
        })
    }

    /// Makes `KVM_RUN` run the guest with the kick signal unblocked (see `kick.rs`). Call from the vCPU's
    /// own thread after it blocked the kick signal.
    pub fn unblock_kick_in_guest(&self) -> Result<(), KvmError> {
        #[repr(C)]
        struct SignalMask {
            len: u32,
            sigset: u64,
        }
        let mask = SignalMask {
            // The kernel's sigset_t on x86-64 is 8 bytes; KVM rejects any other length.
            len: 8,
            sigset: guest_sigmask_without_kick(),
        };
        // SAFETY: the fd is a vCPU fd and `mask` has the layout of `struct kvm_signal_mask` followed
        // by its 8-byte set, which is all the kernel reads.
        let rc = unsafe { ioctl_with_ptr(&self.fd, KVM_SET_SIGNAL_MASK(), &mask) };
        if rc != 0 {
            return Err(KvmError::Ioctl {
                what: "KVM_SET_SIGNAL_MASK",
                source: kvm_ioctls::Error::last(),
            });
        }
        Ok(())
    }

    /// Runs the guest until the next exit. An `in` is answered on the spot by `answer_in(port, size)`.
    pub fn run(&mut self, answer_in: impl FnOnce(u16, u8) -> u32) -> Result<Exit, KvmError> {
        match self.fd.run() {
            Ok(VcpuExit::IoOut(port, data)) => {
                let mut bytes = [0u8; 4];
                let n = data.len().min(4);
                bytes[..n].copy_from_slice(&data[..n]);
                Ok(Exit::IoOut {
                    port,
                    size: data.len() as u8,
                    value: u32::from_le_bytes(bytes),
                })
            }
            Ok(VcpuExit::IoIn(port, data)) => {
                let size = data.len() as u8;
                let value = answer_in(port, size).to_le_bytes();
                for (dst, src) in data
                    .iter_mut()
                    .zip(value.iter().chain(std::iter::repeat(&0xff)))
                {
                    *dst = *src;
                }
                Ok(Exit::IoIn { port, size })
            }
            Ok(VcpuExit::Hlt) => Ok(Exit::Hlt),
            Ok(VcpuExit::MmioRead(addr, data)) => {
                data.fill(0xff);
                Ok(Exit::Mmio { addr, write: false })
            }
            Ok(VcpuExit::MmioWrite(addr, _)) => Ok(Exit::Mmio { addr, write: true }),
            Ok(VcpuExit::Shutdown) => Ok(Exit::Shutdown),
            Ok(VcpuExit::InternalError) => {
                let run = self.fd.get_kvm_run();
                // SAFETY: exit_reason is KVM_EXIT_INTERNAL_ERROR, so `internal` is the active field.
                let suberror = unsafe { run.__bindgen_anon_1.internal.suberror };
                Ok(Exit::InternalError { suberror })
            }
            Ok(VcpuExit::FailEntry(reason, _)) => Ok(Exit::FailEntry { reason }),
            Ok(VcpuExit::Intr) => Ok(Exit::Interrupted),
            Ok(VcpuExit::IrqWindowOpen) => Ok(Exit::InterruptWindow),
            Ok(other) => Ok(Exit::Other(format!("{other:?}"))),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                Ok(Exit::Interrupted)
            }
            Err(e) => Err(KvmError::Ioctl {
                what: "KVM_RUN",
                source: e,
            }),
        }
    }

    /// The vCPU's key registers in one line, for crash reports.
    pub fn describe_state(&self) -> String {
        match (self.fd.get_regs(), self.fd.get_sregs()) {
            (Ok(r), Ok(s)) => format!(
                "rip={:#x} rsp={:#x} rflags={:#x} cs={:#x} ss={:#x} cr2={:#x} rax={:#x} rdi={:#x} rsi={:#x}",
                r.rip, r.rsp, r.rflags, s.cs.selector, s.ss.selector, s.cr2, r.rax, r.rdi, r.rsi
            ),
            _ => "registers unavailable".into(),
        }
    }

    /// Whether an interrupt injected now is taken at the next entry (interrupts on, no shadow).
    pub fn can_take_interrupt(&mut self) -> bool {
        let run = self.fd.get_kvm_run();
        run.ready_for_interrupt_injection != 0 && run.if_flag != 0
    }

    /// Asks KVM for an exit as soon as the guest can take an interrupt. On the project's machines this
    /// exit is unreliable (docs/kvm-host.md), so quietvm also retries with a kick.
    pub fn request_interrupt_window(&mut self, on: bool) {
        self.fd.get_kvm_run().request_interrupt_window = on as u8;
    }

    /// Queues `vector` for injection at the next entry (`KVM_INTERRUPT`; no in-kernel irqchip).
    pub fn inject(&self, vector: u8) -> Result<(), KvmError> {
        let irq = kvm_interrupt {
            irq: u32::from(vector),
        };
        // SAFETY: the fd is a vCPU fd and `irq` is a valid kvm_interrupt for the ioctl to read.
        let rc = unsafe { ioctl_with_ref(&self.fd, KVM_INTERRUPT(), &irq) };
        if rc != 0 {
            let err = kvm_ioctls::Error::last();
            // EEXIST: one is already queued; that one does the job.
            if err.errno() != libc::EEXIST {
                return Err(KvmError::Ioctl {
                    what: "KVM_INTERRUPT",
                    source: err,
                });
            }
        }
        Ok(())
    }
}
