//! Refresh against the simulated endpoint: single flight, revocation,
//! rotation across a restart, outages, and 429 back-off.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokenpool::pool::{Reason, TokenState};
use tokenpool::sim::{RefreshBehaviour, RefreshMode};

use crate::harness::{eventually, metric, rt, Setup};

#[tokio::test]
async fn a_hundred_cold_requests_cause_one_refresh() {
    let s = Setup::new(&[("a", "personal")], "", "").await;
    // Slow enough that every request arrives while the refresh is under way.
    s.sim
        .set_refresh_mode(RefreshMode::Slow(Duration::from_millis(300)));
    let p = Arc::new(s.proxy().await);
    let mut tasks = Vec::new();
    for _ in 0..100 {
        let p = Arc::clone(&p);
        tasks.push(tokio::spawn(async move { p.ai_text().await.0 }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200);
    }
    assert_eq!(s.sim.refresh_calls("a"), 1);
    assert_eq!(s.sim.total_refresh_calls(), 1);
    assert_eq!(s.sim.ai_calls("a"), 100);
}

#[tokio::test]
async fn a_revoked_token_is_sent_at_most_once() {
    let s = Setup::new(&[("dead", "personal"), ("ok", "shared")], "", "").await;
    s.sim.set_refresh("dead", RefreshBehaviour::Revoked);
    let p = s.proxy().await;
    for _ in 0..10 {
        assert_eq!(p.ai_text().await.0, 200);
    }
    assert_eq!(s.sim.refresh_calls("dead"), 1);
    assert_eq!(
        p.state("dead"),
        (TokenState::Revoked, Some(Reason::Revoked))
    );
    let m = p.metrics().await;
    assert_eq!(
        metric(
            &m,
            "tokenpool_refreshes_total{outcome=\"revoked\",tier=\"personal\"}"
        ),
        1.0
    );
    assert_eq!(
        metric(&m, "tokenpool_tokens{state=\"revoked\",tier=\"personal\"}"),
        1.0
    );
    // The background refresher leaves it alone too: a pass of it starts
    // no refresh for the revoked token.
    background_pass(&p);
    let g = p.generations.current();
    assert!(!g
        .pool
        .get("dead")
        .unwrap()
        .credentials()
        .refresh_in_flight());
    assert_eq!(s.sim.refresh_calls("dead"), 1);
}

/// Runs one pass of the background refresher over the current generation,
/// as its once-a-second loop does; refreshes it starts are under way when
/// this returns.
fn background_pass(p: &crate::harness::Proxy) {
    let g = p.generations.current();
    let limit = Arc::new(tokio::sync::Semaphore::new(
        tokenpool::refresh::BACKGROUND_CONCURRENCY,
    ));
    g.refresher.scan(&g.pool, &limit);
}

#[tokio::test]
async fn a_rotated_refresh_token_survives_a_restart() {
    let s = Setup::new(
        &[("a", "personal")],
        "",
        "[state]\npath = \"{dir}/state.json\"",
    )
    .await;
    s.sim.set_refresh("a", RefreshBehaviour::Rotate);
    let p = s.proxy().await;
    assert_eq!(p.ai_text().await.0, 200);
    let rotated = s.sim.refresh_token("a").unwrap();
    assert_ne!(
        rotated,
        rt("a"),
        "the simulator rotated it; the old one is now dead"
    );
    let state = std::fs::read_to_string(s.dir.path().join("state.json")).unwrap();
    assert!(state.contains(&rotated), "persisted before use");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(s.dir.path().join("state.json"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    p.stop().await;

    // A new process with the same config: it must use the rotated token,
    // since the configured one is no longer valid.
    s.sim.set_refresh("a", RefreshBehaviour::Ok);
    let p = s.proxy().await;
    assert_eq!(p.ai_text().await.0, 200);
    assert_eq!(p.state("a"), (TokenState::Active, None));
    assert_eq!(s.sim.refresh_calls("a"), 2);
}

#[tokio::test]
async fn an_outage_longer_than_the_access_token_recovers_within_seconds() {
    let s = Setup::new(&[("a", "personal"), ("b", "shared")], "", "").await;
    s.write_replacing(
        &[("a", "personal"), ("b", "shared")],
        "timeout = \"2s\"",
        "timeout = \"2s\"\nmargin = \"0s\"",
    );
    s.sim.set_jwt_ttl(Duration::from_secs(2));
    let p = s.proxy().await;
    assert_eq!(p.ai_text().await.0, 200);
    s.sim.set_refresh_mode(RefreshMode::Down);
    // The access tokens run out; nothing can be refreshed: 503.
    eventually(
        "503 once access tokens expired",
        Duration::from_secs(10),
        || async { p.ai_text().await.0 == 503 },
    )
    .await;
    let pool = p.pool().await;
    for t in pool["tokens"].as_array().unwrap() {
        assert_ne!(t["state"], "disabled", "an outage disables nobody: {t}");
        assert_ne!(t["state"], "revoked");
    }
    // Let the per-token rests grow (1 s, 2 s, 4 s…): several failed calls.
    let during = s.sim.total_refresh_calls();
    eventually(
        "the outage lasts a few refresh attempts",
        Duration::from_secs(10),
        || async { s.sim.total_refresh_calls() >= during + 4 },
    )
    .await;
    s.sim.set_refresh_mode(RefreshMode::Normal);
    let back = Instant::now();
    eventually("serving again", Duration::from_secs(12), || async {
        p.ai_text().await.0 == 200
    })
    .await;
    let took = back.elapsed();
    assert!(
        took <= Duration::from_secs(11),
        "served again after {took:?}"
    );
    let pool = p.pool().await;
    for t in pool["tokens"].as_array().unwrap() {
        assert_ne!(t["state"], "disabled", "{t}");
    }
}

#[tokio::test]
async fn valid_access_tokens_keep_serving_while_refresh_fails() {
    let s = Setup::new(&[("a", "personal")], "", "").await;
    // A margin above the JWT's life is cut to half of it: with 6 s JWTs the
    // background refresher starts trying after about 3 s, and retries every
    // second while the token stays valid.
    s.write_replacing(
        &[("a", "personal")],
        "timeout = \"2s\"",
        "timeout = \"2s\"\nmargin = \"2h\"",
    );
    s.sim.set_jwt_ttl(Duration::from_secs(6));
    let p = s.proxy().await;
    assert_eq!(p.ai_text().await.0, 200);
    s.sim.set_refresh_mode(RefreshMode::Down);
    let before = s.sim.total_refresh_calls();
    eventually(
        "background refresh attempted and failed",
        Duration::from_secs(5),
        || async { s.sim.total_refresh_calls() > before },
    )
    .await;
    for _ in 0..5 {
        assert_eq!(p.ai_text().await.0, 200);
    }
    assert_eq!(p.state("a"), (TokenState::Active, None));
    let m = p.metrics().await;
    assert!(
        metric(
            &m,
            "tokenpool_refreshes_total{outcome=\"unavailable\",tier=\"personal\"}"
        ) >= 1.0
    );
}

#[tokio::test]
async fn a_429_from_the_refresh_endpoint_pauses_all_refreshing_without_blame() {
    let s = Setup::new(&[("a", "personal"), ("b", "personal")], "", "").await;
    s.sim.set_refresh_mode(RefreshMode::RateLimited(Some(60)));
    let p = s.proxy().await;
    let (status, headers, _) = p.ai_text().await;
    assert_eq!(status, 503);
    let retry: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((58..=60).contains(&retry), "retry after the pause: {retry}");
    // Calls already under way when the 429 came back may land too (the
    // background refresher starts both cold tokens at once); after the 429
    // nothing more reaches the endpoint.
    let after_429 = s.sim.total_refresh_calls();
    assert!((1..=2).contains(&after_429), "{after_429}");
    for _ in 0..5 {
        assert_eq!(p.ai_text().await.0, 503);
    }
    // Nor does the background refresher, pass after pass.
    for _ in 0..3 {
        background_pass(&p);
        let g = p.generations.current();
        for name in ["a", "b"] {
            assert!(
                !g.pool.get(name).unwrap().credentials().refresh_in_flight(),
                "{name}"
            );
        }
    }
    assert_eq!(
        s.sim.total_refresh_calls(),
        after_429,
        "everyone waits out the pause"
    );
    assert_eq!(p.state("a").0, TokenState::Active);
    assert_eq!(p.state("b").0, TokenState::Active);
}

#[tokio::test]
async fn garbage_and_slow_refresh_answers_are_not_the_tokens_fault() {
    let s = Setup::new(&[("a", "personal")], "failure_threshold = 1", "").await;
    s.sim.set_refresh_mode(RefreshMode::Garbage);
    let p = s.proxy().await;
    assert_eq!(p.ai_text().await.0, 503);
    assert_eq!(
        p.state("a"),
        (TokenState::CoolingDown, Some(Reason::RefreshFailed))
    );
    s.sim
        .set_refresh_mode(RefreshMode::Slow(Duration::from_secs(5)));
    eventually(
        "its one-second rest is over",
        Duration::from_secs(5),
        || async { p.state("a").0 == TokenState::Active },
    )
    .await;
    // The refresh times out after 2 s: still no blame.
    let (status, _, _) = p.ai_text().await;
    assert_eq!(status, 503);
    assert_ne!(p.state("a").0, TokenState::Disabled);
    s.sim.set_refresh_mode(RefreshMode::Normal);
    eventually("serving again", Duration::from_secs(12), || async {
        p.ai_text().await.0 == 200
    })
    .await;
}

#[tokio::test]
async fn one_tokens_refresh_failing_leaves_the_others_serving() {
    let tokens = &[
        ("down", "personal"),
        ("limited", "personal"),
        ("slow", "personal"),
        ("ok", "shared"),
    ];
    let s = Setup::new(tokens, "failure_threshold = 1", "").await;
    s.sim.set_refresh("down", RefreshBehaviour::ServerError);
    s.sim
        .set_refresh("limited", RefreshBehaviour::RateLimited(Some(30)));
    s.sim
        .set_refresh("slow", RefreshBehaviour::Slow(Duration::from_secs(5)));
    let p = s.proxy().await;
    for _ in 0..3 {
        assert_eq!(p.ai_text().await.0, 200);
    }
    // A 5xx or slow refresh is not the token's fault: resting, not disabled.
    for name in ["down", "slow"] {
        let (state, _) = p.state(name);
        assert_ne!(state, TokenState::Disabled, "{name}");
        assert_ne!(state, TokenState::Revoked, "{name}");
    }
    assert_ne!(p.state("limited").0, TokenState::Disabled);
    assert!(s.sim.ai_calls("ok") >= 1);
    let m = p.metrics().await;
    assert!(
        metric(
            &m,
            "tokenpool_refreshes_total{outcome=\"unavailable\",tier=\"personal\"}"
        ) >= 1.0
    );
}

#[tokio::test]
async fn the_simulator_refuses_refresh_calls_without_warps_key_or_client_headers() {
    let s = Setup::new(&[("a", "personal")], "failure_threshold = 5", "").await;
    // The key left out of the refresh URL: Warp answers 400, and so does
    // the simulator.
    let keyless = s.sim.refresh_url().replace("?key=sim-web-api-key", "");
    s.write_replacing(&[("a", "personal")], &s.sim.refresh_url(), &keyless);
    let p = s.proxy().await;
    assert_eq!(p.ai_text().await.0, 503);
    assert_eq!(
        s.sim.refresh_calls("a"),
        0,
        "refused before the token was read"
    );
    let m = p.metrics().await;
    assert!(
        metric(
            &m,
            "tokenpool_refreshes_total{outcome=\"failed\",tier=\"personal\"}"
        ) >= 1.0
    );
    drop(p);
    // Without the preset's client headers, the same.
    let s = Setup::new(&[("a", "personal")], "failure_threshold = 5", "").await;
    s.write_replacing(&[("a", "personal")], "preset = \"warp\"\n", "");
    let p = s.proxy().await;
    assert_eq!(p.ai_text().await.0, 503);
    assert_eq!(s.sim.refresh_calls("a"), 0);
    // The refresh was tried, and refused.
    assert!(
        metric(
            &p.metrics().await,
            "tokenpool_refreshes_total{outcome=\"failed\",tier=\"personal\"}"
        ) >= 1.0
    );
}
