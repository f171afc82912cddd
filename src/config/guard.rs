//! What a configuration may not do to a running proxy, and what `check`
//! warns about.
//!
//! A reload is validated against what will actually run: the listeners
//! stay bound where they were bound at start (a listen change needs a
//! restart), so the rule "a non-loopback proxy listener needs client keys"
//! is checked against the bound address, not against the new file's
//! (possibly defaulted) one. A file that would open a keyed proxy to
//! anyone, or take the admin token off a reachable admin listener, is
//! refused like any invalid file.

use std::fmt;
use std::net::SocketAddr;

use super::{Config, ConfigError, Provider};

/// Where the running listeners are bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bound {
    /// The proxy listener.
    pub proxy: SocketAddr,
    /// The admin listener.
    pub admin: SocketAddr,
}

/// The placeholder `config.example.toml` puts where Warp's web API key goes.
const EXAMPLE_KEY_PLACEHOLDER: &str = "YOUR_FIREBASE_WEB_API_KEY";

/// How long an access token of `provider` usually lives: Warp's (Firebase)
/// ID tokens live one hour, and one hour is also what tokenpool assumes
/// when an OAuth2 answer says nothing. `None` for `static` (no refresh).
fn expected_lifetime(provider: Provider) -> Option<std::time::Duration> {
    match provider {
        Provider::Firebase | Provider::Oauth2 => Some(std::time::Duration::from_secs(3600)),
        Provider::Static => None,
    }
}

/// Whether two listen addresses would fight over one socket: the same
/// port (not 0, which the OS picks) on the same address, or on the
/// wildcard address of either.
pub(super) fn same_socket(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() == b.port()
        && a.port() != 0
        && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

/// Whether a secret's value looks like a shipped example's placeholder
/// rather than a real credential: `replace-with-…`, `changeme`,
/// `YOUR_…`, `example`. A real key, token or password never reads so.
pub(super) fn looks_like_placeholder(value: &str) -> bool {
    let v = value.trim().to_ascii_lowercase();
    const MARKS: [&str; 9] = [
        "replace-with",
        "replace_with",
        "replace-me",
        "replaceme",
        "changeme",
        "change-me",
        "placeholder",
        "your_",
        "your-",
    ];
    MARKS.iter().any(|m| v.contains(m))
        || v.starts_with("replace-")
        || v == "example"
        || v.starts_with("example-")
        || v.starts_with("example_")
}

impl Config {
    /// Things that are valid but probably wrong, one sentence each, for
    /// `tokenpool check` (as `warning:` lines) and the log at start. Never
    /// a secret.
    pub fn warnings(&self) -> Vec<String> {
        let mut out = self.reload_warnings();
        if let Some(path) = self.state.path.as_deref().filter(|p| p.is_relative()) {
            out.push(format!(
                "[state] path = {} is relative: it is resolved against the working directory, \
                 not the config's folder",
                path.display()
            ));
        }
        if self.cluster.is_some() && self.state.path.is_none() {
            out.push(
                "[cluster] is set without [state] path: a replica that restarts while Redis is \
                 away or emptied knows only the configured refresh tokens; with a provider that \
                 rotates them it cannot refresh those tokens alone (and a superseded one would \
                 cost the account): set [state] path on a volume that outlives the process"
                    .to_string(),
            );
        }
        out
    }

    /// The warnings worth repeating when this file is reloaded: those about
    /// settings a reload can change ([`Config::warnings`] adds the ones
    /// about settings fixed at start, said once per process).
    pub fn reload_warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        if !self.admin.listen.ip().is_loopback() && self.admin.token.is_none() {
            out.push(format!(
                "[admin] listen = {} is not a loopback address and [admin] token is not set: \
                 /metrics, /healthz, /readyz and /poolz are open to anyone who can connect \
                 (/admin/* still answers loopback clients only)",
                self.admin.listen
            ));
        }
        if let Some(life) = expected_lifetime(self.refresh.provider) {
            if self.refresh.margin >= life {
                out.push(format!(
                    "[refresh] margin = {} is not shorter than an access token's usual life ({}): \
                     every token would be refreshed again as soon as it is refreshed",
                    super::duration::format(self.refresh.margin),
                    super::duration::format(life)
                ));
            }
        }
        if self.refresh.provider == Provider::Firebase
            && self
                .refresh
                .url
                .as_deref()
                .is_some_and(|u| !u.contains("key="))
        {
            out.push(
                "the refresh URL has no key= (Warp's refresh endpoint refuses calls without its \
                 web API key): set [refresh] key, a whole [refresh] url, or in env-only mode \
                 TOKENPOOL_WARP_API_KEY or TOKENPOOL_REFRESH_URL"
                    .to_string(),
            );
        }
        if let Some(cluster) = &self.cluster {
            if cluster.encryption_key.is_none() {
                out.push(format!(
                    "[cluster] has no encryption_key: the refresh and access tokens this pool \
                     shares are stored in Redis in clear (under {}:*); protect that Redis like \
                     the token files, or set encryption_key",
                    cluster.key_prefix
                ));
            }
        }
        if self
            .refresh
            .url
            .as_deref()
            .is_some_and(|u| u.contains(EXAMPLE_KEY_PLACEHOLDER))
        {
            out.push(format!(
                "[refresh] url still has the example's placeholder {EXAMPLE_KEY_PLACEHOLDER}: \
                 put Warp's Firebase web API key after key="
            ));
        } else if let Some(key) = self.refresh.url.as_deref().and_then(url_key) {
            if looks_like_placeholder(key) {
                out.push(placeholder_warning("[refresh] key"));
            }
        }
        for (place, value) in self.secrets() {
            if looks_like_placeholder(value) {
                out.push(placeholder_warning(&place));
            }
        }
        if self.upstream.routes.is_none() {
            out.push(
                "[upstream] routes is not set: every method and path a client sends goes \
                 upstream with a pooled account's credentials; list the routes clients need \
                 (preset = \"warp\" sets Warp's)"
                    .to_string(),
            );
        }
        out
    }

    /// Every secret of the file with where it is set (never its value in
    /// the place), for the placeholder check.
    fn secrets(&self) -> Vec<(String, &str)> {
        let mut out = Vec::new();
        for key in &self.server.api_keys {
            out.push((
                // Either form: `[server] api_keys` or a `[[clients]]` entry.
                format!("client key {:?}", &*key.name),
                key.secret.expose(),
            ));
        }
        if let Some(token) = &self.admin.token {
            out.push(("[admin] token".to_string(), token.expose()));
        }
        if let Some(secret) = &self.refresh.client_secret {
            out.push(("[refresh] client_secret".to_string(), secret.expose()));
        }
        if let Some(cluster) = &self.cluster {
            out.push(("[cluster] redis".to_string(), cluster.redis.expose()));
            if let Some(key) = &cluster.encryption_key {
                out.push(("[cluster] encryption_key".to_string(), key.expose()));
            }
        }
        for token in &self.tokens {
            out.push((format!("token {:?}", token.name), token.secret.expose()));
        }
        out
    }
}

/// The value of the `key=` query parameter of a refresh URL.
fn url_key(url: &str) -> Option<&str> {
    let query = url.split_once('?')?.1;
    query.split('&').find_map(|pair| pair.strip_prefix("key="))
}

fn placeholder_warning(place: &str) -> String {
    format!(
        "{place} looks like an example's placeholder, not a real secret: put the real \
         value in its file, variable or Secret"
    )
}

/// A change a reload may make that an operator can mean but should hear
/// about: said at WARN once the reload is applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Risk {
    /// Every token goes (`before` were configured).
    RemovesEveryToken {
        /// Tokens before the reload.
        before: usize,
    },
    /// The upstream moves to another scheme, host or port.
    MovesUpstream {
        /// `scheme://host:port` before.
        from: String,
        /// And after.
        to: String,
    },
    /// Client keys go and `allow_unauthenticated` is set on a listener
    /// others can reach.
    OpensProxy {
        /// The proxy listener's address.
        at: SocketAddr,
    },
}

impl fmt::Display for Risk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Risk::RemovesEveryToken { before } => write!(
                f,
                "this reload removes every token ({before} before, 0 after): the proxy will \
                 answer 503 until tokens are configured again"
            ),
            Risk::MovesUpstream { from, to } => {
                write!(f, "this reload moves the upstream from {from} to {to}")
            }
            Risk::OpensProxy { at } => write!(
                f,
                "this reload removes every client key and allow_unauthenticated = true: \
                 ANYONE WHO CAN REACH {at} CAN USE THE TOKEN POOL"
            ),
        }
    }
}

/// Checks `next` as a replacement for `running`, whose listeners are bound
/// at `bound`. Returns the [`Risk`]s to say when it may be applied; an
/// error, which refuses the reload, when applying it would open the proxy
/// to anyone or take the admin token off a reachable admin listener.
pub fn check_reload(
    running: &Config,
    bound: Bound,
    next: &Config,
) -> Result<Vec<Risk>, ConfigError> {
    if !bound.proxy.ip().is_loopback()
        && next.server.api_keys.is_empty()
        && !next.server.allow_unauthenticated
    {
        return Err(next.error(format!(
            "refused: the proxy listener stays bound on {} (a listen change needs a restart), \
             which is not a loopback address, and this file sets no [server] api_keys or \
             [[clients]]: \
             it would serve anyone who can connect. Keep api_keys, or set \
             allow_unauthenticated = true if that is meant",
            bound.proxy
        )));
    }
    if !bound.admin.ip().is_loopback()
        && running.admin.token.is_some()
        && next.admin.token.is_none()
    {
        return Err(next.error(format!(
            "refused: the admin listener stays bound on {}, which is not a loopback address, \
             and this file removes [admin] token. Keep the token (removing it needs a restart)",
            bound.admin
        )));
    }
    let mut risks = Vec::new();
    if next.tokens.is_empty() && !running.tokens.is_empty() {
        risks.push(Risk::RemovesEveryToken {
            before: running.tokens.len(),
        });
    }
    let place = |c: &Config| {
        let url = &c.upstream.url;
        format!(
            "{}://{}:{}",
            url.scheme_str().unwrap_or("https"),
            url.host().unwrap_or(""),
            url.port_u16()
                .unwrap_or(if url.scheme_str() == Some("http") {
                    80
                } else {
                    443
                })
        )
    };
    if place(running) != place(next) {
        risks.push(Risk::MovesUpstream {
            from: place(running),
            to: place(next),
        });
    }
    if !bound.proxy.ip().is_loopback()
        && next.server.api_keys.is_empty()
        && !running.server.api_keys.is_empty()
    {
        risks.push(Risk::OpensProxy { at: bound.proxy });
    }
    Ok(risks)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Config {
        Config::parse(text, Some(std::path::Path::new("t.toml")), &|_| None).unwrap()
    }

    const KEYED: &str = "[server]\nlisten = \"0.0.0.0:8080\"\napi_keys = [\"k\"]\n\
                         [admin]\nlisten = \"0.0.0.0:9090\"\ntoken = \"adm\"\n\
                         [[tokens]]\nname = \"a\"\ntier = \"personal\"\ntoken = \"rt-a\"\n";

    fn bound(proxy: &str, admin: &str) -> Bound {
        Bound {
            proxy: proxy.parse().unwrap(),
            admin: admin.parse().unwrap(),
        }
    }

    #[test]
    fn reloads_are_checked_against_the_bound_listeners() {
        let running = parse(KEYED);
        let public = bound("0.0.0.0:8080", "0.0.0.0:9090");
        let local = bound("127.0.0.1:8080", "127.0.0.1:9090");
        let tokens = "[[tokens]]\nname = \"a\"\ntier = \"personal\"\ntoken = \"rt-a\"\n";
        let admin = "[admin]\ntoken = \"adm\"\n";
        // (next file, bound, refused because of)
        let cases: &[(String, Bound, Option<&str>)] = &[
            (KEYED.to_string(), public, None),
            // No [server] table: the new default address is loopback, the
            // bound one is not.
            (
                format!("{admin}{tokens}"),
                public,
                Some("sets no [server] api_keys"),
            ),
            (format!("{admin}{tokens}"), local, None),
            (
                format!("[server]\nallow_unauthenticated = true\n{admin}{tokens}"),
                public,
                None,
            ),
            (
                format!("[server]\napi_keys = [\"k\"]\n{tokens}"),
                public,
                Some("removes [admin] token"),
            ),
            (
                format!("[server]\napi_keys = [\"k\"]\n{tokens}"),
                local,
                None,
            ),
        ];
        for (text, bound, refused) in cases {
            let result = check_reload(&running, *bound, &parse(text));
            match (refused, result) {
                (None, Ok(_)) => {}
                (Some(want), Err(e)) => {
                    assert!(e.to_string().contains(want), "{text}: {e}");
                    assert!(e.to_string().starts_with("t.toml: refused:"), "{e}");
                }
                (want, got) => panic!("{text}: want refusal {want:?}, got {got:?}"),
            }
        }
    }

    #[test]
    fn a_config_without_an_admin_token_keeps_reloading() {
        let text = KEYED.replace("token = \"adm\"\n", "");
        let running = parse(&text);
        let b = bound("0.0.0.0:8080", "0.0.0.0:9090");
        assert!(check_reload(&running, b, &parse(&text)).is_ok());
    }

    #[test]
    fn emptying_the_pool_or_moving_the_upstream_warns() {
        let running = parse(KEYED);
        let b = bound("127.0.0.1:8080", "127.0.0.1:9090");
        let none = KEYED.replace(
            "[[tokens]]\nname = \"a\"\ntier = \"personal\"\ntoken = \"rt-a\"\n",
            "",
        );
        let w = check_reload(&running, b, &parse(&none)).unwrap();
        assert_eq!(w, [Risk::RemovesEveryToken { before: 1 }]);
        assert!(w[0]
            .to_string()
            .contains("removes every token (1 before, 0 after)"));
        let moved = format!("{KEYED}[upstream]\nurl = \"https://other.example:8443/api\"\n");
        let w = check_reload(&running, b, &parse(&moved)).unwrap();
        assert_eq!(
            w.iter().map(Risk::to_string).collect::<Vec<_>>(),
            ["this reload moves the upstream from https://app.warp.dev:443 to https://other.example:8443"]
        );
        // A new path on the same host is not a move.
        let path = format!("{KEYED}[upstream]\nurl = \"https://app.warp.dev/v2\"\n");
        assert!(check_reload(&running, b, &parse(&path)).unwrap().is_empty());
    }

    #[test]
    fn check_warns_about_valid_but_likely_wrong_settings() {
        let c = parse("[refresh]\nurl = \"https://x.test/token?key=YOUR_FIREBASE_WEB_API_KEY\"\nmargin = \"2h\"\n[admin]\nlisten = \"0.0.0.0:9090\"\n");
        assert!(parse("[refresh]\nurl = \"https://x.test/token\"\n")
            .warnings()
            .iter()
            .any(|w| w.starts_with("the refresh URL has no key=")));
        let w = c.warnings();
        assert_eq!(w.len(), 4, "{w:?}");
        assert!(w[3].starts_with("[upstream] routes is not set"));
        assert!(w[0].starts_with("[admin] listen = 0.0.0.0:9090 is not a loopback address"));
        assert!(
            w[1].starts_with("[refresh] margin = 2h is not shorter"),
            "{}",
            w[1]
        );
        assert!(w[2].contains("placeholder"));
        assert!(parse(
            "[upstream]\nroutes = [\"POST /a\"]\n[refresh]\nkey = \"k\"\nmargin = \"59m\"\n"
        )
        .warnings()
        .is_empty());
        assert!(parse("[upstream]\nroutes = [\"POST /a\"]\n[refresh]\nprovider = \"static\"\nmargin = \"2h\"\n")
            .warnings()
            .is_empty());
    }

    #[test]
    fn placeholder_secrets_are_named_never_shown() {
        let text = "[server]\napi_keys = [{ name = \"team-a\", key = \"replace-with-a-client-key\" }, \"k-9f3a77c1d0\"]\n\
                    [admin]\ntoken = \"changeme\"\n\
                    [refresh]\nkey = \"YOUR_WEB_API_KEY\"\n\
                    [cluster]\nredis = \"redis://:replace-with-a-redis-password@r:6379/0\"\nnode = \"n\"\n\
                    encryption_key = \"example-cluster-key-0000\"\n\
                    [state]\npath = \"/var/lib/tokenpool/s.json\"\n\
                    [[tokens]]\nname = \"alice\"\ntier = \"personal\"\ntoken = \"replace-with-alices-refresh-token\"\n\
                    [[tokens]]\nname = \"bob\"\ntier = \"personal\"\ntoken = \"AMf-vBx7example-looking-but-real\"\n";
        let w = parse(text).warnings();
        let placeholders: Vec<&String> = w.iter().filter(|w| w.contains("placeholder")).collect();
        let places: Vec<&str> = placeholders
            .iter()
            .map(|w| w.split(" looks like").next().unwrap())
            .collect();
        assert_eq!(
            places,
            [
                "[refresh] key",
                "client key \"team-a\"",
                "[admin] token",
                "[cluster] redis",
                "[cluster] encryption_key",
                "token \"alice\""
            ],
            "{w:?}"
        );
        for warning in &w {
            for secret in ["replace-with", "changeme", "YOUR_WEB", "AMf-"] {
                assert!(!warning.contains(secret), "{warning}");
            }
        }
        for real in [
            "k-9f3a77c1d0",
            "AMf-vBx7example-looking-but-real",
            "s3cr3t-Example",
        ] {
            assert!(!looks_like_placeholder(real), "{real}");
        }
    }

    #[test]
    fn relative_state_paths_are_said_once_and_cluster_without_state_is_warned() {
        let c = parse(
            "[upstream]\npreset = \"warp\"\n[refresh]\nkey = \"k\"\n[state]\npath = \"s.json\"\n",
        );
        assert!(c.warnings().iter().any(|w| w.contains("is relative")));
        assert!(c.reload_warnings().is_empty(), "{:?}", c.reload_warnings());
        let c = parse("[refresh]\nkey = \"k\"\n[cluster]\nredis = \"redis://r:6379\"\nnode = \"n\"\nencryption_key = \"k-4a0c-9d1e-77b2-c3\"\n");
        assert!(c
            .warnings()
            .iter()
            .any(|w| w.starts_with("[cluster] is set without [state] path")));
    }

    #[test]
    fn listeners_that_would_share_a_socket() {
        let a = |s: &str| s.parse::<SocketAddr>().unwrap();
        assert!(same_socket(a("127.0.0.1:80"), a("127.0.0.1:80")));
        assert!(same_socket(a("0.0.0.0:80"), a("127.0.0.1:80")));
        assert!(!same_socket(a("127.0.0.1:0"), a("127.0.0.1:0")));
        assert!(!same_socket(a("127.0.0.1:80"), a("127.0.0.1:81")));
        assert!(!same_socket(a("127.0.0.1:80"), a("127.0.0.2:80")));
    }
}
