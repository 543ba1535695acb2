//! The API socket as an `event-manager` subscriber: accepts connections from the VMM owner's user
//! only, reads request lines, answers each with one response line.

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};

use super::{handle_line, Response, VmControl};
use crate::sys::os::{current_uid, peer_uid};

/// The longest request line accepted; a longer one closes the connection.
const MAX_LINE: usize = 64 * 1024;

struct Connection {
    stream: UnixStream,
    pending: Vec<u8>,
}

/// Serves the control API of one VM.
pub struct ApiServer {
    listener: UnixListener,
    path: PathBuf,
    connections: HashMap<RawFd, Connection>,
    vm: Arc<dyn VmControl + Send + Sync>,
}

impl ApiServer {
    /// Binds `path` (refusing to replace anything but a stale socket) with mode 0600.
    pub fn bind(path: &Path, vm: Arc<dyn VmControl + Send + Sync>) -> Result<Self, String> {
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            use std::os::unix::fs::FileTypeExt;
            if !meta.file_type().is_socket() {
                return Err(format!(
                    "--api-sock {}: exists and is not a socket",
                    path.display()
                ));
            }
            if UnixStream::connect(path).is_ok() {
                return Err(format!(
                    "--api-sock {}: another VMM is serving it",
                    path.display()
                ));
            }
            let _ = std::fs::remove_file(path);
        }
        let listener =
            UnixListener::bind(path).map_err(|e| format!("--api-sock {}: {e}", path.display()))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| format!("--api-sock {}: {e}", path.display()))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| format!("--api-sock {}: {e}", path.display()))?;
        Ok(ApiServer {
            listener,
            path: path.to_owned(),
            connections: HashMap::new(),
            vm,
        })
    }

    fn accept(&mut self, ops: &mut EventOps) {
        loop {
            let stream = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) => {
                    log::warn!("api: accept: {e}");
                    return;
                }
            };
            // The socket file is 0600, but a file mode does not bind root or a descriptor passed
            // on: check who is on the other end.
            if peer_uid(stream.as_raw_fd()) != Some(current_uid()) {
                log::warn!("api: refused a connection from another user");
                continue;
            }
            if stream.set_nonblocking(true).is_err() {
                continue;
            }
            let fd = stream.as_raw_fd();
            if ops
                .add(Events::new(&stream, EventSet::IN | EventSet::READ_HANG_UP))
                .is_ok()
            {
                self.connections.insert(
                    fd,
                    Connection {
                        stream,
                        pending: Vec::new(),
                    },
                );
            }
        }
    }

    /// Reads what `fd` sent and answers every complete line. Returns false to close it.
    fn serve(&mut self, fd: RawFd) -> bool {
        let Some(conn) = self.connections.get_mut(&fd) else {
            return false;
        };
        let mut buf = [0u8; 4096];
        let mut open = true;
        loop {
            match conn.stream.read(&mut buf) {
                Ok(0) => {
                    open = false;
                    break;
                }
                Ok(n) => conn.pending.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => return false,
            }
        }
        while let Some(end) = conn.pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = conn.pending.drain(..=end).collect();
            let response = match std::str::from_utf8(&line) {
                Ok(text) => handle_line(self.vm.as_ref(), text.trim()),
                Err(_) => Response::err("bad request: not UTF-8"),
            };
            if !reply(&conn.stream, &response) {
                return false;
            }
        }
        if conn.pending.len() > MAX_LINE {
            let _ = reply(&conn.stream, &Response::err("bad request: line too long"));
            return false;
        }
        open
    }
}

/// Writes one response line; the socket is made blocking with a timeout for the write, so a large
/// `stats` answer is not cut short and a client that does not read cannot stall the VMM.
fn reply(stream: &UnixStream, response: &Response) -> bool {
    let mut line = serde_json::to_vec(response).unwrap_or_default();
    line.push(b'\n');
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_write_timeout(Some(Duration::from_secs(2)));
    let ok = (&*stream).write_all(&line).is_ok();
    let _ = stream.set_nonblocking(true);
    ok
}

impl MutEventSubscriber for ApiServer {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        if fd == self.listener.as_raw_fd() {
            self.accept(ops);
            return;
        }
        if !self.serve(fd) || events.event_set().contains(EventSet::READ_HANG_UP) {
            if let Some(conn) = self.connections.remove(&fd) {
                let _ = ops.remove(Events::new(
                    &conn.stream,
                    EventSet::IN | EventSet::READ_HANG_UP,
                ));
            }
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.listener, EventSet::IN)) {
            log::error!("api: cannot watch the socket: {e:?}");
        }
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}
