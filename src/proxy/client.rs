//! The upstream connection pool: keep-alive HTTP/1.1 connections (plain or
//! over rustls) spoken with our own codec ([`super::h1`]), or one
//! multiplexed HTTP/2 connection (hyper's) when TLS negotiates `h2` by ALPN.
//!
//! There is one upstream per generation, so the pool is a plain stack of
//! idle HTTP/1.1 connections rather than a map keyed by host. A request
//! takes the most recently used connection that is still usable (or opens
//! one). The connection travels inside the answer's [`UpstreamBody`] and
//! goes back on the stack when the body has been read to its end; an
//! answer whose body came whole with its head gives the connection back at
//! once. A body dropped half-read drops its connection: HTTP/1.1 cannot
//! resume it.
//!
//! Before a connection is reused it is checked for a close or bytes the
//! upstream sent while it sat idle (no system call unless the runtime saw
//! the socket become readable). If the upstream closes it anyway as the
//! request goes out, the request is sent again on a new connection when
//! that is safe: when the write itself failed, or when no byte of an
//! answer came back and the request is replayable (GET, HEAD, OPTIONS,
//! TRACE, or carrying an `Idempotency-Key`), the rule Go's client follows.
//! Otherwise the error is the client's answer.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::HeaderValue;
use http::uri::{Authority, PathAndQuery, Scheme, Uri};
use http::{Method, Request, Response};
use http_body_util::Full;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::TlsConnector;

use super::h1::{self, Decoder, H1Error, Io};
use super::upstream::Outgoing;
use crate::config::UpstreamConfig;

/// Idle connections kept at most; more are closed when their answer ends.
const MAX_IDLE: usize = 256;
/// An idle connection older than this is closed rather than reused: the
/// upstream has likely closed it already (nginx does after 75 s).
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// Why a request got no answer, or its body broke. Messages name no URL
/// and no header.
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
    /// The HTTP/1.1 exchange failed.
    #[error("HTTP/1.1 exchange failed: {0}")]
    H1(#[source] H1Error),
    /// The HTTP/2 exchange failed.
    #[error("HTTP/2 exchange failed: {0}")]
    H2(#[source] hyper::Error),
    /// No answer's head by the deadline.
    #[error("no answer in time")]
    TimedOut,
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
    conn: h1::Conn,
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
    h2: Mutex<Option<http2::SendRequest<Full<Bytes>>>>,
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

/// An answer's body. An HTTP/1.1 body holds its connection until it has
/// been read to the end, then gives it back to the pool.
pub struct UpstreamBody {
    kind: BodyKind,
}

enum BodyKind {
    /// Came whole with the head (or has none).
    Whole(Option<Bytes>),
    /// Still on its HTTP/1.1 connection.
    H1(Box<H1Body>),
    /// An HTTP/2 stream.
    H2(Incoming),
}

struct H1Body {
    conn: Option<h1::Conn>,
    decoder: Decoder,
    keep_alive: bool,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for UpstreamBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamBody").finish_non_exhaustive()
    }
}

impl H1Body {
    /// The body has ended: the connection goes back if it can be reused.
    fn finish(&mut self) {
        if let Some(conn) = self.conn.take() {
            if conn.reusable_after(self.keep_alive) {
                self.shared.put(conn);
            }
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = ClientError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ClientError>>> {
        match &mut self.get_mut().kind {
            BodyKind::Whole(data) => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            BodyKind::H2(inner) => Pin::new(inner).poll_frame(cx).map_err(ClientError::H2),
            BodyKind::H1(body) => {
                let Some(conn) = body.conn.as_mut() else {
                    return Poll::Ready(None);
                };
                match conn.poll_data(&mut body.decoder, cx) {
                    Poll::Pending => Poll::Pending,
                    Poll::Ready(Ok(Some(data))) => {
                        // Given back as soon as the end is known: the
                        // server stops polling once `is_end_stream` holds.
                        if body.decoder == Decoder::Done {
                            body.finish();
                        }
                        Poll::Ready(Some(Ok(Frame::data(data))))
                    }
                    Poll::Ready(Ok(None)) => {
                        body.finish();
                        Poll::Ready(None)
                    }
                    Poll::Ready(Err(e)) => {
                        body.conn = None;
                        Poll::Ready(Some(Err(ClientError::H1(e))))
                    }
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            BodyKind::Whole(data) => data.is_none(),
            BodyKind::H2(inner) => inner.is_end_stream(),
            BodyKind::H1(body) => body.decoder == Decoder::Done,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            BodyKind::Whole(Some(d)) => SizeHint::with_exact(d.len() as u64),
            BodyKind::Whole(None) => SizeHint::with_exact(0),
            BodyKind::H2(inner) => inner.size_hint(),
            BodyKind::H1(body) => match body.decoder {
                Decoder::Length(n) => SizeHint::with_exact(n),
                Decoder::Done => SizeHint::with_exact(0),
                _ => SizeHint::default(),
            },
        }
    }
}

enum Conn {
    H1(h1::Conn),
    H2(http2::SendRequest<Full<Bytes>>),
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The guarded data stays consistent even if a holder panicked.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Whether a request may be sent again after its connection closed with
/// no answer: it is safe to repeat (RFC 9110 §9.2.2, as Go's client
/// decides it).
fn replayable(method: &Method, headers: &Outgoing<'_>) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE
    ) || headers.has_idempotency_key()
}

impl Shared {
    fn put(&self, conn: h1::Conn) {
        let mut idle = lock(&self.idle);
        if idle.len() < MAX_IDLE {
            idle.push(Idle {
                conn,
                since: Instant::now(),
            });
        }
    }

    /// The most recently used HTTP/1.1 connection that can take a request;
    /// the unusable ones found on the way are closed.
    fn take_idle(&self) -> Option<h1::Conn> {
        let mut idle = lock(&self.idle);
        while let Some(entry) = idle.pop() {
            if entry.since.elapsed() <= IDLE_TIMEOUT && entry.conn.is_usable() {
                return Some(entry.conn);
            }
        }
        None
    }

    fn h2(&self) -> Option<http2::SendRequest<Full<Bytes>>> {
        // Only TLS can negotiate h2: no lock on the plain request path.
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

/// Why an HTTP/1.1 exchange gave no answer.
enum Exchange {
    /// It failed; true when the request may be sent again.
    Failed(H1Error, bool),
    /// The deadline passed.
    TimedOut,
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

    /// Sends one request and waits for the answer's head, until
    /// `deadline`. The body, read to its end, gives its connection back to
    /// the pool.
    pub async fn send(
        &self,
        method: &Method,
        path: &PathAndQuery,
        headers: &Outgoing<'_>,
        body: &Bytes,
        deadline: Instant,
    ) -> Result<Response<UpstreamBody>, ClientError> {
        loop {
            let (conn, reused) = match self.shared.h2() {
                Some(s) => (Conn::H2(s), true),
                None => match self.shared.take_idle() {
                    Some(c) => (Conn::H1(c), true),
                    // Boxed: opening a connection (TCP, TLS, HTTP/2
                    // handshakes) is a future of several kilobytes that the
                    // request's own future would otherwise carry, and copy,
                    // on every request.
                    None => {
                        let connect = Box::pin(self.connect());
                        let conn = tokio::time::timeout_at(deadline, connect)
                            .await
                            .map_err(|_| ClientError::TimedOut)??;
                        (conn, false)
                    }
                },
            };
            match conn {
                Conn::H1(conn) => {
                    match self
                        .send_h1(conn, method, path, headers, body, deadline)
                        .await
                    {
                        Ok(response) => return Ok(response),
                        Err(Exchange::TimedOut) => return Err(ClientError::TimedOut),
                        Err(Exchange::Failed(e, resend)) if reused && resend => {
                            tracing::debug!(error = %e, "reused upstream connection was closed; sending on a new one");
                        }
                        Err(Exchange::Failed(e, _)) => return Err(ClientError::H1(e)),
                    }
                }
                Conn::H2(sender) => {
                    let sent = self.send_h2(sender, method, path, headers, body);
                    let sent = tokio::time::timeout_at(deadline, sent)
                        .await
                        .map_err(|_| ClientError::TimedOut)?;
                    match sent {
                        Ok(response) => return Ok(response),
                        Err(mut e) => {
                            // Not a byte was written: safe to send again.
                            if !(reused && e.take_message().is_some()) {
                                return Err(ClientError::H2(e.into_error()));
                            }
                            tracing::debug!("HTTP/2 connection was closed; opening a new one");
                            lock(&self.shared.h2).take();
                        }
                    }
                }
            }
        }
    }

    /// One exchange on an HTTP/1.1 connection, until `deadline`. On
    /// failure, whether the request may be sent again (if the connection
    /// was a reused one).
    async fn send_h1(
        &self,
        mut conn: h1::Conn,
        method: &Method,
        path: &PathAndQuery,
        headers: &Outgoing<'_>,
        body: &Bytes,
        deadline: Instant,
    ) -> Result<Response<UpstreamBody>, Exchange> {
        let host = &self.shared.target.host_header;
        let mut timer = conn.take_timer(deadline);
        let exchange = async {
            if let Err(e) = conn
                .write_request(method, path.as_str(), host, headers.iter(), body)
                .await
            {
                // The upstream cannot have read the whole request.
                return Err(Exchange::Failed(e.into(), true));
            }
            conn.read_head(method).await.map_err(|e| {
                let nothing_back = !conn.received() && !matches!(e, H1Error::Malformed(_));
                Exchange::Failed(e, nothing_back && replayable(method, headers))
            })
        };
        let head = tokio::select! {
            biased;
            head = exchange => head,
            () = h1::deadline_passed(&mut timer, deadline) => Err(Exchange::TimedOut),
        };
        conn.put_timer(timer);
        let head = head?;
        let mut decoder = head.decoder;
        let kind = match conn.take_whole(&mut decoder) {
            Some(data) => {
                if conn.reusable_after(head.keep_alive) {
                    self.shared.put(conn);
                }
                BodyKind::Whole((!data.is_empty()).then_some(data))
            }
            None => BodyKind::H1(Box::new(H1Body {
                conn: Some(conn),
                decoder,
                keep_alive: head.keep_alive,
                shared: Arc::clone(&self.shared),
            })),
        };
        let mut response = Response::new(UpstreamBody { kind });
        *response.status_mut() = head.status;
        *response.version_mut() = head.version;
        *response.headers_mut() = head.headers;
        Ok(response)
    }

    /// One exchange on the HTTP/2 connection.
    async fn send_h2(
        &self,
        mut sender: http2::SendRequest<Full<Bytes>>,
        method: &Method,
        path: &PathAndQuery,
        headers: &Outgoing<'_>,
        body: &Bytes,
    ) -> Result<Response<UpstreamBody>, hyper::client::conn::TrySendError<Request<Full<Bytes>>>>
    {
        let target = &self.shared.target;
        // The absolute URI, from which hyper makes `:scheme` and `:authority`.
        let mut parts = http::uri::Parts::default();
        parts.scheme = Some(target.scheme.clone());
        parts.authority = Some(target.authority.clone());
        parts.path_and_query = Some(path.clone());
        let uri = Uri::from_parts(parts).expect("scheme, authority and path are valid");
        let mut request = Request::new(Full::new(body.clone()));
        *request.method_mut() = method.clone();
        *request.uri_mut() = uri;
        *request.headers_mut() = headers.to_map();
        let response = sender.try_send_request(request).await?;
        Ok(response.map(|inner| UpstreamBody {
            kind: BodyKind::H2(inner),
        }))
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
            return Ok(Conn::H1(h1::Conn::new(Io::Plain(tcp))));
        };
        let tls = tokio::time::timeout_at(deadline, connector.connect(name.clone(), tcp))
            .await
            .map_err(|_| ClientError::ConnectTimeout(timeout))?
            .map_err(ClientError::Tls)?;
        if tls.get_ref().1.alpn_protocol() != Some(b"h2") {
            return Ok(Conn::H1(h1::Conn::new(Io::Tls(Box::new(tls)))));
        }
        let (sender, conn) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .handshake(TokioIo::new(tls))
            .await
            .map_err(ClientError::H2)?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "HTTP/2 upstream connection ended with an error");
            }
        });
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
