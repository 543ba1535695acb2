//! per-op tests
