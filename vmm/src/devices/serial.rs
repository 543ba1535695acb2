//! The serial console: a 16550 UART from `vm-superio`, shared by all vCPUs, printing whole lines to
//! quietvm's standard output.
//!
//! A vCPU thread never writes to standard output itself: a reader that does not read (`quietvm run |
//! sleep 60`) would block it in `write`, deaf to the timeout and to SIGTERM. Each complete line goes
//! into a bounded queue (under a [`NoSleepMutex`], with a non-blocking eventfd to wake the writer: no
//! step of it can put a vCPU thread to sleep), and a `console` thread writes the queue out, waiting
//! for the reader with `poll` and never for longer than a moment once the VM has ended. What does not
//! fit in the queue, or cannot be written (the reader went away, or did not read by the end), is
//! dropped and counted: `console_dropped_bytes` in the statistics (docs/stats.md). Standard output's
//! own flags are never changed: it is shared with the parent shell.

use std::collections::VecDeque;
use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::limits::{CONSOLE_MAX_LINE, CONSOLE_QUEUE_BYTES, EXIT_FLUSH};
use crate::sync::NoSleepMutex;

/// The console's interrupt line is not wired: the guest polls, and quietvm never injects serial IRQs.
pub struct NoInterrupt;

impl Trigger for NoInterrupt {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        Ok(())
    }
}

/// Console bytes on their way to the writer thread.
struct ConsoleQueue {
    bytes: NoSleepMutex<VecDeque<u8>>,
    capacity: usize,
    dropped: AtomicU64,
    /// Written (never blocking) when bytes were queued or the console is closing.
    wake: EventFd,
    /// The VM has ended: write out what is queued until the exit deadline, then stop.
    closing: AtomicBool,
    /// The output failed for good (e.g. the reader is gone): every further byte is dropped.
    dead: AtomicBool,
}

impl ConsoleQueue {
    /// Queues one line, or counts it as dropped. Never sleeps.
    fn push(&self, line: &[u8]) {
        if self.dead.load(Ordering::Relaxed) {
            self.dropped.fetch_add(line.len() as u64, Ordering::Relaxed);
            return;
        }
        {
            let mut q = self.bytes.lock();
            if q.len() + line.len() > self.capacity {
                drop(q);
                self.dropped.fetch_add(line.len() as u64, Ordering::Relaxed);
                return;
            }
            q.extend(line);
        }
        // EFD_NONBLOCK: at worst (the counter saturated) the write fails, and the writer is awake.
        let _ = self.wake.write(1);
    }
}

/// Collects bytes and queues each complete line at once, so lines of different vCPUs never mix. The
/// line never grows past [`CONSOLE_MAX_LINE`], whatever happens to the output.
pub struct LineWriter {
    line: Vec<u8>,
    queue: Arc<ConsoleQueue>,
}

impl Write for LineWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        for &b in buf {
            self.line.push(b);
            if b == b'\n' || self.line.len() >= CONSOLE_MAX_LINE {
                self.flush_line();
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl LineWriter {
    fn flush_line(&mut self) {
        if !self.line.is_empty() {
            self.queue.push(&self.line);
            self.line.clear();
        }
    }
}

/// The UART behind a lock (vCPU threads write it concurrently), and the thread that writes its output.
pub struct SerialConsole {
    uart: NoSleepMutex<Serial<NoInterrupt, vm_superio::serial::NoEvents, LineWriter>>,
    queue: Arc<ConsoleQueue>,
    writer: Mutex<Option<JoinHandle<()>>>,
}

impl SerialConsole {
    /// A console writing to standard output (through a duplicate of its descriptor, whose flags are
    /// left alone).
    pub fn to_stdout() -> std::io::Result<Self> {
        use std::os::fd::AsFd;
        let out = std::io::stdout().as_fd().try_clone_to_owned()?;
        Self::new(out, CONSOLE_QUEUE_BYTES)
    }

    /// A console writing to `out`, with a queue of `capacity` bytes.
    pub fn new(out: OwnedFd, capacity: usize) -> std::io::Result<Self> {
        let queue = Arc::new(ConsoleQueue {
            bytes: NoSleepMutex::new(VecDeque::new()),
            capacity,
            dropped: AtomicU64::new(0),
            wake: EventFd::new(EFD_NONBLOCK)?,
            closing: AtomicBool::new(false),
            dead: AtomicBool::new(false),
        });
        let for_thread = Arc::clone(&queue);
        let writer = std::thread::Builder::new()
            .name("console".into())
            .stack_size(64 << 10)
            .spawn(move || write_out(&for_thread, &out))?;
        Ok(SerialConsole {
            uart: NoSleepMutex::new(Serial::new(
                NoInterrupt,
                LineWriter {
                    line: Vec::new(),
                    queue: Arc::clone(&queue),
                },
            )),
            queue,
            writer: Mutex::new(Some(writer)),
        })
    }

    /// A guest `out` to register `offset`.
    pub fn write(&self, offset: u8, value: u8) {
        let mut uart = self.uart.lock();
        if let Err(e) = uart.write(offset, value) {
            log::debug!("serial write: {e:?}");
        }
    }

    /// A guest `in` from register `offset`.
    pub fn read(&self, offset: u8) -> u8 {
        self.uart.lock().read(offset)
    }

    /// The VM has ended: queues a last line the guest did not end with a newline, lets the writer
    /// write out what it can within [`EXIT_FLUSH`], and stops it. Returns the bytes dropped in all.
    pub fn finish(&self) -> u64 {
        self.uart.lock().writer_mut().flush_line();
        self.queue.closing.store(true, Ordering::Release);
        let _ = self.queue.wake.write(1);
        if let Some(t) = self.writer.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = t.join();
        }
        self.dropped_bytes()
    }

    /// Console bytes dropped so far.
    pub fn dropped_bytes(&self) -> u64 {
        self.queue.dropped.load(Ordering::Relaxed)
    }
}

/// The `console` thread: writes queued bytes to `out` as the reader takes them.
fn write_out(queue: &ConsoleQueue, out: &OwnedFd) {
    if let Err(e) = crate::sys::seccomp::install(crate::sys::seccomp::ThreadClass::Console) {
        log::error!("console: {e}");
    }
    let fd = out.as_raw_fd();
    let mut chunk: Vec<u8> = Vec::with_capacity(64 << 10);
    let mut exit_deadline: Option<Instant> = None;
    loop {
        let closing = queue.closing.load(Ordering::Acquire);
        if closing && exit_deadline.is_none() {
            exit_deadline = Some(Instant::now() + EXIT_FLUSH);
        }
        if chunk.is_empty() {
            let mut q = queue.bytes.lock();
            let n = q.len().min(chunk.capacity());
            chunk.extend(q.drain(..n));
        }
        if chunk.is_empty() {
            if closing {
                return;
            }
            // Sleep until bytes are queued or the VM ends (this thread may sleep; vCPUs never do).
            wait_readable(&queue.wake);
            let _ = queue.wake.read();
            continue;
        }
        // While the VM runs, wait for the reader in short steps (to notice the end); once it has
        // ended, only until the exit deadline.
        let deadline = exit_deadline.unwrap_or_else(|| Instant::now() + Duration::from_millis(100));
        match crate::sys::os::write_within(fd, &chunk, deadline) {
            Ok(n) => {
                chunk.drain(..n);
            }
            Err((n, e)) => {
                log::debug!("console: {e}; dropping its output from now on");
                chunk.drain(..n);
                queue.dead.store(true, Ordering::Relaxed);
                drop_all(queue, &mut chunk);
            }
        }
        if exit_deadline.is_some_and(|d| Instant::now() >= d) && !chunk.is_empty() {
            drop_all(queue, &mut chunk);
            return;
        }
    }
}

/// Counts the unwritten chunk and everything queued as dropped.
fn drop_all(queue: &ConsoleQueue, chunk: &mut Vec<u8>) {
    let mut q = queue.bytes.lock();
    let n = chunk.len() + q.len();
    q.clear();
    chunk.clear();
    queue.dropped.fetch_add(n as u64, Ordering::Relaxed);
}

/// Waits (up to 100 ms, so a missed wake-up costs no more) until the eventfd has a count.
fn wait_readable(evt: &EventFd) {
    crate::sys::os::poll_readable(evt.as_raw_fd(), Duration::from_millis(100));
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn console_to_file(capacity: usize) -> (SerialConsole, std::fs::File) {
        let file = tempfile::tempfile().unwrap();
        let reader = file.try_clone().unwrap();
        (
            SerialConsole::new(OwnedFd::from(file), capacity).unwrap(),
            reader,
        )
    }

    fn contents(mut f: &std::fs::File) -> Vec<u8> {
        use std::io::Seek;
        let mut v = Vec::new();
        f.rewind().unwrap();
        f.read_to_end(&mut v).unwrap();
        v
    }

    #[test]
    fn bytes_come_out_as_whole_lines() {
        let (console, file) = console_to_file(1 << 20);
        for b in b"hi\nthere" {
            console.write(0, *b);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while contents(&file) != b"hi\n" {
            assert!(Instant::now() < deadline, "the line never came out");
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(console.finish(), 0);
        assert_eq!(contents(&file), b"hi\nthere");
    }

    #[test]
    fn a_full_queue_drops_and_counts_instead_of_growing() {
        let (console, _file) = console_to_file(0);
        for _ in 0..100_000 {
            console.write(0, b'x');
        }
        // Lines of CONSOLE_MAX_LINE went nowhere; the last partial one is counted at the end.
        assert_eq!(console.finish(), 100_000);
        assert!(console.uart.lock().writer().line.capacity() <= 2 * CONSOLE_MAX_LINE);
    }
}
