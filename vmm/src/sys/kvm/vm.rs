//! The VM: `/dev/kvm`, the VM file descriptor, guest memory and vCPU creation.

use kvm_bindings::{kvm_userspace_memory_region, CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Cap, Kvm, VmFd};
use vm_memory::{
    Address, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
};

use super::vcpu::Vcpu;
use super::{ioctl_err, KvmError};

/// The name of the file that backs guest memory: its mapping is `/memfd:quietvm-guest (deleted)` in
/// `/proc/PID/smaps`, which is how `quietvm fleet` tells the guest's pages from the VMM's own.
pub const GUEST_MEMORY_NAME: &str = "quietvm-guest";

/// A VM with its memory, ready for vCPUs. Normally without an in-kernel irqchip: quietvm emulates timers
/// and `HLT` itself and injects interrupts with `KVM_INTERRUPT`. The `kvm-lapic` baseline creates it
/// with KVM's irqchip instead ([`KvmVm::create_with_irqchip`]).
pub struct KvmVm {
    kvm: Kvm,
    vm: VmFd,
    memory: GuestMemoryMmap,
    cpuid: CpuId,
}

impl KvmVm {
    /// Opens the KVM device (`/dev/kvm`, or `$QUIETVM_KVM_DEVICE` where that is set), creates a VM
    /// and maps `mem_size` bytes of guest memory at guest address 0. The memory is a memory file named
    /// [`GUEST_MEMORY_NAME`], mapped lazily: untouched pages cost nothing.
    pub fn create(mem_size: u64) -> Result<Self, KvmError> {
        Self::open(mem_size, false)
    }

    /// As [`KvmVm::create`], plus KVM's in-kernel irqchip (PIC, IOAPIC and one LAPIC per vCPU), so that
    /// `HLT` and the LAPIC timer are handled in the kernel. Must come before any vCPU exists, which
    /// creating it here guarantees.
    pub fn create_with_irqchip(mem_size: u64) -> Result<Self, KvmError> {
        Self::open(mem_size, true)
    }

    fn open(mem_size: u64, irqchip: bool) -> Result<Self, KvmError> {
        let path = std::env::var("QUIETVM_KVM_DEVICE").unwrap_or_else(|_| "/dev/kvm".into());
        let open_err = |source| KvmError::OpenKvm {
            path: path.clone(),
            source,
        };
        let cpath = std::ffi::CString::new(path.clone())
            .map_err(|_| open_err(kvm_ioctls::Error::new(libc::EINVAL)))?;
        let kvm = Kvm::new_with_path(cpath).map_err(open_err)?;
        let api = kvm.get_api_version();
        if api != 12 {
            return Err(KvmError::ApiVersion { path, api });
        }
        if !kvm.check_extension(Cap::UserMemory) {
            return Err(KvmError::MissingCap("KVM_CAP_USER_MEMORY"));
        }
        let vm = kvm.create_vm().map_err(ioctl_err("create the VM"))?;
        let name = std::ffi::CString::new(GUEST_MEMORY_NAME).expect("no NUL in the name");
        let file = crate::sys::os::memory_file(&name, mem_size)
            .map_err(|e| KvmError::Memory(format!("cannot create the guest memory file: {e}")))?;
        let memory = GuestMemoryMmap::<()>::from_ranges_with_files([(
            GuestAddress(0),
            mem_size as usize,
            Some(FileOffset::new(file, 0)),
        )])
        .map_err(|e| KvmError::Memory(e.to_string()))?;
        for (slot, region) in memory.iter().enumerate() {
            let host = memory
                .get_host_address(region.start_addr())
                .map_err(|e| KvmError::Memory(e.to_string()))?;
            let desc = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: region.start_addr().raw_value(),
                memory_size: region.len(),
                userspace_addr: host as u64,
            };
            // SAFETY: the region is a live mapping owned by `memory`, which lives as long as the VM
            // (both are fields of the returned value, and the VM fd is dropped first).
            unsafe { vm.set_user_memory_region(desc) }
                .map_err(ioctl_err("register guest memory"))?;
        }
        // Intel VMX wants a TSS area outside guest memory; harmless elsewhere.
        const TSS_ADDRESS: u64 = 0xfffb_d000;
        if mem_size <= TSS_ADDRESS {
            vm.set_tss_address(TSS_ADDRESS as usize)
                .map_err(ioctl_err("set the TSS address"))?;
        }
        if irqchip {
            if !kvm.check_extension(Cap::Irqchip) {
                return Err(KvmError::MissingCap("KVM_CAP_IRQCHIP"));
            }
            vm.create_irq_chip()
                .map_err(ioctl_err("create the in-kernel irqchip"))?;
        }
        let cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(ioctl_err("read supported CPUID"))?;
        Ok(KvmVm {
            kvm,
            vm,
            memory,
            cpuid,
        })
    }

    /// The TSC frequency KVM gives a new VM's vCPUs on this host (`KVM_GET_TSC_KHZ` of a throw-away
    /// one-vCPU VM): what another VMM on the same KVM gives its guest unless told otherwise (the
    /// `qemu` policy passes it on the guest's command line).
    pub fn host_tsc_khz() -> Result<u32, KvmError> {
        let vm = Self::create(2 << 20)?;
        let vcpu = vm.create_vcpu(0)?;
        vcpu.tsc_khz()
    }

    /// The most vCPUs KVM allows in one VM.
    pub fn max_vcpus(&self) -> usize {
        self.kvm.get_max_vcpus()
    }

    /// Guest memory.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.memory
    }

    /// The CPUID the host supports, to give every vCPU.
    pub fn cpuid(&self) -> &CpuId {
        &self.cpuid
    }

    /// Creates vCPU `index`.
    pub fn create_vcpu(&self, index: u64) -> Result<Vcpu, KvmError> {
        let fd = self
            .vm
            .create_vcpu(index)
            .map_err(ioctl_err("create a vCPU"))?;
        Ok(Vcpu::new(fd))
    }
}
