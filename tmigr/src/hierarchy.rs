//! The timer-migration hierarchy (kernel/time/timer_migration.c for vCPUs).
//!
//! See the crate documentation (`lib.rs`) for the picture, the locking,
//! lifetime and memory-ordering rules; every known race is walked through in a
//! `RACE:` comment next to the code that prevents it.

use crate::sync::{
    fence, lock, AtomicBool, AtomicU32, AtomicU64, AtomicU8, Mutex, Ordering, StatCounter,
};
use crate::types::{CpuId, Expiry, KTIME_MAX};

/// `migrator` value of a group without migrator (the kernel's `TMIGR_NONE`).
pub const TMIGR_NONE: u8 = 0xff;
/// Most children per group (the kernel's `TMIGR_CHILDREN_PER_GROUP`); the
/// active and migrator masks are `u8`.
pub const MAX_GROUP_SIZE: usize = 8;
/// "No group / no cpu" index.
pub const NO_IDX: u32 = u32::MAX;

/// The packed group state (`union tmigr_state`): changed only by
/// compare-and-swap, every change bumps `seq`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TmigrState {
    /// Bit per active child.
    pub active: u8,
    /// Bit of the child that expires the group's events, or [`TMIGR_NONE`].
    pub migrator: u8,
    /// Bumped on every change: a walker's compare-and-swap built on a stale view fails.
    pub seq: u16,
}

impl TmigrState {
    /// The state of a fresh group: nobody active, no migrator.
    pub const IDLE: TmigrState = TmigrState {
        active: 0,
        migrator: TMIGR_NONE,
        seq: 0,
    };

    /// Packs into the atomic word.
    pub const fn pack(self) -> u32 {
        self.active as u32 | (self.migrator as u32) << 8 | (self.seq as u32) << 16
    }

    /// Unpacks the atomic word.
    pub const fn unpack(v: u32) -> Self {
        TmigrState {
            active: v as u8,
            migrator: (v >> 8) as u8,
            seq: (v >> 16) as u16,
        }
    }
}

/// An event queued in a group for one child (`struct tmigr_event`): the
/// child subtree's earliest movable window end (`hard`: when someone must
/// wake) and earliest deadline (`soft`: from when something can be expired),
/// and the cpu whose deadline `soft` is (the one a migrator handles first; see
/// "Windows" in the crate docs for why it is not the cpu of `hard`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Evt {
    hard: u64,
    soft: u64,
    cpu: CpuId,
}

const EVT_NONE: Evt = Evt {
    hard: KTIME_MAX,
    soft: KTIME_MAX,
    cpu: NO_IDX,
};

impl Evt {
    fn expiry(&self) -> Expiry {
        Expiry {
            hard: self.hard,
            soft: self.soft,
        }
    }
}

/// Protected by the group lock.
struct GroupLocked {
    /// The children's events, by child slot (a time-ordered queue of at most
    /// eight entries: a scan beats a tree at this size).
    evts: [Evt; MAX_GROUP_SIZE],
    /// The group's own event: earliest `hard` and earliest `soft` of the
    /// non-ignored events, with the cpu of that `soft` (mirrored in
    /// `TmigrGroup::next_hard` and `next_soft`).
    next: Evt,
}

/// A group (`struct tmigr_group`). Groups live in an arena, are published
/// fully initialised and are never freed.
struct TmigrGroup {
    state: AtomicU32,
    lock: Mutex<GroupLocked>,
    /// The group's earliest window end (`next.hard`): written under `lock`,
    /// read locklessly by migrators (`READ_ONCE`) for when to look.
    next_hard: AtomicU64,
    /// The group's earliest deadline (`next.soft`): written under `lock`,
    /// read locklessly by migrators for whether to look now.
    next_soft: AtomicU64,
    /// Parent group index or `NO_IDX`; set once, Release, read Acquire.
    parent: AtomicU32,
    /// This group's bit in its parent (set before `parent` is published).
    groupmask: AtomicU8,
    level: AtomicU8,
    node: AtomicU32,
    num_children: AtomicU8,
    /// Child cpu (level 0) or group index per slot; set before the child is published.
    children: [AtomicU32; MAX_GROUP_SIZE],
    /// `groupevt.ignore`: this group is active, its event in the parent is stale.
    ignore: AtomicBool,
}

impl TmigrGroup {
    fn new() -> Self {
        Self {
            state: AtomicU32::new(TmigrState::IDLE.pack()),
            lock: Mutex::new(GroupLocked {
                evts: [EVT_NONE; MAX_GROUP_SIZE],
                next: EVT_NONE,
            }),
            next_hard: AtomicU64::new(KTIME_MAX),
            next_soft: AtomicU64::new(KTIME_MAX),
            parent: AtomicU32::new(NO_IDX),
            groupmask: AtomicU8::new(0),
            level: AtomicU8::new(0),
            node: AtomicU32::new(0),
            num_children: AtomicU8::new(0),
            children: std::array::from_fn(|_| AtomicU32::new(NO_IDX)),
            ignore: AtomicBool::new(true),
        }
    }

    fn load_state(&self) -> TmigrState {
        TmigrState::unpack(self.state.load(Ordering::Acquire))
    }
}

/// Protected by the cpu lock (`tmc->lock`).
struct CpuLocked {
    online: bool,
    idle: bool,
    /// A migrator is expiring this cpu's timers (`tmc->remote`).
    remote: bool,
    /// Set when this cpu idled the root: it must wake for the hierarchy's first expiry.
    wakeup: u64,
}

/// Per-vCPU hierarchy state (`struct tmigr_cpu`).
struct TmigrCpu {
    lock: Mutex<CpuLocked>,
    /// Lockless mirrors of `CpuLocked` for readers that must not lock
    /// (`requires_handle_remote`, kick checks, remote back-off).
    online: AtomicBool,
    idle: AtomicBool,
    wakeup: AtomicU64,
    /// Level-0 group, set once when the cpu first comes online (Release/Acquire).
    group: AtomicU32,
    groupmask: AtomicU8,
    /// `cpuevt.ignore`: this cpu is active, its event in the group is stale.
    ignore: AtomicBool,
}

impl TmigrCpu {
    fn new() -> Self {
        Self {
            lock: Mutex::new(CpuLocked {
                online: false,
                idle: true,
                remote: false,
                wakeup: KTIME_MAX,
            }),
            online: AtomicBool::new(false),
            idle: AtomicBool::new(true),
            wakeup: AtomicU64::new(KTIME_MAX),
            group: AtomicU32::new(NO_IDX),
            groupmask: AtomicU8::new(0),
            ignore: AtomicBool::new(true),
        }
    }
}

/// Group creation state (the kernel's `tmigr_mutex` and level lists).
struct Setup {
    levels: Vec<Vec<u32>>,
    ngroups: u32,
    root: u32,
}

/// Configuration of a [`Hierarchy`].
#[derive(Clone, Debug)]
pub struct HierConfig {
    /// Children per group, 2..=8.
    pub group_size: usize,
    /// Node of each cpu (missing entries: node 0); groups below the crossnode
    /// level only hold children of one node.
    pub nodes: Option<Vec<u32>>,
    /// Highest cpu id + 1 that will ever come online.
    pub max_cpus: u32,
}

/// Where a hierarchy walk ended, and what the walker must do about it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WalkResult {
    /// First window end of the whole hierarchy if this walk found the root
    /// idle (the walker must wake for it), else `KTIME_MAX`.
    pub firstexp: u64,
    /// The active group where event propagation stopped: its migrator must
    /// look at the group's (possibly earlier) first event.
    pub stopped_at: Option<u32>,
    /// Groups visited.
    pub levels: u32,
}

impl WalkResult {
    const NONE: WalkResult = WalkResult {
        firstexp: KTIME_MAX,
        stopped_at: None,
        levels: 0,
    };
}

/// Test-only pause points inside the operations (see `set_hook`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    /// A walker computed a new state for `group` and is about to compare-and-swap it.
    BeforeStateCas {
        /// The walking cpu.
        cpu: CpuId,
        /// The group.
        group: u32,
        /// True in activate, false in deactivate/offline.
        activating: bool,
        /// 0 for the first attempt.
        attempt: u32,
    },
    /// A walker's compare-and-swap on `group` succeeded; it has not yet updated
    /// the group's events nor moved to the parent.
    AfterStateCas {
        /// The walking cpu.
        cpu: CpuId,
        /// The group.
        group: u32,
        /// True in activate, false in deactivate/offline.
        activating: bool,
    },
    /// A migrator marked `cpu` remote and is about to expire its timers.
    RemoteBeforeExpire {
        /// The migrator.
        migrator: CpuId,
        /// The idle cpu whose timers it expires.
        cpu: CpuId,
    },
    /// `online` published a new root above the old one; the onlined cpu has not
    /// activated yet and the old root's state is not reconciled yet.
    NewRootPublished {
        /// The previous root.
        old_root: u32,
        /// The new root.
        new_root: u32,
    },
}

/// A hook callback (tests and the `test-hooks` feature).
pub type HookFn = std::sync::Arc<dyn Fn(Hook) + Send + Sync>;

/// Hierarchy counters.
#[derive(Default, Debug)]
struct HierStats {
    activate_walks: StatCounter,
    deactivate_walks: StatCounter,
    levels_walked: StatCounter,
    cas_retries: StatCounter,
    new_timer_walks: StatCounter,
    remote_cpu_handled: StatCounter,
    remote_backoffs: StatCounter,
    cross_node_below_crossnode: StatCounter,
}

/// A snapshot of the hierarchy counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HierStatsSnapshot {
    /// Activations that walked the hierarchy.
    pub activate_walks: u64,
    /// Deactivations (and offlines) that walked the hierarchy.
    pub deactivate_walks: u64,
    /// Groups visited by all walks.
    pub levels_walked: u64,
    /// Failed compare-and-swaps on a group state (retried).
    pub cas_retries: u64,
    /// New-timer-while-idle walks.
    pub new_timer_walks: u64,
    /// `handle_remote_cpu` calls that expired an idle cpu's timers.
    pub remote_cpu_handled: u64,
    /// `handle_remote_cpu` calls that backed off (owner woke, offline, or already remote).
    pub remote_backoffs: u64,
    /// Events of another node's vCPU that a migrator took from a group below the crossnode level
    /// (must be 0: such groups hold one node's vCPUs; "timers/migration: Fix imbalanced NUMA
    /// trees").
    pub cross_node_below_crossnode: u64,
}

/// What a migrator needs from the timer bases to expire an idle cpu's timers
/// (timer.c's `timer_expire_remote` and `fetch_next_timer_interrupt_remote`).
pub trait RemoteExpiry {
    /// Expires `cpu`'s movable timers with `deadline <= now` (window open) on the migrator.
    /// Must expire nothing if `cpu` is no longer idle ([`Hierarchy::cpu_is_idle`]
    /// under the base lock): the owner woke and expires them itself.
    fn expire_movable(&mut self, cpu: CpuId, now: u64);
    /// Locks `cpu`'s base, calls `f` with its global event
    /// ([`crate::base::TimerBase::global_event`]) while the lock is held.
    fn with_base_locked(&mut self, cpu: CpuId, f: &mut dyn FnMut(Expiry));
    /// Where the re-queue walk for `cpu` stopped (for kicks).
    fn requeued(&mut self, _res: WalkResult) {}
}

/// Per-walk data (`struct tmigr_walk`).
struct WalkData {
    nextexp: Expiry,
    firstexp: u64,
    evt_cpu: CpuId,
    stopped_at: Option<u32>,
}

impl WalkData {
    fn new(nextexp: Expiry, evt_cpu: CpuId) -> Self {
        Self {
            nextexp,
            firstexp: KTIME_MAX,
            evt_cpu,
            stopped_at: None,
        }
    }
}

/// The timer-migration hierarchy over `max_cpus` vCPUs.
pub struct Hierarchy {
    group_size: usize,
    crossnode_level: usize,
    nodes: Option<Vec<u32>>,
    cpus: Box<[TmigrCpu]>,
    groups: Box<[TmigrGroup]>,
    setup: Mutex<Setup>,
    /// Mirror of `Setup::root` for lockless readers (and hooks, which run
    /// with the setup mutex held).
    root: AtomicU32,
    stats: HierStats,
    #[cfg(all(any(test, feature = "test-hooks"), not(loom)))]
    hook: std::sync::Mutex<Option<HookFn>>,
}

fn lowest_bit(mask: u8) -> u8 {
    1 << mask.trailing_zeros()
}

impl Hierarchy {
    /// An empty hierarchy: no cpu online, no group.
    pub fn new(cfg: HierConfig) -> Self {
        assert!(
            (2..=MAX_GROUP_SIZE).contains(&cfg.group_size),
            "group_size must be 2..=8"
        );
        let n = cfg.max_cpus.max(1) as usize;
        let gs = cfg.group_size;
        let (crossnode_level, nnodes) = match &cfg.nodes {
            Some(nodes) => {
                let mut counts = std::collections::BTreeMap::new();
                for &nd in nodes.iter().take(n) {
                    *counts.entry(nd).or_insert(0usize) += 1;
                }
                if nodes.len() < n {
                    *counts.entry(0).or_insert(0) += n - nodes.len();
                }
                if counts.len() > 1 {
                    // Levels needed to gather the largest node into one group.
                    let per_node = counts.values().copied().max().unwrap_or(1);
                    let mut lvl = 1;
                    let mut span = gs;
                    while span < per_node {
                        span *= gs;
                        lvl += 1;
                    }
                    (lvl, counts.len())
                } else {
                    (0, 1)
                }
            }
            None => (0, 1),
        };
        // Groups at a level <= children/gs, plus one partial group per node
        // below the crossnode level (above it nodes mix); +1 per level for a
        // new root, plus slack. Terminates: above the crossnode level the
        // count at least halves.
        let mut total = 4;
        let mut count = n;
        for lvl in 0..64 {
            let extra = if lvl < crossnode_level { nnodes } else { 0 };
            let lvl_groups = count.div_ceil(gs) + extra;
            total += lvl_groups + 1;
            if lvl_groups <= 1 && lvl >= crossnode_level {
                break;
            }
            count = lvl_groups;
        }
        Self {
            group_size: gs,
            crossnode_level,
            nodes: cfg.nodes,
            cpus: (0..n).map(|_| TmigrCpu::new()).collect(),
            groups: (0..total).map(|_| TmigrGroup::new()).collect(),
            setup: Mutex::new(Setup {
                levels: Vec::new(),
                ngroups: 0,
                root: NO_IDX,
            }),
            root: AtomicU32::new(NO_IDX),
            stats: HierStats::default(),
            #[cfg(all(any(test, feature = "test-hooks"), not(loom)))]
            hook: std::sync::Mutex::new(None),
        }
    }

    /// Number of cpu slots.
    pub fn max_cpus(&self) -> u32 {
        self.cpus.len() as u32
    }

    /// The configured group size.
    pub fn group_size(&self) -> usize {
        self.group_size
    }

    /// The level from which groups mix nodes (0: no node grouping).
    pub fn crossnode_level(&self) -> usize {
        self.crossnode_level
    }

    fn node_of(&self, cpu: CpuId) -> u32 {
        self.nodes
            .as_ref()
            .and_then(|n| n.get(cpu as usize).copied())
            .unwrap_or(0)
    }

    /// Installs (or removes) the test hook. Hooks run on the walking thread
    /// with at most that walker's own base and cpu locks (and, for
    /// `NewRootPublished`, the setup mutex) held, never a group lock, so a
    /// hook may run another cpu's operation inline (not `online`, `levels`,
    /// `dump` or `check_invariants`, which take the setup mutex).
    #[cfg(all(any(test, feature = "test-hooks"), not(loom)))]
    pub fn set_hook(&self, f: Option<HookFn>) {
        *self.hook.lock().unwrap_or_else(|e| e.into_inner()) = f;
    }

    #[inline]
    fn hook(&self, _h: Hook) {
        #[cfg(all(any(test, feature = "test-hooks"), not(loom)))]
        {
            let f = self.hook.lock().unwrap_or_else(|e| e.into_inner()).clone();
            if let Some(f) = f {
                f(_h);
            }
        }
    }

    /// Counters.
    pub fn stats(&self) -> HierStatsSnapshot {
        let s = &self.stats;
        HierStatsSnapshot {
            activate_walks: s.activate_walks.get(),
            deactivate_walks: s.deactivate_walks.get(),
            levels_walked: s.levels_walked.get(),
            cas_retries: s.cas_retries.get(),
            new_timer_walks: s.new_timer_walks.get(),
            remote_cpu_handled: s.remote_cpu_handled.get(),
            cross_node_below_crossnode: s.cross_node_below_crossnode.get(),
            remote_backoffs: s.remote_backoffs.get(),
        }
    }

    // ----------------------------------------------------------------------
    // Lockless queries
    // ----------------------------------------------------------------------

    /// True if `cpu` is online and idle (lockless snapshot).
    pub fn cpu_is_idle(&self, cpu: CpuId) -> bool {
        let c = &self.cpus[cpu as usize];
        c.idle.load(Ordering::Acquire)
    }

    /// True if `cpu` is online (lockless snapshot).
    pub fn cpu_is_online(&self, cpu: CpuId) -> bool {
        self.cpus[cpu as usize].online.load(Ordering::Acquire)
    }

    /// The wake-up `cpu` stored when it idled the root (`tmc->wakeup`).
    /// Recomputed on every deactivate/new-timer walk, cleared on activate:
    /// never a value to re-arm from without recomputing (RACE: stale wakeup).
    pub fn cpu_wakeup(&self, cpu: CpuId) -> u64 {
        self.cpus[cpu as usize].wakeup.load(Ordering::Acquire)
    }

    /// The state of group `g`.
    pub fn group_state(&self, g: u32) -> TmigrState {
        self.groups[g as usize].load_state()
    }

    /// The first window end of group `g` (when its migrator must look).
    pub fn group_next_expiry(&self, g: u32) -> u64 {
        self.group_next(g).hard
    }

    /// Group `g`'s earliest window end and earliest deadline (lockless read).
    pub fn group_next(&self, g: u32) -> Expiry {
        let grp = &self.groups[g as usize];
        Expiry {
            hard: grp.next_hard.load(Ordering::Acquire),
            soft: grp.next_soft.load(Ordering::Acquire),
        }
    }

    /// The level-0 group of `cpu`, if it was ever online.
    pub fn cpu_group(&self, cpu: CpuId) -> Option<u32> {
        let g = self.cpus[cpu as usize].group.load(Ordering::Acquire);
        (g != NO_IDX).then_some(g)
    }

    /// Parent of group `g`.
    pub fn group_parent(&self, g: u32) -> Option<u32> {
        let p = self.groups[g as usize].parent.load(Ordering::Acquire);
        (p != NO_IDX).then_some(p)
    }

    /// Level of group `g`.
    pub fn group_level(&self, g: u32) -> u8 {
        self.groups[g as usize].level.load(Ordering::Relaxed)
    }

    /// The current root group.
    pub fn root(&self) -> Option<u32> {
        let r = self.root.load(Ordering::Acquire);
        (r != NO_IDX).then_some(r)
    }

    /// Number of levels (0 before the first cpu comes online).
    pub fn levels(&self) -> usize {
        lock(&self.setup).levels.len()
    }

    /// `tmigr_check_migrator`: `childmask` handles `g`'s events (it is the
    /// migrator, or the group has none).
    fn check_migrator(&self, g: u32, childmask: u8) -> bool {
        let s = self.groups[g as usize].load_state();
        s.migrator == childmask || s.migrator == TMIGR_NONE
    }

    /// Calls `up(group, child_group, childmask)` from `cpu`'s level-0 group
    /// upwards until it returns true or the top is reached (`walk_groups`).
    /// Returns the number of groups visited.
    fn walk_groups(&self, cpu: CpuId, mut up: impl FnMut(u32, Option<u32>, u8) -> bool) -> u32 {
        let tmc = &self.cpus[cpu as usize];
        let mut g = tmc.group.load(Ordering::Acquire);
        if g == NO_IDX {
            return 0;
        }
        let mut childmask = tmc.groupmask.load(Ordering::Relaxed);
        let mut child = None;
        let mut levels = 0;
        loop {
            levels += 1;
            if up(g, child, childmask) {
                break;
            }
            // LIFETIME: `parent` is published with Release after the parent is
            // fully initialised and after our `groupmask` is set; Acquire here.
            // RACE (a parent link appearing mid-walk, the kernel's "Do not rely
            // always on group->parent"): loaded only after the step said "go
            // on", which it decided from its own load of the same link (set
            // once, never cleared): both saw a parent. A load from before the
            // step could still say "none" after the step saw a new root, and
            // the walk would stop below the root it had decided to reach.
            let p = self.groups[g as usize].parent.load(Ordering::Acquire);
            if p == NO_IDX {
                break;
            }
            childmask = self.groups[g as usize].groupmask.load(Ordering::Relaxed);
            child = Some(g);
            g = p;
        }
        self.stats.levels_walked.add(levels as u64);
        levels
    }

    /// `tmigr_requires_handle_remote`: cheap lockless check whether `cpu`
    /// must call [`handle_remote`](Self::handle_remote) at `now`.
    pub fn requires_handle_remote(&self, cpu: CpuId, now: u64) -> bool {
        let tmc = &self.cpus[cpu as usize];
        // An idle cpu never handles remote timers: one woken at its root
        // wake-up activates first and expires as the migrator (the kernel's
        // "Remove dead code handling idle CPU checking for remote timers").
        // Were an idle cpu let through, `check_migrator` would accept every
        // idle group (no migrator) on its path and it would expire other idle
        // cpus' timers while itself idle.
        if !tmc.online.load(Ordering::Acquire) || tmc.idle.load(Ordering::Acquire) {
            return false;
        }
        // An open window is enough: expiring now, while this cpu runs anyway,
        // serves every timer whose deadline passed (windows, crate docs).
        self.next_remote(cpu).soft <= now
    }

    /// True if an online idle cpu other than `cpu` already wakes at or
    /// before `t` (its stored root wake-up). Such a cpu, once awake,
    /// activates and becomes the root's migrator, or recomputes the
    /// hierarchy's first expiry when it halts again: either way the events
    /// up to `t` are covered and `cpu` need not wake for them.
    ///
    /// RACE (two vCPUs waking for the same root expiry, found by an outside
    /// audit after the kernel's "Fix endless timer requeue after idle
    /// interrupts"): vCPU A idles the root and wakes at T; B wakes for its own
    /// reasons and idles the root again, for the same T. Without this check
    /// both wake at T, one after the other; each then idles the root again
    /// for the next expiry, because the other is idle, and so on for ever:
    /// two wake-ups for every root expiry. A stored wake-up is honoured: it
    /// is written under the cpu lock by the walk that computed it, the
    /// service programs the cpu's sleep at or before it (or kicks it), and
    /// it is cleared only when the cpu activates (then it is the migrator),
    /// goes offline (then its walk hands the root's events on) or is
    /// remotely handled (by an active migrator). A concurrent activation
    /// that we do not see yet makes that cpu the root's migrator: covered.
    /// O(max_cpus) lockless loads, only when a walk idles the root.
    pub fn wakeup_covered(&self, cpu: CpuId, t: u64) -> bool {
        self.cpus.iter().enumerate().any(|(c, tmc)| {
            c != cpu as usize
                && tmc.online.load(Ordering::Acquire)
                && tmc.idle.load(Ordering::Acquire)
                && tmc.wakeup.load(Ordering::Acquire) <= t
        })
    }

    /// First window end of the groups `cpu` is migrator of, walking up as
    /// long as it is (lockless): when it must look at them. `KTIME_MAX` if none.
    pub fn next_remote_expiry(&self, cpu: CpuId) -> u64 {
        self.next_remote(cpu).hard
    }

    /// Earliest window end and earliest deadline of the groups `cpu` is
    /// migrator of (lockless).
    pub fn next_remote(&self, cpu: CpuId) -> Expiry {
        let mut first = Expiry::NONE;
        let tmc = &self.cpus[cpu as usize];
        let mut g = tmc.group.load(Ordering::Acquire);
        if g == NO_IDX {
            return Expiry::NONE;
        }
        let mut childmask = tmc.groupmask.load(Ordering::Relaxed);
        loop {
            let grp = &self.groups[g as usize];
            let s = grp.load_state();
            if s.migrator != childmask {
                break;
            }
            first = first.min(Expiry {
                hard: grp.next_hard.load(Ordering::Acquire),
                soft: grp.next_soft.load(Ordering::Acquire),
            });
            let p = grp.parent.load(Ordering::Acquire);
            if p == NO_IDX {
                break;
            }
            childmask = grp.groupmask.load(Ordering::Relaxed);
            g = p;
        }
        first
    }

    /// The active cpu reached by following migrators down from group `g`, if
    /// any (racy by nature: see "Kicks" in the crate docs).
    pub fn responsible_cpu(&self, mut g: u32) -> Option<CpuId> {
        loop {
            let grp = &self.groups[g as usize];
            let s = grp.load_state();
            if s.migrator == TMIGR_NONE || s.migrator == 0 {
                return None;
            }
            let slot = s.migrator.trailing_zeros() as usize;
            let child = grp.children[slot].load(Ordering::Acquire);
            if child == NO_IDX {
                return None;
            }
            if grp.level.load(Ordering::Relaxed) == 0 {
                return Some(child);
            }
            g = child;
        }
    }

    // ----------------------------------------------------------------------
    // Group event queues (under group locks)
    // ----------------------------------------------------------------------

    fn child_ignore(&self, g: u32, slot: usize) -> Option<&AtomicBool> {
        let grp = &self.groups[g as usize];
        let child = grp.children[slot].load(Ordering::Acquire);
        if child == NO_IDX {
            return None;
        }
        Some(if grp.level.load(Ordering::Relaxed) == 0 {
            &self.cpus[child as usize].ignore
        } else {
            &self.groups[child as usize].ignore
        })
    }

    /// `tmigr_next_groupevt`: purges ignored events (the lazy removal of
    /// events of children that became active), recomputes the group's event
    /// (`next`: earliest `hard`, earliest `soft` and that `soft`'s cpu) and
    /// returns the slot of the event with the earliest `soft`, the one a
    /// migrator dequeues first.
    fn next_groupevt(&self, g: u32, gl: &mut GroupLocked) -> Option<usize> {
        let mut first: Option<usize> = None;
        let mut hard = KTIME_MAX;
        for slot in 0..MAX_GROUP_SIZE {
            if gl.evts[slot].hard == KTIME_MAX {
                continue;
            }
            // Relaxed: `ignore` is a hint set locklessly by activating walkers;
            // a late view only makes a migrator handle an active child, and
            // `handle_remote_cpu` backs off for an active cpu.
            if self
                .child_ignore(g, slot)
                .is_none_or(|ig| ig.load(Ordering::Relaxed))
            {
                gl.evts[slot] = EVT_NONE;
                continue;
            }
            hard = hard.min(gl.evts[slot].hard);
            if first.is_none_or(|f| gl.evts[slot].soft < gl.evts[f].soft) {
                first = Some(slot);
            }
        }
        gl.next = match first {
            Some(f) => Evt {
                hard,
                soft: gl.evts[f].soft,
                cpu: gl.evts[f].cpu,
            },
            None => EVT_NONE,
        };
        let grp = &self.groups[g as usize];
        grp.next_hard.store(gl.next.hard, Ordering::Release);
        grp.next_soft.store(gl.next.soft, Ordering::Release);
        first
    }

    /// `tmigr_next_expired_groupevt`: dequeues and returns the event with the
    /// earliest deadline if its window is open at `now` (deadline `<= now`;
    /// with slack 0 everywhere that is the kernel's "first event is due").
    ///
    /// RACE (livelock in remote expiry, the kernel's "Fix livelock in
    /// tmigr_handle_remote_up()"): the event is consumed here, before it is
    /// handled, so a handler that backs off (owner awake, or already handled
    /// by another migrator) cannot find it again; with `now` sampled once,
    /// every iteration of `handle_remote` removes an event for good.
    fn next_expired_groupevt(&self, g: u32, gl: &mut GroupLocked, now: u64) -> Option<Evt> {
        let slot = self.next_groupevt(g, gl)?;
        let evt = gl.evts[slot];
        if evt.soft > now {
            return None;
        }
        gl.evts[slot] = EVT_NONE;
        self.next_groupevt(g, gl);
        Some(evt)
    }

    /// `tmigr_update_events`: (re)queues the child's first event in group `g`
    /// and says whether the walk is done. The only place that sets a group's
    /// `next_expiry`, apart from the purge/dequeue of a migrator.
    ///
    /// RACE (last cpu idles while another arms a first movable timer): the
    /// child's and the group's states are read HERE, under the child's and
    /// the group's locks, not by the caller before taking them. cpu A (last
    /// active in GRP0) and idle cpu B (new timer) both end up here for GRP0
    /// and then for the parent. If B sees GRP0 still active, B stops; A's
    /// compare-and-swap on GRP0 happened before A takes GRP0's lock, so A's
    /// own update of GRP0 (after B's, by the lock) recomputes GRP0's first
    /// event from the queue, B's included, and carries it up. If B sees GRP0
    /// idle, B carries it up itself. Either way nobody concludes "an active
    /// parent covers it" from a state that was stale when the event landed.
    fn update_events(
        &self,
        g: u32,
        child: Option<u32>,
        childmask: u8,
        data: &mut WalkData,
    ) -> bool {
        let grp = &self.groups[g as usize];
        let slot = childmask.trailing_zeros() as usize;
        match child {
            Some(h) => {
                let hgrp = &self.groups[h as usize];
                let mut hl = lock(&hgrp.lock);
                let mut gl = lock(&grp.lock);
                // Observing the child active means either it is (its migrator
                // handles its events), or a racing deactivation has not reached
                // this update yet and will do it. It cannot be a deactivation
                // that already did its update: that one released both locks
                // after its compare-and-swap, and we hold them now.
                if hgrp.load_state().active != 0 {
                    return true;
                }
                self.next_groupevt(h, &mut hl);
                let (nextexp, cpu) = (hl.next.expiry(), hl.next.cpu);
                drop(hl);
                self.queue_child_evt(g, &mut gl, slot, nextexp, cpu, &hgrp.ignore, data)
            }
            None => {
                let mut gl = lock(&grp.lock);
                let cpu = data.evt_cpu;
                let nextexp = data.nextexp;
                self.queue_child_evt(
                    g,
                    &mut gl,
                    slot,
                    nextexp,
                    cpu,
                    &self.cpus[cpu as usize].ignore,
                    data,
                )
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn queue_child_evt(
        &self,
        g: u32,
        gl: &mut GroupLocked,
        slot: usize,
        nextexp: Expiry,
        cpu: CpuId,
        ignore: &AtomicBool,
        data: &mut WalkData,
    ) -> bool {
        let grp = &self.groups[g as usize];
        if nextexp.is_none() {
            ignore.store(true, Ordering::Relaxed);
            gl.evts[slot] = EVT_NONE;
        } else {
            ignore.store(false, Ordering::Relaxed);
            gl.evts[slot] = Evt {
                hard: nextexp.hard,
                soft: nextexp.soft,
                cpu,
            };
        }
        self.next_groupevt(g, gl);
        let gs = grp.load_state();
        if gs.active != 0 {
            // The group's migrator handles it: it may have to look earlier.
            data.stopped_at = Some(g);
            return true;
        }
        if grp.parent.load(Ordering::Acquire) == NO_IDX {
            // The whole hierarchy is idle: the walker wakes for its first
            // window end (and expires every open window then).
            data.firstexp = gl.next.hard;
            return true;
        }
        false
    }

    // ----------------------------------------------------------------------
    // State propagation (lockless, compare-and-swap)
    // ----------------------------------------------------------------------

    /// `tmigr_active_up`: sets `childmask` active in `g`; takes the migrator
    /// role if there was none (then the walk goes on up).
    fn active_up(&self, g: u32, childmask: u8, cpu: CpuId) -> bool {
        let grp = &self.groups[g as usize];
        // ORDERING: Acquire pairs with the AcqRel compare-and-swaps of other
        // walkers on this group (see the crate docs, "Memory ordering").
        let mut cur = grp.load_state();
        let mut attempt = 0;
        let walk_done = loop {
            let mut new = cur;
            let mut walk_done = true;
            if new.migrator == TMIGR_NONE {
                new.migrator = childmask;
                walk_done = false;
            }
            new.active |= childmask;
            new.seq = new.seq.wrapping_add(1);
            self.hook(Hook::BeforeStateCas {
                cpu,
                group: g,
                activating: true,
                attempt,
            });
            match grp.state.compare_exchange(
                cur.pack(),
                new.pack(),
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => break walk_done,
                Err(actual) => {
                    // RACE (failed CAS gives no ordering): Rust's failure
                    // ordering Acquire makes this an acquire re-load.
                    cur = TmigrState::unpack(actual);
                    attempt += 1;
                    self.stats.cas_retries.add(1);
                }
            }
        };
        // The group is active again: its event queued in the parent is now
        // the business of this group's migrator. Lockless, as in the kernel:
        // a parent migrator seeing it late handles the event remotely once,
        // which `handle_remote_cpu` tolerates; the idle path sets it back
        // under the parent lock, so that update is never lost.
        grp.ignore.store(true, Ordering::Relaxed);
        self.hook(Hook::AfterStateCas {
            cpu,
            group: g,
            activating: true,
        });
        walk_done
    }

    /// `tmigr_inactive_up`: clears `childmask` in `g` unless the child is
    /// active again, hands the migrator role on, then updates `g`'s events.
    /// Returns true when the walk is done (the group stays active).
    fn inactive_up(
        &self,
        g: u32,
        child: Option<u32>,
        childmask: u8,
        data: &mut WalkData,
        cpu: CpuId,
    ) -> bool {
        let grp = &self.groups[g as usize];
        // RACE (reading the child's state without ordering): this load is
        // Acquire, and so is a failed compare-and-swap's re-load below. A
        // walker that re-activated `child` did its (AcqRel) CAS on the child
        // before its CAS on `g`; if we see the latter, Acquire makes us see
        // the former when we read the child's state next, so we cannot clear
        // the bit of a child that is active again.
        let mut cur = grp.load_state();
        let mut attempt = 0;
        let walk_done = loop {
            let child_active = match child {
                Some(h) => {
                    TmigrState::unpack(self.groups[h as usize].state.load(Ordering::Relaxed)).active
                        != 0
                }
                None => false,
            };
            let mut new = cur;
            if !child_active {
                new.active &= !childmask;
                if new.migrator == childmask {
                    new.migrator = if new.active == 0 {
                        TMIGR_NONE
                    } else {
                        lowest_bit(new.active)
                    };
                }
            }
            // Propagate while the group is idle, not only when this walk made
            // it idle: a vCPU that is already idle can leave (offline) or
            // re-deactivate, and its changed event must still reach the top
            // of the idle subtree.
            let walk_done = new.active != 0;
            // RACE (out-of-order propagation): bumping seq makes a
            // compare-and-swap computed from a state another walker has since
            // changed fail, even if active/migrator look the same again.
            new.seq = new.seq.wrapping_add(1);
            debug_assert!(new.migrator == TMIGR_NONE || new.active & new.migrator != 0);
            self.hook(Hook::BeforeStateCas {
                cpu,
                group: g,
                activating: false,
                attempt,
            });
            match grp.state.compare_exchange(
                cur.pack(),
                new.pack(),
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => break walk_done,
                Err(actual) => {
                    cur = TmigrState::unpack(actual);
                    attempt += 1;
                    self.stats.cas_retries.add(1);
                }
            }
        };
        self.hook(Hook::AfterStateCas {
            cpu,
            group: g,
            activating: false,
        });
        // The walk goes on iff this group became idle (the kernel's "Return
        // early on deactivation"); `update_events` re-reads both states under
        // the locks regardless. RACE (the kernel's "Fix ignored event due to
        // missing CPU update"): the early return comes after the update, so
        // the idling child's event is queued (not ignored) in the group that
        // stays active, whose migrator then handles it.
        self.update_events(g, child, childmask, data);
        walk_done
    }

    // ----------------------------------------------------------------------
    // Operations
    // ----------------------------------------------------------------------

    /// `tmigr_cpu_activate`: `cpu` leaves idle. Returns the groups walked.
    pub fn activate(&self, cpu: CpuId) -> u32 {
        let tmc = &self.cpus[cpu as usize];
        let mut l = lock(&tmc.lock);
        if !l.online || !l.idle {
            return 0;
        }
        l.idle = false;
        tmc.idle.store(false, Ordering::Release);
        tmc.ignore.store(true, Ordering::Relaxed);
        // RACE (chasing stale wake-ups): a wake-up is valid only for the idle
        // period that computed it.
        l.wakeup = KTIME_MAX;
        tmc.wakeup.store(KTIME_MAX, Ordering::Release);
        let levels = self.walk_groups(cpu, |g, _child, mask| self.active_up(g, mask, cpu));
        self.stats.activate_walks.add(1);
        levels
    }

    /// `tmigr_cpu_deactivate`: `cpu` goes idle; `nextexp` is its global event
    /// ([`crate::base::TimerBase::global_event`]; a bare time is a window of
    /// one instant). `firstexp` in the result is `KTIME_MAX` unless this cpu
    /// idled the root: then it must wake at it.
    pub fn deactivate(&self, cpu: CpuId, nextexp: impl Into<Expiry>) -> WalkResult {
        let nextexp = nextexp.into();
        let tmc = &self.cpus[cpu as usize];
        let mut l = lock(&tmc.lock);
        if !l.online {
            return WalkResult::NONE;
        }
        l.idle = true;
        tmc.idle.store(true, Ordering::Release);
        let mut data = WalkData::new(nextexp, cpu);
        let levels = self.walk_groups(cpu, |g, child, mask| {
            self.inactive_up(g, child, mask, &mut data, cpu)
        });
        // Another idle cpu already wakes by then: one wake-up is enough.
        if data.firstexp != KTIME_MAX && self.wakeup_covered(cpu, data.firstexp) {
            data.firstexp = KTIME_MAX;
        }
        l.wakeup = data.firstexp;
        tmc.wakeup.store(data.firstexp, Ordering::Release);
        self.stats.deactivate_walks.add(1);
        WalkResult {
            firstexp: data.firstexp,
            stopped_at: data.stopped_at,
            levels,
        }
    }

    /// `tmigr_cpu_new_timer`: idle `cpu` got a new first global event. Returns
    /// `None` if nothing was walked (cpu active/offline, a migrator is
    /// expiring its timers and will re-queue, or no event); else the walk,
    /// whose `firstexp` is this cpu's new wake-up (it reached an idle root).
    pub fn new_timer(&self, cpu: CpuId, nextexp: impl Into<Expiry>) -> Option<WalkResult> {
        let nextexp = nextexp.into();
        let tmc = &self.cpus[cpu as usize];
        let mut l = lock(&tmc.lock);
        if !l.online || !l.idle || nextexp.is_none() {
            return None;
        }
        if l.remote {
            // The migrator holds nothing now but will take this cpu's base
            // lock (which our caller holds) before re-queueing: it sees the
            // new timer then.
            return None;
        }
        let mut data = WalkData::new(nextexp, cpu);
        let levels = self.walk_groups(cpu, |g, child, mask| {
            self.update_events(g, child, mask, &mut data)
        });
        if data.firstexp != KTIME_MAX && self.wakeup_covered(cpu, data.firstexp) {
            data.firstexp = KTIME_MAX;
        }
        // The wake-up this cpu's sleep is programmed for still holds (its
        // thread sleeps until then or a kick): others may rely on it, so a
        // walk that did not reach an idle root does not forget it.
        l.wakeup = l.wakeup.min(data.firstexp);
        tmc.wakeup.store(l.wakeup, Ordering::Release);
        data.firstexp = l.wakeup;
        self.stats.new_timer_walks.add(1);
        Some(WalkResult {
            firstexp: data.firstexp,
            stopped_at: data.stopped_at,
            levels,
        })
    }

    /// `tmigr_handle_remote`: active `cpu` expires the due events of the
    /// groups it is migrator of (through `rx`). Returns the number of idle
    /// cpus handled.
    ///
    /// RACE (livelock in remote expiry): `now` is sampled once by the caller.
    /// Each popped event names the cpu of its `soft`, whose window is open, so
    /// handling it either backs off (owner woke: it expires itself) or expires
    /// every timer of that cpu whose deadline is `<= now` and re-queues the
    /// cpu's next event, whose deadline is after `now`. A group event is
    /// re-queued with an open window again only for another cpu whose
    /// deadline passed; each handled cpu leaves the set of such cpus for good,
    /// so the walk ends, however fast time moves meanwhile. (Had an event
    /// named the cpu of its `hard` instead, a group whose earliest deadline
    /// and earliest window end belong to different cpus would hand the
    /// migrator the same untouched cpu for ever: WINDOWS in the crate docs.)
    pub fn handle_remote(&self, cpu: CpuId, now: u64, rx: &mut dyn RemoteExpiry) -> u32 {
        let tmc = &self.cpus[cpu as usize];
        if !tmc.online.load(Ordering::Acquire) {
            return 0;
        }
        let mut handled = 0;
        self.walk_groups(cpu, |g, _child, mask| loop {
            // Handle the group only while we are its migrator (or it has none).
            if !self.check_migrator(g, mask) {
                return true;
            }
            let evt = {
                let mut gl = lock(&self.groups[g as usize].lock);
                self.next_expired_groupevt(g, &mut gl, now)
            };
            match evt {
                Some(e) => {
                    let level = self.groups[g as usize].level.load(Ordering::Relaxed) as usize;
                    if level < self.crossnode_level && self.node_of(e.cpu) != self.node_of(cpu) {
                        self.stats.cross_node_below_crossnode.add(1);
                    }
                    if self.handle_remote_cpu(e.cpu, now, cpu, rx) {
                        handled += 1;
                    }
                }
                None => return false,
            }
        });
        handled
    }

    /// `tmigr_handle_remote_cpu`: expire idle `cpu`'s due movable timers on
    /// `migrator` and re-queue its next event. True if it expired.
    fn handle_remote_cpu(
        &self,
        cpu: CpuId,
        now: u64,
        migrator: CpuId,
        rx: &mut dyn RemoteExpiry,
    ) -> bool {
        let tmc = &self.cpus[cpu as usize];
        {
            let mut l = lock(&tmc.lock);
            // Invariant 5: one remote handler at a time (`remote`), and none
            // for a cpu that woke (it expires its own timers) or left.
            if !l.online || !l.idle || l.remote {
                self.stats.remote_backoffs.add(1);
                return false;
            }
            l.remote = true;
            l.wakeup = KTIME_MAX;
            tmc.wakeup.store(KTIME_MAX, Ordering::Release);
        }
        self.hook(Hook::RemoteBeforeExpire { migrator, cpu });
        rx.expire_movable(cpu, now);
        let mut res = None;
        rx.with_base_locked(cpu, &mut |nextexp| {
            let mut l = lock(&tmc.lock);
            l.remote = false;
            // Re-queue even if nothing new is pending: the popped event may
            // have been the one standing for the whole idle subtree.
            if l.online && l.idle {
                let mut data = WalkData::new(nextexp, cpu);
                let levels = self.walk_groups(cpu, |g, child, mask| {
                    self.update_events(g, child, mask, &mut data)
                });
                res = Some(WalkResult {
                    firstexp: data.firstexp,
                    stopped_at: data.stopped_at,
                    levels,
                });
            }
        });
        if let Some(r) = res {
            rx.requeued(r);
        }
        self.stats.remote_cpu_handled.add(1);
        true
    }

    /// `tmigr_cpu_offline`: `cpu` leaves the hierarchy (its timers are the
    /// caller's business). If `firstexp` of the result is not `KTIME_MAX`,
    /// `cpu` was the last active one and events are pending: another online
    /// cpu must be made active (`tmigr_trigger_active`).
    pub fn offline(&self, cpu: CpuId) -> WalkResult {
        let tmc = &self.cpus[cpu as usize];
        let mut l = lock(&tmc.lock);
        if !l.online {
            return WalkResult::NONE;
        }
        l.online = false;
        tmc.online.store(false, Ordering::Release);
        l.idle = true;
        tmc.idle.store(true, Ordering::Release);
        l.wakeup = KTIME_MAX;
        tmc.wakeup.store(KTIME_MAX, Ordering::Release);
        let mut data = WalkData::new(Expiry::NONE, cpu);
        let levels = self.walk_groups(cpu, |g, child, mask| {
            self.inactive_up(g, child, mask, &mut data, cpu)
        });
        self.stats.deactivate_walks.add(1);
        WalkResult {
            firstexp: data.firstexp,
            stopped_at: data.stopped_at,
            levels,
        }
    }

    /// `tmigr_cpu_prepare`: sets up the groups of `cpu` (growing the
    /// hierarchy if needed) before it ever runs, without making it active.
    /// Callable from any thread (the VMM's control thread, another vCPU), as
    /// the kernel's prepare callback runs on an online CPU; idempotent. The
    /// result says where the reconciliation of a new root stopped (kick its
    /// migrator) and, in `firstexp`, a wake-up someone must honour if the
    /// new root turned out idle with events and no idle cpu already wakes
    /// for them (see [`Hierarchy::wakeup_covered`]).
    pub fn prepare(&self, cpu: CpuId) -> WalkResult {
        assert!(
            (cpu as usize) < self.cpus.len(),
            "cpu {cpu} beyond max_cpus"
        );
        let mut setup = lock(&self.setup);
        if self.cpus[cpu as usize].group.load(Ordering::Acquire) != NO_IDX {
            return WalkResult::NONE;
        }
        let mut res = WalkResult::NONE;
        if let Some((old, _new)) = self.setup_groups(&mut setup, cpu) {
            let mut data = WalkData::new(Expiry::NONE, cpu);
            self.reconcile_new_root(old, &mut data, cpu);
            if data.firstexp != KTIME_MAX && self.wakeup_covered(cpu, data.firstexp) {
                data.firstexp = KTIME_MAX;
            }
            res.firstexp = data.firstexp;
            res.stopped_at = data.stopped_at;
        }
        drop(setup);
        res
    }

    /// `tmigr_cpu_online`: `cpu` joins ([`prepare`](Self::prepare) first if
    /// nobody prepared it: the groups are then set up on the caller's thread)
    /// and becomes active. The result is the preparation's (see `prepare`),
    /// with the levels of the activation walk.
    pub fn online(&self, cpu: CpuId) -> WalkResult {
        let mut res = self.prepare(cpu);
        {
            let tmc = &self.cpus[cpu as usize];
            let mut l = lock(&tmc.lock);
            if l.online {
                return WalkResult::NONE;
            }
            l.online = true;
            l.idle = true;
            l.wakeup = KTIME_MAX;
            tmc.online.store(true, Ordering::Release);
        }
        res.levels = self.activate(cpu);
        res
    }

    /// RACE (a new root published before its mask is set): the old root may
    /// be active or idle when a new root is put above it, and walkers of the
    /// old root's subtree run concurrently. Every new group above the old
    /// root (one new root, or with nodes a chain of the old root's node up
    /// to the crossnode level) is created with the bit of the group below
    /// it active and as migrator (its mask set at creation, never zero), and
    /// published only then. Here, after the publication, the old root's real
    /// state is reconciled: a read-modify-write on the old root's state (a
    /// seq bump, AcqRel) is totally ordered with a walker's CAS that idles
    /// it. If ours comes first, that walker's CAS reads our value (Acquire),
    /// synchronises with our Release, and so sees the published parent and
    /// propagates upwards itself. If the walker's comes first, we read the
    /// old root idle and `inactive_up` clears its bit and queues its first
    /// event above, going up while the groups become idle. Either way no
    /// bogus active bit or migrator survives and no idle event is left out.
    ///
    /// RACE (hotplug against idle entry/exit, the kernel's "Fix another race
    /// between hotplug and idle entry/exit"): this is why the reconciliation
    /// is a read-modify-write and not a plain load of the old root's state;
    /// `tests/loom.rs` (`loom_kernel_fix_hotplug_vs_idle`) fails without it.
    fn reconcile_new_root(&self, old: u32, data: &mut WalkData, cpu: CpuId) {
        let old_grp = &self.groups[old as usize];
        old_grp.state.fetch_add(1 << 16, Ordering::AcqRel);
        let mut child = old;
        loop {
            let p = self.groups[child as usize].parent.load(Ordering::Acquire);
            if p == NO_IDX {
                break;
            }
            let mask = self.groups[child as usize]
                .groupmask
                .load(Ordering::Relaxed);
            if self.inactive_up(p, Some(child), mask, data, cpu) {
                break;
            }
            child = p;
        }
    }

    fn alloc_group(&self, s: &mut Setup, level: usize, node: u32) -> u32 {
        let idx = s.ngroups;
        assert!(
            (idx as usize) < self.groups.len(),
            "tmigr: group arena exhausted ({} groups)",
            self.groups.len()
        );
        s.ngroups += 1;
        let g = &self.groups[idx as usize];
        // Not reachable by any walker until a parent/group link to it is
        // published (Release), so Relaxed initialisation is enough.
        g.state.store(TmigrState::IDLE.pack(), Ordering::Relaxed);
        g.level.store(level as u8, Ordering::Relaxed);
        g.node.store(node, Ordering::Relaxed);
        g.num_children.store(0, Ordering::Relaxed);
        g.parent.store(NO_IDX, Ordering::Relaxed);
        g.ignore.store(true, Ordering::Relaxed);
        while s.levels.len() <= level {
            s.levels.push(Vec::new());
        }
        s.levels[level].push(idx);
        idx
    }

    fn add_child(&self, g: u32, child: u32) -> u8 {
        let grp = &self.groups[g as usize];
        let slot = grp.num_children.load(Ordering::Relaxed);
        debug_assert!((slot as usize) < self.group_size);
        grp.children[slot as usize].store(child, Ordering::Release);
        grp.num_children.store(slot + 1, Ordering::Relaxed);
        slot
    }

    /// `tmigr_setup_groups`: attach `cpu` to a level-0 group with room (same
    /// node below the crossnode level), creating groups upwards as needed.
    /// When the new chain reaches the old root's level without finding room,
    /// it is joined with the old root under a new root one level up; below
    /// the crossnode level a group never takes children of two nodes, so if
    /// the nodes differ both the old root and the new chain get a parent of
    /// their own node, level by level, until the crossnode level, where the
    /// new root takes both (the kernel's "Fix imbalanced NUMA trees"; every
    /// vCPU stays at the same depth, the old root's chain climbs exactly one
    /// level per group: "Fix off-by-one root mis-connection"). Links are
    /// published top-down, the cpu's own link last, so every group a walker
    /// can reach is connected up to the root. Returns (old root, new root)
    /// when a new root was created.
    fn setup_groups(&self, s: &mut Setup, cpu: CpuId) -> Option<(u32, u32)> {
        #[derive(Clone, Copy)]
        enum Ch {
            Cpu(CpuId),
            Group(u32),
        }
        let node = self.node_of(cpu);
        let mut links: Vec<(Ch, u32, u8)> = Vec::new();
        let mut cur = Ch::Cpu(cpu);
        let mut lvl = 0usize;
        let mut new_root = None;
        let child_idx = |c: Ch| match c {
            Ch::Cpu(c) => c,
            Ch::Group(g) => g,
        };
        let old_root = s.root;
        let root_level = (old_root != NO_IDX)
            .then(|| self.groups[old_root as usize].level.load(Ordering::Relaxed) as usize);
        loop {
            let cand = s.levels.get(lvl).and_then(|v| {
                v.iter().copied().find(|&g| {
                    let grp = &self.groups[g as usize];
                    (grp.num_children.load(Ordering::Relaxed) as usize) < self.group_size
                        && (lvl >= self.crossnode_level || grp.node.load(Ordering::Relaxed) == node)
                })
            });
            if let Some(g) = cand {
                // Existing groups are connected (or are the root): done.
                let slot = self.add_child(g, child_idx(cur));
                links.push((cur, g, slot));
                break;
            }
            let g = self.alloc_group(s, lvl, node);
            let slot = self.add_child(g, child_idx(cur));
            links.push((cur, g, slot));
            let Some(rl) = root_level else {
                // The first group: the root.
                s.root = g;
                self.root.store(g, Ordering::Release);
                break;
            };
            if lvl < rl {
                cur = Ch::Group(g);
                lvl += 1;
                continue;
            }
            // `g` is a new group beside the old root, at its level: join them.
            debug_assert_eq!(lvl, rl);
            let (mut o, mut c) = (old_root, g);
            let mut k = lvl + 1;
            loop {
                let o_node = self.groups[o as usize].node.load(Ordering::Relaxed);
                let single = k >= self.crossnode_level || o_node == node;
                // The old root's side: created with `o`'s bit active and as
                // migrator (see `reconcile_new_root`).
                let po = self.alloc_group(s, k, if single { node } else { o_node });
                let o_slot = self.add_child(po, o);
                self.groups[po as usize].state.store(
                    TmigrState {
                        active: 1 << o_slot,
                        migrator: 1 << o_slot,
                        seq: 0,
                    }
                    .pack(),
                    Ordering::Relaxed,
                );
                links.push((Ch::Group(o), po, o_slot));
                let pc = if single {
                    po
                } else {
                    self.alloc_group(s, k, node)
                };
                let c_slot = self.add_child(pc, c);
                links.push((Ch::Group(c), pc, c_slot));
                if single {
                    s.root = po;
                    self.root.store(po, Ordering::Release);
                    new_root = Some((old_root, po));
                    break;
                }
                (o, c) = (po, pc);
                k += 1;
            }
            break;
        }
        // Publish top-down; every store below is Release so that a walker's
        // Acquire of a link sees the fully initialised target.
        for &(child, parent, slot) in links.iter().rev() {
            match child {
                Ch::Group(h) => {
                    let hg = &self.groups[h as usize];
                    hg.groupmask.store(1 << slot, Ordering::Relaxed);
                    hg.parent.store(parent, Ordering::Release);
                }
                Ch::Cpu(c) => {
                    let tmc = &self.cpus[c as usize];
                    tmc.groupmask.store(1 << slot, Ordering::Relaxed);
                    tmc.group.store(parent, Ordering::Release);
                }
            }
        }
        if let Some((old_root, new_root)) = new_root {
            self.hook(Hook::NewRootPublished { old_root, new_root });
        }
        new_root
    }

    /// A full fence, for the kick protocol (see `service`).
    pub(crate) fn fence() {
        fence(Ordering::SeqCst);
    }

    /// A human-readable dump of every group (debugging and test failures).
    pub fn dump(&self) -> String {
        let s = lock(&self.setup);
        let mut out = format!("root {} levels {}\n", s.root, s.levels.len());
        for g in 0..s.ngroups {
            let grp = &self.groups[g as usize];
            let gl = lock(&grp.lock);
            let n = grp.num_children.load(Ordering::Relaxed) as usize;
            let children: Vec<u32> = (0..n)
                .map(|i| grp.children[i].load(Ordering::Relaxed))
                .collect();
            let evts: Vec<String> = (0..n)
                .map(|i| {
                    let e = gl.evts[i];
                    if e.hard == KTIME_MAX {
                        "-".to_string()
                    } else if e.soft == e.hard {
                        format!("{}@cpu{}", e.hard, e.cpu)
                    } else {
                        format!("[{},{}]@cpu{}", e.soft, e.hard, e.cpu)
                    }
                })
                .collect();
            out += &format!(
                "g{g} lvl{} parent {:?} mask {:#x} ignore {} state {:?} children {children:?} evts {evts:?} next {}\n",
                grp.level.load(Ordering::Relaxed),
                self.group_parent(g),
                grp.groupmask.load(Ordering::Relaxed),
                grp.ignore.load(Ordering::Relaxed),
                grp.load_state(),
                gl.next.hard as i128 - if gl.next.hard == KTIME_MAX { KTIME_MAX as i128 + 1 } else { 0 },
            );
        }
        out
    }

    // ----------------------------------------------------------------------
    // Invariants (quiescent: no operation in flight)
    // ----------------------------------------------------------------------

    /// Checks the design note's invariants 1-5 on a quiescent hierarchy.
    /// `pending(cpu)` returns the movable expiry an idle cpu relies on the
    /// hierarchy for (its global event unless its own wake-up covers it),
    /// [`Expiry::NONE`] if none. A queued event may be earlier than what it
    /// stands for (stale), never later: neither its window end nor its
    /// deadline.
    pub fn check_invariants<E: Into<Expiry>>(
        &self,
        pending: &dyn Fn(CpuId) -> E,
    ) -> Result<(), String> {
        let s = lock(&self.setup);
        if s.root == NO_IDX {
            return Ok(());
        }
        let cpu_active = |c: u32| {
            let t = &self.cpus[c as usize];
            t.online.load(Ordering::Acquire) && !t.idle.load(Ordering::Acquire)
        };
        for g in 0..s.ngroups {
            let grp = &self.groups[g as usize];
            let st = grp.load_state();
            let lvl = grp.level.load(Ordering::Relaxed);
            let n = grp.num_children.load(Ordering::Relaxed) as usize;
            // Invariant 1 (and the shape of the state).
            if st.migrator != TMIGR_NONE
                && (st.migrator.count_ones() != 1 || st.active & st.migrator == 0)
            {
                return Err(format!(
                    "group {g}: migrator {:#x} not an active child ({st:?})",
                    st.migrator
                ));
            }
            if st.migrator == TMIGR_NONE && st.active != 0 {
                return Err(format!(
                    "group {g}: active children but no migrator ({st:?})"
                ));
            }
            // Quiescent: the active mask is exactly the active children.
            let mut expect = 0u8;
            for slot in 0..n {
                let c = grp.children[slot].load(Ordering::Acquire);
                let active = if lvl == 0 {
                    cpu_active(c)
                } else {
                    self.groups[c as usize].load_state().active != 0
                };
                if active {
                    expect |= 1 << slot;
                }
            }
            if st.active != expect {
                return Err(format!(
                    "group {g} (level {lvl}): active {:#x}, children active {expect:#x}",
                    st.active
                ));
            }
            if g != s.root && grp.parent.load(Ordering::Acquire) == NO_IDX {
                return Err(format!("group {g} is not connected"));
            }
            // Invariant 3 for groups: an idle group's first event is in its parent.
            let gl = lock(&grp.lock);
            let p = grp.parent.load(Ordering::Acquire);
            if st.active == 0 && gl.next.hard != KTIME_MAX && p != NO_IDX {
                let slot = grp.groupmask.load(Ordering::Relaxed).trailing_zeros() as usize;
                let pl = lock(&self.groups[p as usize].lock);
                let queued = pl.evts[slot];
                if queued.hard > gl.next.hard
                    || queued.soft > gl.next.soft
                    || grp.ignore.load(Ordering::Relaxed)
                {
                    return Err(format!(
                        "idle group {g}: first event {:?} not queued in parent {p} (has {queued:?})",
                        gl.next
                    ));
                }
            }
        }
        // Invariant 2.
        let any_active = (0..self.cpus.len() as u32).any(cpu_active);
        let root = &self.groups[s.root as usize];
        if any_active {
            match self.responsible_cpu(s.root) {
                Some(c) if cpu_active(c) => {}
                other => {
                    return Err(format!(
                    "a cpu is active but the root's migrator chain reaches {other:?} (root {:?})",
                    root.load_state()
                ))
                }
            }
        }
        for c in 0..self.cpus.len() as u32 {
            let t = &self.cpus[c as usize];
            let l = lock(&t.lock);
            // Invariant 5 (quiescent form): no remote handling in flight.
            if l.remote {
                return Err(format!("cpu {c}: remote set while quiescent"));
            }
            if !l.online || !l.idle {
                continue;
            }
            // Invariant 3 for cpus.
            let need: Expiry = pending(c).into();
            if !need.is_none() {
                let g = t.group.load(Ordering::Acquire);
                let slot = t.groupmask.load(Ordering::Relaxed).trailing_zeros() as usize;
                let gl = lock(&self.groups[g as usize].lock);
                let queued = gl.evts[slot];
                if queued.hard > need.hard
                    || queued.soft > need.soft
                    || t.ignore.load(Ordering::Relaxed)
                {
                    return Err(format!(
                        "idle cpu {c}: movable event {need:?} not queued in group {g} (has {:?})",
                        gl.evts[slot]
                    ));
                }
            }
        }
        // Invariant 4: an idle root's first expiry is some idle cpu's wake-up.
        let rs = root.load_state();
        let rnext = root.next_hard.load(Ordering::Acquire);
        if rs.active == 0 && rnext != KTIME_MAX {
            let covered = (0..self.cpus.len()).any(|c| {
                let t = &self.cpus[c];
                t.online.load(Ordering::Acquire) && t.wakeup.load(Ordering::Acquire) <= rnext
            });
            if !covered {
                return Err(format!(
                    "root idle with first expiry {rnext} but no cpu wakes for it"
                ));
            }
        }
        Ok(())
    }
}
