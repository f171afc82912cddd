//! The upstream connection pool, over hyper's client connection API:
//! keep-alive HTTP/1.1 connections (plain or over rustls), or one
//! multiplexed HTTP/2 connection when TLS negotiates `h2` by ALPN.
//!
//! There is one upstream per generation, so the pool is a plain stack of
//! idle HTTP/1.1 connections rather than a map keyed by host. A request
//! takes the most recently used connection that is still open (or opens
//! one), and gets back with its answer a loan that returns the
//! connection to the stack when the answer's body has been read to its
//! end.
//!
//! When a reused connection fails a request, the request is sent again on
//! a new connection only when that is safe: when hyper hands it back
//! unsent, or when the connection closed before any answer and the
//! request is safe to repeat (GET, HEAD, OPTIONS, TRACE, or one carrying
//! an `Idempotency-Key`), the rule Go's client follows. Otherwise the
//! error is the answer.

use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme, Uri};
use http::{Method, Request, Response};
use http_body_util::Full;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::TlsConnector;

use super::{BuildError, UpstreamBody, UpstreamError};
use crate::config::UpstreamConfig;

/// Idle connections kept at most; more are closed when their answer ends.
const MAX_IDLE: usize = 256;
/// An idle connection older than this is closed rather than reused: the
/// upstream has likely closed it already (nginx does after 75 s).
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);

type RequestBody = Full<Bytes>;

/// Where connections go.
struct Target {
    /// Host to connect to (an IPv6 literal without its brackets).
    host: String,
    port: u16,
    /// TLS settings for `https`.
    tls: Option<(TlsConnector, ServerName<'static>)>,
    /// `Host` for HTTP/1.1 requests.
    host_header: HeaderValue,
    scheme: Scheme,
    authority: Authority,
}

struct Idle {
    sender: http1::SendRequest<RequestBody>,
    since: Instant,
}

struct Shared {
    target: Target,
    connect_timeout: Duration,
    /// The CAs trusted besides the web roots (to tell whether a reload may
    /// keep this pool).
    extra_roots: Vec<CertificateDer<'static>>,
    idle: Mutex<Vec<Idle>>,
    /// The HTTP/2 connection, once TLS negotiated `h2`.
    h2: Mutex<Option<http2::SendRequest<RequestBody>>>,
}

/// A pool of connections to one upstream; clones share it.
#[derive(Clone)]
pub struct Connections {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Connections {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Host and port only: a URL's authority may carry user:password.
        let t = &self.shared.target;
        f.debug_struct("Connections")
            .field("host", &t.host)
            .field("port", &t.port)
            .finish_non_exhaustive()
    }
}

/// The HTTP/1.1 connection an answer is read from, until its body ends.
pub(super) struct Loan {
    sender: http1::SendRequest<RequestBody>,
    shared: Arc<Shared>,
}

impl Loan {
    /// The answer's body was read to its end: the connection can serve
    /// the next request.
    pub(super) fn give_back(self) {
        self.shared.put(self.sender);
    }
}

enum Conn {
    H1(http1::SendRequest<RequestBody>),
    H2(http2::SendRequest<RequestBody>),
}

/// Runs a connection's I/O in a task of its own until it closes.
fn drive<F>(conn: F)
where
    F: Future<Output = hyper::Result<()>> + Send + 'static,
{
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "upstream connection ended with an error");
        }
    });
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The guarded data stays consistent even if a holder panicked.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Whether a request may be sent again after its connection closed with
/// no answer: it is safe to repeat (RFC 9110 §9.2.2, as Go's client
/// decides it).
fn replayable(method: &Method, headers: &HeaderMap) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE
    ) || headers.contains_key(&IDEMPOTENCY_KEY)
        || headers.contains_key(&X_IDEMPOTENCY_KEY)
}

static IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");
static X_IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("x-idempotency-key");

impl Shared {
    fn put(&self, sender: http1::SendRequest<RequestBody>) {
        if sender.is_closed() {
            return;
        }
        let mut idle = lock(&self.idle);
        if idle.len() < MAX_IDLE {
            idle.push(Idle {
                sender,
                since: Instant::now(),
            });
        }
    }

    /// The most recently used HTTP/1.1 connection that is still open;
    /// the closed and stale ones found on the way are dropped.
    fn take_idle(&self) -> Option<http1::SendRequest<RequestBody>> {
        let mut idle = lock(&self.idle);
        while let Some(entry) = idle.pop() {
            if !entry.sender.is_closed() && entry.since.elapsed() <= IDLE_TIMEOUT {
                return Some(entry.sender);
            }
        }
        None
    }

    fn h2(&self) -> Option<http2::SendRequest<RequestBody>> {
        // Only TLS can negotiate h2: no lock on a plain upstream's request path.
        self.target.tls.as_ref()?;
        let mut h2 = lock(&self.h2);
        match h2.as_ref() {
            Some(s) if !s.is_closed() => Some(s.clone()),
            Some(_) => {
                *h2 = None;
                None
            }
            None => None,
        }
    }
}

impl Connections {
    /// A pool for the upstream at `url` (validated: http or https, with a
    /// host). `extra_roots` are trusted besides the built-in web roots.
    pub fn new(
        url: &Uri,
        connect_timeout: Duration,
        extra_roots: &[CertificateDer<'static>],
    ) -> Result<Connections, BuildError> {
        let scheme = url.scheme().cloned().unwrap_or(Scheme::HTTPS);
        let authority = url.authority().cloned().ok_or(BuildError::NoHost)?;
        let https = scheme == Scheme::HTTPS;
        let default_port = if https { 443 } else { 80 };
        let port = authority.port_u16().unwrap_or(default_port);
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let tls = if https {
            Some(super::tls::connector(&host, extra_roots)?)
        } else {
            None
        };
        // `Host` carries the port only when it is not the scheme's default.
        let host_header = match authority.port_u16() {
            Some(p) if p != default_port => {
                HeaderValue::from_str(&format!("{}:{p}", authority.host()))
            }
            _ => HeaderValue::from_str(authority.host()),
        }
        .map_err(|_| BuildError::BadHost("header value"))?;
        Ok(Connections {
            shared: Arc::new(Shared {
                target: Target {
                    host,
                    port,
                    tls,
                    host_header,
                    scheme,
                    authority,
                },
                connect_timeout,
                extra_roots: extra_roots.to_vec(),
                idle: Mutex::new(Vec::new()),
                h2: Mutex::new(None),
            }),
        })
    }

    /// Idle HTTP/1.1 connections in the pool (for tests and the admin view).
    pub fn idle_connections(&self) -> usize {
        lock(&self.shared.idle).len()
    }

    /// Sends one request and waits for its answer's head (the caller bounds
    /// the wait). `headers` are the request's as `headers::prepare` left
    /// them; each try sets `Authorization` (the token's bearer, over the
    /// client's) and `Host`. The answer's body, read to its end,
    /// gives its connection back to the pool.
    pub async fn send(
        &self,
        method: &Method,
        path: &PathAndQuery,
        headers: &HeaderMap,
        authorization: &HeaderValue,
        body: &Bytes,
    ) -> Result<Response<UpstreamBody>, UpstreamError> {
        let mut unsent: Option<Request<RequestBody>> = None;
        loop {
            let (mut conn, reused) = match self.shared.h2() {
                Some(s) => (Conn::H2(s), true),
                None => match self.shared.take_idle() {
                    Some(s) => (Conn::H1(s), true),
                    // Boxed: opening a connection (TCP, TLS, HTTP/2
                    // handshakes) is a future of several kilobytes that
                    // the request's own future would otherwise carry.
                    None => (Box::pin(self.connect()).await?, false),
                },
            };
            if let Conn::H1(sender) = &mut conn {
                // A connection given back a moment ago may not have been
                // told by its task yet that it can take the next request.
                if !sender.is_ready() {
                    match sender.ready().await {
                        Ok(()) => {}
                        Err(_closed) if reused => continue,
                        Err(e) => return Err(UpstreamError::Exchange(e)),
                    }
                }
            }
            let request = match unsent.take() {
                Some(request) => self.retarget(request, &conn),
                None => self.request(method, path, headers, authorization, body, &conn),
            };
            let sent = match &mut conn {
                Conn::H1(sender) => sender.try_send_request(request).await,
                Conn::H2(sender) => sender.try_send_request(request).await,
            };
            let mut error = match sent {
                Ok(response) => {
                    let loan = match conn {
                        Conn::H1(sender) => Some(Loan {
                            sender,
                            shared: Arc::clone(&self.shared),
                        }),
                        Conn::H2(_) => None,
                    };
                    return Ok(response.map(|inner| UpstreamBody::new(inner, loan)));
                }
                Err(error) => error,
            };
            if let Conn::H2(_) = conn {
                lock(&self.shared.h2).take();
            }
            if !reused {
                return Err(UpstreamError::Exchange(error.into_error()));
            }
            match error.take_message() {
                // Not a byte of it was written.
                Some(request) => unsent = Some(request),
                None => {
                    let error = error.into_error();
                    // The connection closed before any answer: only a
                    // request that is safe to repeat goes again.
                    if !(error.is_incomplete_message() && replayable(method, headers)) {
                        return Err(UpstreamError::Exchange(error));
                    }
                }
            }
            tracing::debug!("a reused upstream connection was closed; sending on a new one");
        }
    }

    /// The request for `conn`: the prepared headers and the bearer, the
    /// body shared, not copied.
    fn request(
        &self,
        method: &Method,
        path: &PathAndQuery,
        headers: &HeaderMap,
        authorization: &HeaderValue,
        body: &Bytes,
        conn: &Conn,
    ) -> Request<RequestBody> {
        let mut request = Request::new(Full::new(body.clone()));
        *request.method_mut() = method.clone();
        let map = request.headers_mut();
        *map = headers.clone();
        map.insert(header::AUTHORIZATION, authorization.clone());
        *request.uri_mut() = Uri::from(path.clone());
        self.retarget(request, conn)
    }

    /// Fits a request to the protocol of `conn` (a request hyper handed
    /// back may move between HTTP/1.1 and HTTP/2): HTTP/1.1 wants the
    /// origin form and `Host`; HTTP/2 the absolute URI, from which hyper
    /// makes `:scheme` and `:authority`.
    fn retarget(&self, mut request: Request<RequestBody>, conn: &Conn) -> Request<RequestBody> {
        let target = &self.shared.target;
        match conn {
            Conn::H1(_) => {
                request
                    .headers_mut()
                    .insert(header::HOST, target.host_header.clone());
                if request.uri().scheme().is_some() {
                    let path = request.uri().path_and_query().cloned();
                    *request.uri_mut() =
                        Uri::from(path.unwrap_or_else(|| PathAndQuery::from_static("/")));
                }
            }
            Conn::H2(_) => {
                request.headers_mut().remove(header::HOST);
                let path = request
                    .uri()
                    .path_and_query()
                    .cloned()
                    .unwrap_or_else(|| PathAndQuery::from_static("/"));
                let mut parts = http::uri::Parts::default();
                parts.scheme = Some(target.scheme.clone());
                parts.authority = Some(target.authority.clone());
                parts.path_and_query = Some(path);
                *request.uri_mut() =
                    Uri::from_parts(parts).expect("scheme, authority and path are valid");
            }
        }
        request
    }

    /// Opens a connection (TCP, then TLS if https) within `connect_timeout`.
    async fn connect(&self) -> Result<Conn, UpstreamError> {
        let shared = &self.shared;
        let target = &shared.target;
        let timeout = shared.connect_timeout;
        let deadline = Instant::now() + timeout;
        let tcp = tokio::time::timeout_at(
            deadline,
            TcpStream::connect((target.host.as_str(), target.port)),
        )
        .await
        .map_err(|_| UpstreamError::ConnectTimeout(timeout))?
        .map_err(UpstreamError::Connect)?;
        let _ = tcp.set_nodelay(true);
        let Some((connector, name)) = &target.tls else {
            return handshake_h1(tcp).await;
        };
        let tls = tokio::time::timeout_at(deadline, connector.connect(name.clone(), tcp))
            .await
            .map_err(|_| UpstreamError::ConnectTimeout(timeout))?
            .map_err(UpstreamError::Tls)?;
        if tls.get_ref().1.alpn_protocol() != Some(b"h2") {
            return handshake_h1(tls).await;
        }
        let (sender, conn) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .handshake(TokioIo::new(tls))
            .await
            .map_err(UpstreamError::Exchange)?;
        drive(conn);
        *lock(&shared.h2) = Some(sender.clone());
        Ok(Conn::H2(sender))
    }

    /// Whether this pool is the one `config` asks for (so a reload can
    /// keep it, warm connections included): same scheme and host, connect
    /// timeout and trusted CAs.
    pub fn serves(&self, config: &UpstreamConfig) -> bool {
        let t = &self.shared.target;
        config.url.scheme() == Some(&t.scheme)
            && config.url.authority() == Some(&t.authority)
            && self.shared.connect_timeout == config.connect_timeout
            && self.shared.extra_roots == config.ca_certs
    }
}

async fn handshake_h1<T>(io: T) -> Result<Conn, UpstreamError>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    let (sender, conn) = http1::Builder::new()
        .handshake(TokioIo::new(io))
        .await
        .map_err(UpstreamError::Exchange)?;
    drive(conn);
    Ok(Conn::H1(sender))
}
