//! Reloading a 10 000-token config: parsing and validating the file,
//! building the next generation (carrying every token over) and swapping
//! it in; and the latency of a proxied request while reloads run back to
//! back on another thread, against the same request with no reloads.

use std::hint::black_box;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion};
use tokenpool::config::Config;
use tokenpool::generation::Generations;
use tokenpool::run::{run, Listeners};
use tokenpool::shutdown::shutdown_pair;
use tokenpool::sim::Sim;

const TOKENS: usize = 10_000;

fn config_text(upstream: &str) -> String {
    let mut text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\napi_keys = [\"bench-key\"]\n\
         [admin]\nlisten = \"127.0.0.1:0\"\n\
         [upstream]\nurl = \"{upstream}\"\n\
         [refresh]\nprovider = \"static\"\n"
    );
    let tiers = ["personal", "shared", "anonymous"];
    for i in 0..TOKENS {
        text.push_str(&format!(
            "[[tokens]]\nname = \"token-{i}\"\ntier = \"{}\"\ntoken = \"sk-bench-{i:08}\"\n",
            tiers[i % 3]
        ));
    }
    text
}

fn reload(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let sim = rt.block_on(Sim::start()).unwrap();
    let text = config_text(&sim.url());
    let config = Config::parse(&text, None, &|_| None).unwrap();

    let mut group = c.benchmark_group("reload 10k tokens");
    group.sample_size(20);
    group.bench_function("parse + validate", |b| {
        b.iter(|| black_box(Config::parse(&text, None, &|_| None).unwrap()))
    });
    let app =
        rt.block_on(async { Generations::new(config.clone(), Arc::new(|_: &str| None)).unwrap() });
    group.bench_function("build generation + swap", |b| {
        b.iter(|| black_box(app.apply(config.clone()).unwrap()))
    });
    group.finish();

    // A running proxy for the latency figures.
    let (app, addr) = rt.block_on(async {
        let listeners = Listeners::bind(&config).await.unwrap();
        let (addr, _) = listeners.addrs().unwrap();
        let app = Generations::new(config.clone(), Arc::new(|_: &str| None)).unwrap();
        let (trigger, shutdown) = shutdown_pair();
        tokio::spawn(run(Arc::clone(&app), listeners, shutdown));
        std::mem::forget(trigger);
        (app, addr)
    });
    let client = reqwest::Client::new();
    let url = format!("http://{addr}/echo");
    let request = || async {
        let r = client
            .post(&url)
            .bearer_auth("bench-key")
            .body("{}")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        black_box(r.bytes().await.unwrap());
    };

    let mut group = c.benchmark_group("request latency");
    group.bench_function("no reloads", |b| b.to_async(&rt).iter(request));
    let stop = Arc::new(AtomicBool::new(false));
    let reloads = Arc::new(AtomicU64::new(0));
    let reloader = {
        let (app, text, stop, reloads) = (
            Arc::clone(&app),
            text.clone(),
            Arc::clone(&stop),
            Arc::clone(&reloads),
        );
        // Each reload parses the text again, as a file reload would.
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let fresh = Config::parse(&text, None, &|_| None).unwrap();
                app.apply(fresh).unwrap();
                reloads.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    group.bench_function("reloading back to back", |b| b.to_async(&rt).iter(request));
    stop.store(true, Ordering::Relaxed);
    reloader.join().unwrap();
    eprintln!(
        "reloads of {TOKENS} tokens completed during the measurement: {}",
        reloads.load(Ordering::Relaxed)
    );
    group.finish();
    drop(sim);
}

criterion_group!(benches, reload);
criterion_main!(benches);
