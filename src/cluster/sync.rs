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
//!
//! It also finds what makes coordination unsafe: another encryption_key
//! (or none), another pool (`key_prefix`) holding the same tokens — both
//! configuration errors that stop every refresh, said once at `ERROR` —
//! and Redis losing or rolling back its data, which fences leases for a
//! refresh timeout (a refresh in flight elsewhere ends first). Refresh
//! tokens it takes from the cluster are written to the state file before
//! anything presents them.

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

/// First wait before reconnecting; doubles up to [`MAX_BACKOFF`], which
/// is short so that a healed partition is seen within seconds.
const MIN_BACKOFF: Duration = Duration::from_millis(250);
pub(super) const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// Tokens read or written per round trip.
pub(super) const BATCH: usize = 256;

/// Why a session with Redis ended.
enum Ended {
    /// Redis could not be reached, or failed.
    Redis(String),
    /// The pool in Redis is sealed with another key (or with none, or
    /// this replica has none).
    KeyMismatch { theirs: String },
    /// Pools with other key prefixes hold some of the same tokens.
    PrefixClash { others: Vec<String> },
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
    /// Everything is read again once the first look's settle window is
    /// over: what was read during it did not count.
    reread_after_settle: bool,
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
            reread_after_settle: false,
        }
    }

    pub(super) async fn run(mut self) {
        let mut backoff = MIN_BACKOFF;
        let started = tokio::time::Instant::now();
        loop {
            let Err(ended) = self.session(&mut backoff).await;
            // A failed first attempt does not end the start-up wait: a
            // replica that cannot reach Redis yet waits as long as one
            // whose Redis is slow to answer.
            if started.elapsed() >= super::STARTUP_WAIT {
                self.cluster.settled.send_replace(true);
            }
            let was_up = self.cluster.connected();
            self.cluster.set_down();
            self.cluster.metrics.exchange(false);
            match ended {
                Ended::KeyMismatch { theirs } => {
                    let ours = self.cluster.sealer.fingerprint();
                    // Fingerprints go to the log only, never to an answer.
                    let why = if theirs == NO_KEY {
                        "the cluster's pool is not sealed and this replica has an encryption_key"
                    } else if ours == NO_KEY {
                        "the cluster's pool is sealed and this replica has no encryption_key"
                    } else {
                        "the cluster's pool is sealed with another encryption_key"
                    };
                    if self.cluster.fault().is_none() {
                        tracing::error!(
                            node = %self.cluster.node,
                            theirs = %theirs,
                            ours = %ours,
                            "{why}: a configuration error; not sharing, and refreshing nothing (this replica cannot tell whether its refresh tokens are current); give every replica the same [cluster] encryption_key"
                        );
                    }
                    self.cluster.set_fault(Some(why.to_string()));
                    self.said_away = true;
                }
                Ended::PrefixClash { others } => {
                    let why = "another pool in this Redis (another key_prefix) holds some of the same tokens";
                    if self.cluster.fault().is_none() {
                        tracing::error!(
                            node = %self.cluster.node,
                            others = %others.join(", "),
                            "{why}: a configuration error; refreshing nothing (two pools would each refresh the same accounts); give every replica of one pool the same [cluster] key_prefix, and each token to one pool"
                        );
                    }
                    self.cluster.set_fault(Some(why.to_string()));
                    self.said_away = true;
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
        if cluster.fault().is_some() {
            tracing::info!(node = %cluster.node, "the cluster's configuration error is gone");
            cluster.set_fault(None);
        }
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
    /// key and that no other pool holds its tokens, fences leases after a
    /// loss, writes this replica's state, reads what is newer. Returns
    /// `(read, written)` changes.
    async fn catch_up(&mut self, conn: &mut MultiplexedConnection) -> Result<(u64, u64), Ended> {
        let cluster = Arc::clone(&self.cluster);
        let new_epoch = format!("{:016x}", fastrand::u64(..));
        let meta = cluster
            .store
            .meta(conn, &new_epoch, cluster.sealer.fingerprint())
            .await?;
        if meta.key != cluster.sealer.fingerprint() {
            return Err(Ended::KeyMismatch { theirs: meta.key });
        }
        self.claim(conn).await?;
        let lost = match self.epoch.as_deref() {
            Some(old) if old != meta.epoch => Some(
                "the cluster's Redis lost its data (flushed, or restarted without it)",
            ),
            Some(_) if meta.version < self.version => Some(
                "the cluster's Redis went back in time (a snapshot restored, or a failover to a replica behind)",
            ),
            _ => None,
        };
        if let Some(what) = lost {
            // A refresh in flight elsewhere may hold a lease that is gone:
            // none is taken until it has ended.
            let window = cluster.fence_window();
            cluster.fence();
            cluster.store.fence(conn, window).await?;
            tracing::warn!(
                node = %cluster.node,
                fence = ?window,
                "{what}: no refresh lease until the fence is over; writing this replica's pool back"
            );
            self.version = 0;
        } else if self.epoch.is_none() {
            // The first data this process reads: it cannot tell a new
            // cluster from one that lost its data while running replicas,
            // holding newer refresh tokens, have not reconnected yet, nor
            // current data from a restored snapshot. They get time to
            // fence or write back first (the window is also written as the
            // pool's fence when this replica created the epoch, so that
            // replicas starting beside it wait too). Access tokens other
            // replicas stored are used meanwhile; only a refresh waits.
            let window = cluster.settle_window();
            *cluster.trust_from.lock().unwrap_or_else(|e| e.into_inner()) =
                Some(tokio::time::Instant::now() + window);
            self.reread_after_settle = true;
            if meta.created {
                cluster.store.fence(conn, window).await?;
            }
        }
        let full = self.version == 0;
        self.epoch = Some(meta.epoch);
        self.reindex();
        // Leases asked for while Redis stopped answering are given back;
        // refreshes this replica knows unsettled keep their mark, whatever
        // the data lost.
        cluster.give_back_abandoned(conn).await?;
        cluster.reassert_unsettled(conn).await?;
        let written = self.seed(conn).await?;
        let read = self.pull(conn).await?;
        if full {
            // Every record was read: a token without one is one the
            // cluster knows nothing of.
            for id in self.index.keys() {
                cluster.learned(id, 0);
            }
        }
        Ok((read, written))
    }

    /// Says this pool is alive and claims its tokens; fails when a running
    /// pool with another key prefix holds some of them, or found this one
    /// holding its own.
    async fn claim(&mut self, conn: &mut MultiplexedConnection) -> Result<(), Ended> {
        let cluster = Arc::clone(&self.cluster);
        cluster.store.alive(conn, cluster.alive_ms()).await?;
        self.reindex();
        let ids: Vec<&str> = self.index.keys().map(String::as_str).collect();
        let mut others = Vec::new();
        for batch in ids.chunks(BATCH) {
            for other in cluster.store.claim(conn, batch).await? {
                if !others.contains(&other) {
                    others.push(other);
                }
            }
        }
        let clash: Option<String> = redis::cmd("GET")
            .arg(cluster.store.keys.clash())
            .query_async(conn)
            .await?;
        others.extend(clash.filter(|c| !others.contains(c)));
        if others.is_empty() {
            Ok(())
        } else {
            Err(Ended::PrefixClash { others })
        }
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
            token.take_replica_dirty();
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
        // What a lease request is held to.
        *self.cluster.seen.lock().unwrap_or_else(|e| e.into_inner()) = super::Seen {
            epoch: self.epoch.clone(),
            version: self.version,
        };
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

    /// Reads the records of `ids` and takes what is newer in them; a
    /// refresh token taken is in the state file before this returns.
    async fn read(&self, conn: &mut MultiplexedConnection, ids: &[&str]) -> Result<u64, Ended> {
        let mut taken = 0;
        let mut refresh_tokens = false;
        for batch in ids.chunks(BATCH) {
            let records = self.cluster.store.records(conn, batch).await?;
            for (id, record) in batch.iter().zip(&records) {
                let Some(token) = self.index.get(*id) else {
                    continue;
                };
                match self.cluster.take(token, id, record) {
                    Ok((n, rt)) => {
                        taken += n;
                        refresh_tokens |= rt;
                    }
                    Err(e) => {
                        tracing::warn!(token = token.name(), error = %e, "a shared token was not taken");
                    }
                }
            }
        }
        if refresh_tokens {
            if let Some(pool) = &self.pool {
                self.cluster.persist(pool).await;
            }
        }
        self.cluster.metrics.received(taken);
        Ok(taken)
    }

    /// The periodic look: Redis still has the pool (else it is written
    /// back), nothing was missed, and tokens new to a reloaded pool get
    /// what the cluster knows of them.
    async fn heartbeat(&mut self, conn: &mut MultiplexedConnection) -> Result<(), Ended> {
        let (epoch, version, clash) = self
            .cluster
            .store
            .heartbeat(conn, self.cluster.alive_ms())
            .await?;
        self.cluster.metrics.exchange(true);
        if let Some(other) = clash {
            return Err(Ended::PrefixClash {
                others: vec![other],
            });
        }
        let version = version.unwrap_or(0);
        if self.reread_after_settle && !self.cluster.settling() {
            // The first look is trusted now: read it all again, so that
            // every token's record counts as the cluster's word.
            self.reread_after_settle = false;
            self.version = 0;
            self.pull(conn).await?;
            for id in self.index.keys() {
                self.cluster.learned(id, 0);
            }
        }
        if epoch.is_none() || epoch != self.epoch || version < self.version {
            // Gone, replaced, or older than what was read (a restored
            // snapshot, a failover to a replica behind): `catch_up` says
            // which, fences leases, and writes this replica's pool back.
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
