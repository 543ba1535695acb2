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
        }
    }
}

impl FromStr for VmPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "kvm-lapic" => Ok(VmPolicy::KvmLapic),
            _ => s
                .parse()
                .map(VmPolicy::Userspace)
                .map_err(|_| format!("unknown policy `{s}` (local, push, pull or kvm-lapic)")),
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
    /// Install the seccomp filters (docs/limits.md); `false` only for debugging (`--no-seccomp`).
    pub seccomp: bool,
}

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
            seccomp: true,
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
            seccomp: Option<bool>,
        }
        let p: Partial = toml::from_str(text).map_err(|e| e.message().to_string())?;
        let d = VmConfig::default();
        let policy = match p.policy {
            Some(name) => name.parse()?,
            None => d.policy,
        };
        Ok(VmConfig {
            vcpus: p.vcpus.unwrap_or(d.vcpus),
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
            seccomp: p.seccomp.unwrap_or(d.seccomp),
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
        Ok(())
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
        assert!(!bad(|_| {}));
    }
}
