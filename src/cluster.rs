//! Cluster mode (`[cluster]`, `docs/operations.md#replicas`): replicas
//! share one pool through Redis.
//!
//! Shared, per token: its current refresh token (the one with the most
//! rotations wins), its access token (the one that lives longest wins)
//! and its state (the newest change wins; `revoked` is sticky). Not
//! shared: round-robin cursors, request counters, metrics.
//!
//! The request path never waits on Redis, except a request that needs a
//! refresh: [`Cluster::coordinate`] then takes another replica's fresh
//! access token, or the token's lease (one refresh across the cluster), or
//! waits for the replica that holds it.
//!
//! **A refresh token is presented only when this replica can show it is
//! current**: under the token's lease, in Redis data it read (its epoch,
//! not behind the version it read, not fenced after a loss), with the
//! token's record not ahead of it. When it cannot coordinate (Redis away,
//! frozen or slow, fenced, or a configuration error), it refreshes alone
//! only what `[cluster] refresh_alone` allows: by default a token whose
//! refresh token never rotated (as far as the cluster last told it or its
//! state file says), and never one whose history it does not know (no
//! state file, record never read). Anything else keeps serving on its
//! access token and then waits (`cluster_unavailable`). Everything else moves in the
//! background (`cluster::sync`): local changes are written as they happen, other
//! replicas' changes arrive by pub/sub and, for what pub/sub missed, by a
//! check every `sync_interval`. Redis away or slow: every replica serves
//! on its local state, and writes what changed meanwhile when it is back.
//!
//! `cluster::store` holds the key layout and the Lua scripts; [`seal`] the
//! encryption of stored tokens.

pub mod seal;
mod store;
mod sync;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwapOption;
use redis::aio::MultiplexedConnection;
use serde::Serialize;
use tokio::sync::{watch, Notify};
use tokio::time::Instant;

use crate::config::{ClusterConfig, RefreshAlone, Secret};
use crate::metrics::{ClusterMetrics, Metrics, Refusal};
use crate::pool::token::{short_fingerprint, unix_ms};
use crate::pool::{AccessToken, Pool, ReplicaState, Stamp, Token, TokenState};
use seal::{SealError, Sealer};
use store::{GrantWrite, LeaseAnswer, LeaseAsk, Record, StateWrite, Store};

/// Longest wait for one Redis answer; past it the replica goes on alone.
const ANSWER_TIMEOUT: Duration = Duration::from_millis(500);
/// Longest wait to connect to Redis.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How often a replica waiting for another's refresh looks again.
const LEASE_POLL: Duration = Duration::from_millis(100);
/// How long a refresh lease lasts unless its holder renews it (every third
/// of it, while its call runs): a dead holder's lease is gone this soon.
pub const LEASE_TTL: Duration = Duration::from_secs(5);
/// [`LEASE_TTL`] as Redis takes it.
const LEASE_TTL_MS: u64 = LEASE_TTL.as_millis() as u64;
/// How long a refresh waits at start for the first connection to Redis,
/// rather than refresh alone with a refresh token the cluster may have
/// replaced.
const STARTUP_WAIT: Duration = Duration::from_secs(3);

/// What `/admin/pool` says of the cluster.
#[derive(Debug, Clone, Serialize)]
pub struct ClusterStatus {
    /// This replica's name.
    pub node: String,
    /// Whether it shares the pool now (false: serving on local state).
    pub connected: bool,
    /// A configuration error the cluster showed (another encryption_key,
    /// none, another pool holding the same tokens): nothing is refreshed.
    pub config_error: Option<String>,
}

/// How a refresh goes in a cluster.
#[derive(Debug)]
pub enum Coordination {
    /// Another replica's access token (not the one held, which may have
    /// met a 401, and not one that expires sooner) is installed: no
    /// refresh needed.
    Fresh,
    /// This replica holds the token's lease: refresh ([`Cluster::holding`]
    /// it), then [`Cluster::finish`] and [`Cluster::release`].
    Leader(Lease),
    /// It cannot coordinate, and `refresh_alone` allows this token: refresh
    /// alone.
    Alone,
    /// It cannot show the refresh token is current: no refresh (`why`: one
    /// of [`Refusal::ALL`]).
    Refused(Refusal),
    /// While waiting, another replica took the token out of rotation.
    Out,
    /// Another replica's refresh did not end in time.
    Busy,
}

/// Where this replica's knowledge of Redis's data stands, for its lease
/// requests: a lease is taken only in the data it read.
#[derive(Debug, Default, Clone)]
struct Seen {
    /// The epoch read (`None` before the first connection).
    epoch: Option<String>,
    /// The version read.
    version: u64,
}

/// A token's refresh lease, held by this replica.
#[derive(Debug)]
pub struct Lease {
    id: String,
    value: String,
}

/// One replica's link to the cluster.
pub struct Cluster {
    node: String,
    sync_interval: Duration,
    client: redis::Client,
    store: Store,
    sealer: Sealer,
    /// The connection while connected, with its number: a failure on an
    /// older connection does not end a newer one.
    conn: ArcSwapOption<(u64, MultiplexedConnection)>,
    connections: std::sync::atomic::AtomicU64,
    /// Woken when a request's exchange with Redis failed: the sync task
    /// reconnects.
    lost: Notify,
    /// True once the first connection succeeded, or the start-up wait is
    /// over without one.
    settled: watch::Sender<bool>,
    metrics: ClusterMetrics,
    /// What it may refresh while it cannot coordinate.
    refresh_alone: RefreshAlone,
    /// The state file, where refresh tokens taken from the cluster go
    /// before they are presented.
    state: Option<Arc<crate::state::StateStore>>,
    /// By token id, the highest rotation count its record in the cluster
    /// showed; an id is here once its record was read.
    known: Mutex<HashMap<String, u64>>,
    /// A configuration error the cluster showed (another encryption_key,
    /// none, another pool holding the same tokens): nothing is refreshed.
    fault: ArcSwapOption<String>,
    /// No lease before this (Unix ms, this replica's clock): Redis lost or
    /// rolled back its data, and a refresh in flight elsewhere may still
    /// present the token the lost lease covered.
    fence_until: AtomicU64,
    /// No lease before this: the data was new to this replica (it created
    /// the epoch, or has no state file), and running replicas get time to
    /// fence or re-seed first.
    trust_from: Mutex<Option<Instant>>,
    /// The data this replica read.
    seen: Mutex<Seen>,
    /// How long a refresh call may last: a fence lasts this, plus a margin.
    refresh_timeout: Duration,
    /// Refreshes this replica made whose result the cluster does not know
    /// (the answer never came, or it could not be written), by token id:
    /// the lease value and the rotation presented. Marked pending again
    /// whenever the data lost the mark, until a newer rotation is known.
    unsettled: Mutex<HashMap<String, (String, u64)>>,
    /// Leases asked for whose answer never came (Redis froze or the link
    /// broke): Redis may still take them when it thaws, marking the token
    /// pending for a refresh that was never made. Given back (the mark
    /// with them) on the next connection. By token id, the lease value.
    abandoned: Mutex<Vec<(String, String)>>,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("node", &self.node)
            .finish_non_exhaustive()
    }
}

/// A token's id in the cluster: its name and the fingerprint of its
/// configured secret, so that an operator's new secret starts afresh.
pub fn token_id(token: &Token) -> String {
    format!(
        "{}:{}",
        token.name(),
        short_fingerprint(token.credentials().configured())
    )
}

impl Cluster {
    /// A link for `config`; nothing is connected until [`Cluster::spawn`].
    /// `state`: the state file, which keeps the tokens' history; `refresh_timeout`:
    /// how long a refresh call may last (`[refresh] timeout`).
    pub fn new(
        config: &ClusterConfig,
        metrics: &Metrics,
        state: Option<Arc<crate::state::StateStore>>,
        refresh_timeout: Duration,
    ) -> anyhow::Result<Cluster> {
        let url = config.redis.expose();
        let client = match &config.ca_pem {
            Some(pem) => redis::Client::build_with_tls(
                url,
                redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(pem.clone()),
                },
            ),
            None => redis::Client::open(url),
        }
        .map_err(|e| {
            anyhow::anyhow!(
                "[cluster] redis: cannot use this URL ({})",
                store::describe(&e)
            )
        })?;
        let metrics = metrics.cluster();
        metrics.connected(false);
        Ok(Cluster {
            node: config.node.clone(),
            sync_interval: config.sync_interval,
            client,
            store: Store::new(&config.key_prefix, &config.node),
            sealer: Sealer::new(config.encryption_key.as_ref()),
            conn: ArcSwapOption::empty(),
            connections: std::sync::atomic::AtomicU64::new(0),
            lost: Notify::new(),
            settled: watch::Sender::new(false),
            metrics,
            refresh_alone: config.refresh_alone,
            state,
            known: Mutex::new(HashMap::new()),
            fault: ArcSwapOption::empty(),
            fence_until: AtomicU64::new(0),
            trust_from: Mutex::new(None),
            seen: Mutex::new(Seen::default()),
            refresh_timeout,
            unsettled: Mutex::new(HashMap::new()),
            abandoned: Mutex::new(Vec::new()),
        })
    }

    /// This replica's node name.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// How long this pool's `alive` mark lasts unless renewed.
    fn alive_ms(&self) -> u64 {
        (self.sync_interval * 3)
            .max(Duration::from_secs(3))
            .as_millis() as u64
    }

    /// Writes the state file now (a refresh token was taken from the
    /// cluster: it must survive a restart before anything presents it).
    pub async fn persist(&self, pool: &Arc<Pool>) {
        let Some(store) = &self.state else {
            return;
        };
        let (store, pool) = (Arc::clone(store), Arc::clone(pool));
        match tokio::task::spawn_blocking(move || store.save(&pool)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::error!(error = %e, "a refresh token taken from the cluster is NOT persisted")
            }
            Err(e) => tracing::error!(error = %e, "state writer failed"),
        }
    }

    /// The configuration error the cluster showed, if any: `/readyz` says it.
    pub fn fault(&self) -> Option<Arc<String>> {
        self.fault.load_full()
    }

    fn set_fault(&self, fault: Option<String>) {
        self.metrics.config_ok(fault.is_none());
        self.fault.store(fault.map(Arc::new));
    }

    /// How long leases wait after Redis lost or rolled back its data: a
    /// refresh call in flight elsewhere has ended by then.
    fn fence_window(&self) -> Duration {
        // A refresh in flight ends within its timeout; a replica whose
        // grant could not be written when Redis went reconnects within the
        // longest backoff, and writes it back then.
        self.refresh_timeout + sync::MAX_BACKOFF + Duration::from_secs(2)
    }

    /// No lease until the fence window is over, from now.
    fn fence(&self) {
        let until = unix_ms(SystemTime::now() + self.fence_window());
        self.fence_until.fetch_max(until, Ordering::Relaxed);
    }

    fn fenced(&self) -> bool {
        self.fence_until.load(Ordering::Relaxed) > unix_ms(SystemTime::now())
    }

    /// How long a replica new to the data waits before its first lease:
    /// long enough for every running replica to reconnect (the longest
    /// backoff, its jitter, a connection) and look twice, so that a loss
    /// is fenced and what a restored snapshot or an empty Redis lacks is
    /// written back before this replica trusts what it reads.
    fn settle_window(&self) -> Duration {
        sync::MAX_BACKOFF.mul_f64(1.2) + self.sync_interval * 2 + Duration::from_secs(2)
    }

    /// Whether the data read may still lack what running replicas hold.
    fn settling(&self) -> bool {
        self.trust_from
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some_and(|from| from > Instant::now())
    }

    /// Records what the cluster told of token `id`: its record was read,
    /// with this rotation count. Not while settling: data new to this
    /// replica tells nothing yet (an empty record may only mean that the
    /// replica holding the token's rotations has not written them back).
    fn learned(&self, id: &str, rotation: u64) {
        if self.settling() {
            return;
        }
        let mut known = self.known.lock().unwrap_or_else(|e| e.into_inner());
        let seen = known.entry(id.to_string()).or_insert(0);
        *seen = (*seen).max(rotation);
    }

    /// Records that the state file holds `token`'s history (its rotation
    /// count as restored).
    pub fn known_from_state(&self, token: &Token) {
        let mut known = self.known.lock().unwrap_or_else(|e| e.into_inner());
        let seen = known.entry(token_id(token)).or_insert(0);
        *seen = (*seen).max(token.credentials().rotation());
    }

    /// Whether this replica may refresh `token` without the cluster; the
    /// refusal's why when not.
    fn may_refresh_alone(&self, token: &Token, why: Refusal) -> Result<(), Refusal> {
        if self.fault.load().is_some() {
            return Err(Refusal::Misconfigured);
        }
        if self.refresh_alone == RefreshAlone::Never {
            return Err(why);
        }
        let cluster_rotation = self
            .known
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&token_id(token))
            .copied();
        // History is per token: its record in the state file, or read from
        // the cluster. A configured state file that never saw the token
        // (a new volume) is no history.
        if cluster_rotation.is_none() {
            return Err(Refusal::NoHistory);
        }
        if token.credentials().rotation() > 0 || cluster_rotation.unwrap_or(0) > 0 {
            return Err(Refusal::Rotated);
        }
        Ok(())
    }

    /// Gives back the leases whose answer never came (with their pending
    /// marks: no refresh was made under them).
    async fn give_back_abandoned(
        &self,
        conn: &mut MultiplexedConnection,
    ) -> redis::RedisResult<()> {
        let abandoned =
            std::mem::take(&mut *self.abandoned.lock().unwrap_or_else(|e| e.into_inner()));
        for (i, (id, value)) in abandoned.iter().enumerate() {
            if let Err(e) = self.store.release_lease(conn, id, value, true).await {
                // The rest is given back on the next connection.
                self.abandoned
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .extend(abandoned[i..].iter().cloned());
                return Err(e);
            }
        }
        Ok(())
    }

    /// Marks every refresh this replica knows unsettled pending again
    /// (after Redis lost or rolled back its data, the mark may be gone).
    async fn reassert_unsettled(&self, conn: &mut MultiplexedConnection) -> redis::RedisResult<()> {
        let unsettled: Vec<(String, String)> = self
            .unsettled
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(id, (value, _))| (id.clone(), value.clone()))
            .collect();
        for (id, value) in unsettled {
            // The mark alone: it keeps leases off that one token.
            self.store
                .reassert_pending(conn, &id, &value, Duration::ZERO)
                .await?;
        }
        Ok(())
    }

    /// `Alone` if `token` may be refreshed alone, else `Refused`, counted.
    fn alone_or_refused(&self, token: &Token, why: Refusal) -> Coordination {
        match self.may_refresh_alone(token, why) {
            Ok(()) => Coordination::Alone,
            Err(why) => {
                self.metrics.refused(why);
                tracing::debug!(
                    token = token.name(),
                    why = why.as_str(),
                    "not refreshing: the refresh token cannot be shown current"
                );
                Coordination::Refused(why)
            }
        }
    }

    /// Whether the pool is shared now.
    pub fn connected(&self) -> bool {
        self.conn.load().is_some()
    }

    /// What `/admin/pool` shows.
    pub fn status(&self) -> ClusterStatus {
        ClusterStatus {
            node: self.node.clone(),
            connected: self.connected(),
            config_error: self.fault().map(|f| f.to_string()),
        }
    }

    /// Starts the task that keeps this replica's pool and the cluster's
    /// in step, on the pool `current` gives (it changes with reloads).
    pub fn spawn<F>(self: &Arc<Self>, current: F) -> tokio::task::JoinHandle<()>
    where
        F: Fn() -> Arc<Pool> + Send + Sync + 'static,
    {
        tokio::spawn(sync::Syncer::new(Arc::clone(self), current).run())
    }

    /// Waits, at most `within`, until the first connection attempt ended:
    /// the background refresher starts after it, so that replicas that
    /// start together do not all refresh every token.
    pub async fn settled(&self, within: Duration) {
        let mut rx = self.settled.subscribe();
        let _ = tokio::time::timeout(within, rx.wait_for(|s| *s)).await;
    }

    /// Writes every change not yet shared (at shutdown), within `within`.
    pub async fn flush(&self, pool: &Pool, within: Duration) {
        let Some((_, mut conn)) = self.conn() else {
            return;
        };
        let _ = tokio::time::timeout(within, self.write_dirty(&mut conn, pool)).await;
    }

    /// Writes the states of `pool` changed since their last write, in
    /// batches; returns how many Redis took. On a failure the rest are
    /// marked again, for the next connection.
    async fn write_dirty(
        &self,
        conn: &mut MultiplexedConnection,
        pool: &Pool,
    ) -> redis::RedisResult<u64> {
        let dirty: Vec<&Arc<Token>> = pool
            .tokens()
            .iter()
            .filter(|t| t.take_replica_dirty())
            .collect();
        let mut written = 0;
        for (i, batch) in dirty.chunks(sync::BATCH).enumerate() {
            let writes = batch.iter().map(|token| {
                let mut conn = conn.clone();
                async move { self.write_state(&mut conn, token).await }
            });
            let results = futures_util::future::join_all(writes).await;
            if let Some(e) = results.iter().find_map(|r| r.as_ref().err()) {
                for token in &dirty[i * sync::BATCH..] {
                    token.mark_replica_dirty();
                }
                return Err(e.clone());
            }
            written += results.iter().filter(|r| matches!(r, Ok(true))).count() as u64;
        }
        Ok(written)
    }

    fn conn(&self) -> Option<(u64, MultiplexedConnection)> {
        self.conn.load_full().map(|c| (c.0, c.1.clone()))
    }

    fn set_up(&self, conn: MultiplexedConnection) {
        let number = self.connections.fetch_add(1, Ordering::Relaxed) + 1;
        self.conn.store(Some(Arc::new((number, conn))));
        self.metrics.connected(true);
    }

    fn set_down(&self) {
        self.conn.store(None);
        self.metrics.connected(false);
    }

    /// A refresh's exchange with Redis on connection `number` failed: go
    /// on alone, and have the sync task reconnect (it says so in the log).
    fn lost(&self, number: u64, e: &redis::RedisError) {
        tracing::debug!(error = %store::describe(e), "a refresh's exchange with Redis failed");
        self.metrics.exchange(false);
        if self.conn.load().as_ref().is_some_and(|c| c.0 == number) {
            self.set_down();
            self.lost.notify_waiters();
        }
    }

    /// Redis's data is not what this replica read (found on connection
    /// `number`): the sync task reconnects and reads it again.
    fn anomaly(&self, number: u64) {
        if self.conn.load().as_ref().is_some_and(|c| c.0 == number) {
            self.set_down();
            self.lost.notify_waiters();
        }
    }

    /// Decides how `token`'s refresh goes: see [`Coordination`]. `held`
    /// is the access token the replica had when it decided to refresh (a
    /// different valid one, from another replica, makes the refresh
    /// needless); `patience` is how long to wait for another replica's
    /// refresh. Each round of asking Redis gets 500 ms to answer; slower,
    /// the replica refreshes alone.
    pub async fn coordinate(
        &self,
        token: &Token,
        held: Option<u64>,
        patience: Duration,
    ) -> Coordination {
        if self.fault.load().is_some() {
            self.metrics.refused(Refusal::Misconfigured);
            return Coordination::Refused(Refusal::Misconfigured);
        }
        if !self.connected() && !*self.settled.borrow() {
            // At start, the cluster's refresh token may be newer than this
            // replica's: wait a little for the first connection.
            self.settled(STARTUP_WAIT).await;
        }
        let mut give_up = Instant::now() + patience;
        let Some((number, mut conn)) = self.conn() else {
            return self.alone_or_refused(token, Refusal::Away);
        };
        let id = token_id(token);
        let fresh = || {
            token
                .credentials()
                .access()
                .is_some_and(|a| Some(a.id) != held && a.valid_at(Instant::now()))
        };
        loop {
            // Redis's answering time in this round (the time spent waiting
            // for another replica between rounds does not count).
            let mut waited = Duration::ZERO;
            let asked = Instant::now();
            let record = match self.store.record(&mut conn, &id).await {
                Ok(record) => record,
                Err(e) => {
                    self.lost(number, &e);
                    return self.alone_or_refused(token, Refusal::Away);
                }
            };
            waited += asked.elapsed();
            self.metrics.exchange(true);
            match self.take(token, &id, &record) {
                Ok((n, _)) => self.metrics.received(n),
                Err(e) => {
                    tracing::warn!(token = token.name(), error = %e, "cannot read the cluster's record of this token");
                    return self.alone_or_refused(token, Refusal::Misconfigured);
                }
            }
            if fresh() {
                return Coordination::Fresh;
            }
            if token.is_out_for_good() {
                return Coordination::Out;
            }
            // New to the data: running replicas fence a loss or write back
            // what the data lacks first; then read it again.
            let trust_from = *self.trust_from.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(from) = trust_from.filter(|from| *from > Instant::now()) {
                tokio::time::sleep_until(from).await;
                give_up = Instant::now() + patience;
                continue;
            }
            if self.fenced() {
                return self.alone_or_refused(token, Refusal::Fenced);
            }
            let value = format!("{} {:016x}", self.node, fastrand::u64(..));
            let seen = self.seen.lock().unwrap_or_else(|e| e.into_inner()).clone();
            let Some(epoch) = seen.epoch.as_deref() else {
                return self.alone_or_refused(token, Refusal::Away);
            };
            let asked = Instant::now();
            let answer = self
                .store
                .take_lease(
                    &mut conn,
                    LeaseAsk {
                        id: &id,
                        value: &value,
                        ttl_ms: LEASE_TTL_MS,
                        epoch,
                        version: seen.version,
                    },
                )
                .await;
            match answer {
                Ok(LeaseAnswer::Taken) => {
                    let lease = Lease { id, value };
                    // The holder before may have written its result and let
                    // go just before: look again before calling.
                    let record = match self.store.record(&mut conn, &lease.id).await {
                        Ok(record) => record,
                        Err(e) => {
                            self.lost(number, &e);
                            return self.alone_or_refused(token, Refusal::Away);
                        }
                    };
                    if self.take(token, &lease.id, &record).is_ok() && fresh() {
                        self.release(lease, true, 0).await;
                        return Coordination::Fresh;
                    }
                    if field(&record, "rt_gen") > token.credentials().rotation() {
                        // The cluster knows a newer refresh token this
                        // replica could not take: presenting its own
                        // would present a superseded one.
                        self.release(lease, true, 0).await;
                        self.metrics.refused(Refusal::Behind);
                        tracing::warn!(
                            token = token.name(),
                            "the cluster holds a newer refresh token than this replica can read; not refreshing"
                        );
                        return Coordination::Refused(Refusal::Behind);
                    }
                    return Coordination::Leader(lease);
                }
                Ok(LeaseAnswer::Held) => {}
                Ok(LeaseAnswer::Fenced) => {
                    self.fence();
                    return self.alone_or_refused(token, Refusal::Fenced);
                }
                Ok(LeaseAnswer::Unsettled) => {
                    // A refresh another replica (or this one) started ended
                    // without its result in the cluster: the refresh token
                    // may have rotated under it. Its holder writes the
                    // result when it is back; until then only what never
                    // rotates may be refreshed.
                    return self.alone_or_refused(token, Refusal::Unsettled);
                }
                Ok(LeaseAnswer::NotTheDataRead) => {
                    // Redis lost or rolled back its data since this replica
                    // read it: the sync task reconnects and reads it again,
                    // and no lease is taken before the fence is over.
                    tracing::debug!(
                        token = token.name(),
                        "Redis's data changed under this replica; no lease"
                    );
                    self.fence();
                    self.anomaly(number);
                    return self.alone_or_refused(token, Refusal::Fenced);
                }
                Err(e) => {
                    // Redis may still run this request when it answers
                    // again: the lease, if taken, is given back then.
                    self.abandoned
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push((id.clone(), value.clone()));
                    self.lost(number, &e);
                    return self.alone_or_refused(token, Refusal::Away);
                }
            }
            waited += asked.elapsed();
            if waited > ANSWER_TIMEOUT {
                tracing::debug!(token = token.name(), "Redis is slow; not waiting for it");
                return self.alone_or_refused(token, Refusal::Away);
            }
            if Instant::now() >= give_up {
                return Coordination::Busy;
            }
            // Another replica refreshes: its result shows in the record.
            tokio::time::sleep(LEASE_POLL).await;
        }
    }

    /// Runs `call` (the refresh) while renewing `lease`, so that the lease
    /// outlives a long call but not a dead holder.
    pub async fn holding<F: std::future::Future>(&self, lease: &Lease, call: F) -> F::Output {
        tokio::pin!(call);
        let mut renew = tokio::time::interval(LEASE_TTL / 3);
        renew.tick().await;
        loop {
            tokio::select! {
                out = &mut call => return out,
                _ = renew.tick() => {
                    if let Some((number, mut conn)) = self.conn() {
                                    match self.store.renew_lease(&mut conn, &lease.id, &lease.value, LEASE_TTL_MS).await {
                            Ok(true) => {}
                            Ok(false) => {
                                // Redis lost the lease (a failover, a flush,
                                // a snapshot restored) while the refresh
                                // runs: another replica must not take it
                                // and present the same refresh token.
                                tracing::warn!("a refresh lease vanished under its holder; marking the refresh pending again and fencing leases");
                                if let Err(e) = self
                                    .store
                                    .reassert_pending(&mut conn, &lease.id, &lease.value, self.fence_window())
                                    .await
                                {
                                    self.lost(number, &e);
                                }
                            }
                            Err(e) => self.lost(number, &e),
                        }
                    }
                }
            }
        }
    }

    /// Shares what a refresh of `token` brought: its access token, and its
    /// refresh token if `rotated`. Without Redis, it is shared on return.
    /// Whether it was written.
    pub async fn finish(&self, token: &Token, rotated: bool) -> bool {
        let Some((number, mut conn)) = self.conn() else {
            return false;
        };
        match self.write_grant(&mut conn, token, rotated, true).await {
            Ok(_) => {
                // The token's refresh token and a fresh access token are
                // the cluster's now: an earlier unsettled refresh of it is
                // settled by this one.
                self.unsettled
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&token_id(token));
                true
            }
            Err(e) => {
                self.lost(number, &e);
                false
            }
        }
    }

    /// Gives a lease back (it expires by itself if this fails); `settled`:
    /// the cluster knows the refresh's result (written, or nothing
    /// rotated), so the token is no longer pending. Unsettled, the pending
    /// mark stays until a replica writes a newer refresh token: nobody
    /// presents one that may have been superseded meanwhile.
    pub async fn release(&self, lease: Lease, settled: bool, rotation: u64) {
        {
            let mut unsettled = self.unsettled.lock().unwrap_or_else(|e| e.into_inner());
            if settled {
                unsettled.remove(&lease.id);
            } else {
                unsettled.insert(lease.id.clone(), (lease.value.clone(), rotation));
            }
        }
        if let Some((number, mut conn)) = self.conn() {
            if let Err(e) = self
                .store
                .release_lease(&mut conn, &lease.id, &lease.value, settled)
                .await
            {
                self.lost(number, &e);
            }
        }
    }

    /// Before `token` is revoked because the refresh endpoint rejected
    /// `used` (the fingerprint of the refresh token sent): whether another
    /// replica holds a newer refresh token, now taken here. A rejection
    /// of a superseded refresh token is no revocation.
    pub async fn superseded(&self, token: &Token, used: &str) -> bool {
        let Some((number, mut conn)) = self.conn() else {
            return false;
        };
        let id = token_id(token);
        let record = match self.store.record(&mut conn, &id).await {
            Ok(record) => record,
            Err(e) => {
                self.lost(number, &e);
                return false;
            }
        };
        let Some(fp) = record.get("rt_fp").filter(|fp| *fp != used) else {
            return false;
        };
        let Some(stored) = record.get("rt") else {
            return false;
        };
        let rotation = field(&record, "rt_gen");
        match self.sealer.open(&id, "rt", stored) {
            Ok(rt) => {
                let taken = token.adopt_refresh_token(Secret::new(rt), rotation, true);
                tracing::info!(
                    token = token.name(),
                    stored = %fp,
                    "the refresh endpoint rejected a refresh token another replica has replaced; taking the newer one"
                );
                taken
            }
            Err(e) => {
                tracing::warn!(token = token.name(), error = %e, "cannot read the cluster's refresh token");
                false
            }
        }
    }

    /// Takes what `record` holds that is newer than `token` has: refresh
    /// token, state, access token. Returns how many were taken, and
    /// whether one was the refresh token (to be persisted before use).
    fn take(&self, token: &Token, id: &str, record: &Record) -> Result<(u64, bool), SealError> {
        let node = record.get("node").map_or("?", String::as_str);
        let mut taken = 0;
        let mut refresh_token = false;
        let rotation = field(record, "rt_gen");
        self.learned(id, rotation);
        {
            let mut unsettled = self.unsettled.lock().unwrap_or_else(|e| e.into_inner());
            if unsettled
                .get(id)
                .is_some_and(|(_, presented)| rotation > *presented)
            {
                // A newer refresh token is written: what happened to the one
                // presented no longer matters.
                unsettled.remove(id);
            }
        }
        if let (Some(stored), Some(fp)) = (record.get("rt"), record.get("rt_fp")) {
            if rotation > token.credentials().rotation()
                && *fp != token.credentials().refresh_fingerprint()
            {
                let rt = self.sealer.open(id, "rt", stored)?;
                let had = token.credentials().rotation();
                if token.adopt_refresh_token(Secret::new(rt), rotation, false) {
                    tracing::info!(
                        token = token.name(),
                        node,
                        rotation,
                        had,
                        "took the cluster's refresh token: it has more rotations than this replica's"
                    );
                    taken += 1;
                    refresh_token = true;
                }
            }
        }
        if let Some(json) = record.get("st") {
            match serde_json::from_str::<ReplicaState>(json) {
                Ok(mut state) => {
                    state.stamp = Stamp {
                        at: field(record, "stamp"),
                        revoked: state.state == TokenState::Revoked,
                        enabled_at: field(record, "enabled_at"),
                    };
                    if token.apply_replica(&state, node) {
                        taken += 1;
                    }
                }
                Err(e) => {
                    tracing::warn!(token = token.name(), error = %e, "a shared token state does not parse; ignored")
                }
            }
        }
        if let Some(stored) = record.get("at") {
            let expires = field(record, "at_exp");
            let held = token
                .credentials()
                .access()
                .map_or(0, |a| unix_ms(a.expires_at_wall));
            if expires >= held && expires > unix_ms(SystemTime::now()) && !token.is_out_for_good() {
                let bearer = self.sealer.open(id, "at", stored)?;
                let access = AccessToken::until(
                    &bearer,
                    UNIX_EPOCH + Duration::from_millis(expires),
                    Duration::from_millis(field(record, "at_life")),
                );
                if token.adopt_access(access) {
                    taken += 1;
                }
            }
        }
        Ok((taken, refresh_token))
    }

    /// Writes `token`'s state, if it ever changed; whether it was taken.
    async fn write_state(
        &self,
        conn: &mut MultiplexedConnection,
        token: &Token,
    ) -> redis::RedisResult<bool> {
        let state = token.replica_state();
        if state.stamp.at == 0 {
            return Ok(false);
        }
        let json = serde_json::to_string(&state).expect("a token state serialises");
        let revoked_fp = if state.stamp.revoked {
            state.refresh_fp.as_str()
        } else {
            ""
        };
        let id = token_id(token);
        let configured_fp = short_fingerprint(token.credentials().configured());
        let version = self
            .store
            .put_state(
                conn,
                &StateWrite {
                    id: &id,
                    stamp: state.stamp.at,
                    revoked_fp,
                    enabled_at: state.stamp.enabled_at,
                    json: &json,
                    configured_fp: &configured_fp,
                },
            )
            .await?;
        self.metrics.exchange(true);
        if version > 0 {
            self.metrics.sent(1);
        }
        Ok(version > 0)
    }

    /// Writes `token`'s access token (`fresh`: just obtained) and, with
    /// `rotated` (or on return from an outage), its refresh token. A
    /// refresh token refused because another replica's is as new is
    /// replaced by that one here.
    async fn write_grant(
        &self,
        conn: &mut MultiplexedConnection,
        token: &Token,
        rotated: bool,
        fresh: bool,
    ) -> redis::RedisResult<bool> {
        let id = token_id(token);
        // Read together: a rotation between two reads would pair the
        // token with another's count.
        let (rt, rotation) = token.credentials().refresh_token_and_rotation();
        let refresh = (rotated && rotation > 0).then(|| {
            (
                short_fingerprint(&rt),
                self.sealer.seal(&id, "rt", rt.expose()),
            )
        });
        let access = token
            .credentials()
            .valid_access(Instant::now())
            .and_then(|a| {
                a.bearer().map(|b| {
                    (
                        self.sealer.seal(&id, "at", b),
                        unix_ms(a.expires_at_wall),
                        a.lifetime.as_millis() as u64,
                    )
                })
            });
        if refresh.is_none() && access.is_none() {
            return Ok(false);
        }
        let (outcome, version) = self
            .store
            .grant(
                conn,
                &GrantWrite {
                    id: &id,
                    rotated: refresh
                        .as_ref()
                        .map(|(fp, sealed)| (rotation, fp.as_str(), sealed.as_str())),
                    access: access
                        .as_ref()
                        .map(|(sealed, exp, life)| (sealed.as_str(), *exp, *life)),
                    fresh,
                },
            )
            .await?;
        self.metrics.exchange(true);
        if version > 0 {
            self.metrics.sent(1);
        }
        if outcome < 0 {
            let record = self.store.record(conn, &id).await?;
            let stored_rotation = field(&record, "rt_gen");
            if stored_rotation > rotation {
                if let Some(Ok(rt)) = record.get("rt").map(|s| self.sealer.open(&id, "rt", s)) {
                    token.adopt_refresh_token(Secret::new(rt), stored_rotation, false);
                }
            } else {
                // Two refresh tokens of the same age: both were issued, and
                // a provider that retires the old one on use would have
                // refused one of the calls. Each replica keeps its own; a
                // rejection later takes the cluster's (`superseded`).
                tracing::warn!(
                    token = token.name(),
                    "another replica holds a different refresh token of the same age; keeping this one"
                );
            }
        }
        Ok(version > 0)
    }
}

/// Runs the Redis script that merges token states, for the test that holds
/// it to [`crate::pool::accepts`]: with a state stamped `stored` written
/// first (if the script takes it), whether one stamped `incoming` is
/// taken. A revocation is of the configured refresh token.
#[cfg(feature = "test-util")]
#[doc(hidden)]
pub async fn script_takes(
    url: &str,
    id: &str,
    stored: Stamp,
    incoming: Stamp,
) -> redis::RedisResult<bool> {
    let mut conn = redis::Client::open(url)?
        .get_multiplexed_async_connection()
        .await?;
    let store = Store::new("parity", "test");
    let _: () = redis::cmd("DEL")
        .arg(store.keys.token(id))
        .query_async(&mut conn)
        .await?;
    let write = |s: Stamp| StateWrite {
        id,
        stamp: s.at,
        revoked_fp: if s.revoked { "configured" } else { "" },
        enabled_at: s.enabled_at,
        json: "{}",
        configured_fp: "configured",
    };
    if stored.at > 0 {
        store.put_state(&mut conn, &write(stored)).await?;
    }
    Ok(store.put_state(&mut conn, &write(incoming)).await? > 0)
}

/// A numeric field of a record (0 when missing or not a number).
fn field(record: &Record, name: &str) -> u64 {
    record.get(name).and_then(|v| v.parse().ok()).unwrap_or(0)
}
