//! The upstream connection pool: keep-alive reuse, connections the
//! upstream closes, and https upstreams (HTTP/1.1 and HTTP/2 by ALPN)
//! behind a private CA given by `[upstream] ca_file`, which is watched
//! like the config itself.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokenpool::sim::Sim;

use crate::harness::{eventually, metric, Proxy, CLIENT_KEY};

fn tls_fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/tls")
        .join(name)
}

/// A config with one static key in front of `url`, plus `upstream_extra`
/// lines in `[upstream]`.
fn static_config(dir: &Path, url: &str, upstream_extra: &str) -> PathBuf {
    let path = dir.join("tokenpool.toml");
    std::fs::write(
        &path,
        format!(
            r#"[server]
listen = "127.0.0.1:0"
api_keys = ["{CLIENT_KEY}"]
[admin]
listen = "127.0.0.1:0"
[upstream]
url = "{url}"
idle_timeout = "5s"
{upstream_extra}
[refresh]
provider = "static"
[[tokens]]
name = "k1"
tier = "shared"
token = "sk-static-upstream-key"
"#
        ),
    )
    .unwrap();
    path
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
    let p = Proxy::start(&static_config(dir.path(), &sim.url(), "")).await;
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
    assert_eq!(p.app.current().upstream.client().idle_connections(), 1);

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
        let p = Proxy::start(&static_config(dir.path(), &sim.url(), &extra)).await;
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
        assert_eq!(headers["authorization"], "Bearer sk-static-upstream-key");
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
    let p = Proxy::start(&static_config(dir.path(), &sim.url(), "")).await;
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
    let path = static_config(dir.path(), "https://127.0.0.1:1", "ca_file = \"empty.pem\"");
    let err = tokenpool::config::Config::load(&path, &|_| None).unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("ca_file") && text.contains("no certificate"),
        "{text}"
    );
    assert!(text.contains(":9:"), "the error points at the line: {text}");
}

#[tokio::test]
async fn an_edited_ca_file_is_reloaded_and_a_broken_one_changes_nothing() {
    let sim = tls_sim(&[b"http/1.1"]).await;
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("upstream-ca.pem");
    std::fs::copy(tls_fixture("ca.pem"), &ca).unwrap();
    let config = static_config(dir.path(), &sim.url(), "ca_file = \"upstream-ca.pem\"");
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
    assert_eq!(p.app.current().id, 1);
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
    let config = static_config(dir.path(), &sim.url(), "");
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
