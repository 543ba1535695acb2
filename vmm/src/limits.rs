//! Every limit quietvm puts on what it is given, in one place (docs/limits.md), and the one way input
//! files are read.
//!
//! An input file (guest image, payload, config, trace) is opened with `O_NONBLOCK`, so a FIFO or a
//! device never blocks the open; it must be a regular file, and no larger than its limit, both checked
//! on the open descriptor before a byte is read; and the read itself stops at the limit, so a file that
//! grows meanwhile cannot make quietvm read more.

use std::io::Read;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;
use std::time::Duration;

/// The largest guest ELF image.
pub const MAX_GUEST_IMAGE_BYTES: u64 = 256 << 20;
/// The largest `payload` file (it must also fit in guest memory).
pub const MAX_PAYLOAD_BYTES: u64 = 1 << 30;
/// The largest TOML config file.
pub const MAX_CONFIG_BYTES: u64 = 1 << 20;
/// The largest trace `quietvm replay` reads.
pub const MAX_TRACE_BYTES: u64 = 2 << 30;
/// The most CPUs a trace may name (its `#P:N` / `cpus=N` header, or a CPU number in an event).
pub const MAX_TRACE_CPUS: u32 = 4096;

/// The longest API request line; a longer one closes the connection.
pub const API_MAX_LINE: usize = 64 * 1024;
/// API connections served at once; one more is closed at once.
pub const API_MAX_CONNECTIONS: usize = 16;
/// Bytes of responses an API connection may have waiting to be read; a client that lets more pile
/// up is dropped.
pub const API_MAX_OUTPUT_BYTES: usize = 4 << 20;
/// A client whose output queue has not moved for this long is dropped.
pub const API_STALL: Duration = Duration::from_secs(5);
/// How long an `accept` that fails for lack of file descriptors pauses the listener.
pub const API_ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// The longest console line quietvm collects before writing it out anyway.
pub const CONSOLE_MAX_LINE: usize = 4096;
/// Console bytes waiting for standard output; what does not fit is dropped and counted
/// (`console_dropped_bytes`).
pub const CONSOLE_QUEUE_BYTES: usize = 1 << 20;
/// How long, once the VM has ended, quietvm still tries to write out waiting console bytes and the
/// statistics table before it gives up on a reader that does not read.
pub const EXIT_FLUSH: Duration = Duration::from_millis(300);

/// The same warning is logged at most this often (the rest are counted in the next one).
pub const LOG_EVERY: Duration = Duration::from_secs(1);

/// What an input file is, for its limit and its error messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputKind {
    GuestImage,
    Payload,
    Config,
    Trace,
}

impl InputKind {
    pub fn limit(self) -> u64 {
        match self {
            InputKind::GuestImage => MAX_GUEST_IMAGE_BYTES,
            InputKind::Payload => MAX_PAYLOAD_BYTES,
            InputKind::Config => MAX_CONFIG_BYTES,
            InputKind::Trace => MAX_TRACE_BYTES,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            InputKind::GuestImage => "guest",
            InputKind::Payload => "payload",
            InputKind::Config => "config",
            InputKind::Trace => "trace",
        }
    }
}

/// Shows a byte count in the largest unit that keeps it readable.
pub fn show_bytes(n: u64) -> String {
    match n {
        n if n >= 1 << 30 => format!("{:.1} GiB", n as f64 / (1u64 << 30) as f64),
        n if n >= 1 << 20 => format!("{:.1} MiB", n as f64 / (1u64 << 20) as f64),
        n if n >= 1 << 10 => format!("{:.1} KiB", n as f64 / 1024.0),
        n => format!("{n} bytes"),
    }
}

/// Reads an input file under the rules above. The error is one line naming the file and what is wrong
/// (and, for a limit, the limit and where it is documented).
pub fn read_input(path: &Path, kind: InputKind) -> Result<Vec<u8>, String> {
    let name = kind.name();
    let shown = path.display();
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(|e| format!("cannot read {name} {shown}: {e}"))?;
    let meta = file
        .metadata()
        .map_err(|e| format!("cannot read {name} {shown}: {e}"))?;
    let ft = meta.file_type();
    if !ft.is_file() {
        let what = if ft.is_dir() {
            "a directory"
        } else if ft.is_fifo() {
            "a FIFO"
        } else if ft.is_char_device() {
            "a character device"
        } else if ft.is_block_device() {
            "a block device"
        } else if ft.is_socket() {
            "a socket"
        } else {
            "not a regular file"
        };
        return Err(format!(
            "cannot read {name} {shown}: it is {what}; quietvm reads only regular files (docs/limits.md)"
        ));
    }
    let limit = kind.limit();
    if meta.len() > limit {
        return Err(format!(
            "cannot read {name} {shown}: {} is more than the {name} limit of {} (docs/limits.md)",
            show_bytes(meta.len()),
            show_bytes(limit)
        ));
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.take(limit + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("cannot read {name} {shown}: {e}"))?;
    if bytes.len() as u64 > limit {
        return Err(format!(
            "cannot read {name} {shown}: it grew past the {name} limit of {} while being read (docs/limits.md)",
            show_bytes(limit)
        ));
    }
    Ok(bytes)
}

/// A warning that is logged at most once per [`LOG_EVERY`]; the ones held back are counted and named
/// in the next line that is logged.
#[derive(Debug, Default)]
pub struct RateLimitedLog {
    last: Option<std::time::Instant>,
    suppressed: u64,
}

impl RateLimitedLog {
    pub fn warn(&mut self, what: impl FnOnce() -> String) {
        let now = std::time::Instant::now();
        if self.last.is_some_and(|t| now.duration_since(t) < LOG_EVERY) {
            self.suppressed += 1;
            return;
        }
        let line = what();
        match std::mem::take(&mut self.suppressed) {
            0 => log::warn!("{line}"),
            n => log::warn!("{line} (and {n} more like it not shown)"),
        }
        self.last = Some(now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_fifos_and_directories_are_refused_without_reading() {
        let e = read_input(Path::new("/dev/zero"), InputKind::Payload).unwrap_err();
        assert!(e.contains("character device"), "{e}");
        let e = read_input(Path::new("/tmp"), InputKind::Config).unwrap_err();
        assert!(e.contains("directory"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        assert!(std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success());
        let e = read_input(&fifo, InputKind::Trace).unwrap_err();
        assert!(e.contains("FIFO"), "{e}");
    }

    #[test]
    fn a_sparse_file_over_the_limit_is_refused_before_reading() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big");
        let f = std::fs::File::create(&path).unwrap();
        f.set_len(MAX_CONFIG_BYTES + 1).unwrap();
        let e = read_input(&path, InputKind::Config).unwrap_err();
        assert!(e.contains("limit"), "{e}");
        f.set_len(10).unwrap();
        assert_eq!(read_input(&path, InputKind::Config).unwrap(), vec![0; 10]);
    }
}
