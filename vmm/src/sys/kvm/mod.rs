//! Everything that talks to KVM: the VM and vCPU file descriptors, guest memory set-up,
//! interrupt injection, and the per-thread signal machinery that kicks a vCPU out of `KVM_RUN`.
//!
//! The rest of quietvm is safe Rust over the small API exported here. Each `unsafe` block carries a
//! `// SAFETY:` comment (`clippy::undocumented_unsafe_blocks` is denied for the crate).

pub mod kick;
pub mod vcpu;
pub mod vm;

use thiserror::Error;

/// Failures of the KVM layer. Each one is reported to the user as one line.
#[derive(Debug, Error)]
pub enum KvmError {
    #[error("cannot open {path}: {source} (is KVM enabled, and may this user open it?)")]
    OpenKvm {
        path: String,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("{path} is not a usable KVM device (KVM API version {api}, need 12)")]
    ApiVersion { path: String, api: i32 },
    #[error("KVM capability {0} is missing")]
    MissingCap(&'static str),
    #[error("{what}: {source}")]
    Ioctl {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("guest memory: {0}")]
    Memory(String),
    #[error("{what}: {source}")]
    Os {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

pub(crate) fn ioctl_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> KvmError {
    move |source| KvmError::Ioctl { what, source }
}

pub(crate) fn os_err(what: &'static str) -> KvmError {
    KvmError::Os {
        what,
        source: std::io::Error::last_os_error(),
    }
}
