//! The pure parts of the `qemu` policy: finding QEMU, its command line, the guest's kernel command
//! line, the guest's end line and QEMU's vCPU thread names (docs/qemu.md).

use std::path::{Path, PathBuf};

use quietvm_vmm::config::VmConfig;

use super::QemuError;

/// The program looked for on PATH.
pub const QEMU_BINARY: &str = "qemu-system-x86_64";
/// The start of the guest memory file's name (`/dev/shm/quietvm-qemu-mem-PID-N.mem`), which `fleet`
/// recognises in QEMU's `smaps` as the guest memory mapping.
pub const MEMORY_FILE_PREFIX: &str = "quietvm-qemu-mem-";
/// The guest's end line (guest/src/runtime/pvh.rs):
/// `quietvm-pvh-end code=C report=0xP started=0|1 halts=a,b,..`.
pub const END_MARKER: &str = "quietvm-pvh-end";
/// The line vCPU 0 prints once it runs, before it starts the other vCPUs.
pub const START_MARKER: &str = "quietvm-pvh-start";

/// Everything QEMU's command line depends on.
#[derive(Debug, Clone)]
pub struct Launch {
    pub qemu: PathBuf,
    /// The guest ELF (`-kernel`), booted through its PVH note.
    pub kernel: PathBuf,
    /// The file that holds guest memory (`memory-backend-file`, shared), read after QEMU exits.
    pub memory_file: PathBuf,
    pub vcpus: u32,
    pub memory_mib: u64,
    /// The guest's arguments (`-append`).
    pub cmdline: String,
    /// The VM's name (`-name`), which also turns on QEMU's thread names.
    pub name: String,
    /// The config's payload (`-initrd`: a PVH module, which the guest takes as its payload).
    pub initrd: Option<PathBuf>,
}

/// QEMU's command line, program first (docs/qemu.md explains each part): a `microvm` with no
/// periodic device (no PIT, PIC, RTC), KVM with the host CPU model (for the TSC-deadline timer), the
/// serial console on standard input and output, the debug-exit device, named vCPU threads, and guest
/// memory in a shared file.
pub fn argv(l: &Launch) -> Vec<String> {
    let mem = format!("{}M", l.memory_mib);
    let mut v: Vec<String> = vec![l.qemu.display().to_string()];
    let mut push = |words: &[&str]| v.extend(words.iter().map(|w| (*w).to_owned()));
    push(&[
        "-machine",
        "microvm,pit=off,pic=off,rtc=off,isa-serial=on,acpi=off,memory-backend=mem",
    ]);
    push(&["-accel", "kvm", "-cpu", "host"]);
    push(&["-m", &mem]);
    push(&[
        "-object",
        &format!(
            "memory-backend-file,id=mem,size={mem},mem-path={},share=on",
            l.memory_file.display()
        ),
    ]);
    push(&[
        "-smp",
        &format!("{0},sockets=1,cores={0},threads=1", l.vcpus),
    ]);
    push(&["-nodefaults", "-no-user-config", "-display", "none"]);
    push(&["-serial", "stdio", "-no-reboot"]);
    push(&["-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"]);
    push(&["-name", &format!("{},debug-threads=on", l.name)]);
    push(&["-kernel", &l.kernel.display().to_string()]);
    push(&["-append", &l.cmdline]);
    if let Some(initrd) = &l.initrd {
        push(&["-initrd", &initrd.display().to_string()]);
    }
    v
}

/// The guest's arguments under QEMU: those quietvm would give it (workload, duration, seed, policy,
/// the config's extra words), plus what quietvm's boot info would carry: vCPUs, memory and the TSC
/// frequency (with no PIT there is nothing to calibrate against).
pub fn guest_cmdline(cfg: &VmConfig, tsc_khz: u32) -> String {
    format!(
        "{} vcpus={} mem_mib={} tsc_khz={tsc_khz}",
        cfg.guest_args(),
        cfg.vcpus,
        cfg.memory_mib
    )
}

/// `--qemu PATH` if given (it must be an executable file), else the first `qemu-system-x86_64` on
/// PATH.
pub fn find_qemu(explicit: Option<&Path>) -> Result<PathBuf, QemuError> {
    if let Some(path) = explicit {
        return if is_executable(path) {
            Ok(path.to_owned())
        } else {
            Err(QemuError::NotExecutable(path.to_owned()))
        };
    }
    let path = std::env::var_os("PATH").ok_or(QemuError::NotFound)?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(QEMU_BINARY))
        .find(|p| is_executable(p))
        .ok_or(QemuError::NotFound)
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// The guest's end line, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndLine {
    /// The guest's exit code (0: its checks passed).
    pub code: u32,
    /// Page number of its timer report (0: none).
    pub report_page: u32,
    /// The guest got the launcher's answer to its start line before it went on (so the counters read
    /// then are from the run's start).
    pub start_answered: bool,
    /// Halts per vCPU, as the guest counted them.
    pub halts: Vec<u64>,
}

/// Parses `quietvm-pvh-end code=C report=0xP started=0|1 halts=a,b,...`; `None` for any other line.
pub fn parse_end_line(line: &str) -> Option<EndLine> {
    let mut words = line.split(' ');
    if words.next()? != END_MARKER {
        return None;
    }
    let (mut code, mut report_page, mut started, mut halts) = (None, None, None, None);
    for word in words {
        match word.split_once('=')? {
            ("code", v) => code = Some(v.parse().ok()?),
            ("report", v) => {
                report_page = Some(u32::from_str_radix(v.strip_prefix("0x")?, 16).ok()?)
            }
            ("started", "0") => started = Some(false),
            ("started", "1") => started = Some(true),
            ("halts", "") => halts = Some(Vec::new()),
            ("halts", v) => {
                halts = Some(
                    v.split(',')
                        .map(|h| h.parse().ok())
                        .collect::<Option<Vec<u64>>>()?,
                )
            }
            _ => return None,
        }
    }
    Some(EndLine {
        code: code?,
        report_page: report_page?,
        start_answered: started?,
        halts: halts?,
    })
}

/// The vCPU index of a QEMU thread named `CPU n/KVM` (`-name ...,debug-threads=on`); `None` for
/// QEMU's other threads.
pub fn vcpu_index_of_thread(comm: &str) -> Option<u32> {
    comm.strip_prefix("CPU ")?
        .strip_suffix("/KVM")?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn launch() -> Launch {
        Launch {
            qemu: "/usr/bin/qemu-system-x86_64".into(),
            kernel: "/tmp/g.elf".into(),
            memory_file: "/dev/shm/quietvm-qemu-mem-1-0.mem".into(),
            vcpus: 8,
            memory_mib: 256,
            cmdline: "workload=idle-movable seed=1".into(),
            name: "quietvm-1-0".into(),
            initrd: None,
        }
    }

    #[test]
    fn a_payload_goes_as_initrd_and_nothing_else_does() {
        let mut l = launch();
        assert!(!argv(&l).iter().any(|w| w == "-initrd"));
        l.initrd = Some("/tmp/trace.qvrp".into());
        assert_eq!(after(&argv(&l), "-initrd"), "/tmp/trace.qvrp");
    }

    /// The value after `flag` in `argv`.
    fn after<'a>(argv: &'a [String], flag: &str) -> &'a str {
        let i = argv.iter().position(|a| a == flag).expect(flag);
        &argv[i + 1]
    }

    #[test]
    fn the_command_line_is_the_documented_minimal_one() {
        let a = argv(&launch());
        assert_eq!(a[0], "/usr/bin/qemu-system-x86_64");
        let machine = after(&a, "-machine");
        for part in [
            "microvm",
            "pit=off",
            "pic=off",
            "rtc=off",
            "memory-backend=mem",
        ] {
            assert!(
                machine.split(',').any(|p| p == part),
                "{machine} lacks {part}"
            );
        }
        assert_eq!(after(&a, "-accel"), "kvm");
        assert_eq!(after(&a, "-cpu"), "host");
        assert_eq!(after(&a, "-m"), "256M");
        assert_eq!(
            after(&a, "-object"),
            "memory-backend-file,id=mem,size=256M,mem-path=/dev/shm/quietvm-qemu-mem-1-0.mem,share=on"
        );
        assert_eq!(after(&a, "-smp"), "8,sockets=1,cores=8,threads=1");
        assert_eq!(
            after(&a, "-device"),
            "isa-debug-exit,iobase=0xf4,iosize=0x04"
        );
        assert_eq!(after(&a, "-name"), "quietvm-1-0,debug-threads=on");
        assert_eq!(after(&a, "-serial"), "stdio");
        assert_eq!(after(&a, "-kernel"), "/tmp/g.elf");
        assert_eq!(after(&a, "-append"), "workload=idle-movable seed=1");
        assert!(a.iter().any(|w| w == "-no-reboot"));
        assert!(a.iter().any(|w| w == "-nodefaults"));
    }

    #[test]
    fn the_guest_gets_what_the_boot_info_would_carry() {
        let cfg = VmConfig {
            vcpus: 4,
            memory_mib: 128,
            workload: "timers".into(),
            duration_ms: 500,
            seed: 7,
            policy: quietvm_vmm::config::VmPolicy::Qemu,
            args: vec!["timers=9".into()],
            ..VmConfig::default()
        };
        assert_eq!(
            guest_cmdline(&cfg, 2_600_000),
            "workload=timers duration_ms=500 seed=7 policy=qemu timers=9 vcpus=4 mem_mib=128 tsc_khz=2600000"
        );
    }

    #[test]
    fn end_lines_parse_and_others_do_not() {
        assert_eq!(
            parse_end_line("quietvm-pvh-end code=0 report=0x1bf started=1 halts=0,12,3"),
            Some(EndLine {
                code: 0,
                report_page: 0x1bf,
                start_answered: true,
                halts: vec![0, 12, 3]
            })
        );
        assert_eq!(
            parse_end_line("quietvm-pvh-end code=93 report=0x0 started=0 halts="),
            Some(EndLine {
                code: 93,
                report_page: 0,
                start_answered: false,
                halts: vec![]
            })
        );
        for bad in [
            "hello from vCPU 0 of 1",
            "quietvm-pvh-end code=x report=0x0 started=1 halts=",
            "quietvm-pvh-end code=0 report=0x1 halts=1",
            "quietvm-pvh-end code=0 report=0x1 started=2 halts=1",
            "quietvm-pvh-end code=0 report=12 halts=1",
            "quietvm-pvh-end code=0 halts=1",
            "quietvm-pvh-end code=0 report=0x1 halts=1,,2",
            "quietvm-pvh-end code=0 report=0x1 halts=1 extra=2",
            "quietvm-pvh-endx code=0 report=0x1 halts=1",
        ] {
            assert_eq!(parse_end_line(bad), None, "{bad}");
        }
    }

    #[test]
    fn vcpu_threads_are_recognised_by_name() {
        assert_eq!(vcpu_index_of_thread("CPU 0/KVM"), Some(0));
        assert_eq!(vcpu_index_of_thread("CPU 63/KVM"), Some(63));
        for other in [
            "qemu-system-x86",
            "IO mon_iothread",
            "CPU x/KVM",
            "CPU 1/TCG",
            "worker",
        ] {
            assert_eq!(vcpu_index_of_thread(other), None, "{other}");
        }
    }

    /// The built-in guest carries the PVH note QEMU looks for: a PT_NOTE segment with a note named
    /// "Xen" of type 18 (XEN_ELFNOTE_PHYS32_ENTRY) whose 8-byte descriptor is an address in the
    /// guest's executable PT_LOAD segment, below 4 GiB (a 32-bit entry); and quietvm's entry is still
    /// the ELF entry at 1 MiB.
    #[test]
    fn the_built_in_guest_has_a_pvh_entry_note() {
        let elf = quietvm_vmm::vm::builtin_guest_elf();
        let u16_at = |o: usize| u16::from_le_bytes(elf[o..o + 2].try_into().unwrap());
        let u32_at = |o: usize| u32::from_le_bytes(elf[o..o + 4].try_into().unwrap());
        let u64_at = |o: usize| u64::from_le_bytes(elf[o..o + 8].try_into().unwrap());
        assert_eq!(u64_at(24), 0x10_0000, "e_entry: quietvm's own entry");
        let (phoff, phentsize, phnum) = (u64_at(32) as usize, u16_at(54) as usize, u16_at(56));
        let mut entry = None;
        let mut text = None;
        for i in 0..phnum as usize {
            let ph = phoff + i * phentsize;
            let (kind, flags) = (u32_at(ph), u32_at(ph + 4));
            let (offset, vaddr, filesz) = (u64_at(ph + 8), u64_at(ph + 16), u64_at(ph + 32));
            const PT_LOAD: u32 = 1;
            const PT_NOTE: u32 = 4;
            const PF_X: u32 = 1;
            if kind == PT_LOAD && flags & PF_X != 0 {
                text = Some(vaddr..vaddr + filesz);
            }
            if kind != PT_NOTE {
                continue;
            }
            assert_eq!(
                u64_at(ph + 48),
                4,
                "note alignment: QEMU aligns the name to it"
            );
            let mut at = offset as usize;
            while at < (offset + filesz) as usize {
                let (namesz, descsz, ty) = (u32_at(at), u32_at(at + 4), u32_at(at + 8));
                let name = &elf[at + 12..at + 12 + namesz as usize];
                let desc = at + 12 + (namesz as usize).next_multiple_of(4);
                if name == b"Xen\0" && ty == 18 {
                    assert_eq!(descsz, 8, "QEMU reads 8 bytes");
                    entry = Some(u64_at(desc));
                }
                at = desc + (descsz as usize).next_multiple_of(4);
            }
        }
        let entry = entry.expect("a Xen note of type 18");
        let text = text.expect("an executable segment");
        assert!(
            text.contains(&entry) && entry < 1 << 32,
            "{entry:#x} in {text:x?}"
        );
        assert_ne!(
            entry, 0x10_0000,
            "the PVH entry is not quietvm's 64-bit entry"
        );
    }

    #[test]
    fn an_explicit_qemu_must_be_an_executable_file() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope");
        assert!(matches!(
            find_qemu(Some(&missing)),
            Err(QemuError::NotExecutable(_))
        ));
        let plain = dir.path().join("plain");
        std::fs::write(&plain, "").unwrap();
        assert!(matches!(
            find_qemu(Some(&plain)),
            Err(QemuError::NotExecutable(_))
        ));
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&plain, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(find_qemu(Some(&plain)).unwrap(), plain);
        assert!(
            find_qemu(Some(dir.path())).is_err(),
            "a directory is not QEMU"
        );
    }
}
