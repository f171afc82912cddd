//! The upstream connection pool: keep-alive reuse, connections the
//! upstream closes, and https upstreams (HTTP/1.1 and HTTP/2 by ALPN)
//! behind a private CA given by `[upstream] ca_file`, which is watched
//! like the config itself; and the HTTP/1.1 codec against an upstream
//! scripted byte by byte (chunked, 1xx, 204, HEAD, HTTP/1.0, malformed and
//! cut answers, connections closed under a request).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use tokenpool::sim::Sim;

use crate::harness::{
    eventually, metric, read_to_break, static_config, Proxy, CLIENT_KEY, STATIC_KEY,
};

fn tls_fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/tls")
        .join(name)
}

/// A TLS simulator with the fixture certificate, offering `alpn`.
async fn tls_sim(alpn: &[&[u8]]) -> Sim {
    let cert = std::fs::read(tls_fixture("server.pem")).unwrap();
    let key = std::fs::read(tls_fixture("server.key")).unwrap();
    Sim::start_tls(&cert, &key, alpn).await.unwrap()
}

async fn post(p: &Proxy, path: &str) -> (u16, String) {
    let r = p
        .client
        .post(p.url(path))
        .bearer_auth(CLIENT_KEY)
        .body("{\"q\":1}")
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.text().await.unwrap())
}

#[tokio::test]
async fn keep_alive_connections_are_reused_and_closed_ones_replaced() {
    let sim = Sim::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let p = Proxy::start(&static_config(dir.path(), &sim.url(), "", "")).await;
    for _ in 0..20 {
        let (status, body) = post(&p, "/echo").await;
        assert_eq!(status, 200, "{body}");
        assert!(body.contains("\"body_bytes\":7"), "{body}");
    }
    assert_eq!(
        sim.connections(),
        1,
        "20 requests in a row share one connection"
    );
    assert_eq!(
        p.generations
            .current()
            .upstream
            .connections()
            .idle_connections(),
        1
    );

    // An upstream that closes after each answer: the first goes on the
    // warm connection, each later one on a new connection; none fails.
    for _ in 0..5 {
        let (status, body) = post(&p, "/close").await;
        assert_eq!(status, 200, "{body}");
    }
    assert_eq!(sim.connections(), 5);
    let (status, _) = post(&p, "/echo").await;
    assert_eq!(status, 200);
    assert_eq!(sim.connections(), 6);
    p.stop().await;
}

#[tokio::test]
async fn https_upstreams_speak_http1_or_http2_as_alpn_says() {
    let ca = tls_fixture("ca.pem");
    for (alpn, version) in [
        (&[b"http/1.1".as_slice()][..], http::Version::HTTP_11),
        (
            &[b"h2".as_slice(), b"http/1.1".as_slice()][..],
            http::Version::HTTP_2,
        ),
    ] {
        let sim = tls_sim(alpn).await;
        assert!(sim.url().starts_with("https://127.0.0.1:"));
        let dir = tempfile::tempdir().unwrap();
        let extra = format!("ca_file = {:?}", ca.display().to_string());
        let p = Proxy::start(&static_config(dir.path(), &sim.url(), "", &extra)).await;
        for _ in 0..10 {
            let (status, body) = post(&p, "/echo").await;
            assert_eq!(status, 200, "{body}");
        }
        assert_eq!(sim.last_version(), Some(version));
        assert_eq!(
            sim.connections(),
            1,
            "{version:?}: one connection serves all"
        );
        let seen = sim.seen();
        let (_, headers) = seen.last().unwrap();
        assert_eq!(headers["authorization"], format!("Bearer {STATIC_KEY}"));
        // The SSE endpoint over TLS: it wants a JWT, so the static key gets
        // its 401 (after the one retry), passed back as the upstream sent it.
        let r = p
            .client
            .post(p.url("/ai/multi-agent"))
            .bearer_auth(CLIENT_KEY)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401);
        assert!(
            r.headers().get("x-tokenpool-error").is_none(),
            "the upstream's answer"
        );
        assert_eq!(
            sim.seen()
                .iter()
                .filter(|(p, _)| p == "/ai/multi-agent")
                .count(),
            2,
            "sent, refreshed and sent once more"
        );
        p.stop().await;
    }
}

#[tokio::test]
async fn an_https_upstream_with_an_unknown_ca_is_a_clean_502() {
    let sim = tls_sim(&[b"http/1.1"]).await;
    let dir = tempfile::tempdir().unwrap();
    let p = Proxy::start(&static_config(dir.path(), &sim.url(), "", "")).await;
    let r = p
        .client
        .post(p.url("/echo"))
        .bearer_auth(CLIENT_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 502);
    assert_eq!(r.headers()["x-tokenpool-error"], "upstream_unreachable");
    assert!(
        sim.seen().is_empty(),
        "no request crossed an unverified TLS session"
    );
    p.stop().await;
}

#[tokio::test]
async fn a_ca_file_without_certificates_is_a_config_error() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("empty.pem"), "not a certificate\n").unwrap();
    let path = static_config(
        dir.path(),
        "https://127.0.0.1:1",
        "",
        "ca_file = \"empty.pem\"",
    );
    let err = tokenpool::config::Config::load(&path, &|_| None).unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("ca_file") && text.contains("no certificate"),
        "{text}"
    );
    assert!(
        text.contains(":11:"),
        "the error points at the line: {text}"
    );
}

#[tokio::test]
async fn an_edited_ca_file_is_reloaded_and_a_broken_one_changes_nothing() {
    let sim = tls_sim(&[b"http/1.1"]).await;
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("upstream-ca.pem");
    std::fs::copy(tls_fixture("ca.pem"), &ca).unwrap();
    let config = static_config(dir.path(), &sim.url(), "", "ca_file = \"upstream-ca.pem\"");
    let p = Proxy::start(&config).await;
    assert_eq!(post(&p, "/echo").await.0, 200);

    // The watcher follows the CA file: a broken one is refused and the
    // running generation keeps its pool and its trust.
    std::fs::write(&ca, "not a certificate\n").unwrap();
    eventually(
        "the broken CA file is refused",
        Duration::from_secs(10),
        || async {
            metric(
                &p.metrics().await,
                "tokenpool_config_reloads_total{result=\"failure\"}",
            ) >= 1.0
        },
    )
    .await;
    assert_eq!(p.generations.current().id, 1);
    assert_eq!(post(&p, "/echo").await.0, 200);

    std::fs::copy(tls_fixture("ca.pem"), &ca).unwrap();
    p.wait_generation(2).await;
    assert_eq!(post(&p, "/echo").await.0, 200);
    p.stop().await;
}

#[tokio::test]
async fn a_reload_keeps_warm_connections_unless_the_upstream_changed() {
    let sim = Sim::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = static_config(dir.path(), &sim.url(), "", "");
    let p = Proxy::start(&config).await;
    assert_eq!(post(&p, "/echo").await.0, 200);
    assert_eq!(sim.connections(), 1);

    // Same upstream, another token added: the warm connection serves on.
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        format!("{text}[[tokens]]\nname = \"k2\"\ntier = \"shared\"\ntoken = \"sk-second-key\"\n"),
    )
    .unwrap();
    p.wait_generation(2).await;
    assert_eq!(post(&p, "/echo").await.0, 200);
    assert_eq!(sim.connections(), 1);

    // Another connect timeout: a new pool, so a new connection.
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        text.replace(
            "idle_timeout = \"5s\"",
            "idle_timeout = \"5s\"\nconnect_timeout = \"3s\"",
        ),
    )
    .unwrap();
    p.wait_generation(3).await;
    assert_eq!(post(&p, "/echo").await.0, 200);
    assert_eq!(sim.connections(), 2);
    p.stop().await;
}

/// What the scripted upstream does with a request.
enum Act {
    /// Writes these bytes and keeps the connection.
    Answer(&'static [u8]),
    /// Writes these bytes, then closes the connection.
    AnswerAndClose(&'static [u8]),
    /// Closes the connection without a byte.
    Drop,
}

/// An HTTP/1.1 upstream written byte by byte, for answers a real server
/// library would never send. Each connection reads one request at a time
/// and acts on it by its path (and the previous path on that connection).
struct Scripted {
    url: String,
    connections: Arc<AtomicUsize>,
    /// Path of every request that arrived whole.
    seen: Arc<Mutex<Vec<String>>>,
}

impl Scripted {
    async fn start(script: fn(&str, Option<&str>) -> Act) -> Scripted {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let connections = Arc::new(AtomicUsize::new(0));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (count, log) = (Arc::clone(&connections), Arc::clone(&seen));
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(Scripted::serve(stream, script, Arc::clone(&log)));
            }
        });
        Scripted {
            url,
            connections,
            seen,
        }
    }

    async fn serve(
        mut stream: tokio::net::TcpStream,
        script: fn(&str, Option<&str>) -> Act,
        seen: Arc<Mutex<Vec<String>>>,
    ) {
        let mut buf = Vec::new();
        let mut previous: Option<String> = None;
        loop {
            // One request: the head, then its Content-Length of body.
            let head_end = loop {
                if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    break i + 4;
                }
                if !read_more(&mut stream, &mut buf).await {
                    return;
                }
            };
            let head = String::from_utf8_lossy(&buf[..head_end]).to_lowercase();
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length: "))
                .map_or(0, |v| v.trim().parse().unwrap());
            while buf.len() < head_end + length {
                if !read_more(&mut stream, &mut buf).await {
                    return;
                }
            }
            buf.drain(..head_end + length);
            let path = head.split(' ').nth(1).unwrap().to_string();
            seen.lock().unwrap().push(path.clone());
            match script(&path, previous.as_deref()) {
                Act::Answer(bytes) => stream.write_all(bytes).await.unwrap(),
                Act::AnswerAndClose(bytes) => {
                    stream.write_all(bytes).await.unwrap();
                    return;
                }
                Act::Drop => return,
            }
            previous = Some(path);
        }
    }

    fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    fn seen(&self, path: &str) -> usize {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|p| *p == path)
            .count()
    }
}

/// Reads what the peer sent next onto `buf`; false once it is gone.
async fn read_more(stream: &mut tokio::net::TcpStream, buf: &mut Vec<u8>) -> bool {
    let mut chunk = [0u8; 4096];
    match stream.read(&mut chunk).await {
        Ok(0) | Err(_) => false,
        Ok(n) => {
            buf.extend_from_slice(&chunk[..n]);
            true
        }
    }
}

const OK_SHORT: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";

fn odd_answers(path: &str, previous: Option<&str>) -> Act {
    if previous == Some("/arm") {
        // The request after /arm on a connection finds it closed.
        return Act::Drop;
    }
    match path {
        "/chunked" => Act::Answer(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-type: text/plain\r\n\
              connection: keep-alive, x-hop\r\nx-hop: 1\r\n\r\n\
              5;note=\"first\"\r\nhello\r\n7\r\n, world\r\n0\r\nx-trailer: t\r\n\r\n",
        ),
        "/nocontent" => Act::Answer(b"HTTP/1.1 204 No Content\r\nx-kind: empty\r\n\r\n"),
        "/head" => Act::Answer(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n"),
        "/continue" => Act::Answer(
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
        ),
        "/http10" => {
            Act::AnswerAndClose(b"HTTP/1.0 200 OK\r\ncontent-type: text/plain\r\n\r\nuntil the end")
        }
        "/garbage" => Act::AnswerAndClose(b"SSH-2.0-OpenSSH_9.2\r\n\r\n"),
        "/short" => Act::AnswerAndClose(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly this"),
        "/idle-close" => Act::AnswerAndClose(OK_SHORT),
        _ => Act::Answer(OK_SHORT),
    }
}

/// A proxy in front of the upstream scripted by `odd_answers` (and the
/// folder its config lives in, kept as long as the proxy runs).
async fn scripted_proxy() -> (Scripted, Proxy, tempfile::TempDir) {
    let up = Scripted::start(odd_answers).await;
    let dir = tempfile::tempdir().unwrap();
    let p = Proxy::start(&static_config(dir.path(), &up.url, "", "")).await;
    (up, p, dir)
}

async fn request(p: &Proxy, method: reqwest::Method, path: &str) -> reqwest::Response {
    p.client
        .request(method, p.url(path))
        .bearer_auth(CLIENT_KEY)
        .body("{\"q\":1}")
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn odd_but_valid_answers_arrive_whole_and_connections_are_reused_when_safe() {
    let (up, p, _dir) = scripted_proxy().await;
    use reqwest::Method;

    // Chunked, with an extension and a trailer, twice on one connection.
    for _ in 0..2 {
        let r = request(&p, Method::POST, "/chunked").await;
        assert_eq!(r.status(), 200);
        assert!(r.headers().get("x-hop").is_none(), "named by Connection");
        assert!(r.headers().get("connection").is_none());
        assert_eq!(r.text().await.unwrap(), "hello, world");
    }
    // No body: 204, and HEAD whatever its Content-Length says.
    let r = request(&p, Method::POST, "/nocontent").await;
    assert_eq!(r.status(), 204);
    assert_eq!(r.headers()["x-kind"], "empty");
    assert_eq!(r.text().await.unwrap(), "");
    let r = request(&p, Method::HEAD, "/head").await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-length"], "5");
    // An interim 100 before the answer.
    let r = request(&p, Method::POST, "/continue").await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "ok");
    assert_eq!(up.connections(), 1, "all of these kept the connection");

    // HTTP/1.0 without a length: the body runs to the close, and the
    // connection is not reused.
    let r = request(&p, Method::POST, "/http10").await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "until the end");
    let r = request(&p, Method::POST, "/chunked").await;
    assert_eq!(r.text().await.unwrap(), "hello, world");
    assert_eq!(up.connections(), 2);
    p.stop().await;
}

#[tokio::test]
async fn broken_answers_are_clean_errors_and_the_proxy_keeps_serving() {
    let (up, p, _dir) = scripted_proxy().await;
    use reqwest::Method;

    let r = request(&p, Method::POST, "/garbage").await;
    assert_eq!(r.status(), 502);
    assert_eq!(r.headers()["x-tokenpool-error"], "upstream_unreachable");
    // A body cut short: the client gets the head and what arrived, then
    // sees the connection break instead of a quiet, shorter body.
    let mut r = request(&p, Method::POST, "/short").await;
    assert_eq!(r.status(), 200);
    let (received, broke) = read_to_break(&mut r).await;
    assert!(broke, "a cut body is not a whole one");
    assert_eq!(received, b"only this");
    let r = request(&p, Method::POST, "/chunked").await;
    assert_eq!(r.text().await.unwrap(), "hello, world");
    assert_eq!(up.connections(), 3, "a broken connection is never reused");
    let metrics = p.metrics().await;
    assert!(!metrics.contains(STATIC_KEY));
    p.stop().await;
}

#[tokio::test]
async fn a_connection_the_upstream_closed_is_replaced_and_only_safe_requests_repeat() {
    let (up, p, _dir) = scripted_proxy().await;
    use reqwest::Method;

    // Closed while idle: seen before reuse, so even a POST goes through on
    // a new connection, sent once.
    let r = request(&p, Method::POST, "/idle-close").await;
    assert_eq!(r.text().await.unwrap(), "ok");
    let r = request(&p, Method::POST, "/after-idle-close").await;
    assert_eq!(r.status(), 200);
    assert_eq!(up.seen("/after-idle-close"), 1);
    assert_eq!(up.connections(), 2);

    // Closed as the request arrives, without a byte back. A GET is sent
    // again on a new connection...
    assert_eq!(request(&p, Method::POST, "/arm").await.status(), 200);
    let r = request(&p, Method::GET, "/get").await;
    assert_eq!(r.status(), 200);
    assert_eq!(up.seen("/get"), 2, "sent, dropped, sent again");
    assert_eq!(up.connections(), 3);
    // ...so is a POST with an idempotency key...
    assert_eq!(request(&p, Method::POST, "/arm").await.status(), 200);
    let r = p
        .client
        .post(p.url("/keyed"))
        .bearer_auth(CLIENT_KEY)
        .header("idempotency-key", "order-17")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(up.seen("/keyed"), 2);
    // ...but a plain POST may have been acted on: 502, and sent once.
    assert_eq!(request(&p, Method::POST, "/arm").await.status(), 200);
    let r = request(&p, Method::POST, "/once").await;
    assert_eq!(r.status(), 502);
    assert_eq!(r.headers()["x-tokenpool-error"], "upstream_unreachable");
    assert_eq!(up.seen("/once"), 1);
    // And the proxy serves on.
    assert_eq!(request(&p, Method::POST, "/fine").await.status(), 200);
    p.stop().await;
}
