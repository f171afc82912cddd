//! The upstream side of forwarding: where a request goes (the upstream
//! URL's path joined with the client's), what it carries (the header
//! rules of [`headers`]), and how it travels (the connection pool of
//! [`connections`], over rustls for `https`).
//!
//! Every HTTP byte is hyper's: this module keeps connections and decides
//! when a request may be sent again, nothing more. It knows nothing of
//! tokens, tiers or failover: the proxy hands it a request and a bearer.

pub mod connections;
pub mod headers;
mod tls;

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::uri::PathAndQuery;
use http::{Method, Response};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use tokio::time::Instant;

use crate::config::UpstreamConfig;
pub use connections::Connections;

/// Why an upstream exchange gave no answer, or its body broke. Messages
/// name no URL and no header (a URL may carry credentials).
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// The TCP connection could not be opened.
    #[error("cannot connect: {0}")]
    Connect(#[source] io::Error),
    /// Opening the connection took longer than `connect_timeout`.
    #[error("cannot connect: no connection within {0:?}")]
    ConnectTimeout(Duration),
    /// The TLS handshake failed.
    #[error("TLS handshake failed: {0}")]
    Tls(#[source] io::Error),
    /// The HTTP exchange failed (hyper's error says how).
    #[error("HTTP exchange failed: {0}")]
    Exchange(#[source] hyper::Error),
    /// No answer's head within `idle_timeout`.
    #[error("no answer within {0:?}")]
    NoAnswer(Duration),
    /// The answer's body said nothing for longer than `idle_timeout`.
    #[error("the answer's body was silent for longer than {0:?}")]
    Silent(Duration),
}

impl UpstreamError {
    /// Whether the upstream was too slow, rather than unreachable or broken.
    pub fn is_timeout(&self) -> bool {
        match self {
            UpstreamError::NoAnswer(_) | UpstreamError::Silent(_) => true,
            UpstreamError::Connect(_)
            | UpstreamError::ConnectTimeout(_)
            | UpstreamError::Tls(_)
            | UpstreamError::Exchange(_) => false,
        }
    }

    /// The error and its sources, joined, for a log line.
    pub fn describe(&self) -> String {
        use std::error::Error;
        let mut text = self.to_string();
        let mut source = self.source().and_then(Error::source);
        while let Some(s) = source {
            text.push_str(": ");
            text.push_str(&s.to_string());
            source = s.source();
        }
        text
    }
}

/// Why an upstream could not be set up from its configuration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BuildError {
    /// The URL has no host.
    #[error("the upstream url has no host")]
    NoHost,
    /// The host cannot be a `Host` header or a TLS server name.
    #[error("the upstream host is not a valid {0}")]
    BadHost(&'static str),
    /// A certificate of `ca_file` was refused, or rustls could not be set up.
    #[error("TLS setup failed: {0}")]
    Tls(String),
}

/// Where requests go, and how; one per generation.
pub struct Upstream {
    connections: Connections,
    /// The URL's path without its trailing slash ("" for the root).
    base_path: String,
    /// `[upstream] headers`, set on every request.
    headers: Vec<(HeaderName, HeaderValue)>,
    /// Longest wait for an answer's head, and longest silence inside its body.
    pub idle_timeout: Duration,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("connections", &self.connections)
            .finish_non_exhaustive()
    }
}

impl Upstream {
    /// The upstream of `config`, keeping `previous`'s connection pool (and
    /// its warm connections) when it serves the same upstream.
    pub fn new(
        config: &UpstreamConfig,
        previous: Option<&Upstream>,
    ) -> Result<Upstream, BuildError> {
        let connections = match previous {
            Some(p) if p.connections.serves(config) => p.connections.clone(),
            _ => Connections::new(&config.url, config.connect_timeout, &config.ca_certs)?,
        };
        Ok(Upstream {
            connections,
            base_path: config.url.path().trim_end_matches('/').to_string(),
            headers: config.headers.clone(),
            idle_timeout: config.idle_timeout,
        })
    }

    /// The connection pool.
    pub fn connections(&self) -> &Connections {
        &self.connections
    }

    /// Makes a client's headers ready to go upstream (once per request,
    /// whatever the attempts): see [`headers::prepare`]. `from_h2`: the
    /// request came over HTTP/2, whose cookies go on as one field.
    pub fn prepare(&self, client: &mut HeaderMap, from_h2: bool) {
        headers::prepare(client, &self.headers, from_h2);
    }

    /// Sends a request upstream with `authorization` (the token's `Bearer
    /// …` value) and waits for the answer's head, at most `idle_timeout`.
    /// `headers` are the client's, made ready by [`Upstream::prepare`].
    pub async fn send(
        &self,
        method: &Method,
        path: Option<&PathAndQuery>,
        headers: &HeaderMap,
        authorization: &HeaderValue,
        body: &Bytes,
    ) -> Result<Response<UpstreamBody>, UpstreamError> {
        let deadline = Instant::now() + self.idle_timeout;
        let path = self.path_for(path);
        // One timer for the whole exchange (connecting included).
        let send = self
            .connections
            .send(method, &path, headers, authorization, body);
        match tokio::time::timeout_at(deadline, send).await {
            Ok(result) => result,
            Err(_) => Err(UpstreamError::NoAnswer(self.idle_timeout)),
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
        // The client's target is at most 16 KiB (admission) and the base
        // path at most 4 KiB (config): the join is always a valid path.
        // Were it not, the base path alone is sent, never a path outside
        // the configured prefix.
        PathAndQuery::try_from(s).unwrap_or_else(|_| {
            PathAndQuery::try_from(self.base_path.as_str())
                .unwrap_or_else(|_| PathAndQuery::from_static("/"))
        })
    }
}

/// An upstream answer's body. Over HTTP/1.1 it holds its connection until
/// it has been read to its end, then gives it back to the pool; dropped
/// half-read, it drops the connection too (HTTP/1.1 cannot resume it).
pub struct UpstreamBody {
    inner: Incoming,
    loan: Option<connections::Loan>,
}

impl std::fmt::Debug for UpstreamBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamBody").finish_non_exhaustive()
    }
}

impl UpstreamBody {
    fn new(inner: Incoming, loan: Option<connections::Loan>) -> UpstreamBody {
        let mut body = UpstreamBody { inner, loan };
        // An answer without a body (204, 304, HEAD) may never be polled.
        body.give_back_if_ended();
        body
    }

    /// Gives the connection back once the body is known to be whole:
    /// hyper stops polling a body that says it has ended, so this cannot
    /// wait for the final `None`.
    fn give_back_if_ended(&mut self) {
        if self.inner.is_end_stream() {
            if let Some(loan) = self.loan.take() {
                loan.give_back();
            }
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = UpstreamError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, UpstreamError>>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Some(Ok(frame))) => {
                if frame.is_trailers() {
                    // Trailers end a body, and whoever reads it may stop
                    // polling once it has them.
                    if let Some(loan) = this.loan.take() {
                        loan.give_back();
                    }
                } else {
                    this.give_back_if_ended();
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(None) => {
                if let Some(loan) = this.loan.take() {
                    loan.give_back();
                }
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => {
                this.loan = None;
                Poll::Ready(Some(Err(UpstreamError::Exchange(e))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upstream(url: &str) -> Upstream {
        let c =
            crate::config::Config::parse(&format!("[upstream]\nurl = \"{url}\"\n"), None, &|_| {
                None
            })
            .unwrap();
        Upstream::new(&c.upstream, None).unwrap()
    }

    #[tokio::test]
    async fn urls_join_the_base_path() {
        let pq = PathAndQuery::from_static("/ai/multi-agent?x=1");
        for (base, want) in [
            ("http://127.0.0.1:1/base/", "/base/ai/multi-agent?x=1"),
            ("http://127.0.0.1:1/base", "/base/ai/multi-agent?x=1"),
            ("http://127.0.0.1:1", "/ai/multi-agent?x=1"),
        ] {
            assert_eq!(upstream(base).path_for(Some(&pq)).as_str(), want, "{base}");
        }
        assert_eq!(
            upstream("http://127.0.0.1:1/b").path_for(None).as_str(),
            "/b/"
        );
    }
}
