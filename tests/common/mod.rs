//! The black-box tests' harness is the workspace's test kit (`testkit/`,
//! crate `sse-testkit`), shared with the load harness; this module only
//! brings it into each test file as `common::*`.

pub use sse_testkit::*;
