//! The end-to-end suite as one test binary: one link, one set of
//! monomorphised dependencies, and one pool of test threads over every test
//! (26 binaries took minutes to compile and link, and ran one after the other).
//! Run one file with `cargo test --release -p gitproxy-integration-tests --test e2e -- <file>::`.

mod agent_policy;
mod agent_token_filter;
mod bench_smoke;
mod body_idle;
mod cluster_forwarding;
mod cluster_gitlab;
mod cluster_relay;
mod cluster_rolling;
mod cluster_store;
mod console;
mod control_plane;
mod enterprise;
mod faults;
mod forwarded;
mod front_door_http2;
mod gitlab_fidelity;
mod gitlab_groups;
mod gitlab_shapes;
mod gitlab_url;
mod gitlab_urls;
mod grpcurl;
mod harness_cluster;
mod helm;
mod hostile_agent;
mod limits;
mod listener_limits;
mod metrics_families;
mod policy_prefixes;
mod sandbox;
mod secrets;
mod tunnel;
