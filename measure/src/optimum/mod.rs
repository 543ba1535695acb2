//! The optimum a timer policy is measured against: the fewest wake-ups that could have served every
//! fired arming inside its window `[deadline, deadline + slack]` (issue 12).
//!
//! Serving a set of windows with the fewest wake-up instants is *interval stabbing*: choose the fewest
//! points such that every window holds one. The greedy by window end solves it exactly: sort the
//! windows by end; walk them; a window that holds the last point chosen is served by it, any other
//! gets a new point at its own end. (Exchange argument: some optimal solution's first point can be
//! moved to the earliest window end without unserving anything, and so on for the rest.)
//!
//! Who may serve a window decides which windows share points:
//! - movable armings: any vCPU of the VM may expire them, so they are stabbed VM-wide, as one set;
//! - pinned armings: only their owner may, so they are stabbed per owner.
//!
//! The total is the movable stabs plus the sum over owners of the pinned stabs. It counts the
//! wake-ups needed if no vCPU were running (a fully idle VM); an arming a running vCPU could expire
//! needs none, so [`OptimumBuilder::finish_with_busy`] takes the times each CPU runs anyway (the
//! replay knows them from its trace) and leaves out every window that meets one.
//!
//! [`timer_log`] reads the `quietvm run --timer-log` format that `compare` feeds this from.

pub mod timer_log;

use std::collections::BTreeMap;

use serde::Serialize;

/// One fired arming's window: it could have fired at any time in `[start, end]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Window {
    pub start: u64,
    pub end: u64,
}

impl Window {
    /// `[deadline, deadline + slack]` (saturating).
    pub fn new(deadline: u64, slack: u64) -> Self {
        Window {
            start: deadline,
            end: deadline.saturating_add(slack),
        }
    }
}

/// The fewest points that stab every window (sorts `windows` by end). Exact: the greedy by end.
pub fn min_stabs(windows: &mut [Window]) -> u64 {
    windows.sort_unstable_by_key(|w| (w.end, w.start));
    let mut stabs = 0;
    let mut last: Option<u64> = None;
    for w in windows.iter() {
        // Sorted by end, so `last <= w.end`: the last point serves `w` iff it is not before its start.
        if last.is_some_and(|p| p >= w.start) {
            continue;
        }
        last = Some(w.end);
        stabs += 1;
    }
    stabs
}

/// The optimum of a run: the fewest wake-ups, split by who may serve the windows.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Optimum {
    /// Fired armings considered (movable + pinned).
    pub armings: u64,
    /// Of those, the movable ones.
    pub movable_armings: u64,
    /// Windows left out because a CPU that may serve them ran during them
    /// ([`OptimumBuilder::finish_with_busy`]; 0 otherwise).
    pub served_while_running: u64,
    /// Stabs of the movable windows, VM-wide.
    pub movable: u64,
    /// Sum over owners of the stabs of each owner's pinned windows.
    pub pinned: u64,
    /// `movable + pinned`: the optimum.
    pub total: u64,
}

/// Collects fired armings' windows and computes their [`Optimum`].
#[derive(Debug, Clone, Default)]
pub struct OptimumBuilder {
    movable: Vec<Window>,
    pinned: BTreeMap<u32, Vec<Window>>,
}

/// When each CPU runs anyway (sorted, disjoint, closed `[from, to]` spans per CPU).
#[derive(Debug, Clone, Default)]
pub struct BusySpans {
    pub per_cpu: Vec<Vec<(u64, u64)>>,
}

impl BusySpans {
    /// Whether one of `spans` (sorted, disjoint) meets `w`.
    fn meets(spans: &[(u64, u64)], w: Window) -> bool {
        // The first span that ends at or after the window's start; it meets `w` iff it starts by its end.
        let i = spans.partition_point(|&(_, to)| to < w.start);
        spans.get(i).is_some_and(|&(from, _)| from <= w.end)
    }

    /// Every CPU's spans merged into one sorted, disjoint list (any CPU may serve a movable window).
    fn union(&self) -> Vec<(u64, u64)> {
        let mut all: Vec<(u64, u64)> = self.per_cpu.iter().flatten().copied().collect();
        all.sort_unstable();
        let mut out: Vec<(u64, u64)> = Vec::with_capacity(all.len());
        for (from, to) in all {
            match out.last_mut() {
                Some(last) if from <= last.1 => last.1 = last.1.max(to),
                _ => out.push((from, to)),
            }
        }
        out
    }
}

impl OptimumBuilder {
    pub fn new() -> Self {
        Self::default()
    }

    /// A fired arming of `owner` (the vCPU whose timer it is) with its deadline and slack.
    pub fn add(&mut self, owner: u32, pinned: bool, deadline: u64, slack: u64) {
        let w = Window::new(deadline, slack);
        if pinned {
            self.pinned.entry(owner).or_default().push(w);
        } else {
            self.movable.push(w);
        }
    }

    /// The optimum of a fully idle VM: every fired window needs a wake-up.
    pub fn finish(self) -> Optimum {
        self.finish_with_busy(&BusySpans::default())
    }

    /// The optimum when the CPUs run anyway during `busy`: a movable window that meets any CPU's
    /// busy span, or a pinned one that meets its owner's, is served without a wake-up.
    pub fn finish_with_busy(mut self, busy: &BusySpans) -> Optimum {
        let pinned_armings: usize = self.pinned.values().map(Vec::len).sum();
        let mut o = Optimum {
            armings: (self.movable.len() + pinned_armings) as u64,
            movable_armings: self.movable.len() as u64,
            ..Optimum::default()
        };
        let any = busy.union();
        let before = self.movable.len();
        self.movable.retain(|&w| !BusySpans::meets(&any, w));
        o.served_while_running += (before - self.movable.len()) as u64;
        o.movable = min_stabs(&mut self.movable);
        for (owner, mut ws) in self.pinned {
            let mine = busy
                .per_cpu
                .get(owner as usize)
                .map_or(&[][..], Vec::as_slice);
            let before = ws.len();
            ws.retain(|&w| !BusySpans::meets(mine, w));
            o.served_while_running += (before - ws.len()) as u64;
            o.pinned += min_stabs(&mut ws);
        }
        o.total = o.movable + o.pinned;
        o
    }
}

#[cfg(test)]
mod tests;
