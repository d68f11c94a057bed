//! Keeps this replica's copy of the store, and the connection table built
//! from it, in step with Redis (cluster mode).
//!
//! Two tasks:
//! - the subscriber: a dedicated Redis connection subscribed to
//!   `gitproxy:store:changed` and `gitproxy:store:applied`; it hands change
//!   versions to the applier and acknowledgements to waiting writers,
//!   pings Redis every [`PING_INTERVAL`] (a silent half-open connection is
//!   replaced), and subscribes again after Redis restarts (then forcing a
//!   full reload, since changes may have been missed meanwhile);
//! - the applier: reloads the store and rebuilds the table (the config file
//!   merged with the store, as an API write does) when a change arrives,
//!   when the version in Redis differs from the copy's (checked every
//!   [`POLL_INTERVAL`], the backstop for lost messages), or after a
//!   reconnect; then says so on `gitproxy:store:applied`.
//!
//! While Redis is away the copy and the table stay as they were: requests
//! keep working, writes answer `store_unavailable`.

use super::cluster::{Ack, ClusterStore, CHANNEL_APPLIED, CHANNEL_CHANGED};
use super::StoreError;
use crate::cluster::redis::{CONNECT_TIMEOUT, RESPONSE_TIMEOUT};
use crate::cluster::Cluster;
use crate::config::ConnectionSet;
use crate::state::AppState;
use futures::StreamExt;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

/// How often the applier compares the version in Redis with its copy's.
pub const POLL_INTERVAL: Duration = Duration::from_secs(2);
/// How often the subscriber connection is pinged.
pub const PING_INTERVAL: Duration = Duration::from_secs(10);
/// First delay before subscribing again; doubles up to [`RESUBSCRIBE_MAX`].
const RESUBSCRIBE_MIN: Duration = Duration::from_millis(100);
/// Longest delay between two subscription attempts.
pub const RESUBSCRIBE_MAX: Duration = Duration::from_secs(1);
/// Longest pub/sub payload looked at.
const MAX_PAYLOAD: usize = 128;

/// Work for the applier, coalesced: many messages, one reload.
#[derive(Debug, Default)]
struct Pending {
    /// The highest change version announced since the applier last looked.
    version: Option<u64>,
    /// Reload whatever the versions say (after a reconnect).
    force: bool,
}

#[derive(Default)]
struct Trigger {
    pending: Mutex<Pending>,
    notify: Notify,
}

impl Trigger {
    fn fire(&self, f: impl FnOnce(&mut Pending)) {
        f(&mut self.pending.lock().unwrap_or_else(|e| e.into_inner()));
        self.notify.notify_one();
    }

    fn take(&self) -> Pending {
        std::mem::take(&mut *self.pending.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

/// Starts the subscriber and the applier (cluster mode only).
pub fn spawn(state: Arc<AppState>, shutdown: CancellationToken) {
    let (Some(store), Some(cluster)) = (state.store.as_cluster().cloned(), state.cluster.clone())
    else {
        return;
    };
    let trigger = Arc::new(Trigger::default());
    tokio::spawn(subscriber(
        cluster,
        store.clone(),
        trigger.clone(),
        shutdown.clone(),
    ));
    tokio::spawn(applier(state, store, trigger, shutdown));
}

/// Reloads the store from Redis and, if it changed, rebuilds the connection
/// table. The caller holds the state's write lock. Ok(false): the store does
/// not fit this replica's config file (logged; the previous table stays).
/// Without Redis there is nothing to reload.
pub async fn refresh(state: &AppState) -> Result<bool, StoreError> {
    let Some(store) = state.store.as_cluster() else {
        return Ok(true);
    };
    if !store.load().await? {
        return Ok(true);
    }
    match ConnectionSet::from_sources(
        &state.file(),
        state.config.base_dir.as_deref(),
        &store.snapshot().connections,
        &state.config.extra_ca_pem,
        &state.config.policy,
    ) {
        Ok(set) => {
            crate::reload::apply(state, set);
            Ok(true)
        }
        Err(e) => {
            error!(
                version = store.version(),
                "the API store in Redis does not fit this replica's config file, keeping the previous connections (run every replica with the same file): {e:#}"
            );
            Ok(false)
        }
    }
}

async fn applier(
    state: Arc<AppState>,
    store: Arc<ClusterStore>,
    trigger: Arc<Trigger>,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(POLL_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut stale = !store.loaded();
    // The last failure logged, so an outage is one line, not one per tick.
    let mut failing: Option<String> = None;
    loop {
        let mut ack = false;
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = trigger.notify.notified() => {
                let p = trigger.take();
                stale |= p.force;
                if let Some(v) = p.version {
                    stale |= v != store.version();
                    ack = true;
                }
            }
            _ = tick.tick() => {
                if !stale {
                    match store.current_version().await {
                        Ok(v) => stale = v.unwrap_or(0) != store.version() || !store.loaded(),
                        Err(e) => {
                            note_failure(&mut failing, &e);
                            continue;
                        }
                    }
                }
            }
        }
        if stale {
            let r = {
                let _w = state.write_lock.lock().await;
                refresh(&state).await
            };
            match r {
                Ok(applied) => {
                    stale = false;
                    ack = applied;
                    if failing.take().is_some() {
                        info!(
                            version = store.version(),
                            "the API store in Redis is readable again; connections reloaded"
                        );
                    }
                }
                Err(e) => {
                    note_failure(&mut failing, &e);
                    continue;
                }
            }
        }
        if ack {
            store.publish_applied(store.version()).await;
        }
    }
}

fn note_failure(failing: &mut Option<String>, e: &StoreError) {
    let text = e.to_string();
    if failing.as_deref() == Some(text.as_str()) {
        return;
    }
    if e.is_unavailable() {
        warn!("cannot reload the API store, serving the connections loaded last: {text}");
    } else {
        error!("cannot reload the API store, serving the connections loaded last: {text}");
    }
    *failing = Some(text);
}

async fn subscriber(
    cluster: Arc<Cluster>,
    store: Arc<ClusterStore>,
    trigger: Arc<Trigger>,
    shutdown: CancellationToken,
) {
    let mut delay = RESUBSCRIBE_MIN;
    let mut lost = false;
    loop {
        match subscribe(&cluster).await {
            Ok(pubsub) => {
                delay = RESUBSCRIBE_MIN;
                if lost {
                    info!("subscribed to store changes again; reloading the store");
                } else {
                    info!("subscribed to store changes");
                }
                // Changes made while nobody listened are loaded now.
                trigger.fire(|p| p.force = true);
                if listen(pubsub, &store, &trigger, &shutdown).await {
                    return;
                }
                if !lost {
                    warn!("lost the subscription to store changes (Redis restarted or unreachable); subscribing again");
                }
                lost = true;
            }
            Err(e) => {
                tracing::debug!("cannot subscribe to store changes: {e}");
                lost = true;
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(RESUBSCRIBE_MAX);
    }
}

async fn subscribe(cluster: &Cluster) -> Result<redis::aio::PubSub, String> {
    let mut pubsub =
        tokio::time::timeout(CONNECT_TIMEOUT, cluster.redis.client().get_async_pubsub())
            .await
            .map_err(|_| "connect timeout".to_string())?
            .map_err(|e| e.to_string())?;
    tokio::time::timeout(
        RESPONSE_TIMEOUT,
        pubsub.subscribe(&[CHANNEL_CHANGED, CHANNEL_APPLIED]),
    )
    .await
    .map_err(|_| "subscribe timeout".to_string())?
    .map_err(|e| e.to_string())?;
    Ok(pubsub)
}

/// Reads messages until the connection ends (false) or shutdown (true).
async fn listen(
    pubsub: redis::aio::PubSub,
    store: &ClusterStore,
    trigger: &Trigger,
    shutdown: &CancellationToken,
) -> bool {
    let (mut sink, mut stream) = pubsub.split();
    let mut ping = tokio::time::interval(PING_INTERVAL);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ping.tick().await;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return true,
            m = stream.next() => {
                let Some(msg) = m else { return false };
                let payload = msg.get_payload_bytes();
                if payload.len() > MAX_PAYLOAD {
                    continue;
                }
                match msg.get_channel_name() {
                    CHANNEL_CHANGED => {
                        let v = std::str::from_utf8(payload).ok().and_then(|s| s.parse::<u64>().ok());
                        if let Some(v) = v {
                            trigger.fire(|p| p.version = Some(p.version.map_or(v, |old| old.max(v))));
                        }
                    }
                    CHANNEL_APPLIED => {
                        if let Some(ack) = Ack::parse(payload) {
                            store.record_ack(ack);
                        }
                    }
                    _ => {}
                }
            }
            _ = ping.tick() => {
                let alive = tokio::time::timeout(RESPONSE_TIMEOUT, sink.ping::<redis::Value>()).await;
                if !matches!(alive, Ok(Ok(_))) {
                    return false;
                }
            }
        }
    }
}
