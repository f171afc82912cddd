//! The admin listener: health, readiness, the pool document, enable and
//! disable, admin authentication, and `tokenpool status`.

use std::process::Command;

use tokenpool::pool::{Reason, TokenState};

use crate::harness::{metric, rt, Setup, CLIENT_KEY};

#[tokio::test]
async fn health_readiness_and_the_pool_probe() {
    let s = Setup::new(&[("a", "personal")], "", "").await;
    let p = s.proxy().await;
    let get = |path: &str| p.client.get(p.admin_url(path)).send();
    for path in ["/healthz", "/livez", "/readyz", "/poolz"] {
        assert_eq!(get(path).await.unwrap().status(), 200, "{path}");
    }
    let v: serde_json::Value = serde_json::from_str(&p.admin_text("/poolz").await).unwrap();
    assert_eq!(v["usable"], true);
    p.generations
        .current()
        .pool
        .get("a")
        .unwrap()
        .disable_manually();
    let r = get("/poolz").await.unwrap();
    assert_eq!(r.status(), 503);
    let v: serde_json::Value = serde_json::from_str(&r.text().await.unwrap()).unwrap();
    assert_eq!(v["reason"], "no token is usable");
    assert_eq!(v["tokens"]["disabled"], 1);
    // Readiness stays 200: this replica still answers (503 with
    // Retry-After) rather than refusing connections.
    let r = get("/readyz").await.unwrap();
    assert_eq!(r.status(), 200);
    let v: serde_json::Value = serde_json::from_str(&r.text().await.unwrap()).unwrap();
    assert_eq!(v["ready"], true);
    assert_eq!(v["generation"], 1);
    assert_eq!(get("/healthz").await.unwrap().status(), 200);

    let s = Setup::new(&[], "", "").await;
    let p = s.proxy().await;
    assert_eq!(get_status(&p, "/readyz").await, 200);
    let r = p.client.get(p.admin_url("/poolz")).send().await.unwrap();
    assert_eq!(r.status(), 503);
    assert!(r.text().await.unwrap().contains("no tokens are configured"));
    let (status, headers, _) = p.ai_text().await;
    assert_eq!(status, 503);
    assert_eq!(headers["x-tokenpool-error"], "no_token_available");
}

async fn get_status(p: &crate::harness::Proxy, path: &str) -> u16 {
    p.client
        .get(p.admin_url(path))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

#[tokio::test]
async fn the_pool_document_has_every_field_and_no_secret() {
    let s = Setup::new(&[("a", "personal"), ("b", "shared")], "", "").await;
    let p = s.proxy().await;
    assert_eq!(p.ai_text().await.0, 200);
    let text = p.admin_text("/admin/pool").await;
    for secret in [rt("a"), rt("b"), CLIENT_KEY.to_string(), "eyJ".to_string()] {
        assert!(!text.contains(&secret), "secret in /admin/pool: {text}");
    }
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["generation"], 1);
    assert!(v["loaded_at"].as_str().unwrap().ends_with('Z'));
    assert_eq!(
        v["order"],
        serde_json::json!(["personal", "shared", "anonymous"])
    );
    assert_eq!(v["tiers"]["personal"]["active"], 1);
    let a = &v["tokens"][0];
    for field in [
        "name",
        "tier",
        "state",
        "reason",
        "consecutive_failures",
        "cooldown_until",
        "access_token_expires_at",
        "requests",
        "last_used_at",
        "last_error",
    ] {
        assert!(a.get(field).is_some(), "missing {field}: {a}");
    }
    assert_eq!(a["requests"], 1);
    assert!(a["access_token_expires_at"].is_string());
    assert!(a["last_used_at"].is_string());
    assert!(v["tokens"][1]["last_used_at"].is_null());
}

#[tokio::test]
async fn disable_and_enable_by_hand() {
    let s = Setup::new(&[("a", "personal"), ("b", "shared")], "", "").await;
    let p = s.proxy().await;
    let post = |path: &str| p.client.post(p.admin_url(path)).send();
    let r = post("/admin/tokens/a/disable").await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(p.state("a"), (TokenState::Disabled, Some(Reason::Manual)));
    assert_eq!(p.ai_text().await.0, 200);
    assert_eq!((s.sim.ai_calls("a"), s.sim.ai_calls("b")), (0, 1));
    assert_eq!(post("/admin/tokens/a/enable").await.unwrap().status(), 200);
    assert_eq!(p.ai_text().await.0, 200);
    assert_eq!(s.sim.ai_calls("a"), 1);
    assert_eq!(
        post("/admin/tokens/nobody/enable").await.unwrap().status(),
        404
    );
    assert_eq!(post("/admin/tokens/a/explode").await.unwrap().status(), 404);
    assert_eq!(
        p.client
            .get(p.admin_url("/admin/reload"))
            .send()
            .await
            .unwrap()
            .status(),
        405
    );
}

#[tokio::test]
async fn admin_routes_need_the_admin_token_when_one_is_set() {
    let s = Setup::new(&[("a", "personal")], "", "").await;
    s.write_replacing(
        &[("a", "personal")],
        "[admin]\nlisten = \"127.0.0.1:0\"",
        "[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"admin-token-93e1\"",
    );
    let p = s.proxy().await;
    for auth in [
        None,
        Some("Bearer wrong"),
        Some("admin-token-93e1"),
        Some(&*format!("Bearer {CLIENT_KEY}")),
    ] {
        let mut req = p.client.get(p.admin_url("/admin/pool"));
        if let Some(a) = auth {
            req = req.header("authorization", a);
        }
        let r = req.send().await.unwrap();
        assert_eq!(r.status(), 401, "{auth:?}");
        let body = r.text().await.unwrap();
        assert!(!body.contains("admin-token-93e1"));
    }
    let r = p
        .client
        .post(p.admin_url("/admin/tokens/a/disable"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(p.state("a").0, TokenState::Active);
    let r = p
        .client
        .get(p.admin_url("/admin/pool"))
        .bearer_auth("admin-token-93e1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // /metrics, /healthz and /readyz stay open.
    assert_eq!(
        p.client
            .get(p.admin_url("/metrics"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
}

#[tokio::test]
async fn the_proxy_listener_never_serves_admin_routes() {
    let s = Setup::new(&[("a", "personal")], "", "").await;
    let p = s.proxy().await;
    for path in ["/admin/pool", "/metrics", "/admin/reload"] {
        let r = p.client.get(p.url(path)).send().await.unwrap();
        assert_eq!(r.status(), 401, "{path} without a client key");
        let r = p
            .client
            .get(p.url(path))
            .bearer_auth(CLIENT_KEY)
            .send()
            .await
            .unwrap();
        let body = r.text().await.unwrap();
        // Forwarded to the upstream (the simulator echoes), not answered here.
        assert!(
            body.contains(&format!("\"path\":\"{path}\"")),
            "{path}: {body}"
        );
        assert!(!body.contains("tokenpool_"));
    }
}

#[tokio::test]
async fn status_prints_a_table() {
    let s = Setup::new(&[("alpha", "personal"), ("beta", "shared")], "", "").await;
    let p = s.proxy().await;
    assert_eq!(p.ai_text().await.0, 200);
    let out = status(&["--admin", &p.admin_url("")]).await;
    let table = String::from_utf8_lossy(&out.stdout);
    // Without a scheme, and as JSON.
    let out = status(&["--admin", &p.admin.to_string(), "-o", "json"]).await;
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["tokens"][0]["name"], "alpha");
    let lines: Vec<&str> = table.lines().collect();
    assert!(lines[1].starts_with("NAME"), "{table}");
    assert!(
        lines[2].starts_with("alpha")
            && lines[2].contains("personal")
            && lines[2].contains("active"),
        "{table}"
    );
    assert!(lines[3].starts_with("beta"), "{table}");
    assert!(!table.contains("rt-"));
    assert_eq!(
        metric(
            &p.metrics().await,
            "tokenpool_selections_total{tier=\"personal\",token=\"alpha\"}"
        ),
        1.0
    );
}

#[tokio::test]
async fn reloads_name_the_tokens_they_add_replace_and_remove() {
    use std::sync::Arc;
    use tokenpool::config::Config;
    use tokenpool::generation::Generations;
    let s = Setup::new(&[("a", "personal"), ("b", "shared")], "", "").await;
    let parse = |text: &str| Config::parse(text, None, &|_| None).unwrap();
    let generations = Generations::new(
        parse(&s.config(&[("a", "personal"), ("b", "shared")], "", "")),
        Arc::new(|_: &str| None),
    )
    .unwrap();
    let next = s
        .config(&[("a", "personal"), ("c", "shared")], "", "")
        .replace(
            &format!("token = \"{}\"", rt("a")),
            "token = \"rt-a-replaced\"",
        );
    let summary = generations.apply(parse(&next)).unwrap();
    assert_eq!(summary.kept, 0);
    assert_eq!(summary.added, ["c"]);
    assert_eq!(summary.replaced, ["a"]);
    assert_eq!(summary.removed, ["b"]);
    let same = generations.apply(parse(&next)).unwrap();
    assert_eq!((same.kept, same.added.len(), same.removed.len()), (2, 0, 0));
}

#[tokio::test]
async fn static_keys_show_no_expiry_and_fallback_series_start_at_zero() {
    let dir = tempfile::tempdir().unwrap();
    let sim = tokenpool::sim::Sim::start().await.unwrap();
    let path = crate::harness::static_config(dir.path(), &sim.url(), "", "");
    let p = crate::harness::Proxy::start(&path).await;
    let v = p.pool().await;
    assert_eq!(
        v["tokens"][0]["access_token_expires_at"],
        serde_json::Value::Null
    );
    let m = p.metrics().await;
    assert!(
        m.contains("tokenpool_tier_fallbacks_total{from_tier=\"personal\",to_tier=\"shared\"} 0"),
        "fallback series exist before the first fallback"
    );
    assert!(!m.contains("tokenpool_token_access_expiry_timestamp_seconds{"));
}

/// Runs `tokenpool status ARGS`, which must succeed.
async fn status(args: &[&str]) -> std::process::Output {
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_tokenpool"))
            .arg("status")
            .args(&args)
            .env_remove("TOKENPOOL_ADMIN_TOKEN")
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}
