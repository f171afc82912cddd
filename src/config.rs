//! The configuration: the TOML schema (`docs/configuration.md`), its validation, the
//! Warp2Api environment variables (`docs/migration.md`), and the error type that points
//! at `FILE:LINE:COL`.
//!
//! This module turns text into a checked [`Config`]; [`watch`] tells when
//! the files it read change. It owns no running state.

mod build;
pub(crate) mod duration;
mod form;
mod guard;
mod raw;
pub(crate) mod redact;
pub mod routes;
mod secret;
pub mod watch;

use std::fmt;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::{HeaderName, HeaderValue, Uri};
use serde::{Deserialize, Serialize};

pub(crate) use form::form_encode;
pub use guard::{check_reload, Bound, Risk};
use redact::{redact_quoted, shown};
pub use routes::Route;
pub(crate) use secret::hex;
pub use secret::{find_key, key_matches, ClientKey, Secret, SecretSource};

/// One of the three fixed token tiers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Tier {
    /// Accounts of the team's own members.
    Personal,
    /// Accounts shared by the team.
    Shared,
    /// Anonymous accounts, the last resort.
    Anonymous,
}

impl Tier {
    /// All tiers, in the default order.
    pub const ALL: [Tier; 3] = [Tier::Personal, Tier::Shared, Tier::Anonymous];

    /// Its place in [`Tier::ALL`], for tables indexed by tier.
    pub fn index(self) -> usize {
        match self {
            Tier::Personal => 0,
            Tier::Shared => 1,
            Tier::Anonymous => 2,
        }
    }

    /// The name used in the config, metrics and the admin API.
    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Personal => "personal",
            Tier::Shared => "shared",
            Tier::Anonymous => "anonymous",
        }
    }
}

impl fmt::Display for Tier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a token's refresh token becomes an access token.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Provider {
    /// Warp's Firebase-style refresh endpoint.
    Firebase,
    /// The RFC 6749 §6 refresh grant.
    Oauth2,
    /// The token is the bearer; nothing is refreshed.
    Static,
}

impl Provider {
    /// The name used in the config.
    pub fn as_str(self) -> &'static str {
        match self {
            Provider::Firebase => "firebase",
            Provider::Oauth2 => "oauth2",
            Provider::Static => "static",
        }
    }
}

/// How a token is picked inside a tier.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    /// In turn.
    #[default]
    RoundRobin,
    /// The token with the most known remaining quota (unknown counts as
    /// full); ties in turn.
    MostRemaining,
}

/// What a replica may refresh while it cannot coordinate with the cluster
/// (`[cluster] refresh_alone`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RefreshAlone {
    /// Only tokens whose refresh token never rotated, as far as the
    /// cluster last told it or its state file says (Warp's never do).
    #[default]
    Unrotated,
    /// Nothing: a token that needs a refresh waits for the cluster.
    Never,
}

/// Where request quotas are polled from (`[quota] provider`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum QuotaProvider {
    /// Nowhere: quotas are learned from answers' headers only.
    #[default]
    None,
    /// Warp's `GetRequestLimitInfo` GraphQL query.
    Warp,
}

/// A loaded, validated configuration: one generation's settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it came from; `None` in env-only mode.
    pub path: Option<PathBuf>,
    /// The proxy listener.
    pub server: ServerConfig,
    /// The admin listener.
    pub admin: AdminConfig,
    /// Where requests go.
    pub upstream: UpstreamConfig,
    /// How access tokens are obtained.
    pub refresh: RefreshConfig,
    /// Selection and failure handling.
    pub pool: PoolConfig,
    /// The state file.
    pub state: StateConfig,
    /// The access log.
    pub log: LogConfig,
    /// Replicas sharing one pool through Redis; `None`: one process alone.
    pub cluster: Option<ClusterConfig>,
    /// Quota polling.
    pub quota: QuotaConfig,
    /// Every token, file tokens first, then environment tokens.
    pub tokens: Vec<TokenConfig>,
    /// Files the config reads besides itself (`{ file = … }` secrets and
    /// `[upstream] ca_file`), so the watcher can follow them.
    pub read_files: Vec<PathBuf>,
}

/// `[server]`.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Address of the proxy listener.
    pub listen: SocketAddr,
    /// Keys clients must present, by name; empty means no client
    /// authentication.
    pub api_keys: Vec<ClientKey>,
    /// Largest request body buffered for replay; past it the client gets 413.
    pub max_request_body_bytes: usize,
    /// Allows binding a non-loopback address without any api key.
    pub allow_unauthenticated: bool,
    /// On shutdown, how long requests in flight (streams included) may
    /// take to finish before their connections are closed.
    pub shutdown_grace: Duration,
    /// On SIGTERM, how long the listeners keep accepting while `/readyz`
    /// already answers 503, so that load balancers stop sending new
    /// connections before the proxy stops taking them.
    pub drain_delay: Duration,
    /// Longest a client may take to send its request headers (a guard
    /// against slow-loris clients holding connections open); also how long
    /// a connection may sit with no request before it is closed.
    pub header_read_timeout: Duration,
    /// Longest a client may take to send a request's body (past it, 408):
    /// a slow body holds a connection and the buffer it fills.
    pub body_read_timeout: Duration,
}

/// `[admin]`.
#[derive(Debug, Clone)]
pub struct AdminConfig {
    /// Address of the admin listener.
    pub listen: SocketAddr,
    /// Bearer token for `/admin/*`; without it only loopback clients may use them.
    pub token: Option<Secret>,
}

/// What a client may do: the `tiers` and `routes` of its `[[clients]]`
/// entry (a key of `[server] api_keys` may do everything the proxy does).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientPolicy {
    /// The tiers its requests may draw tokens from; `None`: every tier.
    pub tiers: Option<Vec<Tier>>,
    /// The requests it may make; `None`: `[upstream] routes`.
    pub routes: Option<Vec<Route>>,
}

impl ClientPolicy {
    /// The routes that apply to this client under `upstream`'s (`None`:
    /// every request).
    pub fn routes<'a>(&'a self, upstream: &'a UpstreamConfig) -> Option<&'a [Route]> {
        self.routes.as_deref().or(upstream.routes.as_deref())
    }
}

/// `[upstream]`.
#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    /// Base URL requests are forwarded to; the request path is appended.
    pub url: Uri,
    /// Longest time to open a connection.
    pub connect_timeout: Duration,
    /// Longest silence while waiting for headers or inside a streaming response.
    pub idle_timeout: Duration,
    /// Headers set on every forwarded request, replacing the client's.
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// CA certificates trusted for an https upstream besides the built-in
    /// web roots (`ca_file`, PEM): for an upstream behind a private CA.
    pub ca_certs: Vec<rustls::pki_types::CertificateDer<'static>>,
    /// The requests forwarded (`routes`, or the preset's); `None`: every
    /// one.
    pub routes: Option<Vec<Route>>,
}

/// `[refresh]`.
#[derive(Debug, Clone, PartialEq)]
pub struct RefreshConfig {
    /// How tokens are refreshed.
    pub provider: Provider,
    /// The refresh endpoint; `None` only for `static`.
    pub url: Option<String>,
    /// Extra headers on refresh calls.
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// Longest time one refresh call may take.
    pub timeout: Duration,
    /// Refresh when less than this is left of an access token's life.
    pub margin: Duration,
    /// OAuth2 client id.
    pub client_id: Option<String>,
    /// OAuth2 client secret.
    pub client_secret: Option<Secret>,
}

/// `[pool]`.
#[derive(Debug, Clone)]
pub struct PoolConfig {
    /// Tiers in the order they are tried.
    pub order: Vec<Tier>,
    /// Consecutive token-fault failures that disable a token.
    pub failure_threshold: u32,
    /// Cooldown after a 429 without Retry-After.
    pub cooldown: Duration,
    /// Cooldown after a quota-exhausted 429; doubles on repeats.
    pub quota_cooldown: Duration,
    /// Cap for every cooldown.
    pub max_cooldown: Duration,
    /// Wait before a disabled token's first trial; doubles.
    pub recovery_backoff: Duration,
    /// Cap for the recovery backoff.
    pub max_recovery_backoff: Duration,
    /// Tokens tried for one request.
    pub max_attempts: u32,
    /// Recognises a quota-exhausted 429 in its body or headers.
    pub quota_pattern: regex::Regex,
    /// How a token is picked inside a tier.
    pub strategy: Strategy,
    /// Requests carrying the same value of this header go to the same
    /// token while it is available; the header is not forwarded.
    pub affinity_header: Option<HeaderName>,
}

/// `[quota]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuotaConfig {
    /// Where quotas are polled from.
    pub provider: QuotaProvider,
    /// The endpoint (for `warp`: `<upstream>/graphql/v2?op=GetRequestLimitInfo`).
    pub url: Option<String>,
    /// How often each token's quota is polled.
    pub interval: Duration,
}

/// `[state]`.
#[derive(Debug, Clone, Default)]
pub struct StateConfig {
    /// The state file; a relative path is relative to the working
    /// directory.
    pub path: Option<PathBuf>,
}

/// `[log]`.
#[derive(Debug, Clone)]
pub struct LogConfig {
    /// One line per proxied request on the `tokenpool::access` target.
    pub access: bool,
}

/// `[cluster]`.
#[derive(Debug, Clone, PartialEq)]
pub struct ClusterConfig {
    /// The Redis URL (`redis://` or `rediss://`, maybe with a password):
    /// a secret.
    pub redis: Secret,
    /// Prefix of every key, so that several pools may share one Redis.
    pub key_prefix: String,
    /// This replica's name in logs, leases and `/admin/pool`.
    pub node: String,
    /// Longest time another replica's change may take to show here.
    pub sync_interval: Duration,
    /// Seals every stored refresh and access token (AES-256-GCM).
    pub encryption_key: Option<Secret>,
    /// CA certificates (PEM) trusted for `rediss://` instead of the
    /// built-in web roots (`ca_file`).
    pub ca_pem: Option<Vec<u8>>,
    /// What it may refresh while it cannot coordinate.
    pub refresh_alone: RefreshAlone,
}

/// Where a token was configured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenOrigin {
    /// A `[[tokens]]` entry.
    File,
    /// A Warp2Api environment variable.
    Env,
}

/// One configured token.
#[derive(Debug, Clone)]
pub struct TokenConfig {
    /// Unique name, used in metrics, logs and the admin API.
    pub name: String,
    /// Its tier.
    pub tier: Tier,
    /// The refresh token (or, for `static`, the bearer).
    pub secret: Secret,
    /// Where it was configured.
    pub origin: TokenOrigin,
}

/// A configuration error, located in its file where the TOML has a position.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    /// The file's path as given, or `<env>` in env-only mode.
    pub file: String,
    /// 1-based line and column, when known.
    pub position: Option<(usize, usize)>,
    /// What is wrong. Never contains a secret value.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.position {
            Some((line, col)) => write!(f, "{}:{line}:{col}: {}", self.file, self.message),
            None => write!(f, "{}: {}", self.file, self.message),
        }
    }
}

/// Reads an environment variable; injectable so tests need not touch the
/// process environment.
pub type EnvLookup<'a> = &'a dyn Fn(&str) -> Option<String>;

/// The process environment as an [`EnvLookup`].
pub fn process_env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

/// How errors name a config: its path, or `<env>` in env-only mode.
fn file_label(path: Option<&Path>) -> String {
    path.map_or_else(|| "<env>".to_string(), |p| p.display().to_string())
}

impl Config {
    /// An error about this configuration as a whole (no place in the file),
    /// such as a client that cannot be built from it.
    pub fn error(&self, message: impl Into<String>) -> ConfigError {
        ConfigError {
            file: file_label(self.path.as_deref()),
            position: None,
            message: message.into(),
        }
    }

    /// Reads and validates a config file, adding environment tokens (Warp2Api).
    pub fn load(path: &Path, env: EnvLookup) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        let text = match std::fs::read(path) {
            Ok(bytes) => String::from_utf8(bytes).map_err(|_| ConfigError {
                file: file.clone(),
                position: None,
                message: "not valid UTF-8".into(),
            })?,
            Err(e) => {
                let message = if path.is_dir() {
                    "is a directory, not a config file".to_string()
                } else {
                    format!("cannot read: {e}")
                };
                return Err(ConfigError {
                    file,
                    position: None,
                    message,
                });
            }
        };
        if text.trim().is_empty() {
            // Valid TOML meaning "all defaults", but in practice a truncated
            // save or a config tool that wrote nothing: taking it would drop
            // every token, the client keys and the upstream at once.
            return Err(ConfigError {
                file,
                position: None,
                message: "the file is empty (a truncated write?); refusing to run on defaults. \
                          For env-only mode, name no config file"
                    .into(),
            });
        }
        Config::parse(&text, Some(path), env)
    }

    /// Env-only mode: Warp's preset, the environment's settings and tokens
    /// (`docs/migration.md`).
    pub fn from_env(env: EnvLookup) -> Result<Config, ConfigError> {
        let file = file_label(None);
        let located = |_: Option<Range<usize>>, message: String| ConfigError {
            file: file.clone(),
            position: None,
            message,
        };
        let base = PathBuf::from(".");
        build::Builder {
            base: &base,
            env,
            located: &located,
            read: Default::default(),
        }
        .build(build::env_only(env), None)
    }

    /// Parses and validates config text. `path` locates errors and anchors
    /// relative paths; `None` means env-only mode.
    pub fn parse(text: &str, path: Option<&Path>, env: EnvLookup) -> Result<Config, ConfigError> {
        let file = file_label(path);
        let located = |span: Option<Range<usize>>, message: String| ConfigError {
            file: file.clone(),
            position: span.map(|s| line_col(text, s.start)),
            message,
        };
        let raw: raw::RawConfig = toml::from_str(text).map_err(|e| {
            // One line per error: the parser's message may span several.
            let message = redact_quoted(&e.message().trim().replace('\n', "; "));
            located(e.span(), message)
        })?;
        let base = path
            .and_then(Path::parent)
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        let base = if base.as_os_str().is_empty() {
            PathBuf::from(".")
        } else {
            base
        };
        build::Builder {
            base: &base,
            env,
            located: &located,
            read: Default::default(),
        }
        .build(raw, path)
    }
}

/// 1-based line and column (in characters) of a byte offset.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let col = text[line_start..offset].chars().count() + 1;
    (line, col)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Some(Path::new("t.toml")), &no_env)
    }

    #[test]
    fn line_col_counts_from_one() {
        assert_eq!(line_col("ab\ncd", 0), (1, 1));
        assert_eq!(line_col("ab\ncd", 4), (2, 2));
        assert_eq!(line_col("é\nx", 3), (2, 1));
    }

    #[test]
    fn a_secret_in_the_wrong_field_is_not_quoted_back() {
        let err = parse("[pool]\nmax_attempts = \"sk-live-very-secret\"\n")
            .unwrap_err()
            .to_string();
        assert!(!err.contains("sk-live-very-secret"), "{err}");
        assert!(
            err.starts_with("t.toml:2:16: invalid type: string \"…\""),
            "{err}"
        );
        // A long value in a duration is not shown either; a short one is.
        let err = parse("[pool]\ncooldown = \"sk-live-very-secret\"\n")
            .unwrap_err()
            .to_string();
        assert!(!err.contains("sk-live"), "{err}");
        let err = parse("[pool]\nmax_attempts = \"three\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("string \"three\""), "{err}");
        // Nor in a field of fixed words (strategy, provider, tier, preset).
        for text in [
            "[pool]\nstrategy = \"sk-live-very-secret\"\n",
            "[quota]\nprovider = \"sk-live-very-secret\"\n",
            "[[tokens]]\nname = \"a\"\ntier = \"sk-live-very-secret\"\ntoken = \"t\"\n",
        ] {
            let err = parse(text).unwrap_err().to_string();
            assert!(!err.contains("sk-live"), "{err}");
            assert!(err.contains("unknown variant `…`, expected"), "{err}");
        }
        let err = parse("[pool]\nstrategy = \"least_used\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown variant `least_used`"), "{err}");
    }
}
