//! The admin listener (DESIGN §3.2). Every route:
//!
//! | route | |
//! |---|---|
//! | `GET /metrics` | Prometheus text exposition. Open. |
//! | `GET /healthz` | 200 while the process runs. Open. |
//! | `GET /readyz` | 200 when a token is usable; 503 with a JSON reason otherwise. Open. |
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
use std::time::SystemTime;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::net::TcpListener;

use crate::app::{key_matches, App, Shutdown};
use crate::error::ProxyError;
use crate::pool::{Snapshot, StateCounts, TokenState};

type AdminResponse = Response<Full<Bytes>>;

/// Serves the admin routes on `listener` until `shutdown`.
pub async fn serve(listener: TcpListener, app: Arc<App>, mut shutdown: Shutdown) {
    let builder = crate::proxy::connection_builder(app.current().config.server.header_read_timeout);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, peer)) = accepted else {
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                };
                let app = Arc::clone(&app);
                let service = service_fn(move |req| {
                    let app = Arc::clone(&app);
                    async move { Ok::<_, Infallible>(route(&app, peer, req).await) }
                });
                let conn = builder.serve_connection(TokioIo::new(stream), service).into_owned();
                tokio::spawn(async move {
                    let _ = conn.await;
                });
            }
            _ = shutdown.wait() => return,
        }
    }
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

/// Routes one admin request.
pub async fn route(app: &Arc<App>, peer: SocketAddr, req: Request<Incoming>) -> AdminResponse {
    let path = req.uri().path().to_string();
    let method = req.method().clone();
    match (method, path.as_str()) {
        (Method::GET, "/metrics") => text_response(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            app.metrics.render(&app.current().pool),
        ),
        (Method::GET, "/healthz") => text_response(StatusCode::OK, "text/plain", "ok\n"),
        (Method::GET, "/readyz") => readyz(app),
        (_, "/metrics" | "/healthz" | "/readyz") => ProxyError::MethodNotAllowed.to_response(),
        (method, p) if p.starts_with("/admin/") => {
            if !admin_allowed(app, peer, req.headers()) {
                return ProxyError::Unauthorized.to_response();
            }
            admin_route(app, method, p).await
        }
        _ => ProxyError::NotFound.to_response(),
    }
}

/// Whether the request may use `/admin/*`.
fn admin_allowed(app: &App, peer: SocketAddr, headers: &http::HeaderMap) -> bool {
    let generation = app.current();
    match &generation.config.admin.token {
        Some(token) => headers
            .get(header::AUTHORIZATION)
            .map(HeaderValue::as_bytes)
            .and_then(|v| (v.len() > 7 && v[..7].eq_ignore_ascii_case(b"bearer ")).then(|| &v[7..]))
            .is_some_and(|presented| key_matches(std::slice::from_ref(token), presented)),
        None => peer.ip().is_loopback(),
    }
}

async fn admin_route(app: &Arc<App>, method: Method, path: &str) -> AdminResponse {
    match (method, path) {
        (Method::GET, "/admin/pool") => json_response(StatusCode::OK, &pool_json(app)),
        (Method::POST, "/admin/reload") => {
            // Reading and parsing the file is blocking work.
            let reloading = Arc::clone(app);
            let result = match tokio::task::spawn_blocking(move || reloading.reload()).await {
                Ok(result) => result,
                Err(_) => {
                    return json_response(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        &json!({"result": "failure", "error": "the reload task failed"}),
                    )
                }
            };
            match result {
                Ok(summary) => json_response(
                    StatusCode::OK,
                    &json!({"result": "success", "summary": summary}),
                ),
                Err(e) => json_response(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    &json!({"result": "failure", "error": e.to_string(), "generation": app.current().id}),
                ),
            }
        }
        (Method::POST, p) => {
            let Some(rest) = p.strip_prefix("/admin/tokens/") else {
                return ProxyError::NotFound.to_response();
            };
            let Some((name, action)) = rest.rsplit_once('/') else {
                return ProxyError::NotFound.to_response();
            };
            let generation = app.current();
            let Some(token) = generation.pool.get(name) else {
                return json_response(
                    StatusCode::NOT_FOUND,
                    &json!({"error": {"message": "no token of that name", "type": "tokenpool_error", "code": "not_found"}}),
                );
            };
            match action {
                "enable" => token.enable(),
                "disable" => token.disable_manually(),
                _ => return ProxyError::NotFound.to_response(),
            }
            tracing::info!(token = token.name(), action, "token changed by operator");
            app.save_state().await;
            json_response(StatusCode::OK, &token_json(&token.snapshot()))
        }
        (_, "/admin/pool" | "/admin/reload") => ProxyError::MethodNotAllowed.to_response(),
        _ => ProxyError::NotFound.to_response(),
    }
}

fn readyz(app: &App) -> AdminResponse {
    let generation = app.current();
    let pool = &generation.pool;
    if pool.tokens().is_empty() {
        return json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            &json!({"ready": false, "reason": "no tokens are configured"}),
        );
    }
    if pool.any_usable() {
        return json_response(
            StatusCode::OK,
            &json!({"ready": true, "generation": generation.id}),
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
        &json!({"ready": false, "reason": "no token is usable", "tokens": counts}),
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
    })
}

/// The `/admin/pool` document.
pub fn pool_json(app: &App) -> Value {
    let generation = app.current();
    let pool = &generation.pool;
    let snapshots: Vec<Snapshot> = pool.tokens().iter().map(|t| t.snapshot()).collect();
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
        "tokens": snapshots.iter().map(token_json).collect::<Vec<_>>(),
    })
}
