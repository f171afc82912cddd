//! The state machine of `docs/tokens.md` as plain data: [`Health`] holds
//! what decides whether a token serves (`active`, `cooling_down`,
//! `disabled`, `revoked`, why, until when, and the counters behind the
//! waits), and its methods are the transitions. They touch nothing but
//! the value: the gate, the dirty flags, the log and the metrics follow
//! from the difference between two [`Facts`], which the token's one
//! commit point reads (`Change` in `token.rs`).

use std::time::Duration;

use tokio::time::Instant;

use super::quota::QuotaInfo;
use super::{Outcome, Reason, TokenState, CLOSED};
use crate::pool::{Clock, PoolSettings};

/// A token's state machine, under the token's lock.
#[derive(Debug, Clone)]
pub(super) struct Health {
    pub state: TokenState,
    pub reason: Option<Reason>,
    /// A half-open trial of a disabled token is under way.
    pub trial: bool,
    pub consecutive_failures: u32,
    /// When a rest or the wait for the next trial ends.
    pub cooldown_until: Option<Instant>,
    /// Consecutive quota cooldowns: the next one lasts `quota_cooldown * 2^level`.
    pub quota_level: u32,
    /// Failed recovery trials: the next wait is `recovery_backoff * 2^level`.
    pub backoff_level: u32,
    /// Consecutive refresh-unavailable rests: 1 s doubling, capped at 10 s.
    pub refresh_level: u32,
    pub last_error: Option<String>,
    /// Wall-clock time (Unix ms) of the last change replicas share; 0
    /// before the first.
    pub stamp: u64,
    /// Stamp of the last operator's enable (0: none): a revocation stamped
    /// before it is void on every replica.
    pub enabled_at: u64,
    /// What is known of its quota besides the remaining count.
    pub quota: Option<QuotaInfo>,
    /// It rests because its count reached zero (not because the upstream
    /// refused a request): a report of quota left ends the rest.
    pub counted_out: bool,
}

/// What a transition is judged by: the fields the state file, other
/// replicas and the log care about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Facts {
    pub state: TokenState,
    pub reason: Option<Reason>,
    pub until: Option<Instant>,
    pub backoff_level: u32,
    pub quota_level: u32,
    pub failures: u32,
}

impl Facts {
    /// The part the state file records.
    pub fn persisted(&self) -> (TokenState, Option<Reason>, Option<Instant>, u32, u32) {
        (
            self.state,
            self.reason,
            self.until,
            self.backoff_level,
            self.quota_level,
        )
    }

    /// State and reason: what the log says when it changes.
    pub fn standing(&self) -> (TokenState, Option<Reason>) {
        (self.state, self.reason)
    }
}

impl Default for Health {
    fn default() -> Health {
        Health {
            state: TokenState::Active,
            reason: None,
            trial: false,
            consecutive_failures: 0,
            cooldown_until: None,
            quota_level: 0,
            backoff_level: 0,
            refresh_level: 0,
            last_error: None,
            stamp: 0,
            enabled_at: 0,
            quota: None,
            counted_out: false,
        }
    }
}

impl Health {
    pub fn facts(&self) -> Facts {
        Facts {
            state: self.state,
            reason: self.reason,
            until: self.cooldown_until,
            backoff_level: self.backoff_level,
            quota_level: self.quota_level,
            failures: self.consecutive_failures,
        }
    }

    /// The gate this state implies: the clock reading (ms) from which the
    /// token may be picked; 0 for active, [`CLOSED`] for what only an
    /// operator brings back.
    pub fn gate(&self, clock: &Clock) -> u64 {
        match self.state {
            TokenState::Active => 0,
            TokenState::Revoked => CLOSED,
            _ if self.is_manual() => CLOSED,
            // Never 0 while resting: the picker's fast path reads 0 as active.
            _ => self.cooldown_until.map_or(1, |u| clock.millis(u).max(1)),
        }
    }

    pub fn is_manual(&self) -> bool {
        self.state == TokenState::Disabled && self.reason == Some(Reason::Manual)
    }

    /// Whether a success would change nothing: an active token with no
    /// failure, quota level, error or trial to clear.
    pub fn success_is_noop(&self) -> bool {
        self.state == TokenState::Active
            && !self.trial
            && self.consecutive_failures == 0
            && self.quota_level == 0
            && self.last_error.is_none()
    }

    pub fn activate(&mut self) {
        self.state = TokenState::Active;
        self.reason = None;
        self.cooldown_until = None;
        self.counted_out = false;
    }

    /// Rests until `now + wait`, unless it is out for a stronger reason or
    /// a longer rest is already under way.
    pub fn cool(&mut self, reason: Reason, now: Instant, wait: Duration) {
        if self.state == TokenState::Revoked || self.is_manual() {
            return;
        }
        let until = now + wait;
        if self.state == TokenState::CoolingDown && self.cooldown_until.is_some_and(|u| u > until) {
            return;
        }
        self.state = TokenState::CoolingDown;
        self.reason = Some(reason);
        self.cooldown_until = Some(until);
    }

    fn disable(&mut self, reason: Reason, now: Instant, settings: &PoolSettings) {
        self.state = TokenState::Disabled;
        self.reason = Some(reason);
        self.cooldown_until = Some(now + settings.recovery_wait(self.backoff_level));
    }

    /// A disabled token's next trial may start now.
    fn retry_now(&mut self, now: Instant) {
        self.cooldown_until = Some(now);
    }

    /// Applies what happened on a request or refresh. Returns the time
    /// until which the remaining quota count reads zero, when the outcome
    /// says the quota ran out.
    pub fn apply(
        &mut self,
        outcome: Outcome,
        now: Instant,
        settings: &PoolSettings,
    ) -> Option<Instant> {
        let trial = std::mem::take(&mut self.trial);
        let mut counted_zero = None;
        match outcome {
            Outcome::Success => {
                self.consecutive_failures = 0;
                self.quota_level = 0;
                self.last_error = None;
                if self.state == TokenState::Disabled && !self.is_manual() {
                    self.backoff_level = 0;
                    self.activate();
                }
            }
            Outcome::Neutral => {
                if trial && self.state == TokenState::Disabled {
                    // The trial said nothing about the token: it may be tried again now.
                    self.retry_now(now);
                }
            }
            Outcome::Failure(reason) => {
                self.consecutive_failures = self.consecutive_failures.saturating_add(1);
                self.last_error = Some(reason.as_str().to_string());
                if self.state == TokenState::Revoked || self.is_manual() {
                    // Already out for a stronger reason.
                } else if trial && self.state == TokenState::Disabled {
                    self.backoff_level = self.backoff_level.saturating_add(1);
                    self.disable(reason, now, settings);
                } else if self.consecutive_failures >= settings.failure_threshold {
                    self.backoff_level = 0;
                    self.disable(reason, now, settings);
                }
            }
            Outcome::RateLimited(retry_after) => {
                let wait = retry_after
                    .unwrap_or(settings.cooldown)
                    .min(settings.max_cooldown);
                self.last_error = Some(Reason::RateLimited.as_str().to_string());
                self.cool(Reason::RateLimited, now, wait);
            }
            Outcome::QuotaExhausted => {
                // Until the refill when it is known, and at least the
                // doubling guess: a refill time read from answer headers
                // may be a per-minute window's, not the quota's.
                let guess = settings.quota_wait(self.quota_level);
                let wait = self
                    .quota
                    .and_then(|q| q.refill_in())
                    .map_or(guess, |refill| refill.max(guess));
                counted_zero = Some(now + wait);
                self.counted_out = false;
                self.quota_level = self.quota_level.saturating_add(1);
                self.last_error = Some(Reason::QuotaExhausted.as_str().to_string());
                self.cool(Reason::QuotaExhausted, now, wait);
            }
            Outcome::Revoked => {
                self.state = TokenState::Revoked;
                self.reason = Some(Reason::Revoked);
                self.cooldown_until = None;
                self.last_error = Some("refresh token rejected".to_string());
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
                if matches!(self.state, TokenState::Active | TokenState::CoolingDown) {
                    // Waiting for the cluster costs the upstream nothing:
                    // look again every second, so a token serves again as
                    // soon as the cluster can vouch for it.
                    let wait = if reason == Reason::ClusterUnavailable {
                        Duration::from_secs(1)
                    } else {
                        refresh_rest(self.refresh_level)
                    };
                    self.refresh_level = self.refresh_level.saturating_add(1);
                    self.last_error = Some(error.to_string());
                    self.cool(reason, now, wait);
                } else if trial && self.state == TokenState::Disabled {
                    self.retry_now(now);
                }
            }
        }
        counted_zero
    }

    /// Takes the token for one request at `now`, its gate having passed:
    /// an ended rest becomes active; a disabled token is taken for one
    /// half-open trial, and the next one is due only after another wait
    /// (if this trial's outcome never arrives, say the client went away).
    /// Returns whether it was taken.
    pub fn pick(&mut self, now: Instant, settings: &PoolSettings) -> bool {
        match self.state {
            TokenState::Active => true,
            TokenState::CoolingDown => {
                self.activate();
                true
            }
            TokenState::Disabled if self.is_manual() => false,
            TokenState::Disabled => {
                self.trial = true;
                self.cooldown_until = Some(now + settings.recovery_wait(self.backoff_level));
                true
            }
            TokenState::Revoked => false,
        }
    }

    /// An operator's enable: back in rotation, every count cleared.
    pub fn enable(&mut self) {
        self.consecutive_failures = 0;
        self.quota_level = 0;
        self.backoff_level = 0;
        self.refresh_level = 0;
        self.trial = false;
        self.last_error = None;
        self.activate();
    }

    /// An operator's disable: out until enabled.
    pub fn disable_manually(&mut self) {
        self.state = TokenState::Disabled;
        self.reason = Some(Reason::Manual);
        self.trial = false;
        self.cooldown_until = None;
    }

    /// A new access token arrived: a rest for want of one ends.
    pub fn refreshed(&mut self) {
        self.refresh_level = 0;
        if self.state == TokenState::CoolingDown && self.reason == Some(Reason::RefreshFailed) {
            self.activate();
        }
    }

    /// Rests until the quota refills, if the refill time is known (the
    /// count reached zero). Returns whether it rests for that now.
    pub fn rest_for_quota(&mut self, now: Instant) -> bool {
        let Some(wait) = self.quota.and_then(|q| q.refill_in()) else {
            return false;
        };
        let before = self.facts();
        self.last_error = Some(Reason::QuotaExhausted.as_str().to_string());
        self.cool(Reason::QuotaExhausted, now, wait);
        if self.facts() != before {
            self.counted_out = true;
        }
        true
    }

    /// Quota is left: a rest that the count alone decided ends.
    pub fn quota_left(&mut self) {
        if self.counted_out
            && self.state == TokenState::CoolingDown
            && self.reason == Some(Reason::QuotaExhausted)
        {
            self.activate();
        }
    }
}

/// Rest after the refresh endpoint was unavailable: 1 s doubling, capped at
/// 10 s, so the pool serves again within seconds of the endpoint's return.
fn refresh_rest(level: u32) -> Duration {
    Duration::from_secs(1u64 << level.min(4)).min(Duration::from_secs(10))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pool::token::testing::settings;

    #[test]
    fn the_gate_follows_the_state() {
        let clock = Clock::new();
        let now = Instant::now();
        let mut h = Health::default();
        assert_eq!(h.gate(&clock), 0);
        h.apply(Outcome::RateLimited(None), now, &settings());
        assert_eq!(h.gate(&clock), clock.millis(now + settings().cooldown));
        h.disable_manually();
        assert_eq!(h.gate(&clock), CLOSED);
        h.enable();
        assert_eq!(h.gate(&clock), 0);
        h.apply(Outcome::Revoked, now, &settings());
        assert_eq!(h.gate(&clock), CLOSED);
        // A rest with no end known still never reads as the fast path's 0.
        h.state = TokenState::CoolingDown;
        h.reason = Some(Reason::RateLimited);
        h.cooldown_until = None;
        assert_eq!(h.gate(&clock), 1);
    }

    #[test]
    fn a_manual_disable_holds_against_failures_and_rests() {
        let now = Instant::now();
        let mut h = Health::default();
        h.disable_manually();
        for outcome in [
            Outcome::Failure(Reason::Forbidden),
            Outcome::RateLimited(Some(Duration::from_secs(5))),
            Outcome::QuotaExhausted,
            Outcome::RefreshUnavailable,
        ] {
            h.apply(outcome, now, &settings());
            assert!(h.is_manual(), "{outcome:?}");
        }
        assert!(!h.pick(now, &settings()));
    }
}
