//! Soak run (not part of CI): the release binary under mixed load for
//! SOAK_SECS seconds (default 600) against the in-process simulated
//! upstream, with a random fault switched onto a random token and the
//! config rewritten every second. Reports requests served, errors by cause,
//! reloads, and the proxy's RSS and open file descriptors at start and end.
//!
//!   cargo build --release && cargo run --release --example soak
//!
//! Loopback only; every loop is bounded by the deadline; the child proxy is
//! stopped with SIGTERM at the end.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokenpool::sim::{AiBehaviour, RefreshBehaviour, RefreshMode, Sim};

const ACCOUNTS: [&str; 6] = ["p1", "p2", "s1", "s2", "n1", "n2"];
const CLIENT_KEY: &str = "soak-client-key";
const CONCURRENCY: usize = 16;

fn rt_of(name: &str) -> String {
    format!("rt-soak-{name}")
}

fn config(sim: &Sim, admin_port: u16, proxy_port: u16, round: u64) -> String {
    let mut text = format!(
        "[server]\nlisten = \"127.0.0.1:{proxy_port}\"\napi_keys = [\"{CLIENT_KEY}\"]\n\
         [admin]\nlisten = \"127.0.0.1:{admin_port}\"\n\
         [upstream]\npreset = \"warp\"\nurl = \"{}\"\nidle_timeout = \"3s\"\n\
         [refresh]\nurl = \"{}\"\ntimeout = \"2s\"\n\
         [pool]\ncooldown = \"{}s\"\nquota_cooldown = \"5s\"\nrecovery_backoff = \"2s\"\nmax_recovery_backoff = \"10s\"\n",
        sim.url(),
        sim.refresh_url(),
        2 + round % 3
    );
    for (i, name) in ACCOUNTS.iter().enumerate() {
        // One token leaves and comes back on alternate rounds.
        if i == (round % ACCOUNTS.len() as u64) as usize && round % 2 == 1 {
            continue;
        }
        let tier = ["personal", "shared", "anonymous"][i / 2];
        text.push_str(&format!(
            "[[tokens]]\nname = \"{name}\"\ntier = \"{tier}\"\ntoken = \"{}\"\n",
            rt_of(name)
        ));
    }
    text
}

fn proc_status(pid: u32) -> (u64, usize) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss_kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count());
    (rss_kb, fds)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::main]
async fn main() {
    let secs: u64 = std::env::var("SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(600);
    let bin = std::env::var("TOKENPOOL_BIN").unwrap_or_else(|_| "target/release/tokenpool".into());
    let sim = Sim::start().await.unwrap();
    sim.set_stream(5, Duration::from_millis(2));
    for name in ACCOUNTS {
        sim.add_account(name, &rt_of(name));
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokenpool.toml");
    let (admin_port, proxy_port) = (free_port(), free_port());
    std::fs::write(&path, config(&sim, admin_port, proxy_port, 0)).unwrap();
    let mut child = tokio::process::Command::new(&bin)
        .args(["serve", "-c"])
        .arg(&path)
        .env("RUST_LOG", "warn")
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| {
            panic!("cannot start {bin}: {e} (build it with cargo build --release)")
        });
    let pid = child.id().unwrap();
    let client = reqwest::Client::new();
    let health = format!("http://127.0.0.1:{admin_port}/healthz");
    let start_wait = Instant::now();
    while client.get(&health).send().await.is_err() {
        assert!(
            start_wait.elapsed() < Duration::from_secs(20),
            "proxy did not start"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Let it warm up before the first reading.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (rss_start, fds_start) = proc_status(pid);

    let deadline = Instant::now() + Duration::from_secs(secs);
    let stop = Arc::new(AtomicBool::new(false));
    let outcomes: Arc<Mutex<BTreeMap<String, u64>>> = Arc::default();
    let url = format!("http://127.0.0.1:{proxy_port}/ai/multi-agent");
    let mut workers = Vec::new();
    for _ in 0..CONCURRENCY {
        let (client, url, stop, outcomes) = (
            client.clone(),
            url.clone(),
            Arc::clone(&stop),
            Arc::clone(&outcomes),
        );
        workers.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let result = client
                    .post(&url)
                    .bearer_auth(CLIENT_KEY)
                    .body("x")
                    .send()
                    .await;
                let key = match result {
                    Err(_) => "client: connection error".to_string(),
                    Ok(r) => {
                        let status = r.status().as_u16();
                        let code = r
                            .headers()
                            .get("x-tokenpool-error")
                            .and_then(|v| v.to_str().ok())
                            .map(str::to_string);
                        let body = r.text().await;
                        match (status, code, body) {
                            (200, _, Ok(b)) if b.ends_with("[DONE]\n\n") => {
                                "200 complete".to_string()
                            }
                            (200, _, _) => "200 stream broken (injected reset/silence)".to_string(),
                            (s, Some(code), _) => format!("{s} proxy: {code}"),
                            (s, None, _) => format!("{s} upstream answer"),
                        }
                    }
                };
                *outcomes.lock().unwrap().entry(key).or_default() += 1;
            }
        }));
    }

    let faults = [
        AiBehaviour::Ok,
        AiBehaviour::Ok,
        AiBehaviour::Ok,
        AiBehaviour::Quota,
        AiBehaviour::RateLimited(Some(1)),
        AiBehaviour::RateLimited(None),
        AiBehaviour::Unauthorized,
        AiBehaviour::Blocked,
        AiBehaviour::HtmlBlock,
        AiBehaviour::ServerError,
        AiBehaviour::ResetBeforeHeaders,
        AiBehaviour::ResetMidStream,
    ];
    let mut round = 0u64;
    let mut reloads_written = 0u64;
    // The comparison that shows growth: under load after a minute of
    // warm-up (allocator and connection pools filled), and under load at the end.
    let mut warmed: Option<(u64, usize)> = None;
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_secs(1)).await;
        round += 1;
        let name = ACCOUNTS[fastrand::usize(..ACCOUNTS.len())];
        sim.set_ai(name, faults[fastrand::usize(..faults.len())]);
        // Now and then the refresh side misbehaves too.
        match round % 60 {
            17 => sim.set_refresh_mode(RefreshMode::Down),
            20 => sim.set_refresh_mode(RefreshMode::Normal),
            40 => sim.set_refresh(name, RefreshBehaviour::Rotate),
            45 => sim.set_refresh(name, RefreshBehaviour::Ok),
            _ => {}
        }
        if round.is_multiple_of(30) {
            // Heal everything so long runs do not drift into all-broken.
            for n in ACCOUNTS {
                sim.set_ai(n, AiBehaviour::Ok);
            }
            let _ = client
                .post(format!(
                    "http://127.0.0.1:{admin_port}/admin/tokens/{name}/enable"
                ))
                .send()
                .await;
        }
        std::fs::write(&path, config(&sim, admin_port, proxy_port, round)).unwrap();
        reloads_written += 1;
        if round == 60.min(secs / 2) {
            warmed = Some(proc_status(pid));
        }
    }
    let loaded_end = proc_status(pid);
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        let _ = w.await;
    }
    // Idle client connections close after the pool timeout of the client;
    // drop ours so the proxy's count reflects only what it keeps itself.
    drop(client);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let client = reqwest::Client::new();
    let (rss_end, fds_end) = proc_status(pid);
    let metrics = client
        .get(format!("http://127.0.0.1:{admin_port}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let reload_line = |result: &str| {
        metrics
            .lines()
            .find(|l| {
                l.starts_with(&format!(
                    "tokenpool_config_reloads_total{{result=\"{result}\"}}"
                ))
            })
            .and_then(|l| l.split_whitespace().last())
            .unwrap_or("?")
            .to_string()
    };
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
    let exit = tokio::time::timeout(Duration::from_secs(40), child.wait()).await;

    let outcomes = outcomes.lock().unwrap();
    let total: u64 = outcomes.values().sum();
    println!("soak: {secs} s, {CONCURRENCY} concurrent clients, {} accounts, fault switched every second", ACCOUNTS.len());
    println!("requests: {total} ({:.0}/s)", total as f64 / secs as f64);
    for (k, v) in outcomes.iter() {
        println!("  {v:>9}  {k}");
    }
    println!(
        "config rewrites: {reloads_written}; reloads counted by the proxy: success {}, failure {}",
        reload_line("success"),
        reload_line("failure")
    );
    let (warm_rss, warm_fds) = warmed.unwrap_or_default();
    println!(
        "proxy RSS: {rss_start} KiB idle at start, {warm_rss} KiB under load after warm-up, \
         {} KiB under load at the end, {rss_end} KiB after the load stopped",
        loaded_end.0
    );
    println!(
        "proxy open fds: {fds_start} idle at start, {warm_fds} under load after warm-up, \
         {} under load at the end, {fds_end} after the load stopped",
        loaded_end.1
    );
    println!("exit after SIGTERM: {exit:?}");
}
