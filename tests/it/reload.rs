//! Live reload: every way a file changes is seen, an invalid edit changes
//! nothing, state is carried across, removed tokens' series go, and no
//! request fails while the config is rewritten again and again.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokenpool::pool::{Reason, TokenState};
use tokenpool::sim::AiBehaviour;

use crate::harness::{eventually, metric, rt, Proxy, Setup};

const WAIT: Duration = Duration::from_secs(10);

fn names(p: &Proxy) -> Vec<String> {
    p.generations
        .current()
        .pool
        .tokens()
        .iter()
        .map(|t| t.name().to_string())
        .collect()
}

#[tokio::test]
async fn in_place_writes_are_seen() {
    let s = Setup::new(&[("a", "personal")], "", "").await;
    let p = s.proxy().await;
    s.sim.add_account("b", &rt("b"));
    s.write(&s.config(&[("a", "personal"), ("b", "shared")], "", ""));
    p.wait_generation(2).await;
    assert_eq!(names(&p), ["a", "b"]);
}

#[tokio::test]
async fn write_then_rename_is_seen() {
    let s = Setup::new(&[("a", "personal")], "", "").await;
    let p = s.proxy().await;
    let tmp = s.dir.path().join(".tokenpool.toml.swp");
    std::fs::write(
        &tmp,
        s.config(&[("a", "personal"), ("c", "anonymous")], "", ""),
    )
    .unwrap();
    std::fs::rename(&tmp, &s.path).unwrap();
    p.wait_generation(2).await;
    assert_eq!(names(&p), ["a", "c"]);
}

#[tokio::test]
async fn delete_then_recreate_is_seen_and_the_gap_changes_nothing() {
    let s = Setup::new(&[("a", "personal")], "", "").await;
    let p = s.proxy().await;
    std::fs::remove_file(&s.path).unwrap();
    eventually("failed reload on a missing file", WAIT, || async {
        metric(
            &p.metrics().await,
            "tokenpool_config_reloads_total{result=\"failure\"}",
        ) >= 1.0
    })
    .await;
    assert_eq!(
        p.ai_text().await.0,
        200,
        "still serving on the old generation"
    );
    s.write(&s.config(&[("a", "personal"), ("d", "shared")], "", ""));
    p.wait_generation(2).await;
    assert_eq!(names(&p), ["a", "d"]);
    assert_eq!(
        metric(
            &p.metrics().await,
            "tokenpool_config_last_reload_successful"
        ),
        1.0
    );
}

/// Lays out a Kubernetes-style volume: `tokenpool.toml -> ..data/tokenpool.toml`,
/// `..data -> ..<version>`.
fn k8s_publish(dir: &Path, version: &str, text: &str, secret: &str) {
    let versioned = dir.join(version);
    std::fs::create_dir(&versioned).unwrap();
    std::fs::write(versioned.join("tokenpool.toml"), text).unwrap();
    std::fs::write(versioned.join("alice"), secret).unwrap();
    let tmp_link = dir.join("..data_tmp");
    std::os::unix::fs::symlink(version, &tmp_link).unwrap();
    // The atomic swap kubelet does.
    std::fs::rename(&tmp_link, dir.join("..data")).unwrap();
}

#[tokio::test]
async fn a_kubernetes_data_symlink_swap_is_seen() {
    let s = Setup::new(&[("a", "personal")], "", "").await;
    s.sim.add_account("alice", "rt-alice-v1");
    s.sim.add_account("alice2", "rt-alice-v2");
    let vol = s.dir.path().join("vol");
    std::fs::create_dir(&vol).unwrap();
    let text = |n: &str| {
        s.config(&[], "", "")
            + &format!(
                "[[tokens]]\nname = \"{n}\"\ntier = \"personal\"\ntoken = {{ file = \"alice\" }}\n"
            )
    };
    k8s_publish(&vol, "..2026_11_26_01", &text("alice"), "rt-alice-v1\n");
    std::os::unix::fs::symlink("..data/tokenpool.toml", vol.join("tokenpool.toml")).unwrap();
    std::os::unix::fs::symlink("..data/alice", vol.join("alice")).unwrap();
    let p = Proxy::start(&vol.join("tokenpool.toml")).await;
    assert_eq!(names(&p), ["alice"]);
    assert_eq!(p.ai_text().await.0, 200);
    k8s_publish(&vol, "..2026_11_26_02", &text("alice2"), "rt-alice-v2\n");
    p.wait_generation(2).await;
    assert_eq!(names(&p), ["alice2"]);
    assert_eq!(p.ai_text().await.0, 200);
    assert_eq!(s.sim.ai_calls("alice2"), 1, "the new secret is in use");
}

#[tokio::test]
async fn an_edited_secret_file_is_seen_and_clears_revocation() {
    let s = Setup::new(&[], "", "").await;
    s.sim.add_account("alice", "rt-alice-new");
    let secret = s.dir.path().join("secrets");
    std::fs::create_dir(&secret).unwrap();
    std::fs::write(secret.join("alice"), "rt-alice-old\n").unwrap();
    s.write(&(s.config(&[], "", "") + "[[tokens]]\nname = \"alice\"\ntier = \"personal\"\ntoken = { file = \"secrets/alice\" }\n"));
    let p = s.proxy().await;
    assert_eq!(
        p.ai_text().await.0,
        503,
        "the configured token is unknown upstream"
    );
    assert_eq!(p.state("alice").0, TokenState::Revoked);
    std::fs::write(secret.join("alice"), "rt-alice-new\n").unwrap();
    p.wait_generation(2).await;
    assert_eq!(p.state("alice"), (TokenState::Active, None));
    assert_eq!(p.ai_text().await.0, 200);
}

#[tokio::test]
async fn an_invalid_edit_keeps_the_running_config_and_a_good_one_recovers() {
    let s = Setup::new(&[("a", "personal")], "", "").await;
    let p = s.proxy().await;
    std::fs::write(
        &s.path,
        "[[tokens]]\nname = \"a\"\ntier = \"vip\"\ntoken = \"x\"\n",
    )
    .unwrap();
    eventually("reload failure counted", WAIT, || async {
        metric(
            &p.metrics().await,
            "tokenpool_config_reloads_total{result=\"failure\"}",
        ) >= 1.0
    })
    .await;
    let m = p.metrics().await;
    assert_eq!(metric(&m, "tokenpool_config_last_reload_successful"), 0.0);
    assert_eq!(p.generations.current().id, 1);
    assert_eq!(p.ai_text().await.0, 200, "the old generation serves");
    // POST /admin/reload says what is wrong, with its place.
    let r = p
        .client
        .post(p.admin_url("/admin/reload"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 422);
    let body = r.text().await.unwrap();
    assert!(
        body.contains("tokenpool.toml:3:8: unknown variant `vip`"),
        "{body}"
    );
    s.sim.add_account("b", &rt("b"));
    s.write(&s.config(&[("a", "personal"), ("b", "personal")], "", ""));
    p.wait_generation(2).await;
    assert_eq!(
        metric(
            &p.metrics().await,
            "tokenpool_config_last_reload_successful"
        ),
        1.0
    );
    assert_eq!(names(&p), ["a", "b"]);
}

#[tokio::test]
async fn state_is_carried_across_a_reload_and_removed_tokens_series_go() {
    let tokens = &[("a", "personal"), ("b", "personal"), ("c", "shared")];
    let s = Setup::new(tokens, "", "").await;
    s.sim.set_ai("a", AiBehaviour::Quota);
    let p = s.proxy().await;
    for _ in 0..3 {
        assert_eq!(p.ai_text().await.0, 200);
    }
    let a_requests = p.generations.current().pool.get("a").unwrap().requests();
    assert_eq!(
        p.state("a"),
        (TokenState::CoolingDown, Some(Reason::QuotaExhausted))
    );
    let m = p.metrics().await;
    assert!(m.contains("token=\"c\""), "c has series before the reload");

    // c goes; a and b stay; the pool section changes too.
    s.write(&s.config(
        &[("a", "personal"), ("b", "personal")],
        "cooldown = \"30s\"",
        "",
    ));
    p.wait_generation(2).await;
    assert_eq!(
        p.state("a"),
        (TokenState::CoolingDown, Some(Reason::QuotaExhausted)),
        "cooldown kept"
    );
    let g = p.generations.current();
    assert_eq!(
        g.pool.get("a").unwrap().requests(),
        a_requests,
        "counters kept"
    );
    assert!(
        g.pool.get("b").unwrap().credentials().access().is_some(),
        "access token kept"
    );
    let refreshes = s.sim.refresh_calls("b");
    assert_eq!(p.ai_text().await.0, 200);
    assert_eq!(
        s.sim.refresh_calls("b"),
        refreshes,
        "no refresh needed after a reload"
    );
    let m = p.metrics().await;
    assert!(!m.contains("token=\"c\""), "c's series are gone:\n{m}");
    assert!(m.contains("tokenpool_tokens{state=\"active\",tier=\"shared\"} 0"));
}

#[tokio::test]
async fn fifty_reloads_under_load_lose_no_request() {
    let tokens = &[("a", "personal"), ("b", "personal"), ("c", "shared")];
    let s = Setup::new(tokens, "", "").await;
    s.sim.set_stream(3, Duration::from_millis(5));
    let p = Arc::new(s.proxy().await);
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::new();
    for _ in 0..8 {
        let (p, stop, ok) = (Arc::clone(&p), Arc::clone(&stop), Arc::clone(&ok));
        workers.push(tokio::spawn(async move {
            let mut failures = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let (status, _, body) = p.ai_text().await;
                if status == 200 && body.ends_with("data: [DONE]\n\n") {
                    ok.fetch_add(1, Ordering::Relaxed);
                } else {
                    failures.push((status, body));
                }
            }
            failures
        }));
    }
    // Alternate between two token sets (b and c swap in and out), through
    // the admin endpoint so each reload is a distinct, counted event.
    for i in 0..50 {
        let set: &[(&str, &str)] = if i % 2 == 0 {
            &[("a", "personal"), ("b", "personal")]
        } else {
            &[("a", "personal"), ("c", "shared")]
        };
        s.write(&s.config(set, &format!("cooldown = \"{}s\"", 30 + i), ""));
        let r = p
            .client
            .post(p.admin_url("/admin/reload"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    }
    stop.store(true, Ordering::Relaxed);
    let mut failures = Vec::new();
    for w in workers {
        failures.extend(w.await.unwrap());
    }
    assert!(
        failures.is_empty(),
        "{} requests failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(3)]
    );
    assert!(p.generations.current().id >= 51);
    assert!(
        ok.load(Ordering::Relaxed) >= 50,
        "requests ran during the reloads"
    );
}
