//! The store of one broker without Redis: one JSON file
//! (`<data-dir>/store.json`, mode 0600).
//!
//! Writes are atomic: the new content goes to a temporary file in the same
//! directory, is fsynced, renamed over the old file, and the directory is
//! fsynced; a crash at any point leaves either the old or the new file whole.
//!
//! Without a data directory the store lives in memory only: connection
//! writes are refused (`persistence_disabled`), so no operator believes a
//! change is saved when it is not, while merge-request tracking is kept for
//! the life of the process.
//!
//! The file holds GitLab tokens set through the API (like the TOML file holds
//! the file's): it is created readable by the broker's user only. accessKeys
//! are stored as their SHA-256 only.

use super::{StoreData, StoreError, StoredConnection, TrackedMr};
use anyhow::Context;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// The store's file name under the data directory.
pub const FILE_NAME: &str = "store.json";

/// The file store.
#[derive(Debug)]
pub struct FileStore {
    dir: Option<PathBuf>,
    data: Mutex<StoreData>,
}

impl FileStore {
    /// Opens (or creates) the store under `dir`; in memory without one. A
    /// file that cannot be parsed is an error: the broker refuses to start
    /// rather than forget connections.
    pub fn open(dir: Option<&Path>) -> anyhow::Result<FileStore> {
        let Some(dir) = dir else {
            return Ok(FileStore {
                dir: None,
                data: Mutex::new(StoreData::default()),
            });
        };
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create the data directory {}", dir.display()))?;
        let path = dir.join(FILE_NAME);
        let data = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice::<StoreData>(&bytes).map_err(|e| {
                anyhow::anyhow!(
                    "{} is not a valid gitproxy store (line {}, column {}): fix or move it away",
                    path.display(),
                    e.line(),
                    e.column()
                )
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => StoreData::default(),
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
        };
        // Leftovers of a write interrupted before its rename.
        if let Ok(rd) = std::fs::read_dir(dir) {
            for e in rd.flatten() {
                if e.file_name()
                    .to_string_lossy()
                    .starts_with(".store.json.tmp")
                {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        Ok(FileStore {
            dir: Some(dir.to_path_buf()),
            data: Mutex::new(data),
        })
    }

    /// Whether writes persist.
    pub fn persistent(&self) -> bool {
        self.dir.is_some()
    }

    /// The data directory.
    pub fn dir(&self) -> Option<&Path> {
        self.dir.as_deref()
    }

    /// A copy of the current content.
    pub fn snapshot(&self) -> StoreData {
        self.data.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Replaces the connections part (persisted; refused without a data dir).
    /// Callers serialise writers (the state's write lock).
    pub fn save_connections(
        &self,
        connections: BTreeMap<String, StoredConnection>,
    ) -> Result<(), StoreError> {
        if self.dir.is_none() {
            return Err(StoreError::NoDataDir);
        }
        let mut next = self.snapshot();
        next.connections = connections;
        self.write(next)
    }

    /// Records a merge request (persisted when there is a data dir).
    pub fn track_mr(&self, mr: TrackedMr) -> Result<(), StoreError> {
        let mut next = self.snapshot();
        if next.merge_requests.iter().any(|m| {
            m.connection == mr.connection && m.project_id == mr.project_id && m.iid == mr.iid
        }) {
            return Ok(());
        }
        next.merge_requests.push(mr);
        if self.dir.is_none() {
            *self.data.lock().unwrap_or_else(|e| e.into_inner()) = next;
            return Ok(());
        }
        self.write(next)
    }

    fn write(&self, mut next: StoreData) -> Result<(), StoreError> {
        next.version = 1;
        let dir = self.dir.as_ref().ok_or(StoreError::NoDataDir)?;
        let path = dir.join(FILE_NAME);
        let io = |source| StoreError::Io {
            path: path.display().to_string(),
            source,
        };
        let bytes = serde_json::to_vec_pretty(&next).map_err(|e| io(std::io::Error::other(e)))?;
        let tmp = dir.join(format!(".store.json.tmp-{}", std::process::id()));
        {
            use std::os::unix::fs::OpenOptionsExt;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)
                .map_err(io)?;
            f.write_all(&bytes).map_err(io)?;
            f.sync_all().map_err(io)?;
        }
        std::fs::rename(&tmp, &path).map_err(io)?;
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
        *self.data.lock().unwrap_or_else(|e| e.into_inner()) = next;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gitproxy_shared::Secret;

    #[test]
    fn persists_atomically_and_reloads() {
        let dir = std::env::temp_dir().join(format!(
            "gitproxy-store-test-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        let s = FileStore::open(Some(&dir)).unwrap();
        let mut c = BTreeMap::new();
        c.insert(
            "acme".to_string(),
            StoredConnection {
                mode: Some("direct".into()),
                gitlab_url: Some("https://gitlab.example".into()),
                token: Some(Secret::new("glpat-x")),
                ..Default::default()
            },
        );
        s.save_connections(c).unwrap();
        let again = FileStore::open(Some(&dir)).unwrap();
        let snap = again.snapshot();
        assert_eq!(
            snap.connections["acme"].token.as_ref().unwrap().expose(),
            "glpat-x"
        );
        assert!(!format!("{snap:?}").contains("glpat-x"));
        std::fs::write(dir.join(FILE_NAME), b"{not json").unwrap();
        assert!(FileStore::open(Some(&dir)).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn refuses_connection_writes_in_memory() {
        let s = FileStore::open(None).unwrap();
        assert!(matches!(
            s.save_connections(BTreeMap::new()),
            Err(StoreError::NoDataDir)
        ));
    }
}
