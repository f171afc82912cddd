//! The proxy listener: what happens to one client request.
//!
//! Per request: check its target and `Host` (`request`), the client's
//! key, read the body whole (up to `max_request_body_bytes`, within
//! `body_read_timeout`) so it can be sent again, then try tokens
//! (`failover`): pick one, get its access token, send, and read the
//! status. 401 gets one refresh-and-retry on the same token; 403 (not an
//! HTML block page) and 429 move to the next token; anything else streams
//! back untouched ([`body`]). Once response headers have gone to the
//! client, nothing is retried.
//!
//! hyper reads and writes every byte; `listener` owns the connections.
//! This module owns authentication, failover and the response body; where
//! requests go and with which headers is [`crate::upstream`]'s.

pub mod body;
mod exchange;
mod failover;
mod listener;
pub(crate) mod request;

use std::sync::atomic::Ordering;
use std::sync::Arc;

use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};
use hyper::body::{Body, Incoming};

use crate::error::ProxyError;
use crate::generation::{Generation, Generations};
use crate::metrics::{Metrics, RequestOutcome};
use body::ProxyBody;
use exchange::{AccessLine, Exchange};
use listener::ConnState;
pub use listener::{serve, MAX_CONCURRENT_STREAMS, MAX_HEADER_BYTES};

/// Serves one client request; `draining` ends its HTTP/1 connection after
/// the answer, so that keep-alive clients reconnect (elsewhere, once the
/// load balancer saw `/readyz` fail) before the listener stops.
async fn respond(
    generations: &Generations,
    req: Request<Incoming>,
    conn: &ConnState,
    draining: bool,
) -> Response<ProxyBody> {
    // Until its body is read to the end, a request leaves bytes on its
    // connection that a close would meet with a reset.
    conn.body_unread
        .store(!req.body().is_end_stream(), Ordering::Relaxed);
    let version = req.version();
    let generation = generations.current();
    let request_id = exchange::request_id(req.headers());
    let line = generation
        .config
        .log
        .access
        .then(|| AccessLine::new(req.method(), req.uri(), &request_id, conn.peer));
    let mut exchange = Exchange::start(&generations.metrics, conn.activity.clone(), line);
    let answer = forward(
        &generations.metrics,
        &generation,
        req,
        conn,
        &request_id,
        &mut exchange,
    )
    .await;
    let malformed = answer.as_ref().is_err_and(ProxyError::ends_connection);
    let (mut response, outcome, error) = match answer {
        Ok(response) => {
            let o = RequestOutcome::of_status(response.status());
            (response, o, None)
        }
        Err(e) => {
            tracing::debug!(code = e.code(), "the proxy answered with an error");
            (e.to_response(), e.outcome(), Some((e.code(), e.origin())))
        }
    };
    exchange.answered(response.status().as_u16(), error, outcome);
    response
        .headers_mut()
        .insert(exchange::REQUEST_ID, request_id);
    if malformed || draining || ends_connection(version, &response, conn) {
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        // hyper reads the version of an answer to an HTTP/1.0 client to
        // decide whether to add `keep-alive`: this one must not get it.
        if version < Version::HTTP_11 {
            *response.version_mut() = Version::HTTP_10;
        }
    }
    response.map(|body| body.with_exchange(exchange))
}

/// Whether an HTTP/1 connection cannot serve another request after
/// `response`: hyper will not read the rest of an unread request body; the
/// bytes after a body's trailers are not trusted (see
/// [`ConnState::had_trailers`]); and an HTTP/1.0 client cannot be sent
/// chunks, so an answer of unknown length runs to the close (hyper would
/// still echo its keep-alive).
fn ends_connection(version: Version, response: &Response<ProxyBody>, conn: &ConnState) -> bool {
    let unsure =
        conn.body_unread.load(Ordering::Relaxed) || conn.had_trailers.load(Ordering::Relaxed);
    match version {
        Version::HTTP_11 => unsure,
        Version::HTTP_10 | Version::HTTP_09 => {
            unsure || response.body().size_hint().exact().is_none()
        }
        _ => false,
    }
}

/// Headers that ask an upstream for another method or path than the
/// request's (Express, ASP.NET, Symfony, Google APIs, old Zend/Symfony):
/// dropped wherever routes apply.
const OVERRIDE_HEADERS: [&str; 5] = [
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
    "x-original-url",
    "x-rewrite-url",
];

async fn forward(
    metrics: &Metrics,
    generation: &Generation,
    req: Request<Incoming>,
    conn: &ConnState,
    request_id: &HeaderValue,
    exchange: &mut Exchange,
) -> Result<Response<ProxyBody>, ProxyError> {
    let (mut parts, body) = req.into_parts();
    let server = &generation.config.server;
    let client = match admit(&parts, &server.api_keys) {
        Ok(client) => client,
        Err(refused) => {
            body::skip_buffered(body, &parts.headers, conn);
            return Err(refused);
        }
    };
    exchange.client = client.map(|key| Arc::clone(&key.name));
    let policy = client.map(|key| &*key.policy);
    if parts.method == Method::OPTIONS && parts.uri.path() == "*" {
        // A question about the server itself (RFC 9110 §9.3.7): answered
        // here, no token spent.
        let mut answer = Response::new(ProxyBody::full(bytes::Bytes::new()));
        *answer.status_mut() = StatusCode::NO_CONTENT;
        return Ok(answer);
    }
    let upstream = &generation.config.upstream;
    let routes = match policy {
        Some(policy) => policy.routes(upstream),
        None => upstream.routes.as_deref(),
    };
    if let Some(routes) = routes {
        if !crate::config::routes::allowed(routes, &parts.method, parts.uri.path()) {
            body::skip_buffered(body, &parts.headers, conn);
            return Err(ProxyError::RouteNotAllowed);
        }
        // Headers by which many frameworks take another method or path
        // than the request line's: the route checked is the one served.
        for name in OVERRIDE_HEADERS {
            parts.headers.remove(name);
        }
    }
    let body = body::read_request(
        body,
        server.max_request_body_bytes,
        server.body_read_timeout,
        conn,
    )
    .await?;
    // The session header picks the token and goes no further (all its
    // copies removed; the first names the session, an empty one none).
    let session = generation.config.pool.affinity_header.as_ref().map(|name| {
        parts
            .headers
            .remove(name)
            .filter(|value| !value.is_empty())
            .map(|value| crate::pool::session_key(value.as_bytes()))
    });
    let from_h2 = parts.version == Version::HTTP_2;
    generation.upstream.prepare(&mut parts.headers, from_h2);
    parts
        .headers
        .insert(exchange::REQUEST_ID, request_id.clone());
    failover::run(
        metrics,
        generation,
        &parts,
        &body,
        session,
        policy.and_then(|p| p.tiers.as_deref()),
        &mut exchange.trail,
    )
    .await
}

/// Whether the proxy serves this request at all: its target and `Host`,
/// then the client's key. Returns the key (none when no keys are
/// configured), with its client's name and policy.
fn admit<'a>(
    parts: &http::request::Parts,
    api_keys: &'a [crate::config::ClientKey],
) -> Result<Option<&'a crate::config::ClientKey>, ProxyError> {
    request::check(parts)?;
    if api_keys.is_empty() {
        return Ok(None);
    }
    request::presented_key(&parts.headers)
        .and_then(|key| crate::config::find_key(api_keys, key))
        .map(Some)
        .ok_or(ProxyError::Unauthorized)
}
