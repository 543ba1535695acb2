//! quietvm's process exit codes (docs/boot.md, "Exit codes"), in one leaf module so that every command
//! (`run`, `ctl`, `compare`, `fleet`, `simulate`, `replay`) can use them without importing the VM.
//!
//! `run` exits with the guest's own code (0..=99, 0 = every check passed); the others are quietvm's.

/// The guest crashed (triple fault, emulation failure, hostile device use) or did not end within
/// `--timeout-ms`.
pub const GUEST_CRASH: i32 = 100;
/// quietvm could not run the VM (bad input, no KVM, a failed system call) or a request failed.
pub const VMM_ERROR: i32 = 101;
/// The command line was unusable (clap's own code for usage errors).
pub const USAGE: i32 = 2;
/// A measuring command (`simulate`, `replay`) ran, and a check of its results failed.
pub const CHECK_FAILED: i32 = 1;
/// A measuring command was interrupted (SIGINT) before it finished: 128 + SIGINT, as shells report it.
pub const INTERRUPTED: i32 = 130;
