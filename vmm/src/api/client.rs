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

fn build(args: &CtlArgs) -> Result<String, String> {
    if let Some(raw) = &args.raw {
        return Ok(raw.clone());
    }
    let verb = args.request.as_deref().unwrap_or_default();
    let vcpu = || -> Result<u32, String> {
        args.arg
            .as_deref()
            .ok_or(format!("{verb} needs a vCPU index"))?
            .parse()
            .map_err(|_| format!("{verb}: the vCPU index must be a number"))
    };
    let request = match verb {
        "stats" => Request::Stats,
        "pause" => Request::Pause,
        "resume" => Request::Resume,
        "shutdown" => Request::Shutdown,
        "vcpu-offline" => Request::VcpuOffline { vcpu: vcpu()? },
        "vcpu-online" => Request::VcpuOnline { vcpu: vcpu()? },
        "set-policy" => Request::SetPolicy {
            policy: args.arg.clone().ok_or("set-policy needs a policy")?,
        },
        other => return Err(format!("unknown request `{other}` (stats, pause, resume, vcpu-offline N, vcpu-online N, set-policy P, shutdown)")),
    };
    serde_json::to_string(&request).map_err(|e| e.to_string())
}

/// Sends one request line and returns the response line.
pub fn send(socket: &std::path::Path, line: &str) -> Result<String, String> {
    let mut stream = UnixStream::connect(socket)
        .map_err(|e| format!("cannot connect to {}: {e}", socket.display()))?;
    let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
    stream
        .write_all(format!("{}\n", line.trim()).as_bytes())
        .map_err(|e| format!("cannot send the request: {e}"))?;
    let mut answer = String::new();
    BufReader::new(stream)
        .read_line(&mut answer)
        .map_err(|e| format!("no answer: {e}"))?;
    if answer.is_empty() {
        return Err("the VMM closed the connection without answering".into());
    }
    Ok(answer.trim_end().to_owned())
}

pub fn main(args: CtlArgs) -> ExitCode {
    let line = match build(&args) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("quietvm: error: {e}");
            return ExitCode::from(2);
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
