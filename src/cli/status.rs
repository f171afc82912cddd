//! `tokenpool status`: `/admin/pool` of a running instance, as a table
//! for people or as the JSON it came as.

use std::time::{Duration, SystemTime};

use anyhow::Context;

use super::StatusOutput;

/// `tokenpool status`: the pool of a running instance.
pub(super) async fn status(
    admin: &str,
    token: Option<&str>,
    output: StatusOutput,
) -> anyhow::Result<()> {
    let base = admin.trim_end_matches('/');
    let base = if base.contains("://") {
        base.to_string()
    } else {
        format!("http://{base}")
    };
    let url = format!("{base}/admin/pool");
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()?;
    let mut req = client.get(&url);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let response = req
        .send()
        .await
        .with_context(|| format!("cannot reach {url}"))?;
    let status = response.status();
    let body = response.text().await?;
    if !status.is_success() {
        anyhow::bail!("{url} answered {status}: {body}");
    }
    let doc: serde_json::Value =
        serde_json::from_str(&body).context("the admin answer is not JSON")?;
    match output {
        StatusOutput::Table => print!("{}", status_table(&doc, SystemTime::now())),
        StatusOutput::Json => println!("{}", serde_json::to_string_pretty(&doc)?),
    }
    Ok(())
}

/// A duration in its two largest units: "45s", "12m 30s", "3h 5m", "19d 23h".
fn short_duration(secs: u64) -> String {
    let (d, h, m, s) = (secs / 86_400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) => format!("{m}m {s}s"),
        (0, _, _) => format!("{h}h {m}m"),
        _ => format!("{d}d {h}h"),
    }
}

/// Renders `/admin/pool` as a table whose columns fit their widest cell.
pub fn status_table(doc: &serde_json::Value, now: SystemTime) -> String {
    use std::fmt::Write;
    // How long until an RFC 3339 time: "12m 30s", "19d 23h", "past", or "-".
    let left = |v: &serde_json::Value| -> String {
        v.as_str()
            .and_then(|s| humantime::parse_rfc3339(s).ok())
            .map_or_else(
                || "-".to_string(),
                |t| match t.duration_since(now) {
                    Ok(d) => short_duration(d.as_secs()),
                    Err(_) => "past".to_string(),
                },
            )
    };
    let text = |v: &serde_json::Value| match v {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Null => "-".to_string(),
        other => other.to_string(),
    };
    // What is left of a quota: "12/150", "12" without a known limit,
    // "unlimited", or "-".
    let quota = |q: &serde_json::Value| -> String {
        if q["unlimited"] == true {
            return "unlimited".into();
        }
        match (q["remaining"].as_u64(), q["limit"].as_u64()) {
            (Some(r), Some(l)) => format!("{r}/{l}"),
            (Some(r), None) => r.to_string(),
            (None, Some(l)) => format!("?/{l}"),
            (None, None) => "-".into(),
        }
    };
    let header = [
        "NAME",
        "TIER",
        "STATE",
        "REASON",
        "FAILS",
        "BACK IN",
        "EXPIRES IN",
        "QUOTA",
        "REFILLS IN",
        "REQUESTS",
    ];
    let mut rows: Vec<[String; 10]> = Vec::new();
    for t in doc["tokens"].as_array().into_iter().flatten() {
        rows.push([
            text(&t["name"]),
            text(&t["tier"]),
            text(&t["state"]),
            text(&t["reason"]),
            text(&t["consecutive_failures"]),
            left(&t["cooldown_until"]),
            left(&t["access_token_expires_at"]),
            quota(&t["quota"]),
            left(&t["quota"]["resets_at"]),
            text(&t["requests"]),
        ]);
    }
    let mut widths = header.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let cluster = match doc["cluster"].as_object() {
        Some(c) => format!(
            "  cluster {} {}",
            c.get("node").and_then(|n| n.as_str()).unwrap_or("-"),
            match c.get("config_error").and_then(|v| v.as_str()) {
                Some(error) => format!("CONFIGURATION ERROR, refreshing nothing: {error}"),
                None if c.get("connected").and_then(|v| v.as_bool()) == Some(true) => {
                    "connected".to_string()
                }
                None => "DISCONNECTED (serving on local state)".to_string(),
            }
        ),
        None => String::new(),
    };
    let _ = writeln!(
        out,
        "generation {}  loaded {}  order {}{cluster}",
        doc["generation"],
        doc["loaded_at"].as_str().unwrap_or("-"),
        doc["order"]
            .as_array()
            .map(|a| a
                .iter()
                .filter_map(|t| t.as_str())
                .collect::<Vec<_>>()
                .join(" > "))
            .unwrap_or_default()
    );
    let line = |cells: &[String]| {
        let mut l = String::new();
        for (i, (cell, w)) in cells.iter().zip(widths).enumerate() {
            // Counts are right-aligned, words left-aligned.
            let right = matches!(i, 4 | 7 | 9);
            let pad = w.saturating_sub(cell.chars().count());
            if i > 0 {
                l.push_str("  ");
            }
            if right {
                l.push_str(&" ".repeat(pad));
                l.push_str(cell);
            } else {
                l.push_str(cell);
                l.push_str(&" ".repeat(pad));
            }
        }
        l.trim_end().to_string()
    };
    let _ = writeln!(out, "{}", line(&header.map(String::from)));
    for row in &rows {
        let _ = writeln!(out, "{}", line(row));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_status_table_aligns_its_columns() {
        let doc = serde_json::json!({
            "generation": 3,
            "loaded_at": "2026-11-30T10:00:00Z",
            "order": ["personal", "shared"],
            "tokens": [
                {"name": "a", "tier": "personal", "state": "active", "reason": null,
                 "consecutive_failures": 0, "cooldown_until": null,
                 "access_token_expires_at": "2026-11-30T11:00:00Z", "requests": 12,
                 "quota": {"limit": 150, "remaining": 138, "resets_at": "2026-12-01T00:00:00Z", "unlimited": false}},
                {"name": "a-much-longer-name", "tier": "shared", "state": "cooling_down",
                 "reason": "quota_exhausted", "consecutive_failures": 2,
                 "cooldown_until": "2026-11-30T10:30:00Z", "access_token_expires_at": null,
                 "requests": 3},
            ]
        });
        let now = humantime::parse_rfc3339("2026-11-30T10:00:00Z").unwrap();
        let table = status_table(&doc, now);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 4, "{table}");
        // Every column starts where its header does.
        let col = |line: &str, i: usize| {
            let starts: Vec<usize> = line
                .char_indices()
                .filter(|&(j, c)| c != ' ' && (j == 0 || line.as_bytes()[j - 1] == b' '))
                .map(|(j, _)| j)
                .collect();
            starts[i]
        };
        assert_eq!(col(lines[1], 1), col(lines[2], 1), "{table}");
        assert_eq!(col(lines[1], 1), col(lines[3], 1), "{table}");
        assert!(lines[2].contains("1h"), "{table}");
        assert!(
            lines[2].contains("138/150") && lines[2].contains("14h"),
            "{table}"
        );
        assert!(lines[1].contains("QUOTA"), "{table}");
        assert!(lines[3].contains("30m"), "{table}");
        // A key that never expires (a static one): "-" under EXPIRES IN.
        assert!(lines[3].contains("quota_exhausted"));
        let at = lines[1].find("EXPIRES IN").unwrap();
        assert!(lines[3][at..].starts_with("- "), "{table}");
        assert!(lines[2][at..].starts_with("1h "), "{table}");
    }

    #[test]
    fn durations_show_their_two_largest_units() {
        assert_eq!(short_duration(45), "45s");
        assert_eq!(short_duration(750), "12m 30s");
        assert_eq!(short_duration(3 * 3600 + 5 * 60 + 9), "3h 5m");
        assert_eq!(short_duration(19 * 86_400 + 23 * 3600 + 3599), "19d 23h");
    }
}
