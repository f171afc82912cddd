//! The admin listener (`docs/http.md`). Every route:
//!
//! | route | |
//! |---|---|
//! | `GET /metrics` | Prometheus text exposition. Open. |
//! | `GET /healthz` | 200 while the process runs: liveness (`/livez` is the same). Open. |
//! | `GET /readyz` | 200 while listening with a loaded configuration, whatever the tokens' state; 503 from the first moment of a drain: readiness. Open. |
//! | `GET /poolz` | 200 when a token is usable; 503 with a JSON reason otherwise (for people and alerts, not a probe). Open. |
//! | `GET /admin/pool` | the pool as JSON — names, states, times; never a secret. |
//! | `POST /admin/tokens/{name}/enable` | back into rotation, failures cleared. |
//! | `POST /admin/tokens/{name}/disable` | out of rotation until enabled. |
//! | `POST /admin/reload` | reload the config file now. |
//!
//! `/admin/*` needs `Authorization: Bearer <[admin] token>`; without an
//! admin token configured, it answers loopback clients only.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use serde_json::{json, Value};
use tokio::net::TcpListener;

use crate::config::key_matches;
use crate::error::ProxyError;
use crate::generation::Generations;
use crate::pool::{Snapshot, StateCounts, TokenState};
use crate::reload::{ReloadError, Reloads};
use crate::shutdown::Shutdown;

type AdminResponse = Response<Full<Bytes>>;

/// Serves the admin routes on `listener` until `stop`; `readiness` tells
/// whether the instance drains (`/readyz` 503); `reloads` is where
/// `POST /admin/reload` goes. The admin listener outlives the proxy's
/// drain, so probes and scrapes see it to the end.
pub async fn serve(
    listener: TcpListener,
    generations: Arc<Generations>,
    reloads: Reloads,
    readiness: Shutdown,
    mut stop: Shutdown,
) {
    let header_read_timeout = generations.current().config.server.header_read_timeout;
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(header_read_timeout);
    builder.http2().timer(TokioTimer::new());
    let admin = Arc::new(Admin {
        generations,
        reloads,
        readiness,
    });
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, peer)) = accepted else {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                let admin = Arc::clone(&admin);
                let service = service_fn(move |req| {
                    let admin = Arc::clone(&admin);
                    async move { Ok::<_, Infallible>(admin.route(peer, req).await) }
                });
                let conn = builder.serve_connection(TokioIo::new(stream), service).into_owned();
                tokio::spawn(async move {
                    let _ = conn.await;
                });
            }
            _ = stop.wait() => return,
        }
    }
}

/// What the admin routes act on.
struct Admin {
    generations: Arc<Generations>,
    reloads: Reloads,
    /// Whether the instance drains: `/readyz` fails from its first moment.
    readiness: Shutdown,
}

fn json_response(status: StatusCode, value: &Value) -> AdminResponse {
    let mut r = Response::new(Full::new(Bytes::from(value.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

fn text_response(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> AdminResponse {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

impl Admin {
    /// Routes one admin request.
    async fn route(&self, peer: SocketAddr, req: Request<Incoming>) -> AdminResponse {
        let generations = &self.generations;
        let path = req.uri().path();
        match (req.method(), path) {
            (&Method::GET, "/metrics") => text_response(
                StatusCode::OK,
                "text/plain; version=0.0.4; charset=utf-8",
                generations.metrics.render(&generations.current().pool),
            ),
            (&Method::GET, "/healthz" | "/livez") => {
                text_response(StatusCode::OK, "text/plain", "ok\n")
            }
            (&Method::GET, "/readyz") => self.readyz(),
            (&Method::GET, "/poolz") => poolz(generations),
            (_, "/metrics" | "/healthz" | "/livez" | "/readyz" | "/poolz") => {
                ProxyError::MethodNotAllowed.to_response()
            }
            (method, p) if p.starts_with("/admin/") => {
                if !self.allowed(peer, req.headers()) {
                    return ProxyError::Unauthorized.to_response();
                }
                self.admin_route(method.clone(), p)
                    .await
                    .unwrap_or_else(|e| e.to_response())
            }
            _ => ProxyError::NotFound.to_response(),
        }
    }

    /// Whether the request may use `/admin/*`.
    fn allowed(&self, peer: SocketAddr, headers: &http::HeaderMap) -> bool {
        let generation = self.generations.current();
        match &generation.config.admin.token {
            Some(token) => crate::proxy::request::bearer(headers)
                .is_some_and(|presented| key_matches(std::slice::from_ref(token), presented)),
            None => peer.ip().is_loopback(),
        }
    }

    async fn admin_route(&self, method: Method, path: &str) -> Result<AdminResponse, ProxyError> {
        let generations = &self.generations;
        match (method, path) {
            (Method::GET, "/admin/pool") => {
                Ok(json_response(StatusCode::OK, &pool_json(generations)))
            }
            (Method::POST, "/admin/reload") => match self.reloads.reload().await {
                Ok(summary) => Ok(json_response(
                    StatusCode::OK,
                    &json!({"result": "success", "summary": summary}),
                )),
                Err(ReloadError::Rejected(e)) => Err(ProxyError::ConfigRejected {
                    message: e.to_string(),
                }),
                Err(ReloadError::Unavailable) => Err(ProxyError::Internal),
            },
            (Method::POST, p) => {
                let (name, action) = p
                    .strip_prefix("/admin/tokens/")
                    .and_then(|rest| rest.rsplit_once('/'))
                    .ok_or(ProxyError::NotFound)?;
                if !matches!(action, "enable" | "disable") {
                    return Err(ProxyError::NotFound);
                }
                let generation = generations.current();
                let token = generation.pool.get(name).ok_or(ProxyError::UnknownToken)?;
                if action == "enable" {
                    token.enable();
                } else {
                    token.disable_manually();
                }
                tracing::info!(token = token.name(), action, "token changed by operator");
                generations.save_state().await;
                Ok(json_response(
                    StatusCode::OK,
                    &token_json(&generation.pool.snapshot(token)),
                ))
            }
            (_, "/admin/pool" | "/admin/reload") => Err(ProxyError::MethodNotAllowed),
            _ => Err(ProxyError::NotFound),
        }
    }
}

impl Admin {
    /// `/readyz`: whether a load balancer should send this instance new
    /// connections — a loaded configuration and listeners that accept.
    /// Whatever the tokens' state: an exhausted pool answers 503 with
    /// `Retry-After`, better than an endpoint taken out of service.
    fn readyz(&self) -> AdminResponse {
        let generation = self.generations.current().id;
        if self.readiness.is_draining() {
            return json_response(
                StatusCode::SERVICE_UNAVAILABLE,
                &json!({"ready": false, "reason": "draining: the instance is shutting down", "generation": generation}),
            );
        }
        if let Some(fault) = self.generations.cluster().and_then(|c| c.fault()) {
            // A replica that cannot tell whether its refresh tokens are
            // current refreshes nothing: out of the load balancer until
            // its configuration is fixed.
            return json_response(
                StatusCode::SERVICE_UNAVAILABLE,
                &json!({"ready": false, "reason": format!("cluster configuration error: {fault}"), "generation": generation}),
            );
        }
        json_response(
            StatusCode::OK,
            &json!({"ready": true, "generation": generation}),
        )
    }
}

/// `/poolz`: whether a token is usable now; the reason when none is.
fn poolz(generations: &Generations) -> AdminResponse {
    let generation = generations.current();
    let pool = &generation.pool;
    if pool.tokens().is_empty() {
        return json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            &json!({"usable": false, "reason": "no tokens are configured"}),
        );
    }
    if pool.any_usable() {
        return json_response(
            StatusCode::OK,
            &json!({"usable": true, "generation": generation.id}),
        );
    }
    let all = pool.state_counts();
    let mut counts = serde_json::Map::new();
    for state in TokenState::ALL {
        let n = all.in_state(state);
        if n > 0 {
            counts.insert(state.as_str().into(), json!(n));
        }
    }
    json_response(
        StatusCode::SERVICE_UNAVAILABLE,
        &json!({"usable": false, "reason": "no token is usable", "tokens": counts}),
    )
}

fn rfc3339(t: Option<SystemTime>) -> Value {
    t.map_or(Value::Null, |t| {
        Value::String(humantime::format_rfc3339_seconds(t).to_string())
    })
}

fn token_json(s: &Snapshot) -> Value {
    json!({
        "name": &*s.name,
        "tier": s.tier.as_str(),
        "state": s.state.as_str(),
        "reason": s.reason.map(|r| r.as_str()),
        "consecutive_failures": s.consecutive_failures,
        "cooldown_until": rfc3339(s.cooldown_until),
        "access_token_expires_at": rfc3339(s.access_token_expires_at),
        "requests": s.requests,
        "last_used_at": rfc3339(s.last_used_at),
        "last_error": s.last_error,
        "quota": s.quota.map(|q| json!({
            "limit": q.limit,
            "remaining": q.remaining,
            "resets_at": rfc3339(q.resets_at),
            "unlimited": q.unlimited,
        })),
    })
}

/// The `/admin/pool` document.
pub fn pool_json(generations: &Generations) -> Value {
    let generation = generations.current();
    let pool = &generation.pool;
    let snapshots = pool.snapshots();
    let counts = StateCounts::of(&snapshots);
    let mut tiers = serde_json::Map::new();
    for tier in pool.order() {
        let mut states = serde_json::Map::new();
        for state in TokenState::ALL {
            states.insert(state.as_str().into(), json!(counts.get(tier, state)));
        }
        tiers.insert(tier.as_str().into(), Value::Object(states));
    }
    json!({
        "generation": generation.id,
        "loaded_at": rfc3339(Some(generation.loaded_at)),
        "order": pool.order().map(|t| t.as_str()).collect::<Vec<_>>(),
        "tiers": tiers,
        "cluster": generations.cluster().map(|c| c.status()),
        "tokens": snapshots.iter().map(token_json).collect::<Vec<_>>(),
    })
}
