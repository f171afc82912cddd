//! One token: its identity, its access token, and the state machine of
//! `docs/tokens.md` (`active`, `cooling_down`, `disabled`, `revoked`).
//!
//! The hot path reads a single atomic, the *gate*: the clock reading (in
//! milliseconds) from which the token may be picked. Every transition runs
//! under a short `std::sync::Mutex` that is never held across an `.await`,
//! and ends by storing the new gate.

use std::fmt;
use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use http::HeaderValue;
use serde::{Deserialize, Serialize};
use tokio::sync::{watch, Notify};
use tokio::time::Instant;

use super::{Clock, PoolSettings};
use crate::config::{Secret, Tier, TokenConfig};

mod quota;
mod shared;

/// What the token tests beside the code share: a token, and settings.
#[cfg(test)]
mod testing {
    use std::sync::Arc;
    use std::time::Duration;

    use super::Token;
    use crate::config::{Secret, Tier, TokenConfig, TokenOrigin};
    use crate::pool::{Clock, PoolSettings};

    /// A fresh personal token named `name`, refresh token `rt-<name>`.
    pub(super) fn token(name: &str) -> Token {
        let config = TokenConfig {
            name: name.into(),
            tier: Tier::Personal,
            secret: Secret::new(format!("rt-{name}")),
            origin: TokenOrigin::File,
        };
        Token::new(&config, Clock::new(), Arc::default())
    }

    /// Round numbers: 3 failures, 60 s cooldown, 10 min quota cooldown.
    pub(super) fn settings() -> PoolSettings {
        PoolSettings {
            failure_threshold: 3,
            cooldown: Duration::from_secs(60),
            quota_cooldown: Duration::from_secs(600),
            max_cooldown: Duration::from_secs(3600),
            recovery_backoff: Duration::from_secs(60),
            max_recovery_backoff: Duration::from_secs(600),
            strategy: Default::default(),
        }
    }
}

pub use quota::{Quota, COUNT_TRUST, MAX_QUOTA_REST};
pub use shared::{accepts, short_fingerprint, unix_ms, SharedState, Stamp};

/// Longest rest restored from a state file (a month: quotas refill
/// monthly), whatever the file says.
const MAX_RESTORED_REST: Duration = Duration::from_secs(31 * 24 * 3600);

/// Gate value of a token that nothing but an operator (or a config change)
/// brings back.
const CLOSED: u64 = u64::MAX;

/// A token's state, as shown in the admin API and the `state` metric label.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenState {
    /// In rotation.
    Active,
    /// Resting until its cooldown ends.
    CoolingDown,
    /// Out after repeated failures (back after a trial) or by hand.
    Disabled,
    /// Its refresh token was rejected; back only by enable or a new secret.
    Revoked,
}

impl TokenState {
    /// Every state, in display order.
    pub const ALL: [TokenState; 4] = [
        TokenState::Active,
        TokenState::CoolingDown,
        TokenState::Disabled,
        TokenState::Revoked,
    ];

    /// Its place in [`TokenState::ALL`], for tables indexed by state.
    pub fn index(self) -> usize {
        match self {
            TokenState::Active => 0,
            TokenState::CoolingDown => 1,
            TokenState::Disabled => 2,
            TokenState::Revoked => 3,
        }
    }

    /// The name used in metrics and the admin API.
    pub fn as_str(self) -> &'static str {
        match self {
            TokenState::Active => "active",
            TokenState::CoolingDown => "cooling_down",
            TokenState::Disabled => "disabled",
            TokenState::Revoked => "revoked",
        }
    }
}

/// Why a token left `active`, or why a request left a token.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// The upstream answered 401 twice.
    Unauthorized,
    /// The upstream answered 403 (not an HTML block page).
    Forbidden,
    /// A 429 that is not about quota.
    RateLimited,
    /// A 429 matching `quota_pattern`.
    QuotaExhausted,
    /// The refresh endpoint failed (rejected the call, or was unreachable
    /// while the token held no valid access token).
    RefreshFailed,
    /// The refresh endpoint rejected the refresh token itself.
    Revoked,
    /// An operator disabled it.
    Manual,
    /// It needs a refresh, and in cluster mode this replica cannot show
    /// that its refresh token is current (Redis away, fenced, or a
    /// configuration error): presenting it could cost the account.
    ClusterUnavailable,
}

impl Reason {
    /// Reasons that appear as the `reason` label of failure metrics.
    pub const METRIC: [Reason; 7] = [
        Reason::Unauthorized,
        Reason::Forbidden,
        Reason::RateLimited,
        Reason::QuotaExhausted,
        Reason::RefreshFailed,
        Reason::Revoked,
        Reason::ClusterUnavailable,
    ];

    /// The name used in metrics and the admin API.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Unauthorized => "unauthorized",
            Reason::Forbidden => "forbidden",
            Reason::RateLimited => "rate_limited",
            Reason::QuotaExhausted => "quota_exhausted",
            Reason::RefreshFailed => "refresh_failed",
            Reason::Revoked => "revoked",
            Reason::Manual => "manual",
            Reason::ClusterUnavailable => "cluster_unavailable",
        }
    }
}

/// What happened when a token was used; the proxy and the refresher
/// translate HTTP answers into these, so the pool never sees HTTP.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The token worked.
    Success,
    /// Something failed that is not the token's fault (5xx, transport).
    Neutral,
    /// A failure that is the token's fault and counts toward `failure_threshold`.
    Failure(Reason),
    /// A 429 that is not about quota, with the upstream's Retry-After.
    RateLimited(Option<Duration>),
    /// A quota-exhausted 429.
    QuotaExhausted,
    /// The refresh token was rejected.
    Revoked,
    /// The refresh endpoint was unavailable while the token had no valid
    /// access token: rest briefly, without blame.
    RefreshUnavailable,
    /// A refresh was needed and the cluster could not vouch for the
    /// refresh token: rest briefly, without blame, and look again.
    ClusterUnavailable,
}

/// A short-lived bearer obtained by refreshing a token.
///
/// It is kept as the ready `Authorization` value — the one HTTP type the
/// pool holds — because checking a JWT of a kilobyte as a header value
/// costs thousands of instructions, and should be paid once per refresh,
/// not once per request.
pub struct AccessToken {
    /// `Bearer <token>`, marked sensitive; `None` if the token has bytes a
    /// header cannot carry.
    authorization: Option<HeaderValue>,
    /// When it stops being valid, on the pool's clock.
    pub expires_at: Instant,
    /// When it stops being valid, as wall-clock time (for metrics and the admin API).
    pub expires_at_wall: SystemTime,
    /// How long it was valid for when it was made.
    pub lifetime: Duration,
    /// Tells it from another access token without holding it (the first
    /// 8 bytes of its SHA-256): two minted in the same second may expire
    /// at the same time.
    pub id: u64,
}

impl AccessToken {
    /// Longest life an access token is given, whatever it claims (a
    /// static bearer gets ten years): past it, time arithmetic would
    /// overflow.
    pub const MAX_LIFETIME: Duration = Duration::from_secs(11 * 365 * 24 * 3600);

    /// Wraps a bearer valid until `expires_at` (wall-clock time), made to
    /// live `lifetime`: one another replica obtained.
    pub fn until(bearer: &str, expires_at: SystemTime, lifetime: Duration) -> AccessToken {
        let left = expires_at
            .duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO);
        let mut access = AccessToken::new(bearer, left);
        if left < Self::MAX_LIFETIME {
            access.expires_at_wall = expires_at;
        }
        access.lifetime = lifetime.min(Self::MAX_LIFETIME);
        access
    }

    /// Wraps a bearer valid for `ttl` from now (at most [`Self::MAX_LIFETIME`]).
    pub fn new(bearer: &str, ttl: Duration) -> AccessToken {
        let ttl = ttl.min(Self::MAX_LIFETIME);
        let mut value = Vec::with_capacity(7 + bearer.len());
        value.extend_from_slice(b"Bearer ");
        value.extend_from_slice(bearer.as_bytes());
        let authorization = HeaderValue::from_maybe_shared(Bytes::from(value))
            .ok()
            .map(|mut v| {
                v.set_sensitive(true);
                v
            });
        let digest = ring::digest::digest(&ring::digest::SHA256, bearer.as_bytes());
        let id = u64::from_be_bytes(digest.as_ref()[..8].try_into().expect("8 bytes"));
        AccessToken {
            authorization,
            id,
            expires_at: Instant::now() + ttl,
            expires_at_wall: SystemTime::now() + ttl,
            lifetime: ttl,
        }
    }

    /// The `Authorization` value (`Bearer <token>`), if the token can be
    /// one. A secret: never log it.
    pub fn authorization(&self) -> Option<&HeaderValue> {
        self.authorization.as_ref()
    }

    /// The bearer itself (the `Authorization` value without `Bearer `),
    /// to share with other replicas. A secret: never log it.
    pub fn bearer(&self) -> Option<&str> {
        self.authorization
            .as_ref()
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
    }

    /// Whether it is still valid at `now`.
    pub fn valid_at(&self, now: Instant) -> bool {
        self.expires_at > now
    }
}

impl fmt::Debug for AccessToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AccessToken")
            .field("authorization", &"***")
            .field("expires_at", &self.expires_at)
            .finish()
    }
}

/// How a refresh ended, shared with every request waiting on it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RefreshResult {
    /// A fresh access token is installed.
    Refreshed,
    /// It failed; the token's state already says how.
    Failed(Reason),
    /// The endpoint is unavailable or backing off; not the token's fault.
    Unavailable,
}

/// The receiving side of an in-flight refresh: `None` until it ends.
pub type Flight = watch::Receiver<Option<RefreshResult>>;

/// The parts of a token's state that change together, under one lock.
#[derive(Debug, Clone)]
struct Inner {
    state: TokenState,
    reason: Option<Reason>,
    /// A half-open trial of a disabled token is under way.
    trial: bool,
    consecutive_failures: u32,
    cooldown_until: Option<Instant>,
    /// Consecutive quota cooldowns: the next one lasts `quota_cooldown * 2^level`.
    quota_level: u32,
    /// Failed recovery trials: the next wait is `recovery_backoff * 2^level`.
    backoff_level: u32,
    /// Consecutive refresh-unavailable rests: 1 s doubling, capped at 10 s.
    refresh_level: u32,
    /// The refresh token in use: the configured one, or a rotated one.
    refresh_token: Secret,
    /// Set when `refresh_token` came from a rotation.
    rotated: bool,
    /// Rotations since the configured refresh token (0: it is in use). Of
    /// two refresh tokens of one token, the one with more rotations is
    /// the newer: replicas keep it, whoever rotated.
    rotation: u64,
    last_error: Option<String>,
    /// Wall-clock time (Unix ms) of the last change replicas share; 0
    /// before the first.
    stamp: u64,
    /// Stamp of the last operator's enable (0: none): a revocation stamped
    /// before it is void on every replica.
    enabled_at: u64,
    /// What is known of its quota besides the remaining count.
    quota: Option<quota::QuotaInfo>,
    /// It rests because its count reached zero (not because the upstream
    /// refused a request): a report of quota left ends the rest.
    counted_out: bool,
}

/// One configured token and everything the proxy knows about it.
pub struct Token {
    name: Arc<str>,
    /// A stable hash of the name, for session affinity.
    name_hash: u64,
    tier: Tier,
    /// The secret as configured; identifies the token across reloads.
    configured: Secret,
    clock: Clock,
    /// Clock reading (ms) from which the token may be picked; `CLOSED` for never.
    gate: AtomicU64,
    /// Requests left in its quota (`quota::UNKNOWN`: not known, or no
    /// limit). Beside the gate: `most_remaining` reads both.
    remaining: AtomicU64,
    /// Clock reading (ms) from which `remaining` reads as unknown: the
    /// refill, or a while after a report without one.
    remaining_until: AtomicU64,
    /// The quota poller should look at it soon.
    quota_poll: AtomicBool,
    /// Clock reading (ms) until which a rest its own count decided awaits
    /// the poll that confirms it (0: none): till then a client is told to
    /// retry soon, not at the refill.
    confirming: AtomicU64,
    /// Requests this token was picked for.
    requests: AtomicU64,
    /// Clock reading (ms) of the last pick (0 = never); turned into wall
    /// time only when a snapshot is taken, so a pick reads no wall clock.
    last_used_ms: AtomicU64,
    /// Set when a transition happened that the state file should record.
    dirty: std::sync::atomic::AtomicBool,
    /// Set when a change happened that other replicas should learn.
    shared_dirty: AtomicBool,
    /// Woken on such a change (the pool's, shared by every token).
    changes: Arc<Notify>,
    access: ArcSwapOption<AccessToken>,
    /// The id of the last access token dropped (after a 401): the same one
    /// from another replica is not taken back.
    dropped_access: AtomicU64,
    flight: Mutex<Option<Flight>>,
    inner: Mutex<Inner>,
    /// Whether a success would change nothing in `inner` (see
    /// [`Inner::success_is_noop`]); kept by [`InnerGuard`] on every release
    /// of the lock, so that the usual report — a success on a healthy
    /// token — takes no lock.
    clean: AtomicBool,
}

/// The lock on a token's [`Inner`]. Releasing it records whether a success
/// would be a no-op.
struct InnerGuard<'a> {
    inner: MutexGuard<'a, Inner>,
    clean: &'a AtomicBool,
}

impl Deref for InnerGuard<'_> {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.inner
    }
}

impl DerefMut for InnerGuard<'_> {
    fn deref_mut(&mut self) -> &mut Inner {
        &mut self.inner
    }
}

impl Drop for InnerGuard<'_> {
    fn drop(&mut self) {
        self.clean
            .store(self.inner.success_is_noop(), Ordering::Release);
    }
}

impl Inner {
    /// Whether `report(Success)` would change nothing: an active token with
    /// no failure, quota level, error or trial to clear.
    fn success_is_noop(&self) -> bool {
        self.state == TokenState::Active
            && !self.trial
            && self.consecutive_failures == 0
            && self.quota_level == 0
            && self.last_error.is_none()
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Token")
            .field("name", &self.name)
            .field("tier", &self.tier)
            .finish_non_exhaustive()
    }
}

/// A read-only copy of a token's state, for the admin API, metrics and
/// the state file.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// Its name.
    pub name: Arc<str>,
    /// Its tier.
    pub tier: Tier,
    /// Its effective state now (an ended cooldown reads `active`).
    pub state: TokenState,
    /// Why it is not active.
    pub reason: Option<Reason>,
    /// Consecutive token-fault failures.
    pub consecutive_failures: u32,
    /// When its cooldown, or its next recovery trial, is due.
    pub cooldown_until: Option<SystemTime>,
    /// When its access token expires.
    pub access_token_expires_at: Option<SystemTime>,
    /// Requests it was picked for.
    pub requests: u64,
    /// When it was last picked.
    pub last_used_at: Option<SystemTime>,
    /// The last error seen, without secrets.
    pub last_error: Option<String>,
    /// Failed recovery trials so far.
    pub backoff_level: u32,
    /// Consecutive quota cooldowns so far.
    pub quota_level: u32,
    /// Whether it was disabled by hand.
    pub manual: bool,
    /// What is known of its quota.
    pub quota: Option<Quota>,
}

/// The persisted part of a token's state (the state file), restored at start.
#[derive(Debug, Clone, Default)]
pub struct Restored {
    /// A rotated refresh token that replaces the configured one.
    pub refresh_token: Option<Secret>,
    /// Its rotation count (at least 1 when `refresh_token` is set).
    pub rotation: u64,
    /// The state it was in.
    pub state: Option<TokenState>,
    /// Why.
    pub reason: Option<Reason>,
    /// When its cooldown or recovery wait ends.
    pub until: Option<SystemTime>,
    /// Its recovery backoff level.
    pub backoff_level: u32,
    /// Its quota cooldown level.
    pub quota_level: u32,
}

impl Token {
    /// A fresh, active token; `changes` is woken whenever it changes in a
    /// way other replicas should learn.
    pub fn new(config: &TokenConfig, clock: Clock, changes: Arc<Notify>) -> Token {
        Token {
            name: Arc::from(config.name.as_str()),
            name_hash: super::session_key(config.name.as_bytes()),
            tier: config.tier,
            configured: config.secret.clone(),
            clock,
            gate: AtomicU64::new(0),
            remaining: AtomicU64::new(quota::UNKNOWN),
            remaining_until: AtomicU64::new(0),
            confirming: AtomicU64::new(0),
            quota_poll: AtomicBool::new(false),
            requests: AtomicU64::new(0),
            last_used_ms: AtomicU64::new(0),
            dirty: std::sync::atomic::AtomicBool::new(false),
            shared_dirty: AtomicBool::new(false),
            changes,
            access: ArcSwapOption::empty(),
            dropped_access: AtomicU64::new(0),
            flight: Mutex::new(None),
            clean: AtomicBool::new(true),
            inner: Mutex::new(Inner {
                state: TokenState::Active,
                reason: None,
                trial: false,
                consecutive_failures: 0,
                cooldown_until: None,
                quota_level: 0,
                backoff_level: 0,
                refresh_level: 0,
                refresh_token: config.secret.clone(),
                rotated: false,
                rotation: 0,
                last_error: None,
                stamp: 0,
                enabled_at: 0,
                quota: None,
                counted_out: false,
            }),
        }
    }

    /// Its configured name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its name, shared (a reference count, not a copy).
    pub fn name_arc(&self) -> Arc<str> {
        Arc::clone(&self.name)
    }

    /// Its tier.
    pub fn tier(&self) -> Tier {
        self.tier
    }

    /// The secret as configured (not a rotated one).
    pub fn configured_secret(&self) -> &Secret {
        &self.configured
    }

    /// Whether this token is the one configured as `config` (same name,
    /// tier and secret): such a token keeps its state across a reload.
    pub fn same_as(&self, config: &TokenConfig) -> bool {
        *self.name == *config.name && self.tier == config.tier && self.configured == config.secret
    }

    fn lock(&self) -> InnerGuard<'_> {
        // A panic while holding the lock leaves plain data behind; keep serving.
        InnerGuard {
            inner: self.inner.lock().unwrap_or_else(|e| e.into_inner()),
            clean: &self.clean,
        }
    }

    /// The refresh token to send: the rotated one if there is one.
    pub fn refresh_token(&self) -> Secret {
        self.lock().refresh_token.clone()
    }

    /// Installs a rotated refresh token.
    pub fn rotate(&self, new: Secret) {
        let mut inner = self.lock();
        inner.refresh_token = new;
        inner.rotated = true;
        inner.rotation += 1;
        self.dirty.store(true, Ordering::Release);
    }

    /// Rotations since the configured refresh token (0: it is in use).
    pub fn rotation(&self) -> u64 {
        self.lock().rotation
    }

    /// The refresh token to send and its rotation count, read together.
    pub fn refresh_token_and_rotation(&self) -> (Secret, u64) {
        let inner = self.lock();
        (inner.refresh_token.clone(), inner.rotation)
    }

    /// Installs what a refresh of the refresh token at rotation `from`
    /// returned. If a newer one (another replica's) was taken while the
    /// call ran, that one stays. Returns whether `new` was installed.
    pub fn rotate_from(&self, from: u64, new: Secret) -> bool {
        let mut inner = self.lock();
        if inner.rotation > from {
            return false;
        }
        inner.refresh_token = new;
        inner.rotated = true;
        inner.rotation = from.saturating_add(1);
        self.dirty.store(true, Ordering::Release);
        true
    }

    /// The rotated refresh token, if the current one came from a rotation.
    pub fn rotated_refresh_token(&self) -> Option<Secret> {
        let inner = self.lock();
        inner.rotated.then(|| inner.refresh_token.clone())
    }

    /// The current access token, valid or not.
    pub fn access(&self) -> Option<Arc<AccessToken>> {
        self.access.load_full()
    }

    /// The access token if it is still valid at `now`.
    pub fn valid_access(&self, now: Instant) -> Option<Arc<AccessToken>> {
        let guard = self.access.load();
        match &*guard {
            Some(a) if a.valid_at(now) => Some(Arc::clone(a)),
            _ => None,
        }
    }

    /// Whether a valid access token is held at `now`, without cloning it.
    pub fn has_valid_access(&self, now: Instant) -> bool {
        self.access.load().as_ref().is_some_and(|a| a.valid_at(now))
    }

    /// Installs a new access token (and ends any refresh-unavailable rest).
    pub fn set_access(&self, access: AccessToken) {
        self.access.store(Some(Arc::new(access)));
        let mut inner = self.lock();
        inner.refresh_level = 0;
        if inner.state == TokenState::CoolingDown && inner.reason == Some(Reason::RefreshFailed) {
            self.activate(&mut inner);
            drop(inner);
            self.log_change(
                (TokenState::CoolingDown, Some(Reason::RefreshFailed)),
                (TokenState::Active, None),
                None,
            );
        }
    }

    /// Forgets the access token (after a 401, or when the secret changed).
    pub fn drop_access(&self) {
        if let Some(old) = self.access.swap(None) {
            self.dropped_access.store(old.id, Ordering::Relaxed);
        }
    }

    /// The refresh in flight for this token, or a new one to start.
    ///
    /// Returns `(receiver, Some(sender))` when the caller must run the
    /// refresh and report through the sender; `(receiver, None)` when one is
    /// already under way.
    pub fn join_flight(&self) -> (Flight, Option<watch::Sender<Option<RefreshResult>>>) {
        let mut slot = self.flight.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(rx) = slot.as_ref() {
            if rx.borrow().is_none() && rx.has_changed().is_ok() {
                return (rx.clone(), None);
            }
        }
        let (tx, rx) = watch::channel(None);
        *slot = Some(rx.clone());
        (rx, Some(tx))
    }

    /// Whether a refresh is under way for this token.
    pub fn refresh_in_flight(&self) -> bool {
        let slot = self.flight.lock().unwrap_or_else(|e| e.into_inner());
        slot.as_ref()
            .is_some_and(|rx| rx.borrow().is_none() && rx.has_changed().is_ok())
    }

    /// Counts a pick (hot path: one relaxed add, and a store at most once
    /// per millisecond).
    fn note_pick(&self, now_ms: u64) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        if self.last_used_ms.load(Ordering::Relaxed) != now_ms {
            self.last_used_ms.store(now_ms, Ordering::Relaxed);
        }
    }

    /// Requests this token was picked for.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// Tries to take the token for one request at clock reading `now_ms`.
    ///
    /// An active token is taken with one atomic load. A token whose gate
    /// has passed takes the slow path: an ended cooldown becomes active;
    /// a disabled token due for recovery is taken for one trial, and its
    /// gate moves so that no other request trials it at the same time.
    pub(super) fn try_acquire(&self, now_ms: u64, settings: &PoolSettings) -> bool {
        let gate = self.gate.load(Ordering::Acquire);
        if gate == 0 {
            self.note_pick(now_ms);
            return true;
        }
        if gate > now_ms {
            return false;
        }
        let now = self.clock.instant(now_ms);
        let mut inner = self.lock();
        // Re-check under the lock: another request may have moved the gate.
        if self.gate.load(Ordering::Acquire) > now_ms {
            return false;
        }
        match inner.state {
            TokenState::Active => {}
            TokenState::CoolingDown => {
                self.quota_refilled(&mut inner);
                let from = (inner.state, inner.reason);
                self.activate(&mut inner);
                self.dirty.store(true, Ordering::Release);
                drop(inner);
                self.log_change(from, (TokenState::Active, None), None);
                self.note_pick(now_ms);
                return true;
            }
            TokenState::Disabled => {
                // Half-open: one trial. If its outcome never arrives (the
                // client went away), another trial is due after one more wait.
                inner.trial = true;
                let wait = settings.recovery_wait(inner.backoff_level);
                inner.cooldown_until = Some(now + wait);
                self.gate
                    .store(self.clock.millis(now + wait), Ordering::Release);
                drop(inner);
                self.note_pick(now_ms);
                return true;
            }
            TokenState::Revoked => return false,
        }
        self.gate.store(0, Ordering::Release);
        drop(inner);
        self.note_pick(now_ms);
        true
    }

    /// Whether the background refresher should keep this token's access
    /// token fresh: it is in rotation, or its cooldown has ended.
    pub fn background_refreshable(&self, now: Instant) -> bool {
        match self.gate.load(Ordering::Acquire) {
            0 => true,
            CLOSED => false,
            gate => gate <= self.clock.millis(now) && self.lock().state == TokenState::CoolingDown,
        }
    }

    /// Whether its gate has passed at clock reading `now_ms` (it may be
    /// taken; [`Token::try_acquire`] decides).
    pub(super) fn gate_open(&self, now_ms: u64) -> bool {
        self.gate.load(Ordering::Acquire) <= now_ms
    }

    /// The hash of its name that ranks it for sessions.
    pub fn name_hash(&self) -> u64 {
        self.name_hash
    }

    /// Clock reading (ms) when this token may next be picked; `None` if
    /// only an operator can bring it back.
    pub(super) fn due_ms(&self) -> Option<u64> {
        match self.gate.load(Ordering::Acquire) {
            CLOSED => None,
            g => Some(g),
        }
    }

    /// When a client should come back for this token: [`Token::due_ms`],
    /// or sooner while a poll may still end a rest its own count decided.
    pub(super) fn retry_due_ms(&self, now_ms: u64) -> Option<u64> {
        let due = self.due_ms()?;
        let confirming = self.confirming.load(Ordering::Relaxed);
        Some(if confirming > now_ms {
            due.min(confirming)
        } else {
            due
        })
    }

    /// Applies what happened on a request or refresh; returns the new state.
    pub fn report(&self, outcome: Outcome, settings: &PoolSettings) -> TokenState {
        if matches!(outcome, Outcome::Success) && self.clean.load(Ordering::Acquire) {
            // Nothing to clear: the common case takes no lock.
            return TokenState::Active;
        }
        let now = Instant::now();
        let mut inner = self.lock();
        let before = persisted(&inner);
        let failures_before = inner.consecutive_failures;
        let trial = std::mem::take(&mut inner.trial);
        match outcome {
            Outcome::Success => {
                inner.consecutive_failures = 0;
                inner.quota_level = 0;
                inner.last_error = None;
                if inner.state == TokenState::Disabled && !is_manual(&inner) {
                    inner.backoff_level = 0;
                    self.activate(&mut inner);
                }
            }
            Outcome::Neutral => {
                if trial && inner.state == TokenState::Disabled {
                    // The trial said nothing about the token: it may be tried again now.
                    inner.cooldown_until = Some(now);
                    self.gate.store(self.clock.millis(now), Ordering::Release);
                }
            }
            Outcome::Failure(reason) => {
                inner.consecutive_failures = inner.consecutive_failures.saturating_add(1);
                inner.last_error = Some(reason.as_str().to_string());
                if inner.state == TokenState::Revoked || is_manual(&inner) {
                    // Already out for a stronger reason.
                } else if trial && inner.state == TokenState::Disabled {
                    inner.backoff_level = inner.backoff_level.saturating_add(1);
                    self.disable(&mut inner, reason, now, settings);
                } else if inner.consecutive_failures >= settings.failure_threshold {
                    inner.backoff_level = 0;
                    self.disable(&mut inner, reason, now, settings);
                }
            }
            Outcome::RateLimited(retry_after) => {
                let wait = retry_after
                    .unwrap_or(settings.cooldown)
                    .min(settings.max_cooldown);
                inner.last_error = Some(Reason::RateLimited.as_str().to_string());
                self.cool(&mut inner, Reason::RateLimited, now, wait);
            }
            Outcome::QuotaExhausted => {
                // Until the refill when it is known, and at least the
                // doubling guess: a refill time read from answer headers
                // may be a per-minute window's, not the quota's.
                let guess = settings.quota_wait(inner.quota_level);
                let wait = inner
                    .quota
                    .and_then(|q| q.refill_in())
                    .map_or(guess, |refill| refill.max(guess));
                self.count_is(0, now + wait);
                inner.counted_out = false;
                inner.quota_level = inner.quota_level.saturating_add(1);
                inner.last_error = Some(Reason::QuotaExhausted.as_str().to_string());
                self.cool(&mut inner, Reason::QuotaExhausted, now, wait);
            }
            Outcome::Revoked => {
                inner.state = TokenState::Revoked;
                inner.reason = Some(Reason::Revoked);
                inner.cooldown_until = None;
                inner.last_error = Some("refresh token rejected".to_string());
                self.gate.store(CLOSED, Ordering::Release);
                self.drop_access();
            }
            Outcome::RefreshUnavailable | Outcome::ClusterUnavailable => {
                let (reason, error) = if outcome == Outcome::ClusterUnavailable {
                    (
                        Reason::ClusterUnavailable,
                        "needs a refresh the cluster cannot coordinate now",
                    )
                } else {
                    (Reason::RefreshFailed, "refresh endpoint unavailable")
                };
                if matches!(inner.state, TokenState::Active | TokenState::CoolingDown) {
                    // Waiting for the cluster costs the upstream nothing:
                    // look again every second, so a token serves again as
                    // soon as the cluster can vouch for it.
                    let wait = if reason == Reason::ClusterUnavailable {
                        Duration::from_secs(1)
                    } else {
                        refresh_rest(inner.refresh_level)
                    };
                    inner.refresh_level = inner.refresh_level.saturating_add(1);
                    inner.last_error = Some(error.to_string());
                    self.cool(&mut inner, reason, now, wait);
                } else if trial && inner.state == TokenState::Disabled {
                    inner.cooldown_until = Some(now);
                    self.gate.store(self.clock.millis(now), Ordering::Release);
                }
            }
        }
        // Only what the state file keeps makes it dirty: a plain success on
        // a healthy token must not rewrite the file.
        let after = persisted(&inner);
        if after != before {
            self.dirty.store(true, Ordering::Release);
        }
        if after != before || inner.consecutive_failures != failures_before {
            self.mark_shared(&mut inner, false);
        }
        drop(inner);
        self.log_change((before.0, before.1), (after.0, after.1), after.2);
        after.0
    }

    /// Says a state change in the log: leaving rotation (or changing why it
    /// is out) at WARN, with when it comes back; coming back at INFO.
    fn log_change(
        &self,
        from: (TokenState, Option<Reason>),
        to: (TokenState, Option<Reason>),
        until: Option<Instant>,
    ) {
        if from == to {
            return;
        }
        let reason = to.1.map_or("-", Reason::as_str);
        if to.0 == TokenState::Active {
            tracing::info!(
                token = &*self.name,
                tier = self.tier.as_str(),
                from = from.0.as_str(),
                to = to.0.as_str(),
                "token back in rotation"
            );
            return;
        }
        let back = match until {
            Some(at) => {
                let wall = SystemTime::now() + at.saturating_duration_since(Instant::now());
                humantime::format_rfc3339_seconds(wall).to_string()
            }
            None if to.0 == TokenState::Revoked => "when enabled or its secret changes".into(),
            None => "when enabled".into(),
        };
        tracing::warn!(
            token = &*self.name,
            tier = self.tier.as_str(),
            from = from.0.as_str(),
            to = to.0.as_str(),
            reason,
            back = %back,
            "token state changed"
        );
    }

    fn activate(&self, inner: &mut Inner) {
        inner.state = TokenState::Active;
        inner.reason = None;
        inner.cooldown_until = None;
        self.gate.store(0, Ordering::Release);
    }

    fn cool(&self, inner: &mut Inner, reason: Reason, now: Instant, wait: Duration) {
        if inner.state == TokenState::Revoked || is_manual(inner) {
            return;
        }
        // A longer rest already under way is kept.
        let until = now + wait;
        if inner.state == TokenState::CoolingDown && inner.cooldown_until.is_some_and(|u| u > until)
        {
            return;
        }
        inner.state = TokenState::CoolingDown;
        inner.reason = Some(reason);
        inner.cooldown_until = Some(until);
        self.gate.store(self.clock.millis(until), Ordering::Release);
    }

    fn disable(&self, inner: &mut Inner, reason: Reason, now: Instant, settings: &PoolSettings) {
        let until = now + settings.recovery_wait(inner.backoff_level);
        inner.state = TokenState::Disabled;
        inner.reason = Some(reason);
        inner.cooldown_until = Some(until);
        self.gate.store(self.clock.millis(until), Ordering::Release);
    }

    /// Takes the token out of rotation until [`Token::enable`] (reason `manual`).
    pub fn disable_manually(&self) {
        let mut inner = self.lock();
        let from = (inner.state, inner.reason);
        inner.state = TokenState::Disabled;
        inner.reason = Some(Reason::Manual);
        inner.trial = false;
        inner.cooldown_until = None;
        self.gate.store(CLOSED, Ordering::Release);
        self.dirty.store(true, Ordering::Release);
        self.mark_shared(&mut inner, false);
        drop(inner);
        self.log_change(from, (TokenState::Disabled, Some(Reason::Manual)), None);
    }

    /// Puts the token back into rotation, clearing failures, cooldowns and
    /// revocation.
    pub fn enable(&self) {
        let mut inner = self.lock();
        let from = (inner.state, inner.reason);
        inner.consecutive_failures = 0;
        inner.quota_level = 0;
        inner.backoff_level = 0;
        inner.refresh_level = 0;
        inner.trial = false;
        inner.last_error = None;
        self.activate(&mut inner);
        self.quota_refilled(&mut inner);
        self.dirty.store(true, Ordering::Release);
        self.mark_shared(&mut inner, true);
        drop(inner);
        self.log_change(from, (TokenState::Active, None), None);
    }

    /// Restores persisted state (at start, from the state file).
    pub fn restore(&self, restored: Restored) {
        let mut inner = self.lock();
        if let Some(rt) = restored.refresh_token {
            inner.refresh_token = rt;
            inner.rotated = true;
            inner.rotation = restored.rotation.max(1);
        }
        inner.backoff_level = restored.backoff_level;
        inner.quota_level = restored.quota_level;
        let until = restored.until.map(|u| {
            let left = u
                .duration_since(SystemTime::now())
                .unwrap_or(Duration::ZERO);
            // A state file may say anything: never a rest of years.
            Instant::now() + left.min(MAX_RESTORED_REST)
        });
        match restored.state {
            Some(TokenState::Revoked) => {
                inner.state = TokenState::Revoked;
                inner.reason = Some(Reason::Revoked);
                self.gate.store(CLOSED, Ordering::Release);
            }
            Some(TokenState::Disabled) if restored.reason == Some(Reason::Manual) => {
                inner.state = TokenState::Disabled;
                inner.reason = Some(Reason::Manual);
                self.gate.store(CLOSED, Ordering::Release);
            }
            Some(state @ (TokenState::Disabled | TokenState::CoolingDown)) => {
                if let Some(until) = until {
                    inner.state = state;
                    inner.reason = restored.reason;
                    inner.cooldown_until = Some(until);
                    self.gate.store(self.clock.millis(until), Ordering::Release);
                }
            }
            _ => {}
        }
        if inner.state != TokenState::Active {
            // Shared as older than any change a replica makes while running.
            inner.stamp = 1;
        }
    }

    /// Whether state changed since the last call (for the state file).
    pub fn take_dirty(&self) -> bool {
        self.dirty.swap(false, Ordering::AcqRel)
    }

    /// A copy of its state at `now`.
    pub fn snapshot(&self) -> Snapshot {
        let now = Instant::now();
        let inner = self.lock().clone();
        let mut state = inner.state;
        let mut reason = inner.reason;
        let mut cooldown_until = inner.cooldown_until;
        if state == TokenState::CoolingDown && cooldown_until.is_some_and(|u| u <= now) {
            state = TokenState::Active;
            reason = None;
            cooldown_until = None;
        }
        let wall = |at: Instant| {
            let now_wall = SystemTime::now();
            if at >= now {
                now_wall + (at - now)
            } else {
                now_wall - (now - at)
            }
        };
        let last_ms = self.last_used_ms.load(Ordering::Relaxed);
        Snapshot {
            name: Arc::clone(&self.name),
            tier: self.tier,
            state,
            reason,
            consecutive_failures: inner.consecutive_failures,
            cooldown_until: cooldown_until.map(wall),
            access_token_expires_at: self.access.load().as_ref().map(|a| a.expires_at_wall),
            requests: self.requests(),
            last_used_at: (last_ms > 0).then(|| wall(self.clock.instant(last_ms))),
            last_error: inner.last_error.clone(),
            backoff_level: inner.backoff_level,
            quota_level: inner.quota_level,
            manual: inner.reason == Some(Reason::Manual),
            quota: self.quota(),
        }
    }
}

/// The fields of a token the state file records.
fn persisted(inner: &Inner) -> (TokenState, Option<Reason>, Option<Instant>, u32, u32) {
    (
        inner.state,
        inner.reason,
        inner.cooldown_until,
        inner.backoff_level,
        inner.quota_level,
    )
}

fn is_manual(inner: &Inner) -> bool {
    inner.state == TokenState::Disabled && inner.reason == Some(Reason::Manual)
}

/// Rest after the refresh endpoint was unavailable: 1 s doubling, capped at
/// 10 s, so the pool serves again within seconds of the endpoint's return.
fn refresh_rest(level: u32) -> Duration {
    Duration::from_secs(1u64 << level.min(4)).min(Duration::from_secs(10))
}
