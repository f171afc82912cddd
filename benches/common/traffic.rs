//! Steady traffic for the benches that count what the upstream saw
//! (`cluster`, `quota`): one POST every 20 ms, in turn over `proxies`.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// Sends requests for `length`; returns how many were answered 200 and
/// how many were not (or failed).
pub async fn steady(proxies: &[SocketAddr], length: Duration) -> (u64, u64) {
    // A stuck request fails rather than stalling a bounded run.
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("a client");
    let started = Instant::now();
    let (mut ok, mut failed) = (0u64, 0u64);
    for addr in proxies.iter().cycle() {
        if started.elapsed() >= length {
            break;
        }
        let answer = client
            .post(format!("http://{addr}/ai/multi-agent"))
            .body("hello")
            .send()
            .await;
        match answer {
            Ok(a) if a.status() == 200 => {
                let _ = a.bytes().await;
                ok += 1;
            }
            _ => failed += 1,
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (ok, failed)
}
