//! race tests
