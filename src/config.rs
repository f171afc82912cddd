//! The configuration: the TOML schema (`docs/configuration.md`), its validation, the
//! Warp2Api environment variables (`docs/migration.md`), and the error type that points
//! at `FILE:LINE:COL`.
//!
//! This module turns text into a checked [`Config`]; [`watch`] tells when
//! the files it read change. It owns no running state.

mod guard;
mod secret;
pub mod watch;

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::{HeaderName, HeaderValue, Uri};
use serde::{Deserialize, Serialize};
use toml::Spanned;

pub use guard::{check_reload, Bound};
pub use secret::{key_matches, Secret, SecretSource};

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
    /// Keys clients must present; empty means no client authentication.
    pub api_keys: Vec<Secret>,
    /// Largest request body buffered for replay; past it the client gets 413.
    pub max_request_body_bytes: usize,
    /// Allows binding a non-loopback address without any api key.
    pub allow_unauthenticated: bool,
    /// On shutdown, how long requests in flight (streams included) may
    /// take to finish before their connections are closed.
    pub shutdown_grace: Duration,
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
}

/// `[state]`.
#[derive(Debug, Clone, Default)]
pub struct StateConfig {
    /// The state file, resolved against the config folder.
    pub path: Option<PathBuf>,
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

const DEFAULT_UPSTREAM: &str = "https://app.warp.dev";
const DEFAULT_FIREBASE_URL: &str = "https://app.warp.dev/proxy/token";
const DEFAULT_QUOTA_PATTERN: &str = "(?i)no remaining quota|insufficient_quota|quota exceeded";

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

    /// Env-only mode: default settings plus the environment's tokens.
    pub fn from_env(env: EnvLookup) -> Result<Config, ConfigError> {
        Config::parse("", None, env)
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
        let raw: RawConfig = toml::from_str(text).map_err(|e| {
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
        Builder {
            base: &base,
            env,
            located: &located,
        }
        .build(raw, path, env)
    }

    /// The summary `tokenpool check` prints: never a secret.
    pub fn summary(&self) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        let source = self
            .path
            .as_ref()
            .map_or_else(|| "environment only".into(), |p| p.display().to_string());
        let _ = writeln!(out, "config:    {source}");
        let auth = if self.server.api_keys.is_empty() {
            "no client authentication".to_string()
        } else {
            format!("{} api key(s)", self.server.api_keys.len())
        };
        let _ = writeln!(out, "proxy:     {} ({auth})", self.server.listen);
        let admin_auth = if self.admin.token.is_some() {
            "bearer token"
        } else {
            "loopback clients only"
        };
        let _ = writeln!(
            out,
            "admin:     {} (/admin/*: {admin_auth})",
            self.admin.listen
        );
        let _ = writeln!(out, "upstream:  {}", self.upstream.url);
        let refresh_url = self
            .refresh
            .url
            .as_deref()
            .map(redact_query)
            .unwrap_or_else(|| "-".into());
        let _ = writeln!(
            out,
            "refresh:   {} {refresh_url}",
            self.refresh.provider.as_str()
        );
        let order: Vec<&str> = self.pool.order.iter().map(|t| t.as_str()).collect();
        let _ = writeln!(out, "order:     {}", order.join(" > "));
        let _ = writeln!(out, "tokens:    {}", self.tokens.len());
        for tier in &self.pool.order {
            let names: Vec<String> = self
                .tokens
                .iter()
                .filter(|t| t.tier == *tier)
                .map(|t| match t.origin {
                    TokenOrigin::File => t.name.clone(),
                    TokenOrigin::Env => format!("{} (env)", t.name),
                })
                .collect();
            let _ = writeln!(
                out,
                "  {:<10} {:>3}  {}",
                tier.as_str(),
                names.len(),
                names.join(", ")
            );
        }
        out
    }
}

/// A URL with its query string replaced by `?…`: Firebase refresh URLs
/// carry an API key there.
pub fn redact_query(url: &str) -> String {
    match url.split_once('?') {
        Some((base, _)) => format!("{base}?…"),
        None => url.to_string(),
    }
}

/// A parser message with every quoted string value replaced by `"…"`.
///
/// serde quotes the offending value (`invalid type: string "…", expected
/// u32`); when a secret was typed into the wrong field that would put it in
/// a log line and the `/admin/reload` answer. Field and variant names are
/// quoted with backticks and stay.
fn redact_quoted(message: &str) -> String {
    const MARK: &str = "string \"";
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    while let Some(at) = rest.find(MARK) {
        let value_start = at + MARK.len();
        let Some(len) = rest[value_start..].find('"') else {
            break;
        };
        out.push_str(&rest[..value_start]);
        out.push_str("…\"");
        rest = &rest[value_start + len + 1..];
    }
    out.push_str(rest);
    out
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

// ---------------------------------------------------------------------------
// The file as written.

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    server: RawServer,
    #[serde(default)]
    admin: RawAdmin,
    #[serde(default)]
    upstream: RawUpstream,
    #[serde(default)]
    refresh: RawRefresh,
    #[serde(default)]
    pool: RawPool,
    #[serde(default)]
    state: RawState,
    #[serde(default)]
    tokens: Vec<Spanned<RawToken>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServer {
    #[serde(default = "default_listen")]
    listen: Spanned<String>,
    #[serde(default)]
    api_keys: Vec<Spanned<SecretSource>>,
    #[serde(default = "default_max_body")]
    max_request_body_bytes: usize,
    #[serde(default)]
    allow_unauthenticated: bool,
    #[serde(default = "default_shutdown_grace", with = "humantime_serde")]
    shutdown_grace: Duration,
    #[serde(default = "default_header_read_timeout", with = "humantime_serde")]
    header_read_timeout: Duration,
    #[serde(default = "default_body_read_timeout", with = "humantime_serde")]
    body_read_timeout: Duration,
}

impl Default for RawServer {
    fn default() -> Self {
        RawServer {
            listen: default_listen(),
            api_keys: Vec::new(),
            max_request_body_bytes: default_max_body(),
            allow_unauthenticated: false,
            shutdown_grace: default_shutdown_grace(),
            header_read_timeout: default_header_read_timeout(),
            body_read_timeout: default_body_read_timeout(),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    #[serde(default = "default_admin_listen")]
    listen: Spanned<String>,
    token: Option<Spanned<SecretSource>>,
}

impl Default for RawAdmin {
    fn default() -> Self {
        RawAdmin {
            listen: default_admin_listen(),
            token: None,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUpstream {
    #[serde(default = "default_upstream")]
    url: Spanned<String>,
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    connect_timeout: Duration,
    #[serde(default = "default_idle_timeout", with = "humantime_serde")]
    idle_timeout: Duration,
    #[serde(default = "no_headers")]
    headers: Spanned<HashMap<String, String>>,
    #[serde(default)]
    ca_file: Option<Spanned<String>>,
}

impl Default for RawUpstream {
    fn default() -> Self {
        RawUpstream {
            url: default_upstream(),
            connect_timeout: default_connect_timeout(),
            idle_timeout: default_idle_timeout(),
            headers: no_headers(),
            ca_file: None,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRefresh {
    #[serde(default = "default_provider")]
    provider: Provider,
    url: Option<Spanned<String>>,
    #[serde(default = "no_headers")]
    headers: Spanned<HashMap<String, String>>,
    #[serde(default = "default_refresh_timeout", with = "humantime_serde")]
    timeout: Duration,
    #[serde(default = "default_margin", with = "humantime_serde")]
    margin: Duration,
    client_id: Option<String>,
    client_secret: Option<Spanned<SecretSource>>,
}

impl Default for RawRefresh {
    fn default() -> Self {
        RawRefresh {
            provider: default_provider(),
            url: None,
            headers: no_headers(),
            timeout: default_refresh_timeout(),
            margin: default_margin(),
            client_id: None,
            client_secret: None,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPool {
    #[serde(default = "default_order")]
    order: Spanned<Vec<Tier>>,
    #[serde(default = "default_failure_threshold")]
    failure_threshold: Spanned<u32>,
    #[serde(default = "default_cooldown", with = "humantime_serde")]
    cooldown: Duration,
    #[serde(default = "default_quota_cooldown", with = "humantime_serde")]
    quota_cooldown: Duration,
    #[serde(default = "default_max_cooldown", with = "humantime_serde")]
    max_cooldown: Duration,
    #[serde(default = "default_recovery_backoff", with = "humantime_serde")]
    recovery_backoff: Duration,
    #[serde(default = "default_max_recovery_backoff", with = "humantime_serde")]
    max_recovery_backoff: Duration,
    #[serde(default = "default_max_attempts")]
    max_attempts: Spanned<u32>,
    #[serde(default = "default_quota_pattern")]
    quota_pattern: Spanned<String>,
}

impl Default for RawPool {
    fn default() -> Self {
        RawPool {
            order: default_order(),
            failure_threshold: default_failure_threshold(),
            cooldown: default_cooldown(),
            quota_cooldown: default_quota_cooldown(),
            max_cooldown: default_max_cooldown(),
            recovery_backoff: default_recovery_backoff(),
            max_recovery_backoff: default_max_recovery_backoff(),
            max_attempts: default_max_attempts(),
            quota_pattern: default_quota_pattern(),
        }
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawState {
    path: Option<PathBuf>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawToken {
    name: Option<Spanned<String>>,
    tier: Tier,
    token: Spanned<SecretSource>,
}

fn no_headers() -> Spanned<HashMap<String, String>> {
    Spanned::new(0..0, HashMap::new())
}
fn default_listen() -> Spanned<String> {
    Spanned::new(0..0, "127.0.0.1:8080".into())
}
fn default_admin_listen() -> Spanned<String> {
    Spanned::new(0..0, "127.0.0.1:9090".into())
}
fn default_header_read_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_body_read_timeout() -> Duration {
    Duration::from_secs(60)
}
fn default_shutdown_grace() -> Duration {
    Duration::from_secs(30)
}
fn default_max_body() -> usize {
    10 * 1024 * 1024
}
fn default_upstream() -> Spanned<String> {
    Spanned::new(0..0, DEFAULT_UPSTREAM.into())
}
fn default_connect_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_idle_timeout() -> Duration {
    Duration::from_secs(120)
}
fn default_provider() -> Provider {
    Provider::Firebase
}
fn default_refresh_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_margin() -> Duration {
    Duration::from_secs(300)
}
fn default_order() -> Spanned<Vec<Tier>> {
    Spanned::new(0..0, Tier::ALL.to_vec())
}
fn default_failure_threshold() -> Spanned<u32> {
    Spanned::new(0..0, 3)
}
fn default_cooldown() -> Duration {
    Duration::from_secs(60)
}
fn default_quota_cooldown() -> Duration {
    Duration::from_secs(600)
}
fn default_max_cooldown() -> Duration {
    Duration::from_secs(6 * 3600)
}
fn default_recovery_backoff() -> Duration {
    Duration::from_secs(60)
}
fn default_max_recovery_backoff() -> Duration {
    Duration::from_secs(1800)
}
fn default_max_attempts() -> Spanned<u32> {
    Spanned::new(0..0, 3)
}
fn default_quota_pattern() -> Spanned<String> {
    Spanned::new(0..0, DEFAULT_QUOTA_PATTERN.into())
}

// ---------------------------------------------------------------------------
// Validation: raw → Config.

/// Name a token may have: it appears in metric labels and admin URLs.
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// The default name of a token: `<tier>-<first 8 hex of sha256(token)>`.
pub fn default_token_name(tier: Tier, secret: &Secret) -> String {
    format!("{}-{}", tier.as_str(), &secret.fingerprint()[..8])
}

struct Builder<'a> {
    base: &'a Path,
    env: EnvLookup<'a>,
    located: &'a dyn Fn(Option<Range<usize>>, String) -> ConfigError,
}

impl Builder<'_> {
    fn err<T>(&self, span: Range<usize>, message: impl Into<String>) -> Result<T, ConfigError> {
        // A default value carries the empty span 0..0: no position to show.
        let span = if span.is_empty() && span.start == 0 {
            None
        } else {
            Some(span)
        };
        Err((self.located)(span, message.into()))
    }

    fn secret(&self, src: &Spanned<SecretSource>) -> Result<Secret, ConfigError> {
        src.get_ref()
            .resolve(self.base, self.env)
            .or_else(|msg| self.err(src.span(), msg))
    }

    /// The certificates of a PEM file (relative to the config's folder).
    fn ca_certs(
        &self,
        file: &Spanned<String>,
    ) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>, ConfigError> {
        use rustls::pki_types::pem::PemObject;
        let path = self.base.join(file.get_ref());
        let certs: Result<Vec<_>, _> =
            rustls::pki_types::CertificateDer::pem_file_iter(&path).and_then(Iterator::collect);
        match certs {
            Ok(certs) if !certs.is_empty() => Ok(certs),
            Ok(_) => self.err(
                file.span(),
                format!("[upstream] ca_file {} holds no certificate", path.display()),
            ),
            Err(e) => self.err(
                file.span(),
                format!("[upstream] ca_file {}: {e}", path.display()),
            ),
        }
    }

    fn listen(&self, value: &Spanned<String>, what: &str) -> Result<SocketAddr, ConfigError> {
        value.get_ref().parse().or_else(|_| {
            self.err(
                value.span(),
                format!(
                    "{what} must be IP:PORT (for example 127.0.0.1:8080), got `{}`",
                    value.get_ref()
                ),
            )
        })
    }

    fn headers(
        &self,
        map: &Spanned<HashMap<String, String>>,
        what: &str,
    ) -> Result<Vec<(HeaderName, HeaderValue)>, ConfigError> {
        let mut out = Vec::with_capacity(map.get_ref().len());
        let mut keys: Vec<&String> = map.get_ref().keys().collect();
        keys.sort();
        for key in keys {
            let Ok(name) = HeaderName::from_bytes(key.as_bytes()) else {
                return self.err(
                    map.span(),
                    format!("{what}: `{key}` is not a valid header name"),
                );
            };
            let Ok(value) = HeaderValue::from_str(&map.get_ref()[key]) else {
                return self.err(
                    map.span(),
                    format!("{what}: the value of `{key}` is not a valid header value"),
                );
            };
            out.push((name, value));
        }
        Ok(out)
    }

    fn http_url(&self, value: &Spanned<String>, what: &str) -> Result<Uri, ConfigError> {
        let text = value.get_ref();
        let uri: Uri = match text.parse() {
            Ok(uri) => uri,
            Err(e) => return self.err(value.span(), format!("{what} is not a valid URL: {e}")),
        };
        match uri.scheme_str() {
            Some("http") | Some("https") => {}
            _ => {
                return self.err(
                    value.span(),
                    format!("{what} must start with http:// or https://"),
                )
            }
        }
        if uri.host().is_none_or(str::is_empty) {
            return self.err(value.span(), format!("{what} has no host"));
        }
        Ok(uri)
    }

    fn positive(&self, what: &str, d: Duration) -> Result<Duration, ConfigError> {
        if d.is_zero() {
            self.err(0..0, format!("{what} must be greater than zero"))
        } else {
            Ok(d)
        }
    }

    fn build(
        &self,
        raw: RawConfig,
        path: Option<&Path>,
        env: EnvLookup,
    ) -> Result<Config, ConfigError> {
        // [server]
        let listen = self.listen(&raw.server.listen, "[server] listen")?;
        let api_keys = raw
            .server
            .api_keys
            .iter()
            .map(|k| self.secret(k))
            .collect::<Result<Vec<_>, _>>()?;
        if api_keys.is_empty() && !listen.ip().is_loopback() && !raw.server.allow_unauthenticated {
            return self.err(
                raw.server.listen.span(),
                format!(
                    "[server] listen = {listen} is not a loopback address and no api_keys are set: \
                     add api_keys, or set allow_unauthenticated = true to serve anyone who can connect"
                ),
            );
        }
        if raw.server.max_request_body_bytes == 0 {
            return self.err(
                0..0,
                "[server] max_request_body_bytes must be greater than zero",
            );
        }
        let server = ServerConfig {
            listen,
            api_keys,
            max_request_body_bytes: raw.server.max_request_body_bytes,
            allow_unauthenticated: raw.server.allow_unauthenticated,
            shutdown_grace: raw.server.shutdown_grace,
            header_read_timeout: self.positive(
                "[server] header_read_timeout",
                raw.server.header_read_timeout,
            )?,
            body_read_timeout: self
                .positive("[server] body_read_timeout", raw.server.body_read_timeout)?,
        };

        // [admin]
        let admin_listen = self.listen(&raw.admin.listen, "[admin] listen")?;
        if guard::same_socket(admin_listen, listen) {
            return self.err(
                raw.admin.listen.span(),
                format!("[admin] listen = {admin_listen} is the proxy's address too: give each listener its own"),
            );
        }
        let admin = AdminConfig {
            listen: admin_listen,
            token: raw
                .admin
                .token
                .as_ref()
                .map(|t| self.secret(t))
                .transpose()?,
        };

        // [upstream]
        let upstream_url = self.http_url(&raw.upstream.url, "[upstream] url")?;
        if upstream_url.query().is_some() {
            return self.err(
                raw.upstream.url.span(),
                "[upstream] url must not have a query string",
            );
        }
        let upstream = UpstreamConfig {
            url: upstream_url,
            connect_timeout: self
                .positive("[upstream] connect_timeout", raw.upstream.connect_timeout)?,
            idle_timeout: self.positive("[upstream] idle_timeout", raw.upstream.idle_timeout)?,
            headers: self.headers(&raw.upstream.headers, "[upstream] headers")?,
            ca_certs: match &raw.upstream.ca_file {
                Some(file) => self.ca_certs(file)?,
                None => Vec::new(),
            },
        };

        // [refresh]
        let refresh_url = match (&raw.refresh.url, raw.refresh.provider) {
            (Some(url), _) => {
                self.http_url(url, "[refresh] url")?;
                Some(url.get_ref().clone())
            }
            (None, Provider::Firebase) => Some(DEFAULT_FIREBASE_URL.to_string()),
            (None, Provider::Oauth2) => {
                return self.err(0..0, "[refresh] url is required for provider \"oauth2\"")
            }
            (None, Provider::Static) => None,
        };
        if raw.refresh.provider != Provider::Oauth2
            && (raw.refresh.client_id.is_some() || raw.refresh.client_secret.is_some())
        {
            return self.err(
                0..0,
                "[refresh] client_id and client_secret are for provider \"oauth2\" only",
            );
        }
        let refresh = RefreshConfig {
            provider: raw.refresh.provider,
            url: refresh_url,
            headers: self.headers(&raw.refresh.headers, "[refresh] headers")?,
            timeout: self.positive("[refresh] timeout", raw.refresh.timeout)?,
            margin: raw.refresh.margin,
            client_id: raw.refresh.client_id.clone(),
            client_secret: raw
                .refresh
                .client_secret
                .as_ref()
                .map(|s| self.secret(s))
                .transpose()?,
        };

        // [pool]
        let p = &raw.pool;
        let order = p.order.get_ref().clone();
        if order.is_empty() {
            return self.err(p.order.span(), "[pool] order must name at least one tier");
        }
        let unique: HashSet<Tier> = order.iter().copied().collect();
        if unique.len() != order.len() {
            return self.err(p.order.span(), "[pool] order names a tier twice");
        }
        if *p.failure_threshold.get_ref() == 0 {
            return self.err(
                p.failure_threshold.span(),
                "[pool] failure_threshold must be at least 1",
            );
        }
        if *p.max_attempts.get_ref() == 0 {
            return self.err(
                p.max_attempts.span(),
                "[pool] max_attempts must be at least 1",
            );
        }
        let quota_pattern = match regex::Regex::new(p.quota_pattern.get_ref()) {
            Ok(re) => re,
            Err(e) => {
                let first = e.to_string();
                let first = first.lines().last().unwrap_or("invalid").trim().to_string();
                return self.err(
                    p.quota_pattern.span(),
                    format!("[pool] quota_pattern does not compile: {first}"),
                );
            }
        };
        let pool = PoolConfig {
            order,
            failure_threshold: *p.failure_threshold.get_ref(),
            cooldown: self.positive("[pool] cooldown", p.cooldown)?,
            quota_cooldown: self.positive("[pool] quota_cooldown", p.quota_cooldown)?,
            max_cooldown: self.positive("[pool] max_cooldown", p.max_cooldown)?,
            recovery_backoff: self.positive("[pool] recovery_backoff", p.recovery_backoff)?,
            max_recovery_backoff: self
                .positive("[pool] max_recovery_backoff", p.max_recovery_backoff)?,
            max_attempts: *p.max_attempts.get_ref(),
            quota_pattern,
        };
        if pool.max_cooldown < pool.cooldown || pool.max_cooldown < pool.quota_cooldown {
            return self.err(
                0..0,
                "[pool] max_cooldown must be at least cooldown and quota_cooldown",
            );
        }
        if pool.max_recovery_backoff < pool.recovery_backoff {
            return self.err(
                0..0,
                "[pool] max_recovery_backoff must be at least recovery_backoff",
            );
        }

        // [state]
        let state = StateConfig {
            path: raw.state.path.as_ref().map(|p| self.base.join(p)),
        };

        // [[tokens]]
        let mut tokens = Vec::new();
        let mut read_files: Vec<PathBuf> = raw
            .upstream
            .ca_file
            .iter()
            .map(|f| self.base.join(f.get_ref()))
            .collect();
        let mut names: HashMap<String, ()> = HashMap::new();
        let mut secrets: HashSet<Secret> = HashSet::new();
        for entry in &raw.tokens {
            let t = entry.get_ref();
            let secret = self.secret(&t.token)?;
            if let Some(file) = t.token.get_ref().file(self.base) {
                read_files.push(file);
            }
            let name = match &t.name {
                Some(name) => {
                    if !valid_name(name.get_ref()) {
                        return self.err(
                            name.span(),
                            format!(
                                "token name `{}` must be 1–64 characters of A-Z a-z 0-9 - _ .",
                                name.get_ref()
                            ),
                        );
                    }
                    name.get_ref().clone()
                }
                None => default_token_name(t.tier, &secret),
            };
            let span = t.name.as_ref().map_or_else(|| entry.span(), |n| n.span());
            if names.insert(name.clone(), ()).is_some() {
                return self.err(span, format!("duplicate token name `{name}`"));
            }
            if !secrets.insert(secret.clone()) {
                return self.err(
                    t.token.span(),
                    format!("token `{name}` has the same secret as an earlier token"),
                );
            }
            if !pool.order.contains(&t.tier) {
                return self.err(
                    entry.span(),
                    format!(
                        "token `{name}` is in tier {} which [pool] order leaves out",
                        t.tier
                    ),
                );
            }
            tokens.push(TokenConfig {
                name,
                tier: t.tier,
                secret,
                origin: TokenOrigin::File,
            });
        }
        for (tier, secret) in env_tokens(env) {
            if !pool.order.contains(&tier) || !secrets.insert(secret.clone()) {
                // Already configured in the file, or a tier the order leaves out.
                continue;
            }
            let name = default_token_name(tier, &secret);
            if names.insert(name.clone(), ()).is_some() {
                continue;
            }
            tokens.push(TokenConfig {
                name,
                tier,
                secret,
                origin: TokenOrigin::Env,
            });
        }

        Ok(Config {
            path: path.map(Path::to_path_buf),
            server,
            admin,
            upstream,
            refresh,
            pool,
            state,
            tokens,
            read_files,
        })
    }
}

/// The tokens named by the Warp2Api environment variables, in order.
fn env_tokens(env: EnvLookup) -> Vec<(Tier, Secret)> {
    let mut out = Vec::new();
    let mut one = |var: &str, tier: Tier, list: bool| {
        if let Some(value) = env(var) {
            let parts: Vec<&str> = if list {
                value.split(',').collect()
            } else {
                vec![value.as_str()]
            };
            for part in parts {
                let part = part.trim();
                if !part.is_empty() {
                    out.push((tier, Secret::new(part)));
                }
            }
        }
    };
    one("WARP_REFRESH_TOKEN", Tier::Personal, false);
    one("WARP_PERSONAL_TOKENS", Tier::Personal, true);
    one("WARP_SHARED_TOKENS", Tier::Shared, true);
    one("WARP_ANONYMOUS_TOKEN", Tier::Anonymous, false);
    out
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
    fn empty_text_is_all_defaults() {
        let c = parse("").unwrap();
        assert_eq!(c.server.listen, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(c.pool.order, Tier::ALL.to_vec());
        assert_eq!(c.pool.max_attempts, 3);
        assert_eq!(c.refresh.provider, Provider::Firebase);
        assert!(c.tokens.is_empty());
    }

    #[test]
    fn line_col_counts_from_one() {
        assert_eq!(line_col("ab\ncd", 0), (1, 1));
        assert_eq!(line_col("ab\ncd", 4), (2, 2));
        assert_eq!(line_col("é\nx", 3), (2, 1));
    }

    #[test]
    fn default_names_use_the_fingerprint() {
        let c = parse("[[tokens]]\ntier = \"shared\"\ntoken = \"abc\"\n").unwrap();
        assert_eq!(c.tokens[0].name, "shared-ba7816bf");
    }

    #[test]
    fn env_tokens_are_added_once() {
        let env = |name: &str| match name {
            "WARP_REFRESH_TOKEN" => Some("abc".to_string()),
            "WARP_PERSONAL_TOKENS" => Some("abc, def,,".to_string()),
            "WARP_SHARED_TOKENS" => Some("ghi".to_string()),
            "WARP_ANONYMOUS_TOKEN" => Some("jkl".to_string()),
            _ => None,
        };
        let c = Config::from_env(&env).unwrap();
        let got: Vec<(Tier, &str)> = c
            .tokens
            .iter()
            .map(|t| (t.tier, t.secret.expose()))
            .collect();
        assert_eq!(
            got,
            vec![
                (Tier::Personal, "abc"),
                (Tier::Personal, "def"),
                (Tier::Shared, "ghi"),
                (Tier::Anonymous, "jkl")
            ]
        );
        // A secret already in the file is not added again.
        let c = Config::parse(
            "[[tokens]]\nname = \"a\"\ntier = \"personal\"\ntoken = \"abc\"\n",
            Some(Path::new("t.toml")),
            &env,
        )
        .unwrap();
        assert_eq!(c.tokens.len(), 4);
        assert_eq!(c.tokens[0].name, "a");
        assert!(c
            .tokens
            .iter()
            .skip(1)
            .all(|t| t.origin == TokenOrigin::Env));
    }

    #[test]
    fn summary_never_shows_a_secret() {
        let c = parse(
            "[server]\napi_keys = [\"client-key-1\"]\n[admin]\ntoken = \"admin-tok\"\n\
             [refresh]\nurl = \"https://x.test/token?key=AIzaSECRET\"\n\
             [[tokens]]\nname = \"alice\"\ntier = \"personal\"\ntoken = \"rt-alice\"\n",
        )
        .unwrap();
        let s = c.summary();
        for secret in ["client-key-1", "admin-tok", "AIzaSECRET", "rt-alice"] {
            assert!(!s.contains(secret), "{secret} leaked:\n{s}");
        }
        assert!(s.contains("alice"));
        assert!(!format!("{c:?}").contains("rt-alice"));
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
    }

    #[test]
    fn errors_are_located() {
        let cases: &[(&str, &str)] = &[
            (
                "[server]\nlisten = \"nope\"\n",
                "t.toml:2:10: [server] listen must be IP:PORT",
            ),
            ("[pool]\nbogus = 1\n", "t.toml:2:1: unknown field `bogus`"),
            ("[pool]\ncooldown = \"soon\"\n", "t.toml:2:12:"),
            (
                "[pool]\nquota_pattern = \"(\"\n",
                "t.toml:2:17: [pool] quota_pattern does not compile",
            ),
            (
                "[server]\nlisten = \"0.0.0.0:80\"\n",
                "t.toml:2:10: [server] listen = 0.0.0.0:80 is not a loopback",
            ),
        ];
        for (text, want) in cases {
            let got = parse(text).unwrap_err().to_string();
            assert!(
                got.starts_with(want),
                "for {text:?}\n got: {got}\nwant: {want}"
            );
        }
    }
}
