//! A fluent harness: a simulated upstream, a config file in a temporary
//! folder, and a real proxy (listeners on port 0) in this process.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokenpool::config::Config;
use tokenpool::generation::Generations;
use tokenpool::pool::{Reason, TokenState};
use tokenpool::run::{run, Listeners};
use tokenpool::shutdown::{shutdown_pair, ShutdownTrigger};
use tokenpool::sim::Sim;

/// The key clients present.
pub const CLIENT_KEY: &str = "client-key-5f1d2c";

/// The refresh token the simulator knows for account `name`.
pub fn rt(name: &str) -> String {
    format!("rt-{name}-7c3a91e4b2")
}

/// The key of the one token [`static_config`] holds.
pub const STATIC_KEY: &str = "sk-static-upstream-key";

/// A config in `dir` with one static key ([`STATIC_KEY`], so no refresh
/// endpoint) in front of `url`, with Warp's client headers; `server_extra`
/// and `upstream_extra` are lines added to `[server]` and `[upstream]`.
pub fn static_config(dir: &Path, url: &str, server_extra: &str, upstream_extra: &str) -> PathBuf {
    let path = dir.join("tokenpool.toml");
    // No empty line when there is nothing to add: errors name lines.
    let server_lines: String = server_extra.lines().map(|l| format!("{l}\n")).collect();
    // The suites send many paths: every route is forwarded.
    let routes = "routes = [\"* /*\"]\n";
    std::fs::write(
        &path,
        format!(
            r#"[server]
listen = "127.0.0.1:0"
api_keys = ["{CLIENT_KEY}"]
{server_lines}[admin]
listen = "127.0.0.1:0"
[upstream]
preset = "warp"
url = "{url}"
idle_timeout = "5s"
{routes}{upstream_extra}
[refresh]
provider = "static"
[[tokens]]
name = "k1"
tier = "shared"
token = "{STATIC_KEY}"
"#
        ),
    )
    .unwrap();
    path
}

/// Runs `command` (the binary, expected to end by itself) to its end;
/// a run past 20 s is killed and fails the test rather than hanging it.
pub async fn run_to_end(command: &mut tokio::process::Command) -> std::process::Output {
    let out = tokio::time::timeout(Duration::from_secs(20), command.kill_on_drop(true).output())
        .await
        .expect("the command ends by itself");
    out.unwrap()
}

/// A simulator with accounts, and a folder holding the config file.
pub struct Setup {
    pub sim: Sim,
    pub dir: tempfile::TempDir,
    pub path: PathBuf,
}

impl Setup {
    /// A simulator with one account per token, and a config naming them.
    /// `tokens` are `(name, tier)`; `pool` is the body of `[pool]`;
    /// `extra` is appended (more sections).
    pub async fn new(tokens: &[(&str, &str)], pool: &str, extra: &str) -> Setup {
        let sim = Sim::start().await.unwrap();
        for (name, _) in tokens {
            sim.add_account(name, &rt(name));
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenpool.toml");
        let setup = Setup { sim, dir, path };
        setup.write(&setup.config(tokens, pool, extra));
        setup
    }

    /// The config text for `tokens` against this simulator; `{dir}` in
    /// `extra` stands for the setup's folder.
    pub fn config(&self, tokens: &[(&str, &str)], pool: &str, extra: &str) -> String {
        let extra = extra.replace("{dir}", &self.dir.path().display().to_string());
        let mut text = format!(
            r#"[server]
listen = "127.0.0.1:0"
api_keys = ["{CLIENT_KEY}"]
max_request_body_bytes = 4096
shutdown_grace = "10s"

[admin]
listen = "127.0.0.1:0"

[upstream]
preset = "warp"
url = "{url}"
idle_timeout = "5s"
headers = {{ "x-warp-client-version" = "sim-test" }}
# The suites send many paths; the route tests take this line out.
routes = ["* /*"]

[refresh]
url = "{refresh}"
timeout = "2s"

[pool]
{pool}

{extra}
"#,
            url = self.sim.url(),
            refresh = self.sim.refresh_url(),
        );
        for (name, tier) in tokens {
            text.push_str(&format!(
                "[[tokens]]\nname = \"{name}\"\ntier = \"{tier}\"\ntoken = \"{}\"\n",
                rt(name)
            ));
        }
        text
    }

    /// Writes the config file in place.
    pub fn write(&self, text: &str) {
        std::fs::write(&self.path, text).unwrap();
    }

    /// Writes the config for `tokens` with `from` replaced by `to`; `from`
    /// must be there, so that a change to the config text cannot quietly
    /// drop the setting a test relies on.
    pub fn write_replacing(&self, tokens: &[(&str, &str)], from: &str, to: &str) {
        let text = self.config(tokens, "", "");
        assert!(text.contains(from), "the config has no {from:?}");
        self.write(&text.replace(from, to));
    }

    /// Writes the config for `tokens` with `line` added to `[server]`.
    pub fn write_server_line(&self, tokens: &[(&str, &str)], line: &str) {
        self.write_replacing(tokens, "[server]\n", &format!("[server]\n{line}\n"));
    }

    /// Starts a proxy on this setup's config file.
    pub async fn proxy(&self) -> Proxy {
        Proxy::start(&self.path).await
    }
}

/// A running proxy.
pub struct Proxy {
    pub generations: Arc<Generations>,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub client: reqwest::Client,
    trigger: Option<ShutdownTrigger>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Proxy {
    /// Loads `path` and serves it on port 0.
    pub async fn start(path: &Path) -> Proxy {
        let config = Config::load(path, &|_| None).unwrap();
        let listeners = Listeners::bind(&config).await.unwrap();
        let (addr, admin) = listeners.addrs().unwrap();
        let generations = Generations::new(config, Arc::new(|_: &str| None)).unwrap();
        let (trigger, shutdown) = shutdown_pair();
        let task = tokio::spawn(run(Arc::clone(&generations), listeners, shutdown));
        let proxy = Proxy {
            generations,
            addr,
            admin,
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(20))
                .pool_max_idle_per_host(0)
                .build()
                .unwrap(),
            trigger: Some(trigger),
            task: Some(task),
        };
        // The watcher and background tasks are up once the admin listener
        // answers: `run` starts them first.
        let health = proxy.admin_url("/healthz");
        eventually(
            "the admin listener answers",
            Duration::from_secs(10),
            || async {
                proxy
                    .client
                    .get(&health)
                    .send()
                    .await
                    .is_ok_and(|r| r.status() == 200)
            },
        )
        .await;
        proxy
    }

    /// Stops it gracefully and waits until it has.
    pub async fn stop(mut self) {
        if let Some(t) = self.trigger.take() {
            t.trigger();
        }
        if let Some(task) = self.task.take() {
            task.await.unwrap();
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin)
    }

    /// POST /ai/multi-agent with the client key.
    pub async fn ai(&self) -> reqwest::Response {
        self.client
            .post(self.url("/ai/multi-agent"))
            .bearer_auth(CLIENT_KEY)
            .header("content-type", "application/x-protobuf")
            .header("accept", "text/event-stream")
            .body("hello")
            .send()
            .await
            .unwrap()
    }

    /// POST /ai/multi-agent and read the whole answer.
    pub async fn ai_text(&self) -> (u16, reqwest::header::HeaderMap, String) {
        let r = self.ai().await;
        let status = r.status().as_u16();
        let headers = r.headers().clone();
        (status, headers, r.text().await.unwrap_or_default())
    }

    /// GET /admin/pool.
    pub async fn pool(&self) -> serde_json::Value {
        serde_json::from_str(&self.admin_text("/admin/pool").await).unwrap()
    }

    /// Waits until the running generation is `at_least` (a reload landed).
    pub async fn wait_generation(&self, at_least: u64) {
        eventually(
            &format!("generation {at_least}"),
            Duration::from_secs(10),
            || async { self.generations.current().id >= at_least },
        )
        .await;
    }

    /// GET /metrics.
    pub async fn metrics(&self) -> String {
        self.admin_text("/metrics").await
    }

    /// The body of GET `path` on the admin listener (no admin token).
    pub async fn admin_text(&self, path: &str) -> String {
        self.client
            .get(self.admin_url(path))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// A token's state and reason, read from the pool.
    pub fn state(&self, name: &str) -> (TokenState, Option<Reason>) {
        let s = self
            .generations
            .current()
            .pool
            .get(name)
            .expect("token exists")
            .snapshot();
        (s.state, s.reason)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(t) = self.trigger.take() {
            t.trigger();
        }
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// The value of one sample in a metrics text, e.g.
/// `metric(&text, "tokenpool_requests_total{outcome=\"success\"}")`.
pub fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(series)
                .and_then(|rest| rest.trim().parse().ok())
        })
        .unwrap_or(0.0)
}

/// The value of one sample that must be there: a renamed or missing
/// series fails the test instead of reading as 0.
pub fn metric_of(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(series)
                .and_then(|rest| rest.trim().parse().ok())
        })
        .unwrap_or_else(|| panic!("no series {series} in the metrics"))
}

/// Polls `check` until it returns true, failing after `limit`. For
/// conditions that depend on wall-clock time (cooldowns) or on background
/// work, where there is no event to await.
pub async fn eventually<F, Fut>(what: &str, limit: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if check().await {
            return;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out after {limit:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Reads a response body to its end or its break: the bytes that arrived,
/// and whether the body broke instead of ending cleanly.
pub async fn read_to_break(r: &mut reqwest::Response) -> (Vec<u8>, bool) {
    let mut received = Vec::new();
    loop {
        match r.chunk().await {
            Ok(Some(data)) => received.extend_from_slice(&data),
            Ok(None) => return (received, false),
            Err(_) => return (received, true),
        }
    }
}
