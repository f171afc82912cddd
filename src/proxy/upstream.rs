//! The upstream side of forwarding: the pooled HTTP client (keep-alive,
//! HTTPS through rustls with HTTP/2 by ALPN), the target URL, and the
//! header rules of DESIGN §3.1 — what is stripped from the client's
//! request and from the upstream's answer, and what is added.

use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme, Uri};
use http_body_util::Full;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::config::UpstreamConfig;

/// The client type used toward the upstream.
pub type UpstreamClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

/// Headers that describe one hop and never cross a proxy (RFC 9110 §7.6.1),
/// plus the legacy `proxy-connection`.
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

/// The client's credentials: never forwarded.
const X_API_KEY: HeaderName = HeaderName::from_static("x-api-key");

/// Where requests go, and how.
pub struct Upstream {
    client: UpstreamClient,
    scheme: Scheme,
    authority: Authority,
    /// The URL's path without its trailing slash ("" for the root).
    base_path: String,
    /// `[upstream] headers`, set on every request.
    headers: Vec<(HeaderName, HeaderValue)>,
    /// Longest silence while waiting for headers or inside a stream.
    pub idle_timeout: Duration,
    connect_timeout: Duration,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("authority", &self.authority)
            .finish_non_exhaustive()
    }
}

/// Builds the pooled upstream client.
pub fn build_client(connect_timeout: Duration) -> UpstreamClient {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_connect_timeout(Some(connect_timeout));
    http.set_nodelay(true);
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_provider_and_webpki_roots(rustls::crypto::ring::default_provider())
        .expect("ring supports the default protocol versions")
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(http);
    Client::builder(TokioExecutor::new())
        .timer(TokioTimer::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(Duration::from_secs(90))
        .pool_max_idle_per_host(256)
        .build(https)
}

impl Upstream {
    /// The target of `config`, reusing `previous`'s client (and its warm
    /// connections) when the connection settings did not change.
    pub fn new(config: &UpstreamConfig, previous: Option<&Upstream>) -> Upstream {
        let client = match previous {
            Some(p) if p.connect_timeout == config.connect_timeout => p.client.clone(),
            _ => build_client(config.connect_timeout),
        };
        let scheme = config.url.scheme().cloned().unwrap_or(Scheme::HTTPS);
        let authority = config
            .url
            .authority()
            .cloned()
            .expect("validated: the upstream url has a host");
        let base_path = config.url.path().trim_end_matches('/').to_string();
        Upstream {
            client,
            scheme,
            authority,
            base_path,
            headers: config.headers.clone(),
            idle_timeout: config.idle_timeout,
            connect_timeout: config.connect_timeout,
        }
    }

    /// The client.
    pub fn client(&self) -> &UpstreamClient {
        &self.client
    }

    /// The upstream URL for a client request's path and query.
    pub fn uri_for(&self, pq: Option<&PathAndQuery>) -> Uri {
        let pq_str = pq.map_or("/", PathAndQuery::as_str);
        let joined = if self.base_path.is_empty() {
            PathAndQuery::try_from(pq_str).unwrap_or_else(|_| PathAndQuery::from_static("/"))
        } else {
            let mut s = String::with_capacity(self.base_path.len() + pq_str.len());
            s.push_str(&self.base_path);
            s.push_str(pq_str);
            PathAndQuery::try_from(s).unwrap_or_else(|_| PathAndQuery::from_static("/"))
        };
        Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone())
            .path_and_query(joined)
            .build()
            .expect("scheme, authority and path are valid")
    }

    /// The headers to send upstream: the client's, less hop-by-hop headers,
    /// its credentials and forwarding headers, plus the bearer and
    /// `[upstream] headers` (which replace the client's of the same name).
    pub fn request_headers(&self, client: &HeaderMap, bearer: HeaderValue) -> HeaderMap {
        let mut out = HeaderMap::with_capacity(client.len() + self.headers.len() + 1);
        for (name, value) in client {
            if forwardable(name, client) && !self.headers.iter().any(|(n, _)| n == name) {
                out.append(name.clone(), value.clone());
            }
        }
        for (name, value) in &self.headers {
            out.insert(name.clone(), value.clone());
        }
        out.insert(header::AUTHORIZATION, bearer);
        out
    }
}

/// Whether a client request header may go upstream.
fn forwardable(name: &HeaderName, all: &HeaderMap) -> bool {
    if HOP_BY_HOP.contains(name)
        || name == header::UPGRADE
        || name == header::HOST
        || name == header::AUTHORIZATION
        || name == X_API_KEY
        || name == header::CONTENT_LENGTH
        || name == header::FORWARDED
        || name == header::VIA
        || name.as_str().starts_with("x-forwarded-")
    {
        return false;
    }
    !named_by_connection(name, all)
}

/// Whether the `Connection` header lists `name` (those are hop-by-hop too).
fn named_by_connection(name: &HeaderName, all: &HeaderMap) -> bool {
    all.get_all(header::CONNECTION).iter().any(|v| {
        v.to_str().is_ok_and(|s| {
            s.split(',')
                .any(|token| token.trim().eq_ignore_ascii_case(name.as_str()))
        })
    })
}

/// Removes hop-by-hop headers from an upstream answer before it goes to
/// the client.
pub fn strip_response_headers(headers: &mut HeaderMap) {
    let listed: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|s| s.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for name in HOP_BY_HOP.iter().chain(listed.iter()) {
        headers.remove(name);
    }
    headers.remove(header::UPGRADE);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upstream(url: &str) -> Upstream {
        let c = crate::config::Config::parse(
            &format!(
                "[upstream]\nurl = \"{url}\"\nheaders = {{ \"x-warp-client-version\" = \"v1\" }}\n"
            ),
            None,
            &|_| None,
        )
        .unwrap();
        Upstream::new(&c.upstream, None)
    }

    #[tokio::test]
    async fn urls_join_the_base_path() {
        let u = upstream("http://127.0.0.1:1/base/");
        let pq = PathAndQuery::from_static("/ai/multi-agent?x=1");
        assert_eq!(
            u.uri_for(Some(&pq)).to_string(),
            "http://127.0.0.1:1/base/ai/multi-agent?x=1"
        );
        let u = upstream("http://127.0.0.1:1");
        assert_eq!(
            u.uri_for(Some(&pq)).to_string(),
            "http://127.0.0.1:1/ai/multi-agent?x=1"
        );
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
        let out = u.request_headers(&h, HeaderValue::from_static("Bearer up"));
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
    }
}
