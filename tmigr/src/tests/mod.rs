//! Unit tests of the service and the hierarchy (race tests use the hooks).

mod isolated;
mod model_props;
mod ops;
mod races;
