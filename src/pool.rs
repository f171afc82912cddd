//! The token pool: tokens grouped by tier in the configured order,
//! round-robin selection inside a tier, tier fallback, and the state
//! machine of each token (in [`token`]).
//!
//! The pool knows nothing of HTTP: the proxy and the refresher translate
//! what they see into [`Outcome`]s. Picking a token takes no lock on the
//! common path (one atomic per token looked at, one per tier for the
//! round-robin cursor) and allocates nothing.

pub mod token;

use std::cell::Cell;
use std::collections::HashMap;
use std::ops::Deref;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

pub use token::{
    AccessToken, Outcome, Reason, Restored, SharedState, Snapshot, Stamp, Token, TokenState,
};

use crate::config::{PoolConfig, Tier, TokenConfig};

/// Milliseconds since a fixed instant, shared by every generation's pool so
/// that tokens carried across a reload keep comparable gates.
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    epoch: Instant,
}

impl Clock {
    /// A clock starting now.
    pub fn new() -> Clock {
        Clock {
            epoch: Instant::now(),
        }
    }

    /// The reading for `at`. Readings start at 1, because a gate of 0
    /// means "active".
    pub fn millis(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.epoch).as_millis() as u64 + 1
    }

    /// The reading now.
    pub fn now_millis(&self) -> u64 {
        self.millis(Instant::now())
    }

    /// The instant of a reading.
    pub fn instant(&self, millis: u64) -> Instant {
        self.epoch + Duration::from_millis(millis.saturating_sub(1))
    }
}

impl Default for Clock {
    fn default() -> Self {
        Clock::new()
    }
}

/// The `[pool]` numbers the state machine needs.
#[derive(Debug, Clone)]
pub struct PoolSettings {
    /// Consecutive token-fault failures that disable a token.
    pub failure_threshold: u32,
    /// Cooldown after a 429 without Retry-After.
    pub cooldown: Duration,
    /// First quota cooldown.
    pub quota_cooldown: Duration,
    /// Cap for every cooldown.
    pub max_cooldown: Duration,
    /// First recovery wait.
    pub recovery_backoff: Duration,
    /// Cap for the recovery wait.
    pub max_recovery_backoff: Duration,
}

impl PoolSettings {
    /// The settings of a `[pool]` section.
    pub fn from_config(c: &PoolConfig) -> PoolSettings {
        PoolSettings {
            failure_threshold: c.failure_threshold,
            cooldown: c.cooldown,
            quota_cooldown: c.quota_cooldown,
            max_cooldown: c.max_cooldown,
            recovery_backoff: c.recovery_backoff,
            max_recovery_backoff: c.max_recovery_backoff,
        }
    }

    /// The wait before a disabled token's next trial.
    pub fn recovery_wait(&self, level: u32) -> Duration {
        doubled(self.recovery_backoff, level, self.max_recovery_backoff)
    }

    /// The length of a quota cooldown.
    pub fn quota_wait(&self, level: u32) -> Duration {
        doubled(self.quota_cooldown, level, self.max_cooldown)
    }
}

fn doubled(base: Duration, level: u32, cap: Duration) -> Duration {
    base.checked_mul(1u32 << level.min(31))
        .unwrap_or(cap)
        .min(cap)
}

/// A value alone on its cache line (128 bytes: the line pair adjacent-line
/// prefetchers fetch together), so that writes to its neighbours do not
/// invalidate it in other cores' caches.
#[derive(Debug, Default)]
#[repr(align(128))]
pub(crate) struct Padded<T>(pub(crate) T);

impl<T> Deref for Padded<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

/// This thread's stripe number. Each thread walks a tier with the cursor of
/// its stripe, so threads picking at the same time do not fight over one
/// cursor's cache line. On one thread (the proxy's runtime on one core)
/// this is plain round-robin.
fn stripe() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static STRIPE: Cell<usize> = const { Cell::new(usize::MAX) };
    }
    STRIPE.with(|s| {
        if s.get() == usize::MAX {
            s.set(NEXT.fetch_add(1, Ordering::Relaxed));
        }
        s.get()
    })
}

/// Round-robin cursors per tier, one per thread stripe.
const CURSORS: usize = 4;

/// The tokens of one tier and its round-robin cursors.
#[derive(Debug)]
struct TierTokens {
    tier: Tier,
    tokens: Vec<Arc<Token>>,
    /// Every cursor starts at the first token: a pick is deterministic for
    /// whichever thread makes it.
    cursors: [Padded<AtomicUsize>; CURSORS],
}

/// A token picked for a request.
#[derive(Debug)]
pub struct Selected<'a> {
    /// The token (borrowed from the pool: a pick touches no reference count).
    pub token: &'a Arc<Token>,
    /// `(from, to)` when a lower tier was used because every token of the
    /// first tier with tokens was unavailable.
    pub fallback: Option<(Tier, Tier)>,
}

/// All tokens of one generation, by tier, in the configured order.
#[derive(Debug)]
pub struct Pool {
    clock: Clock,
    settings: PoolSettings,
    tiers: Vec<TierTokens>,
    tokens: Vec<Arc<Token>>,
    by_name: HashMap<Arc<str>, usize>,
    /// Whether tokens need refreshing (false for the `static` provider,
    /// whose tokens always have a bearer).
    refreshes: bool,
    /// Clock reading until which the refresh endpoint must not be called
    /// (it answered 429); shared across generations.
    refresh_gate: Arc<AtomicU64>,
    /// Woken when a token changes in a way other replicas should learn;
    /// shared across generations.
    changes: Arc<Notify>,
}

impl Pool {
    /// Builds a pool from `tokens`, carrying over every token of `previous`
    /// whose name, tier and secret are unchanged, with its whole state.
    pub fn new(
        config: &PoolConfig,
        tokens: &[TokenConfig],
        refreshes: bool,
        previous: Option<&Pool>,
    ) -> Pool {
        let clock = previous.map_or_else(Clock::new, |p| p.clock);
        let refresh_gate = previous.map_or_else(Default::default, |p| Arc::clone(&p.refresh_gate));
        let changes = previous.map_or_else(Default::default, |p| Arc::clone(&p.changes));
        let mut all = Vec::with_capacity(tokens.len());
        let mut by_name = HashMap::with_capacity(tokens.len());
        for t in tokens {
            let token = previous
                .and_then(|p| p.get(&t.name))
                .filter(|old| old.same_as(t))
                .cloned()
                .unwrap_or_else(|| Arc::new(Token::new(t, clock, Arc::clone(&changes))));
            by_name.insert(Arc::from(t.name.as_str()), all.len());
            all.push(token);
        }
        let tiers = config
            .order
            .iter()
            .map(|&tier| TierTokens {
                tier,
                tokens: all.iter().filter(|t| t.tier() == tier).cloned().collect(),
                cursors: Default::default(),
            })
            .collect();
        Pool {
            clock,
            settings: PoolSettings::from_config(config),
            tiers,
            tokens: all,
            by_name,
            refreshes,
            refresh_gate,
            changes,
        }
    }

    /// Woken when a token changes in a way other replicas should learn
    /// (the cluster's sync task waits on it).
    pub fn changes(&self) -> &Arc<Notify> {
        &self.changes
    }

    /// The pool's clock.
    pub fn clock(&self) -> Clock {
        self.clock
    }

    /// The state-machine settings.
    pub fn settings(&self) -> &PoolSettings {
        &self.settings
    }

    /// Every token, in config order.
    pub fn tokens(&self) -> &[Arc<Token>] {
        &self.tokens
    }

    /// The tier order.
    pub fn order(&self) -> impl Iterator<Item = Tier> + '_ {
        self.tiers.iter().map(|t| t.tier)
    }

    /// The token named `name`.
    pub fn get(&self, name: &str) -> Option<&Arc<Token>> {
        self.by_name.get(name).map(|&i| &self.tokens[i])
    }

    /// Whether tokens of this pool are refreshed (not `static`).
    pub fn refreshes(&self) -> bool {
        self.refreshes
    }

    /// Blocks refresh calls until `until` (the endpoint answered 429).
    pub fn block_refresh_until(&self, until: Instant) {
        self.refresh_gate
            .fetch_max(self.clock.millis(until), Ordering::AcqRel);
    }

    /// When refreshing is allowed again, if it is blocked at `now`.
    pub fn refresh_blocked_until(&self, now: Instant) -> Option<Instant> {
        let gate = self.refresh_gate.load(Ordering::Acquire);
        (gate > self.clock.millis(now)).then(|| self.clock.instant(gate))
    }

    /// Picks a token for a request, skipping those in `tried`.
    ///
    /// Walks the tiers in order and takes the first tier with an available
    /// token, round-robin inside it. A token is available when its gate has
    /// passed and it has, or can get, an access token.
    pub fn select(&self, tried: &[&Arc<Token>]) -> Option<Selected<'_>> {
        let now = Instant::now();
        let now_ms = self.clock.millis(now);
        // While the refresh endpoint is backing off, a token without a valid
        // access token cannot get one.
        let refresh_blocked = self.refreshes && self.refresh_gate.load(Ordering::Relaxed) > now_ms;
        let mut first_tier: Option<Tier> = None;
        for tier in &self.tiers {
            let n = tier.tokens.len();
            if n == 0 {
                continue;
            }
            first_tier.get_or_insert(tier.tier);
            let start = tier.cursors[stripe() % CURSORS].fetch_add(1, Ordering::Relaxed) % n;
            for i in 0..n {
                let idx = if start + i >= n {
                    start + i - n
                } else {
                    start + i
                };
                let token = &tier.tokens[idx];
                if tried.iter().any(|t| Arc::ptr_eq(t, token)) {
                    continue;
                }
                if refresh_blocked && !token.has_valid_access(now) {
                    continue;
                }
                if token.try_acquire(now_ms, &self.settings) {
                    let fallback = first_tier
                        .filter(|&first| first != tier.tier)
                        .map(|first| (first, tier.tier));
                    return Some(Selected { token, fallback });
                }
            }
        }
        None
    }

    /// How long until a token is expected back, for `Retry-After` when
    /// none is available: the earliest gate among tokens that come back by
    /// themselves, at least one second. `None` when none will.
    pub fn next_available_in(&self) -> Option<Duration> {
        let now_ms = self.clock.now_millis();
        let refresh_gate = if self.refreshes {
            self.refresh_gate.load(Ordering::Relaxed)
        } else {
            0
        };
        self.tokens
            .iter()
            .filter_map(|t| t.due_ms())
            .map(|due| due.max(refresh_gate))
            .min()
            .map(|due| {
                Duration::from_millis(due.saturating_sub(now_ms)).max(Duration::from_secs(1))
            })
    }

    /// Whether at least one token is usable now or will be by itself.
    pub fn any_usable(&self) -> bool {
        let now_ms = self.clock.now_millis();
        self.tokens
            .iter()
            .any(|t| t.due_ms().is_some_and(|d| d <= now_ms))
    }

    /// Token counts per tier and effective state, now.
    pub fn state_counts(&self) -> StateCounts {
        StateCounts::of(&self.snapshots())
    }

    /// A snapshot of every token, in config order.
    pub fn snapshots(&self) -> Vec<Snapshot> {
        self.tokens.iter().map(|t| self.snapshot(t)).collect()
    }

    /// A snapshot of `token`. A pool that does not refresh (API keys, the
    /// `static` provider) has bearers that never expire: no expiry is shown.
    pub fn snapshot(&self, token: &Token) -> Snapshot {
        let mut s = token.snapshot();
        if !self.refreshes {
            s.access_token_expires_at = None;
        }
        s
    }
}

/// Token counts by tier and state: the one count behind `tokenpool_tokens`,
/// `/admin/pool` and `/readyz`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StateCounts([[usize; TokenState::ALL.len()]; Tier::ALL.len()]);

impl StateCounts {
    /// Counts `snapshots` by tier and state.
    pub fn of(snapshots: &[Snapshot]) -> StateCounts {
        let mut counts = StateCounts::default();
        for s in snapshots {
            counts.0[s.tier.index()][s.state.index()] += 1;
        }
        counts
    }

    /// Tokens of `tier` in `state`.
    pub fn get(&self, tier: Tier, state: TokenState) -> usize {
        self.0[tier.index()][state.index()]
    }

    /// Tokens in `state`, all tiers together.
    pub fn in_state(&self, state: TokenState) -> usize {
        Tier::ALL.iter().map(|&t| self.get(t, state)).sum()
    }
}

#[cfg(test)]
mod tests;
