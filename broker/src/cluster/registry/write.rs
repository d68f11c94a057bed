//! Writing this replica's key and its agent streams to Redis, and removing
//! them on a clean exit.

use super::*;

impl ClusterRegistry {
    fn entry_of(&self, s: &crate::tunnel::AgentSession) -> (String, String) {
        let field = format!("{}/{}", self.replica_id, s.session_no);
        let value = serde_json::to_string(&AgentEntry {
            instance: s.instance.clone(),
            version: s.version.clone(),
            connected_since: rfc3339(s.connected_since),
            draining: s.is_draining(),
            holds_token: s.holds_token,
        })
        .unwrap_or_default();
        (field, value)
    }

    /// Keeps this replica registered and its streams written until `stop`,
    /// then removes them (a clean exit leaves nothing behind).
    pub async fn run(self: Arc<Self>, local: Arc<Registry>, stop: CancellationToken) {
        let changes = local.changes().clone();
        changes.enable();
        let mut written: HashMap<String, HashMap<String, String>> = HashMap::new();
        // Everything is (re)written at start, after any failure, and when
        // our replica key turns out to be gone (a restarted Redis).
        let mut full = true;
        let mut ok = false;
        let mut registered_once = false;
        let mut last_refresh: Option<Instant> = None;
        let mut next_check = tokio::time::Instant::now();
        let refresh_every = self.refresh_every();
        // With a short TTL the refresh comes more often than the probe.
        let check_every = PROBE_EVERY.min(refresh_every);
        loop {
            let check = tokio::select! {
                _ = stop.cancelled() => break,
                _ = changes.changed(), if ok => false,
                _ = tokio::time::sleep_until(next_check) => true,
            };
            if check {
                let refresh = !ok || last_refresh.is_none_or(|t| t.elapsed() >= refresh_every);
                let r = if refresh {
                    self.refresh(registered_once).await
                } else {
                    self.probe().await
                };
                match r {
                    Ok(present) => {
                        self.succeeded();
                        if refresh {
                            last_refresh = Some(Instant::now());
                            registered_once = true;
                        }
                        if !present {
                            if ok {
                                warn!("tunnel registry: this replica's key is gone from Redis (restarted or flushed?); writing every local agent stream again");
                            }
                            full = true;
                        }
                        ok = true;
                        next_check = tokio::time::Instant::now() + check_every;
                    }
                    Err(e) => {
                        self.failed("refreshing this replica's key", &e);
                        ok = false;
                        full = true;
                        // While Redis fails: retry soon (recovery within
                        // seconds), but not on every agent change meanwhile.
                        next_check = tokio::time::Instant::now() + RETRY_EVERY;
                        continue;
                    }
                }
            }
            let mut dirty = changes.take();
            if full {
                dirty.extend(local.connection_ids());
                dirty.extend(written.keys().cloned());
            }
            let r = if dirty.is_empty() {
                Ok(0)
            } else {
                self.sync(&local, &mut written, &dirty, full).await
            };
            match r {
                Ok(n) => {
                    self.succeeded();
                    let streams: usize = written.values().map(HashMap::len).sum();
                    self.registered.store(streams as u64, Ordering::Relaxed);
                    if full {
                        info!(
                            replica = %self.replica_id,
                            streams,
                            connections = written.len(),
                            "tunnel registry: local agent streams registered"
                        );
                        full = false;
                    } else if n > 0 {
                        debug!(commands = n, "tunnel registry updated");
                    }
                }
                Err(e) => {
                    self.failed("writing agent streams", &e);
                    changes.mark_all(dirty.iter());
                    ok = false;
                    full = true;
                    next_check = tokio::time::Instant::now() + RETRY_EVERY;
                }
            }
        }
        self.deregister(&written).await;
    }

    /// `SET replica EX ttl GET` + `SADD replicas`: true when our key was
    /// still there.
    async fn refresh(&self, registered_once: bool) -> Result<bool, RegistryError> {
        let mut c = self.redis.conn();
        let mut p = redis::pipe();
        p.cmd("SET")
            .arg(replica_key(&self.replica_id))
            .arg(&self.info)
            .arg("EX")
            .arg(self.ttl.as_secs())
            .arg("GET")
            .cmd("SADD")
            .arg(REPLICAS_KEY)
            .arg(&self.replica_id)
            .ignore();
        self.sent(2);
        let (prev,): (Option<String>,) = p.query_async(&mut c).await.map_err(err)?;
        if let Some(prev) = &prev {
            if registered_once && *prev != self.info {
                warn!(
                    replica = %self.replica_id,
                    "tunnel registry: another broker process uses this replica id; give every replica its own --replica-id (GITPROXY_REPLICA_ID)"
                );
            }
        }
        Ok(prev.is_some())
    }

    /// `EXISTS replica`.
    async fn probe(&self) -> Result<bool, RegistryError> {
        let mut c = self.redis.conn();
        self.sent(1);
        let n: i64 = c.exists(replica_key(&self.replica_id)).await.map_err(err)?;
        Ok(n > 0)
    }

    /// Writes the difference between the local streams of `dirty` and what
    /// was written (`force`: everything again). Returns the command count.
    async fn sync(
        &self,
        local: &Registry,
        written: &mut HashMap<String, HashMap<String, String>>,
        dirty: &HashSet<String>,
        force: bool,
    ) -> Result<usize, RegistryError> {
        let mut c = self.redis.conn();
        let mut p = redis::pipe();
        let mut total = 0;
        // Connections whose new state goes out with the current pipeline.
        let mut pending: Vec<(String, HashMap<String, String>)> = Vec::new();
        for conn in dirty {
            let desired: HashMap<String, String> = local
                .sessions(conn)
                .iter()
                .filter(|s| !s.is_closed())
                .map(|s| self.entry_of(s))
                .collect();
            let have = written.get(conn);
            let sets: Vec<(&String, &String)> = desired
                .iter()
                .filter(|(f, v)| force || have.and_then(|h| h.get(*f)) != Some(*v))
                .collect();
            let dels: Vec<&String> = have
                .map(|h| h.keys().filter(|f| !desired.contains_key(*f)).collect())
                .unwrap_or_default();
            if sets.is_empty() && dels.is_empty() {
                continue;
            }
            let key = agents_key(conn);
            if !sets.is_empty() {
                let cmd = p.cmd("HSET").arg(&key);
                for (f, v) in &sets {
                    cmd.arg(*f).arg(*v);
                }
                cmd.ignore();
            }
            if !dels.is_empty() {
                p.cmd("HDEL").arg(&key).arg(&dels).ignore();
            }
            p.cmd("PUBLISH").arg(CHANGED_CHANNEL).arg(conn).ignore();
            pending.push((conn.clone(), desired));
            if p.len() >= MAX_PIPELINE {
                total += p.len();
                self.flush(&mut p, &mut c).await?;
                for (conn, desired) in pending.drain(..) {
                    set_written(written, conn, desired);
                }
            }
        }
        if !p.is_empty() {
            total += p.len();
            self.flush(&mut p, &mut c).await?;
        }
        for (conn, desired) in pending {
            set_written(written, conn, desired);
        }
        Ok(total)
    }

    async fn flush(
        &self,
        p: &mut redis::Pipeline,
        c: &mut redis::aio::ConnectionManager,
    ) -> Result<(), RegistryError> {
        self.sent(p.len());
        let r: redis::RedisResult<()> = p.query_async(c).await;
        p.clear();
        r.map_err(err)
    }

    /// Removes this replica and its streams (clean exit; best effort).
    async fn deregister(&self, written: &HashMap<String, HashMap<String, String>>) {
        let mut c = self.redis.conn();
        let mut p = redis::pipe();
        p.cmd("DEL").arg(replica_key(&self.replica_id)).ignore();
        p.cmd("SREM")
            .arg(REPLICAS_KEY)
            .arg(&self.replica_id)
            .ignore();
        for (conn, fields) in written.iter().filter(|(_, f)| !f.is_empty()) {
            let fields: Vec<&String> = fields.keys().collect();
            p.cmd("HDEL").arg(agents_key(conn)).arg(fields).ignore();
            p.cmd("PUBLISH").arg(CHANGED_CHANNEL).arg(conn).ignore();
        }
        self.sent(p.len());
        match tokio::time::timeout(
            crate::cluster::redis::RESPONSE_TIMEOUT,
            p.query_async::<()>(&mut c),
        )
        .await
        {
            Ok(Ok(())) => info!(replica = %self.replica_id, "tunnel registry: replica removed"),
            Ok(Err(e)) => {
                warn!(error = %e, "tunnel registry: could not remove this replica (its entries expire with its key)")
            }
            Err(_) => warn!(
                "tunnel registry: Redis did not answer the removal of this replica (its entries expire with its key)"
            ),
        }
    }
}

fn set_written(
    written: &mut HashMap<String, HashMap<String, String>>,
    conn: String,
    desired: HashMap<String, String>,
) {
    if desired.is_empty() {
        written.remove(&conn);
    } else {
        written.insert(conn, desired);
    }
}
