//! A running VM's memory, from outside, by `/proc/PID/smaps`: resident and proportional set sizes of
//! the whole process, and of its guest memory mapping alone.
//!
//! The guest memory mapping is recognised by its name: quietvm backs guest memory with one memory file
//! named [`GUEST_MEMORY_NAME`], mapped as `/memfd:quietvm-guest (deleted)` (docs/fleet.md). An
//! anonymous mapping could not be told apart: the kernel merges it with adjacent anonymous mappings.
//! Guest pages the guest never touched are not resident, so the mapping's `Rss` is the guest pages
//! touched so far; it only grows while the VM runs, since quietvm never gives guest memory back.

use quietvm_vmm::sys::kvm::vm::GUEST_MEMORY_NAME;
use serde::Serialize;

/// One sample of a process's memory, in KiB.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct MemSample {
    /// `Rss` summed over every mapping (what `VmRSS` says).
    pub rss_kib: u64,
    /// `Pss` summed over every mapping: shared pages (the quietvm binary, libc) divided among the
    /// processes that map them.
    pub pss_kib: u64,
    /// `Anonymous` summed over every mapping: the VMM's private memory (guest memory is a shared
    /// memory file, not anonymous).
    pub anon_kib: u64,
    /// `Rss` of the guest memory mapping: guest pages touched. `None` if the mapping was not found
    /// (or more than one mapping looked like it).
    pub guest_rss_kib: Option<u64>,
    /// `Pss` of the guest memory mapping.
    pub guest_pss_kib: Option<u64>,
}

/// Reads `/proc/PID/smaps` once. `None` if the process is gone or its smaps are empty (it is
/// exiting).
pub fn sample(pid: u32) -> Option<MemSample> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps")).ok()?;
    parse_smaps(&text)
}

/// Parses the text of a `smaps` file (see [`sample`]).
pub fn parse_smaps(text: &str) -> Option<MemSample> {
    let guest_path = format!("/memfd:{GUEST_MEMORY_NAME}");
    let mut s = MemSample::default();
    let mut mappings = 0u32;
    // Guest candidates seen, and the figures of the current mapping if it is one.
    let mut candidates = 0u32;
    let mut in_candidate = false;
    let mut guest = (0u64, 0u64);
    for line in text.lines() {
        if let Some(path) = mapping_path(line) {
            mappings += 1;
            in_candidate = is_guest_memory(path, &guest_path);
            if in_candidate {
                candidates += 1;
            }
            continue;
        }
        let Some((key, kib)) = field_kib(line) else {
            continue;
        };
        match key {
            "Rss" => {
                s.rss_kib += kib;
                if in_candidate {
                    guest.0 = kib;
                }
            }
            "Pss" => {
                s.pss_kib += kib;
                if in_candidate {
                    guest.1 = kib;
                }
            }
            "Anonymous" => s.anon_kib += kib,
            _ => {}
        }
    }
    if mappings == 0 {
        return None;
    }
    if candidates == 1 {
        s.guest_rss_kib = Some(guest.0);
        s.guest_pss_kib = Some(guest.1);
    }
    Some(s)
}

/// The first child of process `pid` whose name starts with `prefix` (`/proc/PID/task/PID/children`).
pub fn child_named(pid: u32, prefix: &str) -> Option<u32> {
    let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).ok()?;
    children
        .split_whitespace()
        .filter_map(|c| c.parse::<u32>().ok())
        .find(|c| {
            std::fs::read_to_string(format!("/proc/{c}/comm"))
                .is_ok_and(|n| n.trim_end().starts_with(prefix))
        })
}

/// Whether a mapping's path is guest memory: quietvm's memory file, or the file QEMU keeps guest memory
/// in under `--policy qemu` (docs/qemu.md).
fn is_guest_memory(path: &str, quietvm_guest: &str) -> bool {
    path == quietvm_guest
        || std::path::Path::new(path)
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with(crate::qemu::MEMORY_FILE_PREFIX))
}

/// `start-end perms offset dev inode [path]`: the mapping's path (empty for an anonymous mapping;
/// its first word, so without a ` (deleted)` suffix).
fn mapping_path(line: &str) -> Option<&str> {
    let mut fields = line.split_whitespace();
    let (start, end) = fields.next()?.split_once('-')?;
    u64::from_str_radix(start, 16).ok()?;
    u64::from_str_radix(end, 16).ok()?;
    let _perms = fields.next()?;
    let _offset = fields.next()?;
    if !fields.next()?.contains(':') {
        return None; // the device field, `major:minor`
    }
    let _inode = fields.next()?.parse::<u64>().ok()?;
    Some(fields.next().unwrap_or(""))
}

/// `Key:   123 kB`.
fn field_kib(line: &str) -> Option<(&str, u64)> {
    let (key, rest) = line.split_once(':')?;
    let mut words = rest.split_whitespace();
    let kib = words.next()?.parse().ok()?;
    (words.next() == Some("kB")).then_some((key, kib))
}

/// `/proc/loadavg`'s three load averages (`None` if unreadable).
pub fn load_average() -> Option<[f64; 3]> {
    let text = std::fs::read_to_string("/proc/loadavg").ok()?;
    let mut f = text.split_whitespace().map(|w| w.parse::<f64>().ok());
    Some([f.next()??, f.next()??, f.next()??])
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMAPS: &str = "\
55f0a4a79000-55f0a4b05000 r--p 00000000 fe:00 5382986                    /work/quietvm
Size:                560 kB
Rss:                 412 kB
Pss:                 206 kB
Anonymous:             0 kB
VmFlags: rd mr mw me dw sd
55f0ae604000-55f0ae64b000 rw-p 00000000 00:00 0                          [heap]
Size:                284 kB
Rss:                 256 kB
Pss:                 256 kB
Anonymous:           256 kB
7fe41d000000-7fe421000000 rw-s 00000000 00:01 2051                       /memfd:quietvm-guest (deleted)
Size:              65536 kB
Rss:                 280 kB
Pss:                 280 kB
Anonymous:             0 kB
THPeligible:    0
7fe421000000-7fe425000000 rw-p 00000000 00:00 0 
Size:              65536 kB
Rss:                   8 kB
Pss:                   8 kB
Anonymous:             8 kB
7fe425000000-7fe425021000 rw-p 00000000 00:00 0 
Size:                132 kB
Rss:                   8 kB
Pss:                   8 kB
Anonymous:             8 kB
";

    #[test]
    fn sums_every_mapping_and_finds_the_guest_mapping_by_name() {
        let s = parse_smaps(SMAPS).unwrap();
        assert_eq!(s.rss_kib, 412 + 256 + 280 + 8 + 8);
        assert_eq!(s.pss_kib, 206 + 256 + 280 + 8 + 8);
        assert_eq!(s.anon_kib, 256 + 8 + 8);
        assert_eq!(s.guest_rss_kib, Some(280));
        assert_eq!(s.guest_pss_kib, Some(280));
    }

    #[test]
    fn qemu_s_guest_memory_file_is_the_guest_mapping_too() {
        let qemu = SMAPS.replace(
            "/memfd:quietvm-guest (deleted)",
            "/dev/shm/quietvm-qemu-mem-4242-0.mem",
        );
        assert_eq!(parse_smaps(&qemu).unwrap().guest_rss_kib, Some(280));
        let other = SMAPS.replace("/memfd:quietvm-guest (deleted)", "/dev/shm/other.mem");
        assert_eq!(parse_smaps(&other).unwrap().guest_rss_kib, None);
    }

    #[test]
    fn no_guest_figures_when_the_mapping_is_missing_or_ambiguous() {
        let anonymous = SMAPS.replace("/memfd:quietvm-guest (deleted)", "");
        assert_eq!(parse_smaps(&anonymous).unwrap().guest_rss_kib, None);
        let twice = format!("{SMAPS}{}", &SMAPS[SMAPS.find("7fe41d").unwrap()..]);
        assert_eq!(parse_smaps(&twice).unwrap().guest_rss_kib, None);
        assert_eq!(parse_smaps(""), None);
    }

    #[test]
    fn this_process_can_be_sampled() {
        let s = sample(std::process::id()).unwrap();
        assert!(s.rss_kib > 0 && s.pss_kib > 0 && s.pss_kib <= s.rss_kib);
        assert!(load_average().is_some());
    }
}
