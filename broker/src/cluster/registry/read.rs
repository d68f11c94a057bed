//! Reading the registry: which other live replicas hold streams of a
//! connection, cached and invalidated by the change channel.

use super::*;

impl ClusterRegistry {
    /// Follows [`CHANGED_CHANNEL`] until `stop`, dropping the cached lookup
    /// of each connection named there. While the subscription is down (Redis
    /// unreachable) lookups are cached for [`LOOKUP_CACHE_TTL`] only, and
    /// everything cached is dropped when it comes back (changes may have
    /// been missed).
    pub async fn follow_changes(self: Arc<Self>, stop: CancellationToken) {
        use futures::StreamExt;
        loop {
            let connected = async {
                let mut ps = tokio::time::timeout(
                    crate::cluster::redis::CONNECT_TIMEOUT,
                    self.redis.client().get_async_pubsub(),
                )
                .await
                .map_err(|_| RegistryError("connecting timed out".into()))?
                .map_err(err)?;
                ps.subscribe(CHANGED_CHANNEL).await.map_err(err)?;
                Ok::<_, RegistryError>(ps)
            };
            let ps = tokio::select! {
                _ = stop.cancelled() => return,
                r = connected => r,
            };
            match ps {
                Ok(ps) => {
                    self.invalidate_all();
                    debug!("tunnel registry: following changes");
                    let mut msgs = ps.into_on_message();
                    loop {
                        let m = tokio::select! {
                            _ = stop.cancelled() => return,
                            m = msgs.next() => m,
                        };
                        let Some(m) = m else { break };
                        match m.get_payload::<String>() {
                            Ok(conn) => self.invalidate(&conn),
                            Err(_) => self.invalidate_all(),
                        }
                    }
                    self.invalidate_all();
                    debug!("tunnel registry: change feed interrupted");
                }
                Err(e) => debug!(error = %e.0, "tunnel registry: cannot follow changes"),
            }
            // Back-off before subscribing again (Redis is down or restarting).
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }

    /// Drops the cached lookup of `conn` (its entries changed).
    pub fn invalidate(&self, conn: &str) {
        self.epoch.fetch_add(1, Ordering::SeqCst);
        self.cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(conn);
    }

    /// Drops every cached lookup (the change feed was interrupted).
    pub fn invalidate_all(&self) {
        self.epoch.fetch_add(1, Ordering::SeqCst);
        self.cache.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }

    /// The agent streams of `conn` held by other live replicas, non-draining
    /// first. `fresh`: read Redis even if a cached answer exists.
    pub async fn lookup(
        &self,
        conn: &str,
        fresh: bool,
    ) -> Result<Arc<[RemoteAgent]>, RegistryError> {
        if !fresh {
            let cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(c) = cache
                .get(conn)
                .filter(|c| c.at.elapsed() < LOOKUP_CACHE_TTL)
            {
                return Ok(c.agents.clone());
            }
        }
        let epoch = self.epoch.load(Ordering::SeqCst);
        let mut all = self.lookup_many(&[conn.to_string()]).await?;
        let agents: Arc<[RemoteAgent]> = all.remove(conn).unwrap_or_default().into();
        if self.epoch.load(Ordering::SeqCst) == epoch {
            let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
            if cache.len() >= LOOKUP_CACHE_MAX {
                cache.retain(|_, c| c.at.elapsed() < LOOKUP_CACHE_TTL);
                if cache.len() >= LOOKUP_CACHE_MAX {
                    cache.clear();
                }
            }
            cache.insert(
                conn.to_string(),
                Cached {
                    at: Instant::now(),
                    agents: agents.clone(),
                },
            );
        }
        Ok(agents)
    }

    /// The agent streams held by other live replicas for each of `conns`
    /// (two round trips whatever their number; not cached).
    pub async fn lookup_many(
        &self,
        conns: &[String],
    ) -> Result<HashMap<String, Vec<RemoteAgent>>, RegistryError> {
        let r = self.read(conns).await;
        match &r {
            Ok(_) => self.succeeded(),
            Err(e) => self.failed("reading agent streams", e),
        }
        r
    }

    async fn read(
        &self,
        conns: &[String],
    ) -> Result<HashMap<String, Vec<RemoteAgent>>, RegistryError> {
        if conns.is_empty() {
            return Ok(HashMap::new());
        }
        let mut c = self.redis.conn();
        let hashes: Vec<HashMap<String, String>> = if conns.len() == 1 {
            self.sent(1);
            vec![c.hgetall(agents_key(&conns[0])).await.map_err(err)?]
        } else {
            let mut p = redis::pipe();
            for conn in conns {
                p.cmd("HGETALL").arg(agents_key(conn));
            }
            self.sent(p.len());
            p.query_async(&mut c).await.map_err(err)?
        };
        let ids: BTreeSet<String> = hashes
            .iter()
            .flat_map(|h| h.keys())
            .filter_map(|f| f.rsplit_once('/').map(|(r, _)| r.to_string()))
            .collect();
        let ids: Vec<String> = ids.into_iter().collect();
        let infos: Vec<Option<String>> = if ids.is_empty() {
            Vec::new()
        } else {
            let keys: Vec<String> = ids.iter().map(|id| replica_key(id)).collect();
            self.sent(1);
            redis::cmd("MGET")
                .arg(&keys)
                .query_async(&mut c)
                .await
                .map_err(err)?
        };
        let live: HashMap<String, (ReplicaInfo, SystemTime)> = ids
            .into_iter()
            .zip(infos)
            .filter_map(|(id, v)| {
                let info: ReplicaInfo = serde_json::from_str(v.as_deref()?).ok()?;
                let started = parse_time(&info.started)?;
                Some((id, (info, started)))
            })
            .collect();
        let mut out: HashMap<String, Vec<RemoteAgent>> = HashMap::new();
        let mut stale: Vec<(String, String)> = Vec::new();
        let mut dead: BTreeSet<String> = BTreeSet::new();
        for (conn, hash) in conns.iter().zip(hashes) {
            let list = out.entry(conn.clone()).or_default();
            for (field, value) in hash {
                let Some((replica, _)) = field.rsplit_once('/') else {
                    continue;
                };
                let entry: Option<AgentEntry> = serde_json::from_str(&value).ok();
                let since = entry.as_ref().and_then(|e| parse_time(&e.connected_since));
                let Some((info, started)) = live.get(replica) else {
                    dead.insert(replica.to_string());
                    stale.push((conn.clone(), field));
                    continue;
                };
                // Written by an earlier process with the same replica id.
                if since.is_none_or(|s| s < *started) {
                    stale.push((conn.clone(), field));
                    continue;
                }
                if replica == self.replica_id {
                    continue;
                }
                if let Some(entry) = entry {
                    list.push(RemoteAgent {
                        replica: replica.to_string(),
                        peer: info.peer.clone(),
                        relay: info.relay,
                        entry,
                    });
                }
            }
            list.sort_by(|a, b| {
                (a.entry.draining, &a.replica, &a.entry.connected_since).cmp(&(
                    b.entry.draining,
                    &b.replica,
                    &b.entry.connected_since,
                ))
            });
        }
        if !stale.is_empty() {
            self.clean(stale, dead);
        }
        Ok(out)
    }

    /// Deletes entries of dead replicas in the background (one clean-up at
    /// a time; the next reader does what this one skipped).
    fn clean(&self, stale: Vec<(String, String)>, dead: BTreeSet<String>) {
        if self.cleaning.swap(true, Ordering::SeqCst) {
            return;
        }
        let mut p = redis::pipe();
        let mut by_conn: HashMap<String, Vec<String>> = HashMap::new();
        for (conn, field) in stale {
            by_conn.entry(conn).or_default().push(field);
        }
        for (conn, fields) in &by_conn {
            p.cmd("HDEL").arg(agents_key(conn)).arg(fields).ignore();
        }
        if !dead.is_empty() {
            p.cmd("SREM")
                .arg(REPLICAS_KEY)
                .arg(dead.iter().collect::<Vec<_>>())
                .ignore();
        }
        self.sent(p.len());
        let mut c = self.redis.conn();
        let flag = Cleaning(self.cleaning.clone());
        tokio::spawn(async move {
            let r: redis::RedisResult<()> = p.query_async(&mut c).await;
            match r {
                Ok(()) => debug!(
                    connections = by_conn.len(),
                    dead = dead.len(),
                    "tunnel registry: removed entries of dead replicas"
                ),
                Err(e) => debug!(error = %e, "tunnel registry: clean-up failed"),
            }
            drop(flag);
        });
    }
}

/// Clears the clean-up flag however the clean-up task ends.
struct Cleaning(Arc<AtomicBool>);

impl Drop for Cleaning {
    fn drop(&mut self) {
        self.0.store(false, Ordering::SeqCst);
    }
}
