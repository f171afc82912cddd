//! Keeping access tokens fresh (`docs/tokens.md`): on demand when a request
//! finds none, and in the background ahead of expiry.
//!
//! Every refresh of a token is *single flight*: the first need starts one
//! spawned call and every other need waits on its result. The call runs as
//! its own task, so a client that goes away cannot cancel it half-way and
//! lose a rotated refresh token. A rotated token is written to the state
//! file before the new access token is installed.
//!
//! Outcomes are applied to the token (pool state) and counted here; the
//! HTTP details stay in [`provider`].

pub mod provider;

use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::cluster::{Cluster, Coordination};
use crate::config::{form_encode, Provider, RefreshConfig, Secret};
use crate::metrics::{Metrics, RefreshOutcome};
use crate::pool::token::short_fingerprint;
use crate::pool::token::{Flight, RefreshResult};
use crate::pool::{AccessToken, Outcome, Pool, Reason, Token, TokenState};
use crate::state::StateStore;
use provider::{Grant, RefreshError};

/// Lifetime given to a `static` bearer: it never expires on its own.
const STATIC_TTL: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// First pause of all refreshing after the endpoint answered 429 without
/// Retry-After; doubles on repeats up to [`MAX_RATE_LIMIT_BACKOFF`].
const FIRST_RATE_LIMIT_BACKOFF: Duration = Duration::from_secs(10);
const MAX_RATE_LIMIT_BACKOFF: Duration = Duration::from_secs(600);
/// Background refreshes run at most this many at once, so a cold start of
/// thousands of tokens does not hit the refresh endpoint all at once.
pub const BACKGROUND_CONCURRENCY: usize = 4;
/// Largest refresh answer read.
const MAX_ANSWER_BYTES: usize = 256 * 1024;

/// Makes refresh calls for one generation's `[refresh]` settings.
pub struct Refresher {
    provider: Provider,
    url: Option<String>,
    headers: reqwest::header::HeaderMap,
    client_id: Option<String>,
    client_secret: Option<Secret>,
    margin: Duration,
    client: reqwest::Client,
    metrics: Arc<Metrics>,
    state: Option<Arc<StateStore>>,
    /// The cluster, in cluster mode: one refresh per token across replicas.
    cluster: Option<Arc<Cluster>>,
    /// How long one call may take (and a refresh lease lasts, plus a second).
    timeout: Duration,
    /// Consecutive 429s from the endpoint, for the doubling pause.
    rate_limit_level: AtomicU32,
}

impl std::fmt::Debug for Refresher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Refresher")
            .field("provider", &self.provider)
            .finish_non_exhaustive()
    }
}

impl Refresher {
    /// A refresher for `config`.
    pub fn new(
        config: &RefreshConfig,
        metrics: Arc<Metrics>,
        state: Option<Arc<StateStore>>,
        cluster: Option<Arc<Cluster>>,
    ) -> Result<Refresher, reqwest::Error> {
        let client = reqwest::Client::builder()
            .timeout(config.timeout)
            .connect_timeout(config.timeout)
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        let mut headers = reqwest::header::HeaderMap::new();
        for (name, value) in &config.headers {
            headers.insert(name.clone(), value.clone());
        }
        Ok(Refresher {
            provider: config.provider,
            url: config.url.clone(),
            headers,
            client_id: config.client_id.clone(),
            client_secret: config.client_secret.clone(),
            margin: config.margin,
            client,
            metrics,
            state,
            cluster,
            timeout: config.timeout,
            rate_limit_level: AtomicU32::new(0),
        })
    }

    /// For the `static` provider, gives every token its bearer.
    pub fn prime(&self, pool: &Pool) {
        if self.provider != Provider::Static {
            return;
        }
        for token in pool.tokens() {
            if token.credentials().access().is_none() {
                token.set_access(AccessToken::new(
                    token.credentials().refresh_token().expose(),
                    STATIC_TTL,
                ));
            }
        }
    }

    /// A valid access token for `token`, refreshing it if needed.
    pub async fn access(
        self: &Arc<Self>,
        pool: &Arc<Pool>,
        token: &Arc<Token>,
    ) -> Result<Arc<AccessToken>, RefreshResult> {
        if let Some(access) = token.credentials().valid_access(Instant::now()) {
            return Ok(access);
        }
        if self.provider == Provider::Static {
            token.set_access(AccessToken::new(
                token.credentials().refresh_token().expose(),
                STATIC_TTL,
            ));
            return token
                .credentials()
                .valid_access(Instant::now())
                .ok_or(RefreshResult::Unavailable);
        }
        match self.refresh(pool, token).await {
            RefreshResult::Refreshed => token
                .credentials()
                .valid_access(Instant::now())
                .ok_or(RefreshResult::Unavailable),
            other => Err(other),
        }
    }

    /// Refreshes `token` now (or joins the refresh under way) and waits
    /// for the result.
    pub async fn refresh(self: &Arc<Self>, pool: &Arc<Pool>, token: &Arc<Token>) -> RefreshResult {
        let mut flight = self.start(pool, token, None);
        wait(&mut flight).await
    }

    /// Starts a refresh of `token` unless one is under way; returns the
    /// flight to wait on. `permit` is held until the call ends.
    fn start(
        self: &Arc<Self>,
        pool: &Arc<Pool>,
        token: &Arc<Token>,
        permit: Option<OwnedSemaphorePermit>,
    ) -> Flight {
        let (rx, tx) = token.credentials().join_flight();
        if let Some(tx) = tx {
            let this = Arc::clone(self);
            let pool = Arc::clone(pool);
            let token = Arc::clone(token);
            // The access token that made this refresh needed.
            let held = token.credentials().access().map(|a| a.id);
            tokio::spawn(async move {
                let result = this.run(&pool, &token, held).await;
                drop(permit);
                // Nobody waiting is fine: the result is in the token's state.
                let _ = tx.send(Some(result));
            });
        }
        rx
    }

    /// A refresh of `token` (`held`: the access token it had when the
    /// refresh was found needed): in a cluster, first what other replicas
    /// did (a fresh access token, or a refresh under way elsewhere), then
    /// the call under the token's lease. What the call brought is shared
    /// after the result is given to this replica's waiters.
    async fn run(&self, pool: &Arc<Pool>, token: &Arc<Token>, held: Option<u64>) -> RefreshResult {
        if pool.refresh_blocked_until(Instant::now()).is_some() {
            return RefreshResult::Unavailable;
        }
        let Some(cluster) = &self.cluster else {
            return self.call_and_apply(pool, token).await.0;
        };
        // Another replica's call lasts at most the timeout; a dead one's
        // lease goes within LEASE_TTL.
        let patience = self.timeout + crate::cluster::LEASE_TTL + Duration::from_secs(1);
        let rotation = token.credentials().rotation();
        let coordination = cluster.coordinate(token, held, patience).await;
        // The rotation of the refresh token a leader presents.
        let presented = token.credentials().rotation();
        if token.credentials().rotation() != rotation {
            // A refresh token taken from the cluster is in the state file
            // before anything presents it.
            cluster.persist(pool).await;
        }
        match coordination {
            Coordination::Fresh => RefreshResult::Refreshed,
            Coordination::Refused(_) => {
                // The refresh token cannot be shown current: it is not
                // presented. The access token serves while it lasts; then
                // the token waits for the cluster.
                if token.credentials().has_valid_access(Instant::now()) {
                    RefreshResult::Unavailable
                } else {
                    token.report(Outcome::ClusterUnavailable, pool.settings());
                    RefreshResult::Failed(Reason::ClusterUnavailable)
                }
            }
            Coordination::Out => match token.snapshot().state {
                TokenState::Revoked => RefreshResult::Failed(Reason::Revoked),
                _ => RefreshResult::Unavailable,
            },
            Coordination::Busy => RefreshResult::Unavailable,
            Coordination::Alone => {
                let (result, rotated, _) = self.call_and_apply(pool, token).await;
                if result == RefreshResult::Refreshed {
                    // Redis was slow rather than away: share it anyway.
                    let (cluster, token) = (Arc::clone(cluster), Arc::clone(token));
                    tokio::spawn(async move { cluster.finish(&token, rotated).await });
                }
                result
            }
            Coordination::Leader(lease) => {
                let (result, rotated, settled) = cluster
                    .holding(&lease, self.call_and_apply(pool, token))
                    .await;
                let (cluster, token) = (Arc::clone(cluster), Arc::clone(token));
                let refreshed = result == RefreshResult::Refreshed;
                tokio::spawn(async move {
                    // The token's pending mark goes only when the cluster
                    // knows the result: written, or nothing rotated.
                    let known = if refreshed {
                        cluster.finish(&token, rotated).await
                    } else {
                        settled
                    };
                    cluster.release(lease, known, presented).await;
                });
                result
            }
        }
    }

    /// One refresh call and everything that follows from its answer;
    /// whether it rotated the refresh token, and whether its outcome is
    /// settled (see [`Refresher::call`]).
    async fn call_and_apply(
        &self,
        pool: &Arc<Pool>,
        token: &Arc<Token>,
    ) -> (RefreshResult, bool, bool) {
        let (used, used_rotation) = token.credentials().refresh_token_and_rotation();
        let started = Instant::now();
        let (result, settled) = self.call(&used).await;
        let outcome = match &result {
            Ok(_) => RefreshOutcome::Success,
            Err(RefreshError::Revoked { .. }) => RefreshOutcome::Revoked,
            Err(RefreshError::Rejected { .. }) => RefreshOutcome::Failed,
            Err(RefreshError::RateLimited { .. }) => RefreshOutcome::RateLimited,
            Err(RefreshError::Unavailable { .. }) => RefreshOutcome::Unavailable,
        };
        self.metrics
            .refresh_done(token.tier(), outcome, started.elapsed());
        let mut rotated = false;
        let result = match result {
            Ok(grant) => {
                self.rate_limit_level.store(0, Ordering::Relaxed);
                rotated = self.install(pool, token, grant, used_rotation).await;
                tracing::debug!(token = token.name(), "access token refreshed");
                RefreshResult::Refreshed
            }
            Err(RefreshError::Revoked { .. })
                if token.credentials().refresh_token() != used
                    || self.superseded(token, &short_fingerprint(&used)).await =>
            {
                // The refresh token sent was replaced while the call ran
                // (another replica's rotation): no revocation.
                if let Some(cluster) = &self.cluster {
                    cluster.persist(pool).await;
                }
                tracing::info!(
                    token = token.name(),
                    "the refresh endpoint rejected a refresh token that has been replaced since; not revoked"
                );
                RefreshResult::Unavailable
            }
            Err(RefreshError::Revoked { code }) => {
                tracing::warn!(
                    token = token.name(),
                    code,
                    "refresh token rejected; token revoked"
                );
                token.report(Outcome::Revoked, pool.settings());
                self.metrics
                    .token_failure(token.tier(), token.name(), Reason::Revoked);
                RefreshResult::Failed(Reason::Revoked)
            }
            Err(e @ RefreshError::Rejected { .. }) => {
                tracing::warn!(token = token.name(), error = %e, "refresh failed");
                token.report(Outcome::Failure(Reason::RefreshFailed), pool.settings());
                self.metrics
                    .token_failure(token.tier(), token.name(), Reason::RefreshFailed);
                RefreshResult::Failed(Reason::RefreshFailed)
            }
            Err(RefreshError::RateLimited { retry_after }) => {
                if pool.refresh_blocked_until(Instant::now()).is_some() {
                    // Another call already met the 429 and paused refreshing:
                    // answers to calls that were in flight together are one event.
                    return (RefreshResult::Unavailable, false, settled);
                }
                let level = self.rate_limit_level.fetch_add(1, Ordering::Relaxed);
                let pause = retry_after.unwrap_or_else(|| {
                    FIRST_RATE_LIMIT_BACKOFF
                        .checked_mul(1 << level.min(16))
                        .unwrap_or(MAX_RATE_LIMIT_BACKOFF)
                });
                let pause = pause.min(MAX_RATE_LIMIT_BACKOFF);
                pool.block_refresh_until(Instant::now() + pause);
                tracing::warn!(pause = ?pause, "refresh endpoint answered 429; pausing all refreshes");
                RefreshResult::Unavailable
            }
            Err(e @ RefreshError::Unavailable { .. }) => {
                if token.credentials().has_valid_access(Instant::now()) {
                    tracing::info!(token = token.name(), error = %e, "refresh failed; current access token still valid");
                } else {
                    tracing::warn!(token = token.name(), error = %e, "refresh failed and no valid access token; token rests briefly");
                    token.report(Outcome::RefreshUnavailable, pool.settings());
                }
                RefreshResult::Unavailable
            }
        };
        (result, rotated, settled)
    }

    /// In a cluster, whether the refresh token the endpoint rejected
    /// (`used`, a fingerprint) was already replaced by another replica's:
    /// then the token is not revoked, and the newer one is in use.
    async fn superseded(&self, token: &Token, used: &str) -> bool {
        match &self.cluster {
            Some(cluster) => cluster.superseded(token, used).await,
            None => false,
        }
    }

    /// Installs a grant: a rotated refresh token first, persisted before
    /// the new access token is used. Returns whether it rotated.
    async fn install(&self, pool: &Arc<Pool>, token: &Arc<Token>, grant: Grant, from: u64) -> bool {
        let mut rotated_now = false;
        if let Some(rotated) = grant.rotated {
            if rotated != token.credentials().refresh_token()
                && token.credentials().rotate_from(from, rotated)
            {
                rotated_now = true;
                tracing::info!(token = token.name(), "refresh token rotated");
                if let Some(store) = &self.state {
                    let store = Arc::clone(store);
                    let pool = Arc::clone(pool);
                    match tokio::task::spawn_blocking(move || store.save(&pool)).await {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => {
                            tracing::error!(error = %e, "rotated refresh token NOT persisted; it will be lost on restart")
                        }
                        Err(e) => tracing::error!(error = %e, "state writer failed"),
                    }
                }
            }
        }
        token.set_access(AccessToken::new(grant.bearer.expose(), grant.ttl));
        // A fresh bearer: the quota poller may look (`[quota]`).
        token.want_quota_poll();
        rotated_now
    }

    /// The HTTP call, and whether its outcome is *settled*: the refresh
    /// token was never sent (a connect error), or the endpoint's answer was
    /// read and it was not a success it could not parse. Unsettled (a
    /// timeout or a broken answer after sending, a 2xx that does not
    /// parse), the endpoint may have rotated the refresh token.
    async fn call(&self, refresh_token: &Secret) -> (Result<Grant, RefreshError>, bool) {
        let Some(url) = &self.url else {
            let detail = "no refresh url configured".to_string();
            return (Err(RefreshError::Unavailable { detail }), true);
        };
        let mut settled = true;
        let result = self.exchange(url, refresh_token, &mut settled).await;
        (result, settled)
    }

    async fn exchange(
        &self,
        url: &str,
        refresh_token: &Secret,
        settled: &mut bool,
    ) -> Result<Grant, RefreshError> {
        let unavailable = |detail: String| RefreshError::Unavailable { detail };
        let mut body = String::with_capacity(64 + refresh_token.expose().len());
        body.push_str("grant_type=refresh_token&refresh_token=");
        form_encode(refresh_token.expose(), &mut body);
        if let Some(id) = &self.client_id {
            body.push_str("&client_id=");
            form_encode(id, &mut body);
        }
        if let Some(secret) = &self.client_secret {
            body.push_str("&client_secret=");
            form_encode(secret.expose(), &mut body);
        }
        let response = self
            .client
            .post(url)
            .headers(self.headers.clone())
            .header("content-type", "application/x-www-form-urlencoded")
            .header("accept", "application/json")
            .body(body)
            .send()
            .await
            .map_err(|e| {
                // Sent but not answered: the endpoint may have acted on it.
                *settled = e.is_connect();
                unavailable(describe_reqwest_error(&e))
            })?;
        let status = response.status().as_u16();
        let retry_after = response
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(provider::parse_retry_after);
        let body = read_limited(response).await.map_err(|e| {
            *settled = false;
            unavailable(describe_reqwest_error(&e))
        })?;
        if (200..300).contains(&status) {
            let grant = provider::parse_grant(&body, SystemTime::now());
            // A success it cannot read may still have rotated the token.
            *settled = grant.is_ok();
            grant
        } else {
            Err(provider::classify_failure(status, &body, retry_after))
        }
    }

    /// Whether the background loop should refresh `token` now.
    ///
    /// The lead is `margin` plus a per-token jitter, but never more than
    /// half the access token's life: a margin longer than the token lives
    /// (`margin = "2h"` for a one-hour JWT) would otherwise have the token
    /// refreshed again on every pass, once a second.
    fn due(&self, token: &Token, now: Instant) -> bool {
        match token.credentials().access() {
            None => true,
            Some(access) => {
                let margin = self.margin.min(access.lifetime / 2);
                let node = self.cluster.as_ref().map_or("", |c| c.node());
                let lead = margin + jitter(node, token.name(), margin / 5);
                access.expires_at <= now + lead
            }
        }
    }

    /// One pass of the background loop: starts a refresh for every token
    /// in rotation whose access token is missing or close to expiry.
    pub fn scan(self: &Arc<Self>, pool: &Arc<Pool>, limit: &Arc<Semaphore>) {
        if self.provider == Provider::Static {
            return;
        }
        let now = Instant::now();
        if pool.refresh_blocked_until(now).is_some() {
            return;
        }
        for token in pool.tokens() {
            if !token.background_refreshable(now)
                || token.credentials().refresh_in_flight()
                || !self.due(token, now)
            {
                continue;
            }
            let Ok(permit) = Arc::clone(limit).try_acquire_owned() else {
                return;
            };
            drop(self.start(pool, token, Some(permit)));
        }
    }
}

/// Waits for a flight's result.
async fn wait(flight: &mut Flight) -> RefreshResult {
    loop {
        if let Some(result) = flight.borrow_and_update().clone() {
            return result;
        }
        if flight.changed().await.is_err() {
            // The refresh task ended without a word (it panicked).
            return flight
                .borrow()
                .clone()
                .unwrap_or(RefreshResult::Unavailable);
        }
    }
}

/// A stable spread in `[0, max)` per token and replica (`node`), so tokens
/// loaded together do not all refresh in the same second, and replicas
/// that share a token are never due at the same moment by construction.
fn jitter(node: &str, name: &str, max: Duration) -> Duration {
    if max.is_zero() {
        return Duration::ZERO;
    }
    let mut h = std::collections::hash_map::DefaultHasher::new();
    node.hash(&mut h);
    name.hash(&mut h);
    Duration::from_millis(h.finish() % max.as_millis().max(1) as u64)
}

/// A reqwest error described without its URL (which may carry an API key).
fn describe_reqwest_error(e: &reqwest::Error) -> String {
    let kind = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "cannot connect"
    } else if e.is_body() || e.is_decode() {
        "broken answer"
    } else {
        "request failed"
    };
    kind.to_string()
}

async fn read_limited(mut response: reqwest::Response) -> Result<Vec<u8>, reqwest::Error> {
    let mut out = Vec::new();
    while let Some(chunk) = response.chunk().await? {
        let room = MAX_ANSWER_BYTES.saturating_sub(out.len());
        out.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if room <= chunk.len() {
            break;
        }
    }
    Ok(out)
}

/// Starts the background refresh loop: once a second it looks at the
/// current generation (through `current`) and refreshes what is due. In a
/// cluster, it starts once the first connection to Redis was tried (at
/// most 5 s), so that it sees what other replicas refreshed.
pub fn spawn_refresh_loop<F>(
    current: F,
    cluster: Option<Arc<Cluster>>,
) -> tokio::task::JoinHandle<()>
where
    F: Fn() -> (Arc<Refresher>, Arc<Pool>) + Send + 'static,
{
    tokio::spawn(async move {
        if let Some(cluster) = cluster {
            cluster.settled(Duration::from_secs(5)).await;
        }
        let limit = Arc::new(Semaphore::new(BACKGROUND_CONCURRENCY));
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let (refresher, pool) = current();
            refresher.scan(&pool, &limit);
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn form_encoding() {
        let mut s = String::new();
        form_encode("a b+c/d=é", &mut s);
        assert_eq!(s, "a+b%2Bc%2Fd%3D%C3%A9");
    }

    #[tokio::test(start_paused = true)]
    async fn a_margin_longer_than_the_token_lives_is_cut_to_half_its_life() {
        let config = crate::config::Config::parse(
            "[refresh]\nurl = \"http://127.0.0.1:1/token\"\nmargin = \"2h\"\n\
             [[tokens]]\nname = \"a\"\ntier = \"personal\"\ntoken = \"rt-a\"\n",
            None,
            &|_| None,
        )
        .unwrap();
        let refresher = Refresher::new(
            &config.refresh,
            Arc::new(crate::metrics::Metrics::new()),
            None,
            None,
        )
        .unwrap();
        let pool = Pool::new(&config.pool, &config.tokens, true, None);
        let token = pool.get("a").unwrap();
        assert!(refresher.due(token, Instant::now()), "no access token yet");
        token.set_access(AccessToken::new("bearer", Duration::from_secs(3600)));
        // Fresh: not due, though 2 h is more than the hour it lives.
        assert!(!refresher.due(token, Instant::now()));
        // Due once less than half its life (plus jitter) is left.
        tokio::time::advance(Duration::from_secs(1800 - 360)).await;
        assert!(!refresher.due(token, Instant::now()));
        tokio::time::advance(Duration::from_secs(360)).await;
        assert!(refresher.due(token, Instant::now()));
    }

    #[test]
    fn jitter_is_stable_and_bounded() {
        let max = Duration::from_secs(60);
        assert_eq!(jitter("a", "alice", max), jitter("a", "alice", max));
        assert!(jitter("a", "alice", max) < max);
        assert_eq!(jitter("a", "x", Duration::ZERO), Duration::ZERO);
        // Two replicas are due apart for the same token.
        let spread: std::collections::HashSet<Duration> = ["r-1", "r-2", "r-3", "r-4"]
            .iter()
            .map(|node| jitter(node, "alice", max))
            .collect();
        assert_eq!(spread.len(), 4);
    }
}
