//! One client request from its head until its answer is done — an
//! *exchange* — and what is known about it for the metrics and the access
//! log: counted in `tokenpool_inflight_requests` while it lives, its
//! outcome counted once (when its answer's head is ready, or as
//! `client_error` if the client left first and hyper dropped the request),
//! and, with `[log] access`, one line on the `tokenpool::access` target when
//! it ends.
//!
//! The line carries the method, the path (never the query string), the
//! client's address, the client key's name, the status, the proxy's error
//! code and where the error came from (client, upstream, internal), the tokens
//! tried (`name/tier`, in order), the token that answered, the upstream's
//! status, the attempts, the bytes sent, the time to the answer's head and
//! in all, and the request id. Never a secret, never a body.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue, Method, Uri};
use tokio::time::Instant;

use super::listener::Activity;
use crate::config::Tier;
use crate::error::ErrorSource;
use crate::metrics::{Metrics, RequestOutcome};

/// The header that carries a request's id, from the client (if it sent a
/// sane one) or made here; it goes upstream and back to the client.
pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The longest request id taken from a client.
const MAX_REQUEST_ID: usize = 128;

/// The tokens one request tried, in order, and the last upstream status.
#[derive(Debug, Default)]
pub struct Trail {
    /// `(name, tier)` of each token tried.
    pub tried: Vec<(Arc<str>, Tier)>,
    /// The status of the last upstream answer, if any.
    pub upstream_status: Option<u16>,
}

/// What the access log line needs beyond the counts: kept only when the
/// access log is on.
#[derive(Debug)]
pub(super) struct AccessLine {
    method: Method,
    uri: Uri,
    request_id: HeaderValue,
    peer: Option<SocketAddr>,
    status: u16,
    /// The proxy's error code and where the error came from.
    error: Option<(&'static str, ErrorSource)>,
}

impl AccessLine {
    /// The line of a request of `method` for `uri` from `peer`.
    pub(super) fn new(
        method: &Method,
        uri: &Uri,
        request_id: &HeaderValue,
        peer: Option<SocketAddr>,
    ) -> AccessLine {
        AccessLine {
            method: method.clone(),
            uri: uri.clone(),
            request_id: request_id.clone(),
            peer,
            status: 0,
            error: None,
        }
    }
}

/// One client request and its answer; see the module documentation.
pub struct Exchange {
    metrics: Arc<Metrics>,
    activity: Option<Arc<Activity>>,
    started: Instant,
    /// Time to the answer's head, once it is ready.
    to_head: Option<Duration>,
    /// The name of the client's key (none: no keys, or a wrong one).
    pub client: Option<Arc<str>>,
    /// The tokens tried.
    pub trail: Trail,
    /// Bytes of the answer's body sent so far.
    bytes: u64,
    line: Option<Box<AccessLine>>,
}

impl std::fmt::Debug for Exchange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Exchange")
            .field("started", &self.started)
            .field("client", &self.client)
            .finish_non_exhaustive()
    }
}

/// The id of a request: the client's `x-request-id` if it is 1–128
/// characters of `A-Z a-z 0-9 - _ . :`, else a new random one.
pub fn request_id(headers: &HeaderMap) -> HeaderValue {
    let sane = |v: &&HeaderValue| {
        let b = v.as_bytes();
        (1..=MAX_REQUEST_ID).contains(&b.len())
            && b.iter()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.' | b':'))
    };
    if let Some(id) = headers.get(&REQUEST_ID).filter(sane) {
        return id.clone();
    }
    // 128 random bits in hex, without the formatting machinery (it cost
    // a thousand instructions a request).
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut id = [0u8; 32];
    for (half, word) in [fastrand::u64(..), fastrand::u64(..)]
        .into_iter()
        .enumerate()
    {
        for (i, byte) in id[half * 16..half * 16 + 16].iter_mut().enumerate() {
            *byte = HEX[(word >> (60 - 4 * i) & 0xf) as usize];
        }
    }
    HeaderValue::from_bytes(&id).expect("hex is a valid header value")
}

impl Exchange {
    /// A request begins; `access_log` keeps what its log line needs.
    pub(super) fn start(
        metrics: &Arc<Metrics>,
        activity: Option<Arc<Activity>>,
        access_log: Option<AccessLine>,
    ) -> Exchange {
        metrics.request_started();
        if let Some(a) = &activity {
            a.start();
        }
        Exchange {
            metrics: Arc::clone(metrics),
            activity,
            started: Instant::now(),
            to_head: None,
            client: None,
            trail: Trail::default(),
            bytes: 0,
            line: access_log.map(Box::new),
        }
    }

    /// Its answer's head is ready: counts `outcome` and the time it took.
    pub(super) fn answered(
        &mut self,
        status: u16,
        error: Option<(&'static str, ErrorSource)>,
        outcome: RequestOutcome,
    ) {
        let elapsed = self.started.elapsed();
        self.to_head = Some(elapsed);
        self.metrics
            .request_done(outcome, self.client.as_deref(), elapsed);
        if let Some(line) = self.line.as_mut() {
            line.status = status;
            line.error = error;
        }
    }

    /// Bytes of the answer's body went to the client.
    pub(super) fn sent(&mut self, bytes: usize) {
        self.bytes += bytes as u64;
    }
}

impl Drop for Exchange {
    fn drop(&mut self) {
        if self.to_head.is_none() {
            // The client left before its answer (nginx's 499, never sent).
            self.metrics.request_done(
                RequestOutcome::ClientError,
                self.client.as_deref(),
                self.started.elapsed(),
            );
            if let Some(line) = self.line.as_mut() {
                line.status = 499;
                line.error = Some(("client_closed_request", ErrorSource::Client));
            }
        }
        self.metrics.request_ended();
        if let Some(a) = &self.activity {
            a.end();
        }
        if let Some(line) = self.line.take() {
            self.log(&line);
        }
    }
}

impl Exchange {
    fn log(&self, line: &AccessLine) {
        let mut tried = String::new();
        for (i, (name, tier)) in self.trail.tried.iter().enumerate() {
            if i > 0 {
                tried.push(',');
            }
            let _ = write!(tried, "{name}/{tier}");
        }
        let token = self.trail.tried.last().map_or("-", |(name, _)| name);
        // Whole microseconds: the log shows 92.635, not 92.63569000000001.
        let ms = |d: Duration| d.as_micros() as f64 / 1000.0;
        tracing::info!(
            target: "tokenpool::access",
            method = %line.method,
            path = line.uri.path(),
            peer = %line.peer.map_or_else(|| "-".to_string(), |p| p.to_string()),
            client = self.client.as_deref().unwrap_or("-"),
            status = line.status,
            error = line.error.map_or("-", |(code, _)| code),
            error_source = line.error.map_or("-", |(_, source)| source.as_str()),
            tried = if tried.is_empty() { "-" } else { tried.as_str() },
            token,
            upstream_status = self.trail.upstream_status.unwrap_or(0),
            attempts = self.trail.tried.len(),
            bytes = self.bytes,
            head_ms = self.to_head.map_or(0.0, ms),
            total_ms = ms(self.started.elapsed()),
            request_id = line.request_id.to_str().unwrap_or("-"),
            "request"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_are_kept_when_sane_and_made_otherwise() {
        let mut h = HeaderMap::new();
        h.insert(REQUEST_ID, HeaderValue::from_static("abc-123_x.y:z"));
        assert_eq!(request_id(&h), "abc-123_x.y:z");
        for bad in ["", "has space", "semi;colon", "quote\"", &"a".repeat(129)] {
            h.insert(REQUEST_ID, HeaderValue::from_str(bad).unwrap());
            let made = request_id(&h);
            assert_ne!(made, bad);
            assert_eq!(made.len(), 32, "{made:?}");
        }
        let a = request_id(&HeaderMap::new());
        let b = request_id(&HeaderMap::new());
        assert_ne!(a, b);
    }
}
