//! Unit tests of the service and the hierarchy (race tests use the hooks).

mod isolated;
mod kernel_fixes;
mod model_props;
mod ops;
mod races;
mod windows;
