//! Bodies: the client's request body, read whole so that it can be sent
//! again on another token; and the answer the proxy sends, either bytes it
//! holds (its own errors, buffered upstream error answers) or the
//! upstream's body streamed frame by frame, with `[upstream] idle_timeout`
//! bounding the silence between frames. The answer carries the request's
//! `Exchange` (its access-log line and counters) until it is done, and
//! counts the bytes it sends.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use tokio::time::{Instant, Sleep};

use super::exchange::Exchange;
use super::listener::ConnState;
use crate::error::ProxyError;
use crate::upstream::{UpstreamBody, UpstreamError};

/// Reads a client's request body whole, up to `limit` bytes, within
/// `timeout`. A body declared longer than the limit is refused unread; one
/// that arrives in one piece (the usual small JSON request) is kept as it
/// came, without a copy. Memory grows with what arrives, never with what
/// is declared.
pub(super) async fn read_request(
    mut body: Incoming,
    limit: usize,
    timeout: Duration,
    conn: &ConnState,
) -> Result<Bytes, ProxyError> {
    if body.size_hint().lower() > limit as u64 {
        return Err(ProxyError::RequestTooLarge { limit });
    }
    let deadline = Instant::now() + timeout;
    let mut first: Option<Bytes> = None;
    let mut joined = BytesMut::new();
    let mut total = 0usize;
    loop {
        let frame = match tokio::time::timeout_at(deadline, body.frame()).await {
            Err(_) => return Err(ProxyError::RequestTimeout { timeout }),
            Ok(None) => break,
            Ok(Some(Err(_))) => {
                return Err(ProxyError::BadRequest {
                    detail: "the request body could not be read",
                })
            }
            Ok(Some(Ok(frame))) => frame,
        };
        let Ok(data) = frame.into_data() else {
            // Trailers: not forwarded, and on HTTP/1 the end of this
            // connection (see `ConnState::had_trailers`).
            conn.had_trailers.store(true, Ordering::Relaxed);
            continue;
        };
        total = total.saturating_add(data.len());
        if total > limit {
            return Err(ProxyError::RequestTooLarge { limit });
        }
        if first.is_none() && joined.is_empty() {
            first = Some(data);
        } else {
            if let Some(head) = first.take() {
                joined.extend_from_slice(&head);
            }
            joined.extend_from_slice(&data);
        }
    }
    conn.body_unread.store(false, Ordering::Relaxed);
    Ok(match first {
        Some(only) => only,
        None => joined.freeze(),
    })
}

/// Most of a refused request's body read away so that its connection may
/// be kept: a small body that came with its head.
const SKIP_AT_MOST: usize = 64 * 1024;

/// Reads away what of a refused request's body has already arrived, without
/// waiting for more, so that a small body that came with its head does not
/// cost the connection. A client that waits for `100 Continue` is not sent
/// one: its body is not wanted.
pub(super) fn skip_buffered(mut body: Incoming, headers: &http::HeaderMap, conn: &ConnState) {
    if body.is_end_stream() || headers.contains_key(http::header::EXPECT) {
        return;
    }
    let waker = std::task::Waker::noop();
    let mut cx = Context::from_waker(waker);
    let mut skipped = 0usize;
    while skipped <= SKIP_AT_MOST {
        match Pin::new(&mut body).poll_frame(&mut cx) {
            Poll::Ready(None) => {
                conn.body_unread.store(false, Ordering::Relaxed);
                return;
            }
            Poll::Ready(Some(Ok(frame))) => {
                skipped += frame.data_ref().map_or(0, Bytes::len);
            }
            Poll::Ready(Some(Err(_))) | Poll::Pending => return,
        }
    }
}

/// Reads up to `limit` bytes of an upstream answer's body, within `idle`
/// of silence per frame. Returns the bytes and whether the body was cut
/// at the limit.
pub(super) async fn collect_limited(
    mut body: UpstreamBody,
    limit: usize,
    idle: Duration,
) -> Result<(Bytes, bool), UpstreamError> {
    let mut out = BytesMut::new();
    loop {
        let frame = match tokio::time::timeout(idle, body.frame()).await {
            Err(_) => return Err(UpstreamError::Silent(idle)),
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
    /// Whether frames went to hyper since it last saw `Pending`, so that
    /// it may hold them (and the head) unwritten.
    unflushed: bool,
    /// An upstream error held back for one turn (see `poll_frame`).
    deferred: Option<UpstreamError>,
}

#[derive(Debug)]
enum Kind {
    Full(Option<Bytes>),
    Streaming(Box<Streaming>),
}

/// An answer's body, as the proxy sends it.
#[derive(Debug)]
pub struct ProxyBody {
    kind: Kind,
    exchange: Option<Exchange>,
}

impl ProxyBody {
    /// A body of known bytes.
    pub fn full(bytes: Bytes) -> ProxyBody {
        ProxyBody {
            kind: Kind::Full((!bytes.is_empty()).then_some(bytes)),
            exchange: None,
        }
    }

    /// The upstream's body, streamed, failing after `idle` of silence.
    pub fn streaming(inner: UpstreamBody, idle: Duration) -> ProxyBody {
        let streaming = Streaming {
            inner,
            idle,
            timer: None,
            // The head itself waits in hyper's buffer until it writes.
            unflushed: true,
            deferred: None,
        };
        ProxyBody {
            kind: Kind::Streaming(Box::new(streaming)),
            exchange: None,
        }
    }

    /// Attaches the request's [`Exchange`], which ends when the body ends
    /// or is dropped.
    pub(super) fn with_exchange(mut self, exchange: Exchange) -> ProxyBody {
        self.exchange = Some(exchange);
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
    type Error = UpstreamError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, UpstreamError>>> {
        let this = self.get_mut();
        let result = match &mut this.kind {
            Kind::Full(data) => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            Kind::Streaming(s) if s.deferred.is_some() => {
                let e = s.deferred.take().expect("checked");
                Poll::Ready(Some(Err(e)))
            }
            Kind::Streaming(s) => match Pin::new(&mut s.inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    s.armed_at_frame();
                    s.unflushed = true;
                    Poll::Ready(Some(Ok(frame)))
                }
                // An error aborts the client's connection, and hyper drops
                // what it has not written yet. If it may still hold the
                // head and the last frames, answer `Pending` once (woken at
                // once) so that it writes them first: the client then sees
                // the upstream's status and what arrived, then the break.
                Poll::Ready(Some(Err(e))) if s.unflushed => {
                    s.unflushed = false;
                    s.deferred = Some(e);
                    cx.waker().wake_by_ref();
                    return Poll::Pending;
                }
                Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e))),
                Poll::Ready(None) => Poll::Ready(None),
                Poll::Pending => {
                    s.unflushed = false;
                    let idle = s.idle;
                    let timer = s
                        .timer
                        .get_or_insert_with(|| Box::pin(tokio::time::sleep(idle)));
                    match timer.as_mut().poll(cx) {
                        Poll::Ready(()) => Poll::Ready(Some(Err(UpstreamError::Silent(idle)))),
                        Poll::Pending => Poll::Pending,
                    }
                }
            },
        };
        match &result {
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(exchange), Some(data)) = (this.exchange.as_mut(), frame.data_ref()) {
                    exchange.sent(data.len());
                }
            }
            // The request is over: end it now rather than when hyper gets
            // round to dropping the body.
            Poll::Ready(None) | Poll::Ready(Some(Err(_))) => this.exchange = None,
            Poll::Pending => {}
        }
        result
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Full(data) => data.is_none(),
            Kind::Streaming(s) => s.deferred.is_none() && s.inner.is_end_stream(),
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
