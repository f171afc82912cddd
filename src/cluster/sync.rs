//! The sync task: one per replica, for its whole life. It connects to
//! Redis (and reconnects, with backoff), and while connected:
//! - writes a token's change as soon as the token signals one;
//! - reads other replicas' changes when pub/sub says there are some, and
//!   every `sync_interval` looks whether pub/sub missed any;
//! - on every (re)connection, and whenever Redis lost its data, writes
//!   this replica's whole state — the scripts keep the newer of each
//!   value — then reads everything newer than what it has.
//!
//! Redis away: it says so once (`WARN`), sets `tokenpool_cluster_up` to 0,
//! and the replica serves on its local state until it is back (`INFO`).

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use redis::aio::MultiplexedConnection;
use redis::AsyncConnectionConfig;

use super::seal::NO_KEY;
use super::store::describe;
use super::{token_id, Cluster, ANSWER_TIMEOUT, CONNECT_TIMEOUT};
use crate::pool::{Pool, Token};

/// First wait before reconnecting; doubles up to [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_millis(250);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Tokens read or written per round trip.
pub(super) const BATCH: usize = 256;

/// Why a session with Redis ended.
enum Ended {
    /// Redis could not be reached, or failed.
    Redis(String),
    /// The pool in Redis is sealed with another key (or with none, or
    /// this replica has none).
    KeyMismatch { theirs: String },
}

impl From<redis::RedisError> for Ended {
    fn from(e: redis::RedisError) -> Self {
        Ended::Redis(describe(&e))
    }
}

async fn timed<T, F>(what: &str, fut: F) -> Result<T, Ended>
where
    F: std::future::Future<Output = redis::RedisResult<T>>,
{
    match tokio::time::timeout(CONNECT_TIMEOUT, fut).await {
        Ok(result) => Ok(result?),
        Err(_) => Err(Ended::Redis(format!("{what} timed out"))),
    }
}

pub(super) struct Syncer<F> {
    cluster: Arc<Cluster>,
    current: F,
    /// The pool the index was built from.
    pool: Option<Arc<Pool>>,
    /// The pool's tokens by cluster id.
    index: HashMap<String, Arc<Token>>,
    /// The version of the last change read.
    version: u64,
    /// The epoch of the Redis data read so far.
    epoch: Option<String>,
    /// Whether being away has been said in the log.
    said_away: bool,
    /// Ids new to the pool (a reload) whose records are still to be read.
    unread: Vec<String>,
}

impl<F: Fn() -> Arc<Pool>> Syncer<F> {
    pub(super) fn new(cluster: Arc<Cluster>, current: F) -> Syncer<F> {
        Syncer {
            cluster,
            current,
            pool: None,
            index: HashMap::new(),
            version: 0,
            epoch: None,
            said_away: false,
            unread: Vec::new(),
        }
    }

    pub(super) async fn run(mut self) {
        let mut backoff = MIN_BACKOFF;
        loop {
            let Err(ended) = self.session(&mut backoff).await;
            self.cluster.settled.send_replace(true);
            let was_up = self.cluster.connected();
            self.cluster.set_down();
            self.cluster.metrics.exchange(false);
            match ended {
                Ended::KeyMismatch { theirs } => {
                    if !self.said_away {
                        let (ours, theirs) = (self.cluster.sealer.fingerprint(), theirs);
                        let why = if theirs == NO_KEY {
                            "the cluster's pool is not sealed and this replica has an encryption_key".to_string()
                        } else if ours == NO_KEY {
                            "the cluster's pool is sealed and this replica has no encryption_key"
                                .to_string()
                        } else {
                            format!("the cluster's pool is sealed with another encryption_key (fingerprint {theirs}, this replica's {ours})")
                        };
                        tracing::error!(
                            node = %self.cluster.node,
                            "{why}: serving on local state, not sharing; give every replica the same [cluster] encryption_key"
                        );
                        self.said_away = true;
                    }
                }
                Ended::Redis(why) => {
                    if was_up || !self.said_away {
                        tracing::warn!(
                            node = %self.cluster.node,
                            error = %why,
                            "cannot reach the cluster's Redis: serving on local state, reconnecting"
                        );
                        self.said_away = true;
                    } else {
                        tracing::debug!(error = %why, "still cannot reach the cluster's Redis");
                    }
                }
            }
            let jitter = backoff.mul_f64(fastrand::f64() * 0.2);
            tokio::time::sleep(backoff + jitter).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    /// One connection's life: returns only when it ends.
    async fn session(&mut self, backoff: &mut Duration) -> Result<Infallible, Ended> {
        let cluster = Arc::clone(&self.cluster);
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(ANSWER_TIMEOUT));
        let mut conn = timed(
            "connecting",
            cluster
                .client
                .get_multiplexed_async_connection_with_config(&config),
        )
        .await?;
        let mut pubsub = timed("connecting", cluster.client.get_async_pubsub()).await?;
        timed(
            "subscribing",
            pubsub.subscribe(cluster.store.keys.channel()),
        )
        .await?;
        let mut messages = pubsub.into_on_message();

        let (read, written) = self.catch_up(&mut conn).await?;
        cluster.set_up(conn.clone());
        cluster.settled.send_replace(true);
        *backoff = MIN_BACKOFF;
        if std::mem::take(&mut self.said_away) {
            tracing::info!(
                node = %cluster.node,
                read,
                written,
                "connected to the cluster's Redis again: sharing the pool"
            );
        } else {
            tracing::info!(
                node = %cluster.node,
                read,
                written,
                "connected to the cluster's Redis: sharing the pool"
            );
        }

        let changes = Arc::clone(self.pool().changes());
        let mut tick = tokio::time::interval(cluster.sync_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            if !cluster.connected() {
                // A refresh's exchange failed while this task was busy.
                return Err(Ended::Redis(
                    "a refresh's exchange with Redis failed".into(),
                ));
            }
            tokio::select! {
                () = cluster.lost.notified() => {
                    return Err(Ended::Redis("a refresh's exchange with Redis failed".into()));
                }
                () = changes.notified() => {
                    self.push(&mut conn).await?;
                }
                message = messages.next() => {
                    let Some(message) = message else {
                        return Err(Ended::Redis("the event channel closed".into()));
                    };
                    if !from_node(message.get_payload_bytes(), &cluster.node) {
                        self.pull(&mut conn).await?;
                    }
                }
                _ = tick.tick() => {
                    self.heartbeat(&mut conn).await?;
                }
            }
        }
    }

    /// After connecting, or when Redis lost its data: checks the pool's
    /// key, writes this replica's state, reads what is newer. Returns
    /// `(read, written)` changes.
    async fn catch_up(&mut self, conn: &mut MultiplexedConnection) -> Result<(u64, u64), Ended> {
        let cluster = Arc::clone(&self.cluster);
        let new_epoch = format!("{:016x}", fastrand::u64(..));
        let (epoch, key) = cluster
            .store
            .meta(conn, &new_epoch, cluster.sealer.fingerprint())
            .await?;
        if key != cluster.sealer.fingerprint() {
            return Err(Ended::KeyMismatch { theirs: key });
        }
        if self.epoch.as_deref() != Some(epoch.as_str()) {
            if self.epoch.is_some() {
                tracing::warn!(
                    node = %cluster.node,
                    "the cluster's Redis lost its data (or is another one): writing this replica's pool back"
                );
            }
            self.epoch = Some(epoch);
            self.version = 0;
        }
        self.reindex();
        let written = self.seed(conn).await?;
        let read = self.pull(conn).await?;
        Ok((read, written))
    }

    /// The current pool, re-indexed if a reload replaced it.
    fn pool(&mut self) -> Arc<Pool> {
        self.reindex();
        Arc::clone(self.pool.as_ref().expect("reindex sets the pool"))
    }

    /// Rebuilds the index if the pool changed; the ids new to it are kept
    /// in `unread` until their records are read.
    fn reindex(&mut self) {
        let pool = (self.current)();
        if self.pool.as_ref().is_some_and(|p| Arc::ptr_eq(p, &pool)) {
            return;
        }
        let index: HashMap<String, Arc<Token>> = pool
            .tokens()
            .iter()
            .map(|t| (token_id(t), Arc::clone(t)))
            .collect();
        let new: Vec<String> = index
            .keys()
            .filter(|id| !self.index.contains_key(*id))
            .cloned()
            .collect();
        self.unread.extend(new);
        self.index = index;
        self.pool = Some(pool);
    }

    /// Writes every token's state, refresh and access token; the scripts
    /// keep whichever is newer. Returns how many were taken.
    async fn seed(&mut self, conn: &mut MultiplexedConnection) -> Result<u64, Ended> {
        let pool = self.pool();
        for token in pool.tokens() {
            token.take_shared_dirty();
        }
        let cluster = Arc::clone(&self.cluster);
        let mut written = 0;
        for batch in pool.tokens().chunks(BATCH) {
            let writes = batch.iter().map(|token| {
                let mut conn = conn.clone();
                let cluster = &cluster;
                async move {
                    // The refresh token first: a revocation is checked
                    // against the refresh token stored.
                    let grant = cluster.write_grant(&mut conn, token, true, false).await?;
                    let state = cluster.write_state(&mut conn, token).await?;
                    Ok::<u64, redis::RedisError>(u64::from(state) + u64::from(grant))
                }
            });
            for result in futures_util::future::join_all(writes).await {
                match result {
                    Ok(n) => written += n,
                    Err(e) => {
                        // Written again whole on the next connection.
                        return Err(e.into());
                    }
                }
            }
        }
        Ok(written)
    }

    /// Writes the states changed since the last write.
    async fn push(&mut self, conn: &mut MultiplexedConnection) -> Result<u64, Ended> {
        let pool = self.pool();
        Ok(self.cluster.write_dirty(conn, &pool).await?)
    }

    /// Reads the changes made after the last one read. Returns how many
    /// were taken.
    async fn pull(&mut self, conn: &mut MultiplexedConnection) -> Result<u64, Ended> {
        self.reindex();
        let mut taken = self.read_unread(conn).await?;
        let changed = self.cluster.store.changed_since(conn, self.version).await?;
        let top = changed
            .iter()
            .map(|(_, v)| *v)
            .max()
            .unwrap_or(self.version);
        let ids: Vec<&str> = changed
            .iter()
            .map(|(id, _)| id.as_str())
            .filter(|id| self.index.contains_key(*id))
            .collect();
        taken += self.read(conn, &ids).await?;
        self.cluster.metrics.exchange(true);
        self.version = self.version.max(top);
        Ok(taken)
    }

    /// Reads the records of tokens a reload added.
    async fn read_unread(&mut self, conn: &mut MultiplexedConnection) -> Result<u64, Ended> {
        if self.unread.is_empty() {
            return Ok(0);
        }
        let unread = std::mem::take(&mut self.unread);
        let ids: Vec<&str> = unread.iter().map(String::as_str).collect();
        match self.read(conn, &ids).await {
            Ok(n) => Ok(n),
            Err(e) => {
                self.unread = unread;
                Err(e)
            }
        }
    }

    /// Reads the records of `ids` and takes what is newer in them.
    async fn read(&self, conn: &mut MultiplexedConnection, ids: &[&str]) -> Result<u64, Ended> {
        let mut taken = 0;
        for batch in ids.chunks(BATCH) {
            let records = self.cluster.store.records(conn, batch).await?;
            for (id, record) in batch.iter().zip(&records) {
                let Some(token) = self.index.get(*id) else {
                    continue;
                };
                match self.cluster.take(token, id, record) {
                    Ok(n) => taken += n,
                    Err(e) => {
                        tracing::warn!(token = token.name(), error = %e, "a shared token was not taken");
                    }
                }
            }
        }
        self.cluster.metrics.received(taken);
        Ok(taken)
    }

    /// The periodic look: Redis still has the pool (else it is written
    /// back), nothing was missed, and tokens new to a reloaded pool get
    /// what the cluster knows of them.
    async fn heartbeat(&mut self, conn: &mut MultiplexedConnection) -> Result<(), Ended> {
        let (epoch, version) = self.cluster.store.heartbeat(conn).await?;
        self.cluster.metrics.exchange(true);
        let version = version.unwrap_or(0);
        if epoch.is_none() || epoch != self.epoch || version < self.version {
            // Gone, replaced, or older than what was read (a restored
            // snapshot, a failover to a replica behind): written back.
            if version < self.version {
                tracing::warn!(
                    node = %self.cluster.node,
                    "the cluster's Redis went back in time (a snapshot restored, a failover): writing this replica's pool back"
                );
                self.epoch = None;
            }
            self.catch_up(conn).await?;
            return Ok(());
        }
        self.reindex();
        self.read_unread(conn).await?;
        if version > self.version {
            self.pull(conn).await?;
        }
        Ok(())
    }
}

/// Whether an event (`<version> <node>`) is this replica's own.
fn from_node(payload: &[u8], node: &str) -> bool {
    payload
        .splitn(2, |&b| b == b' ')
        .nth(1)
        .is_some_and(|n| n == node.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_events_are_told_apart() {
        assert!(from_node(b"17 replica-a", "replica-a"));
        assert!(!from_node(b"17 replica-b", "replica-a"));
        assert!(!from_node(b"17", "replica-a"));
        assert!(!from_node(b"", "replica-a"));
    }
}
