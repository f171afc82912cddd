//! One token: its name and tier, its [`Credentials`], its quota count
//! and its `Health` (the state machine of `docs/tokens.md`: `active`,
//! `cooling_down`, `disabled`, `revoked`).
//!
//! The hot path reads a single atomic, the *gate*: the clock reading (in
//! milliseconds) from which the token may be picked. Every transition runs
//! under a short `std::sync::Mutex` that is never held across an `.await`,
//! through one commit point: a `Change` lets its caller edit the
//! `Health` and, when it ends, compares the `Facts` before and after
//! and applies what follows — the gate, the state file's dirty flag, the
//! stamp other replicas learn by, the log line and the count of state
//! changes. No transition places those by hand.

use std::fmt;
use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use tokio::sync::Notify;
use tokio::time::Instant;

use super::{Clock, PoolSettings};
use crate::config::{Secret, Tier, TokenConfig};

mod credentials;
mod health;
mod quota;
mod replicas;
mod vocab;

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

pub use credentials::{AccessToken, Credentials, Flight, RefreshResult};
pub use quota::{Quota, COUNT_TRUST, MAX_QUOTA_REST};
pub use replicas::{accepts, short_fingerprint, unix_ms, ReplicaState, Stamp};
pub use vocab::{Outcome, Reason, TokenState};

use health::{Facts, Health};

/// Longest rest restored from a state file (a month: quotas refill
/// monthly), whatever the file says.
const MAX_RESTORED_REST: Duration = Duration::from_secs(31 * 24 * 3600);

/// Gate value of a token that nothing but an operator (or a config change)
/// brings back.
const CLOSED: u64 = u64::MAX;

/// One configured token and everything the proxy knows about it.
///
/// In declaration order (`repr(C)`): what a pick reads comes first — the
/// gate, then the remaining count (a `most_remaining` scan reads both of
/// each token it visits: one cache line, not two) — and the rest after.
#[repr(C)]
pub struct Token {
    /// Clock reading (ms) from which the token may be picked; `CLOSED` for
    /// never. Always what [`Health::gate`] says, stored by the commit.
    gate: AtomicU64,
    /// The remaining request count and the quota poller's flags.
    count: quota::Count,
    /// Requests this token was picked for.
    requests: AtomicU64,
    /// Clock reading (ms) of the last pick (0 = never); turned into wall
    /// time only when a snapshot is taken, so a pick reads no wall clock.
    last_used_ms: AtomicU64,
    name: Arc<str>,
    /// A stable hash of the name, for session affinity.
    name_hash: u64,
    tier: Tier,
    clock: Clock,
    credentials: Credentials,
    /// Changes of state or reason since start.
    state_changes: AtomicU64,
    /// Set when a transition happened that the state file should record.
    dirty: AtomicBool,
    /// Set when a change happened that other replicas should learn.
    replica_dirty: AtomicBool,
    /// Woken on such a change (the pool's, shared by every token).
    changes: Arc<Notify>,
    health: Mutex<Health>,
    /// Whether a success would change nothing (see
    /// [`Health::success_is_noop`]); kept by the commit, so that the usual
    /// report — a success on a healthy token — takes no lock.
    clean: AtomicBool,
}

/// Where a change came from: it decides which side effects apply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Origin<'a> {
    /// Something that happened here: a report, a quota report, an access
    /// token this replica obtained. Shared with other replicas.
    Here,
    /// An operator's enable: always recorded and shared, as an enable; a
    /// count at zero is forgotten.
    Enable,
    /// An operator's disable: always recorded and shared (repeating it
    /// asserts it again across the cluster).
    Disable,
    /// A pick that ended a rest or started a trial: recorded, not shared
    /// (every replica sees its own rest end); a rest that ends forgets a
    /// count at zero.
    Pick,
    /// A change another replica made (named): recorded, not sent back.
    Replica(&'a str),
    /// An access token another replica obtained ended a rest here:
    /// recorded, not shared (the replica's own state says it).
    AdoptedAccess,
    /// Another replica's newer refresh token lifted a revocation.
    NewerSecret,
    /// The state file, at start: nothing to record, share, count or say.
    StateFile,
}

/// An edit of a token's [`Health`] under its lock, committed when dropped.
struct Change<'a> {
    token: &'a Token,
    health: Option<MutexGuard<'a, Health>>,
    before: Facts,
    origin: Origin<'a>,
}

impl Deref for Change<'_> {
    type Target = Health;
    fn deref(&self) -> &Health {
        self.health.as_ref().expect("held until dropped")
    }
}

impl DerefMut for Change<'_> {
    fn deref_mut(&mut self) -> &mut Health {
        self.health.as_mut().expect("held until dropped")
    }
}

impl Drop for Change<'_> {
    fn drop(&mut self) {
        let Some(mut health) = self.health.take() else {
            return;
        };
        let token = self.token;
        let origin = self.origin;
        let before = self.before;
        let after = health.facts();
        // Under the lock: what readers of the atomics must see together.
        let gate = health.gate(&token.clock);
        if token.gate.load(Ordering::Acquire) != gate {
            token.gate.store(gate, Ordering::Release);
        }
        token
            .clean
            .store(health.success_is_noop(), Ordering::Release);
        if origin == Origin::StateFile {
            // Restored, not changed: the file already says it.
            return;
        }
        let changed = after != before;
        let operator = matches!(origin, Origin::Enable | Origin::Disable);
        if after.persisted() != before.persisted() || operator {
            token.dirty.store(true, Ordering::Release);
        }
        if (changed && origin == Origin::Here) || operator {
            health.stamp = replicas::unix_ms(SystemTime::now()).max(health.stamp.saturating_add(1));
            if origin == Origin::Enable {
                health.enabled_at = health.stamp;
            }
            token.replica_dirty.store(true, Ordering::Release);
            token.changes.notify_one();
        }
        let rest_ended = origin == Origin::Pick && after.state == TokenState::Active;
        if (rest_ended && before.state != TokenState::Active) || origin == Origin::Enable {
            // A count at zero is unknown again: refilled, or to be learned anew.
            token.count.forget_zero();
        }
        if after.state == TokenState::Revoked {
            // Under the lock, so that no access token is taken between.
            token.credentials.drop_access();
        }
        drop(health);
        if after.standing() != before.standing() {
            token.state_changes.fetch_add(1, Ordering::Relaxed);
            token.log_change(before, after, origin);
        }
    }
}

/// The lock on a token's [`Health`] for reading.
struct Reading<'a>(MutexGuard<'a, Health>);

impl Deref for Reading<'_> {
    type Target = Health;
    fn deref(&self) -> &Health {
        &self.0
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
    /// Changes of its state or reason since start.
    pub state_changes: u64,
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
            clock,
            credentials: Credentials::new(&config.secret),
            gate: AtomicU64::new(0),
            count: quota::Count::default(),
            requests: AtomicU64::new(0),
            last_used_ms: AtomicU64::new(0),
            state_changes: AtomicU64::new(0),
            dirty: AtomicBool::new(false),
            replica_dirty: AtomicBool::new(false),
            changes,
            health: Mutex::new(Health::default()),
            clean: AtomicBool::new(true),
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

    /// Its refresh and access tokens.
    pub fn credentials(&self) -> &Credentials {
        &self.credentials
    }

    /// Whether this token is the one configured as `config` (same name,
    /// tier and secret): such a token keeps its state across a reload.
    pub fn same_as(&self, config: &TokenConfig) -> bool {
        *self.name == *config.name
            && self.tier == config.tier
            && *self.credentials.configured() == config.secret
    }

    fn guard(&self) -> MutexGuard<'_, Health> {
        // A panic while holding the lock leaves plain data behind; keep serving.
        self.health.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Its health, for reading.
    fn read(&self) -> Reading<'_> {
        Reading(self.guard())
    }

    /// Its health, for a transition that `origin` made; committed when the
    /// returned [`Change`] is dropped.
    fn change<'a>(&'a self, origin: Origin<'a>) -> Change<'a> {
        let health = self.guard();
        Change {
            token: self,
            before: health.facts(),
            health: Some(health),
            origin,
        }
    }

    /// Installs a new access token this replica obtained (and ends any
    /// refresh-unavailable rest).
    pub fn set_access(&self, access: AccessToken) {
        self.credentials.store_access(access);
        self.change(Origin::Here).refreshed();
    }

    /// Installs an access token another replica obtained, unless it is
    /// the one held, expires before it, or is the one this replica dropped
    /// after a 401. Returns whether it was installed.
    pub fn adopt_access(&self, access: AccessToken) -> bool {
        if !self.credentials.would_adopt(&access) {
            return false;
        }
        self.credentials.store_access(access);
        self.change(Origin::AdoptedAccess).refreshed();
        true
    }

    /// Takes the refresh token another replica rotated to, if it is newer
    /// (more rotations; on a tie, only when `tie` says the other one won).
    /// A revocation seen here was of the token it replaced, so it is
    /// lifted. Returns whether anything changed.
    pub fn adopt_refresh_token(&self, refresh_token: Secret, rotation: u64, tie: bool) -> bool {
        // Health first, then the credentials (the one order in which both
        // locks are held): no revocation is applied or shared between the
        // new refresh token and the lifting of the old one's revocation.
        let mut change = self.change(Origin::NewerSecret);
        if !self.credentials.adopt(refresh_token, rotation, tie) {
            return false;
        }
        if change.state == TokenState::Revoked {
            change.activate();
            change.consecutive_failures = 0;
            change.last_error = None;
        }
        true
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
    /// has passed takes the slow path ([`Health::pick`]): an ended
    /// cooldown becomes active; a disabled token due for recovery is taken
    /// for one trial, and its gate moves so that no other request trials
    /// it at the same time.
    pub(super) fn try_acquire(&self, now_ms: u64, settings: &PoolSettings) -> bool {
        let gate = self.gate.load(Ordering::Acquire);
        if gate == 0 {
            self.note_pick(now_ms);
            return true;
        }
        if gate > now_ms {
            return false;
        }
        let mut change = self.change(Origin::Pick);
        // Re-check under the lock: another request may have moved the gate.
        if self.gate.load(Ordering::Acquire) > now_ms {
            return false;
        }
        let taken = change.pick(self.clock.instant(now_ms), settings);
        drop(change);
        if taken {
            self.note_pick(now_ms);
        }
        taken
    }

    /// Whether the background refresher should keep this token's access
    /// token fresh: it is in rotation, or its cooldown has ended.
    pub fn background_refreshable(&self, now: Instant) -> bool {
        match self.gate.load(Ordering::Acquire) {
            0 => true,
            CLOSED => false,
            gate => gate <= self.clock.millis(now) && self.read().state == TokenState::CoolingDown,
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
        Some(match self.count.confirming_until() {
            confirming if confirming > now_ms => due.min(confirming),
            _ => due,
        })
    }

    /// Whether only an operator (or a new secret, or a newer refresh
    /// token from another replica) brings it back: revoked, or disabled
    /// by hand.
    pub fn is_out_for_good(&self) -> bool {
        self.gate.load(Ordering::Acquire) == CLOSED
    }

    /// Applies what happened on a request or refresh; returns the new state.
    pub fn report(&self, outcome: Outcome, settings: &PoolSettings) -> TokenState {
        if matches!(outcome, Outcome::Success) && self.clean.load(Ordering::Acquire) {
            // Nothing to clear: the common case takes no lock.
            return TokenState::Active;
        }
        let mut change = self.change(Origin::Here);
        if let Some(until) = change.apply(outcome, Instant::now(), settings) {
            self.count.set(0, &self.clock, until);
        }
        change.state
    }

    /// Says a state change in the log: leaving rotation (or changing why it
    /// is out) at WARN, with when it comes back; coming back at INFO; a
    /// change another replica made at INFO, naming it.
    fn log_change(&self, from: Facts, to: Facts, origin: Origin<'_>) {
        let reason = to.reason.map_or("-", Reason::as_str);
        match origin {
            Origin::StateFile => {}
            Origin::Replica(node) => tracing::info!(
                token = &*self.name,
                tier = self.tier.as_str(),
                from = from.state.as_str(),
                to = to.state.as_str(),
                reason,
                node,
                "token state changed on another replica"
            ),
            Origin::NewerSecret => tracing::info!(
                token = &*self.name,
                tier = self.tier.as_str(),
                "token back in rotation: another replica holds a newer refresh token"
            ),
            _ if to.state == TokenState::Active => tracing::info!(
                token = &*self.name,
                tier = self.tier.as_str(),
                from = from.state.as_str(),
                to = to.state.as_str(),
                "token back in rotation"
            ),
            _ => {
                let back = match to.until {
                    _ if to.reason == Some(Reason::Manual) => "when enabled".into(),
                    Some(at) => {
                        let wall = SystemTime::now() + at.saturating_duration_since(Instant::now());
                        humantime::format_rfc3339_seconds(wall).to_string()
                    }
                    None if to.state == TokenState::Revoked => {
                        "when enabled or its secret changes".into()
                    }
                    None => "when enabled".into(),
                };
                tracing::warn!(
                    token = &*self.name,
                    tier = self.tier.as_str(),
                    from = from.state.as_str(),
                    to = to.state.as_str(),
                    reason,
                    back = %back,
                    "token state changed"
                );
            }
        }
    }

    /// Takes the token out of rotation until [`Token::enable`] (reason `manual`).
    pub fn disable_manually(&self) {
        self.change(Origin::Disable).disable_manually();
    }

    /// Puts the token back into rotation, clearing failures, cooldowns and
    /// revocation.
    pub fn enable(&self) {
        self.change(Origin::Enable).enable();
    }

    /// Restores persisted state (at start, from the state file).
    pub fn restore(&self, restored: Restored) {
        if let Some(rt) = restored.refresh_token {
            self.credentials.restore(rt, restored.rotation);
        }
        let mut health = self.change(Origin::StateFile);
        health.backoff_level = restored.backoff_level;
        health.quota_level = restored.quota_level;
        let until = restored.until.map(|u| {
            let left = u
                .duration_since(SystemTime::now())
                .unwrap_or(Duration::ZERO);
            // A state file may say anything: never a rest of years.
            Instant::now() + left.min(MAX_RESTORED_REST)
        });
        match restored.state {
            Some(TokenState::Revoked) => {
                health.state = TokenState::Revoked;
                health.reason = Some(Reason::Revoked);
            }
            Some(TokenState::Disabled) if restored.reason == Some(Reason::Manual) => {
                health.disable_manually();
            }
            Some(state @ (TokenState::Disabled | TokenState::CoolingDown)) => {
                if let Some(until) = until {
                    health.state = state;
                    health.reason = restored.reason;
                    health.cooldown_until = Some(until);
                }
            }
            _ => {}
        }
        if health.state != TokenState::Active {
            // Shared as older than any change a replica makes while running.
            health.stamp = 1;
        }
    }

    /// Whether state changed since the last call (for the state file).
    pub fn take_dirty(&self) -> bool {
        let secret = self.credentials.take_changed();
        self.dirty.swap(false, Ordering::AcqRel) | secret
    }

    /// A copy of its state at `now`.
    pub fn snapshot(&self) -> Snapshot {
        let now = Instant::now();
        let health = self.read().clone();
        let mut state = health.state;
        let mut reason = health.reason;
        let mut cooldown_until = health.cooldown_until;
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
            consecutive_failures: health.consecutive_failures,
            cooldown_until: cooldown_until.map(wall),
            access_token_expires_at: self.credentials.access_expires_at(),
            requests: self.requests(),
            last_used_at: (last_ms > 0).then(|| wall(self.clock.instant(last_ms))),
            last_error: health.last_error.clone(),
            backoff_level: health.backoff_level,
            quota_level: health.quota_level,
            manual: health.reason == Some(Reason::Manual),
            quota: self.quota(),
            state_changes: self.state_changes.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::thread;

    use super::testing::{settings, token};
    use super::*;

    impl Token {
        /// Whether what is kept beside the lock agrees with the health
        /// under it: the gate and the no-op flag the fast paths read.
        fn agrees(&self) -> bool {
            let health = self.read();
            self.gate.load(Ordering::Acquire) == health.gate(&self.clock)
                && self.clean.load(Ordering::Acquire) == health.success_is_noop()
        }
    }

    /// Threads report, pick, enable and disable one token at once; after
    /// each one's turn and at the end, the atomics the hot path reads
    /// agree with the state under the lock, and every change of state was
    /// counted exactly once.
    #[test]
    fn concurrent_reports_on_one_token_leave_it_consistent() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        let _time = runtime.enter();
        let t = Arc::new(token("busy"));
        let outcomes = [
            Outcome::Success,
            Outcome::Failure(Reason::Forbidden),
            Outcome::RateLimited(Some(Duration::from_millis(3))),
            Outcome::QuotaExhausted,
            Outcome::Neutral,
            Outcome::RefreshUnavailable,
            Outcome::Revoked,
        ];
        let threads: Vec<_> = (0..4u64)
            .map(|seed| {
                let t = Arc::clone(&t);
                thread::spawn(move || {
                    let settings = settings();
                    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
                    for _ in 0..5_000 {
                        // xorshift: a different, repeatable mix per thread.
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        match x % 12 {
                            0 => t.enable(),
                            1 => t.disable_manually(),
                            2 | 3 => {
                                t.try_acquire(t.clock.now_millis(), &settings);
                            }
                            n => {
                                t.report(outcomes[(n as usize) % outcomes.len()], &settings);
                            }
                        }
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        assert!(t.agrees());
        // One more change from a known state is counted once and logged once.
        t.enable();
        let before = t.snapshot().state_changes;
        t.disable_manually();
        t.disable_manually();
        assert_eq!(t.snapshot().state_changes, before + 1);
        assert!(t.agrees());
        assert!(t.take_dirty());
        assert!(!t.take_dirty());
    }

    /// Each way a token changes goes through the one commit: the dirty
    /// and shared flags follow what changed and where it came from.
    #[tokio::test(start_paused = true)]
    async fn side_effects_follow_the_origin() {
        let t = token("a");
        let s = settings();
        // A success on a healthy token changes nothing.
        t.report(Outcome::Success, &s);
        assert!(!t.take_dirty() && !t.take_replica_dirty());
        // A failure below the threshold: replicas learn the count, the
        // state file has nothing new.
        t.report(Outcome::Failure(Reason::Forbidden), &s);
        assert!(!t.take_dirty());
        assert!(t.take_replica_dirty());
        // A rest: both.
        t.report(Outcome::RateLimited(None), &s);
        assert!(t.take_dirty() && t.take_replica_dirty());
        // Its end on a pick: the state file, not the replicas.
        tokio::time::advance(s.cooldown + Duration::from_millis(1)).await;
        assert!(t.try_acquire(t.clock.now_millis(), &s));
        assert_eq!(t.snapshot().state, TokenState::Active);
        assert!(t.take_dirty());
        assert!(!t.take_replica_dirty());
        // A change from another replica is recorded, never sent back.
        let mut remote = t.replica_state();
        remote.state = TokenState::CoolingDown;
        remote.reason = Some(Reason::RateLimited);
        remote.until = Some(unix_ms(SystemTime::now()) + 60_000);
        remote.stamp.at = unix_ms(SystemTime::now()) + 10;
        assert!(t.apply_replica(&remote, "node-b"));
        assert!(t.take_dirty());
        assert!(!t.take_replica_dirty());
        assert!(t.agrees());
        // An enable is always recorded and shared, stamped as an enable.
        t.enable();
        assert!(t.take_dirty() && t.take_replica_dirty());
        let shared = t.replica_state();
        assert_eq!(shared.stamp.enabled_at, shared.stamp.at);
        // A rotation marks the state file only.
        t.credentials().rotate(Secret::new("rt-a-2"));
        assert!(t.take_dirty());
        assert!(!t.take_replica_dirty());
        // An operator's disable is shared each time it is said.
        t.disable_manually();
        assert!(t.take_dirty() && t.take_replica_dirty());
        t.disable_manually();
        assert!(t.take_dirty() && t.take_replica_dirty());
        t.enable();
        let _ = (t.take_dirty(), t.take_replica_dirty());
        // Another replica's access token ending a refresh rest here is not
        // sent back as this replica's change.
        t.report(Outcome::RefreshUnavailable, &s);
        assert!(t.take_replica_dirty());
        assert!(t.adopt_access(AccessToken::new("theirs", Duration::from_secs(600))));
        assert_eq!(t.snapshot().state, TokenState::Active);
        assert!(!t.take_replica_dirty());
        // A success that ends a trial keeps a count of zero just learned.
        for _ in 0..s.failure_threshold {
            t.report(Outcome::Failure(Reason::Forbidden), &s);
        }
        tokio::time::advance(s.recovery_wait(0) + Duration::from_millis(1)).await;
        assert!(t.try_acquire(t.clock.now_millis(), &s));
        t.learn_quota(Quota {
            remaining: Some(0),
            ..Quota::default()
        });
        t.report(Outcome::Success, &s);
        assert_eq!(t.snapshot().state, TokenState::Active);
        assert_eq!(t.remaining_at(t.clock.now_millis()), 0);
        // Revocation drops the access token.
        t.set_access(AccessToken::new("bearer", Duration::from_secs(60)));
        t.report(Outcome::Revoked, &s);
        assert!(t.credentials().access().is_none());
        assert!(t.is_out_for_good());
        // A restore is no change: not counted, not recorded.
        let r = token("r");
        r.restore(Restored {
            state: Some(TokenState::Revoked),
            ..Restored::default()
        });
        assert!(r.is_out_for_good());
        assert_eq!(r.snapshot().state_changes, 0);
        assert!(!r.take_dirty() && !r.take_replica_dirty());
    }
}
