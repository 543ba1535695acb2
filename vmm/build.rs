//! Builds the built-in test guest (`guest/`, a separate freestanding cargo package) and hands its ELF to
//! the VMM as `QUIETVM_GUEST_ELF` (used with `include_bytes!`). See docs/guest.md.

use std::env;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The guest is built for the host target, freestanding: no PIE, no red zone (its interrupt upcall writes
/// below the interrupted stack pointer), no unwind tables, baseline x86-64, our linker script.
fn guest_rustflags(link_script: &Path) -> Vec<String> {
    vec![
        "-Crelocation-model=static".into(),
        "-Cno-redzone=yes".into(),
        "-Cforce-unwind-tables=no".into(),
        "-Ctarget-cpu=x86-64".into(),
        "-Clink-arg=-nostdlib".into(),
        "-Clink-arg=-static".into(),
        "-Clink-arg=-no-pie".into(),
        "-Clink-arg=-Wl,--build-id=none".into(),
        format!("-Clink-arg=-Wl,-T,{}", link_script.display()),
    ]
}

const GUEST_TARGET: &str = "x86_64-unknown-linux-gnu";

fn main() {
    let manifest_dir =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR"));
    // This crate lives in `vmm/`; the guest and the ABI crate are its siblings.
    let repo_root = manifest_dir
        .parent()
        .expect("vmm/ has a parent folder")
        .to_path_buf();
    let guest_dir = repo_root.join("guest");
    // The guest ABI crate (quietvm-abi), a path dependency of the guest: a change there rebuilds it.
    let abi_dir = repo_root.join("abi");
    let target_dir = out_dir.join("guest-target");
    let cargo = env::var_os("CARGO").unwrap_or_else(|| OsString::from("cargo"));

    println!("cargo:rerun-if-changed=build.rs");
    // The guest's and the ABI's sources, not the whole folders: a manual build's guest/target would
    // trigger rebuilds.
    for path in ["src", "Cargo.toml", "Cargo.lock", "link.ld"] {
        println!("cargo:rerun-if-changed={}", guest_dir.join(path).display());
    }
    for path in ["src", "Cargo.toml"] {
        println!("cargo:rerun-if-changed={}", abi_dir.join(path).display());
    }

    let mut cmd = Command::new(&cargo);
    cmd.current_dir(&guest_dir)
        .args(["build", "--release", "--locked", "--target", GUEST_TARGET])
        .arg("--manifest-path")
        .arg(guest_dir.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(&target_dir)
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            guest_rustflags(&guest_dir.join("link.ld")).join("\x1f"),
        );
    // What the outer build sets for itself would break or redirect the nested one.
    for (key, _) in env::vars_os() {
        let Some(key) = key.to_str() else { continue };
        if key.starts_with("CARGO_FEATURE_")
            || key.starts_with("CARGO_CFG_")
            || key.starts_with("CARGO_PKG_")
            || key.starts_with("CARGO_BIN_")
            || key.starts_with("DEP_")
        {
            cmd.env_remove(key);
        }
    }
    for key in [
        "RUSTFLAGS",
        "CARGO_BUILD_RUSTFLAGS",
        "CARGO_BUILD_TARGET",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET_DIR",
        "CARGO_PRIMARY_PACKAGE",
        "CARGO_MANIFEST_DIR",
        "CARGO_MANIFEST_PATH",
        "CARGO_CRATE_NAME",
        "CARGO_MAKEFLAGS",
        "MAKEFLAGS",
        "MFLAGS",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "CARGO_ENCODED_RUSTFLAGS_FOR_HOST",
        "RUSTDOCFLAGS",
        "CARGO_ENCODED_RUSTDOCFLAGS",
        "CARGO_PROFILE_RELEASE_LTO",
        "OUT_DIR",
        "TARGET",
        "HOST",
        "OPT_LEVEL",
        "PROFILE",
        "DEBUG",
        "NUM_JOBS",
        "CARGO_LLVM_COV",
        "LLVM_PROFILE_FILE",
        "CARGO_INCREMENTAL",
    ] {
        cmd.env_remove(key);
    }
    // `RUSTC` is kept: it is the rustc cargo gave this build (rustup's proxy or the toolchain's own).

    let output = cmd
        .output()
        .unwrap_or_else(|e| panic!("could not run {:?} to build the guest: {}", cargo, e));
    if !output.status.success() {
        eprintln!("{}", String::from_utf8_lossy(&output.stdout));
        eprintln!("{}", String::from_utf8_lossy(&output.stderr));
        panic!(
            "building the test guest failed ({}): `cargo build --release` in {} (its output is above)",
            output.status,
            guest_dir.display()
        );
    }

    let built = target_dir
        .join(GUEST_TARGET)
        .join("release")
        .join("quietvm-guest");
    let elf = out_dir.join("quietvm-guest.elf");
    std::fs::copy(&built, &elf).unwrap_or_else(|e| {
        panic!(
            "copying the guest {} to {}: {}",
            built.display(),
            elf.display(),
            e
        )
    });
    println!("cargo:rustc-env=QUIETVM_GUEST_ELF={}", elf.display());
}
