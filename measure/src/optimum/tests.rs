//! The greedy against a brute force, and the edge cases.

use proptest::prelude::*;

use super::*;

/// The fewest points stabbing every window, by trying every subset of the window ends (some optimal
/// set of points uses only window ends: each point can move right to the nearest end it serves).
fn brute_force(windows: &[Window]) -> u64 {
    let mut ends: Vec<u64> = windows.iter().map(|w| w.end).collect();
    ends.sort_unstable();
    ends.dedup();
    let n = ends.len();
    let mut best = n as u64;
    for mask in 0u32..(1 << n) {
        let points: Vec<u64> = (0..n)
            .filter(|i| mask & (1 << i) != 0)
            .map(|i| ends[i])
            .collect();
        if (points.len() as u64) < best
            && windows
                .iter()
                .all(|w| points.iter().any(|&p| w.start <= p && p <= w.end))
        {
            best = points.len() as u64;
        }
    }
    best
}

fn windows() -> impl Strategy<Value = Vec<Window>> {
    prop::collection::vec((0u64..60, 0u64..20), 0..11)
        .prop_map(|v| v.into_iter().map(|(d, s)| Window::new(d, s)).collect())
}

proptest! {
    #[test]
    fn the_greedy_by_end_equals_the_brute_force(ws in windows()) {
        let mut g = ws.clone();
        prop_assert_eq!(min_stabs(&mut g), brute_force(&ws));
    }

    /// Movable windows are stabbed VM-wide, pinned ones per owner, and the total adds them.
    #[test]
    fn the_total_is_movable_plus_pinned_per_owner(
        arms in prop::collection::vec((0u32..3, any::<bool>(), 0u64..50, 0u64..15), 0..12)
    ) {
        let mut b = OptimumBuilder::new();
        let mut movable = Vec::new();
        let mut pinned: BTreeMap<u32, Vec<Window>> = BTreeMap::new();
        for &(owner, pin, d, s) in &arms {
            b.add(owner, pin, d, s);
            if pin {
                pinned.entry(owner).or_default().push(Window::new(d, s));
            } else {
                movable.push(Window::new(d, s));
            }
        }
        let o = b.finish();
        let m = brute_force(&movable);
        let p: u64 = pinned.values().map(|w| brute_force(w)).sum();
        prop_assert_eq!((o.movable, o.pinned, o.total), (m, p, m + p));
        prop_assert_eq!(o.armings, arms.len() as u64);
    }

    /// More slack never needs more wake-ups.
    #[test]
    fn widening_windows_never_adds_stabs(ws in windows(), extra in 0u64..10) {
        let mut a = ws.clone();
        let mut b: Vec<Window> = ws.iter().map(|w| Window { start: w.start, end: w.end + extra }).collect();
        prop_assert!(min_stabs(&mut b) <= min_stabs(&mut a));
    }
}

#[test]
fn no_windows_need_no_wakeups() {
    assert_eq!(min_stabs(&mut []), 0);
    assert_eq!(OptimumBuilder::new().finish(), Optimum::default());
}

#[test]
fn slack_zero_pinned_counts_distinct_owner_deadline_points() {
    let mut b = OptimumBuilder::new();
    // Owner 0: deadlines 10, 10, 20; owner 1: 10, 30, 30. Distinct (owner, deadline): 4.
    for (owner, d) in [(0, 10), (0, 10), (0, 20), (1, 10), (1, 30), (1, 30)] {
        b.add(owner, true, d, 0);
    }
    let o = b.finish();
    assert_eq!((o.pinned, o.movable, o.total), (4, 0, 4));
}

#[test]
fn slack_zero_movable_counts_distinct_deadlines_vm_wide() {
    let mut b = OptimumBuilder::new();
    for (owner, d) in [(0, 10), (1, 10), (2, 20), (3, 10)] {
        b.add(owner, false, d, 0);
    }
    assert_eq!(b.finish().movable, 2);
}

#[test]
fn overlapping_windows_share_one_wakeup_touching_ones_too() {
    let mut ws = [Window::new(0, 10), Window::new(5, 10), Window::new(10, 0)];
    assert_eq!(min_stabs(&mut ws), 1);
    let mut apart = [Window::new(0, 10), Window::new(11, 0)];
    assert_eq!(min_stabs(&mut apart), 2);
}

#[test]
fn a_nested_window_is_stabbed_at_its_own_end() {
    // By start, the first window would be stabbed at 100 and [10, 20] would need a second point; by
    // end, 20 serves both.
    let mut ws = [Window::new(0, 100), Window::new(10, 10)];
    assert_eq!(min_stabs(&mut ws), 1);
    let mut ws = [Window::new(0, 100), Window::new(10, 10), Window::new(25, 5)];
    assert_eq!(min_stabs(&mut ws), 2);
}

#[test]
fn pinned_windows_of_different_owners_never_share() {
    let mut b = OptimumBuilder::new();
    b.add(0, true, 10, 5);
    b.add(1, true, 10, 5);
    b.add(2, false, 10, 5);
    b.add(3, false, 12, 5);
    let o = b.finish();
    assert_eq!((o.pinned, o.movable, o.total), (2, 1, 3));
}

#[test]
fn saturating_window_end_at_the_top_of_time() {
    let mut ws = [Window::new(u64::MAX - 1, 10), Window::new(u64::MAX, 0)];
    assert_eq!(min_stabs(&mut ws), 1);
}

#[test]
fn busy_spans_serve_the_windows_they_meet() {
    let busy = BusySpans {
        per_cpu: vec![vec![(100, 200)], vec![(500, 600)]],
    };
    let mut b = OptimumBuilder::new();
    b.add(0, false, 150, 0); // CPU 0 runs: free
    b.add(1, false, 550, 10); // CPU 1 runs: free (movable: any CPU)
    b.add(1, true, 150, 0); // pinned to 1, which is idle then: one wake-up
    b.add(0, true, 590, 20); // pinned to 0, idle then: one wake-up
    b.add(0, false, 300, 0); // nobody runs: one wake-up
    b.add(0, true, 200, 5); // touches the end of CPU 0's span: free
    let o = b.finish_with_busy(&busy);
    assert_eq!(o.served_while_running, 3);
    assert_eq!((o.movable, o.pinned, o.total), (1, 2, 3));
    assert_eq!(o.armings, 6);
}
