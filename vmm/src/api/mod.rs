//! The control API: one JSON request per line on a Unix socket, one JSON response per line
//! (docs/api.md). The server runs in the VMM's event loop ([`server::ApiServer`]); `quietvm ctl`
//! is the client ([`client`]).

pub mod client;
pub mod server;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A request, as sent on the socket: `{"op": "vcpu-offline", "vcpu": 3}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    /// The same figures as `--stats-json`, live.
    Stats,
    /// Stop every vCPU; no timer fires while paused.
    Pause,
    /// Run again; deadlines that passed meanwhile fire at once.
    Resume,
    /// Take a vCPU offline (the guest is told and acknowledges; its thread is parked).
    VcpuOffline { vcpu: u32 },
    /// Bring a parked vCPU back.
    VcpuOnline { vcpu: u32 },
    /// Switch the timer policy of the running VM.
    SetPolicy { policy: String },
    /// End the VM in order (stats are still written).
    Shutdown,
}

/// A response: `{"ok": true, "result": ...}` or `{"ok": false, "error": "..."}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub result: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub error: Option<String>,
}

impl Response {
    pub fn ok(result: Value) -> Self {
        Response {
            ok: true,
            result: Some(result),
            error: None,
        }
    }

    pub fn from_result(r: Result<Value, ControlError>) -> Self {
        match r {
            Ok(v) => Response::ok(v),
            Err(e) => Response::err(e.to_string()),
        }
    }

    pub fn err(msg: impl Into<String>) -> Self {
        Response {
            ok: false,
            result: None,
            error: Some(msg.into()),
        }
    }
}

/// A request that waits for the vCPU threads or the guest (pause, hotplug). The event loop never
/// waits for it: it calls `check` again whenever it looks (about every millisecond while any such
/// request is open), and `check` returns the answer once there is one. `check` keeps its own deadline
/// and must return an answer by it (or as soon as the VM is ending).
pub struct Waiting {
    pub check: Box<dyn FnMut() -> Option<Result<Value, ControlError>> + Send>,
}

/// The answer to a request: at once, or later ([`Waiting`]).
pub enum Answer {
    Now(Result<Value, ControlError>),
    Later(Waiting),
}

impl From<Result<Value, ControlError>> for Answer {
    fn from(r: Result<Value, ControlError>) -> Self {
        Answer::Now(r)
    }
}

impl From<ControlError> for Answer {
    fn from(e: ControlError) -> Self {
        Answer::Now(Err(e))
    }
}

/// Why the VM refused or could not carry out a request. Each is the one line the client prints.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ControlError {
    #[error("bad request: {0}")]
    BadRequest(String),
    #[error("{SET_POLICY_REFUSAL}")]
    SetPolicyRefused,
    #[error("no vCPU {vcpu}: the VM has {count} (0..{last})", last = count - 1)]
    NoSuchVcpu { vcpu: u32, count: u32 },
    #[error("vCPU hotplug needs quietvm's timer device; this VM runs {0}")]
    NoHotplug(String),
    #[error("the VM is already paused")]
    AlreadyPaused,
    #[error("the VM is not paused")]
    NotPaused,
    #[error("not every vCPU stopped within 2 s; the VM keeps running")]
    PauseTimedOut,
    #[error("the VM is ending")]
    Ending,
    #[error("vCPU 0 cannot go offline")]
    Vcpu0Stays,
    #[error("the VM is paused: resume it first")]
    Paused,
    #[error("vCPU {0} is already offline")]
    AlreadyOffline(u32),
    #[error("vCPU {0} is already being taken offline")]
    GoingOffline(u32),
    #[error("the last online vCPU cannot go offline")]
    LastOnline,
    #[error("the guest did not acknowledge taking vCPU {0} offline within 2 s (it acknowledges at its next halt); the request is withdrawn")]
    NotAcknowledged(u32),
    #[error("vCPU {0} acknowledged but did not leave within 2 s")]
    DidNotLeave(u32),
    #[error("vCPU {0} is already online")]
    AlreadyOnline(u32),
    #[error("vCPU {0} is already coming online")]
    ComingOnline(u32),
    #[error("vCPU {0} did not come back within 2 s")]
    NotBack(u32),
}

/// What the API asks of a running VM. A refusal is an `Err` with one line for the user; no request is
/// ever half-done. No method blocks: what must wait is an [`Answer::Later`].
pub trait VmControl {
    fn stats(&self) -> Value;
    fn pause(&self) -> Answer;
    fn resume(&self) -> Answer;
    fn vcpu_offline(&self, vcpu: u32) -> Answer;
    fn vcpu_online(&self, vcpu: u32) -> Answer;
    fn shutdown(&self) -> Answer;
}

/// A JSON value parsed strictly: an object with a key twice is refused (serde_json would keep the
/// last one, so `{"op":"stats","op":"shutdown"}` would mean what a reader of the first key did not
/// expect).
struct StrictValue(Value);

impl<'de> serde::Deserialize<'de> for StrictValue {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(StrictVisitor).map(StrictValue)
    }
}

struct StrictVisitor;

impl<'de> serde::de::Visitor<'de> for StrictVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut v = Vec::new();
        while let Some(StrictValue(x)) = seq.next_element()? {
            v.push(x);
        }
        Ok(Value::Array(v))
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut m = serde_json::Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if m.contains_key(&key) {
                return Err(serde::de::Error::custom(format!("duplicate key `{key}`")));
            }
            let StrictValue(v) = map.next_value()?;
            m.insert(key, v);
        }
        Ok(Value::Object(m))
    }
}

/// Why a live policy switch is refused (docs/api.md).
pub const SET_POLICY_REFUSAL: &str = "set-policy is refused: switching the placement policy of a running VM would have to move every queued timer and the hierarchy's events between schemes atomically with respect to all vCPUs; restart the VM with --policy instead";

/// Parses a request line strictly: a JSON object with a known `op` and exactly that op's fields.
/// (serde's `deny_unknown_fields` does not reach the unit variants of an internally tagged enum.)
pub fn parse_request(line: &str) -> Result<Request, String> {
    let StrictValue(value) = serde_json::from_str(line).map_err(|e| e.to_string())?;
    let object = value.as_object().ok_or("a request is a JSON object")?;
    let op = object
        .get("op")
        .and_then(Value::as_str)
        .ok_or("missing \"op\"")?;
    let allowed: &[&str] = match op {
        "vcpu-offline" | "vcpu-online" => &["op", "vcpu"],
        "set-policy" => &["op", "policy"],
        _ => &["op"],
    };
    if let Some(extra) = object.keys().find(|k| !allowed.contains(&k.as_str())) {
        return Err(format!("unknown field `{extra}` for {op}"));
    }
    serde_json::from_value(value).map_err(|e| e.to_string())
}

/// Starts answering one request line: the response now, or a [`Waiting`] request.
pub fn start_line(vm: &dyn VmControl, line: &str) -> Result<Response, Waiting> {
    let request = match parse_request(line) {
        Ok(r) => r,
        Err(e) => return Ok(Response::from_result(Err(ControlError::BadRequest(e)))),
    };
    let answer = match request {
        Request::Stats => Answer::Now(Ok(vm.stats())),
        Request::Pause => vm.pause(),
        Request::Resume => vm.resume(),
        Request::VcpuOffline { vcpu } => vm.vcpu_offline(vcpu),
        Request::VcpuOnline { vcpu } => vm.vcpu_online(vcpu),
        Request::SetPolicy { .. } => ControlError::SetPolicyRefused.into(),
        Request::Shutdown => vm.shutdown(),
    };
    match answer {
        Answer::Now(r) => Ok(Response::from_result(r)),
        Answer::Later(w) => Err(w),
    }
}

/// Answers one request line, waiting (here, on the calling thread) for a request that must wait:
/// for tests and tools, never for the event loop.
pub fn handle_line(vm: &dyn VmControl, line: &str) -> Response {
    match start_line(vm, line) {
        Ok(r) => r,
        Err(mut w) => loop {
            if let Some(r) = (w.check)() {
                return Response::from_result(r);
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    #[derive(Default)]
    struct Recorder(RefCell<Vec<String>>);

    impl VmControl for Recorder {
        fn stats(&self) -> Value {
            Value::from("stats")
        }
        fn pause(&self) -> Answer {
            self.0.borrow_mut().push("pause".into());
            Ok(Value::Null).into()
        }
        fn resume(&self) -> Answer {
            ControlError::NotPaused.into()
        }
        fn vcpu_offline(&self, vcpu: u32) -> Answer {
            self.0.borrow_mut().push(format!("offline {vcpu}"));
            Ok(Value::Null).into()
        }
        fn vcpu_online(&self, _: u32) -> Answer {
            Ok(Value::Null).into()
        }
        fn shutdown(&self) -> Answer {
            Ok(Value::Null).into()
        }
    }

    #[test]
    fn requests_parse_and_dispatch() {
        let vm = Recorder::default();
        assert!(handle_line(&vm, r#"{"op":"pause"}"#).ok);
        assert!(handle_line(&vm, r#"{"op":"vcpu-offline","vcpu":3}"#).ok);
        assert_eq!(*vm.0.borrow(), ["pause", "offline 3"]);
        assert_eq!(
            handle_line(&vm, r#"{"op":"stats"}"#).result,
            Some(Value::from("stats"))
        );
        assert_eq!(
            handle_line(&vm, r#"{"op":"resume"}"#).error.as_deref(),
            Some("the VM is not paused")
        );
    }

    #[test]
    fn malformed_and_unknown_requests_are_errors_that_change_nothing() {
        let vm = Recorder::default();
        for bad in [
            "",
            "not json",
            r#"{"op":"reboot"}"#,
            r#"{"op":"vcpu-offline"}"#,
            r#"{"op":"vcpu-offline","vcpu":-1}"#,
            r#"{"op":"pause","extra":1}"#,
            r#"{"op":"stats","op":"pause"}"#,
            r#"{"op":"vcpu-offline","vcpu":1,"vcpu":2}"#,
            r#"["pause"]"#,
        ] {
            let r = handle_line(&vm, bad);
            assert!(!r.ok && r.error.is_some(), "{bad} was accepted");
        }
        assert!(vm.0.borrow().is_empty());
        assert!(!handle_line(&vm, r#"{"op":"set-policy","policy":"local"}"#).ok);
    }
}
