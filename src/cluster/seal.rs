//! Sealing the credentials the cluster stores: with `[cluster]
//! encryption_key`, every refresh and access token written to Redis is
//! AES-256-GCM sealed, with a fresh random nonce each time and the token's
//! id and field as associated data (a sealed value moved to another token
//! or field does not open). Without a key, values are stored as they are.
//!
//! The AES key is derived from `encryption_key` with PBKDF2-HMAC-SHA256
//! (100 000 rounds), so that guessing a short key from what Redis holds is
//! slow. The key's fingerprint is stored beside the pool (`<prefix>:meta`)
//! so a replica with another key says so instead of reading garbage; it is
//! a hash of the derived key and reveals nothing of it.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};

use crate::config::Secret;

/// What marks a sealed value (and its format's version).
const SEALED: &str = "v1.";
/// The fingerprint stored when the pool is not sealed.
pub const NO_KEY: &str = "none";

/// A sealed value would not open.
#[derive(Debug, thiserror::Error)]
pub enum SealError {
    /// Not sealed, or sealed under another key, or changed.
    #[error("a stored token does not open with this replica's encryption_key")]
    WontOpen,
    /// Sealed, but this replica has no key.
    #[error("a stored token is sealed and this replica has no encryption_key")]
    NoKey,
}

/// Seals and opens stored tokens.
pub struct Sealer {
    key: Option<LessSafeKey>,
    fingerprint: String,
    rng: SystemRandom,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sealer")
            .field("fingerprint", &self.fingerprint)
            .finish_non_exhaustive()
    }
}

/// PBKDF2 rounds: about 50 ms once at start, and as much per guess.
const ROUNDS: u32 = 100_000;

fn derive(key: &Secret) -> [u8; 32] {
    let mut out = [0u8; 32];
    ring::pbkdf2::derive(
        ring::pbkdf2::PBKDF2_HMAC_SHA256,
        std::num::NonZeroU32::new(ROUNDS).expect("not zero"),
        b"tokenpool cluster key v1",
        key.expose().as_bytes(),
        &mut out,
    );
    out
}

impl Sealer {
    /// A sealer for `key` (`None`: values stored as they are).
    pub fn new(key: Option<&Secret>) -> Sealer {
        let (key, fingerprint) = match key {
            Some(secret) => {
                let bytes = derive(secret);
                let unbound = UnboundKey::new(&AES_256_GCM, &bytes).expect("a 32-byte AES-256 key");
                let mut h = ring::digest::Context::new(&ring::digest::SHA256);
                h.update(b"tokenpool cluster key fingerprint v1\0");
                h.update(&bytes);
                let fp = h.finish();
                (
                    Some(LessSafeKey::new(unbound)),
                    crate::config::hex(&fp.as_ref()[..8]),
                )
            }
            None => (None, NO_KEY.to_string()),
        };
        Sealer {
            key,
            fingerprint,
            rng: SystemRandom::new(),
        }
    }

    /// The key's fingerprint, or [`NO_KEY`].
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// `plain` as stored for token `id`'s `field`.
    pub fn seal(&self, id: &str, field: &str, plain: &str) -> String {
        let Some(key) = &self.key else {
            return plain.to_string();
        };
        let mut nonce = [0u8; NONCE_LEN];
        self.rng
            .fill(&mut nonce)
            .expect("the system's random source works");
        let mut data = plain.as_bytes().to_vec();
        key.seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(aad(id, field)),
            &mut data,
        )
        .expect("AES-GCM seals any value under 64 GiB");
        let mut out = Vec::with_capacity(NONCE_LEN + data.len());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&data);
        format!("{SEALED}{}", URL_SAFE_NO_PAD.encode(out))
    }

    /// The value stored for token `id`'s `field`, opened.
    pub fn open(&self, id: &str, field: &str, stored: &str) -> Result<String, SealError> {
        let Some(key) = &self.key else {
            if stored.starts_with(SEALED) {
                return Err(SealError::NoKey);
            }
            return Ok(stored.to_string());
        };
        let bytes = stored
            .strip_prefix(SEALED)
            .and_then(|b64| URL_SAFE_NO_PAD.decode(b64).ok())
            .filter(|b| b.len() > NONCE_LEN)
            .ok_or(SealError::WontOpen)?;
        let (nonce, sealed) = bytes.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| SealError::WontOpen)?;
        let mut data = sealed.to_vec();
        let plain = key
            .open_in_place(nonce, Aad::from(aad(id, field)), &mut data)
            .map_err(|_| SealError::WontOpen)?;
        String::from_utf8(plain.to_vec()).map_err(|_| SealError::WontOpen)
    }
}

fn aad(id: &str, field: &str) -> Vec<u8> {
    let mut aad = Vec::with_capacity(id.len() + field.len() + 1);
    aad.extend_from_slice(id.as_bytes());
    aad.push(0);
    aad.extend_from_slice(field.as_bytes());
    aad
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_values_open_only_where_and_with_what_they_were_sealed_with() {
        let key = Secret::new("a-key-of-sixteen-or-more");
        let sealer = Sealer::new(Some(&key));
        let stored = sealer.seal("alice:0011", "rt", "rt-alice-secret");
        assert!(stored.starts_with("v1."));
        assert!(!stored.contains("rt-alice-secret"));
        assert_eq!(
            sealer.open("alice:0011", "rt", &stored).unwrap(),
            "rt-alice-secret"
        );
        // A fresh nonce each time.
        assert_ne!(stored, sealer.seal("alice:0011", "rt", "rt-alice-secret"));
        // Another token, another field, another key, a changed byte: no.
        assert!(sealer.open("bob:0022", "rt", &stored).is_err());
        assert!(sealer.open("alice:0011", "at", &stored).is_err());
        let other = Sealer::new(Some(&Secret::new("another-key-of-sixteen")));
        assert!(other.open("alice:0011", "rt", &stored).is_err());
        assert_ne!(other.fingerprint(), sealer.fingerprint());
        let mut changed = stored.clone().into_bytes();
        let last = changed.len() - 1;
        changed[last] = if changed[last] == b'A' { b'B' } else { b'A' };
        assert!(sealer
            .open("alice:0011", "rt", std::str::from_utf8(&changed).unwrap())
            .is_err());
        // A plain value is not taken for a sealed one, nor the reverse.
        assert!(sealer.open("alice:0011", "rt", "rt-alice-secret").is_err());
        let plain = Sealer::new(None);
        assert_eq!(plain.fingerprint(), NO_KEY);
        assert!(matches!(
            plain.open("alice:0011", "rt", &stored),
            Err(SealError::NoKey)
        ));
        assert_eq!(plain.seal("alice:0011", "rt", "x"), "x");
        // The fingerprint is stable and says nothing of the key.
        assert_eq!(Sealer::new(Some(&key)).fingerprint(), sealer.fingerprint());
        assert!(!sealer.fingerprint().contains("sixteen"));
    }
}
