//! The text of `/sys/kernel/tracing/trace` (and `trace-cmd report`, which prints the same event
//! lines after a few header lines of its own) turned into [`Record`]s.
//!
//! An event line is `TASK-PID [CPU] FLAGS TIMESTAMP: EVENT: FIELDS`, where the task name may hold
//! spaces and `FLAGS` (the latency columns, `dNs1.`) may be missing. Comment lines (`#`), empty
//! lines, stack-trace lines (`=>`), the overrun marker `CPU:N [LOST M EVENTS]` (counted) and
//! `trace-cmd`'s header lines (`cpus=N`, `version = N`, `CPU N is empty`, `CPUN data recorded at
//! ...`) are accepted; events this module does not know are kept as [`Ev::Unknown`] (skipped and
//! counted by the replay). Anything else, and a known event whose fields do not parse, is an error
//! naming the line.

use std::fmt;

/// `cpu_idle`'s `state` on idle exit (`PWR_EVENT_EXIT`, `(u32)-1`).
pub const IDLE_EXIT_STATE: u64 = 4_294_967_295;

/// A line that could not be parsed: its number (1-based), what is wrong, and the text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError {
    pub line: usize,
    pub what: String,
    pub text: String,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut text: String = self.text.chars().take(160).collect();
        if text.len() < self.text.len() {
            text.push_str("...");
        }
        write!(f, "line {}: {}: {:?}", self.line, self.what, text)
    }
}

/// The flags of `timer_start` that matter here.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TimerFlags {
    /// `P`: `TIMER_PINNED`.
    pub pinned: bool,
    /// `D`: `TIMER_DEFERRABLE`.
    pub deferrable: bool,
    /// `I`: `TIMER_IRQSAFE`.
    pub irqsafe: bool,
}

/// A parsed event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ev {
    /// `timer:timer_start`: `timer` queued on `base_cpu`'s wheel to expire at jiffy `expires`, in
    /// the wheel bucket that expires at jiffy `bucket_expiry` (`expires + 1` when not printed,
    /// before Linux 5.9); `now` is the jiffies value when it was armed (`expires - timeout`).
    TimerStart {
        timer: u64,
        expires: u64,
        bucket_expiry: u64,
        now: u64,
        base_cpu: u32,
        flags: TimerFlags,
    },
    /// `timer:timer_cancel`: `timer` was taken off its wheel (a cancel, a re-arm, or just before its
    /// callback runs: the kernel's `detach_timer` traces all three).
    TimerCancel { timer: u64 },
    /// `timer:timer_expire_entry`: `timer`'s callback starts, at jiffy `now`.
    TimerExpire { timer: u64, now: u64 },
    /// `power:cpu_idle`: CPU `cpu` enters idle state `state`, or leaves idle
    /// (`state == IDLE_EXIT_STATE`).
    CpuIdle { state: u64, cpu: u32 },
    /// `timer:tick_stop`.
    TickStop { success: bool },
    /// `timer_migration:tmigr_cpu_idle`: `cpu` went idle in the kernel's hierarchy.
    TmigrCpuIdle { cpu: u32 },
    /// `timer_migration:tmigr_cpu_active`: `cpu` became active in the hierarchy.
    TmigrCpuActive { cpu: u32 },
    /// `timer_migration:tmigr_handle_remote_cpu`: the migrator handles idle `cpu`'s timers.
    TmigrHandleRemoteCpu { cpu: u32 },
    /// `timer_migration:tmigr_handle_remote`: a migrator walks a group for remote expiry.
    TmigrHandleRemote,
    /// Another `timer_migration:*` event (counted).
    TmigrOther(String),
    /// Any other event (skipped and counted).
    Unknown(String),
}

/// One event line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// 1-based line number in the file.
    pub line: usize,
    /// The CPU that recorded it (`[NNN]`).
    pub cpu: u32,
    /// Its timestamp in nanoseconds (the trace clock's seconds, as printed).
    pub ts_ns: u64,
    pub ev: Ev,
}

/// A whole trace file.
#[derive(Debug, Clone, Default)]
pub struct ParsedTrace {
    pub records: Vec<Record>,
    /// Lines read.
    pub lines: usize,
    /// CPU count from the header (`#P:N` or `cpus=N`), if it had one.
    pub header_cpus: Option<u32>,
    /// Events the ring buffer dropped (`[LOST N EVENTS]` lines).
    pub lost_events: u64,
}

/// Parses a whole trace text.
pub fn parse_trace(text: &str) -> Result<ParsedTrace, ParseError> {
    let mut out = ParsedTrace::default();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        out.lines = line;
        match parse_line(raw, line)? {
            Line::Record(r) => out.records.push(r),
            Line::Cpus(n) => out.header_cpus = Some(n),
            Line::Lost(n) => out.lost_events += n,
            Line::Skip => {}
        }
    }
    Ok(out)
}

/// What one line was.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Line {
    Record(Record),
    /// A header line giving the CPU count.
    Cpus(u32),
    /// An overrun marker: this many events were lost.
    Lost(u64),
    /// A comment, header or stack line.
    Skip,
}

fn err(line: usize, what: impl Into<String>, text: &str) -> ParseError {
    ParseError {
        line,
        what: what.into(),
        text: text.trim_end().to_string(),
    }
}

/// Parses one line (`line` is its 1-based number, for errors).
pub fn parse_line(raw: &str, line: usize) -> Result<Line, ParseError> {
    let t = raw.trim();
    if t.is_empty() || t.starts_with("=>") {
        return Ok(Line::Skip);
    }
    if let Some(rest) = t.strip_prefix('#') {
        // `# entries-in-buffer/entries-written: 426/426   #P:2`
        if let Some(p) = rest.find("#P:") {
            let n = rest[p + 3..].trim();
            if let Ok(n) = n.parse::<u32>() {
                return Ok(Line::Cpus(n));
            }
        }
        return Ok(Line::Skip);
    }
    if let Some(n) = lost_marker(t) {
        return Ok(Line::Lost(n));
    }
    if let Some(n) = t.strip_prefix("cpus=") {
        return match n.trim().parse::<u32>() {
            Ok(n) => Ok(Line::Cpus(n)),
            Err(_) => Err(err(line, "bad cpus= header", raw)),
        };
    }
    if t.starts_with("version =") || trace_cmd_cpu_header(t) {
        return Ok(Line::Skip);
    }
    let Some((cpu, after)) = cpu_field(t) else {
        return Err(err(line, "not a trace event line (no [CPU] field)", raw));
    };
    // Optional latency flags, then `SECONDS.FRACTION:`.
    let after = after.trim_start();
    let (first, rest) = split_token(after);
    let (ts_tok, rest) = if first.ends_with(':') {
        (first, rest)
    } else {
        split_token(rest)
    };
    let Some(ts_ns) = ts_tok.strip_suffix(':').and_then(parse_timestamp) else {
        return Err(err(line, "no timestamp after the [CPU] field", raw));
    };
    let rest = rest.trim_start();
    let (name_tok, fields) = split_token(rest);
    let (name, fields) = match name_tok.strip_suffix(':') {
        Some(n) if !n.is_empty() => (n, fields),
        _ => (rest, ""),
    };
    if name.is_empty() {
        return Err(err(line, "no event name after the timestamp", raw));
    }
    let ev = parse_event(name, fields).map_err(|what| err(line, what, raw))?;
    Ok(Line::Record(Record {
        line,
        cpu,
        ts_ns,
        ev,
    }))
}

/// `CPU:1 [LOST 123 EVENTS]` (ftrace) or `CPU 1 [LOST 123 EVENTS]`.
fn lost_marker(t: &str) -> Option<u64> {
    let p = t.find("[LOST ")?;
    if !t.starts_with("CPU") {
        return None;
    }
    let n = t[p + 6..].split_whitespace().next()?;
    n.parse().ok()
}

/// `CPU 0 is empty`, `CPU0 data recorded at offset=0x...`, `    12288 bytes in size` (trace-cmd).
fn trace_cmd_cpu_header(t: &str) -> bool {
    (t.starts_with("CPU") && (t.ends_with("is empty") || t.contains("data recorded at offset")))
        || t.ends_with("bytes in size")
}

/// Finds the first `[digits]` followed by white space: the CPU and what follows it.
fn cpu_field(t: &str) -> Option<(u32, &str)> {
    let bytes = t.as_bytes();
    let mut from = 0;
    while let Some(p) = t[from..].find('[') {
        let open = from + p;
        let close = t[open..].find(']').map(|c| open + c)?;
        let inner = &t[open + 1..close];
        let next_ok = bytes.get(close + 1).is_none_or(|b| b.is_ascii_whitespace());
        let digits =
            !inner.is_empty() && inner.len() <= 6 && inner.bytes().all(|b| b.is_ascii_digit());
        if digits && next_ok {
            return Some((inner.parse().ok()?, &t[close + 1..]));
        }
        from = open + 1;
    }
    None
}

fn split_token(s: &str) -> (&str, &str) {
    let s = s.trim_start();
    match s.find(char::is_whitespace) {
        Some(p) => (&s[..p], &s[p..]),
        None => (s, ""),
    }
}

/// `2105.173921` (up to 9 fraction digits) in nanoseconds.
fn parse_timestamp(s: &str) -> Option<u64> {
    let (sec, frac) = s.split_once('.').unwrap_or((s, ""));
    if sec.is_empty() || frac.len() > 9 || !sec.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let sec: u64 = sec.parse().ok()?;
    let mut ns: u64 = if frac.is_empty() {
        0
    } else {
        frac.parse().ok()?
    };
    for _ in frac.len()..9 {
        ns *= 10;
    }
    sec.checked_mul(1_000_000_000)?.checked_add(ns)
}

/// The value of `key=` among white-space separated fields (`[timeout=25]` counts: brackets are
/// stripped). `Some("")` for a field printed empty (`flags=` at the end of `timer_start`).
pub fn field<'a>(fields: &'a str, key: &str) -> Option<&'a str> {
    fields.split_whitespace().find_map(|tok| {
        let tok = tok.trim_start_matches('[').trim_end_matches(']');
        tok.strip_prefix(key)?.strip_prefix('=')
    })
}

fn need<'a>(fields: &'a str, key: &str, event: &str) -> Result<&'a str, String> {
    field(fields, key).ok_or_else(|| format!("{event} without {key}="))
}

fn num<T: std::str::FromStr>(fields: &str, key: &str, event: &str) -> Result<T, String> {
    let v = need(fields, key, event)?;
    v.parse()
        .map_err(|_| format!("{event}: {key}={v:?} is not a number"))
}

/// A `%p` pointer as printed (hashed or not): hexadecimal, optional `0x`.
fn pointer(fields: &str, key: &str, event: &str) -> Result<u64, String> {
    let v = need(fields, key, event)?;
    let h = v.strip_prefix("0x").unwrap_or(v);
    u64::from_str_radix(h, 16).map_err(|_| format!("{event}: {key}={v:?} is not a hex pointer"))
}

fn parse_flags(s: &str) -> Result<TimerFlags, String> {
    let mut f = TimerFlags::default();
    for part in s.split('|').filter(|p| !p.is_empty()) {
        match part {
            "P" => f.pinned = true,
            "D" => f.deferrable = true,
            "I" => f.irqsafe = true,
            "M" => {}
            // Older kernels print the raw flags word in hex.
            _ => match u64::from_str_radix(part.trim_start_matches("0x"), 16) {
                Ok(v) => {
                    f.deferrable |= v & 0x0008_0000 != 0;
                    f.pinned |= v & 0x0010_0000 != 0;
                    f.irqsafe |= v & 0x0020_0000 != 0;
                }
                Err(_) => return Err(format!("timer_start: unknown flag {part:?}")),
            },
        }
    }
    Ok(f)
}

fn parse_event(name: &str, f: &str) -> Result<Ev, String> {
    Ok(match name {
        "timer_start" => {
            let expires: u64 = num(f, "expires", name)?;
            let timeout: i64 = num(f, "timeout", name)?;
            let now = i128::from(expires) - i128::from(timeout);
            let now = u64::try_from(now).map_err(|_| format!("{name}: timeout out of range"))?;
            let bucket_expiry = match field(f, "bucket_expiry") {
                Some(_) => num(f, "bucket_expiry", name)?,
                None => expires.saturating_add(1),
            };
            Ev::TimerStart {
                timer: pointer(f, "timer", name)?,
                expires,
                bucket_expiry,
                now,
                base_cpu: num(f, "cpu", name)?,
                flags: parse_flags(need(f, "flags", name)?)?,
            }
        }
        "timer_cancel" => Ev::TimerCancel {
            timer: pointer(f, "timer", name)?,
        },
        "timer_expire_entry" => Ev::TimerExpire {
            timer: pointer(f, "timer", name)?,
            now: num(f, "now", name)?,
        },
        "cpu_idle" => Ev::CpuIdle {
            state: num(f, "state", name)?,
            cpu: num(f, "cpu_id", name)?,
        },
        "tick_stop" => Ev::TickStop {
            success: num::<i64>(f, "success", name)? != 0,
        },
        "tmigr_cpu_idle" => Ev::TmigrCpuIdle {
            cpu: num(f, "cpu", name)?,
        },
        "tmigr_cpu_active" => Ev::TmigrCpuActive {
            cpu: num(f, "cpu", name)?,
        },
        "tmigr_handle_remote_cpu" => Ev::TmigrHandleRemoteCpu {
            cpu: num(f, "cpu", name)?,
        },
        "tmigr_handle_remote" => Ev::TmigrHandleRemote,
        n if n.starts_with("tmigr_") => Ev::TmigrOther(n.to_string()),
        n => Ev::Unknown(n.to_string()),
    })
}
