# Conveniences; each recipe runs the same command the README gives.

# Boot the quickstart VM.
run *ARGS:
    cargo run --release -- run configs/quickstart.toml {{ARGS}}

# Every test, as CI runs them.
test:
    cargo test --release --workspace

# Benchmarks of the hierarchy.
bench:
    cargo bench -p tmigr

# Build only the test guest (build.rs does this for every cargo build).
guest:
    cargo build --release

# Formatting and lints, as CI checks them.
lint:
    cargo fmt --all --check
    cd guest && cargo fmt --check
    cargo clippy --workspace --all-targets -- -D warnings
    cd guest && CARGO_TARGET_DIR=../target/guest-clippy cargo clippy --release --target x86_64-unknown-linux-gnu -- -D warnings
