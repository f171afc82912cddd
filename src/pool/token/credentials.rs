//! What a token presents: its refresh token (the configured one, or the
//! one a rotation replaced it with), the access token obtained with it,
//! and the one refresh of it that may be in flight.
//!
//! Credentials have their own lock, apart from the state machine's: a
//! refresh reads and rotates them without touching the token's state, and
//! a state change never waits for a secret. A change of the refresh token
//! marks the credentials changed, for the state file.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use http::HeaderValue;
use tokio::sync::watch;
use tokio::time::Instant;

use super::replicas::short_fingerprint;
use super::Reason;
use crate::config::Secret;

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

/// The refresh token in use and how it got there.
#[derive(Debug)]
struct RefreshSecret {
    /// The configured one, or a rotated one.
    token: Secret,
    /// Set when `token` came from a rotation.
    rotated: bool,
    /// Rotations since the configured refresh token (0: it is in use). Of
    /// two refresh tokens of one token, the one with more rotations is
    /// the newer: replicas keep it, whoever rotated.
    rotation: u64,
}

/// A token's secrets: the refresh token (configured and current), the
/// access token, and the refresh in flight.
pub struct Credentials {
    /// The secret as configured; identifies the token across reloads.
    configured: Secret,
    refresh: Mutex<RefreshSecret>,
    /// Set when the refresh token changed (the state file records it).
    changed: AtomicBool,
    access: ArcSwapOption<AccessToken>,
    /// The id of the last access token dropped (after a 401): the same one
    /// from another replica is not taken back.
    dropped_access: AtomicU64,
    /// The refresh under way, so that a token is refreshed once at a time
    /// whatever asks (requests, the background refresher, a reload's new
    /// refresher: the slot lives as long as the token).
    flight: Mutex<Option<Flight>>,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("rotation", &self.rotation())
            .finish_non_exhaustive()
    }
}

impl Credentials {
    /// Credentials that start from the configured `secret`.
    pub(super) fn new(secret: &Secret) -> Credentials {
        Credentials {
            configured: secret.clone(),
            refresh: Mutex::new(RefreshSecret {
                token: secret.clone(),
                rotated: false,
                rotation: 0,
            }),
            changed: AtomicBool::new(false),
            access: ArcSwapOption::empty(),
            dropped_access: AtomicU64::new(0),
            flight: Mutex::new(None),
        }
    }

    fn lock(&self) -> MutexGuard<'_, RefreshSecret> {
        // A panic while holding the lock leaves plain data behind; keep serving.
        self.refresh.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The secret as configured (not a rotated one).
    pub fn configured(&self) -> &Secret {
        &self.configured
    }

    /// The refresh token to send: the rotated one if there is one.
    pub fn refresh_token(&self) -> Secret {
        self.lock().token.clone()
    }

    /// Rotations since the configured refresh token (0: it is in use).
    pub fn rotation(&self) -> u64 {
        self.lock().rotation
    }

    /// The refresh token to send and its rotation count, read together.
    pub fn refresh_token_and_rotation(&self) -> (Secret, u64) {
        let secret = self.lock();
        (secret.token.clone(), secret.rotation)
    }

    /// The rotated refresh token, if the current one came from a rotation.
    pub fn rotated_refresh_token(&self) -> Option<Secret> {
        let secret = self.lock();
        secret.rotated.then(|| secret.token.clone())
    }

    /// The short fingerprint of the refresh token in use.
    pub fn refresh_fingerprint(&self) -> String {
        short_fingerprint(&self.lock().token)
    }

    /// Installs a rotated refresh token.
    pub fn rotate(&self, new: Secret) {
        let mut secret = self.lock();
        let rotation = secret.rotation.saturating_add(1);
        self.install(&mut secret, new, rotation);
    }

    /// Installs what a refresh of the refresh token at rotation `from`
    /// returned. If a newer one (another replica's) was taken while the
    /// call ran, that one stays. Returns whether `new` was installed.
    pub fn rotate_from(&self, from: u64, new: Secret) -> bool {
        let mut secret = self.lock();
        if secret.rotation > from {
            return false;
        }
        self.install(&mut secret, new, from.saturating_add(1));
        true
    }

    /// Takes a refresh token another replica rotated to, if it is newer
    /// (more rotations; on a tie, only when `tie` says the other one won).
    /// Returns whether it was taken.
    pub(super) fn adopt(&self, refresh_token: Secret, rotation: u64, tie: bool) -> bool {
        let mut secret = self.lock();
        let newer = rotation > secret.rotation || (tie && rotation == secret.rotation);
        if !newer || secret.token == refresh_token {
            return false;
        }
        self.install(&mut secret, refresh_token, rotation);
        true
    }

    /// Puts back a refresh token the state file kept (at start).
    pub(super) fn restore(&self, refresh_token: Secret, rotation: u64) {
        let mut secret = self.lock();
        secret.token = refresh_token;
        secret.rotated = true;
        secret.rotation = rotation.max(1);
    }

    /// The one place the refresh token changes while running.
    fn install(&self, secret: &mut RefreshSecret, token: Secret, rotation: u64) {
        secret.rotated = token != self.configured;
        secret.token = token;
        secret.rotation = rotation;
        self.changed.store(true, Ordering::Release);
    }

    /// Whether the refresh token changed since the last call.
    pub(super) fn take_changed(&self) -> bool {
        self.changed.swap(false, Ordering::AcqRel)
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

    /// When the access token held expires, as wall-clock time.
    pub fn access_expires_at(&self) -> Option<SystemTime> {
        self.access.load().as_ref().map(|a| a.expires_at_wall)
    }

    /// Holds `access` from now on.
    pub(super) fn store_access(&self, access: AccessToken) {
        self.access.store(Some(Arc::new(access)));
    }

    /// Whether `access` (another replica's) is worth taking: not the one
    /// held or dropped after a 401, and not expiring before the one held.
    pub(super) fn would_adopt(&self, access: &AccessToken) -> bool {
        if access.id == self.dropped_access.load(Ordering::Relaxed) {
            return false;
        }
        !self.access.load().as_ref().is_some_and(|held| {
            held.id == access.id || held.expires_at_wall > access.expires_at_wall
        })
    }

    /// Forgets the access token (after a 401, or when the secret changed).
    pub fn drop_access(&self) {
        if let Some(old) = self.access.swap(None) {
            self.dropped_access.store(old.id, Ordering::Relaxed);
        }
    }

    /// The refresh in flight, or a new one to start.
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

    /// Whether a refresh is under way.
    pub fn refresh_in_flight(&self) -> bool {
        let slot = self.flight.lock().unwrap_or_else(|e| e.into_inner());
        slot.as_ref()
            .is_some_and(|rx| rx.borrow().is_none() && rx.has_changed().is_ok())
    }
}
