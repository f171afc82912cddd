//! A token's request quota, as the upstream tells it (answer headers, or a
//! quota endpoint polled): how many requests are left, out of how many,
//! and when it refills. A token with none left rests until the refill
//! instead of spending a request on a 429 to learn it.
//!
//! The remaining count is one atomic, read by `most_remaining` selection
//! and counted down by each answered request (the next report corrects
//! it); the rest is under the token's lock.

use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use super::{Inner, Reason, Token, TokenState};

/// The `remaining` atomic's value when the count is not known (or there is
/// no limit): counts as full.
pub(super) const UNKNOWN: u64 = u64::MAX;

/// The longest rest a refill time may ask for. Quotas refill monthly at
/// most; a reset further away is taken for a broken value and ignored.
pub const MAX_QUOTA_REST: Duration = Duration::from_secs(40 * 24 * 3600);

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

impl Token {
    /// What is known of its quota; `None` if nothing was ever learned. A
    /// refill time that has passed reads as an unknown count.
    pub fn quota(&self) -> Option<Quota> {
        let info = self.lock().quota?;
        let refilled = info.resets_at.is_some_and(|r| r <= SystemTime::now());
        let remaining = match self.remaining.load(Ordering::Relaxed) {
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

    /// The remaining count selection compares: unknown, unlimited or
    /// refilled counts as full.
    pub fn remaining_for_selection(&self) -> u64 {
        self.remaining.load(Ordering::Relaxed)
    }

    /// Takes what the upstream said of the quota. At none left with a
    /// refill time, the token rests until then (`quota_exhausted`).
    pub fn learn_quota(&self, quota: Quota) {
        let remaining = if quota.unlimited {
            UNKNOWN
        } else {
            quota.remaining.unwrap_or(UNKNOWN)
        };
        self.remaining.store(remaining, Ordering::Relaxed);
        let mut inner = self.lock();
        let info = QuotaInfo {
            limit: quota.limit.filter(|_| !quota.unlimited),
            resets_at: quota.resets_at.filter(|_| !quota.unlimited),
            unlimited: quota.unlimited,
        };
        // A partial report (headers with no limit, say) keeps what is known.
        let merged = match inner.quota {
            Some(old) if !quota.unlimited => QuotaInfo {
                limit: info.limit.or(old.limit),
                resets_at: info.resets_at.or(old.resets_at),
                unlimited: false,
            },
            _ => info,
        };
        inner.quota = Some(merged);
        if remaining == 0 {
            self.rest_for_quota(&mut inner);
        }
    }

    /// Counts one request the upstream answered (2xx) against the known
    /// remaining count; at zero with a refill time, the token rests.
    pub fn spend_quota(&self) {
        let spent =
            self.remaining
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| match n {
                    UNKNOWN | 0 => None,
                    n => Some(n - 1),
                });
        if spent == Ok(1) {
            let mut inner = self.lock();
            self.rest_for_quota(&mut inner);
        }
    }

    /// Rests the token until its quota refills, if the refill time is
    /// known; returns whether it did.
    pub(super) fn rest_for_quota(&self, inner: &mut super::InnerGuard<'_>) -> bool {
        let Some(wait) = inner.quota.and_then(|q| q.refill_in()) else {
            return false;
        };
        let before = (inner.state, inner.reason, inner.cooldown_until);
        inner.last_error = Some(Reason::QuotaExhausted.as_str().to_string());
        self.cool(inner, Reason::QuotaExhausted, Instant::now(), wait);
        let after = (inner.state, inner.reason, inner.cooldown_until);
        if after != before {
            self.dirty.store(true, Ordering::Release);
            self.mark_shared(inner, false);
            let until = inner.cooldown_until;
            self.log_change((before.0, before.1), (after.0, after.1), until);
        }
        true
    }

    /// After a rest for quota ends, the count is unknown again (refilled).
    pub(super) fn quota_refilled(&self, inner: &Inner) {
        if inner.reason == Some(Reason::QuotaExhausted) && inner.state == TokenState::CoolingDown {
            self.remaining.store(UNKNOWN, Ordering::Relaxed);
        }
    }

    /// Asks the quota poller to look at this token soon (after a refresh,
    /// or a quota 429).
    pub fn want_quota_poll(&self) {
        self.quota_poll.store(true, Ordering::Release);
    }

    /// Whether a poll was asked for since the last call.
    pub fn take_quota_poll(&self) -> bool {
        self.quota_poll.swap(false, Ordering::AcqRel)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pool::token::testing::{settings, token};
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
        assert_eq!(t.remaining_for_selection(), 2);
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
        assert_eq!(t.remaining_for_selection(), UNKNOWN);
    }
}
