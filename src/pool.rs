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
    AccessToken, Outcome, Quota, Reason, ReplicaState, Restored, Snapshot, Stamp, Token, TokenState,
};

use crate::config::{PoolConfig, Strategy, Tier, TokenConfig};

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
    /// How a token is picked inside a tier.
    pub strategy: Strategy,
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
            strategy: c.strategy,
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
    /// For `most_remaining`: each token's remaining count as last read, in
    /// tier order, so that a pick scans one packed array instead of
    /// visiting every token. A count read as higher than it is, is read
    /// again before it wins; all are read again every second (a count
    /// that went up shows within it).
    remaining: Box<[AtomicU64]>,
    /// Clock reading of the last full read of `remaining`.
    remaining_read_ms: AtomicU64,
    /// Each token's name hash, in tier order, for session affinity.
    hashes: Box<[u64]>,
}

/// A token picked for a request.
#[derive(Debug)]
pub struct Selected<'a> {
    /// The token (borrowed from the pool: a pick touches no reference count).
    pub token: &'a Arc<Token>,
    /// `(from, to)` when a lower tier was used because every token of the
    /// first tier with tokens was unavailable.
    pub fallback: Option<(Tier, Tier)>,
    /// How the session's affinity went.
    pub affinity: Affinity,
}

/// How a request of a session was placed (`tokenpool_affinity_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Affinity {
    /// No session (no affinity header, or none configured).
    None,
    /// On the session's own token.
    Hit,
    /// Its token was unavailable (resting, or already tried): elsewhere.
    Moved,
}

impl Affinity {
    /// The `result` label.
    pub fn as_str(self) -> &'static str {
        match self {
            Affinity::None => "none",
            Affinity::Hit => "hit",
            Affinity::Moved => "moved",
        }
    }
}

/// FNV-1a of `bytes`: stable across processes and builds, so that every
/// replica ranks a session's tokens alike.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The session key of an affinity header's value.
pub fn session_key(value: &[u8]) -> u64 {
    fnv1a(value)
}

/// A token's rendezvous weight for a session: a well-mixed function of
/// both (the splitmix64 finaliser).
fn weight(session: u64, token: u64) -> u64 {
    let mut z = session ^ token.rotate_left(29);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Takes the token the scan chose; if another request moved its gate in
/// the meantime, the scan runs again without it (a rare race).
fn take<'a, F>(now_ms: u64, settings: &PoolSettings, mut choose: F) -> Option<&'a Arc<Token>>
where
    F: FnMut(&dyn Fn(&Arc<Token>) -> bool) -> Option<&'a Arc<Token>>,
{
    let mut lost: Vec<&Arc<Token>> = Vec::new();
    loop {
        let token = choose(&|t: &Arc<Token>| !lost.iter().any(|l| Arc::ptr_eq(l, t)))?;
        if token.try_acquire(now_ms, settings) {
            return Some(token);
        }
        lost.push(token);
    }
}

/// In turn: the first available token from the tier's cursor on.
fn round_robin<'a>(
    tier: &'a TierTokens,
    eligible: &dyn Fn(&Arc<Token>) -> bool,
    now_ms: u64,
    settings: &PoolSettings,
) -> Option<&'a Arc<Token>> {
    let n = tier.tokens.len();
    let start = tier.cursors[stripe() % CURSORS].fetch_add(1, Ordering::Relaxed) % n;
    for i in 0..n {
        let idx = if start + i >= n {
            start + i - n
        } else {
            start + i
        };
        let token = &tier.tokens[idx];
        if eligible(token) && token.try_acquire(now_ms, settings) {
            return Some(token);
        }
    }
    None
}

/// The available token with the most known remaining quota (unknown
/// counts as full, so the first such ends the scan); ties go in turn.
///
/// The scan reads the tier's packed copy of the counts; only a count that
/// would win is checked against its token (available? really that high?),
/// so a pick touches a handful of tokens however large the tier.
fn most_remaining<'a>(
    tier: &'a TierTokens,
    eligible: &dyn Fn(&Arc<Token>) -> bool,
    now_ms: u64,
    settings: &PoolSettings,
) -> Option<&'a Arc<Token>> {
    let n = tier.tokens.len();
    if now_ms.saturating_sub(tier.remaining_read_ms.load(Ordering::Relaxed)) >= 1000 {
        tier.remaining_read_ms.store(now_ms, Ordering::Relaxed);
        for (slot, token) in tier.remaining.iter().zip(&tier.tokens) {
            slot.store(token.remaining_at(now_ms), Ordering::Relaxed);
        }
    }
    // Ties go in turn: the scan starts after the last token this stripe
    // picked, so a tie is not won more often by a token that happens to
    // follow lower counts.
    let cursor = &tier.cursors[stripe() % CURSORS];
    let start = cursor.load(Ordering::Relaxed) % n;
    take(now_ms, settings, |not_lost| {
        let mut best: Option<(usize, u64)> = None;
        // From the cursor to the end, then from the start to the cursor:
        // no division per token.
        for range in [start..n, 0..start] {
            for i in range {
                let copy = tier.remaining[i].load(Ordering::Relaxed);
                if best.is_some_and(|(_, b)| copy <= b) {
                    continue;
                }
                let token = &tier.tokens[i];
                let left = token.remaining_at(now_ms);
                if left != copy {
                    tier.remaining[i].store(left, Ordering::Relaxed);
                    if best.is_some_and(|(_, b)| left <= b) {
                        continue;
                    }
                }
                if !token.gate_open(now_ms) || !eligible(token) || !not_lost(token) {
                    continue;
                }
                best = Some((i, left));
                if left == u64::MAX {
                    break;
                }
            }
            if best.is_some_and(|(_, b)| b == u64::MAX) {
                break;
            }
        }
        let (i, _) = best?;
        cursor.store(i + 1, Ordering::Relaxed);
        Some(&tier.tokens[i])
    })
}

/// Rendezvous hashing: the available token that weighs most for the
/// session; also returns the one that weighs most of all (its own). The
/// weights come from the tier's packed name hashes; only a token that
/// would win is checked for availability.
fn rendezvous<'a>(
    tier: &'a TierTokens,
    session: u64,
    eligible: &dyn Fn(&Arc<Token>) -> bool,
    now_ms: u64,
    settings: &PoolSettings,
) -> (Option<&'a Arc<Token>>, Option<&'a Arc<Token>>) {
    let mut top: Option<(usize, u64)> = None;
    let picked = take(now_ms, settings, |not_lost| {
        let mut best: Option<(usize, u64)> = None;
        let mut heaviest: Option<(usize, u64)> = None;
        for (i, &hash) in tier.hashes.iter().enumerate() {
            let w = weight(session, hash);
            if heaviest.is_none_or(|(_, h)| w > h) {
                heaviest = Some((i, w));
            }
            if best.is_some_and(|(_, b)| w <= b) {
                continue;
            }
            let token = &tier.tokens[i];
            if token.gate_open(now_ms) && eligible(token) && not_lost(token) {
                best = Some((i, w));
            }
        }
        top = heaviest;
        best.map(|(i, _)| &tier.tokens[i])
    });
    (picked, top.map(|(i, _)| &tier.tokens[i]))
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
            .map(|&tier| {
                let tokens: Vec<Arc<Token>> =
                    all.iter().filter(|t| t.tier() == tier).cloned().collect();
                TierTokens {
                    tier,
                    remaining: tokens
                        .iter()
                        .map(|t| AtomicU64::new(t.remaining_at(clock.now_millis())))
                        .collect(),
                    remaining_read_ms: AtomicU64::new(clock.now_millis()),
                    hashes: tokens.iter().map(|t| t.name_hash()).collect(),
                    tokens,
                    cursors: Default::default(),
                }
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
    /// token: in turn inside it, or by `[pool] strategy`. A token is
    /// available when its gate has passed and it has, or can get, an
    /// access token.
    pub fn select(&self, tried: &[&Arc<Token>]) -> Option<Selected<'_>> {
        self.select_for(tried, None)
    }

    /// [`Pool::select`] for a request of session `session` (the hash of
    /// its affinity header, [`session_key`]): the tier's available token
    /// that ranks highest for the session (rendezvous hashing), so that a
    /// session stays on its token while it is available, and a token
    /// coming or going moves only its own sessions.
    pub fn select_for(&self, tried: &[&Arc<Token>], session: Option<u64>) -> Option<Selected<'_>> {
        self.select_within(tried, session, None)
    }

    /// [`Pool::select_for`] among the tiers `tiers` only (a client's
    /// `tiers`; `None`: every tier). The tiers left out are as if they had
    /// no tokens: no fallback is counted from them.
    pub fn select_within(
        &self,
        tried: &[&Arc<Token>],
        session: Option<u64>,
        tiers: Option<&[Tier]>,
    ) -> Option<Selected<'_>> {
        let now = Instant::now();
        let now_ms = self.clock.millis(now);
        // While the refresh endpoint is backing off, a token without a valid
        // access token cannot get one.
        let refresh_blocked = self.refreshes && self.refresh_gate.load(Ordering::Relaxed) > now_ms;
        // Whether a token may be taken, its gate aside (`try_acquire`
        // reads it; the scans read it first).
        let eligible = |token: &Arc<Token>| {
            !tried.iter().any(|t| Arc::ptr_eq(t, token))
                && (!refresh_blocked || token.credentials().has_valid_access(now))
        };
        let mut first_tier: Option<Tier> = None;
        // The session's own token: the highest-ranked of the first tier
        // with tokens, available or not.
        let mut home: Option<&Arc<Token>> = None;
        for tier in &self.tiers {
            if tier.tokens.is_empty() || tiers.is_some_and(|allowed| !allowed.contains(&tier.tier))
            {
                continue;
            }
            let first = first_tier.is_none();
            first_tier.get_or_insert(tier.tier);
            let picked = match session {
                Some(key) => {
                    let (picked, top) = rendezvous(tier, key, &eligible, now_ms, &self.settings);
                    if first {
                        home = top;
                    }
                    picked
                }
                None => match self.settings.strategy {
                    Strategy::RoundRobin => round_robin(tier, &eligible, now_ms, &self.settings),
                    Strategy::MostRemaining => {
                        most_remaining(tier, &eligible, now_ms, &self.settings)
                    }
                },
            };
            if let Some(token) = picked {
                let fallback = first_tier
                    .filter(|&first| first != tier.tier)
                    .map(|first| (first, tier.tier));
                let affinity = match (session, home) {
                    (None, _) => Affinity::None,
                    (Some(_), Some(home)) if Arc::ptr_eq(home, token) => Affinity::Hit,
                    (Some(_), _) => Affinity::Moved,
                };
                return Some(Selected {
                    token,
                    fallback,
                    affinity,
                });
            }
        }
        None
    }

    /// How long until a token is expected back, for `Retry-After` when
    /// none is available: the earliest gate among tokens that come back by
    /// themselves, at least one second. `None` when none will.
    pub fn next_available_in(&self) -> Option<Duration> {
        self.next_available_within(None)
    }

    /// [`Pool::next_available_in`] among the tokens of `tiers` (a client's;
    /// `None`: every tier): a client is not told to come back for a token
    /// it may not use.
    pub fn next_available_within(&self, tiers: Option<&[Tier]>) -> Option<Duration> {
        let now_ms = self.clock.now_millis();
        let refresh_gate = if self.refreshes {
            self.refresh_gate.load(Ordering::Relaxed)
        } else {
            0
        };
        self.tokens
            .iter()
            .filter(|t| tiers.is_none_or(|allowed| allowed.contains(&t.tier())))
            .filter_map(|t| t.retry_due_ms(now_ms))
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
/// `/admin/pool` and `/poolz`.
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
