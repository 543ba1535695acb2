//! `quietvm ctl PATH REQUEST [ARG]`: sends one request to a VMM's API socket and prints the answer.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;

use super::{Request, Response};

/// Send one request to a running VMM's --api-sock and print its answer.
#[derive(Args, Debug)]
pub struct CtlArgs {
    /// The VMM's API socket (its --api-sock).
    pub socket: PathBuf,
    /// stats, pause, resume, vcpu-offline N, vcpu-online N, set-policy P, shutdown; or a raw JSON
    /// request with --raw.
    #[arg(required_unless_present = "raw")]
    pub request: Option<String>,
    /// The request's argument (a vCPU index or a policy).
    pub arg: Option<String>,
    /// Send this JSON line as it is (see docs/api.md).
    #[arg(long, conflicts_with = "request")]
    pub raw: Option<String>,
}

/// Why `quietvm ctl` could not ask. Each is one line for the user.
#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    #[error("{0} needs a vCPU index")]
    NoVcpu(String),
    #[error("{0}: the vCPU index must be a number")]
    BadVcpu(String),
    #[error("set-policy needs a policy")]
    NoPolicy,
    #[error("unknown request `{0}` (stats, pause, resume, vcpu-offline N, vcpu-online N, set-policy P, shutdown)")]
    UnknownRequest(String),
    #[error("cannot encode the request: {0}")]
    Encode(#[source] serde_json::Error),
    #[error("cannot connect to {}: {source}", path.display())]
    Connect {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("cannot send the request: {0}")]
    Send(#[source] std::io::Error),
    #[error("no answer: {0}")]
    NoAnswer(#[source] std::io::Error),
    #[error("the VMM closed the connection without answering")]
    Closed,
}

fn build(args: &CtlArgs) -> Result<String, CtlError> {
    if let Some(raw) = &args.raw {
        return Ok(raw.clone());
    }
    let verb = args.request.as_deref().unwrap_or_default();
    let vcpu = || -> Result<u32, CtlError> {
        args.arg
            .as_deref()
            .ok_or_else(|| CtlError::NoVcpu(verb.to_owned()))?
            .parse()
            .map_err(|_| CtlError::BadVcpu(verb.to_owned()))
    };
    let request = match verb {
        "stats" => Request::Stats,
        "pause" => Request::Pause,
        "resume" => Request::Resume,
        "shutdown" => Request::Shutdown,
        "vcpu-offline" => Request::VcpuOffline { vcpu: vcpu()? },
        "vcpu-online" => Request::VcpuOnline { vcpu: vcpu()? },
        "set-policy" => Request::SetPolicy {
            policy: args.arg.clone().ok_or(CtlError::NoPolicy)?,
        },
        other => return Err(CtlError::UnknownRequest(other.to_owned())),
    };
    serde_json::to_string(&request).map_err(CtlError::Encode)
}

/// Sends one request line and returns the response line.
pub fn send(socket: &std::path::Path, line: &str) -> Result<String, CtlError> {
    let mut stream = UnixStream::connect(socket).map_err(|source| CtlError::Connect {
        path: socket.to_owned(),
        source,
    })?;
    let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
    stream
        .write_all(format!("{}\n", line.trim()).as_bytes())
        .map_err(CtlError::Send)?;
    let mut answer = String::new();
    BufReader::new(stream)
        .read_line(&mut answer)
        .map_err(CtlError::NoAnswer)?;
    if answer.is_empty() {
        return Err(CtlError::Closed);
    }
    Ok(answer.trim_end().to_owned())
}

pub fn main(args: CtlArgs) -> ExitCode {
    let line = match build(&args) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("quietvm: error: {e}");
            return ExitCode::from(crate::exit_code::USAGE as u8);
        }
    };
    match send(&args.socket, &line) {
        Ok(answer) => {
            println!("{answer}");
            match serde_json::from_str::<Response>(&answer) {
                Ok(r) if r.ok => ExitCode::SUCCESS,
                _ => ExitCode::FAILURE,
            }
        }
        Err(e) => {
            eprintln!("quietvm: error: {e}");
            ExitCode::from(crate::exit_code::VMM_ERROR as u8)
        }
    }
}
