//! Requests spent on 429s to learn that a quota is gone, before and after
//! quota awareness: three personal tokens with 20 requests of quota each
//! (refilled in 20 days) and a shared one without a limit, against the
//! simulated Warp upstream, 20 s of traffic every 20 ms.
//!
//! - without `[quota]`: a token learns it has no quota by a 429, and rests
//!   `quota_cooldown` (shortened here to 1 s, doubling, so that the run
//!   shows what months of the default 10 min doubling to 6 h do);
//! - with `[quota] provider = "warp"`: quotas polled and counted down; a
//!   token rests at 0 until its refill.
//!
//!   cargo bench --bench quota
//!
//! Bounded (about 45 s); all traffic stays on 127.0.0.1.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokenpool::config::Config;
use tokenpool::generation::Generations;
use tokenpool::run::{run, Listeners};
use tokenpool::shutdown::shutdown_pair;
use tokenpool::sim::Sim;

#[path = "common/traffic.rs"]
mod traffic;

const LIMITED: [&str; 3] = ["q1", "q2", "q3"];
const TRAFFIC: Duration = Duration::from_secs(20);

async fn scenario(quota: bool) -> (u64, u64, u64) {
    let sim = Sim::start().await.unwrap();
    sim.set_stream(1, Duration::ZERO);
    let refill = SystemTime::now() + Duration::from_secs(20 * 24 * 3600);
    for name in LIMITED {
        sim.add_account(name, &format!("rt-{name}"));
        sim.set_quota(name, 20, 0, refill);
    }
    sim.add_account("spare", "rt-spare");
    let mut text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n\
         [upstream]\npreset = \"warp\"\nurl = \"{}\"\n[refresh]\nurl = \"{}\"\n\
         [pool]\nquota_cooldown = \"1s\"\n[log]\naccess = false\n",
        sim.url(),
        sim.refresh_url()
    );
    if quota {
        text.push_str("[quota]\nprovider = \"warp\"\n");
    }
    for name in LIMITED {
        text.push_str(&format!(
            "[[tokens]]\nname = \"{name}\"\ntier = \"personal\"\ntoken = \"rt-{name}\"\n"
        ));
    }
    text.push_str("[[tokens]]\nname = \"spare\"\ntier = \"shared\"\ntoken = \"rt-spare\"\n");
    let config = Config::parse(&text, None, &|_| None).unwrap();
    let listeners = Listeners::bind(&config).await.unwrap();
    let (addr, _) = listeners.addrs().unwrap();
    let generations = Generations::new(config, Arc::new(|_: &str| None)).unwrap();
    let (trigger, shutdown) = shutdown_pair();
    let task = tokio::spawn(run(Arc::clone(&generations), listeners, shutdown));
    // Refreshed (and, with [quota], polled) before the traffic starts.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (ok, failed) = traffic::steady(&[addr], TRAFFIC).await;
    let refused: u64 = LIMITED.iter().map(|n| sim.quota_refusals(n)).sum();
    trigger.trigger();
    let _ = task.await;
    (refused, ok, failed)
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        for (quota, name) in [
            (false, "without [quota]"),
            (true, "with [quota] provider = \"warp\""),
        ] {
            let (refused, ok, failed) = scenario(quota).await;
            println!(
                "{name}: {refused} requests spent on quota 429s exhausting 3 tokens \
                 (60 requests of quota) in {}s; {ok} answered 200, {failed} failed",
                TRAFFIC.as_secs()
            );
        }
    });
}
