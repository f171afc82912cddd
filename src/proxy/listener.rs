//! Client connections: accepted, told apart (HTTP/2 by its connection
//! preface, h2c with prior knowledge; HTTP/1.x otherwise), served by
//! hyper, and drained at shutdown.
//!
//! What hyper leaves to us, and is done here:
//! - A request refused before its body was read (401, 413, 408) ends its
//!   connection; closing a socket with unread bytes makes the kernel send
//!   a reset, which can destroy the answer before the client reads it. So
//!   the close *lingers*: the proxy sends its FIN, then reads and drops
//!   what the client still sends, for up to [`LINGER_TIME`] or
//!   [`LINGER_BYTES`].
//! - An HTTP/2 connection with no open request is closed after
//!   `header_read_timeout` (hyper closes idle HTTP/1 connections after it
//!   by itself), and is pinged to find dead peers under long streams.
//!
//! When the listener drains, a connection waiting for a request closes at
//! once and one serving a request closes after its answer.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify};
use tokio::time::{Instant, Sleep};
use tracing::Instrument;

use crate::generation::Generations;
use crate::shutdown::Shutdown;

/// Largest request header block accepted, HTTP/1 and HTTP/2 alike.
pub const MAX_HEADER_BYTES: usize = 64 * 1024;
/// Most header fields in one HTTP/1 request.
const MAX_HEADERS: usize = 128;
/// HTTP/2 streams one client connection may have open at once.
pub const MAX_CONCURRENT_STREAMS: u32 = 256;
/// HTTP/2 pings: every this long while a connection is quiet, and the
/// connection closes when an answer takes longer than this. A proxy in
/// front of minutes-long streams must notice a peer that vanished.
const H2_KEEP_ALIVE: Duration = Duration::from_secs(20);
/// The HTTP/2 connection preface (RFC 9113 §3.4).
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// How long, and how much, a lingering close reads and drops.
const LINGER_TIME: Duration = Duration::from_millis(500);
const LINGER_BYTES: usize = 256 * 1024;

/// What the connections of one listener share.
struct Server {
    generations: Arc<Generations>,
    /// Tells whether the instance drains: answers then end their HTTP/1
    /// connection, so keep-alive clients reconnect (to another replica,
    /// once the load balancer saw `/readyz` fail) before the stop.
    shutdown: Shutdown,
    header_read_timeout: Duration,
    h1: http1::Builder,
    h2: http2::Builder<InSpan>,
}

/// The executor of HTTP/2 streams: hyper serves each stream in a task of
/// its own, spawned while the connection is polled; the task keeps the
/// span current then, the connection's (its peer), so that every line a
/// stream says, the access log's included, names the client.
#[derive(Clone, Copy, Debug)]
struct InSpan;

impl<F> hyper::rt::Executor<F> for InSpan
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, future: F) {
        tokio::spawn(future.in_current_span());
    }
}

/// What one connection's requests tell its I/O.
#[derive(Debug, Default)]
pub(super) struct ConnState {
    /// Set while the current request's body is not read to its end: if the
    /// connection closes now, the close lingers.
    pub(super) body_unread: AtomicBool,
    /// Set when an HTTP/1 request body ended in trailers: hyper's reading
    /// of them is lenient (a bare LF can end them, or a request line be
    /// taken in as one), so the bytes after them are not trusted to be the
    /// next request, and the connection ends after this answer.
    pub(super) had_trailers: AtomicBool,
    /// The open requests of an HTTP/2 connection (`None` for HTTP/1).
    pub(super) activity: Option<Arc<Activity>>,
    /// The client's address (the access log's `peer`).
    pub(super) peer: Option<SocketAddr>,
}

/// Open requests on an HTTP/2 connection, so that an idle one can be closed.
#[derive(Debug, Default)]
pub(crate) struct Activity {
    open: AtomicUsize,
    changed: Notify,
}

impl Activity {
    /// A request opened.
    pub(crate) fn start(&self) {
        self.open.fetch_add(1, Ordering::Relaxed);
        self.changed.notify_one();
    }

    /// A request ended (its answer's body too).
    pub(crate) fn end(&self) {
        if self.open.fetch_sub(1, Ordering::Relaxed) == 1 {
            self.changed.notify_one();
        }
    }
}

/// Accepts connections on `listener` until `shutdown` stops it (through a
/// drain too: HTTP/1 answers then close their connection), then lets open
/// requests (streams included) finish for up to `grace`.
pub async fn serve(
    listener: TcpListener,
    generations: Arc<Generations>,
    mut shutdown: Shutdown,
    grace: Duration,
) {
    let header_read_timeout = generations.current().config.server.header_read_timeout;
    let mut h1 = http1::Builder::new();
    h1.timer(TokioTimer::new())
        .header_read_timeout(header_read_timeout)
        .max_buf_size(MAX_HEADER_BYTES.max(8192))
        .max_headers(MAX_HEADERS);
    let mut h2 = http2::Builder::new(InSpan);
    h2.timer(TokioTimer::new())
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .max_header_list_size(MAX_HEADER_BYTES as u32)
        .keep_alive_interval(Some(H2_KEEP_ALIVE))
        .keep_alive_timeout(H2_KEEP_ALIVE);
    let server = Arc::new(Server {
        generations,
        shutdown: shutdown.clone(),
        header_read_timeout,
        h1,
        h2,
    });
    // Every connection holds a receiver: `closed` tells when all are gone.
    let (drain, draining) = watch::channel(false);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(pair) => pair,
                    Err(e) => {
                        // Usually out of file descriptors: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                // Every line said while serving it names the client.
                let span = tracing::info_span!("connection", peer = %peer);
                tokio::spawn(
                    Arc::clone(&server)
                        .connection(stream, peer, draining.clone())
                        .instrument(span),
                );
            }
            _ = shutdown.wait() => break,
        }
    }
    drop(listener);
    drop(draining);
    drain.send_replace(true);
    tracing::info!(grace = ?grace, "proxy stopped accepting; letting requests finish");
    tokio::select! {
        _ = drain.closed() => tracing::info!("all client connections closed"),
        _ = tokio::time::sleep(grace) => tracing::warn!("grace period over; closing the remaining connections"),
    }
}

/// What the first bytes of a connection said.
enum Opening {
    Http1(Bytes),
    Http2(Bytes),
}

impl Server {
    /// Serves one connection until it ends.
    async fn connection(
        self: Arc<Self>,
        mut stream: TcpStream,
        peer: SocketAddr,
        drain: watch::Receiver<bool>,
    ) {
        let Some(opening) = self.opening(&mut stream, drain.clone()).await else {
            return;
        };
        match opening {
            Opening::Http1(read) => {
                let state = Arc::new(ConnState {
                    peer: Some(peer),
                    ..ConnState::default()
                });
                let io = ClientIo::new(stream, read, Arc::clone(&state));
                self.serve_h1(io, state, drain).await;
            }
            Opening::Http2(read) => {
                let activity = Arc::new(Activity::default());
                let state = Arc::new(ConnState {
                    body_unread: AtomicBool::new(false),
                    had_trailers: AtomicBool::new(false),
                    activity: Some(Arc::clone(&activity)),
                    peer: Some(peer),
                });
                let io = ClientIo::new(stream, read, Arc::clone(&state));
                self.serve_h2(io, state, activity, drain).await;
            }
        }
    }

    /// Reads until the bytes leave the HTTP/2 preface, or are all of it;
    /// `None` when the client closes, says nothing within
    /// `header_read_timeout`, or the listener drains first.
    async fn opening(
        &self,
        stream: &mut TcpStream,
        mut drain: watch::Receiver<bool>,
    ) -> Option<Opening> {
        let mut read = BytesMut::with_capacity(PREFACE.len());
        let deadline = tokio::time::sleep(self.header_read_timeout);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                biased;
                n = stream.read_buf(&mut read) => match n {
                    Ok(0) | Err(_) => return None,
                    Ok(_) => {}
                },
                () = &mut deadline => return None,
                // An error means the listener is gone: drain as well.
                _ = drain.wait_for(|stop| *stop) => return None,
            }
            if !PREFACE.starts_with(&read) {
                return Some(Opening::Http1(read.freeze()));
            }
            if read.len() == PREFACE.len() {
                return Some(Opening::Http2(read.freeze()));
            }
        }
    }

    async fn serve_h1(
        self: Arc<Self>,
        io: ClientIo,
        state: Arc<ConnState>,
        mut drain: watch::Receiver<bool>,
    ) {
        let service = {
            let server = Arc::clone(&self);
            service_fn(move |req| {
                let server = Arc::clone(&server);
                let state = Arc::clone(&state);
                async move {
                    let draining = server.shutdown.is_draining();
                    Ok::<_, Infallible>(
                        super::respond(&server.generations, req, &state, draining).await,
                    )
                }
            })
        };
        let conn = self.h1.serve_connection(TokioIo::new(io), service);
        tokio::pin!(conn);
        let mut draining = false;
        loop {
            tokio::select! {
                result = conn.as_mut() => {
                    if let Err(e) = result {
                        tracing::debug!(error = %e, "client connection ended with an error");
                    }
                    return;
                }
                // Err: the listener is gone, which also means drain.
                _ = drain.wait_for(|stop| *stop), if !draining => {
                    draining = true;
                    conn.as_mut().graceful_shutdown();
                }
            }
        }
    }

    async fn serve_h2(
        self: Arc<Self>,
        io: ClientIo,
        state: Arc<ConnState>,
        activity: Arc<Activity>,
        mut drain: watch::Receiver<bool>,
    ) {
        let service = {
            let server = Arc::clone(&self);
            service_fn(move |req| {
                let server = Arc::clone(&server);
                let state = Arc::clone(&state);
                async move {
                    // HTTP/2 says goodbye with GOAWAY at the stop instead.
                    Ok::<_, Infallible>(
                        super::respond(&server.generations, req, &state, false).await,
                    )
                }
            })
        };
        let conn = self.h2.serve_connection(TokioIo::new(io), service);
        tokio::pin!(conn);
        let idle = tokio::time::sleep(self.header_read_timeout);
        tokio::pin!(idle);
        let mut draining = false;
        // Set when an idle connection was told to go: a peer that does not
        // answer the GOAWAY's ping is dropped when this passes.
        let mut gone_by: Option<Instant> = None;
        loop {
            let changed = activity.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let quiet = activity.open.load(Ordering::Relaxed) == 0;
            tokio::select! {
                result = conn.as_mut() => {
                    if let Err(e) = result {
                        tracing::debug!(error = %e, "HTTP/2 client connection ended with an error");
                    }
                    return;
                }
                _ = drain.wait_for(|stop| *stop), if !draining => {
                    draining = true;
                    conn.as_mut().graceful_shutdown();
                }
                () = &mut changed => {
                    // A request opened or the last one ended: the quiet
                    // time starts again. Once the connection was told to
                    // go, its deadline stays; the loop only looks again at
                    // whether a request is open (one that came in after
                    // the GOAWAY keeps the connection).
                    if gone_by.is_none() {
                        idle.as_mut().reset(Instant::now() + self.header_read_timeout);
                    }
                }
                () = &mut idle, if quiet => {
                    match gone_by {
                        None if !draining => {
                            tracing::debug!("closing an idle HTTP/2 client connection");
                            draining = true;
                            conn.as_mut().graceful_shutdown();
                            let by = Instant::now() + self.header_read_timeout;
                            gone_by = Some(by);
                            idle.as_mut().reset(by);
                        }
                        Some(by) if Instant::now() >= by => {
                            tracing::debug!("an idle HTTP/2 client did not close; dropping it");
                            return;
                        }
                        _ => idle.as_mut().reset(Instant::now() + self.header_read_timeout),
                    }
                }
            }
        }
    }
}

/// A client connection's socket, with the bytes read to tell its protocol
/// apart given back first, and the lingering close.
struct ClientIo {
    stream: TcpStream,
    /// Read before hyper took over; hyper reads these first.
    read: Bytes,
    state: Arc<ConnState>,
    /// Set once a lingering close has begun.
    linger: Option<Linger>,
}

struct Linger {
    until: Pin<Box<Sleep>>,
    left: usize,
}

impl ClientIo {
    fn new(stream: TcpStream, read: Bytes, state: Arc<ConnState>) -> ClientIo {
        ClientIo {
            stream,
            read,
            state,
            linger: None,
        }
    }
}

impl AsyncRead for ClientIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.read.is_empty() {
            let n = this.read.len().min(buf.remaining());
            buf.put_slice(&this.read[..n]);
            this.read.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for ClientIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    /// Called by hyper when it closes the connection. With a request body
    /// left unread, the FIN goes out and the rest of the body is read and
    /// dropped (bounded) before the socket is closed.
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.linger.is_none() {
            std::task::ready!(Pin::new(&mut this.stream).poll_shutdown(cx))?;
            if !this.state.body_unread.load(Ordering::Relaxed) {
                return Poll::Ready(Ok(()));
            }
            this.linger = Some(Linger {
                until: Box::pin(tokio::time::sleep(LINGER_TIME)),
                left: LINGER_BYTES,
            });
        }
        let linger = this.linger.as_mut().expect("set above");
        let mut scratch = [0u8; 8 * 1024];
        loop {
            if linger.until.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Ok(()));
            }
            let mut buf = ReadBuf::new(&mut scratch);
            match Pin::new(&mut this.stream).poll_read(cx, &mut buf) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(())) if !buf.filled().is_empty() => {
                    linger.left = linger.left.saturating_sub(buf.filled().len());
                    if linger.left == 0 {
                        return Poll::Ready(Ok(()));
                    }
                }
                // The client closed too, or the connection broke: done.
                Poll::Ready(_) => return Poll::Ready(Ok(())),
            }
        }
    }
}
