//! Bad input gets one clear line on stderr and a non-zero exit code, never a panic.

mod common;

use common::{raw, raw_with_env};

fn assert_clean_error(r: &common::Run, code: i32, needle: &str) {
    r.expect_code(code);
    assert!(
        r.stderr.contains(needle),
        "stderr should mention `{needle}`:\n{}",
        r.stderr
    );
    assert!(
        !r.stderr.contains("panicked"),
        "quietvm panicked:\n{}",
        r.stderr
    );
}

#[test]
fn missing_kvm_device() {
    let r = raw_with_env(
        &["run", "--workload", "hello"],
        &[("QUIETVM_KVM_DEVICE", "/nonexistent/kvm")],
    );
    assert_clean_error(&r, 101, "cannot open /nonexistent/kvm");
}

#[test]
fn a_device_that_is_not_kvm() {
    let r = raw_with_env(
        &["run", "--workload", "hello"],
        &[("QUIETVM_KVM_DEVICE", "/dev/null")],
    );
    assert_clean_error(&r, 101, "not a usable KVM device");
}

#[test]
fn config_that_does_not_parse() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, "vcpus = [\n").unwrap();
    let r = raw(&["run", path.to_str().unwrap()]);
    assert_clean_error(&r, 101, "does not parse");
    std::fs::write(&path, "vcpu = 4\n").unwrap();
    let r = raw(&["run", path.to_str().unwrap()]);
    assert_clean_error(&r, 101, "vcpu");
}

#[test]
fn missing_config_file() {
    let r = raw(&["run", "/nonexistent/quietvm.toml"]);
    assert_clean_error(&r, 101, "cannot read config");
}

#[test]
fn zero_vcpus() {
    let r = raw(&["run", "--vcpus", "0"]);
    assert_clean_error(&r, 101, "at least 1");
}

#[test]
fn more_vcpus_than_allowed() {
    let r = raw(&["run", "--vcpus", "5000"]);
    assert_clean_error(&r, 101, "5000");
}

#[test]
fn memory_too_small_for_the_guest() {
    let r = raw(&[
        "run",
        "--vcpus",
        "64",
        "--memory-mib",
        "4",
        "--workload",
        "hello",
    ]);
    assert_clean_error(&r, 101, "too small");
}

#[test]
fn unknown_workload() {
    let r = raw(&["run", "--workload", "no-such-thing"]);
    assert_clean_error(&r, 101, "unknown workload");
}

#[test]
fn unknown_policy() {
    let r = raw(&["run", "--policy", "fastest"]);
    assert_clean_error(&r, 2, "fastest");
}

#[test]
fn guest_file_that_is_not_an_elf() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("guest.bin");
    std::fs::write(&path, b"not an elf at all").unwrap();
    let r = raw(&["run", "--guest", path.to_str().unwrap()]);
    assert_clean_error(&r, 101, "not a quietvm guest");
}

#[test]
fn guest_file_that_does_not_exist() {
    let r = raw(&["run", "--guest", "/nonexistent/guest.elf"]);
    assert_clean_error(&r, 101, "cannot read guest");
}

#[test]
fn a_host_binary_is_not_a_guest() {
    // A normal dynamically linked host executable (ET_DYN, segments at 0) is refused before loading.
    let r = raw(&["run", "--guest", env!("CARGO_BIN_EXE_quietvm")]);
    assert_clean_error(&r, 101, "not a quietvm guest");
}

#[test]
fn help_describes_every_run_flag() {
    let r = raw(&["run", "--help"]);
    r.expect_code(0);
    for flag in [
        "--vcpus",
        "--memory-mib",
        "--guest",
        "--workload",
        "--duration-ms",
        "--policy",
        "--stats-json",
    ] {
        assert!(
            r.stdout.contains(flag),
            "--help lacks {flag}:\n{}",
            r.stdout
        );
    }
}
