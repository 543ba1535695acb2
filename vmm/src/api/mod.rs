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

    pub fn err(msg: impl Into<String>) -> Self {
        Response {
            ok: false,
            result: None,
            error: Some(msg.into()),
        }
    }
}

/// What the API asks of a running VM. Each method answers at once (a refusal is an `Err` with one
/// line for the user) and never half-does a change.
pub trait VmControl {
    fn stats(&self) -> Value;
    fn pause(&self) -> Result<Value, String>;
    fn resume(&self) -> Result<Value, String>;
    fn vcpu_offline(&self, vcpu: u32) -> Result<Value, String>;
    fn vcpu_online(&self, vcpu: u32) -> Result<Value, String>;
    fn shutdown(&self) -> Result<Value, String>;
}

/// Why a live policy switch is refused (docs/api.md).
pub const SET_POLICY_REFUSAL: &str = "set-policy is refused: switching the placement policy of a running VM would have to move every queued timer and the hierarchy's events between schemes atomically with respect to all vCPUs; restart the VM with --policy instead";

/// Parses a request line strictly: a JSON object with a known `op` and exactly that op's fields.
/// (serde's `deny_unknown_fields` does not reach the unit variants of an internally tagged enum.)
pub fn parse_request(line: &str) -> Result<Request, String> {
    let value: Value = serde_json::from_str(line).map_err(|e| e.to_string())?;
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

/// Answers one request line.
pub fn handle_line(vm: &dyn VmControl, line: &str) -> Response {
    let request = match parse_request(line) {
        Ok(r) => r,
        Err(e) => return Response::err(format!("bad request: {e}")),
    };
    let answer = match request {
        Request::Stats => Ok(vm.stats()),
        Request::Pause => vm.pause(),
        Request::Resume => vm.resume(),
        Request::VcpuOffline { vcpu } => vm.vcpu_offline(vcpu),
        Request::VcpuOnline { vcpu } => vm.vcpu_online(vcpu),
        Request::SetPolicy { .. } => Err(SET_POLICY_REFUSAL.to_owned()),
        Request::Shutdown => vm.shutdown(),
    };
    match answer {
        Ok(v) => Response::ok(v),
        Err(e) => Response::err(e),
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
        fn pause(&self) -> Result<Value, String> {
            self.0.borrow_mut().push("pause".into());
            Ok(Value::Null)
        }
        fn resume(&self) -> Result<Value, String> {
            Err("not paused".into())
        }
        fn vcpu_offline(&self, vcpu: u32) -> Result<Value, String> {
            self.0.borrow_mut().push(format!("offline {vcpu}"));
            Ok(Value::Null)
        }
        fn vcpu_online(&self, _: u32) -> Result<Value, String> {
            Ok(Value::Null)
        }
        fn shutdown(&self) -> Result<Value, String> {
            Ok(Value::Null)
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
            Some("not paused")
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
            r#"["pause"]"#,
        ] {
            let r = handle_line(&vm, bad);
            assert!(!r.ok && r.error.is_some(), "{bad} was accepted");
        }
        assert!(vm.0.borrow().is_empty());
        assert!(!handle_line(&vm, r#"{"op":"set-policy","policy":"local"}"#).ok);
    }
}
