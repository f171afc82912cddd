//! A token's request quota, as the upstream tells it (answer headers, or a
//! quota endpoint polled): how many requests are left, out of how many,
//! and when it refills. A token with none left rests until the refill
//! instead of spending a request on a 429 to learn it.
//!
//! The remaining count is one atomic ([`Count`]), read by `most_remaining`
//! selection and counted down by each request sent (the next report
//! corrects it); it is trusted until the refill, or for [`COUNT_TRUST`]
//! when no refill time is known. The rest ([`QuotaInfo`]) is part of the
//! token's health, under its lock.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use super::{Origin, Token};
use crate::pool::Clock;

/// The `remaining` atomic's value when the count is not known (or there is
/// no limit): counts as full.
pub(super) const UNKNOWN: u64 = u64::MAX;

/// The longest rest a refill time may ask for. Quotas refill monthly at
/// most; a reset further away is taken for a broken value and ignored.
pub const MAX_QUOTA_REST: Duration = Duration::from_secs(40 * 24 * 3600);

/// How long a count reported without a refill time is trusted; after
/// that it counts as full again until the next report.
pub const COUNT_TRUST: Duration = Duration::from_secs(10 * 60);

/// How long a rest decided by the token's own count waits for the poll
/// that confirms it before clients are told the refill time.
const CONFIRM_WINDOW: Duration = Duration::from_secs(10);

/// What is known of a token's request quota.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Quota {
    /// Requests allowed per period.
    pub limit: Option<u64>,
    /// Requests left in this period.
    pub remaining: Option<u64>,
    /// When the quota refills.
    pub resets_at: Option<SystemTime>,
    /// There is no limit.
    pub unlimited: bool,
}

/// The part of [`Quota`] kept under the token's lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(super) struct QuotaInfo {
    limit: Option<u64>,
    resets_at: Option<SystemTime>,
    unlimited: bool,
}

/// How long until `at`, if it is in the future and within
/// [`MAX_QUOTA_REST`].
fn rest_until(at: SystemTime) -> Option<Duration> {
    at.duration_since(SystemTime::now())
        .ok()
        .filter(|d| !d.is_zero() && *d <= MAX_QUOTA_REST)
}

impl QuotaInfo {
    /// How long until the quota refills, if that is known and sane.
    pub(super) fn refill_in(&self) -> Option<Duration> {
        self.resets_at.and_then(rest_until)
    }
}

/// The lock-free part of a token's quota: the remaining count and the
/// quota poller's flags (the count and its trust first: selection reads
/// them together).
#[derive(Debug)]
#[repr(C)]
pub(super) struct Count {
    /// Requests left ([`UNKNOWN`]: not known, or no limit).
    remaining: AtomicU64,
    /// Clock reading (ms) from which `remaining` reads as unknown: the
    /// refill, or a while after a report without one.
    until: AtomicU64,
    /// Clock reading (ms) until which a rest its own count decided awaits
    /// the poll that confirms it (0: none): till then a client is told to
    /// retry soon, not at the refill.
    confirming: AtomicU64,
    /// The quota poller should look at it soon.
    poll: AtomicBool,
}

impl Default for Count {
    fn default() -> Count {
        Count {
            remaining: AtomicU64::new(UNKNOWN),
            until: AtomicU64::new(0),
            poll: AtomicBool::new(false),
            confirming: AtomicU64::new(0),
        }
    }
}

impl Count {
    /// Sets the remaining count, trusted until `until`.
    pub(super) fn set(&self, remaining: u64, clock: &Clock, until: Instant) {
        self.until.store(clock.millis(until), Ordering::Relaxed);
        self.remaining.store(remaining, Ordering::Relaxed);
    }

    /// The count at clock reading `now_ms`: unknown once no longer trusted.
    fn at(&self, now_ms: u64) -> u64 {
        match self.remaining.load(Ordering::Relaxed) {
            UNKNOWN => UNKNOWN,
            _ if self.until.load(Ordering::Relaxed) <= now_ms => UNKNOWN,
            n => n,
        }
    }

    /// A count at zero is unknown again (a rest ended, or an operator
    /// enabled the token: refilled, or to be learned anew).
    pub(super) fn forget_zero(&self) {
        let _ = self
            .remaining
            .compare_exchange(0, UNKNOWN, Ordering::Relaxed, Ordering::Relaxed);
    }

    /// Clock reading (ms) until which a rest awaits its confirming poll.
    pub(super) fn confirming_until(&self) -> u64 {
        self.confirming.load(Ordering::Relaxed)
    }
}

impl Token {
    /// What is known of its quota; `None` if nothing was ever learned. A
    /// refill time that has passed reads as an unknown count.
    pub fn quota(&self) -> Option<Quota> {
        let info = self.read().quota?;
        let refilled = info.resets_at.is_some_and(|r| r <= SystemTime::now());
        let remaining = match self.remaining_at(self.clock.now_millis()) {
            UNKNOWN => None,
            _ if refilled => None,
            n => Some(n),
        };
        Some(Quota {
            limit: info.limit,
            remaining,
            resets_at: info.resets_at.filter(|_| !refilled),
            unlimited: info.unlimited,
        })
    }

    /// The remaining count selection compares at clock reading `now_ms`:
    /// unknown, unlimited, refilled or no longer trusted counts as full.
    pub fn remaining_at(&self, now_ms: u64) -> u64 {
        self.count.at(now_ms)
    }

    /// Takes what the upstream said of the quota. At none left with a
    /// refill time, the token rests until then (`quota_exhausted`); quota
    /// left ends a rest that the count alone decided.
    pub fn learn_quota(&self, quota: Quota) {
        let remaining = if quota.unlimited {
            UNKNOWN
        } else {
            quota.remaining.unwrap_or(UNKNOWN)
        };
        let mut health = self.change(Origin::Here);
        // A report answers any confirmation awaited.
        self.count.confirming.store(0, Ordering::Relaxed);
        let info = QuotaInfo {
            limit: quota.limit.filter(|_| !quota.unlimited),
            resets_at: quota.resets_at.filter(|_| !quota.unlimited),
            unlimited: quota.unlimited,
        };
        // A partial report (headers with no limit, say) keeps what is known.
        let merged = match health.quota {
            Some(old) if !quota.unlimited => QuotaInfo {
                limit: info.limit.or(old.limit),
                resets_at: info.resets_at.or(old.resets_at),
                unlimited: false,
            },
            _ => info,
        };
        health.quota = Some(merged);
        // Under the lock, so that reports taken in turn leave the count
        // and the rest agreeing.
        let now = Instant::now();
        let trust = merged.refill_in().unwrap_or(COUNT_TRUST);
        self.count.set(remaining, &self.clock, now + trust);
        if remaining == 0 {
            health.rest_for_quota(now);
        } else {
            health.quota_left();
        }
    }

    /// Counts one request sent against the known remaining count (the
    /// next report corrects it); at zero with a refill time, the token
    /// rests, and the quota poller is asked to confirm.
    pub fn spend_quota(&self) {
        let spent = self
            .count
            .remaining
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| match n {
                UNKNOWN | 0 => None,
                n => Some(n - 1),
            });
        if spent == Ok(1) {
            let now = Instant::now();
            let rested = self.change(Origin::Here).rest_for_quota(now);
            if rested {
                self.count
                    .confirming
                    .store(self.clock.millis(now + CONFIRM_WINDOW), Ordering::Relaxed);
                self.want_quota_poll();
            }
        }
    }

    /// Asks the quota poller to look at this token soon (after a refresh,
    /// or a quota 429).
    pub fn want_quota_poll(&self) {
        self.count.poll.store(true, Ordering::Release);
    }

    /// Whether a poll was asked for since the last call.
    pub fn take_quota_poll(&self) -> bool {
        self.count.poll.swap(false, Ordering::AcqRel)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pool::token::testing::{settings, token};
    use crate::pool::token::{Reason, TokenState};
    use crate::pool::Outcome;

    #[tokio::test(start_paused = true)]
    async fn none_left_rests_until_the_refill_without_a_request() {
        let t = token("q");
        let refill = SystemTime::now() + Duration::from_secs(7 * 24 * 3600);
        t.learn_quota(Quota {
            limit: Some(150),
            remaining: Some(2),
            resets_at: Some(refill),
            unlimited: false,
        });
        assert_eq!(t.remaining_at(t.clock.now_millis()), 2);
        t.spend_quota();
        assert_eq!(t.snapshot().state, TokenState::Active);
        t.spend_quota();
        let s = t.snapshot();
        assert_eq!(
            (s.state, s.reason),
            (TokenState::CoolingDown, Some(Reason::QuotaExhausted))
        );
        let back = s.cooldown_until.unwrap();
        assert!(back.duration_since(refill).unwrap_or_default() < Duration::from_secs(2));
        assert!(refill.duration_since(back).unwrap_or_default() < Duration::from_secs(2));
        // Nothing more to count down.
        t.spend_quota();
        assert_eq!(t.quota().unwrap().remaining, Some(0));
    }

    #[tokio::test(start_paused = true)]
    async fn a_quota_429_with_a_known_refill_rests_until_it() {
        let t = token("q");
        let refill = SystemTime::now() + Duration::from_secs(3 * 24 * 3600);
        t.learn_quota(Quota {
            limit: Some(150),
            remaining: Some(40),
            resets_at: Some(refill),
            unlimited: false,
        });
        t.report(Outcome::QuotaExhausted, &settings());
        let back = t.snapshot().cooldown_until.unwrap();
        // Not the 10-minute guess: the refill, three days away.
        assert!(back > SystemTime::now() + Duration::from_secs(2 * 24 * 3600));
        assert_eq!(t.quota().unwrap().remaining, Some(0));
    }

    #[tokio::test(start_paused = true)]
    async fn quota_left_ends_a_rest_the_count_decided_but_not_a_refusal() {
        let refill = SystemTime::now() + Duration::from_secs(3 * 24 * 3600);
        let report = |n| Quota {
            limit: Some(150),
            remaining: Some(n),
            resets_at: Some(refill),
            unlimited: false,
        };
        // Counted down to zero here: rests, and asks the poller to confirm.
        let t = token("q");
        t.learn_quota(report(1));
        t.spend_quota();
        assert_eq!(t.snapshot().state, TokenState::CoolingDown);
        assert!(t.take_quota_poll(), "a poll is asked for");
        // Until the poll answers, a client is told to come back soon.
        let now_ms = t.clock.now_millis();
        let due = t.retry_due_ms(now_ms).unwrap();
        assert!(due > now_ms && due <= now_ms + 10_000, "{due} vs {now_ms}");
        // The upstream says some are left: back at once.
        t.learn_quota(report(4));
        assert_eq!(t.snapshot().state, TokenState::Active);
        assert_eq!(t.quota().unwrap().remaining, Some(4));
        // Refused by the upstream: a report of quota left does not undo it.
        t.report(Outcome::QuotaExhausted, &settings());
        t.learn_quota(report(4));
        assert_eq!(t.snapshot().state, TokenState::CoolingDown);

        // A poll that confirms zero: the refill is when to come back.
        let t = token("z");
        t.learn_quota(report(1));
        t.spend_quota();
        t.learn_quota(report(0));
        let now_ms = t.clock.now_millis();
        assert!(t.retry_due_ms(now_ms).unwrap() > now_ms + 2 * 24 * 3600 * 1000);
    }

    #[tokio::test(start_paused = true)]
    async fn a_quota_429_rests_at_least_the_guess_when_the_refill_is_near() {
        // Answer headers often carry a per-minute window's reset: a quota
        // refusal must not come back in seconds.
        let t = token("q");
        t.learn_quota(Quota {
            remaining: Some(30),
            resets_at: Some(SystemTime::now() + Duration::from_secs(20)),
            ..Quota::default()
        });
        t.report(Outcome::QuotaExhausted, &settings());
        let back = t.snapshot().cooldown_until.unwrap();
        assert!(back > SystemTime::now() + Duration::from_secs(590));
        // When the rest ends the count is unknown again, and the token is
        // taken.
        tokio::time::advance(Duration::from_secs(601)).await;
        assert!(t.try_acquire(t.clock.now_millis(), &settings()));
        assert_eq!(t.remaining_at(t.clock.now_millis()), UNKNOWN);
    }

    #[tokio::test(start_paused = true)]
    async fn refills_in_the_past_or_years_away_are_ignored() {
        for resets_at in [
            SystemTime::now() - Duration::from_secs(60),
            SystemTime::now() + Duration::from_secs(3 * 365 * 24 * 3600),
        ] {
            let t = token("q");
            t.learn_quota(Quota {
                limit: Some(10),
                remaining: Some(0),
                resets_at: Some(resets_at),
                unlimited: false,
            });
            assert_eq!(t.snapshot().state, TokenState::Active, "{resets_at:?}");
            t.report(Outcome::QuotaExhausted, &settings());
            let back = t.snapshot().cooldown_until.unwrap();
            assert!(
                back < SystemTime::now() + Duration::from_secs(601),
                "the guess"
            );
        }
    }

    #[test]
    fn unlimited_and_partial_reports() {
        let t = token("q");
        t.learn_quota(Quota {
            limit: Some(100),
            remaining: Some(50),
            resets_at: None,
            unlimited: false,
        });
        // Headers that say only what is left keep the known limit.
        t.learn_quota(Quota {
            remaining: Some(49),
            ..Quota::default()
        });
        let q = t.quota().unwrap();
        assert_eq!((q.limit, q.remaining), (Some(100), Some(49)));
        t.learn_quota(Quota {
            unlimited: true,
            ..Quota::default()
        });
        let q = t.quota().unwrap();
        assert!(q.unlimited);
        assert_eq!((q.limit, q.remaining), (None, None));
        assert_eq!(t.remaining_at(t.clock.now_millis()), UNKNOWN);
    }
}
