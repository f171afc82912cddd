//! The HTTP/1.1 client side of an upstream connection, written for the one
//! thing the proxy does with it: send a request whose body is already in
//! memory, read the answer's head, then stream its body.
//!
//! The request head is written straight from the headers given into one
//! buffer (the body too when it is small), so a request is one `write`.
//! The answer head is parsed with `httparse`; its header values are slices
//! of the read buffer, not copies. Body framing follows RFC 9112 §6.3: no
//! body for HEAD, 1xx, 204 and 304; chunked when `Transfer-Encoding` ends
//! in chunked; `Content-Length`; otherwise up to the end of the connection.
//!
//! Trailers of a chunked answer are read and dropped.
//!
//! The framing rules and the chunked decoder also read client requests
//! ([`super::downstream`]).
//!
//! A connection may carry the next request only when the answer was framed
//! (by length or chunks), read to its end, kept alive (HTTP/1.1 without
//! `Connection: close`, HTTP/1.0 with `Connection: keep-alive`) and nothing
//! followed it.

use std::future::Future;
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll, Wake, Waker};

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode, Version};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};
use tokio_rustls::client::TlsStream;

/// Longest answer head (status line and headers) accepted.
pub const MAX_HEAD_BYTES: usize = 64 * 1024;
/// Most headers a message may have (answers here, requests in
/// [`super::downstream`]).
pub const MAX_HEADERS: usize = 128;
/// Longest chunk-size line (extensions included), and trailer section.
const MAX_CHUNK_LINE: usize = 4 * 1024;
const MAX_TRAILERS: usize = 64 * 1024;
/// A body this small goes in the same write as the head.
const INLINE_BODY: usize = 16 * 1024;
/// Room for writing requests that a connection keeps between requests.
const KEEP_OUT: usize = 32 * 1024;
/// Read buffer growth.
pub(super) const READ_CHUNK: usize = 8 * 1024;

/// Why an exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum H1Error {
    /// Reading or writing the connection failed.
    #[error("{0}")]
    Io(#[from] io::Error),
    /// The upstream closed the connection before the answer was complete.
    #[error("the upstream closed the connection {0}")]
    Closed(&'static str),
    /// The answer is not valid HTTP/1.1.
    #[error("malformed answer: {0}")]
    Malformed(String),
}

impl H1Error {
    fn malformed(what: impl Into<String>) -> H1Error {
        H1Error::Malformed(what.into())
    }
}

/// The byte stream to the upstream.
pub enum Io {
    /// Plain TCP.
    Plain(TcpStream),
    /// TLS over TCP (boxed: the TLS state is large).
    Tls(Box<TlsStream<TcpStream>>),
}

impl Io {
    fn tcp(&self) -> &TcpStream {
        match self {
            Io::Plain(s) => s,
            Io::Tls(s) => s.get_ref().0,
        }
    }
}

impl AsyncRead for Io {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Io {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_flush(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// One HTTP/1.1 connection to the upstream.
pub struct Conn {
    io: Io,
    /// Bytes read and not yet handed out.
    buf: BytesMut,
    /// The request being written (kept to reuse its allocation).
    out: Vec<u8>,
    /// Where the last head's names and values sit (kept likewise).
    spans: Vec<[u32; 4]>,
    /// Whether any byte of the current answer has arrived (a request on a
    /// reused connection that got none may be sent again elsewhere).
    received: bool,
    /// The timer of the exchanges' deadlines, kept between requests (see
    /// [`deadline_passed`]).
    timer: Option<Pin<Box<Sleep>>>,
}

/// How the body of an answer ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decoder {
    /// This many bytes are left.
    Length(u64),
    /// Chunked, in the given state.
    Chunked(Chunk),
    /// Up to the end of the connection.
    Eof,
    /// The body has ended.
    Done,
}

/// Where a chunked decoder is. `size` is the chunk size read so far,
/// `len` and `line` lengths read so far, `total` the trailer bytes so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(missing_docs)]
pub enum Chunk {
    /// In the chunk-size digits (`digits` so far).
    Size { size: u64, digits: u8 },
    /// After the digits: whitespace or extensions, up to CR.
    Extension { size: u64, len: usize },
    /// Expecting the LF of the size line.
    SizeLf { size: u64 },
    /// In a chunk's data, this many bytes left.
    Data(u64),
    /// Expecting the CR after a chunk's data.
    DataCr,
    /// Expecting the LF after a chunk's data.
    DataLf,
    /// In the trailer section.
    Trailer { line: usize, total: usize },
    /// Expecting the LF of a trailer line.
    TrailerLf { line: usize, total: usize },
}

impl Chunk {
    /// Where a chunked body starts: before the first chunk size.
    pub const START: Chunk = Chunk::Size { size: 0, digits: 0 };
}

/// An answer's head.
#[derive(Debug)]
pub struct Head {
    /// The status.
    pub status: StatusCode,
    /// HTTP/1.0 or HTTP/1.1.
    pub version: Version,
    /// The headers, values sharing the read buffer, less the ones that
    /// only framed this answer on this connection (see `Framing::observe`).
    pub headers: HeaderMap,
    /// How the body is framed.
    pub decoder: Decoder,
    /// Whether the connection may serve another request after this answer.
    pub keep_alive: bool,
}

/// What the buffer held.
enum Parsed {
    Final(Head),
    /// A 1xx answer, now consumed.
    Interim,
    /// Not yet a whole head.
    Partial,
}

fn noop_waker() -> &'static Waker {
    struct Noop;
    impl Wake for Noop {
        fn wake(self: Arc<Self>) {}
    }
    static WAKER: OnceLock<Waker> = OnceLock::new();
    WAKER.get_or_init(|| Waker::from(Arc::new(Noop)))
}

impl Conn {
    /// A connection over `io`.
    pub fn new(io: Io) -> Conn {
        Conn {
            io,
            buf: BytesMut::new(),
            out: Vec::new(),
            spans: Vec::new(),
            received: false,
            timer: None,
        }
    }

    /// Takes the connection's timer out for an exchange due by `deadline`
    /// (made on first use); [`Conn::put_timer`] gives it back.
    pub fn take_timer(&mut self, deadline: Instant) -> Pin<Box<Sleep>> {
        self.timer
            .take()
            .unwrap_or_else(|| Box::pin(tokio::time::sleep_until(deadline)))
    }

    /// Gives back the timer [`Conn::take_timer`] took.
    pub fn put_timer(&mut self, timer: Pin<Box<Sleep>>) {
        self.timer = Some(timer);
    }

    /// Whether an idle connection can take a request: nothing is waiting
    /// to be read on it, not even the end of the stream. This costs no
    /// system call unless the runtime saw the socket become readable.
    pub fn is_usable(&self) -> bool {
        if !self.buf.is_empty() {
            return false;
        }
        let mut cx = Context::from_waker(noop_waker());
        let mut byte = [0u8; 1];
        let mut probe = ReadBuf::new(&mut byte);
        // Ready means bytes, the end, or an error: all unusable.
        self.io.tcp().poll_peek(&mut cx, &mut probe).is_pending()
    }

    /// Whether any byte of the answer to the last request arrived.
    pub fn received(&self) -> bool {
        self.received
    }

    /// Whether the connection may take the next request once an answer
    /// has ended: framed, kept alive, nothing after it.
    pub fn reusable_after(&self, head_keep_alive: bool) -> bool {
        head_keep_alive && self.buf.is_empty()
    }

    /// Writes a request: `headers` as given, `host`, and the body framed by
    /// `Content-Length` (left out for an empty GET, HEAD or CONNECT).
    pub async fn write_request(
        &mut self,
        method: &Method,
        path: &str,
        host: &HeaderValue,
        headers: impl Iterator<Item = (&HeaderName, &HeaderValue)>,
        body: &Bytes,
    ) -> io::Result<()> {
        self.received = false;
        let out = &mut self.out;
        out.clear();
        out.extend_from_slice(method.as_str().as_bytes());
        out.push(b' ');
        out.extend_from_slice(path.as_bytes());
        out.extend_from_slice(b" HTTP/1.1\r\nhost: ");
        out.extend_from_slice(host.as_bytes());
        out.extend_from_slice(b"\r\n");
        for (name, value) in headers {
            out.extend_from_slice(name.as_str().as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(value.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        let bodiless = body.is_empty()
            && (method == Method::GET || method == Method::HEAD || method == Method::CONNECT);
        if !bodiless {
            out.extend_from_slice(b"content-length: ");
            push_number(out, body.len() as u64, 10);
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"\r\n");
        if body.len() <= INLINE_BODY {
            out.extend_from_slice(body);
            self.io.write_all(&self.out).await?;
        } else {
            self.io.write_all(&self.out).await?;
            self.io.write_all(body).await?;
        }
        if self.out.capacity() > KEEP_OUT {
            // An idle connection does not keep a large request's room.
            self.out = Vec::new();
        }
        self.io.flush().await
    }

    /// Reads the answer's head (skipping 1xx interim answers) for a
    /// request of `method`.
    pub async fn read_head(&mut self, method: &Method) -> Result<Head, H1Error> {
        loop {
            if !self.buf.is_empty() {
                match parse_head(&mut self.buf, &mut self.spans, method)? {
                    Parsed::Final(head) => return Ok(head),
                    // Another head may already be in the buffer.
                    Parsed::Interim => continue,
                    Parsed::Partial => {}
                }
                if self.buf.len() > MAX_HEAD_BYTES {
                    return Err(H1Error::malformed(format!(
                        "head longer than {MAX_HEAD_BYTES} bytes"
                    )));
                }
            }
            make_room(&mut self.buf);
            if self.io.read_buf(&mut self.buf).await? == 0 {
                return Err(H1Error::Closed(if self.received {
                    "in the middle of the answer's head"
                } else {
                    "without answering"
                }));
            }
            self.received = true;
        }
    }

    /// Takes a body that is already whole in the buffer, if it is.
    pub fn take_whole(&mut self, decoder: &mut Decoder) -> Option<Bytes> {
        match *decoder {
            Decoder::Length(n) if (self.buf.len() as u64) >= n => {
                *decoder = Decoder::Done;
                Some(self.buf.split_to(n as usize).freeze())
            }
            Decoder::Done => Some(Bytes::new()),
            _ => None,
        }
    }

    /// The next piece of the body: `None` at its end.
    pub fn poll_data(
        &mut self,
        decoder: &mut Decoder,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Option<Bytes>, H1Error>> {
        loop {
            match decode(decoder, &mut self.buf)? {
                Decoded::Data(data) => return Poll::Ready(Ok(Some(data))),
                Decoded::End => return Poll::Ready(Ok(None)),
                Decoded::More => {}
            }
            make_room(&mut self.buf);
            let read = {
                let fill = std::pin::pin!(self.io.read_buf(&mut self.buf));
                fill.poll(cx)
            };
            match read {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e.into())),
                Poll::Ready(Ok(0)) => {
                    if *decoder == Decoder::Eof {
                        *decoder = Decoder::Done;
                        return Poll::Ready(Ok(None));
                    }
                    return Poll::Ready(Err(H1Error::Closed("in the middle of the body")));
                }
                Poll::Ready(Ok(_)) => {}
            }
        }
    }
}

/// Completes once `deadline` has passed, with a timer that may be set for
/// an earlier deadline (of an earlier request on the same connection): it
/// is moved forward only when it fires early. A timer moved on every
/// request costs a trip through the runtime's timer wheel each time; this
/// one moves at most once per timeout period. (A timer set later than
/// `deadline`, after a reload shortened the timeout, is moved back.)
pub async fn deadline_passed(timer: &mut Pin<Box<Sleep>>, deadline: Instant) {
    if timer.deadline() > deadline {
        timer.as_mut().reset(deadline);
    }
    loop {
        timer.as_mut().await;
        if timer.deadline() >= deadline {
            return;
        }
        timer.as_mut().reset(deadline);
    }
}

/// Appends `n` in base `radix` (10 or 16, lower case): the formatting
/// machinery of `write!` costs several times more, on every message.
pub(super) fn push_number(out: &mut Vec<u8>, mut n: u64, radix: u64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b"0123456789abcdef"[(n % radix) as usize];
        n /= radix;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[at..]);
}

/// Parses a complete head out of the buffer, if there is one; interim
/// (1xx) answers are consumed and skipped.
/// `spans` is scratch room, kept by the caller to reuse its allocation.
fn parse_head(
    buf: &mut BytesMut,
    spans: &mut Vec<[u32; 4]>,
    method: &Method,
) -> Result<Parsed, H1Error> {
    // Left uninitialised: zeroing room for MAX_HEADERS on every answer
    // would cost more than the parse.
    let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut parsed = httparse::Response::new(&mut []);
    let len = match httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut parsed,
        &*buf,
        &mut slots,
    ) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(Parsed::Partial),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(H1Error::malformed(format!(
                "more than {MAX_HEADERS} headers"
            )))
        }
        Err(e) => return Err(H1Error::malformed(e.to_string())),
    };
    let code = parsed.code.unwrap_or(0);
    let status =
        StatusCode::from_u16(code).map_err(|_| H1Error::malformed(format!("status {code}")))?;
    let version = if parsed.version == Some(0) {
        Version::HTTP_10
    } else {
        Version::HTTP_11
    };
    spans.clear();
    header_spans(buf, parsed.headers, spans);
    let head = buf.split_to(len).freeze();
    if status.is_informational() {
        if status == StatusCode::SWITCHING_PROTOCOLS {
            return Err(H1Error::malformed("101 Switching Protocols unasked"));
        }
        return Ok(Parsed::Interim);
    }
    let mut framing = Framing::default();
    let headers = header_map(&head, spans, &mut framing, |_, _| false).map_err(|e| match e {
        HeaderError::Name => H1Error::malformed("invalid header name"),
        HeaderError::Value => H1Error::malformed("invalid header value"),
        HeaderError::Framing(what) => H1Error::malformed(what),
    })?;
    let (decoder, keep_alive) = framing.decide(method, status, version);
    Ok(Parsed::Final(Head {
        status,
        version,
        headers,
        decoder,
        keep_alive,
    }))
}

/// An answer taken apart by [`take_apart`].
#[derive(Debug)]
pub struct Answer {
    /// The final head.
    pub head: Head,
    /// The body bytes its framing gave.
    pub body: Vec<u8>,
    /// Whether the body ended (never, for one that runs to the close).
    pub ended: bool,
}

/// Takes apart everything an upstream sent for one request of `method`, as
/// a connection would: the head (interim answers skipped), then the body,
/// its bytes handed to the decoder in pieces that end at each of `cuts`.
/// `None` when the head is incomplete. For fuzzing: no input may panic,
/// and where the pieces end may change nothing.
pub fn take_apart(
    method: &Method,
    bytes: &[u8],
    cuts: &[usize],
) -> Result<Option<Answer>, H1Error> {
    let mut buf = BytesMut::from(bytes);
    let mut spans = Vec::new();
    let head = loop {
        match parse_head(&mut buf, &mut spans, method)? {
            Parsed::Final(head) => break head,
            Parsed::Interim => continue,
            Parsed::Partial => return Ok(None),
        }
    };
    let rest = buf.split();
    let mut decoder = head.decoder;
    let (body, ended) = feed(&mut decoder, &rest, cuts)?;
    Ok(Some(Answer { head, body, ended }))
}

/// Hands `rest` to `decoder` in pieces that end at each of `cuts`, as reads
/// would: the body bytes it gave, and whether the body ended. For fuzzing.
pub(super) fn feed(
    decoder: &mut Decoder,
    rest: &[u8],
    cuts: &[usize],
) -> Result<(Vec<u8>, bool), H1Error> {
    let mut fed = BytesMut::new();
    let mut body = Vec::new();
    let mut start = 0;
    for end in cuts.iter().copied().chain([rest.len()]) {
        let end = end.clamp(start, rest.len());
        fed.extend_from_slice(&rest[start..end]);
        start = end;
        loop {
            match decode(decoder, &mut fed)? {
                Decoded::Data(data) => body.extend_from_slice(&data),
                Decoded::End => return Ok((body, true)),
                Decoded::More => break,
            }
        }
    }
    Ok((body, false))
}

/// Keeps room in a read buffer for the next read.
pub(super) fn make_room(buf: &mut BytesMut) {
    if buf.capacity() - buf.len() < 1024 {
        buf.reserve(READ_CHUNK);
    }
}

/// Where `part`, a slice of `buf`, sits in it. (A head is at most 64 KiB
/// plus one read, so offsets fit in u32.)
pub(super) fn span(buf: &[u8], part: &[u8]) -> [u32; 2] {
    let start = part.as_ptr() as usize - buf.as_ptr() as usize;
    [start as u32, (start + part.len()) as u32]
}

/// Appends where each header's name and value sit in `buf`, so that the
/// values can be slices of it once it is frozen.
pub(super) fn header_spans(
    buf: &[u8],
    headers: &[httparse::Header<'_>],
    spans: &mut Vec<[u32; 4]>,
) {
    for h in headers {
        let [n0, n1] = span(buf, h.name.as_bytes());
        let [v0, v1] = span(buf, h.value);
        spans.push([n0, n1, v0, v1]);
    }
}

/// Why a head's headers could not be taken.
#[derive(Debug)]
pub(super) enum HeaderError {
    Name,
    Value,
    /// What `Framing::observe` refused, in fixed words.
    Framing(&'static str),
}

/// The header map of a frozen `head` whose headers sit at `spans`. Each
/// header goes first to `take` (true: taken, left out of the map), then
/// to `framing` (which leaves out those it consumes); values are slices of
/// `head`, not copies.
pub(super) fn header_map(
    head: &Bytes,
    spans: &[[u32; 4]],
    framing: &mut Framing,
    mut take: impl FnMut(&HeaderName, &[u8]) -> bool,
) -> Result<HeaderMap, HeaderError> {
    let mut headers = HeaderMap::with_capacity(spans.len());
    for &[n0, n1, v0, v1] in spans {
        let (n0, n1, v0, v1) = (n0 as usize, n1 as usize, v0 as usize, v1 as usize);
        let name = HeaderName::from_bytes(&head[n0..n1]).map_err(|_| HeaderError::Name)?;
        let value = &head[v0..v1];
        if take(&name, value)
            || framing
                .observe(&name, value)
                .map_err(HeaderError::Framing)?
        {
            continue;
        }
        let value =
            HeaderValue::from_maybe_shared(head.slice(v0..v1)).map_err(|_| HeaderError::Value)?;
        headers.append(name, value);
    }
    Ok(headers)
}

/// What an answer's headers say about its framing and its connection,
/// gathered while the headers are read (no lookups afterwards).
#[derive(Debug, Default)]
pub(super) struct Framing {
    /// `Transfer-Encoding` was present; `chunked` whether its last coding is.
    transfer_encoding: bool,
    chunked: bool,
    /// `Content-Length`, all values agreeing.
    length: Option<u64>,
    /// `Connection: close` and `Connection: keep-alive`.
    close: bool,
    keep_alive: bool,
}

impl Framing {
    /// Takes note of one header. True when the header only describes
    /// this connection and is consumed here: `Transfer-Encoding`,
    /// `Keep-Alive`, and a `Connection` naming nothing but `close` or
    /// `keep-alive` (one naming other headers is kept for the proxy's
    /// header rules, which remove those too).
    pub(super) fn observe(
        &mut self,
        name: &HeaderName,
        value: &[u8],
    ) -> Result<bool, &'static str> {
        let tokens = || {
            value
                .split(|&b| b == b',')
                .map(<[u8]>::trim_ascii)
                .filter(|t| !t.is_empty())
        };
        if name == header::CONTENT_LENGTH {
            for part in value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
                let n = std::str::from_utf8(part)
                    .ok()
                    .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
                    .and_then(|s| s.parse::<u64>().ok())
                    .ok_or("invalid content-length")?;
                if self.length.is_some_and(|l| l != n) {
                    return Err("conflicting content-length values");
                }
                self.length = Some(n);
            }
        } else if name == header::TRANSFER_ENCODING {
            self.transfer_encoding = true;
            if let Some(last) = tokens().next_back() {
                self.chunked = last.eq_ignore_ascii_case(b"chunked");
            }
            return Ok(true);
        } else if name == header::CONNECTION {
            let mut only_ours = true;
            for t in tokens() {
                let close = t.eq_ignore_ascii_case(b"close");
                let keep_alive = t.eq_ignore_ascii_case(b"keep-alive");
                self.close |= close;
                self.keep_alive |= keep_alive;
                only_ours &= close || keep_alive;
            }
            return Ok(only_ours);
        } else if name.as_str() == "keep-alive" {
            return Ok(true);
        }
        Ok(false)
    }

    /// How a client's request body ends (RFC 9112 §6.3), and whether the
    /// connection may carry another request after it. A request without
    /// `Content-Length` or `Transfer-Encoding` has no body; a
    /// `Transfer-Encoding` that does not end in chunked cannot be framed.
    pub(super) fn decide_request(&self, version: Version) -> Result<(Decoder, bool), &'static str> {
        let alive = if version == Version::HTTP_10 {
            self.keep_alive
        } else {
            !self.close
        };
        if self.transfer_encoding {
            if !self.chunked {
                return Err("a Transfer-Encoding that does not end in chunked");
            }
            // Both framings at once is how requests are smuggled: the
            // chunks win, and the connection closes after the answer. So it
            // does after chunks from an HTTP/1.0 client, which has none
            // (RFC 9112 §6.1).
            let sound = self.length.is_none() && version != Version::HTTP_10;
            return Ok((Decoder::Chunked(Chunk::START), alive && sound));
        }
        match self.length {
            None | Some(0) => Ok((Decoder::Done, alive)),
            Some(n) => Ok((Decoder::Length(n), alive)),
        }
    }

    /// How the body ends (RFC 9112 §6.3), and whether the connection may
    /// serve another request after it.
    fn decide(&self, method: &Method, status: StatusCode, version: Version) -> (Decoder, bool) {
        let alive = if version == Version::HTTP_10 {
            self.keep_alive
        } else {
            !self.close
        };
        if method == Method::HEAD
            || status == StatusCode::NO_CONTENT
            || status == StatusCode::NOT_MODIFIED
        {
            return (Decoder::Done, alive);
        }
        if self.transfer_encoding {
            if self.chunked {
                // With a Content-Length as well the message is suspect
                // (RFC 9112 §6.3): the chunks win, and the connection closes.
                let alone = self.length.is_none();
                return (Decoder::Chunked(Chunk::START), alive && alone);
            }
            return (Decoder::Eof, false);
        }
        match self.length {
            Some(0) => (Decoder::Done, alive),
            Some(n) => (Decoder::Length(n), alive),
            None => (Decoder::Eof, false),
        }
    }
}

/// What one step of decoding gave.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Decoded {
    Data(Bytes),
    End,
    /// The buffer holds no more of the body.
    More,
}

fn take(buf: &mut BytesMut, left: &mut u64) -> Bytes {
    let n = (*left).min(buf.len() as u64) as usize;
    *left -= n as u64;
    buf.split_to(n).freeze()
}

/// Decodes what the buffer holds of the body.
pub(super) fn decode(decoder: &mut Decoder, buf: &mut BytesMut) -> Result<Decoded, H1Error> {
    loop {
        match decoder {
            Decoder::Done => return Ok(Decoded::End),
            Decoder::Eof => {
                if buf.is_empty() {
                    return Ok(Decoded::More);
                }
                return Ok(Decoded::Data(buf.split().freeze()));
            }
            Decoder::Length(left) => {
                if buf.is_empty() {
                    return Ok(Decoded::More);
                }
                let data = take(buf, left);
                if *left == 0 {
                    *decoder = Decoder::Done;
                }
                return Ok(Decoded::Data(data));
            }
            Decoder::Chunked(Chunk::Data(left)) => {
                if buf.is_empty() {
                    return Ok(Decoded::More);
                }
                let data = take(buf, left);
                if *left == 0 {
                    *decoder = Decoder::Chunked(Chunk::DataCr);
                }
                return Ok(Decoded::Data(data));
            }
            Decoder::Chunked(state) => {
                let Some(&byte) = buf.first() else {
                    return Ok(Decoded::More);
                };
                let _ = buf.split_to(1);
                *decoder = chunk_step(*state, byte)?;
            }
        }
    }
}

/// One byte of a chunked body outside chunk data.
fn chunk_step(state: Chunk, byte: u8) -> Result<Decoder, H1Error> {
    let bad = |what: &str| Err(H1Error::malformed(format!("chunked body: {what}")));
    let next = match state {
        Chunk::Size { size, digits } => match (byte as char).to_digit(16) {
            Some(d) if digits < 16 => Chunk::Size {
                size: size * 16 + u64::from(d),
                digits: digits + 1,
            },
            Some(_) => return bad("chunk size too large"),
            None if digits == 0 => return bad("missing chunk size"),
            None if byte == b'\r' => Chunk::SizeLf { size },
            None if matches!(byte, b';' | b' ' | b'\t') => Chunk::Extension { size, len: 1 },
            None => return bad("invalid chunk size"),
        },
        Chunk::Extension { size, len } => match byte {
            b'\r' => Chunk::SizeLf { size },
            b'\n' => return bad("bare LF in chunk extension"),
            _ if len >= MAX_CHUNK_LINE => return bad("chunk extension too long"),
            _ => Chunk::Extension { size, len: len + 1 },
        },
        Chunk::SizeLf { size } => match byte {
            b'\n' if size == 0 => Chunk::Trailer { line: 0, total: 0 },
            b'\n' => Chunk::Data(size),
            _ => return bad("expected LF after chunk size"),
        },
        Chunk::Data(_) => unreachable!("chunk data is taken in bulk"),
        Chunk::DataCr => match byte {
            b'\r' => Chunk::DataLf,
            _ => return bad("expected CRLF after chunk data"),
        },
        Chunk::DataLf => match byte {
            b'\n' => Chunk::START,
            _ => return bad("expected CRLF after chunk data"),
        },
        Chunk::Trailer { line, total } => match byte {
            b'\r' => Chunk::TrailerLf { line, total },
            _ if total >= MAX_TRAILERS => return bad("trailers too long"),
            _ => Chunk::Trailer {
                line: line + 1,
                total: total + 1,
            },
        },
        Chunk::TrailerLf { line, total } => match byte {
            b'\n' if line == 0 => return Ok(Decoder::Done),
            b'\n' => Chunk::Trailer { line: 0, total },
            _ => return bad("expected LF in trailers"),
        },
    };
    Ok(Decoder::Chunked(next))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_kept_timer_ends_each_wait_at_its_own_deadline() {
        let start = Instant::now();
        let at = |n| start + std::time::Duration::from_secs(n);
        let mut timer = Box::pin(tokio::time::sleep_until(at(10)));
        // A wait cut short (the answer came first) at `until`.
        async fn cut(timer: &mut Pin<Box<Sleep>>, deadline: Instant, until: Instant) {
            let wait = deadline_passed(timer, deadline);
            assert!(tokio::time::timeout_at(until, wait).await.is_err());
        }
        deadline_passed(&mut timer, at(10)).await;
        assert_eq!(Instant::now(), at(10));
        // The timer fired for the last wait: this one still lasts to its own.
        deadline_passed(&mut timer, at(25)).await;
        assert_eq!(Instant::now(), at(25));
        // A wait cut short leaves the timer at 100; a shorter timeout
        // (after a reload) still ends the next wait at its deadline.
        cut(&mut timer, at(100), at(30)).await;
        deadline_passed(&mut timer, at(40)).await;
        assert_eq!(Instant::now(), at(40));
        // Several waits cut short, the timer left at 50: the next wait does
        // not end when it fires, but at its own deadline.
        cut(&mut timer, at(50), at(45)).await;
        cut(&mut timer, at(60), at(48)).await;
        deadline_passed(&mut timer, at(70)).await;
        assert_eq!(Instant::now(), at(70));
    }

    #[test]
    fn numbers_are_written_in_their_base() {
        for (n, radix, text) in [
            (0, 10, "0"),
            (7, 10, "7"),
            (1234567890, 10, "1234567890"),
            (u64::MAX, 10, "18446744073709551615"),
            (0, 16, "0"),
            (255, 16, "ff"),
            (0x10000, 16, "10000"),
            (u64::MAX, 16, "ffffffffffffffff"),
        ] {
            let mut out = b"x".to_vec();
            push_number(&mut out, n, radix);
            assert_eq!(out, format!("x{text}").into_bytes());
        }
    }

    fn chunked() -> Decoder {
        Decoder::Chunked(Chunk::START)
    }

    /// Decodes `input` fed `step` bytes at a time; the body and whether it
    /// ended.
    fn feed(mut decoder: Decoder, input: &[u8], step: usize) -> Result<(Vec<u8>, bool), H1Error> {
        let mut buf = BytesMut::new();
        let mut body = Vec::new();
        for piece in input.chunks(step) {
            buf.extend_from_slice(piece);
            loop {
                match decode(&mut decoder, &mut buf)? {
                    Decoded::Data(d) => body.extend_from_slice(&d),
                    Decoded::End => return Ok((body, buf.is_empty())),
                    Decoded::More => break,
                }
            }
        }
        Ok((body, false))
    }

    #[test]
    fn chunked_bodies_decode_whatever_the_pieces() {
        let input = b"5\r\nhello\r\n7;name=\"v\"\r\n, world\r\nA \r\n0123456789\r\n0\r\nx-trailer: 1\r\n\r\n";
        for step in [1, 2, 3, 7, input.len()] {
            let (body, whole) = feed(chunked(), input, step).unwrap();
            assert_eq!(body, b"hello, world0123456789", "step {step}");
            assert!(whole, "step {step}");
        }
        let (body, whole) = feed(chunked(), b"0\r\n\r\n", 1).unwrap();
        assert!(body.is_empty() && whole);
        // Upper-case hex and a size with leading zeros.
        let (body, _) = feed(chunked(), b"0000B\r\nhello world\r\n0\r\n\r\n", 4).unwrap();
        assert_eq!(body, b"hello world");
    }

    #[test]
    fn broken_chunked_bodies_are_errors() {
        for input in [
            &b"x\r\n"[..],
            b"\r\n",
            b"5\nhello",
            b"5\r\nhelloX\r\n",
            b"11111111111111111\r\n",
            b"5;ext\nhello",
            b"0\r\nx-trailer: 1\rX",
        ] {
            let err = feed(chunked(), input, 1).unwrap_err();
            assert!(
                matches!(err, H1Error::Malformed(_)),
                "{:?}",
                String::from_utf8_lossy(input)
            );
        }
        let long = format!("1;{}\r\n", "e".repeat(MAX_CHUNK_LINE + 1));
        assert!(feed(chunked(), long.as_bytes(), 1000).is_err());
    }

    #[test]
    fn where_the_pieces_end_changes_nothing() {
        let answer =
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n\
                       4;x=y\r\nwiki\r\n5\r\npedia\r\n0\r\nx-t: 1\r\n\r\nNEXT";
        let whole = take_apart(&Method::GET, answer, &[]).unwrap().unwrap();
        assert_eq!(whole.head.status, StatusCode::OK);
        assert_eq!(whole.body, b"wikipedia");
        assert!(whole.ended);
        for cut in 0..answer.len() {
            for second in [cut + 1, cut + 7] {
                let split = take_apart(&Method::GET, answer, &[cut, second])
                    .unwrap()
                    .unwrap();
                assert_eq!(
                    (split.body.as_slice(), split.ended),
                    (&b"wikipedia"[..], true),
                    "{cut}"
                );
            }
        }
        assert!(take_apart(&Method::GET, b"HTTP/1.1 200 OK\r\n", &[])
            .unwrap()
            .is_none());
        let cut_short = take_apart(
            &Method::GET,
            b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\nabc",
            &[1],
        );
        let cut_short = cut_short.unwrap().unwrap();
        assert_eq!(
            (cut_short.body.as_slice(), cut_short.ended),
            (&b"abc"[..], false)
        );
    }

    #[test]
    fn length_bodies_stop_at_their_length() {
        let mut buf = BytesMut::from(&b"hello, world"[..]);
        let mut decoder = Decoder::Length(5);
        assert_eq!(
            decode(&mut decoder, &mut buf).unwrap(),
            Decoded::Data(Bytes::from_static(b"hello"))
        );
        assert_eq!(decoder, Decoder::Done);
        assert_eq!(decode(&mut decoder, &mut buf).unwrap(), Decoded::End);
        assert_eq!(&buf[..], b", world", "what follows is left alone");
    }

    /// What the answer's framing comes to, its headers observed as
    /// `parse_head` does.
    fn decide(
        method: &Method,
        status: StatusCode,
        version: Version,
        pairs: &[(&str, &str)],
    ) -> Result<(Decoder, bool), H1Error> {
        let mut framing = Framing::default();
        for (k, v) in pairs {
            framing
                .observe(&HeaderName::from_bytes(k.as_bytes()).unwrap(), v.as_bytes())
                .map_err(H1Error::malformed)?;
        }
        Ok(framing.decide(method, status, version))
    }

    #[test]
    fn framing_follows_rfc_9112() {
        let ok = StatusCode::OK;
        let get = Method::GET;
        let chunked_start = chunked();
        type Case<'a> = (
            &'a Method,
            StatusCode,
            &'a [(&'a str, &'a str)],
            Decoder,
            bool,
        );
        let cases: &[Case] = &[
            (
                &Method::HEAD,
                ok,
                &[("content-length", "10")],
                Decoder::Done,
                true,
            ),
            (&get, StatusCode::NO_CONTENT, &[], Decoder::Done, true),
            (
                &get,
                StatusCode::NOT_MODIFIED,
                &[("content-length", "10")],
                Decoder::Done,
                true,
            ),
            (
                &get,
                ok,
                &[("content-length", "10")],
                Decoder::Length(10),
                true,
            ),
            (
                &get,
                ok,
                &[("content-length", "10, 10")],
                Decoder::Length(10),
                true,
            ),
            (
                &get,
                ok,
                &[("content-length", "10"), ("content-length", "10")],
                Decoder::Length(10),
                true,
            ),
            (&get, ok, &[("content-length", "0")], Decoder::Done, true),
            (
                &get,
                ok,
                &[("transfer-encoding", "chunked")],
                chunked_start,
                true,
            ),
            (
                &get,
                ok,
                &[("transfer-encoding", "gzip, Chunked")],
                chunked_start,
                true,
            ),
            (
                &get,
                ok,
                &[
                    ("transfer-encoding", "gzip"),
                    ("transfer-encoding", "chunked"),
                ],
                chunked_start,
                true,
            ),
            (
                &get,
                ok,
                &[("transfer-encoding", "chunked"), ("content-length", "3")],
                chunked_start,
                false,
            ),
            (
                &get,
                ok,
                &[("transfer-encoding", "chunked, gzip")],
                Decoder::Eof,
                false,
            ),
            (&get, ok, &[], Decoder::Eof, false),
            (
                &get,
                ok,
                &[("content-length", "2"), ("connection", "x-hop, Close")],
                Decoder::Length(2),
                false,
            ),
            (
                &get,
                StatusCode::NO_CONTENT,
                &[("connection", "close")],
                Decoder::Done,
                false,
            ),
        ];
        for (method, status, pairs, decoder, reusable) in cases {
            let got = decide(method, *status, Version::HTTP_11, pairs).unwrap();
            assert_eq!(got, (*decoder, *reusable), "{method} {status} {pairs:?}");
        }
        for bad in [
            "abc",
            "-1",
            "1, 2",
            "",
            "1,",
            "+5",
            "99999999999999999999999",
        ] {
            let got = decide(&get, ok, Version::HTTP_11, &[("content-length", bad)]);
            assert!(got.is_err(), "{bad:?}");
        }
        let got = decide(
            &get,
            ok,
            Version::HTTP_11,
            &[("content-length", "1"), ("content-length", "2")],
        );
        assert!(got.is_err(), "two lengths that disagree");
    }

    #[test]
    fn http_1_0_keeps_the_connection_only_when_asked() {
        let length = [("content-length", "2")];
        let asked = [("content-length", "2"), ("connection", "Keep-Alive")];
        let ok = StatusCode::OK;
        assert!(
            !decide(&Method::GET, ok, Version::HTTP_10, &length)
                .unwrap()
                .1
        );
        assert!(
            decide(&Method::GET, ok, Version::HTTP_10, &asked)
                .unwrap()
                .1
        );
    }

    /// A connection pair over loopback: ours, and the upstream's end.
    async fn pair() -> (Conn, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (ours, theirs) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (Conn::new(Io::Plain(ours.unwrap())), theirs.unwrap().0)
    }

    #[tokio::test]
    async fn heads_parse_past_interim_answers_and_values_are_kept() {
        let (mut conn, mut up) = pair().await;
        up.write_all(
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\n\
              HTTP/1.1 201 Created\r\nX-Thing: a b\r\nx-thing: c\r\ncontent-length: 2\r\n\
              Connection: keep-alive\r\nKeep-Alive: timeout=5\r\n\r\nok",
        )
        .await
        .unwrap();
        let head = conn.read_head(&Method::POST).await.unwrap();
        assert_eq!(head.status, StatusCode::CREATED);
        assert_eq!(head.version, Version::HTTP_11);
        let things: Vec<_> = head.headers.get_all("x-thing").iter().collect();
        assert_eq!(things, ["a b", "c"]);
        assert!(
            head.headers.get("link").is_none(),
            "interim headers are dropped"
        );
        let mut decoder = head.decoder;
        assert_eq!(conn.take_whole(&mut decoder).unwrap(), "ok");
        assert!(conn.reusable_after(head.keep_alive));
    }

    #[tokio::test]
    async fn malformed_and_cut_heads_are_errors() {
        for (answer, want) in [
            (&b"SMTP ready\r\n\r\n"[..], "malformed"),
            (
                b"HTTP/1.1 200 OK\r\ncontent-length: x\r\n\r\n",
                "content-length",
            ),
            (b"HTTP/1.1 101 Switching Protocols\r\n\r\n", "101"),
            (b"HTTP/1.1 200 OK\r\ncontent-le", "in the middle"),
            (b"", "without answering"),
        ] {
            let (mut conn, mut up) = pair().await;
            up.write_all(answer).await.unwrap();
            drop(up);
            let err = conn.read_head(&Method::GET).await.unwrap_err().to_string();
            assert!(
                err.contains(want),
                "{err} for {:?}",
                String::from_utf8_lossy(answer)
            );
        }
        let (mut conn, mut up) = pair().await;
        let mut huge = b"HTTP/1.1 200 OK\r\nx-pad: ".to_vec();
        huge.resize(MAX_HEAD_BYTES + 100, b'a');
        // Written alongside the read: more than a socket buffer may hold.
        tokio::spawn(async move { up.write_all(&huge).await });
        let err = conn.read_head(&Method::GET).await.unwrap_err().to_string();
        assert!(err.contains("longer than"), "{err}");
    }

    #[tokio::test]
    async fn requests_are_written_with_host_and_length() {
        let (mut conn, mut up) = pair().await;
        let mut h = HeaderMap::new();
        h.insert("content-type", HeaderValue::from_static("application/json"));
        let host = HeaderValue::from_static("api.example:8080");
        let body = Bytes::from_static(b"{\"q\":1}");
        conn.write_request(&Method::POST, "/v1/x?y=1", &host, h.iter(), &body)
            .await
            .unwrap();
        conn.write_request(&Method::GET, "/", &host, h.iter(), &Bytes::new())
            .await
            .unwrap();
        drop(conn);
        let mut seen = String::new();
        up.read_to_string(&mut seen).await.unwrap();
        assert_eq!(
            seen,
            "POST /v1/x?y=1 HTTP/1.1\r\nhost: api.example:8080\r\ncontent-type: application/json\r\n\
             content-length: 7\r\n\r\n{\"q\":1}\
             GET / HTTP/1.1\r\nhost: api.example:8080\r\ncontent-type: application/json\r\n\r\n"
        );
    }

    #[tokio::test]
    async fn a_large_request_leaves_no_large_buffer_behind() {
        let (mut conn, mut up) = pair().await;
        let drain = tokio::spawn(async move {
            let mut sink = Vec::new();
            up.read_to_end(&mut sink).await.map(|_| sink.len())
        });
        let host = HeaderValue::from_static("up");
        let mut h = HeaderMap::new();
        h.insert(
            "x-big",
            HeaderValue::from_str(&"v".repeat(40 * 1024)).unwrap(),
        );
        let body = Bytes::from(vec![b'b'; INLINE_BODY]);
        conn.write_request(&Method::POST, "/", &host, h.iter(), &body)
            .await
            .unwrap();
        assert_eq!(conn.out.capacity(), 0, "the room was given back");
        let small = HeaderMap::new();
        conn.write_request(
            &Method::POST,
            "/",
            &host,
            small.iter(),
            &Bytes::from_static(b"{}"),
        )
        .await
        .unwrap();
        assert!(conn.out.capacity() > 0 && conn.out.capacity() <= KEEP_OUT);
        drop(conn);
        assert!(drain.await.unwrap().unwrap() > 40 * 1024 + INLINE_BODY);
    }

    #[tokio::test]
    async fn an_idle_connection_the_upstream_closed_is_not_usable() {
        let (conn, up) = pair().await;
        assert!(conn.is_usable());
        drop(up);
        // Wait until the runtime has seen the close, as it will have for
        // any connection that sat idle while the upstream closed it.
        conn.io.tcp().readable().await.unwrap();
        assert!(!conn.is_usable());

        let (conn, mut up) = pair().await;
        up.write_all(b"HTTP/1.1 408 Request Timeout\r\n\r\n")
            .await
            .unwrap();
        conn.io.tcp().readable().await.unwrap();
        assert!(!conn.is_usable(), "bytes nobody asked for");
    }
}
