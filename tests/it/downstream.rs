//! Client connections byte by byte: pipelined requests,
//! `Expect: 100-continue`, refused requests with their body unread,
//! HTTP/1.0 and HEAD framing, request smuggling shapes, the idle timeout
//! draining on shutdown, and clients that leave before their answer.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use tokenpool::sim::AiBehaviour;

use crate::harness::{eventually, metric, Setup, CLIENT_KEY};
use crate::raw::Raw;

/// An HTTP/1.1 request with the client's key: `line` is the method and
/// target, `headers` whole lines (framing included), `body` as it goes.
fn keyed(line: &str, headers: &str, body: &str) -> String {
    format!(
        "{line} HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {CLIENT_KEY}\r\n{headers}\r\n{body}"
    )
}

/// A POST of `body` framed by its length, with `extra` header lines.
fn post(path: &str, extra: &str, body: &str) -> String {
    let headers = format!("content-length: {}\r\n{extra}", body.len());
    keyed(&format!("POST {path}"), &headers, body)
}

#[tokio::test]
async fn pipelined_requests_are_answered_in_order_on_one_connection() {
    let s = Setup::new(&[("a", "personal")], "", "").await;
    let p = s.proxy().await;
    let mut c = Raw::connect(p.addr).await;
    // Three requests in one write: a length body, none, and chunks.
    let all = [
        post("/echo?1", "", "hello"),
        keyed("GET /echo?2", "", ""),
        keyed(
            "POST /echo?3",
            "transfer-encoding: chunked\r\n",
            "4\r\nabcd\r\n6\r\nefghij\r\n0\r\n\r\n",
        ),
    ]
    .concat();
    c.send(all.as_bytes()).await;
    for (method, bytes) in [("POST", 5), ("GET", 0), ("POST", 10)] {
        let a = c.answer(false).await;
        assert_eq!(a.status(), 200, "{a:?}");
        let v = a.json();
        assert_eq!(
            (v["method"].as_str(), v["body_bytes"].as_u64()),
            (Some(method), Some(bytes))
        );
        assert!(a.header("date").is_some(), "every answer is dated: {a:?}");
        assert_eq!(a.header("connection"), None, "{a:?}");
    }
    // And the connection still serves.
    c.send(post("/echo", "connection: close\r\n", "x").as_bytes())
        .await;
    let a = c.answer(false).await;
    assert_eq!((a.status(), a.header("connection")), (200, Some("close")));
    assert!(c.closed().await);
}

#[tokio::test]
async fn expect_100_continue_is_answered_only_when_the_body_is_wanted() {
    let s = Setup::new(&[("a", "personal")], "", "").await;
    let p = s.proxy().await;
    let mut c = Raw::connect(p.addr).await;
    let head = keyed(
        "POST /echo",
        "expect: 100-continue\r\ncontent-length: 4\r\n",
        "",
    );
    c.send(head.as_bytes()).await;
    let interim = c.answer(true).await;
    assert_eq!(interim.status(), 100, "{interim:?}");
    c.send(b"body").await;
    let a = c.answer(false).await;
    assert_eq!(a.status(), 200, "{a:?}");
    assert_eq!(a.json()["body_bytes"], 4);
    let seen = s.sim.seen();
    let (_, headers) = seen.iter().rfind(|(path, _)| path == "/echo").unwrap();
    assert!(
        !headers.contains_key("expect"),
        "the proxy answered it: {headers:?}"
    );

    // With a wrong key the body is never asked for: a 401, then the close.
    let mut c = Raw::connect(p.addr).await;
    c.send(b"POST /echo HTTP/1.1\r\nhost: x\r\nauthorization: Bearer wrong\r\nexpect: 100-continue\r\ncontent-length: 4\r\n\r\n")
        .await;
    let a = c.answer(false).await;
    assert_eq!((a.status(), a.header("connection")), (401, Some("close")));
    assert!(c.closed().await);
}

#[tokio::test]
async fn a_refused_request_with_its_body_unread_still_gets_its_answer() {
    let s = Setup::new(&[("a", "personal")], "", "").await;
    let p = s.proxy().await;
    // A wrong key and 2 MB of body on the way: the proxy answers at once
    // and closes, but reads the body away first, so the answer is not
    // lost to a reset.
    let mut c = Raw::connect(p.addr).await;
    let body = vec![b'x'; 2 * 1024 * 1024];
    c.send(format!("POST /echo HTTP/1.1\r\nhost: x\r\nauthorization: Bearer wrong\r\ncontent-length: {}\r\n\r\n", body.len()).as_bytes())
        .await;
    let (mut read, mut write) = c.stream.into_split();
    let writer = tokio::spawn(async move {
        // Fails once the proxy stops reading: that is expected.
        let _ = write.write_all(&body[..256 * 1024]).await;
        write
    });
    let mut got = Vec::new();
    let end = tokio::time::timeout(Duration::from_secs(10), read.read_to_end(&mut got))
        .await
        .expect("the proxy closes within 10 s");
    let text = String::from_utf8_lossy(&got);
    // Closing with the body unread would reset the connection, and a
    // reset may throw away the answer before the client reads it.
    assert!(
        end.is_ok(),
        "a clean end, not a reset: {end:?} after {text}"
    );
    assert!(text.starts_with("HTTP/1.1 401"), "{text}");
    assert!(text.contains("connection: close"), "{text}");
    assert!(text.contains("x-tokenpool-error: unauthorized"), "{text}");
    let _ = writer.await;

    // A refused request whose small body is all here keeps its connection.
    let mut c = Raw::connect(p.addr).await;
    c.send(b"POST /echo HTTP/1.1\r\nhost: x\r\ncontent-length: 3\r\n\r\nabc")
        .await;
    let a = c.answer(false).await;
    assert_eq!((a.status(), a.header("connection")), (401, None));
    c.send(post("/echo", "", "abc").as_bytes()).await;
    assert_eq!(c.answer(false).await.status(), 200);
    assert_eq!(s.sim.total_ai_calls(), 0);
}

#[tokio::test]
async fn http_1_0_and_head_answers_are_framed_for_their_request() {
    let s = Setup::new(&[("a", "personal")], "", "").await;
    let p = s.proxy().await;

    // HTTP/1.0 without keep-alive: a streamed answer runs to the close,
    // unchunked.
    let mut c = Raw::connect(p.addr).await;
    c.send(
        format!("GET /ai/multi-agent HTTP/1.0\r\nauthorization: Bearer {CLIENT_KEY}\r\n\r\n")
            .as_bytes(),
    )
    .await;
    let a = c.answer(false).await;
    assert_eq!(a.status(), 200, "{a:?}");
    assert_eq!(a.header("transfer-encoding"), None, "{a:?}");
    // HTTP/1.0 closes unless keep-alive is said; the body ran to the close.
    assert_ne!(a.header("connection"), Some("keep-alive"), "{a:?}");
    assert!(a.head.starts_with("HTTP/1.0 200") || a.head.starts_with("HTTP/1.1 200"));
    let text = String::from_utf8_lossy(&a.body);
    assert!(text.matches("data: ").count() >= 2, "{text}");
    assert!(!text.contains("\r\n0\r\n"), "no chunk framing: {text}");

    // HTTP/1.0 with keep-alive: said back when the answer's length is
    // known (the proxy's own 401 here; the simulator chunks its answers),
    // and the connection serves on.
    let mut c = Raw::connect(p.addr).await;
    for _ in 0..2 {
        c.send(
            b"GET /echo HTTP/1.0\r\nconnection: keep-alive\r\nauthorization: Bearer wrong\r\n\r\n",
        )
        .await;
        let a = c.answer(false).await;
        assert_eq!(
            (a.status(), a.header("connection")),
            (401, Some("keep-alive")),
            "{a:?}"
        );
        assert_eq!(a.json()["error"]["code"], "unauthorized");
    }
    c.send(format!("GET /echo HTTP/1.0\r\nconnection: keep-alive\r\nauthorization: Bearer {CLIENT_KEY}\r\n\r\n").as_bytes())
        .await;
    let a = c.answer(false).await;
    assert_eq!(
        (a.status(), a.header("connection")),
        (200, Some("close")),
        "{a:?}"
    );
    assert_eq!(a.json()["method"], "GET");

    // HEAD: the headers a GET would get, no body; the next answer follows
    // straight after.
    let mut c = Raw::connect(p.addr).await;
    c.send(keyed("HEAD /echo", "", "").as_bytes()).await;
    let a = c.answer(true).await;
    assert_eq!(a.status(), 200, "{a:?}");
    c.send(post("/echo", "", "abc").as_bytes()).await;
    let a = c.answer(false).await;
    assert_eq!(a.json()["body_bytes"], 3, "{a:?}");
}

#[tokio::test]
async fn smuggling_shapes_are_refused_or_end_their_connection() {
    let s = Setup::new(&[("a", "personal")], "", "").await;
    let p = s.proxy().await;
    // A transfer coding the proxy cannot frame: 400, then the close.
    let mut c = Raw::connect(p.addr).await;
    c.send(keyed("POST /echo", "transfer-encoding: gzip\r\n", "abc").as_bytes())
        .await;
    // hyper refuses it before a request exists: its bare 400, then the close.
    let a = c.answer(false).await;
    assert_eq!(a.status(), 400, "{a:?}");
    assert!(c.closed().await);

    // Chunks and a length: read by its chunks, and the connection ends,
    // so what the length would have framed never becomes a request.
    let mut c = Raw::connect(p.addr).await;
    let smuggled = keyed("GET /smuggled", "", "");
    let doubly = keyed(
        "POST /echo",
        "content-length: 4\r\ntransfer-encoding: chunked\r\n",
        &format!("3\r\nabc\r\n0\r\n\r\n{smuggled}"),
    );
    c.send(doubly.as_bytes()).await;
    let a = c.answer(false).await;
    assert_eq!(
        (a.status(), a.header("connection")),
        (200, Some("close")),
        "{a:?}"
    );
    assert_eq!(a.json()["body_bytes"], 3);
    assert!(c.closed().await);
    assert!(
        !s.sim.seen().iter().any(|(path, _)| path == "/smuggled"),
        "nothing after a doubly framed request is served"
    );

    // Content-Lengths that disagree: 400.
    let mut c = Raw::connect(p.addr).await;
    let lengths = "content-length: 3\r\ncontent-length: 30\r\n";
    c.send(keyed("POST /echo", lengths, "abc").as_bytes()).await;
    assert_eq!(c.answer(false).await.status(), 400);
}

#[tokio::test]
async fn idle_connections_close_after_the_header_timeout_and_at_shutdown() {
    let s = Setup::new(&[("a", "personal")], "", "").await;
    s.write_server_line(&[("a", "personal")], "header_read_timeout = \"1s\"");
    let p = s.proxy().await;
    let mut c = Raw::connect(p.addr).await;
    c.send(post("/echo", "", "abc").as_bytes()).await;
    assert_eq!(c.answer(false).await.status(), 200);
    // Nothing more is sent: the proxy closes the connection by itself
    // (Raw gives up after 10 s).
    assert!(c.closed().await);

    // At shutdown an idle connection closes at once, well inside the
    // 10 s grace, and a request in flight gets its answer first.
    let s = Setup::new(&[("a", "personal")], "", "").await;
    let p = s.proxy().await;
    let mut idle = Raw::connect(p.addr).await;
    idle.send(post("/echo", "", "abc").as_bytes()).await;
    assert_eq!(idle.answer(false).await.status(), 200);
    let mut busy = Raw::connect(p.addr).await;
    busy.send(keyed("GET /ai/multi-agent", "", "").as_bytes())
        .await;
    let stopping = tokio::spawn(p.stop());
    // Well before the 10 s header timeout would close it anyway.
    let closed = tokio::time::timeout(Duration::from_secs(5), idle.closed()).await;
    assert!(
        closed.expect("an idle connection closes at shutdown, not at its timeout"),
        "an idle connection closes at shutdown"
    );
    let a = busy.answer(false).await;
    assert_eq!(a.status(), 200);
    assert!(String::from_utf8_lossy(&a.body).contains("data: "));
    assert!(
        busy.closed().await,
        "a draining connection closes after its answer"
    );
    tokio::time::timeout(Duration::from_secs(8), stopping)
        .await
        .expect("shutdown does not wait out the grace period")
        .unwrap();
}

#[tokio::test]
async fn a_client_that_leaves_stops_the_work_for_it() {
    let s = Setup::new(&[("a", "personal")], "", "").await;
    // Long enough that only the client leaving can end these requests.
    s.write_replacing(
        &[("a", "personal")],
        "idle_timeout = \"5s\"",
        "idle_timeout = \"60s\"",
    );
    let p = s.proxy().await;
    let ai = post("/ai/multi-agent", "", "{}");
    let inflight = || async { metric(&p.metrics().await, "tokenpool_inflight_requests") };

    // Waiting for an upstream that never answers, then gone.
    s.sim.set_ai("a", AiBehaviour::HangBeforeHeaders);
    let mut c = Raw::connect(p.addr).await;
    c.send(ai.as_bytes()).await;
    eventually(
        "the upstream has the request",
        Duration::from_secs(5),
        || async { s.sim.ai_calls("a") == 1 },
    )
    .await;
    assert_eq!(inflight().await, 1.0);
    drop(c);
    eventually(
        "the request is given up",
        Duration::from_secs(5),
        || async { inflight().await == 0.0 },
    )
    .await;
    let m = p.metrics().await;
    assert_eq!(
        metric(&m, "tokenpool_requests_total{outcome=\"client_error\"}"),
        1.0,
        "{m}"
    );

    // In a stream the upstream has gone quiet in, then gone.
    s.sim.set_ai("a", AiBehaviour::Silent);
    let mut c = Raw::connect(p.addr).await;
    c.send(ai.as_bytes()).await;
    let head = c.line().await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(inflight().await, 1.0);
    drop(c);
    eventually("the stream is given up", Duration::from_secs(5), || async {
        inflight().await == 0.0
    })
    .await;
    s.sim.set_ai("a", AiBehaviour::Ok);
    assert_eq!(p.ai_text().await.0, 200, "the proxy serves on");
}
