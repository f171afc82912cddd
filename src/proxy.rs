//! The proxy listener (DESIGN §3.1, §5.3): client authentication, request
//! buffering for replay, token selection and failover, forwarding, and
//! streaming the answer back.
//!
//! Per request: check the client's key, read the body (up to
//! `max_request_body_bytes`), then for up to `max_attempts` tokens: pick
//! one, get its access token, send, and read the status. 401 gets one
//! refresh-and-retry on the same token; 403 (not an HTML block page) and
//! 429 move to the next token; anything else streams back untouched.
//! Once response headers have gone to the client nothing is retried.

pub mod body;
pub mod client;
pub mod downstream;
pub mod h1;
pub mod upstream;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::request::Parts;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::app::{key_matches, App, Generation, Shutdown};
use crate::error::ProxyError;
use crate::metrics::{outcome, Metrics};
use crate::pool::token::RefreshResult;
use crate::pool::{AccessToken, Outcome, Reason, Token};
use body::{collect_limited, InflightGuard, ProxyBody, RequestBody, RequestBodyError};
use client::{ClientError, UpstreamBody};

/// Largest request header block accepted, HTTP/1 and HTTP/2 alike.
pub const MAX_HEADER_BYTES: usize = 64 * 1024;
/// HTTP/2 streams one client connection may have open at once.
pub const MAX_CONCURRENT_STREAMS: u32 = 256;
/// Largest upstream error answer (401/403/429) read to decide what to do;
/// such answers are small JSON or HTML pages.
const MAX_ERROR_BODY: usize = 1024 * 1024;
/// `Retry-After` when no token will come back by itself (all revoked or
/// disabled by hand): long enough not to hammer, short enough to notice a fix.
const RETRY_AFTER_WHEN_NONE_RETURN: Duration = Duration::from_secs(60);

/// Builds hyper's connection builder with the limits above, for the admin
/// listener (the proxy listener serves HTTP/1.x itself, see [`downstream`]);
/// clients must send their request headers within `header_read_timeout`.
pub fn connection_builder(header_read_timeout: Duration) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(header_read_timeout)
        .max_buf_size(MAX_HEADER_BYTES.max(8192));
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .max_header_list_size(MAX_HEADER_BYTES as u32);
    builder
}

/// Accepts connections on `listener` until `shutdown`, then lets open
/// requests (streams included) finish for up to `grace`.
pub async fn serve(listener: TcpListener, app: Arc<App>, mut shutdown: Shutdown, grace: Duration) {
    let shared = Arc::new(downstream::Shared::new(Arc::clone(&app)));
    // Every connection holds a receiver: `closed` tells when all are gone.
    let (drain, draining) = watch::channel(false);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, _peer) = match accepted {
                    Ok(pair) => pair,
                    Err(e) => {
                        // Usually out of file descriptors: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                tokio::spawn(downstream::serve_connection(
                    stream,
                    Arc::clone(&shared),
                    draining.clone(),
                ));
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

/// Serves one client request that came over HTTP/2.
pub async fn handle(app: &App, req: Request<Incoming>) -> Response<ProxyBody> {
    let (parts, body) = req.into_parts();
    // hyper drops this future when the client resets the stream.
    let left = std::future::pending();
    respond(app, parts, RequestBody::Incoming(body), left).await
}

/// Serves one client request: `parts` is its head, `body` where its body
/// is read from. Once the body is read, the work stops when `left`
/// completes (the client is gone).
pub async fn respond(
    app: &App,
    parts: Parts,
    body: RequestBody<'_>,
    left: impl Future<Output = ()>,
) -> Response<ProxyBody> {
    let guard = InflightGuard::new(&app.metrics.inflight);
    let started = Instant::now();
    let generation = app.current();
    let (response, outcome) = match forward(&app.metrics, &generation, parts, body, left).await {
        Ok(response) => {
            let o = match response.status().as_u16() {
                0..=399 => outcome::SUCCESS,
                400..=499 => outcome::CLIENT_ERROR,
                _ => outcome::UPSTREAM_ERROR,
            };
            (response, o)
        }
        Err(e) => {
            let o = match &e {
                ProxyError::Unauthorized => outcome::REJECTED,
                ProxyError::NoTokenAvailable { .. } => outcome::NO_TOKEN,
                ProxyError::UpstreamUnreachable | ProxyError::UpstreamTimeout => {
                    outcome::UPSTREAM_ERROR
                }
                _ => outcome::CLIENT_ERROR,
            };
            (e.to_response(), o)
        }
    };
    app.metrics.request_done(outcome, started.elapsed());
    response.map(|body| body.with_guard(guard))
}

/// The client's key, from `Authorization: Bearer` or `x-api-key`.
fn presented_key(headers: &HeaderMap) -> Option<&[u8]> {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .map(HeaderValue::as_bytes)
        .and_then(|v| (v.len() > 7 && v[..7].eq_ignore_ascii_case(b"bearer ")).then(|| &v[7..]));
    bearer.or_else(|| headers.get("x-api-key").map(HeaderValue::as_bytes))
}

/// What one token's attempt ended with.
enum Attempt {
    /// An answer for the client.
    Done(Response<ProxyBody>),
    /// Move to the next token; `answer` is what this one got, kept in case
    /// attempts run out.
    Failover {
        reason: Reason,
        answer: Option<Response<Bytes>>,
    },
}

async fn forward(
    metrics: &Metrics,
    generation: &Generation,
    parts: Parts,
    body: RequestBody<'_>,
    left: impl Future<Output = ()>,
) -> Result<Response<ProxyBody>, ProxyError> {
    let config = &generation.config;
    if !config.server.api_keys.is_empty() {
        let ok = presented_key(&parts.headers)
            .is_some_and(|key| key_matches(&config.server.api_keys, key));
        if !ok {
            return Err(ProxyError::Unauthorized);
        }
    }
    // A body declared longer than the limit is refused before it is read.
    let limit = config.server.max_request_body_bytes;
    let body = match body.read(limit).await {
        Ok(body) => body,
        Err(RequestBodyError::TooLarge) => return Err(ProxyError::RequestTooLarge { limit }),
        Err(RequestBodyError::Unreadable) => {
            return Err(ProxyError::BadRequest {
                detail: "the request body could not be read",
            })
        }
    };

    tokio::select! {
        biased;
        answer = failover(metrics, generation, &parts, &body) => answer,
        () = left => {
            tracing::debug!("the client left before its answer");
            Err(ProxyError::ClientClosed)
        }
    }
}

/// Tries tokens for a request until one answers or attempts run out.
async fn failover(
    metrics: &Metrics,
    generation: &Generation,
    parts: &Parts,
    body: &Bytes,
) -> Result<Response<ProxyBody>, ProxyError> {
    let config = &generation.config;
    let pool = &generation.pool;
    let max_attempts = config.pool.max_attempts as usize;
    // Allocated only when a request fails over.
    let mut tried: Vec<&Arc<Token>> = Vec::new();
    let mut last_answer: Option<Response<Bytes>> = None;
    while tried.len() < max_attempts {
        let Some(selected) = pool.select(&tried) else {
            break;
        };
        let token = selected.token;
        let tier = token.tier();
        if let Some((from, to)) = selected.fallback {
            metrics
                .tier_fallbacks
                .with_label_values(&[from.as_str(), to.as_str()])
                .inc();
        }
        match attempt(metrics, generation, token, parts, body).await? {
            Attempt::Done(response) => return Ok(response),
            Attempt::Failover { reason, answer } => {
                tracing::debug!(
                    token = token.name(),
                    reason = reason.as_str(),
                    "moving to the next token"
                );
                metrics.failover(tier, reason);
                if answer.is_some() {
                    last_answer = answer;
                }
            }
        }
        tried.push(token);
    }
    if let Some(answer) = last_answer {
        // Attempts ran out: the client gets the last upstream answer as it was.
        return Ok(answer.map(ProxyBody::full));
    }
    Err(ProxyError::NoTokenAvailable {
        retry_after: pool
            .next_available_in()
            .unwrap_or(RETRY_AFTER_WHEN_NONE_RETURN),
    })
}

/// Applies a failure to the token and counts it.
fn charge(
    metrics: &Metrics,
    generation: &Generation,
    token: &Token,
    outcome: Outcome,
    reason: Reason,
) {
    token.report(outcome, generation.pool.settings());
    metrics.token_failure(token.tier(), token.name(), reason);
}

async fn attempt(
    metrics: &Metrics,
    generation: &Generation,
    token: &Arc<Token>,
    parts: &Parts,
    body: &Bytes,
) -> Result<Attempt, ProxyError> {
    let refresher = &generation.refresher;
    let pool = &generation.pool;
    let refresh_failover = |result: RefreshResult| {
        let reason = match result {
            RefreshResult::Failed(reason) => reason,
            _ => Reason::RefreshFailed,
        };
        Attempt::Failover {
            reason,
            answer: None,
        }
    };
    let mut access = match refresher.access(pool, token).await {
        Ok(access) => access,
        Err(result) => return Ok(refresh_failover(result)),
    };
    let mut retried_unauthorized = false;
    loop {
        let sent = send(metrics, generation, token, parts, body, &access).await;
        let response = match sent {
            Ok(sent) => sent,
            Err(e) => {
                token.report(Outcome::Neutral, pool.settings());
                return Err(e);
            }
        };
        let status = response.status();
        match status.as_u16() {
            401 => {
                let answer = buffer(response, generation).await?;
                if !retried_unauthorized {
                    // The access token may have expired or been revoked
                    // early: refresh and retry once on the same token.
                    retried_unauthorized = true;
                    token.drop_access();
                    match refresher.access(pool, token).await {
                        Ok(fresh) => {
                            access = fresh;
                            continue;
                        }
                        Err(result) => {
                            let mut failover = refresh_failover(result);
                            if let Attempt::Failover { answer: a, .. } = &mut failover {
                                *a = Some(answer);
                            }
                            return Ok(failover);
                        }
                    }
                }
                charge(
                    metrics,
                    generation,
                    token,
                    Outcome::Failure(Reason::Unauthorized),
                    Reason::Unauthorized,
                );
                return Ok(Attempt::Failover {
                    reason: Reason::Unauthorized,
                    answer: Some(answer),
                });
            }
            403 => {
                let answer = buffer(response, generation).await?;
                if is_html(&answer) {
                    // A network block page, not the token's fault: pass it on.
                    token.report(Outcome::Neutral, pool.settings());
                    return Ok(Attempt::Done(answer.map(ProxyBody::full)));
                }
                charge(
                    metrics,
                    generation,
                    token,
                    Outcome::Failure(Reason::Forbidden),
                    Reason::Forbidden,
                );
                return Ok(Attempt::Failover {
                    reason: Reason::Forbidden,
                    answer: Some(answer),
                });
            }
            429 => {
                let answer = buffer(response, generation).await?;
                let pattern = &generation.config.pool.quota_pattern;
                let quota = pattern.is_match(&String::from_utf8_lossy(answer.body()))
                    || answer
                        .headers()
                        .values()
                        .any(|v| v.to_str().is_ok_and(|s| pattern.is_match(s)));
                let (outcome, reason) = if quota {
                    (Outcome::QuotaExhausted, Reason::QuotaExhausted)
                } else {
                    let retry_after = answer
                        .headers()
                        .get(header::RETRY_AFTER)
                        .and_then(|v| v.to_str().ok())
                        .and_then(crate::refresh::provider::parse_retry_after);
                    (Outcome::RateLimited(retry_after), Reason::RateLimited)
                };
                charge(metrics, generation, token, outcome, reason);
                return Ok(Attempt::Failover {
                    reason,
                    answer: Some(answer),
                });
            }
            code => {
                let outcome = if code >= 500 {
                    Outcome::Neutral
                } else {
                    Outcome::Success
                };
                token.report(outcome, pool.settings());
                let (mut head, incoming) = response.into_parts();
                upstream::strip_response_headers(&mut head.headers);
                let body = ProxyBody::streaming(incoming, generation.upstream.idle_timeout);
                return Ok(Attempt::Done(Response::from_parts(head, body)));
            }
        }
    }
}

/// Sends one request upstream with `access`; waits for the headers at most
/// `idle_timeout`.
async fn send(
    metrics: &Metrics,
    generation: &Generation,
    token: &Token,
    parts: &Parts,
    body: &Bytes,
    access: &AccessToken,
) -> Result<Response<UpstreamBody>, ProxyError> {
    let upstream = &generation.upstream;
    let bearer = access.header().ok_or(ProxyError::UpstreamUnreachable)?;
    let headers = upstream.outgoing(&parts.headers, bearer);
    let started = Instant::now();
    let deadline = started + upstream.idle_timeout;
    let path = parts.uri.path_and_query();
    match upstream
        .send(&parts.method, path, &headers, body, deadline)
        .await
    {
        Ok(response) => {
            metrics.upstream_answer(token.tier(), response.status(), started.elapsed());
            Ok(response)
        }
        Err(ClientError::TimedOut) => {
            tracing::warn!(token = token.name(), timeout = ?upstream.idle_timeout, "upstream did not answer in time");
            Err(ProxyError::UpstreamTimeout)
        }
        Err(e) => {
            tracing::warn!(token = token.name(), error = %e.describe(), "upstream request failed");
            Err(ProxyError::UpstreamUnreachable)
        }
    }
}

/// Reads a (small) upstream answer whole.
async fn buffer(
    response: Response<UpstreamBody>,
    generation: &Generation,
) -> Result<Response<Bytes>, ProxyError> {
    let (mut head, incoming) = response.into_parts();
    upstream::strip_response_headers(&mut head.headers);
    let idle = generation.upstream.idle_timeout;
    let (bytes, cut) = collect_limited(incoming, MAX_ERROR_BODY, idle)
        .await
        .map_err(|e| match e {
            body::StreamError::Idle(_) => ProxyError::UpstreamTimeout,
            body::StreamError::Upstream(_) => ProxyError::UpstreamUnreachable,
        })?;
    if cut {
        head.headers.remove(header::CONTENT_LENGTH);
    }
    Ok(Response::from_parts(head, bytes))
}

/// Whether an answer is an HTML page (a network block, not an API answer).
fn is_html(answer: &Response<Bytes>) -> bool {
    let by_type = answer
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.to_ascii_lowercase().contains("text/html"));
    let start: Vec<u8> = answer
        .body()
        .iter()
        .copied()
        .skip_while(u8::is_ascii_whitespace)
        .take(15)
        .map(|b| b.to_ascii_lowercase())
        .collect();
    by_type || start.starts_with(b"<!doctype html") || start.starts_with(b"<html")
}
