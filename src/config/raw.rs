//! The configuration file as written: serde structs that keep every
//! value's place in the file (`Spanned`), so that whatever is wrong with a
//! value — its syntax or its meaning — is reported at its `LINE:COL`.
//! Defaults for what the file leaves out live here too; a default carries
//! the empty span `0..0` (no place to show).
//!
//! Nothing here is checked: [`super::build`] turns these into a `Config`.

use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;

use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::Deserialize;
use toml::Spanned;

use super::{Provider, QuotaProvider, Strategy, Tier};
use crate::config::SecretSource;

/// A value with no place in the file: a default.
pub(super) fn unplaced<T>(value: T) -> Spanned<T> {
    Spanned::new(0..0, value)
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    #[serde(default)]
    pub server: RawServer,
    #[serde(default)]
    pub admin: RawAdmin,
    #[serde(default)]
    pub upstream: RawUpstream,
    #[serde(default)]
    pub refresh: RawRefresh,
    #[serde(default)]
    pub pool: RawPool,
    #[serde(default)]
    pub state: RawState,
    #[serde(default)]
    pub log: RawLog,
    pub cluster: Option<RawCluster>,
    #[serde(default)]
    pub quota: RawQuota,
    #[serde(default)]
    pub tokens: Vec<Spanned<RawToken>>,
    #[serde(default)]
    pub clients: Vec<Spanned<RawClient>>,
}

/// `[[clients]]`: the long form of `[server] api_keys`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawClient {
    pub name: Spanned<String>,
    pub keys: Spanned<Vec<Spanned<SecretSource>>>,
    #[serde(default)]
    pub tiers: Option<Spanned<Vec<Tier>>>,
    #[serde(default)]
    pub routes: Option<Spanned<Vec<Spanned<String>>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawServer {
    pub listen: Spanned<String>,
    pub api_keys: Vec<Spanned<RawClientKey>>,
    pub max_request_body_bytes: Spanned<usize>,
    pub allow_unauthenticated: bool,
    pub shutdown_grace: Spanned<String>,
    pub drain_delay: Spanned<String>,
    pub header_read_timeout: Spanned<String>,
    pub body_read_timeout: Spanned<String>,
}

impl Default for RawServer {
    fn default() -> Self {
        RawServer {
            listen: unplaced("127.0.0.1:8080".into()),
            api_keys: Vec::new(),
            max_request_body_bytes: unplaced(10 * 1024 * 1024),
            allow_unauthenticated: false,
            shutdown_grace: unplaced("30s".into()),
            drain_delay: unplaced("5s".into()),
            header_read_timeout: unplaced("10s".into()),
            body_read_timeout: unplaced("60s".into()),
        }
    }
}

/// A client key: a bare secret (named `key-<n>`), or `{ name, key }`.
pub(super) enum RawClientKey {
    Bare(SecretSource),
    Named {
        name: Spanned<String>,
        key: Spanned<SecretSource>,
    },
}

impl<'de> Deserialize<'de> for RawClientKey {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct KeyVisitor;

        impl<'de> Visitor<'de> for KeyVisitor {
            type Value = RawClientKey;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(
                    "a key (a string, { env = \"VAR\" } or { file = \"path\" }), \
                     or { name = \"…\", key = … }",
                )
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<RawClientKey, E> {
                Ok(RawClientKey::Bare(SecretSource::inline(v)))
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawClientKey, A::Error> {
                let mut name = None;
                let mut key = None;
                let mut bare = None;
                while let Some(field) = map.next_key::<String>()? {
                    match field.as_str() {
                        "name" => name = Some(map.next_value::<Spanned<String>>()?),
                        "key" => key = Some(map.next_value::<Spanned<SecretSource>>()?),
                        "env" | "file" if bare.is_some() => {
                            return Err(de::Error::custom(
                                "a client key has one source: { env = … } or { file = … }, not both",
                            ))
                        }
                        "env" => bare = Some(SecretSource::Env(map.next_value()?)),
                        "file" => bare = Some(SecretSource::File(map.next_value::<PathBuf>()?)),
                        other => {
                            return Err(de::Error::custom(format!(
                                "unknown field `{other}`: a client key is {{ name = \"…\", key = … }}, \
                                 or a secret ({{ env = … }} or {{ file = … }})"
                            )))
                        }
                    }
                }
                match (name, key, bare) {
                    (Some(name), Some(key), None) => Ok(RawClientKey::Named { name, key }),
                    (None, None, Some(source)) => Ok(RawClientKey::Bare(source)),
                    (Some(_), None, _) => Err(de::Error::custom("a named client key needs `key`")),
                    (None, Some(_), _) => {
                        Err(de::Error::custom("a client key with `key` needs `name`"))
                    }
                    _ => Err(de::Error::custom(
                        "a client key is { name = \"…\", key = … }, or one secret source",
                    )),
                }
            }
        }

        deserializer.deserialize_any(KeyVisitor)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawAdmin {
    pub listen: Spanned<String>,
    pub token: Option<Spanned<SecretSource>>,
}

impl Default for RawAdmin {
    fn default() -> Self {
        RawAdmin {
            listen: unplaced("127.0.0.1:9090".into()),
            token: None,
        }
    }
}

/// `[upstream] preset`: settings filled in for a known upstream.
#[derive(Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub(super) enum Preset {
    /// Warp's AI API (`docs/warp.md`).
    Warp,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawUpstream {
    pub preset: Option<Spanned<Preset>>,
    pub url: Option<Spanned<String>>,
    pub connect_timeout: Spanned<String>,
    pub idle_timeout: Spanned<String>,
    pub headers: Spanned<HashMap<String, String>>,
    pub ca_file: Option<Spanned<String>>,
    pub routes: Option<Spanned<Vec<Spanned<String>>>>,
}

impl Default for RawUpstream {
    fn default() -> Self {
        RawUpstream {
            preset: None,
            url: None,
            connect_timeout: unplaced("10s".into()),
            idle_timeout: unplaced("120s".into()),
            headers: unplaced(HashMap::new()),
            ca_file: None,
            routes: None,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawRefresh {
    pub provider: Provider,
    pub url: Option<Spanned<String>>,
    /// The refresh endpoint's API key, put in the URL's `key=` by the
    /// Warp preset.
    pub key: Option<Spanned<SecretSource>>,
    pub headers: Spanned<HashMap<String, String>>,
    pub timeout: Spanned<String>,
    pub margin: Spanned<String>,
    pub client_id: Option<String>,
    pub client_secret: Option<Spanned<SecretSource>>,
}

impl Default for RawRefresh {
    fn default() -> Self {
        RawRefresh {
            provider: Provider::Firebase,
            url: None,
            key: None,
            headers: unplaced(HashMap::new()),
            timeout: unplaced("30s".into()),
            margin: unplaced("5m".into()),
            client_id: None,
            client_secret: None,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawPool {
    pub order: Spanned<Vec<Tier>>,
    pub failure_threshold: Spanned<u32>,
    pub cooldown: Spanned<String>,
    pub quota_cooldown: Spanned<String>,
    pub max_cooldown: Spanned<String>,
    pub recovery_backoff: Spanned<String>,
    pub max_recovery_backoff: Spanned<String>,
    pub max_attempts: Spanned<u32>,
    pub quota_pattern: Spanned<String>,
    pub strategy: Strategy,
    pub affinity_header: Option<Spanned<String>>,
}

impl Default for RawPool {
    fn default() -> Self {
        RawPool {
            order: unplaced(Tier::ALL.to_vec()),
            failure_threshold: unplaced(3),
            cooldown: unplaced("60s".into()),
            quota_cooldown: unplaced("10m".into()),
            max_cooldown: unplaced("6h".into()),
            recovery_backoff: unplaced("1m".into()),
            max_recovery_backoff: unplaced("30m".into()),
            max_attempts: unplaced(3),
            quota_pattern: unplaced(
                "(?i)no remaining quota|insufficient_quota|quota exceeded".into(),
            ),
            strategy: Strategy::RoundRobin,
            affinity_header: None,
        }
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawState {
    pub path: Option<Spanned<PathBuf>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawLog {
    pub access: bool,
}

impl Default for RawLog {
    fn default() -> Self {
        RawLog { access: true }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawQuota {
    pub provider: QuotaProvider,
    pub url: Option<Spanned<String>>,
    pub interval: Spanned<String>,
}

impl Default for RawQuota {
    fn default() -> Self {
        RawQuota {
            provider: QuotaProvider::None,
            url: None,
            interval: unplaced("5m".into()),
        }
    }
}

/// `[cluster]`: `redis` is required once the section is there.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCluster {
    pub redis: Spanned<SecretSource>,
    #[serde(default = "default_key_prefix")]
    pub key_prefix: Spanned<String>,
    pub node: Option<Spanned<String>>,
    #[serde(default = "default_sync_interval")]
    pub sync_interval: Spanned<String>,
    pub encryption_key: Option<Spanned<SecretSource>>,
    pub ca_file: Option<Spanned<String>>,
    #[serde(default)]
    pub refresh_alone: super::RefreshAlone,
}

fn default_key_prefix() -> Spanned<String> {
    unplaced("tokenpool".into())
}

fn default_sync_interval() -> Spanned<String> {
    unplaced("1s".into())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawToken {
    pub name: Option<Spanned<String>>,
    pub tier: Tier,
    pub token: Spanned<SecretSource>,
}
