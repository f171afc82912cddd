//! The proxy end to end: client auth, body limits, header rules, every row
//! of `docs/tokens.md`, tier order, round-robin, Retry-After, recovery and
//! streaming.

use std::time::Duration;

use tokenpool::pool::{Reason, TokenState};
use tokenpool::sim::AiBehaviour;

use crate::harness::{eventually, metric, rt, Setup, CLIENT_KEY};

const TWO_PERSONAL: &[(&str, &str)] = &[("a", "personal"), ("b", "personal")];

#[tokio::test]
async fn streams_sse_with_the_pool_bearer_and_strips_client_headers() {
    let s = Setup::new(&[("a", "personal")], "", "").await;
    let p = s.proxy().await;
    let r = p
        .client
        .post(p.url("/ai/multi-agent?trace=1"))
        .header("x-api-key", CLIENT_KEY)
        .header("connection", "keep-alive, x-hop-secret")
        .header("x-hop-secret", "1")
        .header("x-forwarded-for", "203.0.113.9")
        .header("via", "1.1 corp-lb")
        .header("x-warp-client-version", "client-chosen")
        .body("payload")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "text/event-stream");
    let response_headers = format!("{:?}", r.headers());
    let body = r.text().await.unwrap();
    assert!(body.starts_with("data: "), "{body}");
    assert!(body.ends_with("data: [DONE]\n\n"), "{body}");
    assert_eq!(body.matches("data: ").count(), 6);

    let seen = s.sim.seen();
    let (path, headers) = seen.iter().find(|(p, _)| p == "/ai/multi-agent").unwrap();
    assert_eq!(path, "/ai/multi-agent");
    let auth = headers["authorization"].to_str().unwrap();
    assert!(auth.starts_with("Bearer ey"), "upstream got a JWT bearer");
    assert!(!auth.contains(CLIENT_KEY));
    assert_eq!(headers["x-warp-client-version"], "sim-test");
    for gone in [
        "x-api-key",
        "x-hop-secret",
        "x-forwarded-for",
        "via",
        "forwarded",
    ] {
        assert!(headers.get(gone).is_none(), "{gone} reached the upstream");
    }
    let jwt = auth.trim_start_matches("Bearer ");
    assert!(
        !body.contains(jwt) && !response_headers.contains(jwt),
        "access token reached the client"
    );
    assert!(!response_headers.contains(&rt("a")));
}

#[tokio::test]
async fn client_auth_accepts_bearer_or_x_api_key_only() {
    let s = Setup::new(&[("a", "personal")], "", "").await;
    let p = s.proxy().await;
    let send = |auth: Option<(&'static str, String)>| {
        let mut req = p.client.post(p.url("/ai/multi-agent")).body("x");
        if let Some((name, value)) = auth {
            req = req.header(name, value);
        }
        req.send()
    };
    for auth in [
        None,
        Some(("authorization", "Bearer wrong".to_string())),
        Some(("authorization", CLIENT_KEY.to_string())),
        Some(("x-api-key", format!("{CLIENT_KEY}x"))),
        Some(("x-api-key", String::new())),
    ] {
        let r = send(auth.clone()).await.unwrap();
        assert_eq!(r.status(), 401, "{auth:?}");
        assert_eq!(r.headers()["x-tokenpool-error"], "unauthorized");
        let v: serde_json::Value = r.json_or_panic().await;
        assert_eq!(v["error"]["code"], "unauthorized");
        assert_eq!(v["error"]["type"], "tokenpool_error");
    }
    assert_eq!(
        s.sim.total_ai_calls(),
        0,
        "rejected requests never reach the upstream"
    );
    for auth in [
        ("authorization", format!("Bearer {CLIENT_KEY}")),
        ("authorization", format!("bearer {CLIENT_KEY}")),
        ("x-api-key", CLIENT_KEY.to_string()),
    ] {
        assert_eq!(
            send(Some(auth.clone())).await.unwrap().status(),
            200,
            "{auth:?}"
        );
    }
    let m = p.metrics().await;
    assert_eq!(
        metric(&m, "tokenpool_requests_total{outcome=\"rejected\"}"),
        5.0
    );
    assert_eq!(
        metric(&m, "tokenpool_requests_total{outcome=\"success\"}"),
        3.0
    );
}

trait JsonOrPanic {
    async fn json_or_panic(self) -> serde_json::Value;
}

impl JsonOrPanic for reqwest::Response {
    async fn json_or_panic(self) -> serde_json::Value {
        let text = self.text().await.unwrap();
        serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text}"))
    }
}

#[tokio::test]
async fn oversized_bodies_get_413_declared_or_streamed() {
    let s = Setup::new(&[("a", "personal")], "", "").await;
    let p = s.proxy().await;
    let big = vec![b'x'; 4097];
    let r = p
        .client
        .post(p.url("/echo"))
        .bearer_auth(CLIENT_KEY)
        .body(big.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    assert_eq!(r.headers()["x-tokenpool-error"], "request_too_large");
    // Without a Content-Length (chunked), the limit applies while reading.
    let head = format!(
        "POST /echo HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {CLIENT_KEY}\r\ntransfer-encoding: chunked\r\n\r\n"
    );
    let chunk = format!("bb8\r\n{}\r\n", "x".repeat(3000));
    let answer = raw_exchange(
        p.addr,
        &[
            head.as_bytes(),
            chunk.as_bytes(),
            chunk.as_bytes(),
            b"0\r\n\r\n",
        ],
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    // At the limit it goes through, whole.
    let r = p
        .client
        .post(p.url("/echo"))
        .bearer_auth(CLIENT_KEY)
        .body(vec![b'x'; 4096])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v = r.json_or_panic().await;
    assert_eq!(v["body_bytes"], 4096);
    assert_eq!(s.sim.total_ai_calls(), 0);
}

#[tokio::test]
async fn a_body_in_several_chunks_goes_upstream_whole() {
    let s = Setup::new(&[("a", "personal")], "", "").await;
    let p = s.proxy().await;
    // Each chunk reaches the proxy as a frame of its own: the body is
    // joined from three pieces.
    let head = format!(
        "POST /echo HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {CLIENT_KEY}\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n"
    );
    let answer = raw_exchange(
        p.addr,
        &[
            head.as_bytes(),
            b"3e8\r\n",
            &[b'x'; 1000],
            b"\r\n",
            b"3e8\r\n",
            &[b'y'; 1000],
            b"\r\n",
            b"a\r\n0123456789\r\n0\r\n\r\n",
        ],
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("\"body_bytes\":2010"), "{answer}");
}

/// Writes raw bytes to the proxy and reads its answer until it closes or
/// goes quiet.
pub async fn raw_exchange(addr: std::net::SocketAddr, parts: &[&[u8]]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    for part in parts {
        // The peer may close early (it already answered): that is fine.
        if stream.write_all(part).await.is_err() {
            break;
        }
    }
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(Duration::from_secs(3), stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
        }
        if out.windows(4).any(|w| w == b"\r\n\r\n") && out.len() > 12 {
            // Headers are in; give the body a moment, then stop.
            if let Ok(Ok(n)) =
                tokio::time::timeout(Duration::from_millis(200), stream.read(&mut buf)).await
            {
                out.extend_from_slice(&buf[..n]);
            }
            break;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn quota_429_cools_the_token_and_fails_over_within_the_tier() {
    let s = Setup::new(TWO_PERSONAL, "", "").await;
    s.sim.set_ai("a", AiBehaviour::Quota);
    let p = s.proxy().await;
    for _ in 0..4 {
        let (status, _, body) = p.ai_text().await;
        assert_eq!(status, 200, "{body}");
    }
    assert_eq!(s.sim.ai_calls("a"), 1, "a cooling token is not tried again");
    assert_eq!(s.sim.ai_calls("b"), 4);
    assert_eq!(
        p.state("a"),
        (TokenState::CoolingDown, Some(Reason::QuotaExhausted))
    );
    let m = p.metrics().await;
    assert_eq!(
        metric(
            &m,
            "tokenpool_failovers_total{reason=\"quota_exhausted\",tier=\"personal\"}"
        ),
        1.0
    );
    assert_eq!(metric(&m, "tokenpool_token_failures_total{reason=\"quota_exhausted\",tier=\"personal\",token=\"a\"}"), 1.0);
    assert_eq!(
        metric(
            &m,
            "tokenpool_tokens{state=\"cooling_down\",tier=\"personal\"}"
        ),
        1.0
    );
    let pool = p.pool().await;
    let a = &pool["tokens"][0];
    assert_eq!(a["state"], "cooling_down");
    assert_eq!(a["reason"], "quota_exhausted");
    assert!(a["cooldown_until"].is_string());
}

#[tokio::test]
async fn rate_limit_honours_retry_after_and_the_token_recovers_by_itself() {
    let s = Setup::new(TWO_PERSONAL, "", "").await;
    s.sim.set_ai("a", AiBehaviour::RateLimited(Some(1)));
    let p = s.proxy().await;
    assert_eq!(p.ai_text().await.0, 200);
    assert_eq!(
        p.state("a"),
        (TokenState::CoolingDown, Some(Reason::RateLimited))
    );
    s.sim.set_ai("a", AiBehaviour::Ok);
    s.sim.set_ai("b", AiBehaviour::Quota);
    // Once the 1 s cooldown ends, a serves again with nobody's help.
    eventually("a back in rotation", Duration::from_secs(5), || async {
        p.ai_text().await.0 == 200 && s.sim.ai_calls("a") >= 2
    })
    .await;
    assert_eq!(p.state("a").0, TokenState::Active);
}

#[tokio::test]
async fn unauthorized_refreshes_and_retries_once_on_the_same_token() {
    let s = Setup::new(TWO_PERSONAL, "", "").await;
    let p = s.proxy().await;
    // Warm both tokens, so a failover would find a valid-looking JWT too.
    assert_eq!(p.ai_text().await.0, 200);
    assert_eq!(p.ai_text().await.0, 200);
    let a_before = (s.sim.refresh_calls("a"), s.sim.ai_calls("a"));
    let b_before = (s.sim.refresh_calls("b"), s.sim.ai_calls("b"));
    // Every JWT issued so far now gets 401: the proxy must refresh and retry.
    s.sim.invalidate_issued_jwts();
    let calls_before = s.sim.total_ai_calls();
    assert_eq!(p.ai_text().await.0, 200);
    assert_eq!(
        s.sim.total_ai_calls(),
        calls_before + 2,
        "one 401, one retry"
    );
    let refreshed = s.sim.refresh_calls("a") > a_before.0 || s.sim.refresh_calls("b") > 0;
    assert!(refreshed);
    // The retry went to the same token, refreshed once between the two
    // calls; the other token saw nothing. (The simulator counts an account's
    // calls only once its JWT is accepted, so the 401 is not in ai_calls.)
    let delta_a = (
        s.sim.refresh_calls("a") - a_before.0,
        s.sim.ai_calls("a") - a_before.1,
    );
    let delta_b = (
        s.sim.refresh_calls("b") - b_before.0,
        s.sim.ai_calls("b") - b_before.1,
    );
    assert!(
        (delta_a == (1, 1) && delta_b == (0, 0)) || (delta_b == (1, 1) && delta_a == (0, 0)),
        "a {delta_a:?}, b {delta_b:?}"
    );
    assert_eq!(p.state("a"), (TokenState::Active, None));
    assert_eq!(p.state("b"), (TokenState::Active, None));
}

#[tokio::test]
async fn a_second_401_is_a_failure_and_moves_on() {
    let s = Setup::new(
        &[("a", "personal"), ("b", "shared")],
        "failure_threshold = 2",
        "",
    )
    .await;
    s.sim.set_ai("a", AiBehaviour::Unauthorized);
    let p = s.proxy().await;
    let (status, _, _) = p.ai_text().await;
    assert_eq!(status, 200, "served by b");
    assert_eq!(s.sim.ai_calls("a"), 2, "401, refresh, one retry");
    assert_eq!(s.sim.refresh_calls("a"), 2);
    let pool = p.pool().await;
    assert_eq!(pool["tokens"][0]["consecutive_failures"], 1);
    assert_eq!(p.ai_text().await.0, 200);
    assert_eq!(
        p.state("a"),
        (TokenState::Disabled, Some(Reason::Unauthorized))
    );
    let m = p.metrics().await;
    assert_eq!(
        metric(
            &m,
            "tokenpool_token_failures_total{reason=\"unauthorized\",tier=\"personal\",token=\"a\"}"
        ),
        2.0
    );
    assert_eq!(
        metric(
            &m,
            "tokenpool_tier_fallbacks_total{from_tier=\"personal\",to_tier=\"shared\"}"
        ),
        2.0
    );
}

#[tokio::test]
async fn forbidden_fails_over_but_an_html_403_passes_through() {
    let s = Setup::new(TWO_PERSONAL, "", "").await;
    s.sim.set_ai("a", AiBehaviour::Blocked);
    let p = s.proxy().await;
    assert_eq!(p.ai_text().await.0, 200);
    assert_eq!(s.sim.ai_calls("a"), 1);
    assert_eq!(p.pool().await["tokens"][0]["consecutive_failures"], 1);
    assert_eq!(p.pool().await["tokens"][0]["last_error"], "forbidden");

    let s = Setup::new(TWO_PERSONAL, "", "").await;
    s.sim.set_ai("a", AiBehaviour::HtmlBlock);
    s.sim.set_ai("b", AiBehaviour::HtmlBlock);
    let p = s.proxy().await;
    let (status, headers, body) = p.ai_text().await;
    assert_eq!(status, 403);
    assert!(body.contains("<html>"), "{body}");
    assert!(
        headers.get("x-tokenpool-error").is_none(),
        "the upstream's page, as it was"
    );
    assert_eq!(
        s.sim.total_ai_calls(),
        1,
        "a network block is not retried on another token"
    );
    assert_eq!(p.pool().await["tokens"][0]["consecutive_failures"], 0);
}

#[tokio::test]
async fn server_errors_pass_through_without_blame() {
    let s = Setup::new(TWO_PERSONAL, "failure_threshold = 1", "").await;
    s.sim.set_ai("a", AiBehaviour::ServerError);
    s.sim.set_ai("b", AiBehaviour::ServerError);
    let p = s.proxy().await;
    for _ in 0..4 {
        let (status, headers, _) = p.ai_text().await;
        assert_eq!(status, 500);
        assert!(headers.get("x-tokenpool-error").is_none());
    }
    assert_eq!(s.sim.total_ai_calls(), 4, "no retries on 5xx");
    assert_eq!(p.state("a"), (TokenState::Active, None));
    assert_eq!(p.state("b"), (TokenState::Active, None));
    let m = p.metrics().await;
    assert_eq!(
        metric(
            &m,
            "tokenpool_upstream_requests_total{code=\"500\",tier=\"personal\"}"
        ),
        4.0
    );
    assert_eq!(
        metric(&m, "tokenpool_requests_total{outcome=\"upstream_error\"}"),
        4.0
    );
}

#[tokio::test]
async fn unreachable_upstream_is_502_and_silence_is_504() {
    let s = Setup::new(&[("a", "personal")], "", "").await;
    // A port nobody listens on: bind one, then let it go.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    s.write_replacing(
        &[("a", "personal")],
        &format!("url = \"{}\"", s.sim.url()),
        &format!("url = \"http://{closed}\""),
    );
    let p = s.proxy().await;
    let (status, headers, body) = p.ai_text().await;
    assert_eq!(status, 502, "{body}");
    assert_eq!(headers["x-tokenpool-error"], "upstream_unreachable");
    assert_eq!(p.state("a"), (TokenState::Active, None));
    assert!(
        !body.contains(&closed.to_string()),
        "no internal address in the error: {body}"
    );

    let s = Setup::new(&[("a", "personal")], "", "").await;
    s.write_replacing(
        &[("a", "personal")],
        "idle_timeout = \"5s\"",
        "idle_timeout = \"500ms\"",
    );
    s.sim.set_ai("a", AiBehaviour::HangBeforeHeaders);
    let p = s.proxy().await;
    let (status, headers, _) = p.ai_text().await;
    assert_eq!(status, 504);
    assert_eq!(headers["x-tokenpool-error"], "upstream_timeout");
    assert_eq!(p.state("a"), (TokenState::Active, None));
}

#[tokio::test]
async fn when_attempts_run_out_the_client_gets_the_last_answer() {
    let tokens = &[("a", "personal"), ("b", "personal"), ("c", "personal")];
    let s = Setup::new(tokens, "max_attempts = 2", "").await;
    for (name, _) in tokens {
        s.sim.set_ai(name, AiBehaviour::Quota);
    }
    let p = s.proxy().await;
    let (status, headers, body) = p.ai_text().await;
    assert_eq!(status, 429);
    assert!(body.contains("No remaining quota"), "{body}");
    assert!(headers.get("x-tokenpool-error").is_none());
    assert_eq!(s.sim.total_ai_calls(), 2, "max_attempts = 2");
}

#[tokio::test]
async fn no_token_available_is_503_with_retry_after() {
    let s = Setup::new(TWO_PERSONAL, "", "").await;
    s.sim.set_ai("a", AiBehaviour::RateLimited(Some(30)));
    s.sim.set_ai("b", AiBehaviour::RateLimited(Some(20)));
    let p = s.proxy().await;
    let (status, _, _) = p.ai_text().await;
    assert_eq!(status, 429, "both tried: the last answer");
    let (status, headers, body) = p.ai_text().await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(headers["x-tokenpool-error"], "no_token_available");
    let retry_after: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!(
        (19..=20).contains(&retry_after),
        "earliest return is b in ~20 s, got {retry_after}"
    );
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["error"]["code"], "no_token_available");
    let m = p.metrics().await;
    assert_eq!(
        metric(&m, "tokenpool_requests_total{outcome=\"no_token\"}"),
        1.0
    );
}

#[tokio::test]
async fn tiers_are_tried_in_order_with_round_robin_inside() {
    let tokens = &[
        ("p1", "personal"),
        ("p2", "personal"),
        ("s1", "shared"),
        ("n1", "anonymous"),
    ];
    let s = Setup::new(tokens, "", "").await;
    let p = s.proxy().await;
    for _ in 0..10 {
        assert_eq!(p.ai_text().await.0, 200);
    }
    assert_eq!((s.sim.ai_calls("p1"), s.sim.ai_calls("p2")), (5, 5));
    assert_eq!(s.sim.ai_calls("s1") + s.sim.ai_calls("n1"), 0);
    s.sim.set_ai("p1", AiBehaviour::Quota);
    s.sim.set_ai("p2", AiBehaviour::Quota);
    for _ in 0..3 {
        assert_eq!(p.ai_text().await.0, 200);
    }
    assert_eq!(s.sim.ai_calls("s1"), 3);
    assert_eq!(s.sim.ai_calls("n1"), 0);
    let m = p.metrics().await;
    assert_eq!(
        metric(
            &m,
            "tokenpool_selections_total{tier=\"shared\",token=\"s1\"}"
        ),
        3.0
    );
    assert!(
        metric(
            &m,
            "tokenpool_tier_fallbacks_total{from_tier=\"personal\",to_tier=\"shared\"}"
        ) >= 2.0
    );
}

#[tokio::test]
async fn the_first_event_arrives_before_the_upstream_sends_the_last() {
    let s = Setup::new(&[("a", "personal")], "", "").await;
    s.sim.set_ai("a", AiBehaviour::Hold);
    let p = s.proxy().await;
    let mut r = p.ai().await;
    assert_eq!(r.status(), 200);
    let first = tokio::time::timeout(Duration::from_secs(5), r.chunk())
        .await
        .expect("first event arrives while the upstream still holds the rest")
        .unwrap()
        .unwrap();
    assert!(first.starts_with(b"data: "), "{first:?}");
    assert!(!String::from_utf8_lossy(&first).contains("[DONE]"));
    s.sim.release_streams();
    let mut rest = Vec::new();
    while let Some(chunk) = r.chunk().await.unwrap() {
        rest.extend_from_slice(&chunk);
    }
    assert!(String::from_utf8_lossy(&rest).ends_with("data: [DONE]\n\n"));
}

#[tokio::test]
async fn a_stream_silent_past_idle_timeout_is_cut() {
    let s = Setup::new(&[("a", "personal")], "", "").await;
    s.write_replacing(
        &[("a", "personal")],
        "idle_timeout = \"5s\"",
        "idle_timeout = \"300ms\"",
    );
    s.sim.set_ai("a", AiBehaviour::Silent);
    let p = s.proxy().await;
    let mut r = p.ai().await;
    assert_eq!(r.status(), 200);
    assert!(r.chunk().await.unwrap().is_some());
    let end = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match r.chunk().await {
                Ok(Some(_)) => continue,
                other => return other.is_err(),
            }
        }
    })
    .await
    .expect("the proxy ends a silent stream");
    assert!(end, "the client sees the stream break, not a clean end");
    eventually("inflight back to 0", Duration::from_secs(2), || async {
        metric(&p.metrics().await, "tokenpool_inflight_requests") == 0.0
    })
    .await;
}

#[tokio::test]
async fn http2_cleartext_clients_are_served() {
    let s = Setup::new(&[("a", "personal")], "", "").await;
    let p = s.proxy().await;
    let client = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let r = client
        .post(p.url("/ai/multi-agent"))
        .bearer_auth(CLIENT_KEY)
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(r.version(), reqwest::Version::HTTP_2);
    assert_eq!(r.status(), 200);
    assert!(r.text().await.unwrap().ends_with("[DONE]\n\n"));
    // The body limit holds on HTTP/2 streams too.
    let r = client
        .post(p.url("/echo"))
        .bearer_auth(CLIENT_KEY)
        .body(vec![b'x'; 4097])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    assert_eq!(r.headers()["x-tokenpool-error"], "request_too_large");
}

/// `[upstream] routes` (here the Warp preset's own, `POST /ai/multi-agent`):
/// any other method or path is 404 `route_not_allowed` and never reaches
/// the upstream, however the path is spelled; a reload changes them.
#[tokio::test]
async fn only_routed_requests_reach_the_upstream() {
    let tokens = &[("a", "personal")];
    let s = Setup::new(tokens, "", "").await;
    let every = s.config(tokens, "", "");
    let preset = every.replace("routes = [\"* /*\"]\n", "");
    assert_ne!(preset, every, "the harness forwards every route");
    s.write(&preset);
    let p = s.proxy().await;
    let r = p
        .client
        .post(p.url("/ai/multi-agent"))
        .header("x-api-key", CLIENT_KEY)
        .header("x-http-method-override", "DELETE")
        .header("x-original-url", "/graphql/v2")
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let _ = r.text().await;
    // The route checked is the one served: no header asks for another.
    let seen = s.sim.seen();
    let (_, headers) = seen.iter().find(|(p, _)| p == "/ai/multi-agent").unwrap();
    assert!(headers.get("x-http-method-override").is_none());
    assert!(headers.get("x-original-url").is_none());
    // Raw bytes: a client library would resolve the dot segments itself.
    for (method, path) in [
        ("GET", "/ai/multi-agent"),
        ("POST", "/graphql/v2"),
        ("POST", "/ai/multi-agent/"),
        ("POST", "/ai/multi-agent/../../graphql/v2"),
        ("POST", "/ai/%2e%2e/graphql/v2"),
        ("POST", "/ai/multi-agent%2f..%2f..%2fgraphql/v2"),
        ("POST", "/ai/multi-agent/..;/graphql/v2"),
        ("DELETE", "/ai/multi-agent"),
    ] {
        let request = format!(
            "{method} {path} HTTP/1.1\r\nhost: x\r\nx-api-key: {CLIENT_KEY}\r\n\
             content-length: 1\r\nconnection: close\r\n\r\nx"
        );
        let answer = raw_exchange(p.addr, &[request.as_bytes()]).await;
        assert!(
            answer.starts_with("HTTP/1.1 404"),
            "{method} {path}: {answer}"
        );
        assert!(
            answer.contains("x-tokenpool-error: route_not_allowed"),
            "{method} {path}: {answer}"
        );
    }
    // A stranger is told 401 first: routes are for clients to learn.
    let r = p.client.post(p.url("/graphql/v2")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    // (The refresh call goes to the simulator too, not through the proxy.)
    let reached: Vec<String> = s
        .sim
        .seen()
        .into_iter()
        .map(|(path, _)| path)
        .filter(|path| path != "/proxy/token")
        .collect();
    assert_eq!(
        reached,
        ["/ai/multi-agent"],
        "nothing else reached the upstream"
    );
    assert_eq!(
        metric(
            &p.metrics().await,
            "tokenpool_requests_total{outcome=\"client_error\"}"
        ),
        8.0
    );
    // A target too long to join to the upstream's own path is refused
    // before anything (16 KiB at most).
    let long = format!(
        "POST /ai/multi-agent?q={} HTTP/1.1\r\nhost: x\r\nx-api-key: {CLIENT_KEY}\r\n\
         content-length: 0\r\nconnection: close\r\n\r\n",
        "a".repeat(16 * 1024)
    );
    let answer = raw_exchange(p.addr, &[long.as_bytes()]).await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer:.200}");

    // A reload widens them (a prefix), and what it allows goes through.
    s.write(&preset.replace(
        "idle_timeout",
        "routes = [\"POST /ai/*\", \"GET /x\"]\nidle_timeout",
    ));
    let r = p
        .client
        .post(p.admin_url("/admin/reload"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    for (method, path, status) in [
        (reqwest::Method::POST, "/ai/multi-agent", 200),
        (reqwest::Method::GET, "/x", 200),
        (reqwest::Method::GET, "/ai/multi-agent", 404),
    ] {
        let r = p
            .client
            .request(method.clone(), p.url(path))
            .header("x-api-key", CLIENT_KEY)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), status, "{method} {path}");
    }
}

/// `[[clients]]`: either of a client's keys works; it draws only from its
/// tiers (a personal token is never used for a client limited to
/// `shared`, even when it is the only one left) and calls only its own
/// routes; a key of `api_keys` keeps every tier and `[upstream] routes`.
#[tokio::test]
async fn a_client_draws_only_from_its_tiers_and_calls_only_its_routes() {
    let tokens = &[("a", "personal"), ("g", "shared")];
    let s = Setup::new(
        tokens,
        "",
        "[[clients]]\nname = \"team-a\"\nkeys = [\"team-a-key-1\", \"team-a-key-2\"]\n\
         tiers = [\"shared\"]\nroutes = [\"POST /ai/multi-agent\"]\n",
    )
    .await;
    let p = s.proxy().await;
    let ask = |key: &'static str, method: reqwest::Method, path: &str| {
        p.client
            .request(method, p.url(path))
            .header("x-api-key", key)
            .body("x")
            .send()
    };
    for key in ["team-a-key-1", "team-a-key-2"] {
        let r = ask(key, reqwest::Method::POST, "/ai/multi-agent")
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{key}");
        let _ = r.text().await;
    }
    let r = ask(CLIENT_KEY, reqwest::Method::POST, "/ai/multi-agent")
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let _ = r.text().await;
    let m = p.metrics().await;
    let picks = |tier: &str, token: &str| {
        metric(
            &m,
            &format!("tokenpool_selections_total{{tier=\"{tier}\",token=\"{token}\"}}"),
        )
    };
    assert_eq!(
        (picks("shared", "g"), picks("personal", "a")),
        (2.0, 1.0),
        "team-a on the shared token only; the plain key on the personal one first"
    );
    assert_eq!(
        metric(
            &m,
            "tokenpool_client_requests_total{client=\"team-a\",outcome=\"success\"}"
        ),
        2.0
    );

    // Its own routes, in place of [upstream]'s (which forward everything here).
    let r = ask("team-a-key-1", reqwest::Method::GET, "/x")
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(r.headers()["x-tokenpool-error"], "route_not_allowed");
    let r = ask(CLIENT_KEY, reqwest::Method::GET, "/x").await.unwrap();
    assert!(r.headers().get("x-tokenpool-error").is_none(), "{r:?}");
    assert!(s.sim.seen().iter().any(|(path, _)| path == "/x"));

    // With its only tier out, team-a gets 503 though a personal token serves.
    let r = p
        .client
        .post(p.admin_url("/admin/tokens/g/disable"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = ask("team-a-key-2", reqwest::Method::POST, "/ai/multi-agent")
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["x-tokenpool-error"], "no_token_available");
    let r = ask(CLIENT_KEY, reqwest::Method::POST, "/ai/multi-agent")
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}
