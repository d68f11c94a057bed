//! End-to-end tests of gitproxy: the sandbox GitLab, process harness and benchmark helpers.

pub mod sandbox;
