//! What `fleet` reports: one record per VM, the aggregate over the fleet, and the text summary.
//! The JSON schema is in docs/fleet.md.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use super::procfs::MemSample;
use quietvm_vmm::stats::VmStats;

/// Everything measured about one VM (one `quietvm run` process).
#[derive(Debug, Clone, Serialize)]
pub struct VmRecord {
    /// 0-based, in launch order.
    pub index: u32,
    /// The config file it ran.
    pub config: String,
    /// Its process id (`None` if it could not be started).
    pub pid: Option<u32>,
    /// When it was spawned, from the fleet's start, in ns.
    pub launched_at_ns: u64,
    /// It exited with code 0 and wrote statistics.
    pub ok: bool,
    /// Its exit code, if it exited (`None` if a signal ended it or it never started).
    pub exit_code: Option<i32>,
    /// The signal that ended it, if one did.
    pub signal: Option<i32>,
    /// Why it failed, in one line (`None` when `ok`).
    pub error: Option<String>,
    /// From just before its spawn to its first byte on standard output (the guest's first console
    /// line), in ns.
    pub startup_ns: Option<u64>,
    /// Bytes it wrote to standard output (the guest console).
    pub stdout_bytes: u64,
    /// The last line of its console that is not empty (the built-in guest's result line).
    pub last_output_line: Option<String>,
    /// From just before its spawn to its reaping, in ns.
    pub run_ns: u64,
    /// `run_ns` minus its statistics' `wall_ns` (the vCPU threads' run): the time the process spent
    /// outside the guest run, starting (exec, KVM set-up, loading the guest) and ending (statistics,
    /// exit). A start-up figure for workloads that print nothing until they end.
    pub outside_run_ns: Option<u64>,
    /// Peak resident set size (`wait4`'s `ru_maxrss`).
    pub max_rss_kib: Option<u64>,
    /// CPU time as `wait4` reports it for the whole process (a cross-check of the stats' figures).
    pub rusage_user_ns: Option<u64>,
    pub rusage_system_ns: Option<u64>,
    /// The last `/proc/PID/smaps` sample taken while it ran, and how many were taken.
    pub memory: Option<MemSample>,
    pub memory_samples: u32,
    /// VMM memory overhead: `max_rss_kib` minus the guest pages touched (`memory.guest_rss_kib`).
    pub vmm_overhead_kib: Option<u64>,
    /// The same from the proportional set size: `memory.pss_kib - memory.guest_pss_kib`.
    pub vmm_overhead_pss_kib: Option<u64>,
    /// From its statistics (0 without them): vCPUs, host wakeups of its vCPU threads (quietvm's count
    /// and the kernel's), per second of its `wall_ns`, and the process CPU time (getrusage).
    pub vcpus: u32,
    pub host_wakeups: u64,
    pub kernel_voluntary_switches: u64,
    pub host_wakeups_per_s: f64,
    pub kernel_voluntary_switches_per_s: f64,
    pub cpu_user_ns: u64,
    pub cpu_system_ns: u64,
    /// Its complete `--stats-json` object (docs/stats.md), if it wrote one.
    pub stats: Option<VmStats>,
}

impl VmRecord {
    /// A record with nothing measured yet.
    pub fn new(index: u32, config: String) -> Self {
        VmRecord {
            index,
            config,
            pid: None,
            launched_at_ns: 0,
            ok: false,
            exit_code: None,
            signal: None,
            error: None,
            startup_ns: None,
            stdout_bytes: 0,
            last_output_line: None,
            run_ns: 0,
            outside_run_ns: None,
            max_rss_kib: None,
            rusage_user_ns: None,
            rusage_system_ns: None,
            memory: None,
            memory_samples: 0,
            vmm_overhead_kib: None,
            vmm_overhead_pss_kib: None,
            vcpus: 0,
            host_wakeups: 0,
            kernel_voluntary_switches: 0,
            host_wakeups_per_s: 0.0,
            kernel_voluntary_switches_per_s: 0.0,
            cpu_user_ns: 0,
            cpu_system_ns: 0,
            stats: None,
        }
    }

    /// Fills the figures derived from the statistics and the memory samples.
    pub fn derive(&mut self) {
        if let Some(s) = &self.stats {
            self.vcpus = s.vcpus.len() as u32;
            self.host_wakeups = s.vcpus.iter().map(|v| v.host_wakeups).sum();
            self.kernel_voluntary_switches =
                s.vcpus.iter().map(|v| v.kernel_voluntary_switches).sum();
            let secs = s.wall_ns as f64 / 1e9;
            if secs > 0.0 {
                self.host_wakeups_per_s = self.host_wakeups as f64 / secs;
                self.kernel_voluntary_switches_per_s = self.kernel_voluntary_switches as f64 / secs;
            }
            self.cpu_user_ns = s.process_user_ns;
            self.cpu_system_ns = s.process_system_ns;
            self.outside_run_ns = Some(self.run_ns.saturating_sub(s.wall_ns));
        }
        if let Some(m) = &self.memory {
            self.vmm_overhead_kib = self
                .max_rss_kib
                .zip(m.guest_rss_kib)
                .map(|(rss, guest)| rss.saturating_sub(guest));
            self.vmm_overhead_pss_kib = m.guest_pss_kib.map(|g| m.pss_kib.saturating_sub(g));
        }
    }
}

/// Exact nearest-rank figures of a set of samples.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Dist {
    pub count: usize,
    pub min: u64,
    pub p50: u64,
    pub p99: u64,
    pub max: u64,
    pub mean: f64,
}

impl Dist {
    pub fn of(mut samples: Vec<u64>) -> Self {
        if samples.is_empty() {
            return Dist::default();
        }
        samples.sort_unstable();
        let n = samples.len();
        let rank = |p: f64| samples[((p * n as f64).ceil() as usize).clamp(1, n) - 1];
        Dist {
            count: n,
            min: samples[0],
            p50: rank(0.50),
            p99: rank(0.99),
            max: samples[n - 1],
            mean: samples.iter().sum::<u64>() as f64 / n as f64,
        }
    }
}

/// The fleet as a whole. Sums are over the VMs that wrote statistics (failed ones included if they
/// did); distributions are over the VMs that have the figure.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Aggregate {
    pub vms: usize,
    pub ok: usize,
    pub failed: usize,
    pub with_stats: usize,
    pub vcpus: u64,
    /// From the first spawn to the last VM reaped.
    pub wall_ns: u64,
    /// CPUs this host gives the fleet (`available_parallelism`).
    pub host_cpus: usize,
    pub host_wakeups: u64,
    pub kernel_voluntary_switches: u64,
    /// The sums of each VM's rate (its wakeups over its own `wall_ns`): the fleet's rate while all run.
    pub host_wakeups_per_s: f64,
    pub kernel_voluntary_switches_per_s: f64,
    /// `host_wakeups` by cause (docs/stats.md), summed over every vCPU of every VM with statistics.
    pub wakeup_causes: BTreeMap<String, u64>,
    pub cpu_user_ns: u64,
    pub cpu_system_ns: u64,
    /// `(cpu_user_ns + cpu_system_ns) / (wall_ns * host_cpus)`, in percent.
    pub cpu_percent_of_host: f64,
    pub max_rss_kib: Dist,
    pub guest_rss_kib: Dist,
    pub vmm_overhead_kib: Dist,
    pub vmm_overhead_pss_kib: Dist,
    pub startup_ns: Dist,
    pub outside_run_ns: Dist,
    /// VMs that produced output, over the time from the fleet's start to the last VM's first output.
    pub boots_per_s: f64,
}

impl Aggregate {
    pub fn of(records: &[VmRecord], wall_ns: u64, host_cpus: usize) -> Self {
        let with_stats: Vec<&VmRecord> = records.iter().filter(|r| r.stats.is_some()).collect();
        let cpu_user_ns = with_stats.iter().map(|r| r.cpu_user_ns).sum::<u64>();
        let cpu_system_ns = with_stats.iter().map(|r| r.cpu_system_ns).sum::<u64>();
        let host_ns = wall_ns as f64 * host_cpus.max(1) as f64;
        let collect = |f: &dyn Fn(&VmRecord) -> Option<u64>| -> Vec<u64> {
            records.iter().filter_map(f).collect()
        };
        let mut wakeup_causes = BTreeMap::new();
        for r in &with_stats {
            for v in r.stats.iter().flat_map(|s| &s.vcpus) {
                for (cause, n) in &v.wakeup_causes {
                    *wakeup_causes.entry(cause.clone()).or_insert(0) += n;
                }
            }
        }
        let startups = collect(&|r| r.startup_ns);
        // When the last VM's first output came, from the fleet's start.
        let last_boot = records
            .iter()
            .filter_map(|r| r.startup_ns.map(|s| r.launched_at_ns + s))
            .max()
            .unwrap_or(0);
        Aggregate {
            vms: records.len(),
            ok: records.iter().filter(|r| r.ok).count(),
            failed: records.iter().filter(|r| !r.ok).count(),
            with_stats: with_stats.len(),
            vcpus: with_stats.iter().map(|r| u64::from(r.vcpus)).sum(),
            wall_ns,
            host_cpus,
            host_wakeups: with_stats.iter().map(|r| r.host_wakeups).sum(),
            kernel_voluntary_switches: with_stats.iter().map(|r| r.kernel_voluntary_switches).sum(),
            host_wakeups_per_s: with_stats.iter().map(|r| r.host_wakeups_per_s).sum(),
            kernel_voluntary_switches_per_s: with_stats
                .iter()
                .map(|r| r.kernel_voluntary_switches_per_s)
                .sum(),
            wakeup_causes,
            cpu_user_ns,
            cpu_system_ns,
            cpu_percent_of_host: if host_ns > 0.0 {
                (cpu_user_ns + cpu_system_ns) as f64 / host_ns * 100.0
            } else {
                0.0
            },
            max_rss_kib: Dist::of(collect(&|r| r.max_rss_kib)),
            guest_rss_kib: Dist::of(collect(&|r| r.memory.and_then(|m| m.guest_rss_kib))),
            vmm_overhead_kib: Dist::of(collect(&|r| r.vmm_overhead_kib)),
            vmm_overhead_pss_kib: Dist::of(collect(&|r| r.vmm_overhead_pss_kib)),
            boots_per_s: if last_boot > 0 {
                startups.len() as f64 / (last_boot as f64 / 1e9)
            } else {
                0.0
            },
            startup_ns: Dist::of(startups),
            outside_run_ns: Dist::of(collect(&|r| r.outside_run_ns)),
        }
    }
}

/// Everything `fleet` measured (the `--json` document).
#[derive(Debug, Clone, Serialize)]
pub struct FleetReport {
    /// The config files, cycled over the VMs.
    pub configs: Vec<String>,
    /// The overrides given to every VM (`null`: each config's own).
    pub policy: Option<String>,
    pub workload: Option<String>,
    /// Extra guest args given to every VM.
    pub args: Vec<String>,
    pub duration_ms: Option<u64>,
    pub timeout_ms: Option<u64>,
    pub interval_ms: u64,
    pub sample_ms: u64,
    /// `/proc/loadavg` just before the first spawn and after the last VM ended.
    pub load_average_before: Option<[f64; 3]>,
    pub load_average_after: Option<[f64; 3]>,
    /// CPU time of the fleet process itself (spawning, reading the VMs' output, sampling /proc).
    pub fleet_cpu_ns: u64,
    pub aggregate: Aggregate,
    pub per_vm: Vec<VmRecord>,
    /// The signal (SIGINT, SIGTERM, SIGHUP) that interrupted the fleet: its running VMs were shut
    /// down and count as failed, the ones not yet started were not started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interrupted_by_signal: Option<i32>,
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn ms(ns: u64) -> f64 {
    ns as f64 / 1e6
}

/// The text summary printed on standard output.
pub fn render(r: &FleetReport) -> String {
    let a = &r.aggregate;
    let mut s = String::new();
    let load = |l: Option<[f64; 3]>| match l {
        Some([a, b, c]) => format!("{a:.2} {b:.2} {c:.2}"),
        None => "unknown".into(),
    };
    let _ = writeln!(
        s,
        "fleet: {} VMs of {} ({} vCPUs), policy {}, on {} host CPUs; wall {:.2} s; load average before {}, after {}",
        a.vms,
        r.configs.join(", "),
        a.vcpus,
        r.policy.as_deref().unwrap_or("as configured"),
        a.host_cpus,
        a.wall_ns as f64 / 1e9,
        load(r.load_average_before),
        load(r.load_average_after),
    );
    let _ = writeln!(
        s,
        "VMs: {} ok, {} failed, {} wrote statistics",
        a.ok, a.failed, a.with_stats
    );
    let _ = writeln!(
        s,
        "host wakeups of vCPU threads: quietvm {} ({:.1}/s), kernel voluntary switches {} ({:.1}/s)",
        a.host_wakeups,
        a.host_wakeups_per_s,
        a.kernel_voluntary_switches,
        a.kernel_voluntary_switches_per_s
    );
    let causes: Vec<String> = a
        .wakeup_causes
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|(c, n)| format!("{c} {n}"))
        .collect();
    if !causes.is_empty() {
        let _ = writeln!(s, "  by cause: {}", causes.join(", "));
    }
    let _ = writeln!(
        s,
        "VMM CPU: user {:.0} ms, system {:.0} ms: {:.1}% of the host ({} CPUs x {:.2} s)",
        ms(a.cpu_user_ns),
        ms(a.cpu_system_ns),
        a.cpu_percent_of_host,
        a.host_cpus,
        a.wall_ns as f64 / 1e9
    );
    let _ = writeln!(
        s,
        "memory per VM: peak RSS p50 {:.2} MiB (max {:.2}); guest pages touched p50 {:.2} MiB; VMM overhead (peak RSS - guest) p50 {:.2} MiB (max {:.2}, {} VMs sampled); PSS - guest p50 {:.2} MiB",
        mib(a.max_rss_kib.p50),
        mib(a.max_rss_kib.max),
        mib(a.guest_rss_kib.p50),
        mib(a.vmm_overhead_kib.p50),
        mib(a.vmm_overhead_kib.max),
        a.vmm_overhead_kib.count,
        mib(a.vmm_overhead_pss_kib.p50),
    );
    let _ = writeln!(
        s,
        "start-up (spawn to first guest output): p50 {:.1} ms, p99 {:.1} ms, min {:.1} ms, max {:.1} ms; {} VMs booted at {:.0}/s",
        ms(a.startup_ns.p50),
        ms(a.startup_ns.p99),
        ms(a.startup_ns.min),
        ms(a.startup_ns.max),
        a.startup_ns.count,
        a.boots_per_s
    );
    let _ = writeln!(
        s,
        "time outside the guest run (spawn to vCPU threads, and their end to exit): p50 {:.1} ms, p99 {:.1} ms",
        ms(a.outside_run_ns.p50),
        ms(a.outside_run_ns.p99)
    );
    let _ = writeln!(s, "fleet process CPU: {:.0} ms", ms(r.fleet_cpu_ns));
    let failed: Vec<&VmRecord> = r.per_vm.iter().filter(|v| !v.ok).collect();
    if !failed.is_empty() {
        let _ = writeln!(s, "failed VMs:");
        for v in failed {
            let how = match (v.exit_code, v.signal) {
                (Some(c), _) => format!("exit {c}"),
                (None, Some(sig)) => format!("signal {sig}"),
                (None, None) => "not run".into(),
            };
            let _ = writeln!(
                s,
                "  vm {} ({}): {how}: {}",
                v.index,
                v.config,
                v.error.as_deref().unwrap_or("no message")
            );
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dist_is_nearest_rank() {
        let d = Dist::of((1..=100).collect());
        assert_eq!((d.count, d.min, d.p50, d.p99, d.max), (100, 1, 50, 99, 100));
        assert_eq!(Dist::of(vec![]), Dist::default());
        assert_eq!(Dist::of(vec![7]).p99, 7);
    }

    #[test]
    fn aggregate_sums_the_vms_with_statistics() {
        let mut a = VmRecord::new(0, "a".into());
        a.ok = true;
        a.stats = Some(VmStats {
            policy: "pull".into(),
            workload: "hello".into(),
            exit_code: 0,
            outcome: String::new(),
            wall_ns: 2_000_000_000,
            process_user_ns: 10,
            process_system_ns: 20,
            vcpus: vec![quietvm_vmm::stats::VcpuStats {
                host_wakeups: 8,
                kernel_voluntary_switches: 9,
                wakeup_causes: [
                    ("control".to_owned(), 1),
                    ("own_pinned_timer".to_owned(), 7),
                ]
                .into_iter()
                .collect(),
                ..Default::default()
            }],
            timers: Default::default(),
            console_dropped_bytes: 0,
            per_fired_timer: None,
            peer: None,
        });
        a.max_rss_kib = Some(5000);
        a.memory = Some(MemSample {
            rss_kib: 4000,
            pss_kib: 1500,
            anon_kib: 1000,
            guest_rss_kib: Some(300),
            guest_pss_kib: Some(300),
        });
        a.startup_ns = Some(10_000_000);
        a.launched_at_ns = 10_000_000;
        a.derive();
        assert_eq!(a.host_wakeups_per_s, 4.0);
        assert_eq!(a.vmm_overhead_kib, Some(4700));
        assert_eq!(a.vmm_overhead_pss_kib, Some(1200));
        let mut b = VmRecord::new(1, "b".into());
        b.error = Some("bad".into());
        b.derive();
        let agg = Aggregate::of(&[a, b], 1_000_000_000, 2);
        assert_eq!((agg.vms, agg.ok, agg.failed, agg.with_stats), (2, 1, 1, 1));
        assert_eq!(agg.host_wakeups, 8);
        assert_eq!(agg.kernel_voluntary_switches, 9);
        assert_eq!(agg.wakeup_causes["own_pinned_timer"], 7);
        assert_eq!(agg.cpu_user_ns + agg.cpu_system_ns, 30);
        assert_eq!(agg.startup_ns.count, 1);
        assert_eq!(agg.boots_per_s, 50.0);
    }
}
