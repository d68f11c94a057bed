//! Several broker replicas sharing one real Redis, as cluster mode runs
//! them: each replica on its own ephemeral ports (agent, api, peer), the
//! peer secret and the store key in files of a shared temporary directory.

use super::broker::{Broker, BrokerOptions, BrokerSpec};
use super::redis::Redis;
use super::WAIT;
use std::net::SocketAddr;
use std::path::PathBuf;

/// The secret replicas prove to each other in the tests.
pub const PEER_SECRET: &str = "cluster-test-peer-secret-0123456789";

/// Files every replica of a test cluster reads.
pub struct ClusterFiles {
    dir: tempfile::TempDir,
}

impl ClusterFiles {
    /// Writes the peer secret and a random store key.
    pub fn new() -> ClusterFiles {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("peer-secret"), PEER_SECRET).expect("write");
        let key: [u8; 32] = rand::random();
        std::fs::write(dir.path().join("store-key"), hex::encode(key)).expect("write");
        ClusterFiles { dir }
    }

    /// The peer secret file.
    pub fn peer_secret(&self) -> PathBuf {
        self.dir.path().join("peer-secret")
    }

    /// The store key file.
    pub fn store_key(&self) -> PathBuf {
        self.dir.path().join("store-key")
    }

    /// The arguments that put a broker with replica id `id` in the cluster
    /// of `redis`.
    pub fn args(&self, redis: &Redis, id: &str) -> Vec<String> {
        vec![
            "--redis-url".into(),
            redis.url(),
            "--peer-listen".into(),
            "127.0.0.1:0".into(),
            "--peer-secret-file".into(),
            self.peer_secret().display().to_string(),
            "--store-key-file".into(),
            self.store_key().display().to_string(),
            "--replica-id".into(),
            id.into(),
        ]
    }
}

impl Default for ClusterFiles {
    fn default() -> Self {
        ClusterFiles::new()
    }
}

/// Starts `n` replicas (`r0`, `r1`, ...) of `spec` in the cluster of `redis`.
pub async fn start_replicas(
    n: usize,
    spec: &BrokerSpec,
    opts: &BrokerOptions,
    redis: &Redis,
    files: &ClusterFiles,
) -> Vec<Broker> {
    let mut v = Vec::new();
    for i in 0..n {
        let mut s = spec.clone();
        s.args.extend(files.args(redis, &format!("r{i}")));
        v.push(Broker::start_with(s, opts.clone()).await);
    }
    v
}

/// The peer listener's address of replica `b`, from its `listening` line.
pub async fn peer_addr(b: &Broker) -> SocketAddr {
    let v = b
        .proc
        .wait_for_nth(1, WAIT, |v| {
            v["message"] == "listening" && v["listener"] == "peer"
        })
        .await;
    v["addr"].as_str().expect("addr").parse().expect("addr")
}
