//! The API socket as an `event-manager` subscriber: accepts connections from the VMM owner's user
//! only, reads request lines, answers each with one response line.
//!
//! The event loop also watches the VM's end, signals and `--timeout-ms`, so no client may hold it:
//! - every connection is non-blocking, with a bounded output queue. Requests are taken only while the
//!   queue is short (a client that pipelines requests and reads slowly is served at the pace it reads);
//!   a client whose queue has not moved for [`API_STALL`], or has grown past
//!   [`API_MAX_OUTPUT_BYTES`], is dropped;
//! - at most [`API_MAX_CONNECTIONS`] connections; one more is closed at once;
//! - a request that waits (pause, hotplug: up to 2 s for the guest) is a [`Waiting`] the loop checks
//!   on a timer, not a wait on the loop's thread; the connection's later requests wait their turn,
//!   other connections do not;
//! - `accept` failing for lack of descriptors pauses the listener for [`API_ACCEPT_BACKOFF`] instead of
//!   spinning, and its warning (like every warning here) is rate-limited.

use std::collections::{HashMap, VecDeque};
use std::io::{ErrorKind, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use vmm_sys_util::timerfd::TimerFd;

use super::{start_line, Response, VmControl, Waiting};
use crate::limits::{
    RateLimitedLog, API_ACCEPT_BACKOFF, API_MAX_CONNECTIONS, API_MAX_LINE, API_MAX_OUTPUT_BYTES,
    API_STALL,
};
use crate::sys::os::{current_uid, peer_uid};

/// Requests are taken from a connection only while less than this is waiting to be read by it.
const OUTPUT_HIGH_WATER: usize = 64 * 1024;
/// How often open [`Waiting`] requests are checked.
const WAITING_POLL: Duration = Duration::from_millis(1);

struct Connection {
    stream: UnixStream,
    /// Bytes read and not yet taken as request lines.
    input: Vec<u8>,
    /// Response bytes not yet written.
    output: VecDeque<u8>,
    /// Since when `output` has been waiting without the client reading any of it.
    stalled_since: Option<Instant>,
    /// The request being answered, if it waits.
    waiting: Option<Waiting>,
    /// The client has shut down its sending side: answer what it sent, then close.
    eof: bool,
    /// The events the connection is registered for.
    interest: EventSet,
}

impl Connection {
    /// Whether the connection has nothing more to do and can be closed.
    fn finished(&self) -> bool {
        self.eof && self.waiting.is_none() && self.output.is_empty() && !self.input.contains(&b'\n')
    }

    /// Writes what the socket takes now. `false`: the client is gone.
    fn flush(&mut self, now: Instant) -> bool {
        while !self.output.is_empty() {
            let (front, _) = self.output.as_slices();
            match (&self.stream).write(front) {
                Ok(0) => return false,
                Ok(n) => {
                    self.output.drain(..n);
                    self.stalled_since = None;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    self.stalled_since.get_or_insert(now);
                    return true;
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return false,
            }
        }
        self.stalled_since = None;
        true
    }

    fn queue(&mut self, response: &Response) {
        let mut line = serde_json::to_vec(response).unwrap_or_default();
        line.push(b'\n');
        self.output.extend(line);
    }

    /// Reads what the client sent, up to what one request line may hold. `false`: read error.
    fn fill(&mut self) -> bool {
        let mut buf = [0u8; 4096];
        while self.input.len() <= API_MAX_LINE {
            match (&self.stream).read(&mut buf) {
                Ok(0) => {
                    self.eof = true;
                    break;
                }
                Ok(n) => self.input.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return false,
            }
        }
        true
    }

    /// The events wanted now: input only when requests can be taken, output while some waits.
    fn wanted(&self) -> EventSet {
        let mut set = EventSet::empty();
        if !self.eof
            && self.waiting.is_none()
            && self.output.len() < OUTPUT_HIGH_WATER
            && self.input.len() <= API_MAX_LINE
        {
            set |= EventSet::IN | EventSet::READ_HANG_UP;
        }
        if !self.output.is_empty() {
            set |= EventSet::OUT;
        }
        set
    }
}

/// Serves the control API of one VM.
pub struct ApiServer {
    listener: UnixListener,
    path: PathBuf,
    connections: HashMap<RawFd, Connection>,
    vm: Arc<dyn VmControl + Send + Sync>,
    /// Wakes the loop for waiting requests, stalled clients and a paused listener.
    timer: TimerFd,
    /// The listener is out of the loop until then (`accept` ran out of descriptors).
    accept_paused_until: Option<Instant>,
    accept_log: RateLimitedLog,
    refuse_log: RateLimitedLog,
}

/// Why the API socket could not be served. Each is one line for the user.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error("--api-sock {}: exists and is not a socket", .0.display())]
    NotASocket(PathBuf),
    #[error("--api-sock {}: another VMM is serving it", .0.display())]
    InUse(PathBuf),
    #[error("--api-sock {}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl ApiServer {
    /// Binds `path` (refusing to replace anything but a stale socket) with mode 0600.
    pub fn bind(path: &Path, vm: Arc<dyn VmControl + Send + Sync>) -> Result<Self, BindError> {
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            use std::os::unix::fs::FileTypeExt;
            if !meta.file_type().is_socket() {
                return Err(BindError::NotASocket(path.to_owned()));
            }
            if UnixStream::connect(path).is_ok() {
                return Err(BindError::InUse(path.to_owned()));
            }
            let _ = std::fs::remove_file(path);
        }
        let io = |source: std::io::Error| BindError::Io {
            path: path.to_owned(),
            source,
        };
        let listener = UnixListener::bind(path).map_err(io)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
        listener.set_nonblocking(true).map_err(io)?;
        let timer = TimerFd::new().map_err(|e| io(std::io::Error::from_raw_os_error(e.errno())))?;
        // Non-blocking: a connection's event in the same batch may re-arm (and so clear) it before
        // its own event is handled, and reading it must not then wait.
        crate::sys::os::set_nonblocking(timer.as_raw_fd()).map_err(io)?;
        Ok(ApiServer {
            listener,
            path: path.to_owned(),
            connections: HashMap::new(),
            vm,
            timer,
            accept_paused_until: None,
            accept_log: RateLimitedLog::default(),
            refuse_log: RateLimitedLog::default(),
        })
    }

    fn accept(&mut self, ops: &mut EventOps) {
        loop {
            let stream = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    // Out of descriptors (EMFILE, ENFILE) or memory: the connection stays queued and
                    // the listener stays readable, so looking again at once would spin. Step back.
                    self.accept_log.warn(|| {
                        format!(
                            "api: accept: {e}; not accepting for {} ms",
                            API_ACCEPT_BACKOFF.as_millis()
                        )
                    });
                    let _ = ops.remove(Events::new(&self.listener, EventSet::IN));
                    self.accept_paused_until = Some(Instant::now() + API_ACCEPT_BACKOFF);
                    return;
                }
            };
            // The socket file is 0600, but a file mode does not bind root or a descriptor passed
            // on: check who is on the other end.
            if peer_uid(stream.as_raw_fd()) != Some(current_uid()) {
                self.refuse_log
                    .warn(|| "api: refused a connection from another user".into());
                continue;
            }
            if self.connections.len() >= API_MAX_CONNECTIONS {
                self.refuse_log.warn(|| {
                    format!("api: {API_MAX_CONNECTIONS} connections are open; refused one more")
                });
                continue;
            }
            if stream.set_nonblocking(true).is_err() {
                continue;
            }
            let fd = stream.as_raw_fd();
            let interest = EventSet::IN | EventSet::READ_HANG_UP;
            if ops.add(Events::new(&stream, interest)).is_ok() {
                self.connections.insert(
                    fd,
                    Connection {
                        stream,
                        input: Vec::new(),
                        output: VecDeque::new(),
                        stalled_since: None,
                        waiting: None,
                        eof: false,
                        interest,
                    },
                );
            }
        }
    }

    /// Moves connection `fd` on as far as it can go now: writes waiting output, reads, takes
    /// requests, checks a waiting one. Returns false to close it.
    fn serve(&mut self, fd: RawFd, readable: bool, now: Instant) -> bool {
        let Some(conn) = self.connections.get_mut(&fd) else {
            return false;
        };
        if !conn.flush(now) {
            return false;
        }
        if readable && !conn.eof && !conn.fill() {
            return false;
        }
        loop {
            if let Some(w) = conn.waiting.as_mut() {
                match (w.check)() {
                    Some(r) => {
                        conn.waiting = None;
                        conn.queue(&Response::from_result(r));
                    }
                    None => break,
                }
            }
            if conn.output.len() >= OUTPUT_HIGH_WATER {
                break;
            }
            let Some(end) = conn.input.iter().position(|&b| b == b'\n') else {
                break;
            };
            let line: Vec<u8> = conn.input.drain(..=end).collect();
            if line.len() > API_MAX_LINE + 1 {
                conn.queue(&Response::err("bad request: line too long"));
                let _ = conn.flush(now);
                return false;
            }
            match std::str::from_utf8(&line) {
                Ok(text) => match start_line(self.vm.as_ref(), text.trim()) {
                    Ok(response) => conn.queue(&response),
                    Err(waiting) => conn.waiting = Some(waiting),
                },
                Err(_) => conn.queue(&Response::err("bad request: not UTF-8")),
            }
        }
        if conn.input.len() > API_MAX_LINE && !conn.input.contains(&b'\n') {
            conn.queue(&Response::err("bad request: line too long"));
            let _ = conn.flush(now);
            return false;
        }
        if !conn.flush(now) || conn.output.len() > API_MAX_OUTPUT_BYTES {
            return false;
        }
        if conn
            .stalled_since
            .is_some_and(|t| now.duration_since(t) >= API_STALL)
        {
            log::info!(
                "api: dropped a client that read none of its answers for {} s",
                API_STALL.as_secs()
            );
            return false;
        }
        !conn.finished()
    }

    /// Closes connection `fd`.
    fn close(&mut self, fd: RawFd, ops: &mut EventOps) {
        if let Some(conn) = self.connections.remove(&fd) {
            let _ = ops.remove(Events::new(&conn.stream, conn.interest));
        }
    }

    /// Registers each connection for the events it wants now, and sets the timer for the next thing
    /// that is due without an event: a waiting request's next check, a stall limit, the listener's
    /// return.
    fn rearm(&mut self, ops: &mut EventOps) {
        let now = Instant::now();
        let mut next: Option<Instant> = self.accept_paused_until;
        for conn in self.connections.values_mut() {
            let wanted = conn.wanted();
            if wanted != conn.interest && ops.modify(Events::new(&conn.stream, wanted)).is_ok() {
                conn.interest = wanted;
            }
            let due = if conn.waiting.is_some() {
                Some(now + WAITING_POLL)
            } else {
                conn.stalled_since.map(|t| t + API_STALL)
            };
            next = match (next, due) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
        }
        let after = next.map(|t| {
            t.saturating_duration_since(now)
                .max(Duration::from_micros(100))
        });
        let _ = match after {
            Some(d) => self.timer.reset(d, None),
            None => self.timer.clear(),
        };
    }

    /// The timer fired: resume accepting if it is time, and move every connection on.
    fn tick(&mut self, ops: &mut EventOps) {
        let _ = self.timer.wait();
        let now = Instant::now();
        if self.accept_paused_until.is_some_and(|t| now >= t) {
            self.accept_paused_until = None;
            let _ = ops.add(Events::new(&self.listener, EventSet::IN));
        }
        let fds: Vec<RawFd> = self.connections.keys().copied().collect();
        for fd in fds {
            if !self.serve(fd, false, now) {
                self.close(fd, ops);
            }
        }
    }
}

impl MutEventSubscriber for ApiServer {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        if fd == self.listener.as_raw_fd() {
            self.accept(ops);
        } else if fd == self.timer.as_raw_fd() {
            self.tick(ops);
        } else {
            let set = events.event_set();
            let readable = set.intersects(EventSet::IN | EventSet::READ_HANG_UP);
            if set.intersects(EventSet::ERROR | EventSet::HANG_UP)
                || !self.serve(fd, readable, Instant::now())
            {
                self.close(fd, ops);
            }
        }
        self.rearm(ops);
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.listener, EventSet::IN)) {
            log::error!("api: cannot watch the socket: {e:?}");
        }
        if let Err(e) = ops.add(Events::new(&self.timer, EventSet::IN)) {
            log::error!("api: cannot watch its timer: {e:?}");
        }
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}
