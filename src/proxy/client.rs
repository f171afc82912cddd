//! The upstream connection pool: keep-alive HTTP/1.1 connections (plain or
//! over rustls), or one multiplexed HTTP/2 connection when TLS negotiates
//! `h2` by ALPN.
//!
//! There is one upstream per generation, so the pool is a plain stack of
//! idle HTTP/1.1 connections rather than a map keyed by host. A request
//! takes the most recently used connection that is ready (or opens one),
//! and gets back with the response a [`Lease`] that returns the connection
//! to the stack when the response body has been read to its end. A body
//! dropped half-read drops its connection too: HTTP/1.1 cannot resume it.
//!
//! A keep-alive connection the upstream closed while it sat idle can fail
//! the next request before a byte of it was written; hyper hands such a
//! request back, and it is sent again on a fresh connection. A request that
//! may have reached the upstream is never sent twice.

use std::io;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme, Uri};
use http::{Method, Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::TlsConnector;

use crate::config::UpstreamConfig;

/// Idle connections kept at most; more are closed when their response ends.
const MAX_IDLE: usize = 256;
/// An idle connection older than this is closed rather than reused: the
/// upstream has likely closed it already (nginx does after 75 s).
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);

type Body = Full<Bytes>;

/// Why a request got no response. Messages name no URL and no header.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The TCP connection could not be opened.
    #[error("cannot connect: {0}")]
    Connect(#[source] io::Error),
    /// Opening the connection took longer than `connect_timeout`.
    #[error("cannot connect: no connection within {0:?}")]
    ConnectTimeout(Duration),
    /// The TLS handshake failed.
    #[error("TLS handshake failed: {0}")]
    Tls(#[source] io::Error),
    /// The HTTP exchange failed.
    #[error("connection failed: {0}")]
    Http(#[source] hyper::Error),
}

impl ClientError {
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
    sender: http1::SendRequest<Body>,
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
    h2: Mutex<Option<http2::SendRequest<Body>>>,
}

/// A pool of connections to one upstream; clones share it.
#[derive(Clone)]
pub struct UpstreamClient {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for UpstreamClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Host and port only: a URL's authority may carry user:password.
        let t = &self.shared.target;
        f.debug_struct("UpstreamClient")
            .field("host", &t.host)
            .field("port", &t.port)
            .finish_non_exhaustive()
    }
}

/// The HTTP/1.1 connection a response is read from, until its body ends.
pub struct Lease {
    sender: Option<http1::SendRequest<Body>>,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease").finish_non_exhaustive()
    }
}

impl Lease {
    /// The response body was read to its end: the connection can serve
    /// the next request.
    pub fn release(mut self) {
        if let Some(sender) = self.sender.take() {
            self.shared.put(sender);
        }
    }
}

enum Conn {
    H1(http1::SendRequest<Body>),
    H2(http2::SendRequest<Body>),
}

/// Runs a connection's I/O in a task of its own until it closes.
fn drive<F>(conn: F)
where
    F: std::future::Future<Output = hyper::Result<()>> + Send + 'static,
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

impl Shared {
    fn put(&self, sender: http1::SendRequest<Body>) {
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

    /// The most recently used HTTP/1.1 connection that can take a request.
    fn take_idle(&self) -> Option<http1::SendRequest<Body>> {
        let mut idle = lock(&self.idle);
        let mut busy = Vec::new();
        let mut found = None;
        while let Some(entry) = idle.pop() {
            if entry.sender.is_closed() || entry.since.elapsed() > IDLE_TIMEOUT {
                continue;
            }
            if entry.sender.is_ready() {
                found = Some(entry.sender);
                break;
            }
            // Its response ended but hyper has not yet marked it ready
            // (its task has not run since): keep it for the next request.
            busy.push(entry);
        }
        idle.extend(busy);
        found
    }

    fn h2(&self) -> Option<http2::SendRequest<Body>> {
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

impl UpstreamClient {
    /// A pool for the upstream at `url` (validated: http or https, with a
    /// host). `extra_roots` are trusted besides the built-in web roots.
    pub fn new(
        url: &Uri,
        connect_timeout: Duration,
        extra_roots: &[CertificateDer<'static>],
    ) -> Result<UpstreamClient, String> {
        let scheme = url.scheme().cloned().unwrap_or(Scheme::HTTPS);
        let authority = url
            .authority()
            .cloned()
            .ok_or("the upstream url has no host")?;
        let https = scheme == Scheme::HTTPS;
        let port = authority.port_u16().unwrap_or(if https { 443 } else { 80 });
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let tls = if https {
            let mut roots = rustls::RootCertStore::empty();
            roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
            for cert in extra_roots {
                roots
                    .add(cert.clone())
                    .map_err(|e| format!("a CA certificate was not accepted: {e}"))?;
            }
            let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_no_client_auth();
            config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
            let name = ServerName::try_from(host.clone())
                .map_err(|_| "the upstream host is not a valid TLS server name".to_string())?;
            Some((TlsConnector::from(Arc::new(config)), name))
        } else {
            None
        };
        // `Host` carries the port only when it is not the scheme's default.
        let host_header = match authority.port_u16() {
            Some(p) if p != if https { 443 } else { 80 } => {
                HeaderValue::from_str(&format!("{}:{p}", authority.host()))
            }
            _ => HeaderValue::from_str(authority.host()),
        }
        .map_err(|_| "the upstream host is not a valid header value".to_string())?;
        Ok(UpstreamClient {
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

    /// Sends one request and waits for the response headers. The lease
    /// (HTTP/1.1 only) must be released once the body has been read whole.
    pub async fn send(
        &self,
        method: Method,
        path: PathAndQuery,
        mut headers: HeaderMap,
        body: Bytes,
    ) -> Result<(Response<Incoming>, Option<Lease>), ClientError> {
        let target = &self.shared.target;
        loop {
            let (mut conn, reused) = match self.shared.h2() {
                Some(s) => (Conn::H2(s), true),
                None => match self.shared.take_idle() {
                    Some(s) => (Conn::H1(s), true),
                    // Boxed: opening a connection (TCP, TLS, HTTP/2
                    // handshakes) is a future of several kilobytes that the
                    // request's own future would otherwise carry, and copy,
                    // on every request.
                    None => (Box::pin(self.connect()).await?, false),
                },
            };
            // HTTP/1.1 wants origin form and `Host`; HTTP/2 the absolute
            // URI, from which hyper makes `:scheme` and `:authority`.
            let uri = match conn {
                Conn::H1(_) => {
                    headers.insert(header::HOST, target.host_header.clone());
                    Uri::from(path.clone())
                }
                Conn::H2(_) => {
                    let mut parts = http::uri::Parts::default();
                    parts.scheme = Some(target.scheme.clone());
                    parts.authority = Some(target.authority.clone());
                    parts.path_and_query = Some(path.clone());
                    Uri::from_parts(parts).expect("scheme, authority and path are valid")
                }
            };
            let mut request = Request::new(Full::new(body.clone()));
            *request.method_mut() = method.clone();
            *request.uri_mut() = uri;
            *request.headers_mut() = headers;
            let sent = match &mut conn {
                Conn::H1(sender) => sender.try_send_request(request).await,
                Conn::H2(sender) => sender.try_send_request(request).await,
            };
            match sent {
                Ok(response) => {
                    let lease = match conn {
                        Conn::H1(sender) => Some(Lease {
                            sender: Some(sender),
                            shared: Arc::clone(&self.shared),
                        }),
                        Conn::H2(_) => None,
                    };
                    return Ok((response, lease));
                }
                Err(mut e) => match e.take_message() {
                    // Not a byte was written: safe to send again, on a new
                    // connection.
                    Some(back) if reused => {
                        tracing::debug!(
                            "idle upstream connection was closed; sending on a new one"
                        );
                        if matches!(conn, Conn::H2(_)) {
                            lock(&self.shared.h2).take();
                        }
                        headers = back.into_parts().0.headers;
                        headers.remove(header::HOST);
                    }
                    _ => return Err(ClientError::Http(e.into_error())),
                },
            }
        }
    }

    /// Opens a connection (TCP, then TLS if https) within `connect_timeout`.
    async fn connect(&self) -> Result<Conn, ClientError> {
        let shared = &self.shared;
        let target = &shared.target;
        let timeout = shared.connect_timeout;
        let deadline = Instant::now() + timeout;
        let tcp = tokio::time::timeout_at(
            deadline,
            TcpStream::connect((target.host.as_str(), target.port)),
        )
        .await
        .map_err(|_| ClientError::ConnectTimeout(timeout))?
        .map_err(ClientError::Connect)?;
        let _ = tcp.set_nodelay(true);
        let Some((connector, name)) = &target.tls else {
            return self.handshake_h1(tcp).await;
        };
        let tls = tokio::time::timeout_at(deadline, connector.connect(name.clone(), tcp))
            .await
            .map_err(|_| ClientError::ConnectTimeout(timeout))?
            .map_err(ClientError::Tls)?;
        if tls.get_ref().1.alpn_protocol() == Some(b"h2") {
            let (sender, conn) = http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .handshake(TokioIo::new(tls))
                .await
                .map_err(ClientError::Http)?;
            drive(conn);
            *lock(&shared.h2) = Some(sender.clone());
            return Ok(Conn::H2(sender));
        }
        self.handshake_h1(tls).await
    }

    async fn handshake_h1<T>(&self, io: T) -> Result<Conn, ClientError>
    where
        T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
    {
        let (sender, conn) = http1::Builder::new()
            .handshake(TokioIo::new(io))
            .await
            .map_err(ClientError::Http)?;
        drive(conn);
        Ok(Conn::H1(sender))
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
