//! Secret values: how they are written in the config (`"…"`, `{ env = … }`,
//! `{ file = … }`) and the [`Secret`] type that holds a resolved value and
//! never prints it.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::Deserialize;

/// A resolved secret: a refresh token, an API key, an admin token.
///
/// `Debug` and `Display` print `***`, so a secret that slips into a log
/// line or an error message shows nothing. The value is reached only
/// through [`Secret::expose`], which makes every use greppable.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Secret(Arc<str>);

impl Secret {
    /// Wraps a value as a secret.
    pub fn new(value: impl Into<Arc<str>>) -> Self {
        Secret(value.into())
    }

    /// The secret value itself. Call only where the value must leave the
    /// process (an HTTP header, a refresh call, the state file).
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Hex SHA-256 of the value: identifies a secret without revealing it.
    pub fn fingerprint(&self) -> String {
        hex(ring::digest::digest(&ring::digest::SHA256, self.0.as_bytes()).as_ref())
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// A client key of `[server] api_keys`, with its name (for logs and the
/// `client` label; a bare key is named `key-<n>`, n counted from 1).
#[derive(Clone, PartialEq, Eq)]
pub struct ClientKey {
    /// Its name (its client's, for a key of `[[clients]]`).
    pub name: Arc<str>,
    /// The key.
    pub secret: Secret,
    /// What its client may do (shared by every key of one client).
    pub policy: Arc<super::ClientPolicy>,
}

impl fmt::Debug for ClientKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientKey")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// The client key `presented` is, if any. Every key is compared, each in
/// constant time, so the time taken says nothing about which key, or how
/// close a guess was.
pub fn find_key<'a>(keys: &'a [ClientKey], presented: &[u8]) -> Option<&'a ClientKey> {
    use subtle::{ConditionallySelectable, ConstantTimeEq};
    let mut found = 0u64;
    for (i, key) in keys.iter().enumerate() {
        let same = key.secret.expose().as_bytes().ct_eq(presented);
        found = u64::conditional_select(&found, &(i as u64 + 1), same);
    }
    found.checked_sub(1).map(|i| &keys[i as usize])
}

/// Whether `presented` is one of `keys`, compared in constant time per key
/// (so the time taken says nothing about how close a guess was).
pub fn key_matches(keys: &[Secret], presented: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    let mut ok = subtle::Choice::from(0);
    for key in keys {
        ok |= key.expose().as_bytes().ct_eq(presented);
    }
    ok.into()
}

/// Lower-case hex of some bytes.
pub(crate) fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(out, "{b:02x}");
    }
    out
}

/// Where a secret comes from, as written in the config file.
#[derive(Clone, PartialEq, Eq)]
pub enum SecretSource {
    /// The value written inline.
    Inline(Secret),
    /// The value of an environment variable.
    Env(String),
    /// The contents of a file, relative to the config file's folder,
    /// with one trailing newline trimmed.
    File(PathBuf),
}

impl fmt::Debug for SecretSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SecretSource::Inline(_) => f.write_str("Inline(***)"),
            SecretSource::Env(var) => write!(f, "Env({var})"),
            SecretSource::File(path) => write!(f, "File({})", path.display()),
        }
    }
}

impl SecretSource {
    /// A secret written inline.
    pub fn inline(value: &str) -> SecretSource {
        SecretSource::Inline(Secret::new(value))
    }

    /// Reads the secret's value. `base` is the config file's folder.
    ///
    /// The error message names the variable or file, never a value.
    pub fn resolve(&self, base: &Path, env: super::EnvLookup) -> Result<Secret, String> {
        match self {
            SecretSource::Inline(secret) => non_empty(secret.clone(), || "inline".into()),
            SecretSource::Env(var) => match env(var) {
                Some(value) => {
                    non_empty(Secret::new(value), || format!("environment variable {var}"))
                }
                None => Err(format!("environment variable {var} is not set")),
            },
            SecretSource::File(path) => {
                let full = base.join(path);
                let text = std::fs::read_to_string(&full)
                    .map_err(|e| format!("cannot read secret file {}: {e}", full.display()))?;
                let value = text
                    .strip_suffix("\r\n")
                    .or_else(|| text.strip_suffix('\n'))
                    .unwrap_or(&text);
                non_empty(Secret::new(value), || {
                    format!("secret file {}", full.display())
                })
            }
        }
    }

    /// The file this secret is read from, if any (for the reload watcher).
    pub fn file(&self, base: &Path) -> Option<PathBuf> {
        match self {
            SecretSource::File(path) => Some(base.join(path)),
            _ => None,
        }
    }
}

fn non_empty(secret: Secret, what: impl FnOnce() -> String) -> Result<Secret, String> {
    let trimmed = secret.expose().trim();
    if trimmed.is_empty() {
        Err(format!("{} is empty", what()))
    } else if trimmed.len() != secret.expose().len() {
        // Whitespace around a credential is almost always a copy-paste
        // accident that would make every upstream call fail.
        Err(format!("{} has leading or trailing whitespace", what()))
    } else {
        Ok(secret)
    }
}

impl<'de> Deserialize<'de> for SecretSource {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct SourceVisitor;

        impl<'de> Visitor<'de> for SourceVisitor {
            type Value = SecretSource;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string, { env = \"VAR\" } or { file = \"path\" }")
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<SecretSource, E> {
                Ok(SecretSource::Inline(Secret::new(v)))
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<SecretSource, A::Error> {
                let Some(key) = map.next_key::<String>()? else {
                    return Err(de::Error::custom(
                        "empty secret table: expected { env = \"VAR\" } or { file = \"path\" }",
                    ));
                };
                let source = match key.as_str() {
                    "env" => SecretSource::Env(map.next_value()?),
                    "file" => SecretSource::File(map.next_value::<PathBuf>()?),
                    other => {
                        return Err(de::Error::custom(format!(
                            "unknown secret source `{other}`: expected `env` or `file`"
                        )))
                    }
                };
                if let Some(extra) = map.next_key::<String>()? {
                    return Err(de::Error::custom(format!(
                        "a secret has exactly one source; unexpected `{extra}`"
                    )));
                }
                Ok(source)
            }
        }

        deserializer.deserialize_any(SourceVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_and_display_hide_the_value() {
        let s = Secret::new("hunter2-very-secret");
        assert_eq!(format!("{s:?}"), "***");
        assert_eq!(format!("{s}"), "***");
        let src = SecretSource::Inline(s);
        assert!(!format!("{src:?}").contains("hunter2"));
    }

    #[test]
    fn file_secret_trims_one_newline() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("k"), "abc\n").unwrap();
        let src = SecretSource::File("k".into());
        assert_eq!(src.resolve(dir.path(), &|_| None).unwrap().expose(), "abc");
        std::fs::write(dir.path().join("k"), "abc\r\n").unwrap();
        assert_eq!(src.resolve(dir.path(), &|_| None).unwrap().expose(), "abc");
    }

    #[test]
    fn empty_and_padded_secrets_are_rejected() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("k"), "\n").unwrap();
        let err = SecretSource::File("k".into())
            .resolve(dir.path(), &|_| None)
            .unwrap_err();
        assert!(err.contains("is empty"), "{err}");
        let err = SecretSource::Inline(Secret::new(" x"))
            .resolve(dir.path(), &|_| None)
            .unwrap_err();
        assert!(err.contains("whitespace"), "{err}");
    }

    #[test]
    fn keys_match_exactly() {
        let keys = [Secret::new("k-one"), Secret::new("k-two")];
        assert!(key_matches(&keys, b"k-two"));
        for wrong in [&b"k-tw"[..], b"k-two2", b"", b"K-TWO"] {
            assert!(!key_matches(&keys, wrong));
        }
        assert!(!key_matches(&[], b"k-one"));
    }

    #[test]
    fn client_keys_are_found_by_value() {
        let keys = [
            ClientKey {
                name: Arc::from("team-a"),
                secret: Secret::new("k-one"),
                policy: Arc::default(),
            },
            ClientKey {
                name: Arc::from("key-2"),
                secret: Secret::new("k-two"),
                policy: Arc::default(),
            },
        ];
        assert_eq!(find_key(&keys, b"k-two").map(|k| &*k.name), Some("key-2"));
        assert_eq!(find_key(&keys, b"k-one").map(|k| &*k.name), Some("team-a"));
        assert!(find_key(&keys, b"k-three").is_none());
        assert!(find_key(&[], b"k-one").is_none());
        assert!(!format!("{:?}", keys[0]).contains("k-one"));
    }

    #[test]
    fn fingerprint_is_sha256_hex() {
        // sha256("abc")
        assert_eq!(
            Secret::new("abc").fingerprint(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
