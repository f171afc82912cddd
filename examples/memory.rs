//! Memory of the release binary: RSS idle with 10, 1 000 and 100 000
//! tokens (the difference gives the state per token), and RSS with
//! `STREAMS` (default 5 000) concurrent streaming connections held open,
//! each its own client connection (the difference gives the memory per
//! open stream). `ONLY_STREAMS=1` skips the idle steps; `TOKENPOOL_BIN`
//! names the binary (a wrapper that runs it under a heap profiler, say).
//!
//!   cargo build --release
//!   (ulimit -n 65536; cargo run --release --example memory)
//!
//! Loopback only; the child proxies are stopped at the end of each step.

use std::time::{Duration, Instant};

use tokenpool::sim::{make_jwt, AiBehaviour, Sim};

const CLIENT_KEY: &str = "memory-client-key";

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Starts the binary with `tokens` static JWT tokens; returns it and its ports.
async fn start(
    sim: &Sim,
    tokens: usize,
    dir: &std::path::Path,
) -> (tokio::process::Child, u16, u16) {
    let (proxy, admin) = (free_port(), free_port());
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3600;
    let mut text = format!(
        "[server]\nlisten = \"127.0.0.1:{proxy}\"\napi_keys = [\"{CLIENT_KEY}\"]\n\
         [admin]\nlisten = \"127.0.0.1:{admin}\"\n[upstream]\npreset = \"warp\"\nurl = \"{}\"\nidle_timeout = \"60s\"\n\
         [refresh]\nprovider = \"static\"\n",
        sim.url()
    );
    for i in 0..tokens {
        let tier = ["personal", "shared", "anonymous"][i % 3];
        text.push_str(&format!(
            "[[tokens]]\nname = \"t{i}\"\ntier = \"{tier}\"\ntoken = \"{}\"\n",
            make_jwt("acct", exp, i as u64)
        ));
    }
    let path = dir.join(format!("tokens-{tokens}.toml"));
    std::fs::write(&path, text).unwrap();
    let bin = std::env::var("TOKENPOOL_BIN").unwrap_or_else(|_| "target/release/tokenpool".into());
    let child = tokio::process::Command::new(bin)
        .args(["serve", "-c"])
        .arg(&path)
        .env("RUST_LOG", "warn")
        .kill_on_drop(true)
        .spawn()
        .expect("build the release binary first");
    let client = reqwest::Client::new();
    let started = Instant::now();
    while client
        .get(format!("http://127.0.0.1:{admin}/healthz"))
        .send()
        .await
        .is_err()
    {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "proxy did not start"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    (child, proxy, admin)
}

async fn stop(mut child: tokio::process::Child) {
    let pid = child.id().unwrap();
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
    let _ = tokio::time::timeout(Duration::from_secs(40), child.wait()).await;
}

#[tokio::main]
async fn main() {
    let sim = Sim::start().await.unwrap();
    sim.add_account("acct", "rt-acct");
    let dir = tempfile::tempdir().unwrap();

    if std::env::var_os("ONLY_STREAMS").is_none() {
        let mut idle = Vec::new();
        for tokens in [10usize, 1_000, 100_000] {
            let (child, _, _) = start(&sim, tokens, dir.path()).await;
            tokio::time::sleep(Duration::from_secs(2)).await;
            let rss = rss_kib(child.id().unwrap());
            println!("idle, {tokens:>6} tokens: RSS {rss} KiB");
            idle.push((tokens, rss));
            stop(child).await;
        }
        let (small, large) = (idle[0], idle[2]);
        println!(
            "state per token: ({} - {}) KiB / {} tokens = {:.0} bytes",
            large.1,
            small.1,
            large.0 - small.0,
            (large.1 - small.1) as f64 * 1024.0 / (large.0 - small.0) as f64
        );
    }

    // STREAMS streams held open at once.
    let n: usize = std::env::var("STREAMS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5_000);
    sim.set_ai("acct", AiBehaviour::Hold);
    let (child, proxy, _) = start(&sim, 1_000, dir.path()).await;
    let pid = child.id().unwrap();
    let before = rss_kib(pid);
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(2 * n)
        .build()
        .unwrap();
    let mut streams = Vec::new();
    for _ in 0..n {
        let client = client.clone();
        streams.push(tokio::spawn(async move {
            let mut r = client
                .post(format!("http://127.0.0.1:{proxy}/ai/multi-agent"))
                .bearer_auth(CLIENT_KEY)
                .body("x")
                .send()
                .await?;
            let first = r.chunk().await?;
            Ok::<_, reqwest::Error>((r, first.is_some()))
        }));
    }
    let mut open = Vec::new();
    let mut failed = 0;
    for s in streams {
        match s.await.unwrap() {
            Ok((r, true)) => open.push(r),
            _ => failed += 1,
        }
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let during = rss_kib(pid);
    println!(
        "1 000 tokens, {} streams open ({failed} failed): RSS {before} KiB before, {during} KiB during, \
         {:.1} KiB per open stream",
        open.len(),
        (during.saturating_sub(before)) as f64 / open.len().max(1) as f64
    );
    sim.release_streams();
    for mut r in open {
        while let Ok(Some(_)) = r.chunk().await {}
    }
    stop(child).await;
}
