//! Cluster mode, measured against a real `redis-server` (started here on a
//! free loopback port, stopped at the end):
//!
//! 1. propagation: how long a token's change on one replica takes to show
//!    on another (200 manual disable/enable changes; median, p99, max);
//! 2. refresh calls per account, against the simulated upstream with
//!    refresh tokens that rotate on every refresh and short access tokens
//!    (20 s, refreshed 5 s ahead: 60 s of traffic hold four refresh
//!    periods): one replica alone (the rate to match), three replicas with
//!    `[cluster]`, and three without it.
//!
//!   cargo bench --bench cluster
//!
//! Needs redis-server (Debian: apt-get install redis-server). Bounded:
//! about three and a half minutes; all traffic stays on 127.0.0.1.

use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokenpool::config::Config;
use tokenpool::generation::Generations;
use tokenpool::pool::TokenState;
use tokenpool::run::{run, Listeners};
use tokenpool::shutdown::{shutdown_pair, ShutdownTrigger};
use tokenpool::sim::{RefreshBehaviour, Sim};
use tokio::io::{AsyncBufReadExt, BufReader};

#[path = "common/traffic.rs"]
mod traffic;

const ACCOUNTS: usize = 10;
const JWT_LIFE: Duration = Duration::from_secs(20);
const TRAFFIC: Duration = Duration::from_secs(60);

/// Starts redis-server on a free port; returns it and its port.
async fn redis_server(dir: &std::path::Path) -> (tokio::process::Child, u16) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut child = tokio::process::Command::new("redis-server")
        .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
        .args(["--save", "", "--appendonly", "no", "--logfile", ""])
        .arg("--dir")
        .arg(dir)
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("redis-server is installed (Debian: apt-get install redis-server)");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match lines.next_line().await.unwrap() {
                Some(line) if line.contains("Ready to accept connections") => break,
                Some(_) => {}
                None => panic!("redis-server ended before it was ready"),
            }
        }
    })
    .await
    .expect("redis-server is ready within 10 s");
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    (child, port)
}

struct Replica {
    generations: Arc<Generations>,
    addr: std::net::SocketAddr,
    trigger: ShutdownTrigger,
    task: tokio::task::JoinHandle<()>,
}

/// A replica of a pool of `ACCOUNTS` tokens; with `redis`, in the cluster
/// under `prefix` (one per scenario: a scenario must not find the last
/// one's tokens in Redis).
async fn replica(sim: &Sim, redis: Option<u16>, prefix: &str, node: &str) -> Replica {
    let mut text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n\
         [upstream]\npreset = \"warp\"\nurl = \"{}\"\n\
         [refresh]\nurl = \"{}\"\nmargin = \"5s\"\n[log]\naccess = false\n",
        sim.url(),
        sim.refresh_url()
    );
    if let Some(port) = redis {
        text.push_str(&format!(
            "[cluster]\nredis = \"redis://127.0.0.1:{port}/0\"\nkey_prefix = \"{prefix}\"\nnode = \"{node}\"\n"
        ));
    }
    for i in 0..ACCOUNTS {
        text.push_str(&format!(
            "[[tokens]]\nname = \"acct-{i}\"\ntier = \"personal\"\ntoken = \"rt-{i}\"\n"
        ));
    }
    let config = Config::parse(&text, None, &|_| None).unwrap();
    let listeners = Listeners::bind(&config).await.unwrap();
    let (addr, _) = listeners.addrs().unwrap();
    let generations = Generations::new(config, Arc::new(|_: &str| None)).unwrap();
    let (trigger, shutdown) = shutdown_pair();
    let task = tokio::spawn(run(Arc::clone(&generations), listeners, shutdown));
    if redis.is_some() {
        let cluster = Arc::clone(generations.cluster().unwrap());
        tokio::time::timeout(Duration::from_secs(10), async {
            while !cluster.connected() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("the replica connects to Redis within 10 s");
    }
    Replica {
        generations,
        addr,
        trigger,
        task,
    }
}

impl Replica {
    async fn stop(self) {
        self.trigger.trigger();
        let _ = self.task.await;
    }
}

fn quantile(sorted: &[Duration], q: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

async fn propagation(port: u16) {
    let sim = Sim::start().await.unwrap();
    for i in 0..ACCOUNTS {
        sim.add_account(&format!("acct-{i}"), &format!("rt-{i}"));
    }
    let a = replica(&sim, Some(port), "propagation", "a").await;
    let b = replica(&sim, Some(port), "propagation", "b").await;
    let on_a = Arc::clone(a.generations.current().pool.get("acct-0").unwrap());
    let on_b = Arc::clone(b.generations.current().pool.get("acct-0").unwrap());
    let mut took = Vec::new();
    for i in 0..200 {
        let disable = i % 2 == 0;
        let started = Instant::now();
        if disable {
            on_a.disable_manually();
        } else {
            on_a.enable();
        }
        let want = if disable {
            TokenState::Disabled
        } else {
            TokenState::Active
        };
        while on_b.snapshot().state != want {
            if started.elapsed() > Duration::from_secs(5) {
                panic!("change {i} did not reach the other replica in 5 s");
            }
            tokio::time::sleep(Duration::from_micros(100)).await;
        }
        took.push(started.elapsed());
    }
    took.sort();
    println!(
        "propagation A -> B, 200 changes (sync_interval 1s; pub/sub): median {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        quantile(&took, 0.5).as_secs_f64() * 1e3,
        quantile(&took, 0.99).as_secs_f64() * 1e3,
        took.last().unwrap().as_secs_f64() * 1e3
    );
    a.stop().await;
    b.stop().await;
}

/// Runs `n` replicas under traffic; prints and returns the refresh calls
/// per account.
async fn refreshes(n: usize, redis: Option<u16>, alone: Option<f64>) -> f64 {
    let sim = Sim::start().await.unwrap();
    sim.set_jwt_ttl(JWT_LIFE);
    for i in 0..ACCOUNTS {
        let id = format!("acct-{i}");
        sim.add_account(&id, &format!("rt-{i}"));
        sim.set_refresh(&id, RefreshBehaviour::Rotate);
    }
    let mut replicas = Vec::new();
    for node in ["a", "b", "c"].into_iter().take(n) {
        replicas.push(replica(&sim, redis, "refreshes", node).await);
    }
    let addrs: Vec<_> = replicas.iter().map(|r| r.addr).collect();
    let (ok, failed) = traffic::steady(&addrs, TRAFFIC).await;
    let calls = sim.total_refresh_calls();
    let revoked: usize = replicas
        .iter()
        .map(|r| {
            r.generations
                .current()
                .pool
                .snapshots()
                .iter()
                .filter(|s| s.state == TokenState::Revoked)
                .count()
        })
        .sum();
    let per_account = calls as f64 / ACCOUNTS as f64;
    let setup = match (n, redis) {
        (1, _) => "1 replica".to_string(),
        (n, Some(_)) => format!("{n} replicas with [cluster]"),
        (n, None) => format!("{n} replicas without [cluster]"),
    };
    let versus = alone.map_or(String::new(), |a| {
        format!(" (x{:.2} one replica's)", per_account / a)
    });
    println!(
        "{setup}: {ACCOUNTS} accounts, rotating refresh tokens, {}s access tokens, {}s of traffic: \
         {per_account:.1} refresh calls per account{versus}; {ok} requests ok, {failed} failed; \
         {revoked} account copies revoked",
        JWT_LIFE.as_secs(),
        TRAFFIC.as_secs(),
    );
    for r in replicas {
        r.stop().await;
    }
    per_account
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let (mut redis, port) = redis_server(dir.path()).await;
        propagation(port).await;
        let alone = refreshes(1, None, None).await;
        refreshes(3, Some(port), Some(alone)).await;
        refreshes(3, None, Some(alone)).await;
        let _ = redis.kill().await;
    });
}
