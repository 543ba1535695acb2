//! Everything that needs `unsafe`: KVM ([`kvm`]: the VM and vCPU file descriptors, guest memory,
//! interrupt injection, the per-thread kick signals) and the few OS calls quietvm makes through `libc`
//! ([`os`]: thread ids, clocks, process accounting, signals, peer credentials).
//!
//! The rest of quietvm is safe Rust over the small API exported here. Each `unsafe` block carries a
//! `// SAFETY:` comment (`clippy::undocumented_unsafe_blocks` is denied for the crate).

pub mod kvm;
pub mod os;
pub mod seccomp;
