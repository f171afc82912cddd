//! `tokenpool demo`: the simulated Warp upstream (`crate::sim`) with a few
//! accounts in the states worth seeing, and a proxy in front of it on
//! loopback; with `--redis`, a replica of a cluster.

use std::sync::Arc;
use std::time::Duration;

use crate::config::Config;
use crate::generation::Generations;
use crate::run::Listeners;
use crate::shutdown::{shutdown_pair, spawn_signal_handler};
use crate::sim::{RefreshBehaviour, Sim};

/// The demo: a simulated Warp upstream and a proxy in front of it; with
/// `upstream`, another demo's simulated upstream.
pub(super) async fn demo(redis: Option<String>, upstream: Option<String>) -> anyhow::Result<()> {
    let own = match &upstream {
        Some(_) => None,
        None => Some(Sim::start().await?),
    };
    let (url, refresh) = match (&own, upstream) {
        (Some(sim), _) => (sim.url(), sim.refresh_url()),
        (None, Some(url)) => {
            let url = url.trim_end_matches('/').to_string();
            let refresh = crate::sim::refresh_url_of(&url);
            (url, refresh)
        }
        (None, None) => unreachable!("a demo starts a simulator unless given one"),
    };
    if let Some(sim) = &own {
        demo_accounts(sim, redis.is_some());
    }
    let text = demo_config(&url, &refresh, redis.as_deref());
    let config = Config::parse(&text, None, &|_| None)?;
    let listeners = Listeners::bind(&config).await?;
    let (proxy, admin) = listeners.addrs()?;
    let generations = Generations::new(config, Arc::new(|_: &str| None))?;
    let cluster_note = match (&redis, &own) {
        (Some(_), Some(_)) => format!(
            "In cluster mode: it shares its pool through Redis (key prefix tokenpool-demo).\n\
             dave's provider rotates his refresh token on every refresh and revokes the\n\
             account if an older one comes back. A second replica in front of the same\n\
             simulated provider:\n  \
             cargo run --release -- demo --redis <the same URL> --upstream {url}\n"
        ),
        (Some(_), None) => {
            "In cluster mode: a second replica, sharing the pool and the provider.\n".to_string()
        }
        (None, _) => String::new(),
    };
    println!(
        r#"
tokenpool demo — a simulated Warp upstream at {url} and a proxy in front of it.
Tokens: alice (personal, healthy), bob (personal, out of quota), carol (shared,
revoked refresh token), dave (anonymous, healthy).
{cluster_note}
Try:
  curl -N -X POST http://{proxy}/ai/multi-agent -H 'content-type: application/x-protobuf' -H 'accept: text/event-stream' --data-binary 'hello'
  curl -s http://{admin}/admin/pool
  curl -s http://{admin}/metrics | grep ^tokenpool_
  cargo run --release -- status --admin http://{admin}

Ctrl-C stops it.
"#
    );
    let (trigger, shutdown) = shutdown_pair();
    spawn_signal_handler(trigger);
    crate::run::run(generations, listeners, shutdown).await;
    drop(own);
    Ok(())
}

/// The demo's simulated accounts; `cluster`: replicas may share them.
fn demo_accounts(sim: &Sim, cluster: bool) {
    for (id, rt) in [
        ("alice", "demo-rt-alice"),
        ("bob", "demo-rt-bob"),
        ("carol", "demo-rt-carol"),
        ("dave", "demo-rt-dave"),
    ] {
        sim.add_account(id, rt);
    }
    // Monthly quotas, as Warp's: alice has most of hers, bob none left
    // (the quota poll tells, so he rests without a failed request), dave
    // (anonymous) has no limit here.
    let refill = std::time::SystemTime::now() + Duration::from_secs(20 * 24 * 3600);
    sim.set_quota("alice", 150, 12, refill);
    sim.set_quota("bob", 150, 150, refill);
    sim.set_refresh("carol", RefreshBehaviour::Revoked);
    if cluster {
        // A provider that rotates dave's refresh token on every refresh and
        // revokes the account if an older one comes back: replicas in front
        // of it never present a superseded one.
        sim.set_refresh("dave", RefreshBehaviour::RotateStrict);
    }
}

/// The demo's configuration text.
fn demo_config(url: &str, refresh: &str, redis: Option<&str>) -> String {
    let cluster = match redis {
        Some(redis) => format!(
            "[cluster]\nredis = {redis:?}\nkey_prefix = \"tokenpool-demo\"\nnode = \"demo-{}\"\n",
            std::process::id()
        ),
        None => String::new(),
    };
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
# No load balancer to tell: Ctrl-C stops at once.
drain_delay = "0s"
[admin]
listen = "127.0.0.1:0"
[upstream]
preset = "warp"
url = "{url}"
[refresh]
url = "{refresh}"
[pool]
cooldown = "30s"
quota_cooldown = "2m"
[quota]
provider = "warp"
{cluster}
[[tokens]]
name = "alice"
tier = "personal"
token = "demo-rt-alice"
[[tokens]]
name = "bob"
tier = "personal"
token = "demo-rt-bob"
[[tokens]]
name = "carol"
tier = "shared"
token = "demo-rt-carol"
[[tokens]]
name = "dave"
tier = "anonymous"
token = "demo-rt-dave"
"#
    )
}
