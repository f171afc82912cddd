//! The upstream side of forwarding: the pooled HTTP client (keep-alive,
//! HTTPS through rustls with HTTP/2 by ALPN), the target URL, and the
//! header rules of DESIGN §3.1 — what is stripped from the client's
//! request and from the upstream's answer, and what is added.

use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::PathAndQuery;
use http::{Method, Response};

pub use super::client::{ClientError, UpstreamBody, UpstreamClient};
use crate::config::UpstreamConfig;

/// How many names [`HOP_BY_HOP`] has.
const HOPS: usize = 8;

/// Headers that describe one hop and never cross a proxy (RFC 9110 §7.6.1),
/// plus the legacy `proxy-connection`.
static HOP_BY_HOP: [HeaderName; HOPS] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

/// Where requests go, and how.
pub struct Upstream {
    client: UpstreamClient,
    /// The URL's path without its trailing slash ("" for the root).
    base_path: String,
    /// `[upstream] headers`, set on every request.
    headers: Vec<(HeaderName, HeaderValue)>,
    /// Longest silence while waiting for headers or inside a stream.
    pub idle_timeout: Duration,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("client", &self.client)
            .finish_non_exhaustive()
    }
}

impl Upstream {
    /// The target of `config`, reusing `previous`'s connection pool (and
    /// its warm connections) when it serves the same upstream.
    pub fn new(config: &UpstreamConfig, previous: Option<&Upstream>) -> Result<Upstream, String> {
        let client = match previous {
            Some(p) if p.client.serves(config) => p.client.clone(),
            _ => UpstreamClient::new(&config.url, config.connect_timeout, &config.ca_certs)?,
        };
        let base_path = config.url.path().trim_end_matches('/').to_string();
        Ok(Upstream {
            client,
            base_path,
            headers: config.headers.clone(),
            idle_timeout: config.idle_timeout,
        })
    }

    /// The connection pool.
    pub fn client(&self) -> &UpstreamClient {
        &self.client
    }

    /// Sends a request for the client's `path` (joined to the URL's path).
    pub async fn send(
        &self,
        method: &Method,
        path: Option<&PathAndQuery>,
        headers: &Outgoing<'_>,
        body: &Bytes,
        deadline: tokio::time::Instant,
    ) -> Result<Response<UpstreamBody>, ClientError> {
        self.client
            .send(method, &self.path_for(path), headers, body, deadline)
            .await
    }

    /// The headers to send upstream for a client request's `headers`,
    /// carrying `bearer`.
    pub fn outgoing<'a>(&'a self, client: &'a HeaderMap, bearer: &'a HeaderValue) -> Outgoing<'a> {
        Outgoing {
            client,
            extra: &self.headers,
            bearer,
        }
    }

    /// The upstream path and query for a client request's path and query.
    pub fn path_for(&self, pq: Option<&PathAndQuery>) -> PathAndQuery {
        if self.base_path.is_empty() {
            return pq
                .cloned()
                .unwrap_or_else(|| PathAndQuery::from_static("/"));
        }
        let pq_str = pq.map_or("/", PathAndQuery::as_str);
        let mut s = String::with_capacity(self.base_path.len() + pq_str.len());
        s.push_str(&self.base_path);
        s.push_str(pq_str);
        PathAndQuery::try_from(s).unwrap_or_else(|_| PathAndQuery::from_static("/"))
    }
}

/// The headers of one upstream request, not built into a map: the
/// HTTP/1.1 codec writes them straight out, HTTP/2 collects them.
///
/// They are the client's, less hop-by-hop headers (those its `Connection`
/// names too), its credentials and forwarding headers; then `[upstream]
/// headers` (which replace the client's of the same name); then the
/// bearer.
pub struct Outgoing<'a> {
    client: &'a HeaderMap,
    extra: &'a [(HeaderName, HeaderValue)],
    bearer: &'a HeaderValue,
}

impl<'a> Outgoing<'a> {
    /// Every header, in the order they are sent.
    pub fn iter(&self) -> impl Iterator<Item = (&'a HeaderName, &'a HeaderValue)> + '_ {
        let connection = self.client.get_all(header::CONNECTION);
        let listed_by_connection = connection.iter().next().is_some();
        let extra = self.extra;
        let client = self.client.iter().filter(move |(name, _)| {
            forwardable(name)
                && !(listed_by_connection && named_in(name, connection.iter()))
                && !extra.iter().any(|(n, _)| n == *name)
        });
        client
            .chain(extra.iter().map(|(n, v)| (n, v)))
            .chain(std::iter::once((&header::AUTHORIZATION, self.bearer)))
    }

    /// The headers as a map (for HTTP/2).
    pub fn to_map(&self) -> HeaderMap {
        let mut out = HeaderMap::with_capacity(self.client.len() + self.extra.len() + 1);
        for (name, value) in self.iter() {
            out.append(name.clone(), value.clone());
        }
        out
    }

    /// Whether the client marked the request safe to repeat.
    pub fn has_idempotency_key(&self) -> bool {
        self.client.contains_key("idempotency-key") || self.client.contains_key("x-idempotency-key")
    }
}

/// Where `name` is in [`HOP_BY_HOP`]: one match on the name's text (which
/// compiles to a switch on its length first), not a comparison with each
/// of the eight, for every header of every request and answer.
fn hop_by_hop(name: &HeaderName) -> Option<usize> {
    Some(match name.as_str() {
        "connection" => 0,
        "keep-alive" => 1,
        "proxy-connection" => 2,
        "proxy-authenticate" => 3,
        "proxy-authorization" => 4,
        "te" => 5,
        "trailer" => 6,
        "transfer-encoding" => 7,
        _ => return None,
    })
}

/// Whether a client request header may go upstream (those the client's
/// `Connection` header names aside).
fn forwardable(name: &HeaderName) -> bool {
    let text = name.as_str();
    !(hop_by_hop(name).is_some()
        || matches!(
            text,
            "upgrade"
                | "host"
                | "authorization"
                | "x-api-key"
                | "content-length"
                | "forwarded"
                | "via"
        )
        || text.starts_with("x-forwarded-"))
}

/// Whether one of the `Connection` header values lists `name` (those are
/// hop-by-hop too).
fn named_in<'a>(name: &HeaderName, mut values: impl Iterator<Item = &'a HeaderValue>) -> bool {
    values.any(|v| {
        v.to_str().is_ok_and(|s| {
            s.split(',')
                .any(|token| token.trim().eq_ignore_ascii_case(name.as_str()))
        })
    })
}

/// Removes hop-by-hop headers from an upstream answer before it goes to
/// the client.
///
/// Every name is looked at once, by one match on its text; only the names
/// found are removed (each removal hashes). Most answers carry at most
/// `Connection: keep-alive`, so this is one removal.
pub fn strip_response_headers(headers: &mut HeaderMap) {
    let mut found = [false; HOPS + 1];
    let mut any = false;
    for name in headers.keys() {
        if let Some(i) = hop_by_hop(name) {
            found[i] = true;
            any = true;
        } else if name == header::UPGRADE {
            found[HOPS] = true;
            any = true;
        }
    }
    if !any {
        return;
    }
    // Names the Connection header lists are hop-by-hop too; its usual
    // tokens (keep-alive, close) need no lookup of their own.
    let listed: Vec<HeaderName> = if found[0] {
        headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|s| s.split(','))
            .map(str::trim)
            .filter(|t| !t.eq_ignore_ascii_case("keep-alive") && !t.eq_ignore_ascii_case("close"))
            .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
            .collect()
    } else {
        Vec::new()
    };
    for (i, name) in HOP_BY_HOP.iter().enumerate() {
        if found[i] {
            headers.remove(name);
        }
    }
    if found[HOPS] {
        headers.remove(header::UPGRADE);
    }
    for name in &listed {
        headers.remove(name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hop_by_hop_match_agrees_with_the_list() {
        for (i, name) in HOP_BY_HOP.iter().enumerate() {
            assert_eq!(hop_by_hop(name), Some(i), "{name}");
        }
        for name in ["upgrade", "content-type", "x-connection", "t", "tes"] {
            assert_eq!(hop_by_hop(&HeaderName::from_static(name)), None, "{name}");
        }
    }

    fn upstream(url: &str) -> Upstream {
        let c = crate::config::Config::parse(
            &format!(
                "[upstream]\nurl = \"{url}\"\nheaders = {{ \"x-warp-client-version\" = \"v1\" }}\n"
            ),
            None,
            &|_| None,
        )
        .unwrap();
        Upstream::new(&c.upstream, None).unwrap()
    }

    #[tokio::test]
    async fn urls_join_the_base_path() {
        let u = upstream("http://127.0.0.1:1/base/");
        let pq = PathAndQuery::from_static("/ai/multi-agent?x=1");
        assert_eq!(u.path_for(Some(&pq)).as_str(), "/base/ai/multi-agent?x=1");
        let u = upstream("http://127.0.0.1:1");
        assert_eq!(u.path_for(Some(&pq)).as_str(), "/ai/multi-agent?x=1");
    }

    #[tokio::test]
    async fn request_headers_drop_credentials_and_hops() {
        let u = upstream("http://127.0.0.1:1");
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("authorization", "Bearer client-key"),
            ("x-api-key", "client-key"),
            ("connection", "keep-alive, x-secret-hop"),
            ("x-secret-hop", "1"),
            ("keep-alive", "timeout=5"),
            ("te", "trailers"),
            ("x-forwarded-for", "10.0.0.1"),
            ("forwarded", "for=10.0.0.1"),
            ("via", "1.1 lb"),
            ("host", "proxy.local"),
            ("x-warp-client-version", "client-chosen"),
            ("content-type", "application/x-protobuf"),
            ("accept", "text/event-stream"),
        ] {
            h.append(k, HeaderValue::from_static(v));
        }
        let bearer = HeaderValue::from_static("Bearer up");
        let out = u.outgoing(&h, &bearer).to_map();
        let names: Vec<&str> = {
            let mut v: Vec<&str> = out.keys().map(|k| k.as_str()).collect();
            v.sort();
            v
        };
        assert_eq!(
            names,
            [
                "accept",
                "authorization",
                "content-type",
                "x-warp-client-version"
            ]
        );
        assert_eq!(out["authorization"], "Bearer up");
        assert_eq!(out["x-warp-client-version"], "v1");
    }

    #[test]
    fn response_hop_headers_are_stripped() {
        let mut h = HeaderMap::new();
        h.insert("connection", HeaderValue::from_static("close, x-hop"));
        h.insert("x-hop", HeaderValue::from_static("1"));
        h.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        h.insert(
            "content-type",
            HeaderValue::from_static("text/event-stream"),
        );
        strip_response_headers(&mut h);
        assert_eq!(h.len(), 1);

        let mut h = HeaderMap::new();
        h.insert("connection", HeaderValue::from_static("keep-alive"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("upgrade", HeaderValue::from_static("h2c"));
        h.insert("content-length", HeaderValue::from_static("2"));
        strip_response_headers(&mut h);
        assert_eq!(h.keys().collect::<Vec<_>>(), ["content-length"]);

        let mut h = HeaderMap::new();
        h.insert("content-type", HeaderValue::from_static("application/json"));
        strip_response_headers(&mut h);
        assert_eq!(h.len(), 1);
    }
}
