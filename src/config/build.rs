//! Validation: the file as written ([`super::raw`]) becomes a checked
//! [`Config`], or an error at the `LINE:COL` of the value that is wrong.
//! Presets and the Warp2Api environment variables are applied here too.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, HeaderValue, Uri};
use toml::Spanned;

use super::raw::{
    unplaced, Preset, RawAdmin, RawClient, RawClientKey, RawCluster, RawConfig, RawPool, RawQuota,
    RawRefresh, RawServer, RawToken, RawUpstream,
};
use super::routes::{Route, WARP_ROUTES};
use super::{
    duration, guard, AdminConfig, ClientKey, ClientPolicy, ClusterConfig, Config, ConfigError,
    EnvLookup, LogConfig, PoolConfig, Provider, QuotaConfig, QuotaProvider, RefreshConfig, Secret,
    SecretSource, ServerConfig, StateConfig, Tier, TokenConfig, TokenOrigin, UpstreamConfig,
};

/// Warp's AI API.
const WARP_UPSTREAM: &str = "https://app.warp.dev";
/// Warp's refresh endpoint, without its `key=`.
const WARP_REFRESH_URL: &str = "https://app.warp.dev/proxy/token";
/// The client headers Warp's endpoints expect (`docs/warp.md`); explicit
/// `[upstream] headers` and `[refresh] headers` win over them.
const WARP_CLIENT_HEADERS: [(&str, &str); 5] = [
    ("x-warp-client-version", "v0.2025.10.29.08.12.stable_01"),
    ("x-warp-os-category", "Linux"),
    ("x-warp-os-name", "Debian"),
    ("x-warp-os-version", "12"),
    ("x-warp-client-id", "warp-app"),
];

/// Environment variables of env-only mode, besides the Warp2Api tokens.
pub(super) const ENV_LISTEN: &str = "TOKENPOOL_LISTEN";
pub(super) const ENV_API_KEY: &str = "TOKENPOOL_API_KEY";
pub(super) const ENV_REFRESH_URL: &str = "TOKENPOOL_REFRESH_URL";
pub(super) const ENV_WARP_API_KEY: &str = "TOKENPOOL_WARP_API_KEY";

/// Name a token or client key may have: it appears in metric labels,
/// logs and admin URLs.
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

/// The configuration of env-only mode: Warp's preset, and what the
/// environment sets (`docs/migration.md`).
pub(super) fn env_only(env: EnvLookup) -> RawConfig {
    let mut raw = RawConfig::default();
    raw.upstream.preset = Some(unplaced(Preset::Warp));
    if let Some(listen) = env(ENV_LISTEN) {
        raw.server.listen = unplaced(listen);
    }
    if env(ENV_API_KEY).is_some() {
        raw.server.api_keys = vec![unplaced(RawClientKey::Bare(SecretSource::Env(
            ENV_API_KEY.into(),
        )))];
    }
    if let Some(url) = env(ENV_REFRESH_URL) {
        raw.refresh.url = Some(unplaced(url));
    }
    if env(ENV_WARP_API_KEY).is_some() {
        raw.refresh.key = Some(unplaced(SecretSource::Env(ENV_WARP_API_KEY.into())));
    }
    raw
}

pub(super) struct Builder<'a> {
    pub base: &'a Path,
    pub env: EnvLookup<'a>,
    pub located: &'a dyn Fn(Option<Range<usize>>, String) -> ConfigError,
    /// Every file a secret or a CA came from, in the order read: what the
    /// watcher follows (`Config::read_files`).
    pub read: RefCell<Vec<PathBuf>>,
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
        self.resolve(src.get_ref(), src.span())
    }

    /// A secret from where `source` says, noting the file it came from.
    fn resolve(&self, source: &SecretSource, span: Range<usize>) -> Result<Secret, ConfigError> {
        if let Some(file) = source.file(self.base) {
            self.read.borrow_mut().push(file);
        }
        source
            .resolve(self.base, self.env)
            .or_else(|msg| self.err(span, msg))
    }

    /// A duration, written as [`duration::parse`] reads it.
    fn duration(&self, value: &Spanned<String>, what: &str) -> Result<Duration, ConfigError> {
        duration::parse(value.get_ref()).or_else(|e| {
            self.err(
                value.span(),
                format!("{what} = {} {e}", super::shown(value.get_ref())),
            )
        })
    }

    /// A duration that must be more than zero.
    fn positive(&self, value: &Spanned<String>, what: &str) -> Result<Duration, ConfigError> {
        let d = self.duration(value, what)?;
        if d.is_zero() {
            return self.err(value.span(), format!("{what} must be greater than zero"));
        }
        Ok(d)
    }

    /// The certificates of a PEM file (relative to the config's folder).
    fn ca_certs(
        &self,
        file: &Spanned<String>,
        what: &str,
    ) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>, ConfigError> {
        use rustls::pki_types::pem::PemObject;
        let path = self.base.join(file.get_ref());
        self.read.borrow_mut().push(path.clone());
        let certs: Result<Vec<_>, _> =
            rustls::pki_types::CertificateDer::pem_file_iter(&path).and_then(Iterator::collect);
        match certs {
            Ok(certs) if !certs.is_empty() => Ok(certs),
            Ok(_) => self.err(
                file.span(),
                format!("{what} {} holds no certificate", path.display()),
            ),
            Err(e) => self.err(file.span(), format!("{what} {}: {e}", path.display())),
        }
    }

    /// A name (of a token, a client key, a node): 1–64 characters of
    /// A-Z a-z 0-9 - _ . ; a bad one is shown only if short (a secret
    /// typed into the wrong line is not echoed).
    fn name(&self, value: &Spanned<String>, what: &str) -> Result<String, ConfigError> {
        if valid_name(value.get_ref()) {
            return Ok(value.get_ref().clone());
        }
        self.err(
            value.span(),
            format!(
                "{what} `{}` must be 1–64 characters of A-Z a-z 0-9 - _ .",
                super::shown(value.get_ref()).trim_matches('"')
            ),
        )
    }

    fn listen(&self, value: &Spanned<String>, what: &str) -> Result<SocketAddr, ConfigError> {
        value.get_ref().parse().or_else(|_| {
            self.err(
                value.span(),
                format!(
                    "{what} must be IP:PORT (for example 127.0.0.1:8080), not {}",
                    super::shown(value.get_ref())
                ),
            )
        })
    }

    /// The headers of `map`, on top of `defaults` (a map's header replaces
    /// a default of the same name).
    fn headers(
        &self,
        map: &Spanned<HashMap<String, String>>,
        defaults: &[(&'static str, &'static str)],
        what: &str,
    ) -> Result<Vec<(HeaderName, HeaderValue)>, ConfigError> {
        let mut out = Vec::with_capacity(map.get_ref().len() + defaults.len());
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
        for (name, value) in defaults {
            let name = HeaderName::from_static(name);
            if !out.iter().any(|(n, _)| *n == name) {
                out.push((name, HeaderValue::from_static(value)));
            }
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

    /// `[server] api_keys`: named, unique by name and by secret.
    fn client_keys(&self, raw: &[Spanned<RawClientKey>]) -> Result<Vec<ClientKey>, ConfigError> {
        let mut keys: Vec<ClientKey> = Vec::with_capacity(raw.len());
        for (i, entry) in raw.iter().enumerate() {
            let (name, secret) = match entry.get_ref() {
                RawClientKey::Bare(source) => (
                    format!("key-{}", i + 1),
                    self.resolve(source, entry.span())?,
                ),
                RawClientKey::Named { name, key } => {
                    (self.name(name, "client key name")?, self.secret(key)?)
                }
            };
            if keys.iter().any(|k| *k.name == *name) {
                return self.err(entry.span(), format!("duplicate client key name `{name}`"));
            }
            if keys.iter().any(|k| k.secret == secret) {
                return self.err(
                    entry.span(),
                    format!("client key `{name}` is the same key as an earlier one"),
                );
            }
            keys.push(ClientKey {
                name: Arc::from(name),
                secret,
                policy: Arc::default(),
            });
        }
        Ok(keys)
    }

    pub(super) fn build(&self, raw: RawConfig, path: Option<&Path>) -> Result<Config, ConfigError> {
        let server = self.server(&raw.server)?;
        let admin = self.admin(&raw.admin, server.listen)?;
        let preset = raw
            .upstream
            .preset
            .as_ref()
            .filter(|p| *p.get_ref() == Preset::Warp);
        let client_headers: &[(&'static str, &'static str)] = if preset.is_some() {
            &WARP_CLIENT_HEADERS
        } else {
            &[]
        };
        let upstream = self.upstream(&raw.upstream, preset.is_some(), client_headers)?;
        let refresh = self.refresh(&raw.refresh, preset, path.is_some(), client_headers)?;
        let pool = self.pool(&raw.pool)?;
        let mut server = server;
        self.clients(&raw.clients, &pool.order, &mut server.api_keys)?;
        let listen = server.listen;
        if server.api_keys.is_empty() && !listen.ip().is_loopback() && !server.allow_unauthenticated
        {
            return self.err(
                raw.server.listen.span(),
                format!(
                    "[server] listen = {listen} is not a loopback address and no api_keys or \
                     [[clients]] are set: add them, or set allow_unauthenticated = true to serve \
                     anyone who can connect"
                ),
            );
        }
        // [state]: a relative path is relative to the working directory
        // (the config's folder may be a read-only mount).
        let state = StateConfig {
            path: raw.state.path.as_ref().map(|p| p.get_ref().clone()),
        };
        let log = LogConfig {
            access: raw.log.access,
        };
        let quota = self.quota(&raw.quota, &upstream.url)?;
        let cluster = raw.cluster.as_ref().map(|c| self.cluster(c)).transpose()?;
        let tokens = self.tokens(&raw.tokens, &pool.order)?;
        Ok(Config {
            path: path.map(Path::to_path_buf),
            server,
            admin,
            upstream,
            refresh,
            pool,
            state,
            log,
            cluster,
            quota,
            tokens,
            // Each file once, in the order read.
            read_files: {
                let mut seen = HashSet::new();
                self.read
                    .take()
                    .into_iter()
                    .filter(|f| seen.insert(f.clone()))
                    .collect()
            },
        })
    }

    /// `[server]`.
    fn server(&self, s: &RawServer) -> Result<ServerConfig, ConfigError> {
        let listen = self.listen(&s.listen, "[server] listen")?;
        let api_keys = self.client_keys(&s.api_keys)?;
        let max_body = &s.max_request_body_bytes;
        if *max_body.get_ref() == 0 {
            return self.err(
                max_body.span(),
                "[server] max_request_body_bytes must be greater than zero",
            );
        }
        Ok(ServerConfig {
            listen,
            api_keys,
            max_request_body_bytes: *max_body.get_ref(),
            allow_unauthenticated: s.allow_unauthenticated,
            shutdown_grace: self.duration(&s.shutdown_grace, "[server] shutdown_grace")?,
            drain_delay: self.duration(&s.drain_delay, "[server] drain_delay")?,
            header_read_timeout: self
                .positive(&s.header_read_timeout, "[server] header_read_timeout")?,
            body_read_timeout: self.positive(&s.body_read_timeout, "[server] body_read_timeout")?,
        })
    }

    /// `[admin]`, whose listener must not be the proxy's (`proxy`).
    fn admin(&self, a: &RawAdmin, proxy: SocketAddr) -> Result<AdminConfig, ConfigError> {
        let admin_listen = self.listen(&a.listen, "[admin] listen")?;
        if guard::same_socket(admin_listen, proxy) {
            return self.err(
                a.listen.span(),
                format!("[admin] listen = {admin_listen} is the proxy's address too: give each listener its own"),
            );
        }
        Ok(AdminConfig {
            listen: admin_listen,
            token: a.token.as_ref().map(|t| self.secret(t)).transpose()?,
        })
    }

    /// `[upstream]`; `warp`: under the Warp preset, whose routes and
    /// `client_headers` are the defaults.
    fn upstream(
        &self,
        u: &RawUpstream,
        warp: bool,
        client_headers: &[(&'static str, &'static str)],
    ) -> Result<UpstreamConfig, ConfigError> {
        let default_url = unplaced(WARP_UPSTREAM.to_string());
        let url_value = u.url.as_ref().unwrap_or(&default_url);
        let upstream_url = self.http_url(url_value, "[upstream] url")?;
        if upstream_url.query().is_some() {
            return self.err(
                url_value.span(),
                "[upstream] url must not have a query string",
            );
        }
        if upstream_url.path().len() > 4096 {
            // With a client's target (at most 16 KiB) it must stay a path.
            return self.err(
                url_value.span(),
                "[upstream] url has a path longer than 4096 bytes",
            );
        }
        Ok(UpstreamConfig {
            url: upstream_url,
            connect_timeout: self.positive(&u.connect_timeout, "[upstream] connect_timeout")?,
            idle_timeout: self.positive(&u.idle_timeout, "[upstream] idle_timeout")?,
            headers: self.headers(&u.headers, client_headers, "[upstream] headers")?,
            ca_certs: match &u.ca_file {
                Some(file) => self.ca_certs(file, "[upstream] ca_file")?,
                None => Vec::new(),
            },
            routes: self.routes(u.routes.as_ref(), warp)?,
        })
    }

    /// `[upstream] routes`: as written, else the Warp preset's, else none
    /// (every request is forwarded; `check` warns).
    fn routes(
        &self,
        routes: Option<&Spanned<Vec<Spanned<String>>>>,
        warp: bool,
    ) -> Result<Option<Vec<Route>>, ConfigError> {
        match routes {
            Some(list) => self.route_list(list, "[upstream] routes").map(Some),
            None => Ok(warp.then(|| {
                WARP_ROUTES
                    .iter()
                    .map(|r| Route::parse(r).expect("the preset's routes are valid"))
                    .collect()
            })),
        }
    }

    /// A list of routes, never empty; `what` names it in errors.
    fn route_list(
        &self,
        list: &Spanned<Vec<Spanned<String>>>,
        what: &str,
    ) -> Result<Vec<Route>, ConfigError> {
        if list.get_ref().is_empty() {
            return self.err(
                list.span(),
                format!(
                    "{what} is empty: nothing would be forwarded. List the routes, or leave \
                     routes out"
                ),
            );
        }
        list.get_ref()
            .iter()
            .map(|route| {
                Route::parse(route.get_ref())
                    .or_else(|e| self.err(route.span(), format!("{what}: {e}")))
            })
            .collect()
    }

    /// `[[clients]]`: each client's keys join `keys` (the short form's),
    /// sharing its policy. Names are unique across both forms, and so are
    /// keys; a client's tiers must be in `order`.
    fn clients(
        &self,
        raw: &[Spanned<RawClient>],
        order: &[Tier],
        keys: &mut Vec<ClientKey>,
    ) -> Result<(), ConfigError> {
        for entry in raw {
            let c = entry.get_ref();
            let name = self.name(&c.name, "client name")?;
            if keys.iter().any(|k| *k.name == *name) {
                return self.err(c.name.span(), format!("duplicate client name `{name}`"));
            }
            let what = format!("client `{name}`");
            let tiers = match &c.tiers {
                None => None,
                Some(list) => {
                    if list.get_ref().is_empty() {
                        return self.err(
                            list.span(),
                            format!("{what}: tiers is empty; leave it out for every tier"),
                        );
                    }
                    if let Some(t) = list.get_ref().iter().find(|t| !order.contains(t)) {
                        return self.err(
                            list.span(),
                            format!("{what}: tier {t} is one [pool] order leaves out"),
                        );
                    }
                    Some(list.get_ref().clone())
                }
            };
            let routes = c
                .routes
                .as_ref()
                .map(|list| self.route_list(list, &format!("{what} routes")))
                .transpose()?;
            if c.keys.get_ref().is_empty() {
                return self.err(c.keys.span(), format!("{what} has no keys"));
            }
            let policy = Arc::new(ClientPolicy { tiers, routes });
            let name: Arc<str> = Arc::from(name);
            for key in c.keys.get_ref() {
                let secret = self.secret(key)?;
                if keys.iter().any(|k| k.secret == secret) {
                    return self.err(
                        key.span(),
                        format!("a key of {what} is the same key as an earlier one"),
                    );
                }
                keys.push(ClientKey {
                    name: Arc::clone(&name),
                    secret,
                    policy: Arc::clone(&policy),
                });
            }
        }
        Ok(())
    }

    /// `[refresh]`; `preset`: the Warp preset, where it is set;
    /// `from_file`: not env-only mode.
    fn refresh(
        &self,
        r: &RawRefresh,
        preset: Option<&Spanned<Preset>>,
        from_file: bool,
        client_headers: &[(&'static str, &'static str)],
    ) -> Result<RefreshConfig, ConfigError> {
        let provider = r.provider;
        let key = r.key.as_ref().map(|k| self.secret(k)).transpose()?;
        let refresh_url = match (&r.url, provider) {
            (Some(url), _) => {
                self.http_url(url, "[refresh] url")?;
                if key.is_some() {
                    return self.err(
                        url.span(),
                        "[refresh] key goes into the preset's refresh URL: with a full url, put the key in it",
                    );
                }
                Some(url.get_ref().clone())
            }
            (None, Provider::Firebase) => Some(match &key {
                Some(key) => {
                    let mut url = format!("{WARP_REFRESH_URL}?key=");
                    super::form_encode(key.expose(), &mut url);
                    url
                }
                // env-only mode starts without one and says so (`warnings`).
                None if preset.is_some() && from_file => {
                    let at = preset.map_or(0..0, |p| p.span());
                    return self.err(
                        at,
                        "preset \"warp\" needs [refresh] key (Warp's Firebase web API key), \
                         or a whole [refresh] url",
                    );
                }
                None => WARP_REFRESH_URL.to_string(),
            }),
            (None, Provider::Oauth2) => {
                return self.err(0..0, "[refresh] url is required for provider \"oauth2\"")
            }
            (None, Provider::Static) => None,
        };
        if provider != Provider::Oauth2 && (r.client_id.is_some() || r.client_secret.is_some()) {
            let at = r.client_secret.as_ref().map_or(0..0, |s| s.span());
            return self.err(
                at,
                "[refresh] client_id and client_secret are for provider \"oauth2\" only",
            );
        }
        Ok(RefreshConfig {
            provider,
            url: refresh_url,
            headers: self.headers(&r.headers, client_headers, "[refresh] headers")?,
            timeout: self.positive(&r.timeout, "[refresh] timeout")?,
            margin: self.duration(&r.margin, "[refresh] margin")?,
            client_id: r.client_id.clone(),
            client_secret: r
                .client_secret
                .as_ref()
                .map(|s| self.secret(s))
                .transpose()?,
        })
    }

    /// `[pool]`.
    fn pool(&self, p: &RawPool) -> Result<PoolConfig, ConfigError> {
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
            cooldown: self.positive(&p.cooldown, "[pool] cooldown")?,
            quota_cooldown: self.positive(&p.quota_cooldown, "[pool] quota_cooldown")?,
            max_cooldown: self.positive(&p.max_cooldown, "[pool] max_cooldown")?,
            recovery_backoff: self.positive(&p.recovery_backoff, "[pool] recovery_backoff")?,
            max_recovery_backoff: self
                .positive(&p.max_recovery_backoff, "[pool] max_recovery_backoff")?,
            max_attempts: *p.max_attempts.get_ref(),
            quota_pattern,
            strategy: p.strategy,
            affinity_header: p
                .affinity_header
                .as_ref()
                .map(|h| self.affinity_header(h))
                .transpose()?,
        };
        if pool.max_cooldown < pool.cooldown || pool.max_cooldown < pool.quota_cooldown {
            return self.err(
                p.max_cooldown.span(),
                "[pool] max_cooldown must be at least cooldown and quota_cooldown",
            );
        }
        if pool.max_recovery_backoff < pool.recovery_backoff {
            return self.err(
                p.max_recovery_backoff.span(),
                "[pool] max_recovery_backoff must be at least recovery_backoff",
            );
        }
        Ok(pool)
    }

    /// `[quota]`; the Warp poller's URL defaults to `upstream`'s host.
    fn quota(&self, q: &RawQuota, upstream: &Uri) -> Result<QuotaConfig, ConfigError> {
        let interval = self.positive(&q.interval, "[quota] interval")?;
        if interval < Duration::from_secs(10) {
            return self.err(q.interval.span(), "[quota] interval must be at least 10s");
        }
        let quota_url = match (&q.url, q.provider) {
            (Some(url), QuotaProvider::Warp) => {
                self.http_url(url, "[quota] url")?;
                Some(url.get_ref().clone())
            }
            (Some(url), QuotaProvider::None) => {
                return self.err(url.span(), "[quota] url needs provider = \"warp\"");
            }
            (None, QuotaProvider::Warp) => Some(warp_quota_url(upstream)),
            (None, QuotaProvider::None) => None,
        };
        Ok(QuotaConfig {
            provider: q.provider,
            url: quota_url,
            interval,
        })
    }

    /// `[[tokens]]`, then the tokens of the environment (Warp2Api's
    /// variables) not already there; `order`: the tiers in use.
    fn tokens(
        &self,
        raw: &[Spanned<RawToken>],
        order: &[Tier],
    ) -> Result<Vec<TokenConfig>, ConfigError> {
        let mut tokens = Vec::new();
        let mut names: HashSet<String> = HashSet::new();
        let mut secrets: HashSet<Secret> = HashSet::new();
        for entry in raw {
            let t = entry.get_ref();
            let secret = self.secret(&t.token)?;
            let name = match &t.name {
                Some(name) => self.name(name, "token name")?,
                None => default_token_name(t.tier, &secret),
            };
            let span = t.name.as_ref().map_or_else(|| entry.span(), |n| n.span());
            if !names.insert(name.clone()) {
                return self.err(span, format!("duplicate token name `{name}`"));
            }
            if !secrets.insert(secret.clone()) {
                return self.err(
                    t.token.span(),
                    format!("token `{name}` has the same secret as an earlier token"),
                );
            }
            if !order.contains(&t.tier) {
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
        for (tier, secret) in env_tokens(self.env) {
            if !order.contains(&tier) || !secrets.insert(secret.clone()) {
                // Already configured in the file, or a tier the order leaves out.
                continue;
            }
            let name = default_token_name(tier, &secret);
            if !names.insert(name.clone()) {
                continue;
            }
            tokens.push(TokenConfig {
                name,
                tier,
                secret,
                origin: TokenOrigin::Env,
            });
        }
        Ok(tokens)
    }

    /// `[pool] affinity_header`: a header name that is not one the proxy
    /// owns (credentials, framing, hop-by-hop).
    fn affinity_header(&self, value: &Spanned<String>) -> Result<HeaderName, ConfigError> {
        let name = HeaderName::from_bytes(value.get_ref().trim().as_bytes()).or_else(|_| {
            self.err(
                value.span(),
                format!(
                    "[pool] affinity_header {} is not a header name",
                    super::shown(value.get_ref())
                ),
            )
        })?;
        const OWNED: [&str; 16] = [
            "authorization",
            "x-api-key",
            "host",
            "content-length",
            "transfer-encoding",
            "connection",
            "keep-alive",
            "te",
            "trailer",
            "upgrade",
            "x-request-id",
            "cookie",
            "expect",
            "http2-settings",
            "content-type",
            "content-encoding",
        ];
        if OWNED.contains(&name.as_str()) || name.as_str().starts_with("proxy-") {
            return self.err(
                value.span(),
                format!(
                    "[pool] affinity_header {} is a header the proxy reads or sets itself; \
                     use one of your own, such as x-session-id",
                    name.as_str()
                ),
            );
        }
        Ok(name)
    }

    /// `[cluster]`. The URL is a secret: what is wrong with it is said
    /// without showing it.
    fn cluster(&self, c: &RawCluster) -> Result<ClusterConfig, ConfigError> {
        let redis = self.secret(&c.redis)?;
        let url = redis.expose();
        let scheme_ok = url.starts_with("redis://") || url.starts_with("rediss://");
        if !scheme_ok || redis::IntoConnectionInfo::into_connection_info(url).is_err() {
            return self.err(
                c.redis.span(),
                "[cluster] redis is not a redis:// or rediss:// URL \
                 (redis://[user:password@]host:port/db); the value is a secret and is not shown",
            );
        }
        let prefix = c.key_prefix.get_ref();
        let prefix_ok = !prefix.is_empty()
            && prefix.len() <= 64
            && prefix
                .chars()
                .all(|ch| ch.is_ascii_alphanumeric() || matches!(ch, '-' | '_' | '.' | ':'));
        if !prefix_ok {
            return self.err(
                c.key_prefix.span(),
                format!(
                    "[cluster] key_prefix `{}` must be 1–64 characters of A-Z a-z 0-9 - _ . :",
                    super::shown(prefix).trim_matches('"')
                ),
            );
        }
        let node = match &c.node {
            Some(node) => self.name(node, "[cluster] node")?,
            None => host_name(self.env),
        };
        let sync_interval = self.positive(&c.sync_interval, "[cluster] sync_interval")?;
        if sync_interval < Duration::from_millis(100) || sync_interval > Duration::from_secs(3600) {
            return self.err(
                c.sync_interval.span(),
                "[cluster] sync_interval must be between 100ms and 1h",
            );
        }
        let encryption_key = c
            .encryption_key
            .as_ref()
            .map(|k| {
                let key = self.secret(k)?;
                if key.expose().len() < 16 {
                    return self.err(
                        k.span(),
                        "[cluster] encryption_key must be at least 16 characters \
                         (32 random ones, as `openssl rand -base64 32` makes, are best)",
                    );
                }
                Ok(key)
            })
            .transpose()?;
        let ca_pem = match &c.ca_file {
            Some(file) => {
                // Checked as the upstream's is; redis-rs takes the PEM itself.
                self.ca_certs(file, "[cluster] ca_file")?;
                let path = self.base.join(file.get_ref());
                Some(std::fs::read(&path).or_else(|e| {
                    self.err(
                        file.span(),
                        format!("[cluster] ca_file {}: {e}", path.display()),
                    )
                })?)
            }
            None => None,
        };
        Ok(ClusterConfig {
            redis,
            key_prefix: prefix.clone(),
            node,
            sync_interval,
            encryption_key,
            ca_pem,
            refresh_alone: c.refresh_alone,
        })
    }
}

/// Warp's quota endpoint on the host of `[upstream] url`.
fn warp_quota_url(upstream: &Uri) -> String {
    let scheme = upstream.scheme_str().unwrap_or("https");
    let authority = upstream.authority().map_or("app.warp.dev", |a| a.as_str());
    format!("{scheme}://{authority}/graphql/v2?op=GetRequestLimitInfo")
}

/// This machine's name (a pod's name in Kubernetes), as a node name:
/// the kernel's host name, else `$HOSTNAME`, else `tokenpool`; cut to 64
/// characters of the allowed set.
fn host_name(env: EnvLookup) -> String {
    let raw = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| env("HOSTNAME"))
        .unwrap_or_default();
    let name: String = raw
        .trim()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        .take(64)
        .collect();
    if name.is_empty() {
        "tokenpool".to_string()
    } else {
        name
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

/// The validation of each section, through `Config::parse` as a file is read.
#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config::{ConfigError, Provider, Strategy};

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
    fn every_secret_file_is_followed_and_a_bad_name_is_not_echoed() {
        let dir = tempfile::tempdir().unwrap();
        for f in ["admin", "bare", "named", "warp", "rt"] {
            std::fs::write(dir.path().join(f), format!("secret-{f}\n")).unwrap();
        }
        let path = dir.path().join("tokenpool.toml");
        std::fs::write(
            &path,
            "[server]\napi_keys = [{ file = \"bare\" }, { name = \"team\", key = { file = \"named\" } }]\n\
             [admin]\ntoken = { file = \"admin\" }\n\
             [upstream]\npreset = \"warp\"\n[refresh]\nkey = { file = \"warp\" }\n\
             [[tokens]]\nname = \"a\"\ntier = \"personal\"\ntoken = { file = \"rt\" }\n\
             [[tokens]]\nname = \"b\"\ntier = \"shared\"\ntoken = { file = \"rt-b\" }\n",
        )
        .unwrap();
        std::fs::write(dir.path().join("rt-b"), "secret-rt-b\n").unwrap();
        let c = Config::load(&path, &no_env).unwrap();
        let mut read: Vec<String> = c
            .read_files
            .iter()
            .map(|f| f.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        read.sort();
        assert_eq!(read, ["admin", "bare", "named", "rt", "rt-b", "warp"]);

        // A secret typed into a name's line is not shown back.
        for text in [
            "[[tokens]]\nname = \"sk-live/very+secret\"\ntier = \"shared\"\ntoken = \"t\"\n",
            "[server]\napi_keys = [{ name = \"sk-live/very+secret\", key = \"k\" }]\n",
            "[cluster]\nredis = \"redis://127.0.0.1:1\"\nnode = \"sk-live/very+secret\"\n",
            "[cluster]\nredis = \"redis://127.0.0.1:1\"\nkey_prefix = \"sk-live/very+secret\"\n",
        ] {
            let err = parse(text).unwrap_err().to_string();
            assert!(!err.contains("sk-live"), "{err}");
            assert!(err.contains("must be 1–64 characters"), "{err}");
        }
        let err = parse("[[tokens]]\nname = \"a b\"\ntier = \"shared\"\ntoken = \"t\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("token name `a b`"), "{err}");
        // A client key, like any secret, has one source.
        let err = parse("[server]\napi_keys = [{ env = \"K\", file = \"k\" }]\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("not both"), "{err}");
    }

    #[test]
    fn selection_and_quota_settings_are_checked_where_they_are_written() {
        let c = parse(
            "[pool]\nstrategy = \"most_remaining\"\naffinity_header = \"X-Session-Id\"\n\
             [quota]\nprovider = \"warp\"\ninterval = \"10s\"\n",
        )
        .unwrap();
        assert_eq!(c.pool.strategy, Strategy::MostRemaining);
        assert_eq!(c.pool.affinity_header.as_ref().unwrap(), "x-session-id");
        // The default endpoint is on the upstream's origin.
        assert!(c
            .quota
            .url
            .as_deref()
            .unwrap()
            .ends_with("/graphql/v2?op=GetRequestLimitInfo"));
        assert!(crate::cli::summary(&c).contains("most_remaining, sessions by x-session-id"));
        for (header, why) in [
            ("authorization", "reads or sets itself"),
            ("Content-Type", "reads or sets itself"),
            ("expect", "reads or sets itself"),
            ("http2-settings", "reads or sets itself"),
            ("proxy-authorization", "reads or sets itself"),
            ("x session", "is not a header name"),
            ("", "is not a header name"),
        ] {
            let err = parse(&format!("[pool]\naffinity_header = \"{header}\"\n"))
                .unwrap_err()
                .to_string();
            assert!(err.starts_with("t.toml:2:19: "), "{header}: {err}");
            assert!(err.contains(why), "{header}: {err}");
        }
        let err = parse("[quota]\nprovider = \"warp\"\ninterval = \"9s\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("t.toml:3:12: "), "{err}");
        assert!(err.contains("at least 10s"), "{err}");
        let err = parse("[quota]\nurl = \"https://q.example/graphql\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("needs provider = \"warp\""), "{err}");
    }

    #[test]
    fn client_keys_are_named_and_the_warp_preset_fills_its_urls() {
        let c = parse(
            "[server]\napi_keys = [\"k1\", { name = \"team-a\", key = \"k2\" }]\n\
             [upstream]\npreset = \"warp\"\nheaders = { \"x-warp-os-name\" = \"Mine\" }\n\
             [refresh]\nkey = \"AIza-web-key\"\n",
        )
        .unwrap();
        let names: Vec<&str> = c.server.api_keys.iter().map(|k| &*k.name).collect();
        assert_eq!(names, ["key-1", "team-a"]);
        assert_eq!(c.upstream.url.to_string(), "https://app.warp.dev/");
        assert_eq!(
            c.refresh.url.as_deref(),
            Some("https://app.warp.dev/proxy/token?key=AIza-web-key")
        );
        let header = |list: &[(HeaderName, HeaderValue)], name: &str| {
            list.iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.to_str().unwrap().to_string())
        };
        assert_eq!(
            header(&c.upstream.headers, "x-warp-os-name").as_deref(),
            Some("Mine")
        );
        assert_eq!(
            header(&c.upstream.headers, "x-warp-client-id").as_deref(),
            Some("warp-app")
        );
        assert!(header(&c.refresh.headers, "x-warp-client-version").is_some());
        assert!(
            !crate::cli::summary(&c).contains("AIza"),
            "{}",
            crate::cli::summary(&c)
        );
        assert!(crate::cli::summary(&c).contains("client keys: key-1, team-a"));
    }

    #[test]
    fn env_only_mode_takes_the_listener_key_and_refresh_url_from_the_environment() {
        let env = |name: &str| match name {
            "TOKENPOOL_LISTEN" => Some("0.0.0.0:8080".to_string()),
            "TOKENPOOL_API_KEY" => Some("client-key".to_string()),
            "TOKENPOOL_WARP_API_KEY" => Some("AIza-web-key".to_string()),
            "WARP_REFRESH_TOKEN" => Some("rt-one".to_string()),
            _ => None,
        };
        let c = Config::from_env(&env).unwrap();
        assert_eq!(c.server.listen, "0.0.0.0:8080".parse().unwrap());
        assert_eq!(c.server.api_keys.len(), 1);
        assert_eq!(
            c.refresh.url.as_deref(),
            Some("https://app.warp.dev/proxy/token?key=AIza-web-key")
        );
        assert!(c.warnings().is_empty(), "{:?}", c.warnings());
        // Without a key it starts, and says why the refresh calls will fail.
        let bare = |name: &str| (name == "WARP_REFRESH_TOKEN").then(|| "rt-one".to_string());
        let c = Config::from_env(&bare).unwrap();
        assert!(c.warnings()[0].starts_with("the refresh URL has no key="));
        // A whole URL from the environment wins.
        let url = |name: &str| {
            (name == "TOKENPOOL_REFRESH_URL").then(|| "https://x.test/token?key=k".to_string())
        };
        assert_eq!(
            Config::from_env(&url).unwrap().refresh.url.as_deref(),
            Some("https://x.test/token?key=k")
        );
    }

    #[test]
    fn a_relative_state_path_is_not_moved_next_to_the_config() {
        let c = Config::parse(
            "[state]\npath = \"state/tokenpool-state.json\"\n",
            Some(Path::new("/etc/tokenpool/tokenpool.toml")),
            &no_env,
        )
        .unwrap();
        assert_eq!(
            c.state.path.as_deref(),
            Some(Path::new("state/tokenpool-state.json"))
        );
        assert!(c.warnings().iter().any(|w| w.contains("working directory")));
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
            // Durations: only whole numbers with ms, s, m, h or d.
            (
                "[pool]\ncooldown = \"5M\"\n",
                "t.toml:2:12: [pool] cooldown = \"5M\" is not a duration",
            ),
            (
                "[pool]\ncooldown = \"5 minutes\"\n",
                "t.toml:2:12: [pool] cooldown = \"5 minutes\" is not a duration",
            ),
            (
                "[refresh]\nmargin = \"1.5h\"\n",
                "t.toml:2:10: [refresh] margin = \"1.5h\" is not a duration",
            ),
            // Checks of a value's meaning keep its place too.
            (
                "[pool]\ncooldown = \"0s\"\n",
                "t.toml:2:12: [pool] cooldown must be greater than zero",
            ),
            (
                "[server]\nmax_request_body_bytes = 0\n",
                "t.toml:2:26: [server] max_request_body_bytes must be greater than zero",
            ),
            (
                "[pool]\ncooldown = \"2h\"\nmax_cooldown = \"1h\"\n",
                "t.toml:3:16: [pool] max_cooldown must be at least",
            ),
            (
                "[pool]\nrecovery_backoff = \"2h\"\nmax_recovery_backoff = \"1h\"\n",
                "t.toml:3:24: [pool] max_recovery_backoff must be at least",
            ),
            (
                "[upstream]\npreset = \"warp\"\n",
                "t.toml:2:10: preset \"warp\" needs [refresh] key",
            ),
            (
                "[server]\napi_keys = [{ name = \"a b\", key = \"k1\" }]\n",
                "t.toml:2:22: client key name `a b`",
            ),
            (
                "[server]\napi_keys = [\"k1\", { name = \"x\", key = \"k1\" }]\n",
                "t.toml:2:19: client key `x` is the same key",
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

    #[test]
    fn cluster_settings_are_checked_and_the_url_is_never_shown() {
        let c = parse("[cluster]\nredis = \"redis://:pw-7d1f@10.0.0.5:6379/2\"\n").unwrap();
        let cluster = c.cluster.as_ref().unwrap();
        assert_eq!(cluster.key_prefix, "tokenpool");
        assert_eq!(cluster.sync_interval, Duration::from_secs(1));
        assert!(!cluster.node.is_empty(), "the host name by default");
        assert!(cluster.encryption_key.is_none());
        assert!(c.warnings().iter().any(|w| w.contains("no encryption_key")));
        let summary = crate::cli::summary(&c);
        assert!(summary.contains("cluster:"), "{summary}");
        assert!(!summary.contains("pw-7d1f") && !format!("{c:?}").contains("pw-7d1f"));

        for (text, want) in [
            ("[cluster]\n", "missing field `redis`"),
            (
                "[cluster]\nredis = \"http://:pw-7d1f@h:1\"\n",
                "not a redis:// or rediss:// URL",
            ),
            (
                "[cluster]\nredis = \"redis://:pw-7d1f@h:notaport\"\n",
                "not a redis:// or rediss:// URL",
            ),
            (
                "[cluster]\nredis = \"redis://h\"\nkey_prefix = \"a b\"\n",
                "key_prefix",
            ),
            (
                "[cluster]\nredis = \"redis://h\"\nnode = \"\"\n",
                "[cluster] node",
            ),
            (
                "[cluster]\nredis = \"redis://h\"\nsync_interval = \"10ms\"\n",
                "between 100ms and 1h",
            ),
            (
                "[cluster]\nredis = \"redis://h\"\nencryption_key = \"short\"\n",
                "at least 16 characters",
            ),
            (
                "[cluster]\nredis = \"redis://h\"\nport = 1\n",
                "unknown field",
            ),
        ] {
            let e = parse(text).unwrap_err().to_string();
            assert!(e.contains(want), "{text:?}: {e}");
            assert!(!e.contains("pw-7d1f"), "the URL was shown: {e}");
            assert!(!e.contains("short\""), "the key was shown: {e}");
        }
        let c = parse(
            "[cluster]\nredis = \"rediss://h:6380\"\nkey_prefix = \"pool-a\"\nnode = \"replica-1\"\n\
             sync_interval = \"250ms\"\nencryption_key = \"0123456789abcdef0123\"\n",
        )
        .unwrap();
        let cluster = c.cluster.unwrap();
        assert_eq!(
            (cluster.key_prefix.as_str(), cluster.node.as_str()),
            ("pool-a", "replica-1")
        );
        assert_eq!(cluster.sync_interval, Duration::from_millis(250));
        assert!(cluster.encryption_key.is_some());
    }

    #[test]
    fn clients_are_the_long_form_of_api_keys() {
        let c = parse(
            "[server]\napi_keys = [{ name = \"ops\", key = \"k-ops\" }]\n\
             [[clients]]\nname = \"team-a\"\nkeys = [\"k-a1\", { env = \"NOPE_UNUSED\" }]\n",
        );
        // A missing variable is the error it always is.
        assert!(c.unwrap_err().to_string().contains("NOPE_UNUSED"));
        let c = parse(
            "[server]\nlisten = \"0.0.0.0:8080\"\napi_keys = [{ name = \"ops\", key = \"k-ops\" }]\n\
             [upstream]\nroutes = [\"* /*\"]\n\
             [[clients]]\nname = \"team-a\"\nkeys = [\"k-a1\", \"k-a2\"]\n\
             tiers = [\"shared\"]\nroutes = [\"POST /ai/multi-agent\"]\n",
        )
        .unwrap();
        let names: Vec<&str> = c.server.api_keys.iter().map(|k| &*k.name).collect();
        assert_eq!(names, ["ops", "team-a", "team-a"]);
        let team = &c.server.api_keys[1].policy;
        assert!(
            Arc::ptr_eq(team, &c.server.api_keys[2].policy),
            "one policy per client"
        );
        assert_eq!(team.tiers.as_deref(), Some(&[Tier::Shared][..]));
        assert_eq!(team.routes(&c.upstream).unwrap().len(), 1);
        // A key of api_keys: every tier, [upstream] routes.
        let ops = &c.server.api_keys[0].policy;
        assert_eq!(ops.tiers, None);
        assert_eq!(ops.routes(&c.upstream).unwrap()[0].to_string(), "* /*");
        // Clients alone are keys enough for a public listener.
        assert!(parse(
            "[server]\nlisten = \"0.0.0.0:8080\"\n[[clients]]\nname = \"a\"\nkeys = [\"k-1\"]\n"
        )
        .is_ok());

        for (text, message) in [
            (
                "[server]\napi_keys = [{ name = \"a\", key = \"k-1\" }]\n[[clients]]\nname = \"a\"\nkeys = [\"k-2\"]\n",
                "duplicate client name `a`",
            ),
            (
                "[server]\napi_keys = [\"k-1\"]\n[[clients]]\nname = \"b\"\nkeys = [\"k-1\"]\n",
                "a key of client `b` is the same key as an earlier one",
            ),
            (
                "[[clients]]\nname = \"b\"\nkeys = []\n",
                "client `b` has no keys",
            ),
            (
                "[pool]\norder = [\"personal\", \"shared\"]\n[[clients]]\nname = \"b\"\nkeys = [\"k-1\"]\ntiers = [\"anonymous\"]\n",
                "client `b`: tier anonymous is one [pool] order leaves out",
            ),
            (
                "[[clients]]\nname = \"b\"\nkeys = [\"k-1\"]\ntiers = []\n",
                "client `b`: tiers is empty",
            ),
            (
                "[[clients]]\nname = \"b\"\nkeys = [\"k-1\"]\nroutes = []\n",
                "client `b` routes is empty",
            ),
            (
                "[[clients]]\nname = \"b\"\nkeys = [\"k-1\"]\nroutes = [\"POST /a/../b\"]\n",
                "client `b` routes: a route's path is made of letters",
            ),
            (
                "[[clients]]\nname = \"b\"\nkeys = [\"k-1\"]\nrate = \"10/s\"\n",
                "unknown field `rate`",
            ),
            (
                "[server]\nlisten = \"0.0.0.0:8080\"\n",
                "no api_keys or [[clients]] are set",
            ),
            (
                "[upstream]\nroutes = [\"post /x\"]\n",
                "[upstream] routes: a route's method is in capitals",
            ),
        ] {
            let e = parse(text).unwrap_err().to_string();
            assert!(e.contains(message), "{text}: {e}");
            assert!(e.starts_with("t.toml:"), "located: {e}");
            assert!(!e.contains("k-1") && !e.contains("k-2"), "no key shown: {e}");
        }
    }
}
