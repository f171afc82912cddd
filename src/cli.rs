//! The command line: clap's commands, logging setup, and `serve`; the
//! other commands' work in `cli::check` (the summary), `cli::status` (the
//! pool of a running instance as a table) and `cli::demo` (the simulated
//! upstream and a proxy in front of it, with the `sim` feature).
//! `main.rs` only parses and calls [`run`].

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};

mod check;
#[cfg(feature = "sim")]
mod demo;
mod status;

pub use check::summary;
pub use status::status_table;

use crate::config::{process_env, Config};
use crate::generation::Generations;
use crate::run::Listeners;
use crate::shutdown::{shutdown_pair, spawn_signal_handler};

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
    #[cfg(feature = "sim")]
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
        Command::Check { config } => Ok(check::check(config_path(config).as_deref())),
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
            runtime()?.block_on(status::status(&admin, token.as_deref(), output))?;
            Ok(ExitCode::SUCCESS)
        }
        #[cfg(feature = "sim")]
        Command::Demo { redis, upstream } => {
            runtime()?.block_on(demo::demo(redis, upstream))?;
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
