//! Failover: trying tokens for one request until one answers or attempts
//! run out, and turning each upstream answer into what happens to the
//! token (an [`Outcome`]) and to the request.
//!
//! | upstream says | the token | the request |
//! |---|---|---|
//! | 2xx, 3xx, 4xx not below | success | streams back |
//! | 401 | refreshed, once; a second 401 is a failure (`unauthorized`) | same token again, then the next |
//! | 403, not an HTML page | failure (`forbidden`) | next token |
//! | 403 HTML page (a network block) | nothing | passes through |
//! | 429 matching `quota_pattern` | rests (`quota_exhausted`) | next token |
//! | other 429 | rests for `Retry-After` or `cooldown` (`rate_limited`) | next token |
//! | 5xx | nothing | passes through |
//! | no answer | nothing | 502 / 504 |
//!
//! When attempts run out the client gets the last upstream answer as it
//! was; when no token is available at all, 503 `no_token_available`.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header;
use http::request::Parts;
use http::Response;

use super::body::{collect_limited, ProxyBody};
use super::exchange::Trail;
use crate::config::Tier;
use crate::error::ProxyError;
use crate::generation::Generation;
use crate::metrics::Metrics;
use crate::pool::token::RefreshResult;
use crate::pool::{AccessToken, Affinity, Outcome, Reason, Token};
use crate::upstream::{headers, UpstreamBody};

/// Largest upstream error answer (401/403/429) read to decide what to do;
/// such answers are small JSON or HTML pages.
const MAX_ERROR_BODY: usize = 1024 * 1024;
/// `Retry-After` when no token will come back by itself (all revoked or
/// disabled by hand): long enough not to hammer, short enough to notice a fix.
const RETRY_AFTER_WHEN_NONE_RETURN: Duration = Duration::from_secs(60);

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

/// Tries tokens for a request until one answers or attempts run out.
/// `session`: with `[pool] affinity_header` set, the request's session
/// key (`Some(None)`: the request has no session); `tiers`: the tiers the
/// client may draw from (`None`: every one).
pub(super) async fn run(
    metrics: &Metrics,
    generation: &Generation,
    parts: &Parts,
    body: &Bytes,
    session: Option<Option<u64>>,
    tiers: Option<&[Tier]>,
    trail: &mut Trail,
) -> Result<Response<ProxyBody>, ProxyError> {
    let config = &generation.config;
    let pool = &generation.pool;
    let max_attempts = config.pool.max_attempts as usize;
    // Allocated only when a request fails over.
    let mut tried: Vec<&Arc<Token>> = Vec::new();
    let mut last_answer: Option<Response<Bytes>> = None;
    let key = session.flatten();
    // How the session's affinity went: the first pick's result, or moved
    // once the request leaves that token.
    let mut affinity = session.map(|_| Affinity::None);
    while tried.len() < max_attempts {
        let Some(selected) = pool.select_within(&tried, key, tiers) else {
            break;
        };
        affinity = affinity.map(|a| match (tried.is_empty(), a) {
            (true, _) => selected.affinity,
            (false, Affinity::None) => Affinity::None,
            (false, _) => Affinity::Moved,
        });
        let token = selected.token;
        let tier = token.tier();
        if let Some((from, to)) = selected.fallback {
            metrics.tier_fallback(from, to);
        }
        trail.tried.push((token.name_arc(), tier));
        // Counted when sent, so that requests in flight spread over the
        // tier under `most_remaining`; the answer's report corrects it.
        token.spend_quota();
        match attempt(metrics, generation, token, parts, body, trail).await {
            Err(e) => {
                count_affinity(metrics, affinity);
                return Err(e);
            }
            Ok(Attempt::Done(response)) => {
                count_affinity(metrics, affinity);
                return Ok(response);
            }
            Ok(Attempt::Failover { reason, answer }) => {
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
    count_affinity(metrics, affinity);
    if let Some(answer) = last_answer {
        // Attempts ran out: the client gets the last upstream answer as it was.
        return Ok(answer.map(ProxyBody::full));
    }
    Err(ProxyError::NoTokenAvailable {
        retry_after: pool
            .next_available_within(tiers)
            .unwrap_or(RETRY_AFTER_WHEN_NONE_RETURN),
    })
}

fn count_affinity(metrics: &Metrics, affinity: Option<Affinity>) {
    if let Some(a) = affinity {
        metrics.affinity(a);
    }
}

/// Applies a failure to the token and counts it.
fn charge(metrics: &Metrics, generation: &Generation, token: &Token, reason: Reason) {
    let outcome = match reason {
        Reason::QuotaExhausted => Outcome::QuotaExhausted,
        other => Outcome::Failure(other),
    };
    token.report(outcome, generation.pool.settings());
    metrics.token_failure(token.tier(), token.name(), reason);
}

/// Why a refresh left the token: the refresh's own reason, or
/// `refresh_failed` when the endpoint was unavailable.
fn refresh_failover(result: RefreshResult, answer: Option<Response<Bytes>>) -> Attempt {
    let reason = match result {
        RefreshResult::Failed(reason) => reason,
        RefreshResult::Refreshed | RefreshResult::Unavailable => Reason::RefreshFailed,
    };
    Attempt::Failover { reason, answer }
}

async fn attempt(
    metrics: &Metrics,
    generation: &Generation,
    token: &Arc<Token>,
    parts: &Parts,
    body: &Bytes,
    trail: &mut Trail,
) -> Result<Attempt, ProxyError> {
    let refresher = &generation.refresher;
    let pool = &generation.pool;
    let mut access = match refresher.access(pool, token).await {
        Ok(access) => access,
        Err(result) => return Ok(refresh_failover(result, None)),
    };
    let mut retried_unauthorized = false;
    loop {
        let response = match send(metrics, generation, token, parts, body, &access).await {
            Ok(response) => {
                trail.upstream_status = Some(response.status().as_u16());
                // What the answer says of the token's quota.
                if let Some(quota) =
                    crate::quota::from_headers(response.headers(), std::time::SystemTime::now())
                {
                    token.learn_quota(quota);
                }
                response
            }
            Err(e) => {
                token.report(Outcome::Neutral, pool.settings());
                return Err(e);
            }
        };
        match response.status().as_u16() {
            401 => {
                let answer = buffer(response, generation).await?;
                if !retried_unauthorized {
                    // The access token may have expired or been revoked
                    // early: refresh and retry once on the same token.
                    retried_unauthorized = true;
                    token.credentials().drop_access();
                    match refresher.access(pool, token).await {
                        Ok(fresh) => {
                            access = fresh;
                            continue;
                        }
                        Err(result) => return Ok(refresh_failover(result, Some(answer))),
                    }
                }
                charge(metrics, generation, token, Reason::Unauthorized);
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
                charge(metrics, generation, token, Reason::Forbidden);
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
                let reason = if quota {
                    charge(metrics, generation, token, Reason::QuotaExhausted);
                    // When does it refill? The poller asks, if it can.
                    token.want_quota_poll();
                    Reason::QuotaExhausted
                } else {
                    let retry_after = answer
                        .headers()
                        .get(header::RETRY_AFTER)
                        .and_then(|v| v.to_str().ok())
                        .and_then(crate::refresh::provider::parse_retry_after);
                    token.report(Outcome::RateLimited(retry_after), pool.settings());
                    metrics.token_failure(token.tier(), token.name(), Reason::RateLimited);
                    Reason::RateLimited
                };
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
                headers::strip_response_headers(&mut head.headers);
                let body = ProxyBody::streaming(incoming, generation.upstream.idle_timeout);
                return Ok(Attempt::Done(Response::from_parts(head, body)));
            }
        }
    }
}

/// Sends one request upstream with `access`.
async fn send(
    metrics: &Metrics,
    generation: &Generation,
    token: &Token,
    parts: &Parts,
    body: &Bytes,
    access: &AccessToken,
) -> Result<Response<UpstreamBody>, ProxyError> {
    let upstream = &generation.upstream;
    let Some(authorization) = access.authorization() else {
        tracing::warn!(
            token = token.name(),
            "the access token has bytes a header cannot carry"
        );
        return Err(ProxyError::UpstreamUnreachable);
    };
    let started = tokio::time::Instant::now();
    let path = parts.uri.path_and_query();
    match upstream
        .send(&parts.method, path, &parts.headers, authorization, body)
        .await
    {
        Ok(response) => {
            metrics.upstream_answer(token.tier(), response.status(), started.elapsed());
            if response.status() == http::StatusCode::SWITCHING_PROTOCOLS {
                // Nothing asked for a new protocol (Upgrade is never
                // forwarded): relaying this would hand the client's
                // connection to whatever the upstream speaks next.
                tracing::warn!(token = token.name(), "upstream switched protocols unasked");
                return Err(ProxyError::UpstreamUnreachable);
            }
            if !headers::chunked_at_most(response.headers()) {
                // hyper undoes the chunks only; a body still under another
                // transfer coding (gzip) would reach the client as if it
                // were plain.
                tracing::warn!(
                    token = token.name(),
                    "the upstream's answer has a transfer coding the proxy cannot undo"
                );
                return Err(ProxyError::UpstreamUnreachable);
            }
            Ok(response)
        }
        Err(e) => {
            tracing::warn!(token = token.name(), error = %e.describe(), "upstream request failed");
            Err(ProxyError::from(e))
        }
    }
}

/// Reads a (small) upstream answer whole.
async fn buffer(
    response: Response<UpstreamBody>,
    generation: &Generation,
) -> Result<Response<Bytes>, ProxyError> {
    let (mut head, incoming) = response.into_parts();
    headers::strip_response_headers(&mut head.headers);
    let idle = generation.upstream.idle_timeout;
    let (bytes, cut) = collect_limited(incoming, MAX_ERROR_BODY, idle).await?;
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
