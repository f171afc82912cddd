//! Cluster mode under faults, against a provider that rotates the refresh
//! token on every refresh and revokes the whole account when a superseded
//! one comes back (`RefreshBehaviour::RotateStrict`), and against one that
//! never rotates (`Ok`). Each fault runs under a steady client loop on real
//! replicas and a real redis-server: Redis killed, frozen, one replica
//! partitioned (a TCP forwarder the test cuts), a wrong or missing
//! encryption key, another pool's key prefix, FLUSHALL with a refresh in
//! flight, an old snapshot restored, a fresh replica while Redis refuses,
//! and every replica SIGKILLed right after a rotation.
//!
//! Every scenario asserts: no superseded refresh token was presented, no
//! account was revoked, no replica marked a token revoked, and the tokens
//! serve again once the fault is gone. Each prints one line of the table
//! in the README (`fault table | …`).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use tokenpool::pool::TokenState;
use tokenpool::sim::{RefreshBehaviour, RefreshMode};

use crate::cluster::{connected, wait_connected, WAIT};
use crate::harness::{eventually, metric_of, Proxy, Setup, CLIENT_KEY};
use crate::process::Running;
use crate::redis_server::Redis;

/// Three accounts whose provider is under test, and one that never
/// rotates in the last tier.
const TOKENS: &[(&str, &str)] = &[
    ("s1", "personal"),
    ("s2", "personal"),
    ("s3", "personal"),
    ("w", "anonymous"),
];
const ROTATING: [&str; 3] = ["s1", "s2", "s3"];
const KEY: &str = "cluster-key-0123456789abcdef";

/// A scene: the simulator with the provider under test, and Redis.
struct Scene {
    s: Setup,
    redis: Redis,
    provider: RefreshBehaviour,
}

impl Scene {
    async fn new(provider: RefreshBehaviour) -> Scene {
        let redis = Redis::start().await;
        let s = Setup::new(TOKENS, "", "").await;
        for name in ROTATING {
            s.sim.set_refresh(name, provider);
        }
        // Short-lived JWTs: tokens are refreshed every second or two.
        s.sim.set_jwt_ttl(Duration::from_secs(3));
        Scene { s, redis, provider }
    }

    /// The config file of replica `node`, through `redis` (a URL), with
    /// `more` in `[cluster]` and more sections after it.
    fn config(&self, node: &str, redis: &str, prefix: &str, more: &str) -> std::path::PathBuf {
        let extra = format!(
            "[cluster]\nredis = {redis:?}\nkey_prefix = \"{prefix}\"\nnode = \"{node}\"\n\
             sync_interval = \"200ms\"\n{more}\n"
        );
        let path = self.s.dir.path().join(format!("{node}.toml"));
        std::fs::write(&path, self.s.config(TOKENS, "max_attempts = 10", &extra)).unwrap();
        path
    }

    /// A replica with the right key and prefix, connected.
    async fn replica(&self, node: &str) -> Arc<Proxy> {
        let path = self.config(
            node,
            &self.redis.url(),
            "it",
            &format!("encryption_key = {KEY:?}"),
        );
        let p = Proxy::start(&path).await;
        wait_connected(&p, true).await;
        Arc::new(p)
    }

    /// Replica `f`, with no history, started now (not waited for), under
    /// a client loop of its own.
    async fn fresh_replica(&self) -> (Arc<Proxy>, Load) {
        let path = self.config(
            "f",
            &self.redis.url(),
            "it",
            &format!("encryption_key = {KEY:?}"),
        );
        let f = Arc::new(Proxy::start(&path).await);
        let load = Load::over(&[&f]);
        (f, load)
    }

    /// Two replicas, `a` and `b`, under a client loop, warmed.
    async fn warm_pair(&self) -> (Arc<Proxy>, Arc<Proxy>, Load) {
        let (a, b) = (self.replica("a").await, self.replica("b").await);
        let load = Load::over(&[&a, &b]);
        self.warm(&load).await;
        (a, b, load)
    }

    /// Until every rotating account was refreshed twice (so its refresh
    /// token has rotated, with a rotating provider).
    async fn warm(&self, load: &Load) {
        eventually(
            "every account refreshed twice, requests served",
            WAIT,
            || async { ROTATING.iter().all(|n| self.s.sim.refresh_calls(n) >= 2) && load.ok() > 0 },
        )
        .await;
    }

    /// Whether every rotating account was refreshed again after `since`
    /// within `limit`.
    async fn refreshed_within(&self, since: &[u64], limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let now = self.refresh_calls();
            if now.iter().zip(since).all(|(n, before)| n > before) {
                return true;
            }
            if tokio::time::Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Until every rotating account was refreshed again after `since`
    /// (its refresh calls then).
    async fn refreshed_after(&self, since: &[u64]) {
        // Recovery takes a reconnection, maybe a fence and a settle window;
        // under a loaded CI machine, more than WAIT.
        eventually(
            "every account refreshed after the fault",
            WAIT * 2,
            || async {
                ROTATING
                    .iter()
                    .zip(since)
                    .all(|(n, before)| self.s.sim.refresh_calls(n) > *before)
            },
        )
        .await;
    }

    fn refresh_calls(&self) -> Vec<u64> {
        ROTATING
            .iter()
            .map(|n| self.s.sim.refresh_calls(n))
            .collect()
    }

    /// After a fault is gone: every replica connected again, every account
    /// refreshed since `before`, then the loop's count and the verdict.
    async fn recovered(
        &self,
        scenario: &str,
        before: &[u64],
        load: Load,
        replicas: Vec<Arc<Proxy>>,
    ) {
        for p in &replicas {
            wait_connected(p, true).await;
        }
        if !self.refreshed_within(before, WAIT * 2).await {
            // What each replica says, to tell a stuck token from a slow one.
            let mut said = String::new();
            for p in &replicas {
                let m = p.metrics().await;
                for line in m.lines().filter(|l| {
                    l.starts_with("tokenpool_cluster_refresh_refused_total")
                        || l.starts_with("tokenpool_cluster_up")
                        || l.starts_with("tokenpool_token_state{")
                        || l.starts_with("tokenpool_refreshes_total")
                }) {
                    said.push_str(&format!("  {line}\n"));
                }
                said.push_str("  --\n");
            }
            panic!(
                "{scenario}: not every account refreshed within {:?} after the fault: \
                 calls before {before:?}, now {:?}\n{said}",
                WAIT * 2,
                self.refresh_calls()
            );
        }
        let result = load.finish().await;
        let views: Vec<&Proxy> = replicas.iter().map(|p| &**p).collect();
        self.verdict(scenario, &result, &views);
        stop_all(replicas).await;
    }

    /// The assertions every scenario makes, and its line of the table.
    fn verdict(&self, scenario: &str, load: &LoadResult, replicas: &[&Proxy]) {
        let superseded = self.s.sim.total_superseded_presented();
        let revoked = self.s.sim.accounts_revoked_by_reuse();
        eprintln!(
            "fault table | {scenario} | {:?} | superseded presented {superseded} | accounts revoked {} | requests {} ok, {} failed",
            self.provider,
            revoked.len(),
            load.ok,
            load.failed
        );
        assert_eq!(
            superseded, 0,
            "{scenario}: a superseded refresh token was presented"
        );
        assert!(
            revoked.is_empty(),
            "{scenario}: accounts revoked: {revoked:?}"
        );
        for p in replicas {
            for name in ROTATING {
                assert_ne!(p.state(name).0, TokenState::Revoked, "{scenario}: {name}");
            }
        }
    }
}

/// A steady client loop over some replicas: one request every 20 ms, to
/// each in turn.
struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    /// Failures per target, by its index.
    failed_at: Arc<Vec<AtomicU64>>,
    task: tokio::task::JoinHandle<()>,
}

struct LoadResult {
    ok: u64,
    failed: u64,
}

impl Load {
    /// Loops over the proxy listeners at `targets` (`host:port`).
    fn start(targets: Vec<String>) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let failed_at = Arc::new(
            (0..targets.len())
                .map(|_| AtomicU64::new(0))
                .collect::<Vec<_>>(),
        );
        let task = {
            let (stop, ok, failed, failed_at) = (
                Arc::clone(&stop),
                Arc::clone(&ok),
                Arc::clone(&failed),
                Arc::clone(&failed_at),
            );
            tokio::spawn(async move {
                let client = reqwest::Client::builder()
                    .timeout(Duration::from_secs(10))
                    .build()
                    .unwrap();
                let mut i = 0;
                while !stop.load(Ordering::Relaxed) {
                    let at = i % targets.len();
                    let answer = client
                        .post(format!("http://{}/ai/multi-agent", targets[at]))
                        .bearer_auth(CLIENT_KEY)
                        .body("x")
                        .send()
                        .await;
                    let good = match answer {
                        Ok(r) => r.status() == 200 && r.bytes().await.is_ok(),
                        Err(_) => false,
                    };
                    if good {
                        ok.fetch_add(1, Ordering::Relaxed);
                    } else {
                        failed.fetch_add(1, Ordering::Relaxed);
                        failed_at[at].fetch_add(1, Ordering::Relaxed);
                    }
                    i += 1;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            })
        };
        Load {
            stop,
            ok,
            failed,
            failed_at,
            task,
        }
    }

    fn over(replicas: &[&Proxy]) -> Load {
        Load::start(replicas.iter().map(|p| p.addr.to_string()).collect())
    }

    fn ok(&self) -> u64 {
        self.ok.load(Ordering::Relaxed)
    }

    fn failed_at(&self, i: usize) -> u64 {
        self.failed_at[i].load(Ordering::Relaxed)
    }

    async fn finish(self) -> LoadResult {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.unwrap();
        LoadResult {
            ok: self.ok.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
        }
    }
}

/// A TCP forwarder to Redis that the test can cut (a partition) and heal.
struct Forwarder {
    port: u16,
    cut: watch::Sender<bool>,
}

impl Forwarder {
    async fn start(to: u16) -> Forwarder {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (cut, _) = watch::channel(false);
        let rx = cut.subscribe();
        tokio::spawn(async move {
            loop {
                let Ok((mut client, _)) = listener.accept().await else {
                    return;
                };
                let mut cut = rx.clone();
                if *cut.borrow() {
                    // Partitioned: the connection goes nowhere.
                    drop(client);
                    continue;
                }
                tokio::spawn(async move {
                    let Ok(mut server) = TcpStream::connect(("127.0.0.1", to)).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = cut.wait_for(|c| *c) => {}
                    }
                });
            }
        });
        Forwarder { port, cut }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    fn set_cut(&self, cut: bool) {
        self.cut.send_replace(cut);
    }
}

async fn stop_all(replicas: Vec<Arc<Proxy>>) {
    for p in replicas {
        if let Some(p) = Arc::into_inner(p) {
            p.stop().await;
        }
    }
}

/// How long a fault lasts: longer than an access token lives, so that
/// refreshes come due during it.
const FAULT: Duration = Duration::from_secs(4);

async fn redis_killed(provider: RefreshBehaviour) {
    let mut scene = Scene::new(provider).await;
    let (a, b, load) = scene.warm_pair().await;
    scene.redis.kill().await;
    tokio::time::sleep(FAULT).await;
    let before = scene.refresh_calls();
    scene.redis.restart_empty().await;
    scene
        .recovered("Redis SIGKILL, back empty", &before, load, vec![a, b])
        .await;
}

async fn redis_frozen(provider: RefreshBehaviour) {
    let scene = Scene::new(provider).await;
    let (a, b, load) = scene.warm_pair().await;
    scene.redis.pause();
    tokio::time::sleep(FAULT).await;
    let before = scene.refresh_calls();
    scene.redis.resume();
    scene
        .recovered("Redis SIGSTOP", &before, load, vec![a, b])
        .await;
}

async fn one_replica_partitioned(provider: RefreshBehaviour) {
    let scene = Scene::new(provider).await;
    let forwarder = Forwarder::start(scene.redis.port).await;
    let a = scene.replica("a").await;
    let key = format!("encryption_key = {KEY:?}");
    let b = Arc::new(Proxy::start(&scene.config("b", &forwarder.url(), "it", &key)).await);
    wait_connected(&b, true).await;
    let load = Load::over(&[&a, &b]);
    scene.warm(&load).await;
    forwarder.set_cut(true);
    wait_connected(&b, false).await;
    let a_failed = load.failed_at(0);
    tokio::time::sleep(FAULT).await;
    assert_eq!(
        load.failed_at(0),
        a_failed,
        "the connected replica keeps serving through the other's partition"
    );
    assert!(connected(&a));
    let before = scene.refresh_calls();
    forwarder.set_cut(false);
    // The backoff is bounded: a healed partition is seen within seconds.
    eventually(
        "B sees the healed partition",
        Duration::from_secs(8),
        || async { connected(&b) },
    )
    .await;
    scene.refreshed_after(&before).await;
    let result = load.finish().await;
    scene.verdict("one replica partitioned", &result, &[&a, &b]);
    stop_all(vec![a, b]).await;
}

async fn wrong_and_missing_key(provider: RefreshBehaviour) {
    let scene = Scene::new(provider).await;
    let (a, b, load) = scene.warm_pair().await;
    let wrong = scene.config(
        "c",
        &scene.redis.url(),
        "it",
        "encryption_key = \"another-key-fedcba9876543210\"",
    );
    let missing = scene.config("d", &scene.redis.url(), "it", "");
    let c = Arc::new(Proxy::start(&wrong).await);
    let d = Arc::new(Proxy::start(&missing).await);
    let misconfigured = Load::over(&[&c, &d]);
    for p in [&c, &d] {
        eventually("the configuration error is seen", WAIT, || async {
            metric_of(&p.metrics().await, "tokenpool_cluster_config_ok") == 0.0
        })
        .await;
        let r = p.client.get(p.admin_url("/readyz")).send().await.unwrap();
        assert_eq!(r.status(), 503, "/readyz says why");
    }
    let before = scene.refresh_calls();
    tokio::time::sleep(FAULT).await;
    scene.refreshed_after(&before).await;
    assert_eq!(load.failed_at(0) + load.failed_at(1), 0, "A and B serve on");
    let wrong_side = misconfigured.finish().await;
    let result = load.finish().await;
    eprintln!(
        "fault table | wrong/missing key: the misconfigured replicas | {:?} | requests {} ok, {} failed",
        provider, wrong_side.ok, wrong_side.failed
    );
    scene.verdict(
        "wrong and missing encryption_key",
        &result,
        &[&a, &b, &c, &d],
    );
    stop_all(vec![a, b, c, d]).await;
}

async fn another_prefix(provider: RefreshBehaviour) {
    let scene = Scene::new(provider).await;
    let (a, b, load) = scene.warm_pair().await;
    let key = format!("encryption_key = {KEY:?}");
    let other = Arc::new(Proxy::start(&scene.config("c", &scene.redis.url(), "other", &key)).await);
    for p in [&a, &b, &other] {
        eventually("the clash is seen on both sides", WAIT, || async {
            metric_of(&p.metrics().await, "tokenpool_cluster_config_ok") == 0.0
        })
        .await;
    }
    tokio::time::sleep(FAULT).await;
    // The other pool goes: this one takes its tokens back.
    Arc::into_inner(other).unwrap().stop().await;
    let before = scene.refresh_calls();
    for p in [&a, &b] {
        eventually("the clash is over", Duration::from_secs(20), || async {
            metric_of(&p.metrics().await, "tokenpool_cluster_config_ok") == 1.0
        })
        .await;
    }
    scene.refreshed_after(&before).await;
    let result = load.finish().await;
    scene.verdict(
        "another key_prefix with the same tokens",
        &result,
        &[&a, &b],
    );
    stop_all(vec![a, b]).await;
}

async fn flushall_in_flight(provider: RefreshBehaviour) {
    let scene = Scene::new(provider).await;
    let (a, b, load) = scene.warm_pair().await;
    // Every refresh now takes 1.5 s: some are in flight when Redis is
    // flushed, their leases gone with it.
    scene
        .s
        .sim
        .set_refresh_mode(RefreshMode::Slow(Duration::from_millis(1500)));
    let before = scene.refresh_calls();
    eventually("a refresh is in flight", WAIT, || async {
        a.generations
            .current()
            .pool
            .tokens()
            .iter()
            .any(|t| t.credentials().refresh_in_flight())
            || b.generations
                .current()
                .pool
                .tokens()
                .iter()
                .any(|t| t.credentials().refresh_in_flight())
    })
    .await;
    scene.redis.flushall().await;
    tokio::time::sleep(FAULT).await;
    scene.s.sim.set_refresh_mode(RefreshMode::Normal);
    scene.refreshed_after(&before).await;
    let result = load.finish().await;
    scene.verdict("FLUSHALL with a refresh in flight", &result, &[&a, &b]);
    stop_all(vec![a, b]).await;
}

async fn old_snapshot_restored(provider: RefreshBehaviour) {
    let mut scene = Scene::new(provider).await;
    let (a, b, load) = scene.warm_pair().await;
    let snapshot = scene.redis.snapshot().await;
    let before = scene.refresh_calls();
    // Rotations after the snapshot: what it holds is superseded.
    scene.refreshed_after(&before).await;
    scene.redis.restore(&snapshot).await;
    // A replica with no history starts at once, as after a rollout.
    let (f, fresh) = scene.fresh_replica().await;
    tokio::time::sleep(FAULT).await;
    let before = scene.refresh_calls();
    scene.refreshed_after(&before).await;
    let result = load.finish().await;
    let fresh = fresh.finish().await;
    let all = LoadResult {
        ok: result.ok + fresh.ok,
        failed: result.failed + fresh.failed,
    };
    scene.verdict("old snapshot restored, fresh replica", &all, &[&a, &b, &f]);
    stop_all(vec![a, b, f]).await;
}

async fn fresh_replica_refused(provider: RefreshBehaviour) {
    let mut scene = Scene::new(provider).await;
    let (a, b, load) = scene.warm_pair().await;
    scene.redis.kill().await;
    let (f, fresh) = scene.fresh_replica().await;
    tokio::time::sleep(FAULT).await;
    let before = scene.refresh_calls();
    scene.redis.restart_empty().await;
    for p in [&a, &b, &f] {
        wait_connected(p, true).await;
    }
    scene.refreshed_after(&before).await;
    eventually("the fresh replica serves", WAIT, || async {
        f.ai_text().await.0 == 200
    })
    .await;
    let result = load.finish().await;
    let fresh = fresh.finish().await;
    eprintln!(
        "fault table | fresh replica while Redis refuses: the fresh one | {:?} | requests {} ok, {} failed",
        provider, fresh.ok, fresh.failed
    );
    scene.verdict("fresh replica while Redis refuses", &result, &[&a, &b, &f]);
    stop_all(vec![a, b, f]).await;
}

/// Replicas as processes with state files, SIGKILLed together right after
/// a rotation; Redis comes back empty; the one that did not rotate starts
/// first.
async fn every_replica_killed_after_a_rotation(provider: RefreshBehaviour) {
    let mut scene = Scene::new(provider).await;
    let key = format!("encryption_key = {KEY:?}");
    let paths: Vec<_> = ["a", "b"]
        .iter()
        .map(|node| {
            let state = format!("{key}\n[state]\npath = \"{{dir}}/{node}-state.json\"");
            scene.config(node, &scene.redis.url(), "it", &state)
        })
        .collect();
    let mut running = Vec::new();
    let mut addrs = Vec::new();
    for path in &paths {
        let mut run = Running::spawn(path);
        addrs.push(run.addr("proxy listening", "proxy_addr").await);
        run.wait_for("sharing the pool").await;
        running.push(run);
    }
    let load = Load::start(addrs.clone());
    scene.warm(&load).await;
    let calls: u64 = scene.refresh_calls().iter().sum();
    eventually("a rotation", WAIT, || async {
        scene.refresh_calls().iter().sum::<u64>() > calls
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    for run in &mut running {
        run.child.kill().await.unwrap();
    }
    let first = load.finish().await;
    scene.redis.restart_empty().await;
    let before = scene.refresh_calls();
    let mut again = Vec::new();
    let mut addrs = Vec::new();
    for path in paths.iter().rev() {
        let mut run = Running::spawn(path);
        addrs.push(run.addr("proxy listening", "proxy_addr").await);
        again.push(run);
    }
    let load = Load::start(addrs);
    scene.refreshed_after(&before).await;
    let second = load.finish().await;
    let all = LoadResult {
        ok: first.ok + second.ok,
        failed: first.failed + second.failed,
    };
    scene.verdict(
        "every replica SIGKILLed after a rotation, Redis emptied",
        &all,
        &[],
    );
    for run in &mut again {
        let _ = run.child.kill().await;
    }
}

macro_rules! scenarios {
    ($($name:ident => $scenario:ident),* $(,)?) => {
        mod strict {
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    $scenario(RefreshBehaviour::RotateStrict).await;
                }
            )*
        }
        mod non_rotating {
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    $scenario(RefreshBehaviour::Ok).await;
                }
            )*
        }
    };
}

scenarios! {
    redis_sigkill => redis_killed,
    redis_sigstop => redis_frozen,
    partition => one_replica_partitioned,
    wrong_or_missing_key => wrong_and_missing_key,
    another_prefix_with_the_same_tokens => another_prefix,
    flushall_with_a_refresh_in_flight => flushall_in_flight,
    old_rdb_restored => old_snapshot_restored,
    fresh_replica_while_redis_refuses => fresh_replica_refused,
    sigkill_of_every_replica_after_a_rotation => every_replica_killed_after_a_rotation,
}
