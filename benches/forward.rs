//! End-to-end forward over loopback: a small JSON POST sent directly to an
//! in-process upstream, and the same request through tokenpool (static
//! provider, 3 keys) to that upstream. Prints the ratio of the two means.

use std::convert::Infallible;
use std::hint::black_box;
use std::sync::Arc;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion};
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokenpool::config::Config;
use tokenpool::generation::Generations;
use tokenpool::run::{run, Listeners};
use tokenpool::shutdown::shutdown_pair;

const BODY: &str = r#"{"model":"m","messages":[{"role":"user","content":"hello"}]}"#;

/// A minimal upstream: reads the body, answers a fixed JSON document.
async fn upstream() -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let _ = stream.set_nodelay(true);
            let service = service_fn(|req: hyper::Request<hyper::body::Incoming>| async move {
                let _ = req.into_body().collect().await;
                Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::from_static(
                    br#"{"id":"r1","ok":true,"usage":{"tokens":12}}"#,
                ))))
            });
            let conn = builder
                .serve_connection(TokioIo::new(stream), service)
                .into_owned();
            tokio::spawn(conn);
        }
    });
    addr
}

fn mean_ns(bench: &str) -> Option<f64> {
    let path = format!("target/criterion/forward/{bench}/new/estimates.json");
    let text = std::fs::read_to_string(path).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v["mean"]["point_estimate"].as_f64()
}

fn forward(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let up = rt.block_on(upstream());
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\napi_keys = [\"bench-key\"]\n\
         [admin]\nlisten = \"127.0.0.1:0\"\n[upstream]\nurl = \"http://{up}\"\n\
         [refresh]\nprovider = \"static\"\n\
         [[tokens]]\ntier = \"shared\"\ntoken = \"sk-1\"\n\
         [[tokens]]\ntier = \"shared\"\ntoken = \"sk-2\"\n\
         [[tokens]]\ntier = \"shared\"\ntoken = \"sk-3\"\n"
    );
    let config = Config::parse(&text, None, &|_| None).unwrap();
    let proxy = rt.block_on(async {
        let listeners = Listeners::bind(&config).await.unwrap();
        let (addr, _) = listeners.addrs().unwrap();
        let app = Generations::new(config, Arc::new(|_: &str| None)).unwrap();
        let (trigger, shutdown) = shutdown_pair();
        tokio::spawn(run(app, listeners, shutdown));
        std::mem::forget(trigger);
        addr
    });
    let client = reqwest::Client::new();
    let send = |url: String| {
        let client = client.clone();
        async move {
            let r = client
                .post(&url)
                .bearer_auth("bench-key")
                .header("content-type", "application/json")
                .body(BODY)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            black_box(r.bytes().await.unwrap());
        }
    };
    let mut group = c.benchmark_group("forward");
    group.bench_function("direct", |b| {
        b.to_async(&rt)
            .iter(|| send(format!("http://{up}/v1/chat")))
    });
    group.bench_function("via tokenpool", |b| {
        b.to_async(&rt)
            .iter(|| send(format!("http://{proxy}/v1/chat")))
    });
    group.finish();
    if let (Some(direct), Some(proxied)) = (mean_ns("direct"), mean_ns("via tokenpool")) {
        println!(
            "forward: direct {:.1} µs, via tokenpool {:.1} µs, ratio {:.2}, proxy adds {:.1} µs",
            direct / 1e3,
            proxied / 1e3,
            proxied / direct,
            (proxied - direct) / 1e3
        );
    }
}

criterion_group!(benches, forward);
criterion_main!(benches);
