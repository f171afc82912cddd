//! A simulated Warp-like upstream (`docs/warp.md`), in process, on loopback:
//! a Firebase-style refresh endpoint that mints JWTs, and a streaming AI
//! endpoint that answers SSE — each controllable per account, so tests and
//! `tokenpool demo` can make any token succeed, rotate, be revoked, run
//! out of quota, be rate-limited or blocked, and make either endpoint go
//! down, slow, silent or broken.
//!
//! Like Warp's, the refresh endpoint wants its web API key (`?key=`) and
//! both endpoints want the client headers `x-warp-client-version` and
//! `x-warp-os-category` (400 otherwise).
//!
//! Routes: `POST …/token` (refresh), `POST /ai/multi-agent` (SSE),
//! `POST /graphql/v2?op=GetRequestLimitInfo` (an account's quota, Warp's
//! GraphQL query: it spends none), `/close` answers and closes the
//! connection (`Connection: close`), anything else echoes what it got.
//!
//! An account given a quota ([`Sim::set_quota`]) spends one request of it
//! per AI answer, and is answered Warp's quota 429 once it has none left.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use bytes::Bytes;
use http::{header, HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, Notify};

/// How an account's refresh token behaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefreshBehaviour {
    /// Mints a JWT; the refresh token stays.
    Ok,
    /// Mints a JWT and rotates the refresh token (the old one stops working).
    Rotate,
    /// Rotates on every refresh like `Rotate`, and treats a superseded
    /// refresh token coming back as theft (OAuth 2.0 reuse detection):
    /// the whole account is revoked, its current refresh token too.
    RotateStrict,
    /// 400 `INVALID_REFRESH_TOKEN`.
    Revoked,
    /// 503 for this account's refreshes.
    ServerError,
    /// 429 for this account's refreshes, with this Retry-After if given.
    RateLimited(Option<u64>),
    /// Mints a JWT after this long.
    Slow(Duration),
}

/// How the whole refresh endpoint behaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefreshMode {
    /// Per account.
    Normal,
    /// 503 for everyone.
    Down,
    /// 429, with this Retry-After in seconds if given.
    RateLimited(Option<u64>),
    /// Answers after this long.
    Slow(Duration),
    /// 200 with a body that is not JSON.
    Garbage,
}

/// How the AI endpoint answers an account.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AiBehaviour {
    /// An SSE stream of events ending with `[DONE]`.
    Ok,
    /// 429 "No remaining quota".
    Quota,
    /// 429 without quota words, with this Retry-After in seconds if given.
    RateLimited(Option<u64>),
    /// 401 as if the JWT were expired.
    Unauthorized,
    /// 403 "Your account has been blocked…".
    Blocked,
    /// 403 with an HTML page (a network block).
    HtmlBlock,
    /// A bare 500.
    ServerError,
    /// The connection is closed before any header.
    ResetBeforeHeaders,
    /// One event, then the connection breaks.
    ResetMidStream,
    /// One event, then nothing until [`Sim::release_streams`].
    Hold,
    /// One event, then silence forever.
    Silent,
    /// No answer at all, headers included.
    HangBeforeHeaders,
}

/// How the quota endpoint answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuotaMode {
    /// Each account's quota.
    Normal,
    /// 503.
    Down,
    /// 200 with a GraphQL `errors` array.
    Errors,
}

/// An account's request quota.
#[derive(Debug, Clone, Copy)]
struct AccountQuota {
    limit: u64,
    used: u64,
    refills_at: SystemTime,
}

#[derive(Debug)]
struct Account {
    refresh_token: String,
    refresh: RefreshBehaviour,
    ai: AiBehaviour,
    refresh_calls: u64,
    ai_calls: u64,
    rotations: u64,
    /// `None`: unlimited.
    quota: Option<AccountQuota>,
    /// Extra headers on this account's AI answers.
    answer_headers: Vec<(HeaderName, HeaderValue)>,
    /// Quota 429s it was answered.
    quota_refusals: u64,
    /// Refresh tokens it rotated away from (oldest first).
    retired: Vec<String>,
    /// Superseded refresh tokens presented for it.
    superseded: u64,
    /// Revoked because a superseded refresh token came back.
    revoked_by_reuse: bool,
}

#[derive(Debug)]
struct Inner {
    accounts: HashMap<String, Account>,
    mode: RefreshMode,
    jwt_ttl: Duration,
    events: usize,
    event_gap: Duration,
    seen: Vec<(String, HeaderMap)>,
    /// The HTTP version of the last request.
    last_version: Option<http::Version>,
    quota_mode: QuotaMode,
    quota_calls: u64,
}

/// The state behind a running simulator.
#[derive(Debug)]
pub struct SimState {
    inner: Mutex<Inner>,
    refresh_calls: AtomicU64,
    ai_calls: AtomicU64,
    /// Connections accepted.
    connections: AtomicU64,
    jti: AtomicU64,
    /// JWTs with a `jti` below this are refused with 401, as if expired.
    valid_from_jti: AtomicU64,
    release: Notify,
}

/// A running simulator; stops when dropped.
#[derive(Debug)]
pub struct Sim {
    addr: SocketAddr,
    /// Whether it speaks TLS.
    tls: bool,
    state: Arc<SimState>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Sim {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// How many requests' headers are remembered.
const SEEN_LIMIT: usize = 1000;

impl Sim {
    /// Starts a simulator on 127.0.0.1, on a port the OS picks.
    pub async fn start() -> std::io::Result<Sim> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        Ok(Sim::with_listener(listener))
    }

    /// Starts a simulator on 127.0.0.1 that speaks TLS with `cert_pem`
    /// (a chain) and `key_pem`, offering the ALPN protocols `alpn` (for
    /// example `h2` and `http/1.1`).
    pub async fn start_tls(
        cert_pem: &[u8],
        key_pem: &[u8],
        alpn: &[&[u8]],
    ) -> std::io::Result<Sim> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let bad = |e: String| std::io::Error::new(std::io::ErrorKind::InvalidInput, e);
        let certs = CertificateDer::pem_slice_iter(cert_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| bad(e.to_string()))?;
        let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| bad(e.to_string()))?;
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| bad(e.to_string()))?;
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        Ok(Sim::serve(
            listener,
            Some(tokio_rustls::TlsAcceptor::from(Arc::new(config))),
        ))
    }

    /// Starts a simulator on an already-bound listener.
    pub fn with_listener(listener: TcpListener) -> Sim {
        Sim::serve(listener, None)
    }

    fn serve(listener: TcpListener, tls: Option<tokio_rustls::TlsAcceptor>) -> Sim {
        let addr = listener
            .local_addr()
            .expect("bound listener has an address");
        let state = Arc::new(SimState {
            inner: Mutex::new(Inner {
                accounts: HashMap::new(),
                mode: RefreshMode::Normal,
                jwt_ttl: Duration::from_secs(3600),
                events: 5,
                event_gap: Duration::from_millis(20),
                seen: Vec::new(),
                last_version: None,
                quota_mode: QuotaMode::Normal,
                quota_calls: 0,
            }),
            refresh_calls: AtomicU64::new(0),
            ai_calls: AtomicU64::new(0),
            connections: AtomicU64::new(0),
            jti: AtomicU64::new(0),
            valid_from_jti: AtomicU64::new(0),
            release: Notify::new(),
        });
        let serving = Arc::clone(&state);
        let is_tls = tls.is_some();
        let task = tokio::spawn(async move {
            let builder = auto::Builder::new(TokioExecutor::new());
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let _ = stream.set_nodelay(true);
                serving.connections.fetch_add(1, Ordering::SeqCst);
                let state = Arc::clone(&serving);
                let service = service_fn(move |req| {
                    let state = Arc::clone(&state);
                    async move { state.handle(req).await }
                });
                let builder = builder.clone();
                let tls = tls.clone();
                tokio::spawn(async move {
                    match tls {
                        None => {
                            let _ = builder
                                .serve_connection(TokioIo::new(stream), service)
                                .await;
                        }
                        Some(acceptor) => {
                            let Ok(stream) = acceptor.accept(stream).await else {
                                return;
                            };
                            let _ = builder
                                .serve_connection(TokioIo::new(stream), service)
                                .await;
                        }
                    }
                });
            }
        });
        Sim {
            addr,
            tls: is_tls,
            state,
            task,
        }
    }

    /// Its address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT` (`https` when it speaks TLS).
    pub fn url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    /// Connections it accepted.
    pub fn connections(&self) -> u64 {
        self.state.connections.load(Ordering::SeqCst)
    }

    /// The HTTP version of the last request it got.
    pub fn last_version(&self) -> Option<http::Version> {
        self.inner().last_version
    }

    /// The refresh endpoint, Warp-style.
    pub fn refresh_url(&self) -> String {
        refresh_url_of(&self.url())
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.state.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds an account whose refresh token is `refresh_token`.
    pub fn add_account(&self, id: &str, refresh_token: &str) {
        self.inner().accounts.insert(
            id.to_string(),
            Account {
                refresh_token: refresh_token.to_string(),
                refresh: RefreshBehaviour::Ok,
                ai: AiBehaviour::Ok,
                refresh_calls: 0,
                ai_calls: 0,
                rotations: 0,
                quota: None,
                answer_headers: Vec::new(),
                quota_refusals: 0,
                retired: Vec::new(),
                superseded: 0,
                revoked_by_reuse: false,
            },
        );
    }

    /// Superseded refresh tokens presented for an account (any provider
    /// that rotates counts them; `RotateStrict` also revokes the account).
    pub fn superseded_presented(&self, id: &str) -> u64 {
        self.inner().accounts.get(id).map_or(0, |a| a.superseded)
    }

    /// Superseded refresh tokens presented, all accounts together.
    pub fn total_superseded_presented(&self) -> u64 {
        self.inner().accounts.values().map(|a| a.superseded).sum()
    }

    /// Accounts revoked because a superseded refresh token came back.
    pub fn accounts_revoked_by_reuse(&self) -> Vec<String> {
        let mut ids: Vec<String> = self
            .inner()
            .accounts
            .iter()
            .filter(|(_, a)| a.revoked_by_reuse)
            .map(|(id, _)| id.clone())
            .collect();
        ids.sort();
        ids
    }

    /// Gives an account a quota of `limit` requests, `used` of them spent,
    /// refilled at `refills_at`: each AI answer spends one, and with none
    /// left the account is answered Warp's quota 429.
    pub fn set_quota(&self, id: &str, limit: u64, used: u64, refills_at: SystemTime) {
        if let Some(a) = self.inner().accounts.get_mut(id) {
            a.quota = Some(AccountQuota {
                limit,
                used,
                refills_at,
            });
        }
    }

    /// Adds headers to an account's AI answers (a quota header family, say).
    pub fn set_answer_headers(&self, id: &str, headers: &[(&str, &str)]) {
        if let Some(a) = self.inner().accounts.get_mut(id) {
            a.answer_headers = headers
                .iter()
                .filter_map(|(k, v)| {
                    Some((
                        HeaderName::from_bytes(k.as_bytes()).ok()?,
                        HeaderValue::from_str(v).ok()?,
                    ))
                })
                .collect();
        }
    }

    /// Sets how the quota endpoint answers.
    pub fn set_quota_mode(&self, mode: QuotaMode) {
        self.inner().quota_mode = mode;
    }

    /// Calls to the quota endpoint.
    pub fn quota_calls(&self) -> u64 {
        self.inner().quota_calls
    }

    /// Quota 429s an account was answered (with a quota set: asked with
    /// none left).
    pub fn quota_refusals(&self, id: &str) -> u64 {
        self.inner()
            .accounts
            .get(id)
            .map_or(0, |a| a.quota_refusals)
    }

    /// Sets how an account's refresh behaves.
    pub fn set_refresh(&self, id: &str, behaviour: RefreshBehaviour) {
        if let Some(a) = self.inner().accounts.get_mut(id) {
            a.refresh = behaviour;
        }
    }

    /// Sets how the AI endpoint answers an account.
    pub fn set_ai(&self, id: &str, behaviour: AiBehaviour) {
        if let Some(a) = self.inner().accounts.get_mut(id) {
            a.ai = behaviour;
        }
    }

    /// Sets how the refresh endpoint behaves for everyone.
    pub fn set_refresh_mode(&self, mode: RefreshMode) {
        self.inner().mode = mode;
    }

    /// Sets the lifetime of minted JWTs.
    pub fn set_jwt_ttl(&self, ttl: Duration) {
        self.inner().jwt_ttl = ttl;
    }

    /// Sets the number of SSE events and the gap between them.
    pub fn set_stream(&self, events: usize, gap: Duration) {
        let mut inner = self.inner();
        inner.events = events;
        inner.event_gap = gap;
    }

    /// Refresh calls made for an account.
    pub fn refresh_calls(&self, id: &str) -> u64 {
        self.inner().accounts.get(id).map_or(0, |a| a.refresh_calls)
    }

    /// Refresh calls in all.
    pub fn total_refresh_calls(&self) -> u64 {
        self.state.refresh_calls.load(Ordering::SeqCst)
    }

    /// AI calls made with an account's JWT.
    pub fn ai_calls(&self, id: &str) -> u64 {
        self.inner().accounts.get(id).map_or(0, |a| a.ai_calls)
    }

    /// AI calls in all (including rejected ones).
    pub fn total_ai_calls(&self) -> u64 {
        self.state.ai_calls.load(Ordering::SeqCst)
    }

    /// An account's current refresh token (after rotations).
    pub fn refresh_token(&self, id: &str) -> Option<String> {
        self.inner()
            .accounts
            .get(id)
            .map(|a| a.refresh_token.clone())
    }

    /// Headers of the requests seen, with their paths (last 1000).
    pub fn seen(&self) -> Vec<(String, HeaderMap)> {
        self.inner().seen.clone()
    }

    /// The account of the last AI request it got (from its bearer).
    pub fn last_ai_account(&self) -> Option<String> {
        let inner = self.inner();
        let (_, headers) = inner
            .seen
            .iter()
            .rev()
            .find(|(path, _)| path == "/ai/multi-agent")?;
        let bearer = headers
            .get(header::AUTHORIZATION)?
            .to_str()
            .ok()?
            .strip_prefix("Bearer ")?;
        jwt_claims(bearer).map(|(sub, _, _)| sub)
    }

    /// Makes every JWT issued so far answer 401 (as if it had expired
    /// early), so the next request must refresh.
    pub fn invalidate_issued_jwts(&self) {
        let next = self.state.jti.load(Ordering::SeqCst);
        self.state.valid_from_jti.store(next, Ordering::SeqCst);
    }

    /// Lets held streams ([`AiBehaviour::Hold`]) finish.
    pub fn release_streams(&self) {
        self.state.release.notify_waiters();
    }
}

/// Builds an unsigned JWT with `sub` and `exp`.
pub fn make_jwt(sub: &str, exp: u64, jti: u64) -> String {
    let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
    format!(
        "{}.{}.{}",
        b64(r#"{"alg":"RS256","typ":"JWT"}"#),
        b64(
            &json!({"sub": sub, "exp": exp, "iat": exp.saturating_sub(3600), "jti": jti})
                .to_string()
        ),
        b64("simulated-signature")
    )
}

fn jwt_claims(token: &str) -> Option<(String, u64, u64)> {
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .ok()?;
    let v: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    Some((
        v["sub"].as_str()?.to_string(),
        v["exp"].as_u64()?,
        v["jti"].as_u64().unwrap_or(0),
    ))
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn form_value(body: &[u8], key: &str) -> Option<String> {
    let text = std::str::from_utf8(body).ok()?;
    text.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        (k == key).then(|| form_decode(v))
    })
}

fn form_decode(v: &str) -> String {
    let bytes = v.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

type SimResponse = Response<SimBody>;

/// The simulator's response body: fixed bytes or a channel of frames.
pub struct SimBody {
    fixed: Option<Bytes>,
    stream: Option<mpsc::Receiver<Result<Bytes, std::io::Error>>>,
}

impl SimBody {
    fn full(b: impl Into<Bytes>) -> SimBody {
        SimBody {
            fixed: Some(b.into()),
            stream: None,
        }
    }
}

impl Body for SimBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        let this = self.get_mut();
        if let Some(b) = this.fixed.take() {
            return Poll::Ready(Some(Ok(Frame::data(b))));
        }
        match &mut this.stream {
            Some(rx) => rx
                .poll_recv(cx)
                .map(|item| item.map(|r| r.map(Frame::data))),
            None => Poll::Ready(None),
        }
    }
}

fn respond(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> SimResponse {
    let mut r = Response::new(SimBody::full(body));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

/// The refresh endpoint's 429, Firebase-style, with `Retry-After` if given.
fn too_many_attempts(retry_after: Option<u64>) -> SimResponse {
    let mut r = respond(
        StatusCode::TOO_MANY_REQUESTS,
        "application/json",
        r#"{"error":{"code":429,"message":"TOO_MANY_ATTEMPTS_TRY_LATER"}}"#,
    );
    if let Some(s) = retry_after {
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(s));
    }
    r
}

/// The web API key the simulated refresh endpoint accepts.
pub const SIM_WEB_API_KEY: &str = "sim-web-api-key";

/// The refresh endpoint of a simulator serving at `url`.
pub fn refresh_url_of(url: &str) -> String {
    format!("{url}/proxy/token?key={SIM_WEB_API_KEY}")
}

/// The client headers Warp's endpoints want; the first one missing.
fn missing_client_header(headers: &HeaderMap) -> Option<&'static str> {
    ["x-warp-client-version", "x-warp-os-category"]
        .into_iter()
        .find(|name| !headers.contains_key(*name))
}

fn client_headers_missing(name: &str) -> SimResponse {
    respond(
        StatusCode::BAD_REQUEST,
        "application/json",
        json!({"error": format!("missing client header {name}")}).to_string(),
    )
}

/// The whole request body; what cannot be read counts as empty.
async fn read_body(req: Request<Incoming>) -> Bytes {
    req.into_body()
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default()
}

fn sse_event(n: usize) -> Bytes {
    let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("event-{n}"));
    Bytes::from(format!("data: {payload}\n\n"))
}

/// Error that makes hyper drop the connection without an answer.
#[derive(Debug, thiserror::Error)]
#[error("simulated connection reset")]
pub struct SimReset;

impl SimState {
    async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Result<SimResponse, SimReset> {
        let path = req.uri().path().to_string();
        {
            let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
            if inner.seen.len() >= SEEN_LIMIT {
                inner.seen.remove(0);
            }
            inner.seen.push((path.clone(), req.headers().clone()));
            inner.last_version = Some(req.version());
        }
        if path.ends_with("/token") {
            // Warp's endpoint wants its web API key and the client headers.
            let keyed = req.uri().query().is_some_and(|q| {
                q.split('&')
                    .any(|kv| kv == format!("key={SIM_WEB_API_KEY}"))
            });
            if !keyed {
                return Ok(respond(
                    StatusCode::BAD_REQUEST,
                    "application/json",
                    r#"{"error":{"code":400,"message":"API key not valid. Please pass a valid API key.","status":"INVALID_ARGUMENT"}}"#,
                ));
            }
            if let Some(missing) = missing_client_header(req.headers()) {
                return Ok(client_headers_missing(missing));
            }
            let body = read_body(req).await;
            Ok(self.refresh(&body).await)
        } else if path == "/ai/multi-agent" {
            if let Some(missing) = missing_client_header(req.headers()) {
                return Ok(client_headers_missing(missing));
            }
            self.ai(req.headers()).await
        } else if path.starts_with("/graphql/v2") {
            if let Some(missing) = missing_client_header(req.headers()) {
                return Ok(client_headers_missing(missing));
            }
            let headers = req.headers().clone();
            let body = read_body(req).await;
            Ok(self.quota(&headers, &body))
        } else if path == "/close" {
            let mut r = respond(StatusCode::OK, "application/json", "{}");
            r.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
            Ok(r)
        } else {
            let method = req.method().to_string();
            let body = read_body(req).await;
            Ok(respond(
                StatusCode::OK,
                "application/json",
                json!({"method": method, "path": path, "body_bytes": body.len()}).to_string(),
            ))
        }
    }

    /// `GetRequestLimitInfo`: the bearer's account's quota.
    fn quota(&self, headers: &HeaderMap, body: &[u8]) -> SimResponse {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.quota_calls += 1;
        match inner.quota_mode {
            QuotaMode::Normal => {}
            QuotaMode::Down => {
                return respond(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "unavailable")
            }
            QuotaMode::Errors => {
                return respond(
                    StatusCode::OK,
                    "application/json",
                    r#"{"errors":[{"message":"internal error"}],"data":null}"#,
                )
            }
        }
        let asked = serde_json::from_slice::<serde_json::Value>(body)
            .ok()
            .is_some_and(|v| v["operationName"] == "GetRequestLimitInfo");
        if !asked {
            return respond(
                StatusCode::BAD_REQUEST,
                "application/json",
                r#"{"errors":[{"message":"unknown operation"}]}"#,
            );
        }
        let bearer = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        let account = bearer
            .and_then(jwt_claims)
            .filter(|(_, exp, jti)| {
                *exp > unix_now() && *jti >= self.valid_from_jti.load(Ordering::SeqCst)
            })
            .and_then(|(sub, _, _)| inner.accounts.get(&sub));
        let Some(account) = account else {
            return respond(StatusCode::UNAUTHORIZED, "text/plain", "Unauthorized");
        };
        let info = match account.quota {
            None => json!({"isUnlimited": true, "nextRefreshTime": null}),
            Some(q) => json!({
                "isUnlimited": false,
                "requestLimit": q.limit,
                "requestsUsedSinceLastRefresh": q.used,
                "nextRefreshTime": humantime::format_rfc3339_millis(q.refills_at).to_string(),
                "requestLimitRefreshDuration": "MONTHLY",
            }),
        };
        respond(
            StatusCode::OK,
            "application/json",
            json!({"data": {"user": {"__typename": "UserOutput", "user": {"requestLimitInfo": info}}}})
                .to_string(),
        )
    }

    async fn refresh(&self, body: &[u8]) -> SimResponse {
        self.refresh_calls.fetch_add(1, Ordering::SeqCst);
        let mode = self.inner.lock().unwrap_or_else(|e| e.into_inner()).mode;
        match mode {
            RefreshMode::Normal => {}
            RefreshMode::Down => {
                return respond(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "unavailable")
            }
            RefreshMode::RateLimited(retry_after) => return too_many_attempts(retry_after),
            RefreshMode::Slow(d) => tokio::time::sleep(d).await,
            RefreshMode::Garbage => {
                return respond(StatusCode::OK, "text/html", "<html>oops</html>")
            }
        }
        let invalid = || {
            respond(
                StatusCode::BAD_REQUEST,
                "application/json",
                r#"{"error":{"code":400,"message":"INVALID_REFRESH_TOKEN","status":"INVALID_ARGUMENT"}}"#,
            )
        };
        let Some(presented) = form_value(body, "refresh_token") else {
            return respond(
                StatusCode::BAD_REQUEST,
                "application/json",
                r#"{"error":{"code":400,"message":"MISSING_REFRESH_TOKEN"}}"#,
            );
        };
        // Per-account delays happen before the lock is taken.
        let delay = {
            let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
            inner.accounts.values().find_map(|a| match a.refresh {
                RefreshBehaviour::Slow(d) if a.refresh_token == presented => Some(d),
                _ => None,
            })
        };
        if let Some(d) = delay {
            tokio::time::sleep(d).await;
        }
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let ttl = inner.jwt_ttl;
        if let Some(account) = inner
            .accounts
            .values_mut()
            .find(|a| a.retired.contains(&presented))
        {
            // A superseded refresh token: a strict provider takes it for
            // a stolen one and revokes the account.
            account.superseded += 1;
            if account.refresh == RefreshBehaviour::RotateStrict {
                account.revoked_by_reuse = true;
                account.refresh = RefreshBehaviour::Revoked;
            }
            return invalid();
        }
        let Some((id, account)) = inner
            .accounts
            .iter_mut()
            .find(|(_, a)| a.refresh_token == presented)
        else {
            return invalid();
        };
        account.refresh_calls += 1;
        match account.refresh {
            RefreshBehaviour::Revoked => invalid(),
            RefreshBehaviour::ServerError => {
                respond(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "unavailable")
            }
            RefreshBehaviour::RateLimited(retry_after) => too_many_attempts(retry_after),
            behaviour => {
                if matches!(
                    behaviour,
                    RefreshBehaviour::Rotate | RefreshBehaviour::RotateStrict
                ) {
                    account.rotations += 1;
                    let next = format!("{presented}~r{}", account.rotations);
                    account
                        .retired
                        .push(std::mem::replace(&mut account.refresh_token, next));
                }
                let jwt = make_jwt(
                    id,
                    unix_now() + ttl.as_secs().max(1),
                    self.jti.fetch_add(1, Ordering::SeqCst),
                );
                respond(
                    StatusCode::OK,
                    "application/json",
                    json!({
                        "access_token": jwt,
                        "id_token": jwt,
                        "expires_in": ttl.as_secs().to_string(),
                        "token_type": "Bearer",
                        "refresh_token": account.refresh_token,
                        "user_id": id,
                        "project_id": "simulated",
                    })
                    .to_string(),
                )
            }
        }
    }

    async fn ai(self: Arc<Self>, headers: &HeaderMap) -> Result<SimResponse, SimReset> {
        self.ai_calls.fetch_add(1, Ordering::SeqCst);
        let bearer = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        let Some((sub, exp, jti)) = bearer.and_then(jwt_claims) else {
            return Ok(respond(
                StatusCode::UNAUTHORIZED,
                "text/plain",
                "Unauthorized: User not in context",
            ));
        };
        if exp <= unix_now() || jti < self.valid_from_jti.load(Ordering::SeqCst) {
            return Ok(respond(
                StatusCode::UNAUTHORIZED,
                "text/plain",
                format!("ID token has expired at: {exp}"),
            ));
        }
        let (behaviour, events, gap, extra) = {
            let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
            let (events, gap) = (inner.events, inner.event_gap);
            match inner.accounts.get_mut(&sub) {
                Some(a) => {
                    a.ai_calls += 1;
                    let mut behaviour = a.ai;
                    if behaviour == AiBehaviour::Ok {
                        if let Some(q) = a.quota.as_mut() {
                            if q.used >= q.limit {
                                behaviour = AiBehaviour::Quota;
                                a.quota_refusals += 1;
                            } else {
                                q.used += 1;
                            }
                        }
                    }
                    (behaviour, events, gap, a.answer_headers.clone())
                }
                None => {
                    return Ok(respond(
                        StatusCode::UNAUTHORIZED,
                        "text/plain",
                        "Unauthorized: User not in context",
                    ))
                }
            }
        };
        let r = match behaviour {
            AiBehaviour::Quota => respond(
                StatusCode::TOO_MANY_REQUESTS,
                "application/json",
                r#"{"error":"No remaining quota: No AI requests remaining"}"#,
            ),
            AiBehaviour::RateLimited(retry_after) => {
                let mut r = respond(
                    StatusCode::TOO_MANY_REQUESTS,
                    "application/json",
                    r#"{"error":"Too many requests"}"#,
                );
                if let Some(s) = retry_after {
                    r.headers_mut()
                        .insert(header::RETRY_AFTER, HeaderValue::from(s));
                }
                r
            }
            AiBehaviour::Unauthorized => respond(
                StatusCode::UNAUTHORIZED,
                "text/plain",
                format!("ID token has expired at: {}", unix_now() - 1),
            ),
            AiBehaviour::Blocked => respond(
                StatusCode::FORBIDDEN,
                "application/json",
                r#"{"error":"Your account has been blocked from using AI features."}"#,
            ),
            AiBehaviour::HtmlBlock => respond(
                StatusCode::FORBIDDEN,
                "text/html; charset=utf-8",
                "<!DOCTYPE html><html><body>Access denied</body></html>",
            ),
            AiBehaviour::ServerError => {
                respond(StatusCode::INTERNAL_SERVER_ERROR, "text/plain", "")
            }
            AiBehaviour::ResetBeforeHeaders => return Err(SimReset),
            AiBehaviour::HangBeforeHeaders => {
                std::future::pending::<()>().await;
                unreachable!("pending never completes")
            }
            AiBehaviour::Ok
            | AiBehaviour::ResetMidStream
            | AiBehaviour::Hold
            | AiBehaviour::Silent => {
                let extra = extra.clone();
                let (tx, rx) = mpsc::channel(16);
                let state = Arc::clone(&self);
                tokio::spawn(async move {
                    if tx.send(Ok(sse_event(0))).await.is_err() {
                        return;
                    }
                    match behaviour {
                        AiBehaviour::ResetMidStream => {
                            let _ = tx.send(Err(std::io::Error::other("reset"))).await;
                            return;
                        }
                        AiBehaviour::Hold => {
                            let released = state.release.notified();
                            tokio::select! {
                                _ = released => {}
                                _ = tx.closed() => return,
                            }
                        }
                        AiBehaviour::Silent => {
                            tx.closed().await;
                            return;
                        }
                        _ => {}
                    }
                    for n in 1..events {
                        tokio::time::sleep(gap).await;
                        if tx.send(Ok(sse_event(n))).await.is_err() {
                            return;
                        }
                    }
                    let _ = tx.send(Ok(Bytes::from_static(b"data: [DONE]\n\n"))).await;
                });
                let mut r = Response::new(SimBody {
                    fixed: None,
                    stream: Some(rx),
                });
                r.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("text/event-stream"),
                );
                r.headers_mut()
                    .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
                for (k, v) in extra {
                    r.headers_mut().append(k, v);
                }
                r
            }
        };
        let mut r = r;
        if r.status() == StatusCode::TOO_MANY_REQUESTS {
            for (k, v) in extra {
                r.headers_mut().append(k, v);
            }
        }
        Ok(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn form_values_decode() {
        assert_eq!(
            form_value(b"a=1&refresh_token=x%2By+z", "refresh_token").as_deref(),
            Some("x+y z")
        );
        assert_eq!(form_value(b"a=1", "refresh_token"), None);
        assert_eq!(form_decode("%"), "%");
        assert_eq!(form_decode("%4"), "%4");
    }

    #[test]
    fn jwt_round_trip() {
        let t = make_jwt("alice", 123, 0);
        assert_eq!(jwt_claims(&t), Some(("alice".to_string(), 123, 0)));
        assert_eq!(
            crate::refresh::provider::jwt_expiry(&t),
            Some(UNIX_EPOCH + Duration::from_secs(123))
        );
    }
}
