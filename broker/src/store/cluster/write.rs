//! Writes to the store, and waiting until every replica applied them.

use super::*;

impl ClusterStore {
    /// PUBLISHes `message` on `channel`; the number of subscribers that
    /// received it (0 when Redis did not answer: the poll carries it then).
    pub(super) async fn publish(&self, channel: &str, message: String) -> usize {
        let mut con = self.redis.conn();
        match redis::cmd("PUBLISH")
            .arg(channel)
            .arg(message)
            .query_async::<usize>(&mut con)
            .await
        {
            Ok(n) => n,
            Err(e) => {
                tracing::debug!(channel, "cannot publish: {e}");
                0
            }
        }
    }

    /// Says on `gitproxy:store:applied` that this replica's table holds
    /// `version`.
    pub async fn publish_applied(&self, version: u64) {
        self.publish(CHANNEL_APPLIED, format!("{} {version}", self.replica_id))
            .await;
    }

    /// Hands an acknowledgement received on `gitproxy:store:applied` to the
    /// writers waiting for it.
    pub fn record_ack(&self, ack: Ack) {
        let _ = self.acks.send(ack);
    }

    /// The store's version in Redis (`None`: no store there).
    pub async fn current_version(&self) -> Result<Option<u64>, StoreError> {
        let mut cmd = redis::cmd("GET");
        cmd.arg(KEY_VERSION);
        self.query(Query::Cmd(&cmd)).await
    }

    /// Runs a write (`pipe` gets the INCR appended; its other commands must
    /// be `ignore`d) and announces it; `update` then changes the copy.
    async fn write(
        &self,
        pipe: &mut redis::Pipeline,
        update: impl FnOnce(&mut StoreData),
    ) -> Result<Written, StoreError> {
        let acks = self.acks.subscribe();
        pipe.cmd("INCR").arg(KEY_VERSION);
        let (version,): (u64,) = self.query(Query::Pipe(pipe)).await?;
        {
            let mut c = self.copy();
            update(&mut c.data);
            // The copy is Redis at `version` only if nobody wrote in between;
            // otherwise the change message makes this replica reload.
            if version == c.version + 1 {
                c.version = version;
            }
        }
        let receivers = self.publish(CHANNEL_CHANGED, version.to_string()).await;
        Ok(Written(Some(Pending {
            version,
            receivers,
            acks,
            started: tokio::time::Instant::now(),
        })))
    }

    /// Writes the entries of `next` that differ from the copy, deletes the
    /// ones gone from it, and updates the copy. The caller holds the state's
    /// write lock, reloaded the copy first, and swaps in the table built from
    /// `next` right after.
    pub async fn save_connections(
        &self,
        next: BTreeMap<String, StoredConnection>,
    ) -> Result<Written, StoreError> {
        let _io = self.io.lock().await;
        let current = self.copy().data.connections.clone();
        let mut pipe = redis::pipe();
        pipe.atomic();
        pipe.cmd("SET")
            .arg(KEY_CHECK)
            .arg(self.key.key_check().map_err(sealing)?)
            .arg("NX")
            .ignore();
        for (id, c) in &next {
            if current.get(id) != Some(c) {
                pipe.cmd("HSET")
                    .arg(KEY_CONNECTIONS)
                    .arg(id)
                    .arg(self.seal(id, c)?)
                    .ignore();
            }
        }
        for id in current.keys().filter(|id| !next.contains_key(*id)) {
            pipe.cmd("HDEL").arg(KEY_CONNECTIONS).arg(id).ignore();
        }
        self.write(&mut pipe, |d| d.connections = next).await
    }

    /// Records a merge request (the first record of an MR wins).
    pub async fn track_mr(&self, mr: TrackedMr) -> Result<Written, StoreError> {
        let _io = self.io.lock().await;
        let json = serde_json::to_string(&mr).map_err(|e| StoreError::Corrupt {
            what: format!("merge request {:?}", Self::mr_field(&mr)),
            why: json_why(&e),
        })?;
        let mut pipe = redis::pipe();
        pipe.atomic();
        pipe.cmd("HSETNX")
            .arg(KEY_MRS)
            .arg(Self::mr_field(&mr))
            .arg(json)
            .ignore();
        self.write(&mut pipe, |d| {
            let known = d.merge_requests.iter().any(|m| {
                m.connection == mr.connection && m.project_id == mr.project_id && m.iid == mr.iid
            });
            if !known {
                d.merge_requests.push(mr);
            }
        })
        .await
    }

    /// Replicas whose registry key (`gitproxy:replica:{id}`) exists, this
    /// one left out; empty when the registry is not there or Redis fails.
    async fn live_replicas(&self) -> Vec<String> {
        let mut con = self.redis.conn();
        let ids: Vec<String> = redis::cmd("SMEMBERS")
            .arg(KEY_REPLICAS)
            .query_async(&mut con)
            .await
            .unwrap_or_default();
        let ids: Vec<String> = ids
            .into_iter()
            .filter(|id| *id != self.replica_id)
            .collect();
        if ids.is_empty() {
            return ids;
        }
        let mut pipe = redis::pipe();
        for id in &ids {
            pipe.cmd("EXISTS").arg(format!("{REPLICA_PREFIX}{id}"));
        }
        let exists: Vec<bool> = pipe.query_async(&mut con).await.unwrap_or_default();
        ids.into_iter()
            .zip(exists)
            .filter_map(|(id, live)| live.then_some(id))
            .collect()
    }

    /// Waits until as many replicas as received the change, and every live
    /// replica of the registry, acknowledged a version at least the write's,
    /// or [`ACK_TIMEOUT`] passed.
    pub async fn wait_applied(&self, mut p: Pending) {
        let deadline = p.started + ACK_TIMEOUT;
        // Redis going away right after the write must not stretch the bound.
        let live = tokio::time::timeout_at(deadline, self.live_replicas())
            .await
            .unwrap_or_default();
        let mut acked = BTreeSet::new();
        loop {
            let missing: Vec<&String> = live.iter().filter(|id| !acked.contains(*id)).collect();
            if acked.len() >= p.receivers && missing.is_empty() {
                info!(
                    version = p.version,
                    replicas = acked.len(),
                    elapsed_us = p.started.elapsed().as_micros() as u64,
                    "store change applied by every replica"
                );
                return;
            }
            match tokio::time::timeout_at(deadline, p.acks.recv()).await {
                Ok(Ok(a)) if a.version >= p.version => {
                    acked.insert(a.replica);
                }
                Ok(Ok(_)) | Ok(Err(broadcast::error::RecvError::Lagged(_))) => {}
                Ok(Err(broadcast::error::RecvError::Closed)) => return,
                Err(_) => {
                    warn!(
                        version = p.version,
                        expected = p.receivers.max(live.len()),
                        acknowledged = ?acked,
                        missing_live = ?missing,
                        "store change not acknowledged by every replica within {}s: answering anyway; a replica that missed it reloads within {}s",
                        ACK_TIMEOUT.as_secs(),
                        crate::store::sync::POLL_INTERVAL.as_secs()
                    );
                    return;
                }
            }
        }
    }
}
