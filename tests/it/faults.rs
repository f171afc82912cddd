//! The rows of the fault matrix that other files do not cover: what the
//! client gets, what the pool state becomes, which metrics move, and that
//! healthy tokens keep serving. (Refresh faults: refresh.rs; upstream
//! status answers: proxy.rs; config edits: reload.rs.)

use std::time::Duration;

use tokenpool::pool::TokenState;
use tokenpool::sim::{AiBehaviour, RefreshMode};

use crate::harness::{eventually, metric, Proxy, Setup};

const TWO: &[(&str, &str)] = &[("a", "personal"), ("b", "personal")];

#[tokio::test]
async fn a_reset_before_headers_is_502_without_blame() {
    let s = Setup::new(TWO, "failure_threshold = 1", "").await;
    s.sim.set_ai("a", AiBehaviour::ResetBeforeHeaders);
    let p = s.proxy().await;
    let (status, headers, _) = p.ai_text().await;
    assert_eq!(status, 502);
    assert_eq!(headers["x-tokenpool-error"], "upstream_unreachable");
    assert_eq!(p.state("a").0, TokenState::Active, "not the token's fault");
    // b, healthy, serves the next request.
    assert_eq!(p.ai_text().await.0, 200);
    let m = p.metrics().await;
    assert_eq!(
        metric(&m, "tokenpool_requests_total{outcome=\"upstream_error\"}"),
        1.0
    );
}

#[tokio::test]
async fn a_reset_in_the_middle_of_a_stream_breaks_only_that_stream() {
    let s = Setup::new(TWO, "failure_threshold = 1", "").await;
    s.sim.set_ai("a", AiBehaviour::ResetMidStream);
    let p = s.proxy().await;
    // The upstream sent its 200 head, then broke (its one event may or may
    // not have left the simulator first). The client gets the status, then
    // sees the break: never a clean end.
    let mut r = p
        .client
        .post(p.url("/ai/multi-agent"))
        .bearer_auth(crate::harness::CLIENT_KEY)
        .send()
        .await
        .expect("the head is written before the connection is aborted");
    assert_eq!(r.status(), 200);
    let (_, broke) = crate::harness::read_to_break(&mut r).await;
    assert!(broke, "the client sees the break, not a clean end");
    assert_eq!(
        s.sim.ai_calls("b"),
        0,
        "a stream is never replayed on another token"
    );
    assert_eq!(p.state("a").0, TokenState::Active);
    assert_eq!(p.ai_text().await.0, 200);
    eventually("inflight back to 0", Duration::from_secs(2), || async {
        metric(&p.metrics().await, "tokenpool_inflight_requests") == 0.0
    })
    .await;
}

#[tokio::test]
async fn a_refresh_429_without_retry_after_pauses_ten_seconds() {
    let s = Setup::new(TWO, "", "").await;
    s.sim.set_refresh_mode(RefreshMode::RateLimited(None));
    let p = s.proxy().await;
    let (status, headers, _) = p.ai_text().await;
    assert_eq!(status, 503);
    let retry: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((9..=10).contains(&retry), "{retry}");
    let m = p.metrics().await;
    assert!(
        metric(
            &m,
            "tokenpool_refreshes_total{outcome=\"rate_limited\",tier=\"personal\"}"
        ) >= 1.0
    );
    assert_eq!(p.state("a").0, TokenState::Active);
}

/// Starts a proxy, breaks its config file with `break_it`, and checks that
/// the reload fails, the old generation keeps serving, and the metrics say so.
async fn broken_config_keeps_serving(break_it: impl FnOnce(&Setup)) {
    let s = Setup::new(TWO, "", "").await;
    let p: Proxy = s.proxy().await;
    assert_eq!(p.ai_text().await.0, 200);
    break_it(&s);
    let r = p
        .client
        .post(p.admin_url("/admin/reload"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 422);
    let body = r.text().await.unwrap();
    assert!(
        body.contains("tokenpool.toml"),
        "the error names the file: {body}"
    );
    let m = p.metrics().await;
    assert!(metric(&m, "tokenpool_config_reloads_total{result=\"failure\"}") >= 1.0);
    assert_eq!(metric(&m, "tokenpool_config_last_reload_successful"), 0.0);
    assert_eq!(p.generations.current().id, 1);
    for _ in 0..3 {
        assert_eq!(p.ai_text().await.0, 200, "the running generation serves");
    }
}

#[tokio::test]
async fn a_truncated_config_changes_nothing() {
    broken_config_keeps_serving(|s| {
        let text = std::fs::read_to_string(&s.path).unwrap();
        std::fs::write(&s.path, &text[..text.len() / 2 + 3]).unwrap();
    })
    .await;
}

#[tokio::test]
async fn a_config_replaced_by_a_directory_changes_nothing() {
    broken_config_keeps_serving(|s| {
        std::fs::remove_file(&s.path).unwrap();
        std::fs::create_dir(&s.path).unwrap();
    })
    .await;
}

#[tokio::test]
async fn an_unreadable_config_changes_nothing() {
    // A dangling symlink cannot be read by anyone, root included.
    broken_config_keeps_serving(|s| {
        std::fs::remove_file(&s.path).unwrap();
        std::os::unix::fs::symlink(s.dir.path().join("gone.toml"), &s.path).unwrap();
    })
    .await;
}

#[tokio::test]
async fn a_config_naming_a_missing_secret_file_changes_nothing() {
    broken_config_keeps_serving(|s| {
        let text = std::fs::read_to_string(&s.path).unwrap();
        std::fs::write(
            &s.path,
            text + "[[tokens]]\nname = \"c\"\ntier = \"shared\"\ntoken = { file = \"secrets/missing\" }\n",
        )
        .unwrap();
    })
    .await;
}
