//! What replicas share of a token (cluster mode): its state as a
//! [`ReplicaState`] stamped with the time of the change, the rule by which
//! a change made elsewhere is taken ([`accepts`]), and taking a refresh or
//! access token another replica obtained.
//!
//! The pool knows nothing of Redis: the cluster module moves these values.

use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use super::{Origin, Reason, Token, TokenState, MAX_RESTORED_REST};
use crate::config::Secret;

/// How a shared change is ordered against another.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stamp {
    /// Wall-clock time of the change, Unix ms (0: no change yet).
    pub at: u64,
    /// The change revoked the token.
    pub revoked: bool,
    /// Stamp of the last operator's enable known with it (0: none).
    pub enabled_at: u64,
}

/// Whether a change stamped `remote` replaces the state stamped `local`.
///
/// The newer change wins, except that `revoked` is sticky: a revocation
/// holds until an operator's enable stamped after it (and an older
/// revocation still wins over a newer change that is not such an enable:
/// the refresh token is dead, whatever happened to the token since). A
/// revocation stamped before an enable either side knows of is void. The
/// cluster's Redis script applies the same rule to what it stores.
pub fn accepts(local: Stamp, remote: Stamp) -> bool {
    let enabled_at = local.enabled_at.max(remote.enabled_at);
    let local_revoked = local.revoked && local.at > enabled_at;
    let remote_revoked = remote.revoked && remote.at > enabled_at;
    if remote.revoked && !remote_revoked {
        // A void revocation is not a change at all.
        return false;
    }
    if remote.at > local.at {
        !local_revoked || remote_revoked
    } else {
        remote_revoked && !local_revoked
    }
}

/// A token's state as replicas share it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaState {
    /// Its state.
    pub state: TokenState,
    /// Why it is not active.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<Reason>,
    /// When its cooldown or recovery wait ends, Unix ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until: Option<u64>,
    /// Consecutive token-fault failures.
    #[serde(default)]
    pub failures: u32,
    /// Failed recovery trials.
    #[serde(default)]
    pub backoff_level: u32,
    /// Consecutive quota cooldowns.
    #[serde(default)]
    pub quota_level: u32,
    /// Fingerprint of the refresh token in use when the change was made:
    /// a revocation is of that refresh token, and of no later one.
    pub refresh_fp: String,
    /// When and what kind of change it was (kept beside the value in
    /// Redis, where the merge script reads it).
    #[serde(skip)]
    pub stamp: Stamp,
}

/// The short fingerprint (16 hex digits of SHA-256) that names a refresh
/// token in shared records without revealing it.
pub fn short_fingerprint(secret: &Secret) -> String {
    let mut fp = secret.fingerprint();
    fp.truncate(16);
    fp
}

/// Milliseconds since the Unix epoch (0 before it): how replicas write times.
pub fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Token {
    /// Whether a change other replicas should learn happened since the
    /// last call.
    pub fn take_replica_dirty(&self) -> bool {
        self.replica_dirty.swap(false, Ordering::AcqRel)
    }

    /// Marks the token's state as not yet shared (a write that failed).
    pub fn mark_replica_dirty(&self) {
        self.replica_dirty.store(true, Ordering::Release);
    }

    /// Its state as replicas share it.
    pub fn replica_state(&self) -> ReplicaState {
        let health = self.read();
        // Read with the health lock held: the pair is one token's.
        let refresh_fp = self.credentials.refresh_fingerprint();
        let now = Instant::now();
        let now_wall = SystemTime::now();
        let until = health.cooldown_until.map(|u| {
            if u >= now {
                unix_ms(now_wall + (u - now))
            } else {
                unix_ms(now_wall).saturating_sub((now - u).as_millis() as u64)
            }
        });
        ReplicaState {
            state: health.state,
            reason: health.reason,
            until,
            failures: health.consecutive_failures,
            backoff_level: health.backoff_level,
            quota_level: health.quota_level,
            refresh_fp,
            stamp: Stamp {
                at: health.stamp,
                revoked: health.state == TokenState::Revoked,
                enabled_at: health.enabled_at,
            },
        }
    }

    /// Takes a change made on replica `node`, if [`accepts`] says so and,
    /// for a revocation, it is of the refresh token this replica uses.
    /// Returns whether it was taken.
    pub fn apply_replica(&self, remote: &ReplicaState, node: &str) -> bool {
        let mut health = self.change(Origin::Replica(node));
        // Read with the health lock held (health, then credentials: the one
        // order both are taken in), so that a newer refresh token adopted
        // meanwhile is the one a revocation is checked against.
        let refresh_fp = self.credentials.refresh_fingerprint();
        let local = Stamp {
            at: health.stamp,
            revoked: health.state == TokenState::Revoked,
            enabled_at: health.enabled_at,
        };
        if !accepts(local, remote.stamp) {
            return false;
        }
        if remote.state == TokenState::Revoked && remote.refresh_fp != refresh_fp {
            // It revoked a refresh token this replica has replaced since.
            return false;
        }
        let now = Instant::now();
        let now_wall = SystemTime::now();
        let until = remote.until.map(|ms| {
            let at = UNIX_EPOCH + Duration::from_millis(ms);
            match at.duration_since(now_wall) {
                // Another replica's record may say anything: never a rest
                // longer than a state file may ask for.
                Ok(ahead) => now + ahead.min(MAX_RESTORED_REST),
                Err(behind) => now.checked_sub(behind.duration()).unwrap_or(now),
            }
        });
        health.state = remote.state;
        health.reason = remote.reason;
        health.cooldown_until = match (remote.state, remote.reason) {
            (TokenState::Active | TokenState::Revoked, _) => None,
            (TokenState::Disabled, Some(Reason::Manual)) => None,
            // A rest with no end given may end now.
            _ => Some(until.unwrap_or(now)),
        };
        health.consecutive_failures = remote.failures;
        health.backoff_level = remote.backoff_level;
        health.quota_level = remote.quota_level;
        health.trial = false;
        health.stamp = remote.stamp.at;
        if remote.stamp.enabled_at > health.enabled_at {
            health.enabled_at = remote.stamp.enabled_at;
            health.refresh_level = 0;
        }
        health.last_error = match (remote.state, remote.reason) {
            (_, Some(Reason::Manual)) => health.last_error.take(),
            (TokenState::Active, _) if remote.failures == 0 => None,
            (_, Some(reason)) => Some(reason.as_str().to_string()),
            (_, None) => health.last_error.take(),
        };
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pool::token::testing::{settings, token};
    use crate::pool::token::AccessToken;
    use crate::pool::Outcome;

    fn stamp(at: u64, revoked: bool, enabled_at: u64) -> Stamp {
        Stamp {
            at,
            revoked,
            enabled_at,
        }
    }

    /// The cases the merge rule decides (`tests/it/cluster.rs` checks that
    /// the Redis script decides every combination alike).
    fn merge_cases() -> Vec<(Stamp, Stamp, bool)> {
        let plain = |at| stamp(at, false, 0);
        let revoked = |at| stamp(at, true, 0);
        let enable = |at| stamp(at, false, at);
        vec![
            (plain(1), plain(2), true),
            (plain(2), plain(1), false),
            (plain(2), plain(2), false),
            (plain(0), revoked(5), true),
            // An older revocation still wins over a newer plain change...
            (plain(9), revoked(5), true),
            // ...but not over a newer enable.
            (enable(9), revoked(5), false),
            // A newer plain change does not lift a revocation; an enable does.
            (revoked(5), plain(9), false),
            (revoked(5), enable(9), true),
            (revoked(5), enable(3), false),
            (revoked(5), revoked(9), true),
            (revoked(9), revoked(5), false),
            // An enable stays in force through later changes: a revocation
            // from before it comes back from nowhere.
            (stamp(12, false, 10), revoked(5), false),
            // A revocation after the enable holds.
            (stamp(12, false, 10), stamp(15, true, 0), true),
            (stamp(15, true, 10), stamp(20, false, 10), false),
        ]
    }

    #[test]
    fn the_newer_change_wins_and_revoked_is_sticky() {
        for (local, remote, taken) in merge_cases() {
            assert_eq!(accepts(local, remote), taken, "{local:?} <- {remote:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn only_changes_are_shared_and_a_change_travels_whole() {
        let a = token("alice");
        let s = settings();
        a.report(Outcome::Success, &s);
        assert!(
            !a.take_replica_dirty(),
            "a success on a healthy token is no change"
        );
        a.report(Outcome::QuotaExhausted, &s);
        assert!(a.take_replica_dirty());
        let shared = a.replica_state();
        assert_eq!(shared.state, TokenState::CoolingDown);
        assert_eq!(shared.reason, Some(Reason::QuotaExhausted));
        assert!(shared.stamp.at > 0);

        // Another replica's copy of the same token takes it, and is out
        // of rotation until the same time.
        let b = token("alice");
        assert!(b.apply_replica(&shared, "a"));
        assert!(!b.take_replica_dirty(), "a change taken is not sent back");
        let now_ms = b.clock.now_millis();
        assert!(!b.try_acquire(now_ms, &s));
        assert_eq!(b.replica_state().until, shared.until);
        // Taken once only.
        assert!(!b.apply_replica(&shared, "a"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_revocation_holds_until_an_enable_and_only_for_its_refresh_token() {
        let s = settings();
        let a = token("alice");
        a.report(Outcome::Revoked, &s);
        let revoked = a.replica_state();
        let b = token("alice");
        b.report(Outcome::Failure(Reason::Forbidden), &s);
        let newer_failure = b.replica_state();
        assert!(b.apply_replica(&revoked, "a"), "an older revocation wins");
        assert!(b.is_out_for_good());
        assert!(!b.apply_replica(&newer_failure, "b"));

        // An operator's enable on a third replica lifts it everywhere.
        let c = token("alice");
        c.apply_replica(&revoked, "a");
        // Stamped after the revocation it lifts, whatever the wall clock says.
        c.enable();
        let enabled = c.replica_state();
        assert_eq!(enabled.stamp.enabled_at, enabled.stamp.at);
        assert!(b.apply_replica(&enabled, "c"));
        assert!(!b.is_out_for_good());

        // A revocation of a refresh token another replica has replaced
        // means nothing, and a newer refresh token lifts one seen here.
        let d = token("alice");
        d.adopt_refresh_token(Secret::new("rt-alice-2"), 1, false);
        assert!(!d.apply_replica(&revoked, "a"));
        let e = token("alice");
        e.report(Outcome::Revoked, &s);
        assert!(e.adopt_refresh_token(Secret::new("rt-alice-2"), 1, false));
        assert!(!e.is_out_for_good());
        assert!(!e.adopt_refresh_token(Secret::new("rt-alice-2"), 1, false));
    }

    #[test]
    fn the_refresh_token_with_more_rotations_wins() {
        let a = token("alice");
        a.credentials().rotate(Secret::new("rt-alice-2"));
        a.credentials().rotate(Secret::new("rt-alice-3"));
        assert_eq!(a.credentials().rotation(), 2);
        // An older one from another replica is not taken...
        assert!(!a.adopt_refresh_token(Secret::new("rt-alice-2"), 1, false));
        // ...a rival of the same age only when it won in Redis...
        assert!(!a.adopt_refresh_token(Secret::new("rt-alice-x"), 2, false));
        assert!(a.adopt_refresh_token(Secret::new("rt-alice-x"), 2, true));
        // ...a newer one always.
        assert!(a.adopt_refresh_token(Secret::new("rt-alice-4"), 3, false));
        assert_eq!(a.credentials().refresh_token(), Secret::new("rt-alice-4"));
        assert_eq!(
            a.credentials().rotated_refresh_token(),
            Some(Secret::new("rt-alice-4"))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_access_token_is_taken_only_if_it_outlives_the_one_held() {
        let a = token("alice");
        let later = SystemTime::now() + Duration::from_secs(3600);
        let sooner = SystemTime::now() + Duration::from_secs(60);
        assert!(a.adopt_access(AccessToken::until(
            "jwt-1",
            later,
            Duration::from_secs(3600)
        )));
        assert!(!a.adopt_access(AccessToken::until(
            "jwt-0",
            sooner,
            Duration::from_secs(3600)
        )));
        assert!(!a.adopt_access(AccessToken::until(
            "jwt-1",
            later,
            Duration::from_secs(3600)
        )));
        let held = a.credentials().valid_access(Instant::now()).unwrap();
        assert_eq!(held.authorization().unwrap(), "Bearer jwt-1");
        assert_eq!(held.lifetime, Duration::from_secs(3600));
        // Dropped after a 401: the same one is not taken back.
        a.credentials().drop_access();
        assert!(!a.adopt_access(AccessToken::until(
            "jwt-1",
            later,
            Duration::from_secs(3600)
        )));
        // Another one expiring in the same second is taken.
        assert!(a.adopt_access(AccessToken::until(
            "jwt-2",
            later,
            Duration::from_secs(3600)
        )));
    }

    /// A record from Redis is outside input: absurd times, levels and
    /// stamps never panic, never rest a token for years, and the waits
    /// they feed stay within their caps.
    #[tokio::test(start_paused = true)]
    async fn absurd_numbers_from_another_replica_are_bounded() {
        let s = settings();
        for until in [u64::MAX, 253_402_300_799_000, 0, 1] {
            let t = token("a");
            let mut remote = t.replica_state();
            remote.state = TokenState::Disabled;
            remote.reason = Some(Reason::Forbidden);
            remote.until = Some(until);
            remote.failures = u32::MAX;
            remote.backoff_level = u32::MAX;
            remote.quota_level = u32::MAX;
            remote.stamp.at = u64::MAX;
            assert!(t.apply_replica(&remote, "b"));
            let snap = t.snapshot();
            if let Some(back) = snap.cooldown_until {
                let rest = back.duration_since(SystemTime::now()).unwrap_or_default();
                assert!(
                    rest <= MAX_RESTORED_REST + Duration::from_secs(1),
                    "{until}: {rest:?}"
                );
            }
            // The next failure and trial wait within their caps, and the
            // counters saturate.
            t.report(Outcome::Failure(Reason::Forbidden), &s);
            t.report(Outcome::QuotaExhausted, &s);
            let snap = t.snapshot();
            assert_eq!(snap.consecutive_failures, u32::MAX);
            assert!(s.recovery_wait(u32::MAX) <= s.max_recovery_backoff);
            assert!(s.quota_wait(snap.quota_level) <= s.max_cooldown);
            // Stamping after the absurd stamp saturates, never overflows.
            t.enable();
            t.enable();
            assert_eq!(t.replica_state().stamp.at, u64::MAX);
        }
    }
}
