//! The client side of the proxy listener: one accepted connection, served
//! until it closes.
//!
//! HTTP/1.x is read and written here, by a codec written for what the
//! proxy does with a client connection: read a request head, hand it to
//! [`super::respond`] with a way to read the body whole, write the answer
//! (head and a whole body in one `write`), and wait for the next request.
//! A connection that opens with the HTTP/2 preface (h2c with prior
//! knowledge) goes to hyper's HTTP/2 server, with the bytes already read.
//!
//! Limits and rules:
//! - A request head has at most [`MAX_HEADER_BYTES`] and [`MAX_HEADERS`]
//!   headers (431 beyond). A head that is not HTTP/1.x gets a 400.
//! - Body framing follows RFC 9112 §6.3: `Transfer-Encoding` must end in
//!   chunked, `Content-Length`s must agree (400 otherwise), and a request
//!   with both is read by its chunks and ends its connection.
//! - `header_read_timeout` runs from the moment the connection waits for a
//!   request until its head is whole: it cuts off slow-loris clients and
//!   closes idle keep-alive connections.
//! - `Expect: 100-continue` is answered when the proxy starts reading the
//!   body; a request refused before that (401, 413) ends its connection.
//! - Answers: no body for HEAD, 204 and 304; `Content-Length` when the
//!   body's length is known, chunked otherwise (to the close for an
//!   HTTP/1.0 client); `Date` when the answer has none. Trailers are not
//!   written.
//!
//! When the listener drains (shutdown), a connection waiting for a request
//! closes at once and one serving a request closes after its answer.

use std::cell::RefCell;
use std::convert::Infallible;
use std::future::{poll_fn, Future};
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use bytes::{Bytes, BytesMut};
use http::header;
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::BodyExt;
use hyper::body::Body;
use hyper::server::conn::http2;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::{Instant, Sleep};

use super::body::{ProxyBody, RequestBody, RequestBodyError};
use super::h1::{
    deadline_passed, decode, feed, header_map, header_spans, make_room, push_number, span, Decoded,
    Decoder, Framing, HeaderError, MAX_HEADERS, READ_CHUNK,
};
use super::{MAX_CONCURRENT_STREAMS, MAX_HEADER_BYTES};
use crate::app::App;
use crate::error::ProxyError;

/// Buffers larger than this are given back after a request, so that idle
/// connections do not keep the room of one large request.
const KEEP_ROOM: usize = 64 * 1024;
/// Answer bytes gathered before they are written, even when more frames
/// are ready; and the size from which a frame is written as it is instead
/// of being copied behind the bytes before it.
const WRITE_AT: usize = 64 * 1024;
const COPY_BELOW: usize = 16 * 1024;
/// The HTTP/2 connection preface (RFC 9113 §3.4).
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// When an answer leaves a request body unread, the connection closes; the
/// body is first read and dropped for this long, or this much of it, so
/// that the client reads the answer rather than a reset.
const LINGER_TIME: Duration = Duration::from_millis(500);
const LINGER_BYTES: usize = 256 * 1024;

/// What every client connection of a listener shares.
pub struct Shared {
    app: Arc<App>,
    header_read_timeout: Duration,
    /// Serves the connections that speak HTTP/2.
    h2: http2::Builder<TokioExecutor>,
}

impl Shared {
    /// The settings of `app`'s current configuration, with the limits of
    /// [`super`] on HTTP/2.
    pub fn new(app: Arc<App>) -> Shared {
        let header_read_timeout = app.current().config.server.header_read_timeout;
        let mut h2 = http2::Builder::new(TokioExecutor::new());
        h2.timer(TokioTimer::new())
            .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
            .max_header_list_size(MAX_HEADER_BYTES as u32);
        Shared {
            app,
            header_read_timeout,
            h2,
        }
    }
}

/// Why a request head is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    /// Not a valid HTTP/1.x head, in fixed words.
    Malformed(&'static str),
    /// Longer than [`MAX_HEADER_BYTES`], or more than [`MAX_HEADERS`].
    TooLarge,
}

impl Refusal {
    fn error(self) -> ProxyError {
        match self {
            Refusal::Malformed(detail) => ProxyError::BadRequest { detail },
            Refusal::TooLarge => ProxyError::HeadersTooLarge {
                limit: MAX_HEADER_BYTES,
            },
        }
    }
}

/// A request head, read.
struct RequestHead {
    parts: http::request::Parts,
    /// Whether the client wants the connection kept after the answer.
    keep_alive: bool,
}

/// What a connection waiting for a request got.
// Made once per request and moved once: boxing the head would cost an
// allocation per request to save a copy of 232 bytes.
#[allow(clippy::large_enum_variant)]
enum Next {
    Request(RequestHead),
    /// The HTTP/2 preface.
    Http2,
    /// Nothing more will come: the client closed, went quiet for the
    /// header timeout, or the listener drains.
    Closed,
}

/// How an answer's body is framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framed {
    /// No body at all (HEAD, 204, 304).
    Bodiless,
    Length(u64),
    Chunked,
    /// Up to the close (an HTTP/1.0 client, length unknown).
    Close,
}

/// One client connection.
pub struct Client {
    io: TcpStream,
    /// Bytes read and not yet used.
    buf: BytesMut,
    /// The answer being written (kept to reuse its allocation).
    out: Vec<u8>,
    /// Where the last head's path, names and values sit (kept likewise).
    spans: Vec<[u32; 4]>,
    /// What is left of the current request's body.
    body: Decoder,
    /// The client waits for `100 Continue` before it sends the body.
    expect_continue: bool,
    /// Whether bytes followed the body of the request being served (a
    /// pipelined request): then the client is not watched for leaving.
    pipelined: AtomicBool,
    /// The header timer, made on the first wait that needs one and moved
    /// forward only when it fires early (see [`deadline_passed`]), so a
    /// request does not cost a trip through the timer wheel.
    timer: Option<Pin<Box<Sleep>>>,
}

/// Serves one client connection until it ends.
pub async fn serve_connection(
    io: TcpStream,
    shared: Arc<Shared>,
    mut drain: watch::Receiver<bool>,
) {
    let mut client = Client::new(io, BytesMut::new());
    let mut first = true;
    loop {
        let head = match client
            .wait_head(shared.header_read_timeout, &mut drain, first)
            .await
        {
            Ok(Next::Request(head)) => head,
            Ok(Next::Http2) => return serve_h2(client, shared, drain).await,
            Ok(Next::Closed) => return,
            Err(refusal) => {
                tracing::debug!(?refusal, "refused a client's request head");
                let answer = refusal.error().to_response::<ProxyBody>();
                if client
                    .write_answer(answer, false, false, false)
                    .await
                    .is_ok()
                {
                    client.linger().await;
                }
                return;
            }
        };
        first = false;
        let is_head = head.parts.method == Method::HEAD;
        let http10 = head.parts.version == Version::HTTP_10;
        let (body, left) = client.serving();
        let answer = super::respond(&shared.app, head.parts, RequestBody::H1(body), left).await;
        // A body the proxy did not need (a refused request) can still be
        // skipped when it is all here; otherwise the connection ends.
        let body_read = client.skip_buffered_body();
        let keep_alive = head.keep_alive && body_read && !*drain.borrow();
        match client
            .write_answer(answer, is_head, http10, keep_alive)
            .await
        {
            Ok(true) => client.give_back_room(),
            Ok(false) => {
                if !body_read {
                    client.linger().await;
                }
                return;
            }
            Err(e) => {
                tracing::debug!(error = %e, "client connection ended in the middle of an answer");
                return;
            }
        }
    }
}

/// Hands a connection that opened with the HTTP/2 preface to hyper.
async fn serve_h2(client: Client, shared: Arc<Shared>, mut drain: watch::Receiver<bool>) {
    let io = Rewound {
        read: client.buf.freeze(),
        io: client.io,
    };
    let app = Arc::clone(&shared.app);
    let service = service_fn(move |req| {
        let app = Arc::clone(&app);
        async move { Ok::<_, Infallible>(super::handle(&app, req).await) }
    });
    let conn = shared.h2.serve_connection(TokioIo::new(io), service);
    let mut conn = std::pin::pin!(conn);
    let mut draining = false;
    loop {
        if !draining && *drain.borrow() {
            draining = true;
            conn.as_mut().graceful_shutdown();
        }
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!(error = %e, "HTTP/2 client connection ended with an error");
                }
                return;
            }
            // Err: the listener is gone, which also means drain.
            _ = drain.changed(), if !draining => {
                draining = true;
                conn.as_mut().graceful_shutdown();
            }
        }
    }
}

impl Client {
    /// A connection over `io`, `buf` already read from it.
    fn new(io: TcpStream, buf: BytesMut) -> Client {
        Client {
            io,
            buf,
            out: Vec::new(),
            spans: Vec::new(),
            body: Decoder::Done,
            expect_continue: false,
            pipelined: AtomicBool::new(false),
            timer: None,
        }
    }

    /// Waits for the next request head, for at most `timeout` from now.
    async fn wait_head(
        &mut self,
        timeout: Duration,
        drain: &mut watch::Receiver<bool>,
        first: bool,
    ) -> Result<Next, Refusal> {
        let deadline = Instant::now() + timeout;
        loop {
            if !self.buf.is_empty() {
                // The first bytes may be (the start of) the HTTP/2 preface.
                let seen = &self.buf[..self.buf.len().min(PREFACE.len())];
                if first && PREFACE.starts_with(seen) {
                    if seen.len() == PREFACE.len() {
                        return Ok(Next::Http2);
                    }
                } else if let Some(head) = self.parse_head()? {
                    return Ok(Next::Request(head));
                }
                if self.buf.len() > MAX_HEADER_BYTES {
                    return Err(Refusal::TooLarge);
                }
            } else if *drain.borrow() {
                return Ok(Next::Closed);
            }
            make_room(&mut self.buf);
            let timer = self
                .timer
                .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
            let idle = self.buf.is_empty();
            tokio::select! {
                biased;
                read = self.io.read_buf(&mut self.buf) => match read {
                    Ok(0) => return Ok(Next::Closed),
                    Ok(_) => {}
                    Err(e) => {
                        tracing::debug!(error = %e, "client connection failed");
                        return Ok(Next::Closed);
                    }
                },
                () = deadline_passed(timer, deadline) => {
                    if !idle {
                        tracing::debug!(?timeout, "client did not send its request head in time");
                    }
                    return Ok(Next::Closed);
                }
                // Checked at the top of the loop (an error means the
                // listener is gone: drain as well).
                _ = drain.changed(), if idle => {
                    if !*drain.borrow() {
                        continue;
                    }
                    return Ok(Next::Closed);
                }
            }
        }
    }

    /// Parses a whole request head out of the buffer, if there is one,
    /// and takes note of how its body is framed.
    fn parse_head(&mut self) -> Result<Option<RequestHead>, Refusal> {
        let Some(parsed) = parse_request(&mut self.buf, &mut self.spans)? else {
            return Ok(None);
        };
        self.body = parsed.body;
        self.expect_continue = parsed.expect_continue;
        Ok(Some(parsed.head))
    }

    /// What serving a request needs of its connection: the reader of its
    /// body, and a future that completes if the client leaves before its
    /// answer (see [`client_left`]).
    fn serving(&mut self) -> (BodyReader<'_>, impl Future<Output = ()> + '_) {
        self.pipelined.store(false, Ordering::Relaxed);
        let reader = BodyReader {
            io: &self.io,
            buf: &mut self.buf,
            body: &mut self.body,
            expect_continue: &mut self.expect_continue,
            pipelined: &self.pipelined,
        };
        let left = async {
            // Polled only once the body is read.
            let watch = !self.pipelined.load(Ordering::Relaxed);
            client_left(&self.io, watch).await
        };
        (reader, left)
    }

    /// Drops what is left of the request's body if the buffer holds all of
    /// it. True when nothing of it is left.
    fn skip_buffered_body(&mut self) -> bool {
        loop {
            match decode(&mut self.body, &mut self.buf) {
                Ok(Decoded::Data(_)) => {}
                Ok(Decoded::End) => return true,
                Ok(Decoded::More) | Err(_) => return false,
            }
        }
    }

    /// Gives back buffers that one large request grew.
    fn give_back_room(&mut self) {
        if self.out.capacity() > KEEP_ROOM {
            self.out = Vec::new();
        }
        if self.buf.capacity() > KEEP_ROOM && self.buf.len() <= READ_CHUNK {
            self.buf = BytesMut::from(&self.buf[..]);
        }
    }

    /// Writes an answer to a request (`is_head` for HEAD, `http10` for an
    /// HTTP/1.0 client). Returns whether the connection may take another
    /// request: `keep_alive` and the answer's framing allow it.
    async fn write_answer<B>(
        &mut self,
        answer: Response<B>,
        is_head: bool,
        http10: bool,
        keep_alive: bool,
    ) -> io::Result<bool>
    where
        B: Body<Data = Bytes> + Unpin,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let (parts, mut body) = answer.into_parts();
        let status = parts.status;
        let headers = parts.headers;
        let framed = if is_head
            || status == StatusCode::NO_CONTENT
            || status == StatusCode::NOT_MODIFIED
            || status.is_informational()
        {
            Framed::Bodiless
        } else if let Some(n) = body.size_hint().exact() {
            Framed::Length(n)
        } else if let Some(n) = headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
        {
            Framed::Length(n)
        } else if http10 {
            Framed::Close
        } else {
            Framed::Chunked
        };
        let keep_alive = keep_alive && framed != Framed::Close;
        // A HEAD or 304 answer keeps the upstream's Content-Length: it
        // describes the body a GET would have had.
        let keep_length = framed == Framed::Bodiless && status != StatusCode::NO_CONTENT;

        let Client { io, out, buf, .. } = self;
        let io = &*io;
        out.clear();
        out.extend_from_slice(b"HTTP/1.1 ");
        out.extend_from_slice(status.as_str().as_bytes());
        out.push(b' ');
        out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
        out.extend_from_slice(b"\r\n");
        let mut dated = false;
        for (name, value) in &headers {
            if name == header::TRANSFER_ENCODING
                || name == header::CONNECTION
                || (name == header::CONTENT_LENGTH && !keep_length)
            {
                continue;
            }
            dated |= name == header::DATE;
            out.extend_from_slice(name.as_str().as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(value.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        if !dated {
            write_date(out);
        }
        match framed {
            Framed::Length(n) => {
                out.extend_from_slice(b"content-length: ");
                push_number(out, n, 10);
                out.extend_from_slice(b"\r\n");
            }
            Framed::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
            Framed::Bodiless | Framed::Close => {}
        }
        if !keep_alive {
            out.extend_from_slice(b"connection: close\r\n");
        } else if http10 {
            out.extend_from_slice(b"connection: keep-alive\r\n");
        }
        out.extend_from_slice(b"\r\n");
        drop(headers);
        if framed == Framed::Bodiless {
            flush(io, out).await?;
            return Ok(keep_alive);
        }

        let mut left = match framed {
            Framed::Length(n) => n,
            _ => u64::MAX,
        };
        // Made once: while the body makes the proxy wait, a client that
        // leaves ends the answer (and the upstream request) at once.
        let mut left_early = std::pin::pin!(client_left(io, buf.is_empty()));
        loop {
            // With bytes waiting, look at the body without waiting for it:
            // what is ready goes out with them, else they go out now.
            let frame = if out.is_empty() {
                tokio::select! {
                    biased;
                    frame = body.frame() => frame,
                    () = left_early.as_mut() => {
                        return Err(io::Error::new(
                            io::ErrorKind::ConnectionAborted,
                            "the client closed the connection",
                        ))
                    }
                }
            } else {
                match poll_fn(|cx| Poll::Ready(Pin::new(&mut body).poll_frame(cx))).await {
                    Poll::Ready(frame) => frame,
                    Poll::Pending => {
                        flush(io, out).await?;
                        continue;
                    }
                }
            };
            let data = match frame {
                None => break,
                Some(Err(e)) => {
                    // The client gets what came, then the break.
                    flush(io, out).await?;
                    return Err(io::Error::other(e.into()));
                }
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) if !data.is_empty() => data,
                    // Trailers, and empty frames: nothing to write.
                    _ => continue,
                },
            };
            let len = data.len() as u64;
            if framed == Framed::Chunked {
                push_number(out, len, 16);
                out.extend_from_slice(b"\r\n");
            }
            if len > left {
                out.extend_from_slice(&data[..left as usize]);
                flush(io, out).await?;
                return Err(io::Error::other(
                    "the answer is longer than its Content-Length",
                ));
            }
            left -= len;
            if data.len() < COPY_BELOW {
                out.extend_from_slice(&data);
            } else {
                flush(io, out).await?;
                send_all(io, &data).await?;
            }
            if framed == Framed::Chunked {
                out.extend_from_slice(b"\r\n");
            }
            if out.len() >= WRITE_AT {
                flush(io, out).await?;
            }
        }
        match framed {
            Framed::Chunked => out.extend_from_slice(b"0\r\n\r\n"),
            Framed::Length(_) if left > 0 => {
                flush(io, out).await?;
                return Err(io::Error::other(
                    "the answer is shorter than its Content-Length",
                ));
            }
            _ => {}
        }
        flush(io, out).await?;
        Ok(keep_alive)
    }

    /// Before a connection closes with a request body unread: sends the
    /// end of the stream, then reads and drops what the client still sends
    /// (within bounds), so that closing does not reset the connection
    /// under the answer.
    async fn linger(&mut self) {
        let _ = self.io.shutdown().await;
        let mut dropped = 0;
        let _ = tokio::time::timeout(LINGER_TIME, async {
            while dropped < LINGER_BYTES {
                self.buf.clear();
                make_room(&mut self.buf);
                match self.io.read_buf(&mut self.buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => dropped += n,
                }
            }
        })
        .await;
    }
}

/// The body of the request being served, read from its connection.
pub struct BodyReader<'a> {
    /// Shared: [`client_left`] watches the same socket meanwhile.
    io: &'a TcpStream,
    buf: &'a mut BytesMut,
    body: &'a mut Decoder,
    expect_continue: &'a mut bool,
    /// Set when the body is read and bytes follow it.
    pipelined: &'a AtomicBool,
}

impl BodyReader<'_> {
    /// Reads the body whole, up to `limit` bytes. A body already in the
    /// buffer is a slice of it, not a copy.
    pub async fn read(self, limit: usize) -> Result<Bytes, RequestBodyError> {
        let BodyReader {
            io,
            buf,
            body,
            expect_continue,
            pipelined,
        } = self;
        let read = read_body(io, buf, body, expect_continue, limit).await;
        pipelined.store(!buf.is_empty(), Ordering::Relaxed);
        read
    }
}

/// Reads a request's body whole from `buf` and `io`, up to `limit` bytes.
async fn read_body(
    io: &TcpStream,
    buf: &mut BytesMut,
    decoder: &mut Decoder,
    expect_continue: &mut bool,
    limit: usize,
) -> Result<Bytes, RequestBodyError> {
    match *decoder {
        Decoder::Done => return Ok(Bytes::new()),
        Decoder::Length(n) if n > limit as u64 => return Err(RequestBodyError::TooLarge),
        Decoder::Length(n) if buf.len() as u64 >= n => {
            *decoder = Decoder::Done;
            return Ok(buf.split_to(n as usize).freeze());
        }
        _ => {}
    }
    if std::mem::take(expect_continue) {
        send_all(io, b"HTTP/1.1 100 Continue\r\n\r\n")
            .await
            .map_err(|_| RequestBodyError::Unreadable)?;
    }
    let mut body = BytesMut::new();
    if let Decoder::Length(n) = *decoder {
        body.reserve(n as usize);
    }
    loop {
        match decode(decoder, buf) {
            Ok(Decoded::Data(data)) => {
                if body.len() + data.len() > limit {
                    return Err(RequestBodyError::TooLarge);
                }
                body.extend_from_slice(&data);
            }
            Ok(Decoded::End) => return Ok(body.freeze()),
            Ok(Decoded::More) => {
                make_room(buf);
                match io.try_read_buf(buf) {
                    Ok(0) => return Err(RequestBodyError::Unreadable),
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        io.readable()
                            .await
                            .map_err(|_| RequestBodyError::Unreadable)?;
                    }
                    Err(_) => return Err(RequestBodyError::Unreadable),
                }
            }
            Err(_) => return Err(RequestBodyError::Unreadable),
        }
    }
}

/// Completes when the client closes the connection (or it fails) while a
/// request is served, so that the proxy stops working for no one (as
/// hyper did: a half-closed connection counts as gone). Never completes
/// when the client sends more bytes (a pipelined request, which waits its
/// turn) or when `watch` is false.
async fn client_left(io: &TcpStream, watch: bool) {
    if watch {
        let mut byte = [0u8; 1];
        // `poll_peek` keeps one waker in the socket's reader slot (nobody
        // else reads the socket meanwhile); `peek` would queue a waiter
        // under a lock and take it out again, on every request.
        let left = poll_fn(|cx| {
            let mut probe = ReadBuf::new(&mut byte);
            io.poll_peek(cx, &mut probe)
                .map(|peeked| !matches!(peeked, Ok(1..)))
        })
        .await;
        if left {
            return;
        }
    }
    std::future::pending().await
}

/// Writes all of `bytes` through a shared socket.
async fn send_all(io: &TcpStream, mut bytes: &[u8]) -> io::Result<()> {
    while !bytes.is_empty() {
        match io.try_write(bytes) {
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => io.writable().await?,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Writes what `out` holds and empties it.
async fn flush(io: &TcpStream, out: &mut Vec<u8>) -> io::Result<()> {
    send_all(io, out).await?;
    out.clear();
    Ok(())
}

/// A request head as parsed, with what its framing says.
struct Parsed {
    head: RequestHead,
    /// How its body is framed.
    body: Decoder,
    /// The client waits for `100 Continue` before it sends the body.
    expect_continue: bool,
}

/// Parses a whole request head out of `buf`, if it holds one.
/// `spans` is scratch room, kept by the caller to reuse its allocation.
fn parse_request(buf: &mut BytesMut, spans: &mut Vec<[u32; 4]>) -> Result<Option<Parsed>, Refusal> {
    // Left uninitialised: zeroing room for MAX_HEADERS on every
    // request would cost more than the parse.
    let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut []);
    let len = match httparse::ParserConfig::default().parse_request_with_uninit_headers(
        &mut parsed,
        &*buf,
        &mut slots,
    ) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(Refusal::TooLarge),
        Err(httparse::Error::Version) => return Err(Refusal::Malformed("not an HTTP/1.x request")),
        Err(_) => return Err(Refusal::Malformed("the request head is not valid HTTP")),
    };
    if len > MAX_HEADER_BYTES {
        return Err(Refusal::TooLarge);
    }
    let method = Method::from_bytes(parsed.method.unwrap_or_default().as_bytes())
        .map_err(|_| Refusal::Malformed("invalid method"))?;
    let version = if parsed.version == Some(0) {
        Version::HTTP_10
    } else {
        Version::HTTP_11
    };
    // Where the path and the headers sit, so that they can be slices of
    // the buffer once it is frozen.
    let [p0, p1] = span(buf, parsed.path.unwrap_or_default().as_bytes());
    spans.clear();
    header_spans(buf, parsed.headers, spans);
    let head = buf.split_to(len).freeze();
    let uri = Uri::from_maybe_shared(head.slice(p0 as usize..p1 as usize))
        .map_err(|_| Refusal::Malformed("invalid request target"))?;
    let mut framing = Framing::default();
    let mut expect_continue = false;
    let headers = header_map(&head, spans, &mut framing, |name, value| {
        // Answered here; the upstream gets the body at once.
        let asked = name == header::EXPECT && value.eq_ignore_ascii_case(b"100-continue");
        expect_continue |= asked;
        asked
    })
    .map_err(|e| {
        Refusal::Malformed(match e {
            HeaderError::Name => "invalid header name",
            HeaderError::Value => "invalid header value",
            HeaderError::Framing(_) => "invalid or conflicting Content-Length",
        })
    })?;
    let (body, keep_alive) = framing
        .decide_request(version)
        .map_err(Refusal::Malformed)?;
    let (mut parts, ()) = Request::new(()).into_parts();
    parts.method = method;
    parts.uri = uri;
    parts.version = version;
    parts.headers = headers;
    Ok(Some(Parsed {
        head: RequestHead { parts, keep_alive },
        body,
        // HTTP/1.0 has no interim answers.
        expect_continue: expect_continue && version == Version::HTTP_11,
    }))
}

/// A request taken apart by [`take_apart_request`].
#[derive(Debug)]
pub struct TakenRequest {
    /// The head, less the headers that only framed it.
    pub parts: http::request::Parts,
    /// Whether the connection may carry another request after it.
    pub keep_alive: bool,
    /// The body bytes its framing gave.
    pub body: Vec<u8>,
    /// Whether the body ended.
    pub ended: bool,
}

/// Takes apart what a client sent as a connection would: the head, then
/// the body, its bytes handed to the decoder in pieces that end at each of
/// `cuts`. `None` when the head is incomplete; the error a client would
/// get otherwise. For fuzzing: no input may panic, and where the pieces
/// end may change nothing.
pub fn take_apart_request(
    bytes: &[u8],
    cuts: &[usize],
) -> Result<Option<TakenRequest>, ProxyError> {
    let mut buf = BytesMut::from(bytes);
    let Some(parsed) = parse_request(&mut buf, &mut Vec::new()).map_err(Refusal::error)? else {
        return Ok(None);
    };
    let rest = buf.split();
    let mut decoder = parsed.body;
    let (body, ended) = feed(&mut decoder, &rest, cuts).map_err(|_| ProxyError::BadRequest {
        detail: "the request body could not be read",
    })?;
    Ok(Some(TakenRequest {
        parts: parsed.head.parts,
        keep_alive: parsed.head.keep_alive,
        body,
        ended,
    }))
}

/// Writes a `Date` header: the time is formatted once a second.
fn write_date(out: &mut Vec<u8>) {
    thread_local! {
        static DATE: RefCell<(u64, String)> = const { RefCell::new((0, String::new())) };
    }
    let now = SystemTime::now();
    let secs = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    DATE.with_borrow_mut(|(at, text)| {
        if *at != secs || text.is_empty() {
            *at = secs;
            *text = httpdate::fmt_http_date(now);
        }
        out.extend_from_slice(b"date: ");
        out.extend_from_slice(text.as_bytes());
        out.extend_from_slice(b"\r\n");
    });
}

/// A connection whose first bytes were already read: they are read again
/// first.
struct Rewound {
    read: Bytes,
    io: TcpStream,
}

impl AsyncRead for Rewound {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.read.is_empty() {
            let n = this.read.len().min(buf.remaining());
            buf.put_slice(&this.read.split_to(n));
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Rewound {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::h1::Chunk;
    use http::HeaderValue;
    use tokio::io::AsyncReadExt;

    /// A client connection whose buffer holds `bytes`, and the client's
    /// end of its loopback socket.
    async fn client_pair(bytes: &[u8]) -> (Client, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let connect = TcpStream::connect(listener.local_addr().unwrap());
        let (io, peer) = tokio::join!(async { listener.accept().await.unwrap().0 }, connect);
        (Client::new(io, BytesMut::from(bytes)), peer.unwrap())
    }

    async fn client_with(bytes: &[u8]) -> Client {
        client_pair(bytes).await.0
    }

    /// What a head parsed to: method, body framing, keep-alive, whether
    /// `100 Continue` is owed, and the header names kept.
    type Parsed = (String, Decoder, bool, bool, Vec<String>);

    async fn parse(raw: &str) -> Result<Option<Parsed>, Refusal> {
        let mut client = client_with(raw.as_bytes()).await;
        Ok(client.parse_head()?.map(|head| {
            let names = head.parts.headers.keys().map(|n| n.to_string()).collect();
            (
                head.parts.method.to_string(),
                client.body,
                head.keep_alive,
                client.expect_continue,
                names,
            )
        }))
    }

    #[tokio::test]
    async fn request_heads_are_framed_per_rfc_9112() {
        let chunked = Decoder::Chunked(Chunk::START);
        let ok = |m: &str, d, k, e, names: &[&str]| {
            Ok(Some((
                m.to_string(),
                d,
                k,
                e,
                names.iter().map(|n| n.to_string()).collect(),
            )))
        };
        let bad = |detail| Err(Refusal::Malformed(detail));
        let cases: Vec<(&str, Result<Option<Parsed>, Refusal>)> = vec![
            (
                "GET / HTTP/1.1\r\nHost: x\r\n\r\n",
                ok("GET", Decoder::Done, true, false, &["host"]),
            ),
            ("GET / HTTP/1.1\r\nHost: x\r\n", Ok(None)),
            (
                "GET / HTTP/1.1\r\nConnection: close\r\n\r\n",
                ok("GET", Decoder::Done, false, false, &[]),
            ),
            (
                "GET / HTTP/1.0\r\n\r\n",
                ok("GET", Decoder::Done, false, false, &[]),
            ),
            (
                "GET / HTTP/1.0\r\nConnection: Keep-Alive\r\nKeep-Alive: timeout=5\r\n\r\n",
                ok("GET", Decoder::Done, true, false, &[]),
            ),
            // A Connection naming another header stays for the header rules.
            (
                "GET / HTTP/1.1\r\nConnection: x-hop\r\nx-hop: 1\r\n\r\n",
                ok("GET", Decoder::Done, true, false, &["connection", "x-hop"]),
            ),
            (
                "POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\n",
                ok("POST", Decoder::Length(5), true, false, &["content-length"]),
            ),
            (
                "POST / HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
                ok("POST", Decoder::Done, true, false, &["content-length"]),
            ),
            (
                "POST / HTTP/1.1\r\nContent-Length: 5, 5\r\n\r\n",
                ok("POST", Decoder::Length(5), true, false, &["content-length"]),
            ),
            (
                "POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
                ok("POST", chunked, true, false, &[]),
            ),
            // HTTP/1.0 has no chunks: read, then the connection ends.
            (
                "POST / HTTP/1.0\r\nConnection: keep-alive\r\nTransfer-Encoding: chunked\r\n\r\n",
                ok("POST", chunked, false, false, &[]),
            ),
            // Both framings: the chunks win and the connection ends.
            (
                "POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
                ok("POST", chunked, false, false, &["content-length"]),
            ),
            (
                "POST / HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n",
                ok("POST", Decoder::Length(3), true, true, &["content-length"]),
            ),
            // HTTP/1.0 has no interim answers: nothing is owed.
            (
                "POST / HTTP/1.0\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n",
                ok(
                    "POST",
                    Decoder::Length(3),
                    false,
                    false,
                    &["content-length"],
                ),
            ),
            (
                "POST / HTTP/1.1\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
                bad("a Transfer-Encoding that does not end in chunked"),
            ),
            (
                "POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
                bad("invalid or conflicting Content-Length"),
            ),
            (
                "POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
                bad("invalid or conflicting Content-Length"),
            ),
            (
                "POST / HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n",
                bad("invalid or conflicting Content-Length"),
            ),
            ("GET / HTTP/2.0\r\n\r\n", bad("not an HTTP/1.x request")),
            (
                "GET / HTTP/1.1\r\nbad header\r\n\r\n",
                bad("the request head is not valid HTTP"),
            ),
            (
                "G\x01T / HTTP/1.1\r\n\r\n",
                bad("the request head is not valid HTTP"),
            ),
        ];
        for (raw, want) in cases {
            assert_eq!(parse(raw).await, want, "{raw:?}");
        }
        let many: String = (0..=MAX_HEADERS).map(|i| format!("x-{i}: v\r\n")).collect();
        let raw = format!("GET / HTTP/1.1\r\n{many}\r\n");
        assert_eq!(parse(&raw).await, Err(Refusal::TooLarge));
    }

    #[tokio::test]
    async fn a_head_keeps_its_values_and_leaves_the_body_in_the_buffer() {
        let mut client = client_with(
            b"PUT /a/b?c=d HTTP/1.1\r\nX-Key: Some Value\r\nContent-Length: 3\r\n\r\nabcGET",
        )
        .await;
        let head = client.parse_head().unwrap().unwrap();
        assert_eq!(head.parts.method, Method::PUT);
        assert_eq!(head.parts.uri, "/a/b?c=d");
        assert_eq!(head.parts.version, Version::HTTP_11);
        assert_eq!(head.parts.headers["x-key"], "Some Value");
        assert_eq!(client.serving().0.read(10).await.unwrap(), "abc");
        assert_eq!(&client.buf[..], b"GET", "the next request's start stays");
        // A body over the limit is refused before it is read.
        let mut client = client_with(b"POST / HTTP/1.1\r\nContent-Length: 11\r\n\r\n").await;
        client.parse_head().unwrap().unwrap();
        assert_eq!(
            client.serving().0.read(10).await,
            Err(RequestBodyError::TooLarge)
        );
        // Chunks are joined; the limit holds across them.
        let raw = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\nt: 1\r\n\r\n";
        let mut client = client_with(raw).await;
        client.parse_head().unwrap().unwrap();
        assert_eq!(client.serving().0.read(5).await.unwrap(), "abcde");
        assert!(client.buf.is_empty());
        let mut client = client_with(raw).await;
        client.parse_head().unwrap().unwrap();
        assert_eq!(
            client.serving().0.read(4).await,
            Err(RequestBodyError::TooLarge)
        );
    }

    /// A body of `pieces` whose length is unknown, like a chunked
    /// upstream answer.
    struct Unsized(std::collections::VecDeque<&'static str>);

    impl Body for Unsized {
        type Data = Bytes;
        type Error = Infallible;

        fn poll_frame(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, Infallible>>> {
            let piece = self.get_mut().0.pop_front();
            Poll::Ready(
                piece.map(|p| Ok(hyper::body::Frame::data(Bytes::from_static(p.as_bytes())))),
            )
        }
    }

    fn unsized_body(pieces: &[&'static str]) -> Unsized {
        Unsized(pieces.iter().copied().collect())
    }

    /// What `write_answer` sent, and whether it kept the connection.
    async fn written<B>(
        answer: Response<B>,
        is_head: bool,
        http10: bool,
    ) -> (String, io::Result<bool>)
    where
        B: Body<Data = Bytes> + Unpin,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let (mut client, mut peer) = client_pair(b"").await;
        let result = client.write_answer(answer, is_head, http10, true).await;
        drop(client);
        let mut sent = Vec::new();
        peer.read_to_end(&mut sent).await.unwrap();
        (String::from_utf8(sent).unwrap(), result)
    }

    #[tokio::test]
    async fn answers_are_framed_for_their_request() {
        let full = || Response::new(ProxyBody::full(Bytes::from_static(b"hello")));
        let (text, keep) = written(full(), false, false).await;
        assert!(text.starts_with("HTTP/1.1 200 OK\r\ndate: "), "{text}");
        assert!(
            text.ends_with("GMT\r\ncontent-length: 5\r\n\r\nhello"),
            "{text}"
        );
        assert!(keep.unwrap());
        let (text, keep) = written(full(), false, true).await;
        assert!(
            text.ends_with("content-length: 5\r\nconnection: keep-alive\r\n\r\nhello"),
            "{text}"
        );
        assert!(keep.unwrap(), "a known length keeps an HTTP/1.0 connection");

        // Unknown length: chunks for HTTP/1.1, the close for HTTP/1.0.
        let (text, keep) = written(
            Response::new(unsized_body(&["ab", "", "cde"])),
            false,
            false,
        )
        .await;
        assert!(
            text.ends_with("transfer-encoding: chunked\r\n\r\n2\r\nab\r\n3\r\ncde\r\n0\r\n\r\n"),
            "{text}"
        );
        assert!(keep.unwrap());
        let (text, keep) = written(Response::new(unsized_body(&["ab", "cde"])), false, true).await;
        assert!(
            text.ends_with("GMT\r\nconnection: close\r\n\r\nabcde"),
            "{text}"
        );
        assert!(!keep.unwrap());

        // An upstream's Content-Length frames an unsized body; a body that
        // breaks its promise ends the connection.
        let with_length = |n: &'static str, pieces: &[&'static str]| {
            let mut r = Response::new(unsized_body(pieces));
            r.headers_mut()
                .insert(header::CONTENT_LENGTH, HeaderValue::from_static(n));
            r
        };
        let (text, keep) = written(with_length("5", &["ab", "cde"]), false, false).await;
        assert!(text.ends_with("content-length: 5\r\n\r\nabcde"), "{text}");
        assert!(keep.unwrap());
        let (text, keep) = written(with_length("6", &["ab", "cde"]), false, false).await;
        assert!(text.ends_with("\r\n\r\nabcde"), "{text}");
        assert!(keep.is_err(), "shorter than its length");
        let (text, keep) = written(with_length("4", &["ab", "cde"]), false, false).await;
        assert!(text.ends_with("\r\n\r\nabcd"), "{text}");
        assert!(keep.is_err(), "longer than its length");

        // HEAD and 304 keep the length a GET would have had; 204 has none.
        let (text, keep) = written(with_length("42", &[]), true, false).await;
        assert!(
            text.contains("content-length: 42\r\n") && text.ends_with("\r\n\r\n"),
            "{text}"
        );
        assert!(keep.unwrap());
        let mut not_modified = with_length("42", &[]);
        *not_modified.status_mut() = StatusCode::NOT_MODIFIED;
        let (text, _) = written(not_modified, false, false).await;
        assert!(
            text.starts_with("HTTP/1.1 304 Not Modified\r\n")
                && text.contains("content-length: 42\r\n"),
            "{text}"
        );
        let mut no_content = with_length("42", &[]);
        *no_content.status_mut() = StatusCode::NO_CONTENT;
        let (text, _) = written(no_content, false, false).await;
        assert!(
            !text.contains("content-length") && !text.contains("transfer-encoding"),
            "{text}"
        );

        // The answer's own Date is kept, hop-by-hop framing headers never
        // pass, and an unknown status has an empty reason.
        let mut r = full();
        *r.status_mut() = StatusCode::from_u16(599).unwrap();
        let h = r.headers_mut();
        h.insert(
            header::DATE,
            HeaderValue::from_static("Tue, 01 Dec 2026 00:00:00 GMT"),
        );
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert(header::CONNECTION, HeaderValue::from_static("close"));
        let (text, _) = written(r, false, false).await;
        assert_eq!(
            text,
            "HTTP/1.1 599 \r\ndate: Tue, 01 Dec 2026 00:00:00 GMT\r\ncontent-length: 5\r\n\r\nhello"
        );
    }
}
