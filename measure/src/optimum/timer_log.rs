//! Reader of `quietvm run --timer-log PATH`: one JSON object per line, one line per arming when it
//! ended (docs/compare.md, "The optimum"):
//!
//! `{"owner":u32,"id":u32,"flags":"pinned"|"movable","armed_at_ns":u64,"deadline_ns":u64,
//! "slack_ns":u64,"outcome":"fired"|"cancelled"|"replaced"|"pending","at_ns":u64|null,
//! "fired_on":u32|null,"held":bool}`
//!
//! Times are the guest clock's ns; `slack_ns` is the slack quietvm applied; `at_ns` is the fire or
//! cancel time. The log is read as a stream, one line at a time, each at most [`MAX_LINE_BYTES`]: a
//! log of any length needs memory only for the fired windows. A line that is not such an object is
//! an error naming its number.

use std::fs::File;
use std::io::{BufRead, BufReader, Read as _};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{Optimum, OptimumBuilder};

/// Longest line accepted (a line of the format is under 300 bytes).
pub const MAX_LINE_BYTES: usize = 4096;

/// `flags`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Flags {
    Pinned,
    Movable,
}

/// How the arming ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Fired,
    Cancelled,
    Replaced,
    /// Still pending when the VM ended.
    Pending,
}

/// One line.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Entry {
    pub owner: u32,
    pub id: u32,
    pub flags: Flags,
    pub armed_at_ns: u64,
    pub deadline_ns: u64,
    pub slack_ns: u64,
    pub outcome: Outcome,
    pub at_ns: Option<u64>,
    pub fired_on: Option<u32>,
    /// Held back by callback serialization.
    pub held: bool,
}

/// Why a log could not be read. Each is one line.
#[derive(Debug, thiserror::Error)]
pub enum TimerLogError {
    #[error("cannot read the timer log {}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("timer log {}, line {line}: longer than {MAX_LINE_BYTES} bytes", path.display())]
    TooLong { path: PathBuf, line: u64 },
    #[error("timer log {}, line {line}: {message}", path.display())]
    Line {
        path: PathBuf,
        line: u64,
        message: String,
    },
}

/// What a timer log holds, and the optimum of its fired armings.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct TimerLogSummary {
    /// Armings (lines).
    pub armings: u64,
    pub fired: u64,
    pub cancelled: u64,
    pub replaced: u64,
    /// Pending when the VM ended.
    pub pending: u64,
    /// Marked `held` (held back by callback serialization).
    pub held: u64,
    /// Fired before their deadline (must be 0).
    pub early: u64,
    /// Fired more than `WINDOW_TOLERANCE_NS` (1 ms) after the end of their window, `deadline + slack`:
    /// the device's `late_beyond_window`, recomputed from outside (counted, not hidden).
    pub after_window: u64,
    /// Fired armings with a slack above 0.
    pub with_slack: u64,
    pub optimum: Optimum,
}

/// Feeds every entry of `reader` to `each`; `path` only names the log in errors.
pub fn read_entries<R: BufRead>(
    mut reader: R,
    path: &Path,
    mut each: impl FnMut(Entry),
) -> Result<(), TimerLogError> {
    let io = |source| TimerLogError::Io {
        path: path.to_owned(),
        source,
    };
    let mut buf = Vec::with_capacity(512);
    let mut line = 0u64;
    loop {
        buf.clear();
        // At most one byte more than the limit: a longer line is refused without reading it whole.
        let n = (&mut reader)
            .take(MAX_LINE_BYTES as u64 + 1)
            .read_until(b'\n', &mut buf)
            .map_err(io)?;
        if n == 0 {
            return Ok(());
        }
        line += 1;
        if buf.last() == Some(&b'\n') {
            buf.pop();
        } else if buf.len() > MAX_LINE_BYTES {
            return Err(TimerLogError::TooLong {
                path: path.to_owned(),
                line,
            });
        }
        if buf.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let bad = |message: String| TimerLogError::Line {
            path: path.to_owned(),
            line,
            message,
        };
        let e: Entry = serde_json::from_slice(&buf).map_err(|e| bad(e.to_string()))?;
        if e.outcome == Outcome::Fired && (e.at_ns.is_none() || e.fired_on.is_none()) {
            return Err(bad("a fired arming without at_ns or fired_on".to_string()));
        }
        each(e);
    }
}

/// Reads a whole log and computes its summary and optimum.
pub fn summarize<R: BufRead>(reader: R, path: &Path) -> Result<TimerLogSummary, TimerLogError> {
    let mut s = TimerLogSummary::default();
    let mut b = OptimumBuilder::new();
    read_entries(reader, path, |e| {
        s.armings += 1;
        s.held += e.held as u64;
        match e.outcome {
            Outcome::Fired => {
                s.fired += 1;
                let at = e.at_ns.unwrap_or(e.deadline_ns);
                s.early += (at < e.deadline_ns) as u64;
                let window_end = e.deadline_ns.saturating_add(e.slack_ns);
                s.after_window += (at.saturating_sub(window_end)
                    > quietvm_vmm::devices::timer::abi::WINDOW_TOLERANCE_NS)
                    as u64;
                s.with_slack += (e.slack_ns > 0) as u64;
                b.add(e.owner, e.flags == Flags::Pinned, e.deadline_ns, e.slack_ns);
            }
            Outcome::Cancelled => s.cancelled += 1,
            Outcome::Replaced => s.replaced += 1,
            Outcome::Pending => s.pending += 1,
        }
    })?;
    s.optimum = b.finish();
    Ok(s)
}

/// [`summarize`] of the file at `path`.
pub fn summarize_file(path: &Path) -> Result<TimerLogSummary, TimerLogError> {
    let f = File::open(path).map_err(|source| TimerLogError::Io {
        path: path.to_owned(),
        source,
    })?;
    summarize(BufReader::new(f), path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(owner: u32, flags: &str, deadline: u64, slack: u64, outcome: &str, at: &str) -> String {
        let fired_on = if outcome == "fired" { "0" } else { "null" };
        format!(
            r#"{{"owner":{owner},"id":{owner},"flags":"{flags}","armed_at_ns":1,"deadline_ns":{deadline},"slack_ns":{slack},"outcome":"{outcome}","at_ns":{at},"fired_on":{fired_on},"held":false}}"#
        )
    }

    fn sum(text: &str) -> Result<TimerLogSummary, TimerLogError> {
        summarize(text.as_bytes(), Path::new("t.jsonl"))
    }

    #[test]
    fn a_sample_log_gives_its_counts_and_optimum() {
        let text = [
            line(0, "movable", 1000, 500, "fired", "1400"),
            line(1, "movable", 1200, 500, "fired", "1400"),
            line(2, "movable", 3000, 0, "fired", "1003051"), // beyond its window by 1 ms + 1 ns
            line(0, "pinned", 1000, 0, "fired", "1000"),
            line(0, "pinned", 1000, 0, "fired", "1001001"), // beyond its window too
            line(1, "pinned", 5000, 0, "fired", "1005000"), // late by exactly the tolerance: not
            line(1, "pinned", 1000, 0, "fired", "1000"),
            line(3, "movable", 9000, 0, "cancelled", "8000"),
            line(3, "movable", 9000, 0, "replaced", "8500"),
            line(3, "movable", 9000, 0, "pending", "null"),
            String::new(),
        ]
        .join("\n");
        let s = sum(&text).unwrap();
        assert_eq!(
            (s.armings, s.fired, s.cancelled, s.replaced, s.pending),
            (10, 7, 1, 1, 1)
        );
        assert_eq!((s.early, s.after_window, s.with_slack), (0, 2, 2));
        // Movable: [1000,1500] and [1200,1700] share one; [3000,3000] another. Pinned: owner 0 one,
        // owner 1 two (1000 and 5000).
        assert_eq!(
            (s.optimum.movable, s.optimum.pinned, s.optimum.total),
            (2, 3, 5)
        );
    }

    #[test]
    fn early_firings_are_counted() {
        let s = sum(&line(0, "movable", 1000, 0, "fired", "999")).unwrap();
        assert_eq!(s.early, 1);
    }

    #[test]
    fn a_bad_line_is_an_error_naming_its_number() {
        let text = format!(
            "{}\n{{\"owner\":1}}\n",
            line(0, "movable", 1, 0, "fired", "1")
        );
        let e = sum(&text).unwrap_err().to_string();
        assert!(
            e.starts_with("timer log t.jsonl, line 2: missing field"),
            "{e}"
        );
        let e = sum("\n\nnot json\n").unwrap_err().to_string();
        assert!(e.contains("line 3:"), "{e}");
        let bad_flag = line(0, "sticky", 1, 0, "fired", "1");
        assert!(sum(&bad_flag)
            .unwrap_err()
            .to_string()
            .contains("line 1: unknown variant"));
        let negative = line(0, "movable", 1, 0, "fired", "-1");
        assert!(sum(&negative).unwrap_err().to_string().contains("line 1:"));
        let no_time = line(0, "movable", 1, 0, "fired", "null");
        assert!(sum(&no_time)
            .unwrap_err()
            .to_string()
            .contains("line 1: a fired arming without at_ns"));
    }

    #[test]
    fn a_line_longer_than_the_bound_is_refused_without_reading_it_whole() {
        let text = format!(
            "{}\n{}",
            line(0, "movable", 1, 0, "fired", "1"),
            "x".repeat(10 * MAX_LINE_BYTES)
        );
        let e = sum(&text).unwrap_err().to_string();
        assert_eq!(
            e,
            format!("timer log t.jsonl, line 2: longer than {MAX_LINE_BYTES} bytes")
        );
        // A line of exactly the bound, without a newline, is read (and here fails as JSON).
        let e = sum(&" ".repeat(MAX_LINE_BYTES - 1).replace(' ', "x")).unwrap_err();
        assert!(e.to_string().contains("line 1: expected value"), "{e}");
    }

    #[test]
    fn an_empty_log_is_empty() {
        assert_eq!(sum("").unwrap(), TimerLogSummary::default());
    }

    #[test]
    fn a_missing_file_is_one_line() {
        let e = summarize_file(Path::new("/nonexistent/quietvm.jsonl")).unwrap_err();
        assert!(e
            .to_string()
            .starts_with("cannot read the timer log /nonexistent/quietvm.jsonl"));
    }
}
