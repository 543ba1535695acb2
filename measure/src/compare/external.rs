//! `quietvm compare --external PID`: measures another running VMM from outside by the same kernel
//! counters quietvm's own figures are checked against: per thread, voluntary context switches (each
//! one a sleep that ended in a wakeup), schedstat CPU time, and the process's CPU time.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use quietvm_vmm::stats::ThreadCounters;

struct Sample {
    at: Instant,
    threads: BTreeMap<u32, (String, ThreadCounters)>,
    /// utime and stime of the process, in clock ticks (`/proc/PID/stat` fields 14 and 15).
    cpu_ticks: (u64, u64),
}

fn sample(pid: u32) -> Result<Sample, String> {
    let dir = format!("/proc/{pid}/task");
    let entries = std::fs::read_dir(&dir).map_err(|e| format!("cannot read {dir}: {e}"))?;
    let mut threads = BTreeMap::new();
    for entry in entries.flatten() {
        let Some(tid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let name = std::fs::read_to_string(format!("{dir}/{tid}/comm"))
            .map(|s| s.trim().to_owned())
            .unwrap_or_default();
        if let Some(c) = ThreadCounters::read(pid, tid) {
            threads.insert(tid, (name, c));
        }
    }
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map_err(|e| format!("cannot read /proc/{pid}/stat: {e}"))?;
    // The command name (field 2) may contain spaces: count fields after its closing parenthesis.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let tick = |i: usize| fields.get(i).and_then(|f| f.parse().ok()).unwrap_or(0);
    Ok(Sample {
        at: Instant::now(),
        threads,
        cpu_ticks: (tick(11), tick(12)),
    })
}

pub fn main(pid: u32, seconds: f64) -> ExitCode {
    if !(seconds > 0.0 && seconds.is_finite()) {
        eprintln!("quietvm: error: --seconds must be a positive number");
        return ExitCode::from(2);
    }
    let start = match sample(pid) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("quietvm: error: process {pid}: {e}");
            return ExitCode::from(quietvm_vmm::exit_code::VMM_ERROR as u8);
        }
    };
    eprintln!("quietvm compare: sampling process {pid} for {seconds} s ...");
    std::thread::sleep(Duration::from_secs_f64(seconds));
    let end = match sample(pid) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("quietvm: error: process {pid} ended while sampled: {e}");
            return ExitCode::from(quietvm_vmm::exit_code::VMM_ERROR as u8);
        }
    };
    let secs = end.at.duration_since(start.at).as_secs_f64();
    // /proc reports CPU time in USER_HZ ticks, which is 100 on x86-64 whatever the kernel's HZ.
    let hz = 100.0;
    println!("process {pid}: {secs:.2} s sampled from /proc (kernel counters)");
    println!(
        "{:>8} {:<16} {:>12} {:>12} {:>10}",
        "tid", "thread", "wakeups", "wakeups/s", "cpu %"
    );
    let mut total = 0;
    for (tid, (name, c1)) in &end.threads {
        let Some((_, c0)) = start.threads.get(tid) else {
            continue; // started during the window: no baseline
        };
        let d = c1.since(c0);
        total += d.voluntary_switches;
        println!(
            "{:>8} {:<16} {:>12} {:>12.1} {:>9.1}%",
            tid,
            name,
            d.voluntary_switches,
            d.voluntary_switches as f64 / secs,
            d.cpu_ns as f64 / 1e9 / secs * 100.0
        );
    }
    let user = (end.cpu_ticks.0.saturating_sub(start.cpu_ticks.0)) as f64 / hz;
    let system = (end.cpu_ticks.1.saturating_sub(start.cpu_ticks.1)) as f64 / hz;
    println!(
        "all threads: {total} wakeups ({:.1}/s); process CPU: user {:.0} ms, system {:.0} ms",
        total as f64 / secs,
        user * 1e3,
        system * 1e3
    );
    ExitCode::SUCCESS
}
