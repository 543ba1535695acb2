//! The VMM thread's event loop (`event-manager`): the VM's end, SIGTERM/SIGINT, `--timeout-ms`,
//! `--metrics`, and the API socket. vCPU threads never run here; the loop only reads shared state and
//! asks vCPU threads to act through kicks.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::timerfd::TimerFd;

use crate::api::server::ApiServer;
use crate::api::VmControl;

/// What the loop watches besides the VM's end.
pub struct LoopOptions {
    pub api_sock: Option<PathBuf>,
    pub metrics: Option<(PathBuf, Duration)>,
    pub timeout: Option<Duration>,
}

/// What the loop needs of the VM.
pub trait LoopTarget: VmControl + Send + Sync {
    /// The eventfd written when the VM ends.
    fn end_event(&self) -> &EventFd;
    /// Whether the VM has ended.
    fn ended(&self) -> bool;
    /// Ends the VM because of a signal.
    fn end_by_signal(&self, signal: i32);
    /// Ends the VM because `--timeout-ms` passed.
    fn end_by_timeout(&self);
    /// One line of counters for `--metrics`.
    fn metrics_line(&self) -> String;
}

/// Wakes the loop when the VM ends (the loop then sees `ended()`).
struct EndWatcher {
    target: Arc<dyn LoopTarget>,
}

impl MutEventSubscriber for EndWatcher {
    fn process(&mut self, _: Events, _: &mut EventOps) {
        let _ = self.target.end_event().read();
    }
    fn init(&mut self, ops: &mut EventOps) {
        let _ = ops.add(Events::new(self.target.end_event(), EventSet::IN));
    }
}

struct SignalWatcher {
    evt: EventFd,
    target: Arc<dyn LoopTarget>,
}

impl MutEventSubscriber for SignalWatcher {
    fn process(&mut self, _: Events, _: &mut EventOps) {
        let _ = self.evt.read();
        let sig = crate::sys::os::termination_signal().unwrap_or(libc::SIGTERM);
        log::info!("signal {sig}: shutting the VM down");
        self.target.end_by_signal(sig);
    }
    fn init(&mut self, ops: &mut EventOps) {
        let _ = ops.add(Events::new(&self.evt, EventSet::IN));
    }
}

struct TimeoutWatcher {
    timer: TimerFd,
    target: Arc<dyn LoopTarget>,
}

impl MutEventSubscriber for TimeoutWatcher {
    fn process(&mut self, _: Events, _: &mut EventOps) {
        let _ = self.timer.wait();
        self.target.end_by_timeout();
    }
    fn init(&mut self, ops: &mut EventOps) {
        let _ = ops.add(Events::new(&self.timer, EventSet::IN));
    }
}

/// Appends one JSON line of counters every period (like Firecracker's metrics file).
struct MetricsWriter {
    timer: TimerFd,
    file: std::fs::File,
    target: Arc<dyn LoopTarget>,
    errors: crate::limits::RateLimitedLog,
}

impl MetricsWriter {
    fn write_line(&mut self) {
        let line = self.target.metrics_line();
        if let Err(e) = writeln!(self.file, "{line}") {
            self.errors.warn(|| format!("metrics: {e}"));
        }
    }
}

impl MutEventSubscriber for MetricsWriter {
    fn process(&mut self, _: Events, _: &mut EventOps) {
        let _ = self.timer.wait();
        self.write_line();
    }
    fn init(&mut self, ops: &mut EventOps) {
        let _ = ops.add(Events::new(&self.timer, EventSet::IN));
    }
}

fn open_metrics(path: &Path) -> Result<std::fs::File, LoopError> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|source| LoopError::Metrics {
            path: path.to_owned(),
            source,
        })
}

/// Why the event loop could not be set up (before any vCPU runs). Each is one line for the user.
#[derive(Debug, thiserror::Error)]
pub enum LoopError {
    #[error("event loop: {0}")]
    EventManager(String),
    #[error("event loop: {0}")]
    Os(#[source] std::io::Error),
    #[error("cannot install the SIGTERM/SIGINT handler: {0}")]
    Signals(#[source] std::io::Error),
    #[error("--metrics {}: {source}", path.display())]
    Metrics {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Api(#[from] crate::api::server::BindError),
}

fn errno(e: vmm_sys_util::errno::Error) -> LoopError {
    LoopError::Os(std::io::Error::from_raw_os_error(e.errno()))
}

/// Runs the loop until the VM has ended. Errors are set-up failures (socket, files), reported before
/// any vCPU runs.
pub struct EventLoop {
    manager: EventManager<Box<dyn MutEventSubscriber + Send>>,
    target: Arc<dyn LoopTarget>,
    metrics_path: Option<PathBuf>,
}

impl EventLoop {
    pub fn new(target: Arc<dyn LoopTarget>, opts: &LoopOptions) -> Result<Self, LoopError> {
        let mut manager: EventManager<Box<dyn MutEventSubscriber + Send>> =
            EventManager::new().map_err(|e| LoopError::EventManager(format!("{e:?}")))?;
        manager.add_subscriber(Box::new(EndWatcher {
            target: Arc::clone(&target),
        }));
        let signals = EventFd::new(EFD_NONBLOCK).map_err(LoopError::Os)?;
        let for_handler = signals.try_clone().map_err(LoopError::Os)?;
        crate::sys::os::route_termination_signals(for_handler.as_raw_fd())
            .map_err(LoopError::Signals)?;
        // The handler may write to it until the process ends.
        std::mem::forget(for_handler);
        manager.add_subscriber(Box::new(SignalWatcher {
            evt: signals,
            target: Arc::clone(&target),
        }));
        if let Some(t) = opts.timeout {
            let mut timer = TimerFd::new().map_err(errno)?;
            timer.reset(t, None).map_err(errno)?;
            manager.add_subscriber(Box::new(TimeoutWatcher {
                timer,
                target: Arc::clone(&target),
            }));
        }
        if let Some((path, period)) = &opts.metrics {
            let file = open_metrics(path)?;
            let mut timer = TimerFd::new().map_err(errno)?;
            timer.reset(*period, Some(*period)).map_err(errno)?;
            manager.add_subscriber(Box::new(MetricsWriter {
                timer,
                file,
                target: Arc::clone(&target),
                errors: Default::default(),
            }));
        }
        if let Some(path) = &opts.api_sock {
            let control: Arc<dyn VmControl + Send + Sync> = target.clone();
            manager.add_subscriber(Box::new(ApiServer::bind(path, control)?));
        }
        Ok(EventLoop {
            manager,
            target,
            metrics_path: opts.metrics.as_ref().map(|(p, _)| p.clone()),
        })
    }

    /// Serves events until the VM has ended.
    pub fn run(&mut self) {
        let mut errors = crate::limits::RateLimitedLog::default();
        while !self.target.ended() {
            if let Err(e) = self.manager.run_with_timeout(1000) {
                errors.warn(|| format!("event loop: {e:?}"));
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        // A last metrics line with the final counters.
        if let Some(path) = &self.metrics_path {
            if let Ok(mut file) = open_metrics(path) {
                let _ = writeln!(file, "{}", self.target.metrics_line());
            }
        }
    }
}
