//! From Redis's hashes to the store's data and back: every token sealed
//! on the way in and opened on the way out.

use super::*;

impl ClusterStore {
    pub(super) fn open(&self, raw: Raw) -> Result<StoreData, StoreError> {
        if let Some(check) = &raw.key_check {
            self.key
                .verify_key_check(check)
                .map_err(|_| StoreError::WrongKey {
                    what: format!("the store's key check ({KEY_CHECK})"),
                })?;
        }
        let mut connections = BTreeMap::new();
        for (id, json) in raw.connections {
            let what = || format!("connection {id:?}");
            if !crate::config::connections::valid_id(&id) {
                return Err(StoreError::Corrupt {
                    what: what(),
                    why: "the id is not [a-z0-9-]{1,63}".into(),
                });
            }
            let s: SealedConnection =
                serde_json::from_str(&json).map_err(|e| StoreError::Corrupt {
                    what: what(),
                    why: json_why(&e),
                })?;
            let token = match &s.token_sealed {
                None => None,
                Some(sealed) => Some(self.key.open_token(&id, sealed).map_err(|e| match e {
                    CryptoError::Malformed => StoreError::Corrupt {
                        what: what(),
                        why: "its token is not a sealed value".into(),
                    },
                    _ => StoreError::WrongKey {
                        what: format!("the GitLab token of connection {id:?}"),
                    },
                })?),
            };
            connections.insert(
                id,
                StoredConnection {
                    mode: s.mode,
                    gitlab_url: s.gitlab_url,
                    external_url: s.external_url,
                    token,
                    access_key_sha256: s.access_key_sha256,
                    deleted: s.deleted,
                    updated_at: s.updated_at,
                },
            );
        }
        let mut mrs = Vec::with_capacity(raw.mrs.len());
        for (field, json) in raw.mrs {
            let mr: TrackedMr = serde_json::from_str(&json).map_err(|e| StoreError::Corrupt {
                what: format!("merge request {field:?}"),
                why: json_why(&e),
            })?;
            mrs.push(mr);
        }
        // Oldest first, as the file keeps them.
        mrs.sort_by(|a, b| {
            (&a.created_at, &a.connection, a.project_id, a.iid).cmp(&(
                &b.created_at,
                &b.connection,
                b.project_id,
                b.iid,
            ))
        });
        Ok(StoreData {
            version: 1,
            connections,
            merge_requests: mrs,
        })
    }

    pub(super) fn seal(&self, id: &str, c: &StoredConnection) -> Result<String, StoreError> {
        let token_sealed = c
            .token
            .as_ref()
            .map(|t| self.key.seal_token(id, t))
            .transpose()
            .map_err(sealing)?;
        let s = SealedConnection {
            mode: c.mode.clone(),
            gitlab_url: c.gitlab_url.clone(),
            external_url: c.external_url.clone(),
            token_sealed,
            access_key_sha256: c.access_key_sha256.clone(),
            deleted: c.deleted,
            updated_at: c.updated_at.clone(),
        };
        serde_json::to_string(&s).map_err(|e| StoreError::Corrupt {
            what: format!("connection {id:?}"),
            why: json_why(&e),
        })
    }

    pub(super) fn mr_field(mr: &TrackedMr) -> String {
        format!("{}/{}/{}", mr.connection, mr.project_id, mr.iid)
    }
}
