//! The guest ELF: the built-in test guest, or a file of the user's, checked against docs/boot.md
//! before `linux-loader` loads it.

use std::path::{Path, PathBuf};

use thiserror::Error;

use super::layout::IMAGE_BASE;

/// The built-in test guest, built from `guest/` by build.rs.
static BUILTIN_GUEST: &[u8] = include_bytes!(env!("QUIETVM_GUEST_ELF"));

/// The built-in test guest's ELF, as built (for a VMM that loads it itself: `quietvm run --policy qemu`).
pub fn builtin_guest_elf() -> &'static [u8] {
    BUILTIN_GUEST
}

/// Why a guest file cannot be run.
#[derive(Debug, Error)]
pub enum ImageError {
    /// The file could not be read (one line from [`crate::limits::read_input`]).
    #[error("{0}")]
    Read(String),
    #[error("guest {path} is not a quietvm guest: {why} (see docs/boot.md)")]
    NotAGuest { path: PathBuf, why: &'static str },
}

/// A checked guest image.
pub struct GuestImage {
    pub bytes: Vec<u8>,
    /// One past the highest byte any loadable segment occupies in guest memory.
    pub end: u64,
}

impl GuestImage {
    pub fn builtin() -> Result<Self, ImageError> {
        Self::check(BUILTIN_GUEST.to_vec(), Path::new("<built-in>"))
    }

    pub fn from_file(path: &Path) -> Result<Self, ImageError> {
        let bytes = crate::limits::read_input(path, crate::limits::InputKind::GuestImage)
            .map_err(ImageError::Read)?;
        Self::check(bytes, path)
    }

    /// Checks the ELF header and program headers: an x86-64 ELF64 executable whose loadable segments
    /// lie at or above 1 MiB. Whether it fits in memory is checked against the memory size later.
    fn check(bytes: Vec<u8>, path: &Path) -> Result<Self, ImageError> {
        let bad = |why| ImageError::NotAGuest {
            path: path.to_owned(),
            why,
        };
        let u16_at = |o: usize| {
            bytes
                .get(o..o + 2)
                .map(|b| u16::from_le_bytes([b[0], b[1]]))
        };
        let u32_at = |o: usize| {
            bytes
                .get(o..o + 4)
                .map(|b| u32::from_le_bytes(b.try_into().unwrap_or_default()))
        };
        let u64_at = |o: usize| {
            bytes
                .get(o..o + 8)
                .map(|b| u64::from_le_bytes(b.try_into().unwrap_or_default()))
        };
        if bytes.get(0..4) != Some(b"\x7fELF") {
            return Err(bad("no ELF magic"));
        }
        if bytes.get(4) != Some(&2) || bytes.get(5) != Some(&1) {
            return Err(bad("not a little-endian ELF64 file"));
        }
        if u16_at(16) != Some(2) {
            return Err(bad("not an executable (ET_EXEC)"));
        }
        if u16_at(18) != Some(62) {
            return Err(bad("not an x86-64 file"));
        }
        let entry = u64_at(24).ok_or_else(|| bad("truncated header"))?;
        let phoff = u64_at(32).ok_or_else(|| bad("truncated header"))? as usize;
        let phentsize = u16_at(54).ok_or_else(|| bad("truncated header"))? as usize;
        let phnum = u16_at(56).ok_or_else(|| bad("truncated header"))? as usize;
        if phentsize < 56 || phnum == 0 {
            return Err(bad("no program headers"));
        }
        let mut end = 0u64;
        let mut entry_covered = false;
        for i in 0..phnum {
            let ph = phoff
                .checked_add(i * phentsize)
                .ok_or_else(|| bad("program header table out of the file"))?;
            let p_type = u32_at(ph).ok_or_else(|| bad("program header table out of the file"))?;
            if p_type != 1 {
                continue; // not PT_LOAD
            }
            let truncated = || bad("program header table out of the file");
            let offset = u64_at(ph + 8).ok_or_else(truncated)?;
            let paddr = u64_at(ph + 24).ok_or_else(truncated)?;
            let filesz = u64_at(ph + 32).ok_or_else(truncated)?;
            let memsz = u64_at(ph + 40).ok_or_else(truncated)?;
            if paddr < IMAGE_BASE {
                return Err(bad("a loadable segment lies below 1 MiB"));
            }
            if filesz > memsz
                || offset
                    .checked_add(filesz)
                    .is_none_or(|e| e > bytes.len() as u64)
            {
                return Err(bad("a loadable segment lies outside the file"));
            }
            let seg_end = paddr
                .checked_add(memsz)
                .ok_or_else(|| bad("a segment wraps around"))?;
            entry_covered |= (paddr..seg_end).contains(&entry);
            end = end.max(seg_end);
        }
        if end == 0 {
            return Err(bad("no loadable segment"));
        }
        if !entry_covered {
            return Err(bad("the entry point is not inside a loadable segment"));
        }
        Ok(GuestImage { bytes, end })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_guest_passes_the_checks() {
        let g = GuestImage::builtin().unwrap();
        assert!(g.end > IMAGE_BASE);
    }

    #[test]
    fn non_elf_and_truncated_files_are_refused() {
        let p = Path::new("x");
        assert!(GuestImage::check(b"hello".to_vec(), p).is_err());
        let mut elf = BUILTIN_GUEST[..64].to_vec();
        assert!(GuestImage::check(elf.clone(), p).is_err());
        elf[18] = 3; // EM_386
        assert!(matches!(
            GuestImage::check(elf, p),
            Err(ImageError::NotAGuest {
                why: "not an x86-64 file",
                ..
            })
        ));
    }
}
