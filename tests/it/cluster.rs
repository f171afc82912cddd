//! Cluster mode against a real `redis-server`: two and three replicas in
//! one test sharing rotations, refreshes, quota and manual changes; Redis
//! killed under load, restarted empty, frozen; a replica killed while it
//! holds a refresh lease; sealed tokens; TLS with a password; the state
//! file when Redis is away.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokenpool::pool::{Reason, TokenState};
use tokenpool::sim::{AiBehaviour, RefreshBehaviour};

use crate::harness::{eventually, metric, metric_of, rt, Proxy, Setup};
use crate::process::Running;
use crate::redis_server::{Options, Redis};

pub(crate) const WAIT: Duration = Duration::from_secs(15);

/// Writes `<node>.toml`: the setup's config with a `[cluster]` naming
/// `node` (`more` goes at the end of that section, or after it).
pub(crate) fn replica_config(
    s: &Setup,
    tokens: &[(&str, &str)],
    url: &str,
    node: &str,
    more: &str,
) -> PathBuf {
    let extra = format!(
        "[cluster]\nredis = {url:?}\nkey_prefix = \"it\"\nnode = \"{node}\"\nsync_interval = \"200ms\"\n{more}\n"
    );
    let path = s.dir.path().join(format!("{node}.toml"));
    std::fs::write(&path, s.config(tokens, "", &extra)).unwrap();
    path
}

async fn replica(s: &Setup, tokens: &[(&str, &str)], redis: &Redis, node: &str) -> Proxy {
    let p = Proxy::start(&replica_config(s, tokens, &redis.url(), node, "")).await;
    wait_connected(&p, true).await;
    p
}

pub(crate) fn connected(p: &Proxy) -> bool {
    tokenpool::admin::pool_json(&p.generations)["cluster"]["connected"] == true
}

pub(crate) async fn wait_connected(p: &Proxy, yes: bool) {
    eventually(
        if yes {
            "the replica connected to Redis"
        } else {
            "the replica noticed Redis is away"
        },
        WAIT,
        || async { connected(p) == yes },
    )
    .await;
}

async fn wait_state(p: &Proxy, name: &str, want: (TokenState, Option<Reason>)) {
    eventually(&format!("{name} is {want:?}"), WAIT, || async {
        p.state(name) == want
    })
    .await;
}

fn refresh_token_of(p: &Proxy, name: &str) -> String {
    p.generations
        .current()
        .pool
        .get(name)
        .unwrap()
        .credentials()
        .refresh_token()
        .expose()
        .to_string()
}

async fn admin_post(p: &Proxy, path: &str) {
    let r = p.client.post(p.admin_url(path)).send().await.unwrap();
    assert_eq!(r.status(), 200, "{path}");
}

/// Waits until `p` tried Redis and failed (a sync error counted).
pub(crate) async fn tried_redis(p: &Proxy) {
    eventually("a failed sync with Redis", WAIT, || async {
        metric(
            &p.metrics().await,
            "tokenpool_cluster_sync_total{result=\"error\"}",
        ) >= 1.0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_refresh_once_and_follow_every_rotation() {
    let redis = Redis::start().await;
    let tokens = &[("a", "personal")];
    let s = Setup::new(tokens, "", "").await;
    // Each refresh rotates the refresh token and kills the old one.
    s.sim.set_refresh("a", RefreshBehaviour::Rotate);
    let a = replica(&s, tokens, &redis, "a").await;
    let b = replica(&s, tokens, &redis, "b").await;
    for i in 0..20 {
        let p = if i % 2 == 0 { &a } else { &b };
        assert_eq!(p.ai_text().await.0, 200);
    }
    assert_eq!(
        s.sim.refresh_calls("a"),
        1,
        "one refresh across both replicas"
    );
    let rotated = s.sim.refresh_token("a").unwrap();
    assert_ne!(rotated, rt("a"));
    assert_eq!(refresh_token_of(&a, "a"), rotated);
    assert_eq!(refresh_token_of(&b, "a"), rotated);

    // The upstream forgets every JWT: B refreshes (a second rotation), A
    // takes B's access token instead of refreshing itself.
    s.sim.invalidate_issued_jwts();
    assert_eq!(b.ai_text().await.0, 200);
    assert_eq!(a.ai_text().await.0, 200);
    assert_eq!(s.sim.refresh_calls("a"), 2);
    let rotated = s.sim.refresh_token("a").unwrap();
    eventually("A holds B's rotation", WAIT, || async {
        refresh_token_of(&a, "a") == rotated
    })
    .await;

    // Now A refreshes, with the token B rotated to: the old one is dead,
    // so anything else would revoke the account.
    s.sim.invalidate_issued_jwts();
    assert_eq!(a.ai_text().await.0, 200);
    assert_eq!(s.sim.refresh_calls("a"), 3);
    for p in [&a, &b] {
        assert_eq!(p.ai_text().await.0, 200);
        assert_eq!(p.state("a"), (TokenState::Active, None));
        let m = p.metrics().await;
        assert_eq!(
            metric(
                &m,
                "tokenpool_refreshes_total{outcome=\"revoked\",tier=\"personal\"}"
            ),
            0.0
        );
        assert_eq!(metric(&m, "tokenpool_cluster_up"), 1.0);
    }
    assert_eq!(s.sim.refresh_calls("a"), 3);
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_share_quota_and_manual_changes() {
    let redis = Redis::start().await;
    let tokens = &[("q", "personal"), ("x", "personal"), ("y", "shared")];
    let s = Setup::new(tokens, "", "").await;
    s.sim.set_ai("q", AiBehaviour::Quota);
    let a = replica(&s, tokens, &redis, "a").await;
    let b = replica(&s, tokens, &redis, "b").await;
    let c = replica(&s, tokens, &redis, "c").await;

    // A learns that q is out of quota (one failed attempt, then x).
    for _ in 0..3 {
        assert_eq!(a.ai_text().await.0, 200);
    }
    assert_eq!(s.sim.ai_calls("q"), 1);
    let quota = (TokenState::CoolingDown, Some(Reason::QuotaExhausted));
    assert_eq!(a.state("q"), quota);
    // B and C know it without spending a request on q.
    wait_state(&b, "q", quota).await;
    wait_state(&c, "q", quota).await;
    for _ in 0..10 {
        assert_eq!(b.ai_text().await.0, 200);
        assert_eq!(c.ai_text().await.0, 200);
    }
    assert_eq!(s.sim.ai_calls("q"), 1, "no other replica tried q");

    // Disabled by hand on A: out everywhere; enabled on C: back everywhere.
    admin_post(&a, "/admin/tokens/x/disable").await;
    let manual = (TokenState::Disabled, Some(Reason::Manual));
    wait_state(&b, "x", manual).await;
    wait_state(&c, "x", manual).await;
    admin_post(&c, "/admin/tokens/x/enable").await;
    wait_state(&a, "x", (TokenState::Active, None)).await;
    wait_state(&b, "x", (TokenState::Active, None)).await;

    let m = a.metrics().await;
    assert!(metric(&m, "tokenpool_cluster_events_total{direction=\"sent\"}") >= 2.0);
    assert!(metric(&m, "tokenpool_cluster_events_total{direction=\"received\"}") >= 1.0);
    assert!(metric(&m, "tokenpool_cluster_sync_total{result=\"ok\"}") >= 1.0);
    let pool = b.pool().await;
    assert_eq!(pool["cluster"]["node"], "b");
    assert_eq!(pool["cluster"]["connected"], true);

    // [cluster] does not change under a running replica.
    replica_config(&s, tokens, &redis.url(), "b2", "");
    std::fs::rename(s.dir.path().join("b2.toml"), s.dir.path().join("b.toml")).unwrap();
    let r = b
        .client
        .post(b.admin_url("/admin/reload"))
        .send()
        .await
        .unwrap();
    let summary: serde_json::Value = serde_json::from_str(&r.text().await.unwrap()).unwrap();
    assert_eq!(
        summary["summary"]["needs_restart"],
        serde_json::json!(["[cluster]"])
    );
    assert_eq!(b.pool().await["cluster"]["node"], "b");
    assert!(connected(&b));
    for p in [a, b, c] {
        p.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_under_load_fails_no_request_and_restarted_empty_is_reseeded() {
    let mut redis = Redis::start().await;
    let tokens = &[("a", "personal"), ("b", "personal"), ("c", "shared")];
    let s = Setup::new(tokens, "", "").await;
    let a = Arc::new(replica(&s, tokens, &redis, "a").await);
    let b = Arc::new(replica(&s, tokens, &redis, "b").await);
    // 4 clients, 60 requests each, alternating replicas; once 40 have
    // been answered, every access token is made stale (so requests need
    // refreshes, which ask Redis first) and Redis is killed.
    let done = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let mut clients = Vec::new();
    for w in 0..4 {
        let (a, b) = (Arc::clone(&a), Arc::clone(&b));
        let (done, failed) = (Arc::clone(&done), Arc::clone(&failed));
        clients.push(tokio::spawn(async move {
            for i in 0..60 {
                let p = if (i + w) % 2 == 0 { &a } else { &b };
                if p.ai_text().await.0 != 200 {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
                done.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    eventually("40 answers", WAIT, || async {
        done.load(Ordering::Relaxed) >= 40
    })
    .await;
    s.sim.invalidate_issued_jwts();
    redis.kill().await;
    for client in clients {
        client.await.unwrap();
    }
    assert_eq!(done.load(Ordering::Relaxed), 240);
    assert_eq!(failed.load(Ordering::Relaxed), 0, "no request failed");
    let refreshes = s.sim.total_refresh_calls();
    wait_connected(&a, false).await;
    wait_connected(&b, false).await;
    assert_eq!(metric(&a.metrics().await, "tokenpool_cluster_up"), 0.0);

    // A change while Redis is away stays on its replica, and reaches the
    // other when Redis is back — empty, and re-seeded by the replicas.
    admin_post(&a, "/admin/tokens/c/disable").await;
    redis.restart_empty().await;
    wait_connected(&a, true).await;
    wait_connected(&b, true).await;
    wait_state(&b, "c", (TokenState::Disabled, Some(Reason::Manual))).await;
    let dump = redis.dump("it:token:").await;
    let mut keys: Vec<&str> = dump.iter().map(|(k, _)| k.as_str()).collect();
    keys.dedup();
    assert_eq!(keys.len(), 3, "every token is back in Redis: {keys:?}");
    assert!(
        dump.iter().filter(|(_, v)| v == "at").count() >= 2,
        "access tokens were written back"
    );
    assert_eq!(
        s.sim.total_refresh_calls(),
        refreshes,
        "re-seeding took no refresh: the replicas wrote back what they held"
    );
    let a = Arc::into_inner(a).unwrap();
    let b = Arc::into_inner(b).unwrap();
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_redis_stalls_no_request() {
    let redis = Redis::start().await;
    let tokens = &[("a", "personal")];
    let s = Setup::new(tokens, "", "").await;
    let a = replica(&s, tokens, &redis, "a").await;
    let b = replica(&s, tokens, &redis, "b").await;
    assert_eq!(a.ai_text().await.0, 200);
    assert_eq!(b.ai_text().await.0, 200);

    // SIGSTOP: connections stay open and nothing answers. Every request
    // now needs a refresh, the one path that asks Redis first.
    redis.pause();
    s.sim.invalidate_issued_jwts();
    for i in 0..10 {
        let p = if i % 2 == 0 { &a } else { &b };
        let started = std::time::Instant::now();
        assert_eq!(p.ai_text().await.0, 200);
        // Not a performance figure: a stalled request would wait for as
        // long as Redis is frozen; Redis gets 500 ms per answer.
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "request {i} took {:?}",
            started.elapsed()
        );
    }
    wait_connected(&a, false).await;
    wait_connected(&b, false).await;
    redis.resume();
    wait_connected(&a, true).await;
    wait_connected(&b, true).await;
    assert_eq!(a.ai_text().await.0, 200);
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_killed_holding_a_refresh_lease_delays_the_others_only_until_it_expires() {
    let password = "redis-pw-5d1e9c77";
    let redis = Redis::with(Options {
        password: Some(password.into()),
        ..Options::default()
    })
    .await;
    let tokens = &[("a", "personal")];
    let s = Setup::new(tokens, "", "").await;
    // The harness's [refresh] timeout is 2 s: a lease lasts 3 s.
    s.sim
        .set_refresh("a", RefreshBehaviour::Slow(Duration::from_secs(30)));

    // A real process takes the lease, and its refresh call hangs...
    let config = replica_config(&s, tokens, &redis.url(), "doomed", "");
    let mut doomed = Running::spawn(&config);
    doomed.wait_for("sharing the pool").await;
    let mut conn = redis.conn().await;
    let _: () = redis::cmd("AUTH")
        .arg(password)
        .query_async(&mut conn)
        .await
        .unwrap();
    let leases = || {
        let mut conn = conn.clone();
        async move {
            redis::cmd("KEYS")
                .arg("it:lease:*")
                .query_async::<Vec<String>>(&mut conn)
                .await
                .unwrap()
        }
    };
    eventually("the lease is taken", WAIT, || async {
        !leases().await.is_empty()
    })
    .await;
    let lease = leases().await;
    // ...and it is killed while holding it.
    doomed.child.kill().await.unwrap();
    let before = s.sim.refresh_calls("a");
    for line in doomed.lines() {
        assert!(
            !line.contains(password),
            "the Redis password was logged: {line}"
        );
    }
    s.sim.set_refresh("a", RefreshBehaviour::Ok);

    let a = Arc::new(replica(&s, tokens, &redis, "a").await);
    // A request on A needs a refresh and waits for the lease...
    let request = tokio::spawn({
        let a = Arc::clone(&a);
        async move { a.ai_text().await.0 }
    });
    // ...and while the dead replica's lease lives, nobody refreshes.
    let mut watched = 0;
    let give_up = std::time::Instant::now() + WAIT;
    loop {
        assert!(
            std::time::Instant::now() < give_up,
            "the dead replica's lease never expired"
        );
        let calls = s.sim.refresh_calls("a");
        // (Once it is gone, A takes a lease under the same name.)
        let holder: Option<String> = redis::cmd("GET")
            .arg(&lease[0])
            .query_async(&mut conn.clone())
            .await
            .unwrap();
        if !holder.is_some_and(|h| h.starts_with("doomed ")) {
            break;
        }
        assert_eq!(
            calls, before,
            "a refresh while another replica's lease lived"
        );
        watched += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        watched > 5,
        "the lease was watched while it lived ({watched})"
    );
    // Then A refreshes: the request waited for the lease, not forever.
    assert_eq!(request.await.unwrap(), 200);
    assert_eq!(s.sim.refresh_calls("a"), before + 1);
    let left = leases().await;
    assert!(left.is_empty(), "the lease was given back: {left:?}");
    Arc::into_inner(a).unwrap().stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stored_tokens_are_sealed_and_a_replica_with_another_key_stays_local() {
    let redis = Redis::start().await;
    let tokens = &[("a", "personal"), ("b", "personal")];
    let s = Setup::new(tokens, "", "").await;
    s.sim.set_refresh("a", RefreshBehaviour::Rotate);
    let key = "encryption_key = \"cluster-key-0123456789abcdef\"";
    let a = Proxy::start(&replica_config(&s, tokens, &redis.url(), "a", key)).await;
    wait_connected(&a, true).await;
    let b = Proxy::start(&replica_config(&s, tokens, &redis.url(), "b", key)).await;
    wait_connected(&b, true).await;
    for _ in 0..4 {
        assert_eq!(a.ai_text().await.0, 200);
        assert_eq!(b.ai_text().await.0, 200);
    }
    // What a Redis dump shows: no refresh token, no access token.
    let mut secrets = vec![rt("a"), rt("b"), s.sim.refresh_token("a").unwrap()];
    for name in ["a", "b"] {
        let token = a.generations.current().pool.get(name).unwrap().clone();
        let access = token.credentials().access().expect("refreshed");
        secrets.push(access.bearer().unwrap().to_string());
    }
    let dump = redis.dump("it:").await;
    assert!(dump.len() > 10, "{dump:?}");
    for (key, value) in &dump {
        for secret in &secrets {
            assert!(
                !value.contains(secret.as_str()),
                "{key} holds a token in clear"
            );
        }
    }
    assert!(
        dump.iter().any(|(_, v)| v.starts_with("v1.")),
        "sealed values"
    );
    assert_eq!(refresh_token_of(&b, "a"), s.sim.refresh_token("a").unwrap());

    // Another key: a configuration error. C says so, shares nothing, and
    // refreshes nothing: it cannot tell whether its refresh token is the
    // current one. /readyz takes it out of the load balancer.
    let other = "encryption_key = \"another-key-fedcba9876543210\"";
    let calls = s.sim.refresh_calls("b");
    let c = Proxy::start(&replica_config(
        &s,
        &[("b", "personal")],
        &redis.url(),
        "c",
        other,
    ))
    .await;
    tried_redis(&c).await;
    assert!(!connected(&c));
    assert!(connected(&a) && connected(&b), "the others go on sharing");
    let (status, headers, _) = c.ai_text().await;
    assert_eq!(status, 503);
    assert_eq!(headers["x-tokenpool-error"], "no_token_available");
    assert_eq!(
        s.sim.refresh_calls("b"),
        calls,
        "C presented no refresh token"
    );
    assert_eq!(
        c.state("b"),
        (TokenState::CoolingDown, Some(Reason::ClusterUnavailable))
    );
    let r = c.client.get(c.admin_url("/readyz")).send().await.unwrap();
    assert_eq!(r.status(), 503);
    let why = r.text().await.unwrap();
    assert!(why.contains("sealed with another encryption_key"), "{why}");
    let m = c.metrics().await;
    assert_eq!(metric_of(&m, "tokenpool_cluster_config_ok"), 0.0);
    assert!(
        metric_of(
            &m,
            "tokenpool_cluster_refresh_refused_total{why=\"misconfigured\"}"
        ) >= 1.0
    );
    let dump = redis.dump("it:").await;
    assert!(!dump.iter().any(|(_, v)| v == "c"), "C wrote nothing");
    for p in [a, b, c] {
        p.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rediss_with_a_password_and_a_private_ca() {
    let fixtures = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tls");
    let file = |name: &str| fixtures.join(name).display().to_string();
    let redis = Redis::with(Options {
        password: Some("tls-pw-0c6b2a".into()),
        tls: Some((file("server.pem"), file("server.key"), file("ca.pem"))),
    })
    .await;
    assert!(redis.url().starts_with("rediss://:tls-pw-0c6b2a@"));
    let tokens = &[("a", "personal")];
    let s = Setup::new(tokens, "", "").await;
    let ca = format!("ca_file = {:?}", file("ca.pem"));
    let a = Proxy::start(&replica_config(&s, tokens, &redis.url(), "a", &ca)).await;
    wait_connected(&a, true).await;
    assert_eq!(a.ai_text().await.0, 200);
    a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_state_file_restarts_a_replica_while_redis_is_away() {
    let mut redis = Redis::start().await;
    let tokens = &[("a", "personal")];
    let s = Setup::new(tokens, "", "").await;
    s.sim.set_refresh("a", RefreshBehaviour::Rotate);
    let more = "[state]\npath = \"{dir}/state.json\"";
    let config = replica_config(&s, tokens, &redis.url(), "a", more);
    let a = Proxy::start(&config).await;
    wait_connected(&a, true).await;
    assert_eq!(a.ai_text().await.0, 200);
    a.stop().await;

    // Redis is gone; the replica restarts on its state file, which holds
    // the rotated refresh token. It has rotated: without the cluster to
    // show it is still the current one, it is not presented.
    redis.kill().await;
    let calls = s.sim.refresh_calls("a");
    let a = Proxy::start(&config).await;
    tried_redis(&a).await;
    assert!(!connected(&a));
    assert_ne!(refresh_token_of(&a, "a"), rt("a"), "the state file's token");
    assert_eq!(a.ai_text().await.0, 503);
    assert_eq!(
        a.state("a"),
        (TokenState::CoolingDown, Some(Reason::ClusterUnavailable))
    );
    assert_eq!(s.sim.refresh_calls("a"), calls, "nothing presented alone");
    // Redis comes back empty: after the settle window the replica takes
    // the lease and presents the state file's token, the current one.
    redis.restart_empty().await;
    wait_connected(&a, true).await;
    eventually("the token serves again", WAIT, || async {
        a.ai_text().await.0 == 200
    })
    .await;
    assert_eq!(s.sim.refresh_calls("a"), calls + 1);
    assert_eq!(s.sim.total_superseded_presented(), 0);
    a.stop().await;
}

#[tokio::test]
async fn the_redis_merge_script_decides_as_the_replicas_do() {
    use tokenpool::pool::token::accepts;
    use tokenpool::pool::Stamp;
    let redis = Redis::start().await;
    let mut stamps = vec![Stamp::default()];
    for at in [3u64, 5, 9, 10, 12] {
        for revoked in [false, true] {
            for enabled_at in [0u64, 3, 10] {
                if enabled_at <= at {
                    stamps.push(Stamp {
                        at,
                        revoked,
                        enabled_at,
                    });
                }
            }
        }
    }
    let mut checked = 0;
    for (i, &stored) in stamps.iter().enumerate() {
        // What the replica would hold after the stored write.
        let held = if stored.at > 0 && accepts(Stamp::default(), stored) {
            stored
        } else {
            Stamp::default()
        };
        for &incoming in stamps.iter().filter(|s| s.at > 0) {
            let id = format!("t{i}");
            let script = tokenpool::cluster::script_takes(&redis.url(), &id, stored, incoming)
                .await
                .unwrap();
            assert_eq!(
                script,
                accepts(held, incoming),
                "stored {stored:?} (held {held:?}), incoming {incoming:?}"
            );
            checked += 1;
        }
    }
    assert!(checked > 200, "{checked}");
}
