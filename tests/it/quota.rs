//! Quota awareness and session affinity: each header family, malformed
//! values, polling Warp's quota query on the simulator (and its failures),
//! resting until the refill without a request spent, `most_remaining`, and
//! sessions staying on their token.

use std::time::{Duration, SystemTime};

use tokenpool::pool::{Reason, TokenState};
use tokenpool::sim::{AiBehaviour, QuotaMode};

use crate::harness::{eventually, metric, Setup, CLIENT_KEY};

const WAIT: Duration = Duration::from_secs(10);
const QUOTA_EXHAUSTED: (TokenState, Option<Reason>) =
    (TokenState::CoolingDown, Some(Reason::QuotaExhausted));

fn quota_of(pool: &serde_json::Value, name: &str) -> serde_json::Value {
    pool["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == name)
        .unwrap()["quota"]
        .clone()
}

#[tokio::test]
async fn each_header_family_is_learned_and_none_left_rests_until_the_reset() {
    let tokens = &[
        ("openai", "personal"),
        ("anthropic", "personal"),
        ("ietf", "personal"),
        ("garbled", "personal"),
    ];
    let s = Setup::new(tokens, "", "").await;
    let in_an_hour =
        humantime::format_rfc3339_seconds(SystemTime::now() + Duration::from_secs(3600));
    s.sim.set_answer_headers(
        "openai",
        &[
            ("x-ratelimit-limit-requests", "100"),
            ("x-ratelimit-remaining-requests", "5"),
            ("x-ratelimit-reset-requests", "6m0s"),
        ],
    );
    s.sim.set_answer_headers(
        "anthropic",
        &[
            ("anthropic-ratelimit-requests-limit", "50"),
            ("anthropic-ratelimit-requests-remaining", "0"),
            (
                "anthropic-ratelimit-requests-reset",
                &in_an_hour.to_string(),
            ),
        ],
    );
    s.sim.set_answer_headers(
        "ietf",
        &[
            ("RateLimit-Limit", "10"),
            ("RateLimit-Remaining", "7"),
            ("RateLimit-Reset", "60"),
        ],
    );
    s.sim.set_answer_headers(
        "garbled",
        &[
            ("x-ratelimit-remaining-requests", "-5"),
            ("ratelimit-remaining", "lots"),
            (
                "anthropic-ratelimit-requests-remaining",
                "99999999999999999999",
            ),
            ("x-ratelimit-reset-requests", "forever"),
        ],
    );
    let p = s.proxy().await;
    for _ in 0..4 {
        assert_eq!(p.ai_text().await.0, 200);
    }
    let pool = p.pool().await;
    let openai = quota_of(&pool, "openai");
    assert_eq!(
        (&openai["limit"], &openai["remaining"]),
        (&100.into(), &5.into())
    );
    assert!(openai["resets_at"].is_string());
    let ietf = quota_of(&pool, "ietf");
    assert_eq!(
        (&ietf["limit"], &ietf["remaining"]),
        (&10.into(), &7.into())
    );
    assert!(
        quota_of(&pool, "garbled").is_null(),
        "nonsense teaches nothing"
    );
    assert_eq!(p.state("garbled"), (TokenState::Active, None));
    // None left: rests until the reset the headers gave, an hour away.
    assert_eq!(p.state("anthropic"), QUOTA_EXHAUSTED);
    let token = p
        .generations
        .current()
        .pool
        .get("anthropic")
        .unwrap()
        .clone();
    let back = token.snapshot().cooldown_until.unwrap();
    let reset = humantime::parse_rfc3339(&in_an_hour.to_string()).unwrap();
    assert!(back.duration_since(reset).unwrap_or_default() < Duration::from_secs(2));
    assert!(reset.duration_since(back).unwrap_or_default() < Duration::from_secs(2));
    for _ in 0..9 {
        assert_eq!(p.ai_text().await.0, 200);
    }
    assert_eq!(
        s.sim.ai_calls("anthropic"),
        1,
        "no request spent to learn it again"
    );
    let m = p.metrics().await;
    assert_eq!(
        metric(
            &m,
            "tokenpool_token_quota_remaining{tier=\"personal\",token=\"ietf\"}"
        ),
        7.0
    );
    assert_eq!(
        metric(
            &m,
            "tokenpool_token_quota_limit{tier=\"personal\",token=\"openai\"}"
        ),
        100.0
    );
    p.stop().await;
}

/// A setup whose quotas are polled from the simulator's Warp endpoint.
async fn polled(tokens: &[(&str, &str)], pool: &str) -> Setup {
    Setup::new(
        tokens,
        pool,
        "[quota]\nprovider = \"warp\"\ninterval = \"10s\"",
    )
    .await
}

#[tokio::test]
async fn polled_quotas_rest_an_empty_token_without_a_request_and_survive_failures() {
    let tokens = &[("full", "personal"), ("empty", "personal")];
    let s = polled(tokens, "").await;
    let refill = SystemTime::now() + Duration::from_secs(10 * 24 * 3600);
    s.sim.set_quota("full", 150, 12, refill);
    s.sim.set_quota("empty", 150, 150, refill);
    let p = s.proxy().await;
    // Polled after each token's first refresh.
    eventually("both quotas were polled", WAIT, || async {
        let pool = p.pool().await;
        quota_of(&pool, "full")["remaining"] == 138 && quota_of(&pool, "empty")["remaining"] == 0
    })
    .await;
    assert_eq!(p.state("empty"), QUOTA_EXHAUSTED);
    for _ in 0..10 {
        assert_eq!(p.ai_text().await.0, 200);
    }
    assert_eq!(s.sim.ai_calls("empty"), 0, "not one request spent on it");
    assert_eq!(s.sim.quota_refusals("empty"), 0);
    // What is answered counts down from what was polled.
    assert_eq!(quota_of(&p.pool().await, "full")["remaining"], 128);

    // The quota endpoint fails: requests go on, what is known stays.
    for mode in [QuotaMode::Errors, QuotaMode::Down] {
        s.sim.set_quota_mode(mode);
        let failed_before = metric(
            &p.metrics().await,
            "tokenpool_quota_polls_total{result=\"failed\"}",
        );
        // A new access token asks for a poll.
        s.sim.invalidate_issued_jwts();
        assert_eq!(p.ai_text().await.0, 200);
        eventually("a poll failed", WAIT, || async {
            metric(
                &p.metrics().await,
                "tokenpool_quota_polls_total{result=\"failed\"}",
            ) > failed_before
        })
        .await;
        assert_eq!(p.ai_text().await.0, 200);
        assert!(
            quota_of(&p.pool().await, "full")["remaining"]
                .as_u64()
                .unwrap()
                < 128
        );
    }
    p.stop().await;
}

#[tokio::test]
async fn a_quota_429_with_a_known_refill_rests_until_it() {
    let tokens = &[("q", "personal"), ("spare", "shared")];
    let s = polled(tokens, "").await;
    let refill = SystemTime::now() + Duration::from_secs(2 * 24 * 3600);
    s.sim.set_quota("q", 150, 50, refill);
    let p = s.proxy().await;
    eventually("q's quota was polled", WAIT, || async {
        quota_of(&p.pool().await, "q")["remaining"] == 100
    })
    .await;
    // The upstream says no quota, though the count said 100 left (someone
    // else spent it): the rest lasts until the refill, not 10 minutes.
    s.sim.set_ai("q", AiBehaviour::Quota);
    assert_eq!(p.ai_text().await.0, 200);
    assert_eq!(p.state("q"), QUOTA_EXHAUSTED);
    let token = p.generations.current().pool.get("q").unwrap().clone();
    let back = token.snapshot().cooldown_until.unwrap();
    assert!(
        back > SystemTime::now() + Duration::from_secs(24 * 3600),
        "rests until the refill: {back:?}"
    );
    p.stop().await;
}

#[tokio::test]
async fn most_remaining_takes_the_fullest_token() {
    let tokens = &[("rich", "personal"), ("poor", "personal")];
    let s = Setup::new(tokens, "strategy = \"most_remaining\"", "").await;
    s.sim
        .set_answer_headers("rich", &[("RateLimit-Remaining", "900")]);
    s.sim
        .set_answer_headers("poor", &[("RateLimit-Remaining", "30")]);
    let p = s.proxy().await;
    for _ in 0..20 {
        assert_eq!(p.ai_text().await.0, 200);
    }
    // Unknown counts as full: each is tried until its count is known, then
    // the fullest takes every request.
    assert_eq!(s.sim.ai_calls("poor"), 1);
    assert_eq!(s.sim.ai_calls("rich"), 19);
    p.stop().await;
}

#[tokio::test]
async fn sessions_stay_on_their_token_until_it_rests() {
    let tokens = &[
        ("a", "personal"),
        ("b", "personal"),
        ("c", "personal"),
        ("d", "personal"),
    ];
    let s = Setup::new(tokens, "affinity_header = \"x-session-id\"", "").await;
    let p = s.proxy().await;
    let ask = |session: String| {
        let p = &p;
        async move {
            let r = p
                .client
                .post(p.url("/ai/multi-agent"))
                .bearer_auth(CLIENT_KEY)
                .header("x-session-id", session)
                .body("hello")
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            let _ = r.bytes().await;
            status
        }
    };
    let mut home = Vec::new();
    for i in 0..16 {
        assert_eq!(ask(format!("session-{i}")).await, 200);
        home.push(s.sim.last_ai_account().unwrap());
    }
    let used: std::collections::HashSet<&String> = home.iter().collect();
    assert!(used.len() >= 3, "sessions spread: {home:?}");
    for _ in 0..2 {
        for (i, token) in home.iter().enumerate() {
            assert_eq!(ask(format!("session-{i}")).await, 200);
            assert_eq!(
                &s.sim.last_ai_account().unwrap(),
                token,
                "session-{i} moved"
            );
        }
    }
    let m = p.metrics().await;
    assert_eq!(metric(&m, "tokenpool_affinity_total{result=\"hit\"}"), 48.0);
    // The header stays here.
    assert!(s
        .sim
        .seen()
        .iter()
        .all(|(_, h)| !h.contains_key("x-session-id")));

    // Token a rests: its sessions move, the others stay.
    s.sim.set_ai("a", AiBehaviour::RateLimited(Some(3600)));
    for (i, token) in home.iter().enumerate() {
        assert_eq!(ask(format!("session-{i}")).await, 200);
        let now_on = s.sim.last_ai_account().unwrap();
        if token == "a" {
            assert_ne!(now_on, "a");
        } else {
            assert_eq!(&now_on, token, "session-{i} moved though its token is fine");
        }
    }
    let on_a = home.iter().filter(|t| *t == "a").count() as f64;
    assert!(on_a > 0.0, "some sessions were on a: {home:?}");
    let m = p.metrics().await;
    assert_eq!(
        metric(&m, "tokenpool_affinity_total{result=\"moved\"}"),
        on_a
    );
    // A request without the header is placed as usual.
    assert_eq!(p.ai_text().await.0, 200);
    assert_eq!(
        metric(
            &p.metrics().await,
            "tokenpool_affinity_total{result=\"none\"}"
        ),
        1.0
    );
    // Nor is one with an empty header: it names no session.
    assert_eq!(ask(String::new()).await, 200);
    assert_eq!(
        metric(
            &p.metrics().await,
            "tokenpool_affinity_total{result=\"none\"}"
        ),
        2.0
    );
    p.stop().await;
}
