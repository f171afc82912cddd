//! The words of the token state machine: the states a token is in
//! ([`TokenState`]), why it left `active` ([`Reason`]), and what happened
//! when it was used ([`Outcome`], the proxy's and the refresher's report).
//! The pool never sees HTTP: callers translate answers into these.

use std::time::Duration;

use serde::{Deserialize, Serialize};

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
