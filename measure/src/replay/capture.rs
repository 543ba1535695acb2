//! `quietvm trace-host`: records this machine's timer activity with tracefs into a file that
//! `quietvm replay` reads.
//!
//! The capture uses a tracefs *instance* of its own (`instances/quietvm-trace-PID`): a separate
//! ring buffer with its own event switches and `tracing_on`, so the top-level buffer, which
//! someone else may be using, is not touched at all; the instance is removed at the end. Where
//! the kernel has no instances, it uses the top-level buffer and puts back what it changed: each
//! event's `enable`, `buffer_size_kb` and `tracing_on` (the top-level buffer is cleared before the
//! capture). Either way a guard restores tracefs in its `Drop`, on success, on error and on
//! Ctrl-C (SIGINT/SIGTERM stop the capture early; the partial capture is written).

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use vmm_sys_util::signal::register_signal_handler;

/// The events recorded (those the kernel has), `timer_migration:*` expanded from
/// `available_events`.
pub const WANTED: [&str; 5] = [
    "timer:timer_start",
    "timer:timer_cancel",
    "timer:timer_expire_entry",
    "power:cpu_idle",
    "timer:tick_stop",
];

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    STOP.store(true, Ordering::SeqCst);
}

/// The effective user id, from `/proc/self/status`.
fn euid() -> Option<u32> {
    let s = fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("Uid:"))?;
    line.split_whitespace().nth(2)?.parse().ok()
}

/// Why the host's timer activity could not be captured. Each is one line for the user.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("tracing the host needs root (tracefs is root-only); run as root")]
    NotRoot,
    #[error("cannot run mount to mount tracefs: {0}")]
    Mount(#[source] std::io::Error),
    #[error("tracefs is not mounted and `mount -t tracefs nodev /sys/kernel/tracing` failed")]
    NoTracefs,
    #[error("this kernel has none of the timer events to trace")]
    NoEvents,
    #[error("cannot install the Ctrl-C handler: {0}")]
    Signal(#[source] vmm_sys_util::errno::Error),
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {value:?} to {}: {source}", path.display())]
    Write {
        path: PathBuf,
        value: String,
        source: std::io::Error,
    },
    #[error("cannot write {}: {source}", path.display())]
    Output {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Finds (or mounts) tracefs.
fn tracefs() -> Result<PathBuf, CaptureError> {
    for p in ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"] {
        if Path::new(p).join("available_events").exists() {
            return Ok(PathBuf::from(p));
        }
    }
    let st = std::process::Command::new("mount")
        .args(["-t", "tracefs", "nodev", "/sys/kernel/tracing"])
        .status()
        .map_err(CaptureError::Mount)?;
    let p = PathBuf::from("/sys/kernel/tracing");
    if st.success() && p.join("available_events").exists() {
        Ok(p)
    } else {
        Err(CaptureError::NoTracefs)
    }
}

fn read(p: &Path) -> Result<String, CaptureError> {
    fs::read_to_string(p).map_err(|source| CaptureError::Read {
        path: p.to_owned(),
        source,
    })
}

fn write(p: &Path, v: &str) -> Result<(), CaptureError> {
    fs::write(p, v).map_err(|source| CaptureError::Write {
        path: p.to_owned(),
        value: v.to_owned(),
        source,
    })
}

/// The events of `WANTED` and `timer_migration:*` this kernel has, and those it lacks.
pub fn choose_events(available: &str) -> (Vec<String>, Vec<String>) {
    let have: Vec<&str> = available.lines().map(str::trim).collect();
    let mut chosen = Vec::new();
    let mut missing = Vec::new();
    for w in WANTED {
        if have.contains(&w) {
            chosen.push(w.to_string());
        } else {
            missing.push(w.to_string());
        }
    }
    let tmigr: Vec<String> = have
        .iter()
        .filter(|e| e.starts_with("timer_migration:"))
        .map(|e| e.to_string())
        .collect();
    if tmigr.is_empty() {
        missing.push("timer_migration:*".to_string());
    }
    chosen.extend(tmigr);
    (chosen, missing)
}

/// Puts tracefs back as it was when dropped.
struct Guard {
    /// The buffer used: an instance directory, or the tracefs root.
    dir: PathBuf,
    /// The instance to remove, if one was made.
    instance: bool,
    /// (file, original contents) for every file written, restored in reverse order.
    saved: Vec<(PathBuf, String)>,
}

impl Guard {
    /// Writes `v` to `file` under the buffer, remembering what was there first.
    fn set(&mut self, file: &str, v: &str) -> Result<(), CaptureError> {
        let p = self.dir.join(file);
        if !self.instance && !self.saved.iter().any(|(q, _)| *q == p) {
            let old = read(&p)?;
            self.saved.push((p.clone(), old));
        }
        write(&p, v)
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = fs::write(self.dir.join("tracing_on"), "0");
        if self.instance {
            if let Err(e) = fs::remove_dir(&self.dir) {
                eprintln!(
                    "quietvm trace-host: warning: cannot remove {}: {e}",
                    self.dir.display()
                );
            }
            return;
        }
        for (p, old) in self.saved.iter().rev() {
            // `buffer_size_kb` reads "7 (expanded: 1408)" before first use: keep the number.
            let v = old.split_whitespace().next().unwrap_or("0");
            if let Err(e) = fs::write(p, v) {
                eprintln!(
                    "quietvm trace-host: warning: cannot restore {}: {e}",
                    p.display()
                );
            }
        }
    }
}

/// What a capture did.
pub struct Captured {
    pub events: Vec<String>,
    pub missing: Vec<String>,
    pub seconds: f64,
    pub interrupted: bool,
    pub bytes: usize,
    pub instance: bool,
}

/// Captures `seconds` of this machine's timer events into `out`, with `buffer_kb` per CPU.
pub fn capture(seconds: f64, out: &Path, buffer_kb: u32) -> Result<Captured, CaptureError> {
    if euid() != Some(0) {
        return Err(CaptureError::NotRoot);
    }
    let root = tracefs()?;
    let available = read(&root.join("available_events"))?;
    let (events, missing) = choose_events(&available);
    if events.is_empty() {
        return Err(CaptureError::NoEvents);
    }
    for sig in [libc::SIGINT, libc::SIGTERM] {
        register_signal_handler(sig, on_signal).map_err(CaptureError::Signal)?;
    }
    STOP.store(false, Ordering::SeqCst);

    let inst = root
        .join("instances")
        .join(format!("quietvm-trace-{}", std::process::id()));
    let mut guard = if root.join("instances").is_dir() && fs::create_dir(&inst).is_ok() {
        Guard {
            dir: inst,
            instance: true,
            saved: Vec::new(),
        }
    } else {
        Guard {
            dir: root.clone(),
            instance: false,
            saved: Vec::new(),
        }
    };
    guard.set("tracing_on", "0")?;
    guard.set("buffer_size_kb", &buffer_kb.to_string())?;
    if !guard.instance {
        // Every event's switch is saved before any is changed: `set_event` changes many at once.
        for e in &events {
            let (sys, name) = e.split_once(':').unwrap_or(("", e));
            guard.set(&format!("events/{sys}/{name}/enable"), "0")?;
        }
    }
    for e in &events {
        let (sys, name) = e.split_once(':').unwrap_or(("", e));
        guard.set(&format!("events/{sys}/{name}/enable"), "1")?;
    }
    // Clear the buffer, then record.
    write(&guard.dir.join("trace"), "")?;
    guard.set("tracing_on", "1")?;
    let started = Instant::now();
    let want = Duration::from_secs_f64(seconds);
    while started.elapsed() < want && !STOP.load(Ordering::SeqCst) {
        let left = want.saturating_sub(started.elapsed());
        std::thread::sleep(left.min(Duration::from_millis(100)));
    }
    let took = started.elapsed().as_secs_f64();
    write(&guard.dir.join("tracing_on"), "0")?;
    let text = read(&guard.dir.join("trace"))?;
    fs::write(out, &text).map_err(|source| CaptureError::Output {
        path: out.to_owned(),
        source,
    })?;
    let instance = guard.instance;
    drop(guard);
    Ok(Captured {
        events,
        missing,
        seconds: took,
        interrupted: STOP.load(Ordering::SeqCst),
        bytes: text.len(),
        instance,
    })
}
