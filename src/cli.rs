//! The command line: `serve`, `check`, `status` and `demo`,
//! and logging setup. `main.rs` only parses and calls [`run`].

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};

use crate::config::{process_env, Config};
use crate::generation::Generations;
use crate::run::Listeners;
use crate::shutdown::{shutdown_pair, spawn_signal_handler};
use crate::sim::{RefreshBehaviour, Sim};

/// tokenpool: a reverse proxy that puts a pooled upstream credential on
/// every request.
#[derive(Debug, Parser)]
#[command(version, about)]
pub struct Cli {
    /// Log format on stderr.
    #[arg(long, value_enum, default_value_t = LogFormat::Pretty, global = true)]
    pub log_format: LogFormat,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// What `tokenpool status` prints.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum StatusOutput {
    /// An aligned table.
    Table,
    /// The JSON document of `/admin/pool`.
    Json,
}

/// Log output formats.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Pretty,
    /// One JSON object per line.
    Json,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the proxy.
    Serve {
        /// Config file [default: $TOKENPOOL_CONFIG, else ./tokenpool.toml if it exists, else env-only mode]
        #[arg(short, long)]
        config: Option<PathBuf>,
    },
    /// Parse and validate a config and print a summary (never a secret).
    Check {
        /// Config file [default: as for serve]
        #[arg(short, long)]
        config: Option<PathBuf>,
    },
    /// Show the pool of a running instance.
    Status {
        /// Its admin URL (`http://` is assumed when no scheme is given).
        #[arg(long, default_value = "http://127.0.0.1:9090")]
        admin: String,
        /// Admin bearer token.
        #[arg(long, env = "TOKENPOOL_ADMIN_TOKEN", hide_env_values = true)]
        token: Option<String>,
        /// Output: a table for people, or the `/admin/pool` JSON as it came.
        #[arg(short, long, value_enum, default_value_t = StatusOutput::Table)]
        output: StatusOutput,
    },
    /// Run a simulated upstream and a proxy in front of it, on loopback.
    Demo {
        /// Join a cluster at this Redis (`redis://127.0.0.1:6379`): run it
        /// twice to see two replicas share one pool.
        #[arg(long)]
        redis: Option<String>,
        /// Use the simulated upstream another demo started (the address it
        /// printed) instead of starting one: with --redis, two replicas in
        /// front of one simulated provider.
        #[arg(long, requires = "redis")]
        upstream: Option<String>,
    },
}

/// Sets up `tracing` on stderr, level from `RUST_LOG` (default `info`).
pub fn init_logging(format: LogFormat) {
    let mut filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // The file watcher's own debug and trace lines describe every event in
    // the watched folders: with the log written into the config's folder,
    // each line would be an event that writes another line. They are
    // shown only when RUST_LOG names the watcher itself.
    if !std::env::var("RUST_LOG").is_ok_and(|v| v.contains("notify")) {
        filter = filter.add_directive("notify=info".parse().expect("a valid directive"));
    }
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour codes only for a person at a terminal, never in a file
        // or a log collector.
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Pretty => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Says a fatal error on stderr: a plain `error: …` line, or under
/// `--log-format json` one JSON object like every other log line.
pub fn fatal(format: LogFormat, message: &str) {
    match format {
        LogFormat::Pretty => eprintln!("error: {message}"),
        LogFormat::Json => tracing::error!(error = message, "fatal"),
    }
}

/// Which config a command uses: `-c`, else `$TOKENPOOL_CONFIG`, else
/// `./tokenpool.toml` if it exists, else none (env-only mode).
pub fn config_path(flag: Option<PathBuf>) -> Option<PathBuf> {
    flag.or_else(|| std::env::var_os("TOKENPOOL_CONFIG").map(PathBuf::from))
        .or_else(|| {
            let default = PathBuf::from("tokenpool.toml");
            default.exists().then_some(default)
        })
}

fn load(path: Option<&Path>) -> Result<Config, crate::config::ConfigError> {
    match path {
        Some(p) => Config::load(p, &process_env),
        None => Config::from_env(&process_env),
    }
}

/// Runs a parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Check { config } => {
            let path = config_path(config);
            match load(path.as_deref()) {
                Ok(c) => {
                    // `serve` would stop on a state folder it cannot write
                    // to: `check` says so first.
                    if let Some(path) = &c.state.path {
                        if let Err(e) = crate::state::StateStore::new(path).check_writable() {
                            eprintln!(
                                "{}: {e}",
                                c.path.as_deref().map_or_else(
                                    || "environment".into(),
                                    |p| p.display().to_string()
                                )
                            );
                            return Ok(ExitCode::from(1));
                        }
                    }
                    print!("{}", c.summary());
                    for warning in c.warnings() {
                        println!("warning: {warning}");
                    }
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => {
                    eprintln!("{e}");
                    Ok(ExitCode::from(1))
                }
            }
        }
        Command::Serve { config } => {
            let path = config_path(config);
            let config = match load(path.as_deref()) {
                Ok(c) => c,
                Err(e) => {
                    match cli.log_format {
                        LogFormat::Pretty => eprintln!("{e}"),
                        LogFormat::Json => fatal(cli.log_format, &e.to_string()),
                    }
                    return Ok(ExitCode::from(1));
                }
            };
            runtime()?.block_on(serve(config))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Status {
            admin,
            token,
            output,
        } => {
            runtime()?.block_on(status(&admin, token.as_deref(), output))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Demo { redis, upstream } => {
            runtime()?.block_on(demo(redis, upstream))?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// The async runtime: multi-threaded, or single-threaded when the process
/// may use one CPU only (a pinned or 1-CPU container), where a
/// work-stealing scheduler only adds overhead.
fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut builder = if cpus == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    builder
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

async fn serve(config: Config) -> anyhow::Result<()> {
    tracing::info!(
        config = %config.path.as_ref().map_or_else(|| "environment only".into(), |p| p.display().to_string()),
        tokens = config.tokens.len(),
        version = env!("CARGO_PKG_VERSION"),
        "starting"
    );
    for warning in config.warnings() {
        tracing::warn!(warning = %warning, "config warning");
    }
    let listeners = Listeners::bind(&config).await?;
    let generations = Generations::new(config, Arc::new(process_env))?;
    let (trigger, shutdown) = shutdown_pair();
    spawn_signal_handler(trigger);
    crate::run::run(generations, listeners, shutdown).await;
    Ok(())
}

/// The demo: a simulated Warp upstream and a proxy in front of it; with
/// `upstream`, another demo's simulated upstream.
async fn demo(redis: Option<String>, upstream: Option<String>) -> anyhow::Result<()> {
    let own = match &upstream {
        Some(_) => None,
        None => Some(Sim::start().await?),
    };
    let (url, refresh) = match (&own, upstream) {
        (Some(sim), _) => (sim.url(), sim.refresh_url()),
        (None, Some(url)) => {
            let url = url.trim_end_matches('/').to_string();
            let refresh = crate::sim::refresh_url_of(&url);
            (url, refresh)
        }
        (None, None) => unreachable!("a demo starts a simulator unless given one"),
    };
    if let Some(sim) = &own {
        demo_accounts(sim, redis.is_some());
    }
    let text = demo_config(&url, &refresh, redis.as_deref());
    let config = Config::parse(&text, None, &|_| None)?;
    let listeners = Listeners::bind(&config).await?;
    let (proxy, admin) = listeners.addrs()?;
    let generations = Generations::new(config, Arc::new(|_: &str| None))?;
    let cluster_note = match (&redis, &own) {
        (Some(_), Some(_)) => format!(
            "In cluster mode: it shares its pool through Redis (key prefix tokenpool-demo).\n\
             dave's provider rotates his refresh token on every refresh and revokes the\n\
             account if an older one comes back. A second replica in front of the same\n\
             simulated provider:\n  \
             cargo run --release -- demo --redis <the same URL> --upstream {url}\n"
        ),
        (Some(_), None) => {
            "In cluster mode: a second replica, sharing the pool and the provider.\n".to_string()
        }
        (None, _) => String::new(),
    };
    println!(
        r#"
tokenpool demo — a simulated Warp upstream at {url} and a proxy in front of it.
Tokens: alice (personal, healthy), bob (personal, out of quota), carol (shared,
revoked refresh token), dave (anonymous, healthy).
{cluster_note}
Try:
  curl -N -X POST http://{proxy}/ai/multi-agent -H 'content-type: application/x-protobuf' -H 'accept: text/event-stream' --data-binary 'hello'
  curl -s http://{admin}/admin/pool
  curl -s http://{admin}/metrics | grep ^tokenpool_
  cargo run --release -- status --admin http://{admin}

Ctrl-C stops it.
"#
    );
    let (trigger, shutdown) = shutdown_pair();
    spawn_signal_handler(trigger);
    crate::run::run(generations, listeners, shutdown).await;
    drop(own);
    Ok(())
}

/// The demo's simulated accounts; `cluster`: replicas may share them.
fn demo_accounts(sim: &Sim, cluster: bool) {
    for (id, rt) in [
        ("alice", "demo-rt-alice"),
        ("bob", "demo-rt-bob"),
        ("carol", "demo-rt-carol"),
        ("dave", "demo-rt-dave"),
    ] {
        sim.add_account(id, rt);
    }
    // Monthly quotas, as Warp's: alice has most of hers, bob none left
    // (the quota poll tells, so he rests without a failed request), dave
    // (anonymous) has no limit here.
    let refill = std::time::SystemTime::now() + Duration::from_secs(20 * 24 * 3600);
    sim.set_quota("alice", 150, 12, refill);
    sim.set_quota("bob", 150, 150, refill);
    sim.set_refresh("carol", RefreshBehaviour::Revoked);
    if cluster {
        // A provider that rotates dave's refresh token on every refresh and
        // revokes the account if an older one comes back: replicas in front
        // of it never present a superseded one.
        sim.set_refresh("dave", RefreshBehaviour::RotateStrict);
    }
}

/// The demo's configuration text.
fn demo_config(url: &str, refresh: &str, redis: Option<&str>) -> String {
    let cluster = match redis {
        Some(redis) => format!(
            "[cluster]\nredis = {redis:?}\nkey_prefix = \"tokenpool-demo\"\nnode = \"demo-{}\"\n",
            std::process::id()
        ),
        None => String::new(),
    };
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
# No load balancer to tell: Ctrl-C stops at once.
drain_delay = "0s"
[admin]
listen = "127.0.0.1:0"
[upstream]
preset = "warp"
url = "{url}"
[refresh]
url = "{refresh}"
[pool]
cooldown = "30s"
quota_cooldown = "2m"
[quota]
provider = "warp"
{cluster}
[[tokens]]
name = "alice"
tier = "personal"
token = "demo-rt-alice"
[[tokens]]
name = "bob"
tier = "personal"
token = "demo-rt-bob"
[[tokens]]
name = "carol"
tier = "shared"
token = "demo-rt-carol"
[[tokens]]
name = "dave"
tier = "anonymous"
token = "demo-rt-dave"
"#
    )
}

/// `tokenpool status`: the pool of a running instance.
async fn status(admin: &str, token: Option<&str>, output: StatusOutput) -> anyhow::Result<()> {
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
