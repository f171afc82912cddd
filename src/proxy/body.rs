//! The response body the proxy sends: either bytes it holds (its own
//! errors, buffered upstream error answers) or the upstream's body
//! streamed frame by frame, with `[upstream] idle_timeout` bounding the
//! silence between frames. Both carry the guard that keeps the request
//! counted in `tokenpool_inflight_requests` until the body is done.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use prometheus::IntGauge;
use tokio::time::{Instant, Sleep};

use super::client::{ClientError, UpstreamBody};

/// Errors while streaming the upstream body to the client.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// The upstream said nothing for longer than `idle_timeout`.
    #[error("upstream stream idle for longer than {0:?}")]
    Idle(Duration),
    /// The upstream connection broke or sent a malformed body.
    #[error("upstream stream broke: {0}")]
    Upstream(#[from] ClientError),
}

/// Counts a request in `tokenpool_inflight_requests` while it lives.
#[derive(Debug)]
pub struct InflightGuard(IntGauge);

impl InflightGuard {
    /// Increments the gauge until the guard is dropped.
    pub fn new(gauge: &IntGauge) -> InflightGuard {
        gauge.inc();
        InflightGuard(gauge.clone())
    }
}

impl Drop for InflightGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// The upstream's body with an idle timer.
///
/// The timer is armed only when the body makes us wait: most answers
/// arrive whole with their headers and never need one, and a timer costs a
/// trip through the runtime's timer wheel.
#[derive(Debug)]
struct Streaming {
    /// Gives its connection back to the pool once read to its end.
    inner: UpstreamBody,
    idle: Duration,
    /// Armed at the first `Pending` after a frame; disarmed by a frame.
    timer: Option<Pin<Box<Sleep>>>,
    /// Whether frames went to the server since it last saw `Pending`, so
    /// that it may hold them (and the head) unwritten.
    unflushed: bool,
    /// An upstream error held back for one turn (see `poll_frame`).
    deferred: Option<ClientError>,
}

#[derive(Debug)]
enum Kind {
    Full(Option<Bytes>),
    Streaming(Box<Streaming>),
}

/// A response body of the proxy.
#[derive(Debug)]
pub struct ProxyBody {
    kind: Kind,
    guard: Option<InflightGuard>,
}

impl ProxyBody {
    /// A body of known bytes.
    pub fn full(bytes: Bytes) -> ProxyBody {
        ProxyBody {
            kind: Kind::Full((!bytes.is_empty()).then_some(bytes)),
            guard: None,
        }
    }

    /// The upstream's body, streamed, failing after `idle` of silence.
    pub fn streaming(inner: UpstreamBody, idle: Duration) -> ProxyBody {
        let streaming = Streaming {
            inner,
            idle,
            timer: None,
            // The head itself waits in the server's buffer until it writes.
            unflushed: true,
            deferred: None,
        };
        ProxyBody {
            kind: Kind::Streaming(Box::new(streaming)),
            guard: None,
        }
    }

    /// Attaches the in-flight guard, released when the body ends or is dropped.
    pub fn with_guard(mut self, guard: InflightGuard) -> ProxyBody {
        self.guard = Some(guard);
        self
    }
}

impl Streaming {
    /// A frame arrived: the silence it ended no longer counts. The timer is
    /// kept (to be reset, not reallocated) only if one was armed.
    fn armed_at_frame(&mut self) {
        if let Some(timer) = self.timer.as_mut() {
            timer.as_mut().reset(Instant::now() + self.idle);
        }
    }
}

impl From<Bytes> for ProxyBody {
    fn from(bytes: Bytes) -> Self {
        ProxyBody::full(bytes)
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = StreamError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, StreamError>>> {
        let this = self.get_mut();
        let result = match &mut this.kind {
            Kind::Full(data) => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            Kind::Streaming(s) if s.deferred.is_some() => {
                let e = s.deferred.take().expect("checked");
                Poll::Ready(Some(Err(StreamError::Upstream(e))))
            }
            Kind::Streaming(s) => match Pin::new(&mut s.inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    s.armed_at_frame();
                    s.unflushed = true;
                    Poll::Ready(Some(Ok(frame)))
                }
                // An error aborts the client's connection, and hyper (the
                // HTTP/2 server) drops what it has not written yet. If it
                // may still hold the head and the last frames, answer
                // `Pending` once (woken at once) so that it writes them
                // first: the client then sees the upstream's status and
                // what arrived, then the break. (The HTTP/1.x codec writes
                // what it holds on `Pending` anyway.)
                Poll::Ready(Some(Err(e))) if s.unflushed => {
                    s.unflushed = false;
                    s.deferred = Some(e);
                    cx.waker().wake_by_ref();
                    return Poll::Pending;
                }
                Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(StreamError::Upstream(e)))),
                Poll::Ready(None) => Poll::Ready(None),
                Poll::Pending => {
                    s.unflushed = false;
                    let idle = s.idle;
                    let timer = s
                        .timer
                        .get_or_insert_with(|| Box::pin(tokio::time::sleep(idle)));
                    match timer.as_mut().poll(cx) {
                        Poll::Ready(()) => Poll::Ready(Some(Err(StreamError::Idle(idle)))),
                        Poll::Pending => Poll::Pending,
                    }
                }
            },
        };
        if matches!(result, Poll::Ready(None) | Poll::Ready(Some(Err(_)))) {
            // The request is over: stop counting it now rather than when
            // hyper gets round to dropping the body.
            this.guard = None;
        }
        result
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Full(data) => data.is_none(),
            Kind::Streaming(s) => s.inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Full(Some(d)) => SizeHint::with_exact(d.len() as u64),
            Kind::Full(None) => SizeHint::with_exact(0),
            Kind::Streaming(s) => s.inner.size_hint(),
        }
    }
}

/// Reads up to `limit` bytes of a body, within `idle` of silence per
/// frame. Returns the bytes and whether the body was cut at the limit.
pub async fn collect_limited(
    mut body: UpstreamBody,
    limit: usize,
    idle: Duration,
) -> Result<(Bytes, bool), StreamError> {
    let mut out = bytes::BytesMut::new();
    loop {
        let frame = match tokio::time::timeout(idle, body.frame()).await {
            Err(_) => return Err(StreamError::Idle(idle)),
            Ok(None) => return Ok((out.freeze(), false)),
            Ok(Some(frame)) => frame?,
        };
        if let Ok(data) = frame.into_data() {
            let room = limit - out.len();
            if data.len() > room {
                out.extend_from_slice(&data[..room]);
                return Ok((out.freeze(), true));
            }
            out.extend_from_slice(&data);
        }
    }
}

/// Why a client's request body was not read.
#[derive(Debug, PartialEq, Eq)]
pub enum RequestBodyError {
    /// It is longer than the limit.
    TooLarge,
    /// The client's connection broke or sent a malformed body.
    Unreadable,
}

/// Where a client's request body comes from.
pub enum RequestBody<'a> {
    /// An HTTP/2 stream, through hyper.
    Incoming(Incoming),
    /// The rest of an HTTP/1.x request on its connection.
    H1(super::downstream::BodyReader<'a>),
}

impl RequestBody<'_> {
    /// Reads the body whole, up to `limit` bytes; a body declared longer
    /// is refused before any of it is read.
    pub async fn read(self, limit: usize) -> Result<Bytes, RequestBodyError> {
        match self {
            RequestBody::Incoming(body) => read_request_body(body, limit).await,
            RequestBody::H1(reader) => reader.read(limit).await,
        }
    }
}

/// Reads a client's request body whole, up to `limit` bytes; one whose
/// declared length is over the limit is refused unread. A body that
/// arrives in one piece (the usual small JSON request) is kept as it came,
/// without a copy.
pub async fn read_request_body(
    mut body: Incoming,
    limit: usize,
) -> Result<Bytes, RequestBodyError> {
    if body.size_hint().lower() > limit as u64 {
        return Err(RequestBodyError::TooLarge);
    }
    let mut first: Option<Bytes> = None;
    let mut joined = bytes::BytesMut::new();
    let mut total = 0usize;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|_| RequestBodyError::Unreadable)?;
        let Ok(data) = frame.into_data() else {
            continue; // trailers: not forwarded
        };
        total = total.saturating_add(data.len());
        if total > limit {
            return Err(RequestBodyError::TooLarge);
        }
        if first.is_none() && joined.is_empty() {
            first = Some(data);
        } else {
            if let Some(head) = first.take() {
                joined.reserve(total);
                joined.extend_from_slice(&head);
            }
            joined.extend_from_slice(&data);
        }
    }
    Ok(match first {
        Some(only) => only,
        None => joined.freeze(),
    })
}
