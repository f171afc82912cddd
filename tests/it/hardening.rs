//! Bad client input: malformed HTTP, huge headers, slow-loris clients,
//! slow bodies and HTTP/2 limits and idleness. Each gets a clear error or a
//! closed connection, and the proxy keeps serving everyone else.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use tokenpool::sim::AiBehaviour;

use crate::harness::{metric, read_to_break, Proxy, Setup, CLIENT_KEY};
use crate::proxy::raw_exchange;
use crate::raw::Raw;

async fn still_serving(p: &Proxy) {
    let (status, _, body) = p.ai_text().await;
    assert_eq!(status, 200, "the proxy still serves: {body}");
}

#[tokio::test]
async fn malformed_requests_get_400_and_harm_no_one() {
    let s = Setup::new(&[("a", "personal")], "", "").await;
    let p = s.proxy().await;
    let cases: &[&[u8]] = &[
        b"GARBAGE\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nbad header line\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: nope\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello",
        b"GET / HTTP/9.9\r\nHost: x\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
    ];
    for raw in cases {
        let answer = raw_exchange(p.addr, &[raw]).await;
        // hyper refuses these before a request exists: its own bare 400
        // (no JSON: there is no request to answer), then the close.
        assert!(
            answer.starts_with("HTTP/1.1 400") && answer.contains("connection: close"),
            "{:?} -> {answer:?}",
            String::from_utf8_lossy(raw)
        );
        still_serving(&p).await;
    }
    assert_eq!(
        s.sim.total_ai_calls(),
        cases.len() as u64,
        "nothing malformed reached the upstream"
    );
}

#[tokio::test]
async fn huge_headers_are_refused() {
    let s = Setup::new(&[("a", "personal")], "", "").await;
    let p = s.proxy().await;
    let big = format!(
        "GET /x HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {CLIENT_KEY}\r\nx-big: {}\r\n\r\n",
        "a".repeat(200 * 1024)
    );
    let answer = raw_exchange(p.addr, &[big.as_bytes()]).await;
    assert!(
        answer.starts_with("HTTP/1.1 431") && answer.contains("connection: close"),
        "{}",
        &answer[..answer.len().min(300)]
    );
    let many: String = (0..2000)
        .map(|i| format!("x-h{i}: {}\r\n", "v".repeat(40)))
        .collect();
    let raw = format!("GET /x HTTP/1.1\r\nHost: x\r\n{many}\r\n");
    let answer = raw_exchange(p.addr, &[raw.as_bytes()]).await;
    assert!(
        answer.starts_with("HTTP/1.1 431") && answer.contains("connection: close"),
        "{}",
        &answer[..answer.len().min(300)]
    );
    still_serving(&p).await;
    assert_eq!(s.sim.total_ai_calls(), 1);
}

#[tokio::test]
async fn slow_loris_clients_are_cut_off_and_others_are_served() {
    let s = Setup::new(&[("a", "personal")], "", "").await;
    s.write_server_line(&[("a", "personal")], "header_read_timeout = \"1s\"");
    let p = s.proxy().await;
    let mut slow = Vec::new();
    for _ in 0..50 {
        let mut c = TcpStream::connect(p.addr).await.unwrap();
        c.write_all(b"POST /ai/multi-agent HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        slow.push(c);
    }
    // While they dawdle, everyone else is served.
    still_serving(&p).await;
    let started = Instant::now();
    for c in &mut slow {
        let mut buf = [0u8; 256];
        // The proxy answers 408 or just closes, within about the timeout.
        let n = tokio::time::timeout(Duration::from_secs(5), c.read(&mut buf))
            .await
            .expect("the proxy gives up on a slow client")
            .unwrap_or(0);
        let text = String::from_utf8_lossy(&buf[..n]);
        assert!(n == 0 || text.starts_with("HTTP/1.1 408"), "{text}");
    }
    assert!(started.elapsed() < Duration::from_secs(5));
    still_serving(&p).await;
}

/// Reads HTTP/2 frames until the server's SETTINGS frame and returns its
/// parameters.
async fn server_settings(stream: &mut TcpStream) -> Vec<(u16, u32)> {
    let mut buf = Vec::new();
    loop {
        let mut chunk = [0u8; 1024];
        let n = tokio::time::timeout(Duration::from_secs(3), stream.read(&mut chunk))
            .await
            .expect("server speaks")
            .unwrap();
        assert!(n > 0, "server closed before SETTINGS");
        buf.extend_from_slice(&chunk[..n]);
        while buf.len() >= 9 {
            let len =
                (usize::from(buf[0]) << 16) | (usize::from(buf[1]) << 8) | usize::from(buf[2]);
            let (kind, flags) = (buf[3], buf[4]);
            if buf.len() < 9 + len {
                break;
            }
            if kind == 0x4 && flags & 0x1 == 0 {
                return buf[9..9 + len]
                    .chunks(6)
                    .map(|c| {
                        (
                            u16::from_be_bytes([c[0], c[1]]),
                            u32::from_be_bytes([c[2], c[3], c[4], c[5]]),
                        )
                    })
                    .collect();
            }
            buf.drain(..9 + len);
        }
    }
}

#[tokio::test]
async fn http2_limits_are_announced() {
    let s = Setup::new(&[("a", "personal")], "", "").await;
    let p = s.proxy().await;
    let mut c = TcpStream::connect(p.addr).await.unwrap();
    c.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .await
        .unwrap();
    let settings = server_settings(&mut c).await;
    let get = |id: u16| settings.iter().find(|(k, _)| *k == id).map(|(_, v)| *v);
    assert_eq!(
        get(0x3),
        Some(256),
        "SETTINGS_MAX_CONCURRENT_STREAMS: {settings:?}"
    );
    assert_eq!(
        get(0x6),
        Some(64 * 1024),
        "SETTINGS_MAX_HEADER_LIST_SIZE: {settings:?}"
    );
    drop(c);
    still_serving(&p).await;
}

#[tokio::test]
async fn slow_request_bodies_get_408_and_others_are_served() {
    let s = Setup::new(&[("a", "personal")], "", "").await;
    s.write_server_line(&[("a", "personal")], "body_read_timeout = \"1s\"");
    let p = s.proxy().await;
    // A valid key, 10 of 1 000 declared bytes, then nothing: each holds a
    // connection and a buffer until the body deadline.
    let mut slow = Vec::new();
    for _ in 0..50 {
        let mut c = Raw::connect(p.addr).await;
        c.send(
            format!(
                "POST /echo HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {CLIENT_KEY}\r\n\
                 Content-Length: 1000\r\n\r\n0123456789"
            )
            .as_bytes(),
        )
        .await;
        slow.push(c);
    }
    still_serving(&p).await;
    for c in &mut slow {
        let a = c.answer(false).await;
        assert_eq!(a.status(), 408, "{a:?}");
        assert_eq!(a.header("x-tokenpool-error"), Some("request_timeout"));
        assert_eq!(a.header("connection"), Some("close"));
        assert!(c.closed().await, "a stalled body ends its connection");
    }
    let m = p.metrics().await;
    assert_eq!(metric(&m, "tokenpool_inflight_requests"), 0.0);
    assert_eq!(
        metric(&m, "tokenpool_requests_total{outcome=\"client_error\"}"),
        50.0
    );
    assert_eq!(
        s.sim.total_ai_calls(),
        1,
        "no stalled request went upstream"
    );
    assert!(
        s.sim.seen().iter().all(|(path, _)| path != "/echo"),
        "not even its head"
    );
    still_serving(&p).await;
}

#[tokio::test]
async fn idle_http2_connections_close_and_busy_ones_stay() {
    let s = Setup::new(&[("a", "personal")], "", "").await;
    s.write_server_line(&[("a", "personal")], "header_read_timeout = \"1s\"");
    let p = s.proxy().await;
    // The preface and SETTINGS, then nothing: no key was ever shown, and
    // the connection is closed (GOAWAY, then the end) after the timeout.
    let mut c = TcpStream::connect(p.addr).await.unwrap();
    c.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .await
        .unwrap();
    let mut received = Vec::new();
    let mut chunk = [0u8; 1024];
    loop {
        let n = tokio::time::timeout(Duration::from_secs(5), c.read(&mut chunk))
            .await
            .expect("an idle HTTP/2 connection is closed within 5 s")
            .unwrap_or(0);
        if n == 0 {
            break;
        }
        received.extend_from_slice(&chunk[..n]);
    }
    let mut frames = Vec::new();
    let mut at = 0;
    while at + 9 <= received.len() {
        let len = (usize::from(received[at]) << 16)
            | (usize::from(received[at + 1]) << 8)
            | usize::from(received[at + 2]);
        frames.push(received[at + 3]);
        at += 9 + len;
    }
    assert!(
        frames.contains(&0x7),
        "a GOAWAY before the close: {frames:?}"
    );

    // A stream open past the idle timeout keeps its connection.
    s.sim.set_ai("a", AiBehaviour::Hold);
    let client = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let mut r = client
        .post(p.url("/ai/multi-agent"))
        .bearer_auth(CLIENT_KEY)
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(r.version(), reqwest::Version::HTTP_2);
    let first = r.chunk().await.unwrap().unwrap();
    assert!(first.starts_with(b"data: "));
    tokio::time::sleep(Duration::from_millis(2500)).await;
    s.sim.release_streams();
    let (rest, broke) = read_to_break(&mut r).await;
    assert!(!broke, "the stream outlived the idle timeout");
    assert!(String::from_utf8_lossy(&rest).ends_with("data: [DONE]\n\n"));
}
