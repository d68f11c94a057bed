//! End-to-end tests of gitproxy: the sandbox GitLab, the process harness and
//! benchmark helpers.

pub mod harness;
pub mod sandbox;
