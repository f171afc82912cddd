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
use crate::shutdown::shutdown_pair;
use crate::sim::{AiBehaviour, RefreshBehaviour, Sim};

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
        /// Its admin URL.
        #[arg(long, default_value = "http://127.0.0.1:9090")]
        admin: String,
        /// Admin bearer token.
        #[arg(long, env = "TOKENPOOL_ADMIN_TOKEN", hide_env_values = true)]
        token: Option<String>,
    },
    /// Run a simulated upstream and a proxy in front of it, on loopback.
    Demo,
}

/// Sets up `tracing` on stderr, level from `RUST_LOG` (default `info`).
pub fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Pretty => builder.init(),
        LogFormat::Json => builder.json().init(),
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
                    eprintln!("{e}");
                    return Ok(ExitCode::from(1));
                }
            };
            runtime()?.block_on(serve(config))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Status { admin, token } => {
            runtime()?.block_on(status(&admin, token.as_deref()))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Demo => {
            runtime()?.block_on(demo())?;
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

/// Completes on SIGINT or SIGTERM.
async fn termination() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
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
    tokio::spawn(async move {
        termination().await;
        tracing::info!("shutdown signal received");
        trigger.trigger();
    });
    crate::run::run(generations, listeners, shutdown).await;
    Ok(())
}

/// The demo: a simulated Warp upstream and a proxy in front of it.
async fn demo() -> anyhow::Result<()> {
    let sim = Sim::start().await?;
    for (id, rt) in [
        ("alice", "demo-rt-alice"),
        ("bob", "demo-rt-bob"),
        ("carol", "demo-rt-carol"),
        ("dave", "demo-rt-dave"),
    ] {
        sim.add_account(id, rt);
    }
    sim.set_ai("bob", AiBehaviour::Quota);
    sim.set_refresh("carol", RefreshBehaviour::Revoked);
    let text = format!(
        r#"
[server]
listen = "127.0.0.1:0"
[admin]
listen = "127.0.0.1:0"
[upstream]
url = "{url}"
headers = {{ "x-warp-client-version" = "v0.2026.11.26.demo", "x-warp-os-category" = "Linux" }}
[refresh]
provider = "firebase"
url = "{refresh}"
[pool]
cooldown = "30s"
quota_cooldown = "2m"
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
"#,
        url = sim.url(),
        refresh = sim.refresh_url()
    );
    let config = Config::parse(&text, None, &|_| None)?;
    let listeners = Listeners::bind(&config).await?;
    let (proxy, admin) = listeners.addrs()?;
    let generations = Generations::new(config, Arc::new(|_: &str| None))?;
    println!(
        r#"
tokenpool demo — a simulated Warp upstream at {upstream} and a proxy in front of it.
Tokens: alice (personal, healthy), bob (personal, out of quota), carol (shared,
revoked refresh token), dave (anonymous, healthy).

Try:
  curl -N -X POST http://{proxy}/ai/multi-agent -H 'content-type: application/x-protobuf' -H 'accept: text/event-stream' --data-binary 'hello'
  curl -s http://{admin}/admin/pool
  curl -s http://{admin}/metrics | grep ^tokenpool_
  cargo run --release -- status --admin http://{admin}

Ctrl-C stops it.
"#,
        upstream = sim.url(),
    );
    let (trigger, shutdown) = shutdown_pair();
    tokio::spawn(async move {
        termination().await;
        trigger.trigger();
    });
    crate::run::run(generations, listeners, shutdown).await;
    drop(sim);
    Ok(())
}

/// `tokenpool status`: the pool of a running instance as a table.
async fn status(admin: &str, token: Option<&str>) -> anyhow::Result<()> {
    let url = format!("{}/admin/pool", admin.trim_end_matches('/'));
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
    print!("{}", status_table(&doc, SystemTime::now()));
    Ok(())
}

/// Renders `/admin/pool` as a table.
pub fn status_table(doc: &serde_json::Value, now: SystemTime) -> String {
    use std::fmt::Write;
    let left = |v: &serde_json::Value| -> String {
        v.as_str()
            .and_then(|s| humantime::parse_rfc3339(s).ok())
            .map_or_else(
                || "-".to_string(),
                |t| match t.duration_since(now) {
                    Ok(d) => {
                        humantime::format_duration(Duration::from_secs(d.as_secs())).to_string()
                    }
                    Err(_) => "past".to_string(),
                },
            )
    };
    let mut out = String::new();
    let _ = writeln!(
        out,
        "generation {}  loaded {}  order {}",
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
    let _ = writeln!(
        out,
        "{:<24} {:<10} {:<13} {:<16} {:>5} {:>12} {:>12} {:>9}",
        "NAME", "TIER", "STATE", "REASON", "FAILS", "COOLDOWN", "EXPIRES IN", "REQUESTS"
    );
    for t in doc["tokens"].as_array().into_iter().flatten() {
        let _ = writeln!(
            out,
            "{:<24} {:<10} {:<13} {:<16} {:>5} {:>12} {:>12} {:>9}",
            t["name"].as_str().unwrap_or("?"),
            t["tier"].as_str().unwrap_or("?"),
            t["state"].as_str().unwrap_or("?"),
            t["reason"].as_str().unwrap_or("-"),
            t["consecutive_failures"],
            left(&t["cooldown_until"]),
            left(&t["access_token_expires_at"]),
            t["requests"],
        );
    }
    out
}
