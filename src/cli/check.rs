//! `tokenpool check`: loads the config as `serve` would, and prints what
//! it would run (never a secret) and its warnings; exit code 1 on an error.

use std::path::Path;
use std::process::ExitCode;

use crate::config::{duration, redact::redact_url, Config, QuotaProvider, Strategy, TokenOrigin};

/// Checks the config at `path` (none: environment only).
pub(super) fn check(path: Option<&Path>) -> ExitCode {
    match super::load(path) {
        Ok(c) => {
            // `serve` would stop on a state folder it cannot write to:
            // `check` says so first.
            if let Some(path) = &c.state.path {
                if let Err(e) = crate::state::StateStore::new(path).check_writable() {
                    eprintln!(
                        "{}: {e}",
                        c.path
                            .as_deref()
                            .map_or_else(|| "environment".into(), |p| p.display().to_string())
                    );
                    return ExitCode::from(1);
                }
            }
            print!("{}", summary(&c));
            for warning in c.warnings() {
                println!("warning: {warning}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::from(1)
        }
    }
}

/// The summary `tokenpool check` prints: never a secret.
pub fn summary(config: &Config) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let source = config
        .path
        .as_ref()
        .map_or_else(|| "environment only".into(), |p| p.display().to_string());
    let _ = writeln!(out, "config:    {source}");
    let auth = if config.server.api_keys.is_empty() {
        "no client authentication".to_string()
    } else {
        let mut names: Vec<&str> = config.server.api_keys.iter().map(|k| &*k.name).collect();
        // A client of [[clients]] has a key per rotation: named once.
        names.dedup();
        format!("client keys: {}", names.join(", "))
    };
    let _ = writeln!(out, "proxy:     {} ({auth})", config.server.listen);
    let admin_auth = if config.admin.token.is_some() {
        "bearer token"
    } else {
        "loopback clients only"
    };
    let _ = writeln!(
        out,
        "admin:     {} (/admin/*: {admin_auth})",
        config.admin.listen
    );
    let _ = writeln!(
        out,
        "upstream:  {}",
        redact_url(&config.upstream.url.to_string())
    );
    let refresh_url = config
        .refresh
        .url
        .as_deref()
        .map(redact_url)
        .unwrap_or_else(|| "-".into());
    let _ = writeln!(
        out,
        "refresh:   {} {refresh_url}",
        config.refresh.provider.as_str()
    );
    if let Some(c) = &config.cluster {
        let sealed = if c.encryption_key.is_some() {
            "tokens sealed"
        } else {
            "tokens in clear"
        };
        let _ = writeln!(
            out,
            "cluster:   node {}, key prefix {}, sync every {} ({sealed}; the Redis URL is a secret)",
            c.node,
            c.key_prefix,
            duration::format(c.sync_interval)
        );
    }
    let order: Vec<&str> = config.pool.order.iter().map(|t| t.as_str()).collect();
    let _ = writeln!(out, "order:     {}", order.join(" > "));
    let strategy = match config.pool.strategy {
        Strategy::RoundRobin => "round_robin",
        Strategy::MostRemaining => "most_remaining",
    };
    let affinity = config.pool.affinity_header.as_ref().map_or_else(
        || "no session affinity".to_string(),
        |h| format!("sessions by {h}"),
    );
    let _ = writeln!(out, "pick:      {strategy}, {affinity}");
    let quota = match (config.quota.provider, &config.quota.url) {
        (QuotaProvider::Warp, Some(url)) => format!(
            "answer headers; polled from {} every {}",
            redact_url(url),
            duration::format(config.quota.interval)
        ),
        _ => "answer headers only".to_string(),
    };
    let routes = listed(
        config.upstream.routes.as_deref(),
        "every method and path (no [upstream] routes)",
    );
    let _ = writeln!(out, "routes:    {routes}");
    // Each [[clients]] entry that narrows (or widens) what it may do.
    let mut seen: Vec<&str> = Vec::new();
    for key in &config.server.api_keys {
        let policy = &key.policy;
        if seen.contains(&&*key.name) || (policy.tiers.is_none() && policy.routes.is_none()) {
            continue;
        }
        seen.push(&key.name);
        let tiers = listed(policy.tiers.as_deref(), "every tier");
        let routes = listed(policy.routes.as_deref(), "[upstream] routes");
        let _ = writeln!(out, "  client {}: tiers {tiers}; routes {routes}", key.name);
    }
    let _ = writeln!(out, "quota:     {quota}");
    let _ = writeln!(out, "tokens:    {}", config.tokens.len());
    for tier in &config.pool.order {
        let names: Vec<String> = config
            .tokens
            .iter()
            .filter(|t| t.tier == *tier)
            .map(|t| match t.origin {
                TokenOrigin::File => t.name.clone(),
                TokenOrigin::Env => format!("{} (env)", t.name),
            })
            .collect();
        let _ = writeln!(
            out,
            "  {:<10} {:>3}  {}",
            tier.as_str(),
            names.len(),
            names.join(", ")
        );
    }
    out
}

/// `items` as a comma-separated list, or `none` when there are none set.
fn listed<T: std::fmt::Display>(items: Option<&[T]>, none: &str) -> String {
    items.map_or_else(
        || none.to_string(),
        |items| {
            items
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Config {
        Config::parse(text, None, &|_| None).unwrap()
    }

    #[test]
    fn the_summary_never_shows_a_secret() {
        let c = parse(
            "[server]\napi_keys = [\"client-key-1\"]\n[admin]\ntoken = \"admin-tok\"\n\
             [refresh]\nurl = \"https://x.test/token?key=AIzaSECRET\"\n\
             [[tokens]]\nname = \"alice\"\ntier = \"personal\"\ntoken = \"rt-alice\"\n",
        );
        let s = summary(&c);
        for secret in ["client-key-1", "admin-tok", "AIzaSECRET", "rt-alice"] {
            assert!(!s.contains(secret), "{secret} leaked:\n{s}");
        }
        assert!(s.contains("alice"));
        assert!(!format!("{c:?}").contains("rt-alice"));
        let c = parse(
            "[refresh]\nprovider = \"firebase\"\nurl = \"https://user:hunter2@r.example/t?key=AIzaK\"\n",
        );
        let s = summary(&c);
        assert!(!s.contains("hunter2") && !s.contains("AIzaK"), "{s}");
    }

    #[test]
    fn the_summary_names_routes_and_each_clients_limits() {
        let c = parse(
            "[upstream]\npreset = \"warp\"\n[refresh]\nkey = \"k\"\n\
             [[clients]]\nname = \"team-a\"\nkeys = [\"k-1\", \"k-2\"]\ntiers = [\"shared\"]\n\
             [[clients]]\nname = \"all\"\nkeys = [\"k-3\"]\n",
        );
        let s = summary(&c);
        assert!(s.contains("routes:    POST /ai/multi-agent\n"), "{s}");
        assert!(
            s.contains("  client team-a: tiers shared; routes [upstream] routes\n"),
            "{s}"
        );
        assert!(!s.contains("client all:"), "{s}");
        assert!(s.contains("client keys: team-a, all"), "{s}");
    }
}
