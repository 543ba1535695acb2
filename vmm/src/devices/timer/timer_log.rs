//! `--timer-log PATH`: one JSON line per arming when it ends (docs/timer-abi.md, "The timer log").
//!
//! The device pushes one fixed-size [`LogRecord`] per ended arming into a bounded buffer (under its own
//! leaf lock, a [`NoSleepMutex`], taken under the device lock), and a `timer-log` thread swaps that
//! buffer for its own empty one, formats the records and writes them through a buffered writer. Memory
//! is two buffers of [`LOG_BUFFER_RECORDS`] records and the writer's buffer, whatever the VM's run
//! time. No step puts a vCPU thread to sleep: the writer is woken through a non-blocking eventfd, and
//! a vCPU that finds the buffer full (the writer fell behind) yields until it has room: the log is
//! complete, so records are never dropped while it can still be written. A write error ends the VM
//! (through the hook set with [`TimerLog::on_error`]) and the run fails with that error.

use std::fmt;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::Duration;

use tmigr::service::{CpuId, TimerId};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::sync::NoSleepMutex;

/// Records per buffer (two buffers: the one being filled and the one being written).
pub const LOG_BUFFER_RECORDS: usize = 8192;

/// How an arming ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogOutcome {
    /// Handed over by `POP`.
    Fired,
    /// Removed by `CANCEL`/`CANCEL_SYNC` while pending.
    Cancelled,
    /// Replaced by a new `ARM` of the same id while pending.
    Replaced,
    /// Still pending when the VM ended.
    Pending,
}

impl LogOutcome {
    fn name(self) -> &'static str {
        match self {
            LogOutcome::Fired => "fired",
            LogOutcome::Cancelled => "cancelled",
            LogOutcome::Replaced => "replaced",
            LogOutcome::Pending => "pending",
        }
    }
}

/// One ended arming. Times are guest ns (the device clock).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogRecord {
    pub owner: CpuId,
    pub id: TimerId,
    pub pinned: bool,
    pub armed_at: u64,
    pub deadline: u64,
    /// The applied slack.
    pub slack: u64,
    pub outcome: LogOutcome,
    /// When it was handed over, cancelled or replaced; `None` if pending at the end.
    pub at: Option<u64>,
    /// The vCPU whose `POP` took it (fired only).
    pub fired_on: Option<CpuId>,
    /// Its expiry was held back by callback serialization.
    pub held: bool,
}

impl fmt::Display for LogRecord {
    /// The line, without its newline; the field order is the format's (docs/timer-abi.md).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{{\"owner\":{},\"id\":{},\"flags\":\"{}\",\"armed_at_ns\":{},\"deadline_ns\":{},\"slack_ns\":{},\"outcome\":\"{}\",\"at_ns\":",
            self.owner,
            self.id,
            if self.pinned { "pinned" } else { "movable" },
            self.armed_at,
            self.deadline,
            self.slack,
            self.outcome.name()
        )?;
        match self.at {
            Some(t) => write!(f, "{t}")?,
            None => f.write_str("null")?,
        }
        f.write_str(",\"fired_on\":")?;
        match self.fired_on {
            Some(c) => write!(f, "{c}")?,
            None => f.write_str("null")?,
        }
        write!(f, ",\"held\":{}}}", self.held)
    }
}

type ErrorHook = Box<dyn Fn(String) + Send + Sync>;

/// The log of one VM: its buffer and its writer thread.
pub struct TimerLog {
    path: PathBuf,
    buf: NoSleepMutex<Vec<LogRecord>>,
    /// Written (never blocking) when the buffer is half full or the log is closing.
    wake: EventFd,
    closing: AtomicBool,
    /// The writer failed: records are dropped from now on (the run fails anyway).
    failed: AtomicBool,
    error: Mutex<Option<String>>,
    on_error: OnceLock<ErrorHook>,
    writer: Mutex<Option<JoinHandle<()>>>,
}

impl TimerLog {
    /// Creates (or truncates) `path` and starts the writer thread. The error is one line.
    pub fn create(path: &Path) -> Result<std::sync::Arc<Self>, String> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            // Never block on a FIFO without a reader.
            .custom_flags(libc::O_NONBLOCK)
            .open(path)
            .map_err(|e| format!("--timer-log {}: {e}", path.display()))?;
        let wake = EventFd::new(EFD_NONBLOCK)
            .map_err(|e| format!("--timer-log {}: {e}", path.display()))?;
        let log = std::sync::Arc::new(TimerLog {
            path: path.to_owned(),
            buf: NoSleepMutex::new(Vec::with_capacity(LOG_BUFFER_RECORDS)),
            wake,
            closing: AtomicBool::new(false),
            failed: AtomicBool::new(false),
            error: Mutex::new(None),
            on_error: OnceLock::new(),
            writer: Mutex::new(None),
        });
        let for_thread = std::sync::Arc::clone(&log);
        let handle = std::thread::Builder::new()
            .name("timer-log".into())
            .stack_size(128 << 10)
            .spawn(move || for_thread.write_out(file))
            .map_err(|e| {
                format!(
                    "--timer-log {}: cannot start its writer: {e}",
                    path.display()
                )
            })?;
        *log.writer.lock().unwrap_or_else(|e| e.into_inner()) = Some(handle);
        Ok(log)
    }

    /// What to do when a write fails (the VM ends with that one-line error). Set once.
    pub fn on_error(&self, hook: ErrorHook) {
        let _ = self.on_error.set(hook);
    }

    /// Queues one record. Never sleeps: if the buffer is full, wakes the writer and yields until it
    /// has made room (or failed).
    pub fn push(&self, record: LogRecord) {
        loop {
            if self.failed.load(Ordering::Acquire) {
                return;
            }
            let mut b = self.buf.lock();
            if b.len() < LOG_BUFFER_RECORDS {
                b.push(record);
                let n = b.len();
                drop(b);
                if n == LOG_BUFFER_RECORDS / 2 {
                    let _ = self.wake.write(1);
                }
                return;
            }
            drop(b);
            let _ = self.wake.write(1);
            std::thread::yield_now();
        }
    }

    /// Writes out what is queued, stops the writer, and says whether the whole log was written.
    /// Call once every record is pushed (the VM's threads have ended).
    pub fn finish(&self) -> Result<(), String> {
        self.closing.store(true, Ordering::Release);
        let _ = self.wake.write(1);
        if let Some(t) = self.writer.lock().unwrap_or_else(|e| e.into_inner()).take() {
            if t.join().is_err() {
                self.fail("its writer thread panicked".into());
            }
        }
        match self.error.lock().unwrap_or_else(|e| e.into_inner()).clone() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    fn fail(&self, why: String) {
        // Not logged here: the run fails with this line (`finish`), once.
        let msg = format!("--timer-log {}: {why}", self.path.display());
        self.failed.store(true, Ordering::Release);
        {
            let mut e = self.error.lock().unwrap_or_else(|e| e.into_inner());
            if e.is_none() {
                *e = Some(msg.clone());
            }
        }
        if let Some(hook) = self.on_error.get() {
            hook(msg);
        }
    }

    /// The `timer-log` thread.
    fn write_out(&self, file: File) {
        if let Err(e) = crate::sys::seccomp::install(crate::sys::seccomp::ThreadClass::Console) {
            self.fail(e);
            return;
        }
        let mut out = BufWriter::with_capacity(64 << 10, file);
        let mut mine: Vec<LogRecord> = Vec::with_capacity(LOG_BUFFER_RECORDS);
        loop {
            let closing = self.closing.load(Ordering::Acquire);
            std::mem::swap(&mut *self.buf.lock(), &mut mine);
            if mine.is_empty() {
                if closing {
                    break;
                }
                // Sleep until half a buffer is queued or the log closes; every 100 ms at most, so
                // records do not wait long (this thread may sleep; vCPU threads never do).
                crate::sys::os::poll_readable(self.wake.as_raw_fd(), Duration::from_millis(100));
                let _ = self.wake.read();
                continue;
            }
            for r in mine.drain(..) {
                if let Err(e) = writeln!(out, "{r}") {
                    self.fail(format!("cannot write: {e}"));
                    return;
                }
            }
        }
        if let Err(e) = out.flush() {
            self.fail(format!("cannot write: {e}"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_has_every_field_in_order() {
        let r = LogRecord {
            owner: 1,
            id: 7,
            pinned: false,
            armed_at: 10,
            deadline: 20,
            slack: 5,
            outcome: LogOutcome::Fired,
            at: Some(22),
            fired_on: Some(0),
            held: true,
        };
        assert_eq!(
            r.to_string(),
            r#"{"owner":1,"id":7,"flags":"movable","armed_at_ns":10,"deadline_ns":20,"slack_ns":5,"outcome":"fired","at_ns":22,"fired_on":0,"held":true}"#
        );
        let p = LogRecord {
            pinned: true,
            outcome: LogOutcome::Pending,
            at: None,
            fired_on: None,
            held: false,
            ..r
        };
        let v: serde_json::Value = serde_json::from_str(&p.to_string()).unwrap();
        assert_eq!(v["flags"], "pinned");
        assert_eq!(v["outcome"], "pending");
        assert!(v["at_ns"].is_null() && v["fired_on"].is_null());
    }

    #[test]
    fn more_records_than_two_buffers_all_arrive_in_order() {
        let path = std::env::temp_dir().join(format!("quietvm-timer-log-{}", std::process::id()));
        let log = TimerLog::create(&path).unwrap();
        let n = 3 * LOG_BUFFER_RECORDS + 5;
        for i in 0..n {
            log.push(LogRecord {
                owner: 0,
                id: i as u32,
                pinned: true,
                armed_at: 1,
                deadline: 2,
                slack: 0,
                outcome: LogOutcome::Cancelled,
                at: Some(1),
                fired_on: None,
                held: false,
            });
        }
        log.finish().unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let _ = std::fs::remove_file(&path);
        let ids: Vec<u64> = text
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["id"]
                    .as_u64()
                    .unwrap()
            })
            .collect();
        assert_eq!(ids, (0..n as u64).collect::<Vec<_>>());
    }

    #[test]
    fn an_unwritable_path_is_one_line() {
        let e = TimerLog::create(Path::new("/nonexistent/dir/x"))
            .err()
            .unwrap();
        assert!(e.starts_with("--timer-log /nonexistent/dir/x: "), "{e}");
        assert!(!e.contains('\n'));
    }

    #[test]
    fn a_failing_write_is_reported() {
        // /dev/full accepts the open and fails every write with ENOSPC.
        let log = TimerLog::create(Path::new("/dev/full")).unwrap();
        let hooked = std::sync::Arc::new(AtomicBool::new(false));
        let h = std::sync::Arc::clone(&hooked);
        log.on_error(Box::new(move |_| h.store(true, Ordering::SeqCst)));
        log.push(LogRecord {
            owner: 0,
            id: 0,
            pinned: true,
            armed_at: 1,
            deadline: 2,
            slack: 0,
            outcome: LogOutcome::Pending,
            at: None,
            fired_on: None,
            held: false,
        });
        let e = log.finish().unwrap_err();
        assert!(e.contains("/dev/full") && e.contains("cannot write"), "{e}");
        assert!(hooked.load(Ordering::SeqCst));
    }
}
