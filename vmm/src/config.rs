//! The VM configuration: a TOML file (see `configs/`) whose settings command-line flags override.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use thiserror::Error;
use tmigr::service::Policy;

/// How a VM's timers are handled: by quietvm in userspace with one of the placement policies, or, as a
/// baseline, by KVM's in-kernel LAPIC (the guest multiplexes its timers onto the TSC-deadline timer and
/// `HLT` stays in the kernel: what Firecracker or Cloud Hypervisor users get).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmPolicy {
    /// quietvm's timer device with this placement policy for movable timers.
    Userspace(Policy),
    /// KVM's in-kernel irqchip and LAPIC timer.
    KvmLapic,
    /// Not quietvm at all: the same guest under QEMU with KVM (its in-kernel LAPIC), as a peer to
    /// measure against (docs/qemu.md). `quietvm run` launches `qemu-system-x86_64` for it.
    Qemu,
}

impl VmPolicy {
    /// Every policy `compare` knows, in its default order.
    pub const ALL: [VmPolicy; 4] = [
        VmPolicy::KvmLapic,
        VmPolicy::Userspace(Policy::Local),
        VmPolicy::Userspace(Policy::Push),
        VmPolicy::Userspace(Policy::Pull),
    ];
}

impl fmt::Display for VmPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VmPolicy::Userspace(p) => write!(f, "{p}"),
            VmPolicy::KvmLapic => f.write_str("kvm-lapic"),
            VmPolicy::Qemu => f.write_str("qemu"),
        }
    }
}

impl FromStr for VmPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "kvm-lapic" => Ok(VmPolicy::KvmLapic),
            "qemu" => Ok(VmPolicy::Qemu),
            _ => s.parse().map(VmPolicy::Userspace).map_err(|_| {
                format!("unknown policy `{s}` (local, push, pull, kvm-lapic or qemu)")
            }),
        }
    }
}

/// Workloads the built-in guest knows (docs/guest.md).
pub const BUILTIN_WORKLOADS: &[&str] = &[
    "hello",
    "timers",
    "idle-movable",
    "all-idle",
    "mixed",
    "rearm-heavy",
    "ping-pong",
    "cancel-race",
    "abi-check",
    "triple-fault",
    "never-ack",
    "hotplug",
    "replay",
];

/// Everything needed to launch one VM.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct VmConfig {
    /// Number of vCPUs.
    pub vcpus: u32,
    /// vCPUs online at boot (0..K); the others start parked until `vcpu-online` (docs/api.md).
    /// `None`: all of them.
    pub vcpus_online: Option<u32>,
    /// Guest memory in MiB.
    pub memory_mib: u64,
    /// Guest workload, passed to the guest as `workload=...`.
    pub workload: String,
    /// Workload duration in milliseconds, passed as `duration_ms=...`.
    pub duration_ms: u64,
    /// Placement policy for movable timers: local, push or pull; or kvm-lapic (the in-kernel baseline).
    #[serde(serialize_with = "serialize_policy")]
    pub policy: VmPolicy,
    /// Seed for the guest's random choices, passed as `seed=...`.
    pub seed: u64,
    /// A guest ELF of your own instead of the built-in test guest (docs/boot.md).
    pub guest: Option<PathBuf>,
    /// Extra `key=value` words for the guest's args.
    pub args: Vec<String>,
    /// Timer ids available to the guest.
    pub max_timers: u32,
    /// End the VM as failed if it has not ended after this many milliseconds (0 = never).
    pub timeout_ms: u64,
    /// A file placed in guest memory for the workload (boot info `payload_*`), e.g. the `replay`
    /// workload's trace (`quietvm replay TRACE --guest-out FILE`).
    pub payload: Option<PathBuf>,
    /// vCPUs kept out of the timer hierarchy (docs/timer-abi.md, "Isolated vCPUs"): they never expire
    /// another vCPU's timer, and their own movable timers expire on themselves.
    pub isolated_vcpus: Vec<u32>,
    /// The NUMA node of each vCPU (`vcpu_nodes[i]`), from `vcpu-nodes` or `numa-nodes`; empty: one
    /// node. Hierarchy groups below the cross-node level hold one node's vCPUs.
    pub vcpu_nodes: Vec<u32>,
    /// Children per hierarchy group (2..=8; the kernel's 8). Smaller groups build deeper trees from
    /// few vCPUs, to try hierarchy shapes on KVM.
    pub hierarchy_group_size: u32,
    /// Install the seccomp filters (docs/limits.md); `false` only for debugging (`--no-seccomp`).
    pub seccomp: bool,
    /// The least slack (ns) quietvm applies to MOVABLE armings (docs/timer-abi.md, "Timer windows"):
    /// a guest's smaller slack is raised to it; pinned armings keep the guest's own. 0: none. At most
    /// `quietvm_abi::timer::MAX_SLACK_NS`. No effect under `kvm-lapic`.
    pub timer_slack_ns: u64,
    /// A halt whose next event is at most this far off (ns) waits for it awake instead of sleeping
    /// (docs/performance.md, "Short halts"), as KVM's own halts poll (`halt_poll_ns`, 200 us by
    /// default, which the `kvm-lapic` baseline uses). Default 0: always sleep, since on the
    /// development host spinning cost more CPU than the wakeups it saved. At most
    /// [`MAX_HALT_POLL_NS`]. Not under `kvm-lapic` (KVM's own setting applies there).
    pub halt_poll_ns: u64,
}

/// The longest `halt-poll-ns`: 1 ms.
pub const MAX_HALT_POLL_NS: u64 = 1_000_000;

impl Default for VmConfig {
    fn default() -> Self {
        VmConfig {
            vcpus: 1,
            vcpus_online: None,
            memory_mib: 64,
            workload: "hello".into(),
            duration_ms: 1000,
            policy: VmPolicy::Userspace(Policy::Pull),
            seed: 1,
            guest: None,
            args: Vec::new(),
            max_timers: 4096,
            timeout_ms: 0,
            payload: None,
            isolated_vcpus: Vec::new(),
            vcpu_nodes: Vec::new(),
            hierarchy_group_size: 8,
            seccomp: true,
            timer_slack_ns: 0,
            halt_poll_ns: 0,
        }
    }
}

fn serialize_policy<S: serde::Serializer>(p: &VmPolicy, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&p.to_string())
}

/// A configuration that cannot be used. Each variant is one line for the user.
#[derive(Debug, Error)]
pub enum ConfigError {
    /// The file could not be read (one line from [`crate::limits::read_input`]).
    #[error("{0}")]
    Read(String),
    #[error("config {path} does not parse: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("--vcpus must be at least 1")]
    NoVcpus,
    #[error("--vcpus-online {0} must be between 1 and --vcpus {1}")]
    BadVcpusOnline(u32, u32),
    #[error("--vcpus {0} is more than quietvm supports (at most {1})")]
    TooManyVcpus(u32, u32),
    #[error("unknown workload `{0}`; the built-in guest knows: {list}", list = BUILTIN_WORKLOADS.join(", "))]
    UnknownWorkload(String),
    #[error("guest argument `{0}` is not of the form key=value with no spaces")]
    BadArg(String),
    #[error("--max-timers must be between 1 and {max}", max = MAX_TIMERS_LIMIT)]
    BadMaxTimers,
    #[error("--memory-mib must be between 2 and {max}", max = MAX_MEMORY_MIB)]
    BadMemory,
    #[error("isolated vCPU {0} does not exist (the VM has {1})")]
    BadIsolated(u32, u32),
    #[error("vcpu-nodes names {0} vCPUs; the VM has {1}")]
    BadNodeCount(usize, u32),
    #[error("NUMA node {0} is out of range (at most {max})", max = MAX_NUMA_NODES - 1)]
    BadNode(u32),
    #[error("hierarchy-group-size must be 2..=8, not {0}")]
    BadGroupSize(u32),
    #[error("halt-poll-ns {0} is more than {MAX_HALT_POLL_NS} (1 ms)")]
    BadHaltPoll(u64),
    #[error("timer-slack-ns {0} is more than the most quietvm applies ({max} ns)", max = quietvm_abi::timer::MAX_SLACK_NS)]
    BadTimerSlack(u64),
}

/// The most NUMA nodes a VM may have.
pub const MAX_NUMA_NODES: u32 = 64;

/// `nodes` NUMA nodes of consecutive vCPUs: vCPU `i` on node `i * nodes / vcpus`. A node count the
/// validation refuses (0, or past the limit) gives a map it refuses.
fn nodes_in_blocks(vcpus: u32, nodes: u32) -> Vec<u32> {
    if nodes == 0 {
        return vec![MAX_NUMA_NODES; vcpus as usize];
    }
    (0..vcpus)
        .map(|i| (u64::from(i) * u64::from(nodes) / u64::from(vcpus.max(1))) as u32)
        .map(|n| {
            if nodes > MAX_NUMA_NODES {
                MAX_NUMA_NODES
            } else {
                n
            }
        })
        .collect()
}

/// Parses a vCPU list as the kernel writes CPU lists (`isolcpus=`, `cpuset.cpus`): comma-separated
/// numbers and inclusive ranges, e.g. `0-3,7`. Lists of more than `limit` entries are refused.
pub fn parse_cpu_list(s: &str, limit: u32) -> Result<Vec<u32>, String> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let num = |t: &str| {
            t.trim()
                .parse::<u32>()
                .map_err(|_| format!("`{t}` in the vCPU list `{s}` is not a number"))
        };
        let (lo, hi) = match part.split_once('-') {
            Some((a, b)) => (num(a)?, num(b)?),
            None => (num(part)?, num(part)?),
        };
        if lo > hi {
            return Err(format!("`{part}` in the vCPU list `{s}` runs backwards"));
        }
        if hi >= limit || out.len() as u64 + u64::from(hi - lo) >= u64::from(limit) {
            return Err(format!("the vCPU list `{s}` goes past vCPU {}", limit - 1));
        }
        out.extend(lo..=hi);
    }
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

/// A vCPU list in a config: an array of numbers or a kernel-style list string.
#[derive(Deserialize)]
#[serde(untagged)]
enum CpuListValue {
    Numbers(Vec<u32>),
    Text(String),
}

impl CpuListValue {
    fn into_list(self) -> Result<Vec<u32>, String> {
        match self {
            CpuListValue::Numbers(mut v) => {
                v.sort_unstable();
                v.dedup();
                Ok(v)
            }
            CpuListValue::Text(s) => parse_cpu_list(&s, MAX_VCPUS),
        }
    }
}

/// The most guest memory quietvm maps (its page tables cover 64 GiB).
pub const MAX_MEMORY_MIB: u64 = 64 * 1024;
/// The most timer ids a VM may have.
pub const MAX_TIMERS_LIMIT: u32 = 1 << 20;
/// The most vCPUs quietvm runs (a further bound is KVM's own, checked when the VM is created).
pub const MAX_VCPUS: u32 = 1024;

impl VmConfig {
    /// Reads a TOML config file; keys left out keep their defaults.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let bytes = crate::limits::read_input(path, crate::limits::InputKind::Config)
            .map_err(ConfigError::Read)?;
        let text = String::from_utf8(bytes).map_err(|_| ConfigError::Parse {
            path: path.to_owned(),
            message: "not UTF-8 text".into(),
        })?;
        Self::from_toml(&text).map_err(|message| ConfigError::Parse {
            path: path.to_owned(),
            message,
        })
    }

    /// Parses TOML text over the defaults.
    pub fn from_toml(text: &str) -> Result<Self, String> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields, rename_all = "kebab-case")]
        struct Partial {
            vcpus: Option<u32>,
            vcpus_online: Option<u32>,
            memory_mib: Option<u64>,
            workload: Option<String>,
            duration_ms: Option<u64>,
            policy: Option<String>,
            seed: Option<u64>,
            guest: Option<PathBuf>,
            args: Option<Vec<String>>,
            max_timers: Option<u32>,
            timeout_ms: Option<u64>,
            payload: Option<PathBuf>,
            #[serde(alias = "isolated_vcpus")]
            isolated_vcpus: Option<CpuListValue>,
            #[serde(alias = "numa_nodes")]
            numa_nodes: Option<u32>,
            #[serde(alias = "vcpu_nodes")]
            vcpu_nodes: Option<Vec<u32>>,
            #[serde(alias = "hierarchy_group_size")]
            hierarchy_group_size: Option<u32>,
            seccomp: Option<bool>,
            #[serde(alias = "timer_slack_ns")]
            timer_slack_ns: Option<u64>,
            #[serde(alias = "halt_poll_ns")]
            halt_poll_ns: Option<u64>,
        }
        let p: Partial = toml::from_str(text).map_err(|e| e.message().to_string())?;
        let d = VmConfig::default();
        let policy = match p.policy {
            Some(name) => name.parse()?,
            None => d.policy,
        };
        let vcpus = p.vcpus.unwrap_or(d.vcpus);
        let vcpu_nodes = match (p.vcpu_nodes, p.numa_nodes) {
            (Some(_), Some(_)) => return Err("give numa-nodes or vcpu-nodes, not both".into()),
            (Some(map), None) => map,
            (None, Some(n)) => nodes_in_blocks(vcpus, n),
            (None, None) => Vec::new(),
        };
        Ok(VmConfig {
            vcpus,
            vcpus_online: p.vcpus_online,
            memory_mib: p.memory_mib.unwrap_or(d.memory_mib),
            workload: p.workload.unwrap_or(d.workload),
            duration_ms: p.duration_ms.unwrap_or(d.duration_ms),
            policy,
            seed: p.seed.unwrap_or(d.seed),
            guest: p.guest,
            args: p.args.unwrap_or_default(),
            max_timers: p.max_timers.unwrap_or(d.max_timers),
            timeout_ms: p.timeout_ms.unwrap_or(d.timeout_ms),
            payload: p.payload,
            isolated_vcpus: match p.isolated_vcpus {
                Some(v) => v.into_list()?,
                None => Vec::new(),
            },
            vcpu_nodes,
            hierarchy_group_size: p.hierarchy_group_size.unwrap_or(d.hierarchy_group_size),
            seccomp: p.seccomp.unwrap_or(d.seccomp),
            timer_slack_ns: p.timer_slack_ns.unwrap_or(d.timer_slack_ns),
            halt_poll_ns: p.halt_poll_ns.unwrap_or(d.halt_poll_ns),
        })
    }

    /// Checks what can be checked before KVM is opened.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.vcpus == 0 {
            return Err(ConfigError::NoVcpus);
        }
        if self.vcpus > MAX_VCPUS {
            return Err(ConfigError::TooManyVcpus(self.vcpus, MAX_VCPUS));
        }
        if let Some(k) = self.vcpus_online {
            if k == 0 || k > self.vcpus {
                return Err(ConfigError::BadVcpusOnline(k, self.vcpus));
            }
        }
        if self.guest.is_none() && !BUILTIN_WORKLOADS.contains(&self.workload.as_str()) {
            return Err(ConfigError::UnknownWorkload(self.workload.clone()));
        }
        if self.workload.is_empty() || self.workload.contains(char::is_whitespace) {
            return Err(ConfigError::UnknownWorkload(self.workload.clone()));
        }
        for arg in &self.args {
            let ok = arg.split_once('=').is_some_and(|(k, _)| !k.is_empty())
                && !arg.contains(char::is_whitespace);
            if !ok {
                return Err(ConfigError::BadArg(arg.clone()));
            }
        }
        if self.max_timers == 0 || self.max_timers > MAX_TIMERS_LIMIT {
            return Err(ConfigError::BadMaxTimers);
        }
        if !(2..=MAX_MEMORY_MIB).contains(&self.memory_mib) {
            return Err(ConfigError::BadMemory);
        }
        if !(2..=8).contains(&self.hierarchy_group_size) {
            return Err(ConfigError::BadGroupSize(self.hierarchy_group_size));
        }
        if self.halt_poll_ns > MAX_HALT_POLL_NS {
            return Err(ConfigError::BadHaltPoll(self.halt_poll_ns));
        }
        if self.timer_slack_ns > quietvm_abi::timer::MAX_SLACK_NS {
            return Err(ConfigError::BadTimerSlack(self.timer_slack_ns));
        }
        if let Some(&bad) = self.isolated_vcpus.iter().find(|&&c| c >= self.vcpus) {
            return Err(ConfigError::BadIsolated(bad, self.vcpus));
        }
        if !self.vcpu_nodes.is_empty() {
            if self.vcpu_nodes.len() != self.vcpus as usize {
                return Err(ConfigError::BadNodeCount(self.vcpu_nodes.len(), self.vcpus));
            }
            if let Some(&bad) = self.vcpu_nodes.iter().find(|&&n| n >= MAX_NUMA_NODES) {
                return Err(ConfigError::BadNode(bad));
            }
        }
        Ok(())
    }

    /// Sets `numa-nodes`: `nodes` nodes of consecutive vCPUs (as firmware numbers them).
    pub fn set_numa_nodes(&mut self, nodes: u32) {
        self.vcpu_nodes = nodes_in_blocks(self.vcpus, nodes);
    }

    /// What the statistics call the workload: the built-in guest's workload, or the path of a
    /// `--guest` image (whose workload quietvm does not know).
    pub fn workload_label(&self) -> String {
        match &self.guest {
            Some(path) => path.display().to_string(),
            None => self.workload.clone(),
        }
    }

    /// vCPUs online at boot.
    pub fn vcpus_online(&self) -> u32 {
        self.vcpus_online.unwrap_or(self.vcpus).min(self.vcpus)
    }

    /// The guest's `args` string (docs/boot.md).
    pub fn guest_args(&self) -> String {
        let mut words = vec![
            format!("workload={}", self.workload),
            format!("duration_ms={}", self.duration_ms),
            format!("seed={}", self.seed),
            format!("policy={}", self.policy),
        ];
        words.extend(self.args.iter().cloned());
        words.join(" ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_toml_gives_defaults() {
        assert_eq!(VmConfig::from_toml("").unwrap(), VmConfig::default());
    }

    #[test]
    fn toml_overrides_defaults() {
        let c = VmConfig::from_toml("vcpus = 8\nworkload = \"idle-movable\"\npolicy = \"local\"\n")
            .unwrap();
        assert_eq!(c.vcpus, 8);
        assert_eq!(c.workload, "idle-movable");
        assert_eq!(c.policy, VmPolicy::Userspace(Policy::Local));
        let c = VmConfig::from_toml("policy = \"kvm-lapic\"").unwrap();
        assert_eq!(c.policy, VmPolicy::KvmLapic);
        assert_eq!("qemu".parse::<VmPolicy>(), Ok(VmPolicy::Qemu));
        assert_eq!(VmPolicy::Qemu.to_string(), "qemu");
        assert!("qemu2".parse::<VmPolicy>().unwrap_err().contains("qemu"));
    }

    #[test]
    fn unknown_key_and_bad_policy_are_refused() {
        assert!(VmConfig::from_toml("vcpu = 8")
            .unwrap_err()
            .contains("vcpu"));
        assert!(VmConfig::from_toml("policy = \"fast\"")
            .unwrap_err()
            .contains("fast"));
    }

    #[test]
    fn validate_catches_bad_values() {
        let bad = |f: fn(&mut VmConfig)| {
            let mut c = VmConfig::default();
            f(&mut c);
            c.validate().is_err()
        };
        assert!(bad(|c| c.vcpus = 0));
        assert!(bad(|c| c.workload = "nope".into()));
        assert!(bad(|c| c.args = vec!["novalue".into()]));
        assert!(bad(|c| c.memory_mib = 0));
        assert!(bad(|c| c.isolated_vcpus = vec![1]));
        assert!(bad(|c| c.vcpu_nodes = vec![0, 1]));
        assert!(bad(
            |c| c.timer_slack_ns = quietvm_abi::timer::MAX_SLACK_NS + 1
        ));
        assert!(!bad(|c| c.timer_slack_ns = quietvm_abi::timer::MAX_SLACK_NS));
        assert!(bad(|c| c.halt_poll_ns = MAX_HALT_POLL_NS + 1));
        assert!(!bad(|c| c.halt_poll_ns = MAX_HALT_POLL_NS));
        assert!(!bad(|_| {}));
    }

    #[test]
    fn timer_slack_parses_both_ways() {
        assert_eq!(VmConfig::default().timer_slack_ns, 0);
        assert_eq!(VmConfig::default().halt_poll_ns, 0);
        assert_eq!(
            VmConfig::from_toml("halt-poll-ns = 150000")
                .unwrap()
                .halt_poll_ns,
            150_000
        );
        let c = VmConfig::from_toml("timer-slack-ns = 50000").unwrap();
        assert_eq!(c.timer_slack_ns, 50_000);
        let c = VmConfig::from_toml("timer_slack_ns = 7").unwrap();
        assert_eq!(c.timer_slack_ns, 7);
    }

    #[test]
    fn isolated_vcpus_and_nodes_parse_both_ways() {
        let c =
            VmConfig::from_toml("vcpus = 8\nisolated-vcpus = \"0-2,5\"\nnuma-nodes = 2\n").unwrap();
        assert_eq!(c.isolated_vcpus, vec![0, 1, 2, 5]);
        assert_eq!(c.vcpu_nodes, vec![0, 0, 0, 0, 1, 1, 1, 1]);
        let c =
            VmConfig::from_toml("vcpus = 4\nisolated_vcpus = [3, 1]\nvcpu_nodes = [0, 1, 0, 1]\n")
                .unwrap();
        assert_eq!(c.isolated_vcpus, vec![1, 3]);
        assert_eq!(c.vcpu_nodes, vec![0, 1, 0, 1]);
        c.validate().unwrap();
        assert!(VmConfig::from_toml("numa-nodes = 2\nvcpu-nodes = [0]").is_err());
        assert!(parse_cpu_list("3-1", 8).is_err());
        assert!(parse_cpu_list("0-9", 8).is_err());
        assert!(parse_cpu_list("x", 8).is_err());
        assert_eq!(parse_cpu_list("", 8).unwrap(), Vec::<u32>::new());
        let mut c = VmConfig {
            vcpus: 2,
            ..VmConfig::default()
        };
        c.set_numa_nodes(0);
        assert!(c.validate().is_err(), "0 nodes is refused");
    }
}
