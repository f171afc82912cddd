//! `/metrics` from a live proxy after traffic with failures: every family
//! of `docs/metrics.md` is there with its type, tier×state series exist from the
//! start, and no secret appears.

use tokenpool::sim::{AiBehaviour, RefreshBehaviour};

use crate::harness::{metric, rt, Setup, CLIENT_KEY};

/// Every family of `docs/metrics.md` and its type.
const FAMILIES: &[(&str, &str)] = &[
    ("tokenpool_requests_total", "counter"),
    ("tokenpool_request_duration_seconds", "histogram"),
    ("tokenpool_inflight_requests", "gauge"),
    ("tokenpool_selections_total", "counter"),
    ("tokenpool_tier_fallbacks_total", "counter"),
    ("tokenpool_failovers_total", "counter"),
    ("tokenpool_token_failures_total", "counter"),
    ("tokenpool_tokens", "gauge"),
    ("tokenpool_token_up", "gauge"),
    ("tokenpool_token_state", "gauge"),
    ("tokenpool_token_access_expiry_timestamp_seconds", "gauge"),
    ("tokenpool_refreshes_total", "counter"),
    ("tokenpool_refresh_duration_seconds", "histogram"),
    ("tokenpool_upstream_requests_total", "counter"),
    ("tokenpool_upstream_response_seconds", "histogram"),
    ("tokenpool_config_reloads_total", "counter"),
    ("tokenpool_config_last_reload_successful", "gauge"),
    (
        "tokenpool_config_last_reload_success_timestamp_seconds",
        "gauge",
    ),
    ("tokenpool_build_info", "gauge"),
    ("tokenpool_task_restarts_total", "counter"),
];

#[tokio::test]
async fn every_family_is_exposed_after_traffic_with_failures() {
    let tokens = &[
        ("p", "personal"),
        ("q", "personal"),
        ("s", "shared"),
        ("n", "anonymous"),
    ];
    let s = Setup::new(tokens, "", "").await;
    s.sim.set_ai("p", AiBehaviour::Quota);
    s.sim.set_ai("q", AiBehaviour::Blocked);
    s.sim.set_refresh("s", RefreshBehaviour::Revoked);
    let p = s.proxy().await;

    // Before any traffic: every tier×state series exists, at zero or more.
    let m = p.metrics().await;
    for tier in ["personal", "shared", "anonymous"] {
        for state in ["active", "cooling_down", "disabled", "revoked"] {
            let series = format!("tokenpool_tokens{{state=\"{state}\",tier=\"{tier}\"}}");
            assert!(m.contains(&series), "{series} missing at start");
        }
    }
    assert_eq!(metric(&m, "tokenpool_config_last_reload_successful"), 1.0);

    for _ in 0..4 {
        assert_eq!(p.ai_text().await.0, 200);
    }
    let _ = p.client.post(p.url("/x")).send().await.unwrap();
    let m = p.metrics().await;
    for (family, kind) in FAMILIES {
        assert!(
            m.contains(&format!("# TYPE {family} {kind}\n")),
            "{family} ({kind}) missing:\n{m}"
        );
        assert!(
            m.lines()
                .any(|l| l.starts_with(family) && !l.starts_with('#')),
            "{family} has no sample"
        );
    }
    assert!(m.contains("tokenpool_build_info{version=\""));
    assert!(
        m.contains("process_resident_memory_bytes"),
        "process metrics"
    );
    assert_eq!(
        metric(&m, "tokenpool_tokens{state=\"revoked\",tier=\"shared\"}"),
        1.0
    );
    assert_eq!(
        metric(&m, "tokenpool_token_up{tier=\"anonymous\",token=\"n\"}"),
        1.0
    );
    assert_eq!(
        metric(&m, "tokenpool_token_up{tier=\"shared\",token=\"s\"}"),
        0.0
    );
    assert_eq!(
        metric(&m, "tokenpool_token_state{reason=\"revoked\",state=\"revoked\",tier=\"shared\",token=\"s\"}"),
        1.0
    );
    assert_eq!(
        m.matches("tokenpool_token_state{").count(),
        4,
        "one state series per token"
    );
    assert!(
        metric(
            &m,
            "tokenpool_token_access_expiry_timestamp_seconds{tier=\"anonymous\",token=\"n\"}"
        ) > 1.7e9
    );
    // q fails until failure_threshold (3) disables it.
    assert_eq!(
        metric(
            &m,
            "tokenpool_failovers_total{reason=\"forbidden\",tier=\"personal\"}"
        ),
        3.0
    );
    assert_eq!(
        metric(&m, "tokenpool_requests_total{outcome=\"rejected\"}"),
        1.0
    );
    assert!(
        metric(
            &m,
            "tokenpool_refresh_duration_seconds_count{tier=\"anonymous\"}"
        ) >= 1.0
    );
    for secret in tokens
        .iter()
        .map(|(n, _)| rt(n))
        .chain([CLIENT_KEY.to_string(), "eyJ".into()])
    {
        assert!(!m.contains(&secret), "a secret in /metrics");
    }
}
