//! The API store: connections made or changed through `/v1/connections`,
//! and the merge requests gitproxy opened.
//!
//! One [`Store`] type, two backends:
//! - [`file`]: one broker without Redis; one JSON file under `--data-dir`
//!   (in memory without it).
//! - [`cluster`]: cluster mode (`--redis-url`); the store lives in Redis,
//!   GitLab tokens sealed with the key of `GITPROXY_STORE_KEY_FILE`
//!   ([`crypto`]), every replica keeping a copy it reloads when told (by
//!   [`sync`]) that another replica wrote.
//!
//! Readers (the connection table, the merge-request list) use the local
//! copy ([`Store::snapshot`]) and never wait for Redis; writers go through
//! the backend and may fail (`persistence_disabled`, `storage_error`,
//! `store_unavailable`).

pub mod cluster;
pub mod crypto;
pub mod file;
pub mod sync;

use gitproxy_shared::Secret;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

pub use file::FILE_NAME;

/// One connection's fields set through the API. Fields left `None` come from
/// the config file's connection of the same id (if any).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredConnection {
    /// "agent" or "direct".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
    /// GitLab base URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gitlab_url: Option<String>,
    /// External URL; `Some("")` clears the file's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external_url: Option<String>,
    /// GitLab token.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        serialize_with = "ser_secret"
    )]
    pub token: Option<Secret>,
    /// SHA-256 (hex) of the accessKey.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_key_sha256: Option<String>,
    /// A connection of the config file deleted through the API (a tombstone:
    /// the file's definition stays hidden until the id is PUT again).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub deleted: bool,
    /// RFC 3339 time of the last API change.
    #[serde(default)]
    pub updated_at: String,
}

fn ser_secret<S: serde::Serializer>(v: &Option<Secret>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(t) => s.serialize_some(t.expose()),
        None => s.serialize_none(),
    }
}

/// A merge request gitproxy opened.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TrackedMr {
    /// Connection id.
    pub connection: String,
    /// GitLab project id.
    pub project_id: u64,
    /// `group/name` as GitLab names it.
    pub project: String,
    /// The MR's iid within its project.
    pub iid: u64,
    /// Source branch.
    pub source_branch: String,
    /// Target branch.
    pub target_branch: String,
    /// Title when opened.
    pub title: String,
    /// GitLab's URL of the MR.
    pub web_url: String,
    /// RFC 3339 time gitproxy opened (or first returned) it.
    pub created_at: String,
}

/// Everything the store holds.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StoreData {
    /// Format version (1).
    #[serde(default)]
    pub version: u32,
    /// API-made connection settings, by id.
    #[serde(default)]
    pub connections: BTreeMap<String, StoredConnection>,
    /// Merge requests opened, oldest first.
    #[serde(default)]
    pub merge_requests: Vec<TrackedMr>,
}

/// Why a write (or, in cluster mode, a load) failed. No variant carries a
/// token, sealed or not.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// No `--data-dir`.
    #[error("connections cannot be changed through the API without a data directory: start the broker with --data-dir (GITPROXY_DATA_DIR), or define the connection in the config file")]
    NoDataDir,
    /// The disk said no.
    #[error("cannot save {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// Redis did not answer (or refused the command).
    #[error("the shared store (Redis) cannot be reached: {0}")]
    Unavailable(String),
    /// A value in Redis does not open with this replica's store key.
    #[error("{what} in Redis does not decrypt with the key of GITPROXY_STORE_KEY_FILE: every replica must use the same store key (or the value was altered in Redis)")]
    WrongKey {
        /// What could not be opened ("the store's key check", "the GitLab
        /// token of connection \"acme\"").
        what: String,
    },
    /// A value in Redis is not what gitproxy writes.
    #[error("{what} in Redis is not a valid gitproxy store entry: {why}")]
    Corrupt {
        /// Which entry.
        what: String,
        /// Why (never the value).
        why: String,
    },
}

impl StoreError {
    /// Whether the error is Redis being away (transient), as opposed to
    /// what Redis holds being unusable.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, StoreError::Unavailable(_))
    }
}

/// The proof of a write, to wait until every replica applied it
/// ([`Store::wait_applied`]); nothing to wait for without Redis.
#[must_use = "wait for the other replicas with Store::wait_applied"]
pub struct Written(Option<cluster::Pending>);

impl Written {
    /// A write nobody else needs to apply.
    pub fn local() -> Written {
        Written(None)
    }

    /// The store version the write made (cluster mode).
    pub fn version(&self) -> Option<u64> {
        self.0.as_ref().map(|p| p.version)
    }
}

#[derive(Debug)]
enum Backend {
    File(file::FileStore),
    Cluster(Arc<cluster::ClusterStore>),
}

/// The store.
#[derive(Debug)]
pub struct Store {
    backend: Backend,
}

impl Store {
    /// Opens (or creates) the file store under `dir`; in memory without one.
    /// A file that cannot be parsed is an error: the broker refuses to start
    /// rather than forget connections.
    pub fn open(dir: Option<&Path>) -> anyhow::Result<Store> {
        Ok(Store {
            backend: Backend::File(file::FileStore::open(dir)?),
        })
    }

    /// The store in Redis (cluster mode), empty until [`Store::load`].
    pub fn cluster(c: &crate::cluster::Cluster) -> anyhow::Result<Store> {
        Ok(Store {
            backend: Backend::Cluster(Arc::new(cluster::ClusterStore::new(c)?)),
        })
    }

    /// The Redis backend, in cluster mode.
    pub fn as_cluster(&self) -> Option<&Arc<cluster::ClusterStore>> {
        match &self.backend {
            Backend::Cluster(c) => Some(c),
            Backend::File(_) => None,
        }
    }

    /// Whether writes persist.
    pub fn persistent(&self) -> bool {
        match &self.backend {
            Backend::File(f) => f.persistent(),
            Backend::Cluster(_) => true,
        }
    }

    /// A copy of the current content (the local copy in cluster mode).
    pub fn snapshot(&self) -> StoreData {
        match &self.backend {
            Backend::File(f) => f.snapshot(),
            Backend::Cluster(c) => c.snapshot(),
        }
    }

    /// Replaces the connections part (persisted; refused without a data dir).
    /// Callers serialise writers (the state's write lock) and, in cluster
    /// mode, reload the store first ([`sync::refresh`]) so `connections`
    /// starts from what Redis holds; only the entries that differ are
    /// written, so writes of different connections through different
    /// replicas never undo each other.
    pub async fn save_connections(
        &self,
        connections: BTreeMap<String, StoredConnection>,
    ) -> Result<Written, StoreError> {
        match &self.backend {
            Backend::File(f) => f.save_connections(connections).map(|()| Written::local()),
            Backend::Cluster(c) => c.save_connections(connections).await,
        }
    }

    /// Records a merge request (persisted when there is a data dir or Redis).
    pub async fn track_mr(&self, mr: TrackedMr) -> Result<Written, StoreError> {
        match &self.backend {
            Backend::File(f) => f.track_mr(mr).map(|()| Written::local()),
            Backend::Cluster(c) => c.track_mr(mr).await,
        }
    }

    /// Waits until every live replica applied the write `w` (or the bound
    /// [`cluster::ACK_TIMEOUT`] passed); returns at once without Redis.
    pub async fn wait_applied(&self, w: Written) {
        if let (Backend::Cluster(c), Some(p)) = (&self.backend, w.0) {
            c.wait_applied(p).await;
        }
    }
}
