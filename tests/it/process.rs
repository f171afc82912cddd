//! The real binary as a child process: graceful shutdown on SIGTERM with a
//! stream in flight, and a run at `RUST_LOG=trace` through faults whose
//! every log line, error body, header and admin answer is scanned for
//! secrets.

use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

use tokenpool::sim::{AiBehaviour, RefreshBehaviour, RefreshMode};

use crate::harness::{metric, rt, run_to_end, Setup, CLIENT_KEY};

pub(crate) struct Running {
    pub(crate) child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    rx: mpsc::UnboundedReceiver<String>,
}

impl Running {
    /// `tokenpool serve -c config`, logging JSON at trace level.
    pub(crate) fn spawn(config: &std::path::Path) -> Running {
        let mut command = Command::new(env!("CARGO_BIN_EXE_tokenpool"));
        command
            .args(["--log-format", "json", "serve", "-c"])
            .arg(config)
            .env("RUST_LOG", "trace");
        Running::start(command)
    }

    /// Runs `command` (the binary, with JSON logs), keeping its log lines.
    pub(crate) fn start(mut command: Command) -> Running {
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::unbounded_channel();
        let keep = Arc::clone(&lines);
        tokio::spawn(async move {
            let mut reader = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                keep.lock().unwrap().push(line.clone());
                let _ = tx.send(line);
            }
        });
        Running { child, lines, rx }
    }

    /// Waits for a log line containing `needle`.
    pub(crate) async fn wait_for(&mut self, needle: &str) -> String {
        let found = tokio::time::timeout(Duration::from_secs(20), async {
            while let Some(line) = self.rx.recv().await {
                if line.contains(needle) {
                    return Some(line);
                }
            }
            None
        })
        .await;
        match found {
            Ok(Some(line)) => line,
            _ => panic!(
                "no log line with {needle:?}; got:\n{}",
                self.lines.lock().unwrap().join("\n")
            ),
        }
    }

    /// Every line logged so far.
    pub(crate) fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    /// The address logged in field `field` of a line containing `needle`.
    pub(crate) async fn addr(&mut self, needle: &str, field: &str) -> String {
        let line = self.wait_for(needle).await;
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        v["fields"][field].as_str().unwrap().to_string()
    }
}

/// Sends `req` with `bearer` (the client's key or the admin token).
async fn send(req: reqwest::RequestBuilder, bearer: &str) -> reqwest::Response {
    req.bearer_auth(bearer).send().await.unwrap()
}

/// Appends a response's headers and body to `seen`; returns its status.
async fn take(r: reqwest::Response, seen: &mut String) -> u16 {
    let status = r.status().as_u16();
    for (k, v) in r.headers() {
        seen.push_str(&format!("{k}: {v:?}\n"));
    }
    seen.push_str(&r.text().await.unwrap_or_default());
    status
}

fn sigterm(child: &Child) {
    let pid = child.id().unwrap().to_string();
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(status.success());
}

/// The first string that looks like a JWT: three base64url parts, the
/// first `eyJ…` (every `eyJ` is looked at, not only the first).
fn jwt_like(text: &str) -> Option<&str> {
    text.match_indices("eyJ").find_map(|(start, _)| {
        let rest = &text[start..];
        let end = rest
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.'))
            .unwrap_or(rest.len());
        let candidate = &rest[..end];
        (candidate.matches('.').count() >= 2 && candidate.len() > 20).then_some(candidate)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_a_stream_finish_and_nothing_secret_is_ever_printed() {
    let tokens = &[
        ("quota", "personal"),
        ("unauth", "personal"),
        ("limited", "personal"),
        ("revoked", "shared"),
        ("blocked", "shared"),
        ("html", "shared"),
        ("broken", "shared"),
        ("reset", "shared"),
        ("slowref", "shared"),
        ("good", "anonymous"),
    ];
    let s = Setup::new(
        tokens,
        "max_attempts = 10",
        "[state]\npath = \"{dir}/state.json\"",
    )
    .await;
    let admin_token = "admin-token-4b9d0f";
    s.write(
        &s.config(
            tokens,
            "max_attempts = 10",
            "[state]\npath = \"{dir}/state.json\"",
        )
        .replace(
            "[admin]\nlisten = \"127.0.0.1:0\"",
            &format!("[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"{admin_token}\""),
        )
        .replace("[server]\n", "[server]\ndrain_delay = \"500ms\"\n"),
    );
    s.sim.set_ai("quota", AiBehaviour::Quota);
    s.sim.set_ai("unauth", AiBehaviour::Unauthorized);
    s.sim.set_refresh("revoked", RefreshBehaviour::Revoked);
    s.sim.set_ai("blocked", AiBehaviour::Blocked);
    s.sim.set_ai("limited", AiBehaviour::RateLimited(Some(1)));
    s.sim.set_ai("html", AiBehaviour::HtmlBlock);
    s.sim.set_ai("broken", AiBehaviour::ServerError);
    s.sim.set_ai("reset", AiBehaviour::ResetBeforeHeaders);
    s.sim
        .set_refresh("slowref", RefreshBehaviour::Slow(Duration::from_secs(3)));
    s.sim.set_refresh("good", RefreshBehaviour::Rotate);

    let mut run = Running::spawn(&s.path);
    let proxy = run.addr("proxy listening", "proxy_addr").await;
    let admin = run.addr("admin listening", "admin_addr").await;
    let client = reqwest::Client::new();
    let mut seen_by_client = String::new();

    // Faults: every token but `good` fails in its own way. Some answers
    // are the upstream's (HTML 403, 500) or the proxy's (502): the status
    // varies; what matters is what the client saw, scanned below.
    for _ in 0..12 {
        let r = send(
            client
                .post(format!("http://{proxy}/ai/multi-agent"))
                .body("x"),
            CLIENT_KEY,
        )
        .await;
        take(r, &mut seen_by_client).await;
    }
    // The refresh endpoint answers garbage for a while.
    s.sim.set_refresh_mode(RefreshMode::Garbage);
    s.sim.invalidate_issued_jwts();
    for _ in 0..2 {
        let r = send(
            client.post(format!("http://{proxy}/ai/multi-agent")),
            CLIENT_KEY,
        )
        .await;
        take(r, &mut seen_by_client).await;
    }
    s.sim.set_refresh_mode(RefreshMode::Normal);
    // A rejected config edit is reported with its position, never a value.
    let good_config = std::fs::read_to_string(&s.path).unwrap();
    std::fs::write(
        &s.path,
        good_config.replace("tier = \"anonymous\"", "tier = \"vip\""),
    )
    .unwrap();
    let r = send(
        client.post(format!("http://{admin}/admin/reload")),
        admin_token,
    )
    .await;
    assert_eq!(take(r, &mut seen_by_client).await, 422);
    std::fs::write(&s.path, &good_config).unwrap();
    for bad in ["", "wrong-key"] {
        let r = send(client.post(format!("http://{proxy}/ai/multi-agent")), bad).await;
        assert_eq!(take(r, &mut seen_by_client).await, 401);
    }
    let r = send(
        client
            .post(format!("http://{proxy}/x"))
            .body(vec![0u8; 20_000]),
        CLIENT_KEY,
    )
    .await;
    assert_eq!(take(r, &mut seen_by_client).await, 413);
    // The refresh endpoint fails for a while.
    s.sim.set_refresh_mode(RefreshMode::Down);
    s.sim.invalidate_issued_jwts();
    let r = send(
        client.post(format!("http://{proxy}/ai/multi-agent")),
        CLIENT_KEY,
    )
    .await;
    take(r, &mut seen_by_client).await;
    s.sim.set_refresh_mode(RefreshMode::Normal);
    for path in ["/admin/pool", "/metrics", "/readyz", "/poolz"] {
        let r = send(client.get(format!("http://{admin}{path}")), admin_token).await;
        // /poolz may be 503 here: every token is failing or resting.
        let status = take(r, &mut seen_by_client).await;
        assert!(
            status == 200 || (path == "/poolz" && status == 503),
            "{path}: {status}"
        );
    }
    let r = send(client.post(format!("http://{admin}/admin/reload")), "wrong").await;
    assert_eq!(take(r, &mut seen_by_client).await, 401);

    // A stream in flight when SIGTERM arrives completes.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    s.sim.set_ai("good", AiBehaviour::Hold);
    // Tokens whose faults are not their own (HTML 403, 500, reset) stay in
    // rotation; an operator takes them out so the stream lands on `good`.
    for (name, _) in tokens.iter().filter(|(n, _)| *n != "good") {
        let r = send(
            client.post(format!("http://{admin}/admin/tokens/{name}/disable")),
            admin_token,
        )
        .await;
        assert_eq!(take(r, &mut seen_by_client).await, 200, "{name}");
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let mut stream = loop {
        assert!(
            std::time::Instant::now() < deadline,
            "no 200 for the stream"
        );
        let r = send(
            client.post(format!("http://{proxy}/ai/multi-agent")),
            CLIENT_KEY,
        )
        .await;
        if r.status() == 200 {
            break r;
        }
        // The refresh outage may still be resting a token.
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let first = stream.chunk().await.unwrap().unwrap();
    assert!(first.starts_with(b"data: "));
    sigterm(&run.child);
    run.wait_for("proxy stopped accepting").await;
    assert!(
        tokio::net::TcpStream::connect(&proxy).await.is_err(),
        "no new connections after SIGTERM"
    );
    s.sim.release_streams();
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(chunk) = stream.chunk().await.unwrap() {
            rest.extend_from_slice(&chunk);
        }
    })
    .await
    .expect("the stream ends");
    assert!(
        String::from_utf8_lossy(&rest).ends_with("data: [DONE]\n\n"),
        "the stream completed"
    );
    let status = tokio::time::timeout(Duration::from_secs(10), run.child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status}");

    // Scan everything.
    let logs = run.lines.lock().unwrap().join("\n");
    assert!(
        logs.contains("TRACE") || logs.contains("\"level\":\"TRACE\""),
        "trace logging was on"
    );
    let mut secrets: Vec<String> = tokens.iter().map(|(n, _)| rt(n)).collect();
    secrets.push(s.sim.refresh_token("good").unwrap());
    secrets.push(CLIENT_KEY.to_string());
    secrets.push(admin_token.to_string());
    secrets.push("sim-web-api-key".to_string());
    for (what, text) in [("logs", &logs), ("client-visible answers", &seen_by_client)] {
        for secret in &secrets {
            assert!(
                !text.contains(secret.as_str()),
                "{what} contain a secret ({} chars)",
                secret.len()
            );
        }
        if let Some(jwt) = jwt_like(text) {
            panic!("{what} contain a JWT-looking string: {}…", &jwt[..12]);
        }
    }
    // The state file holds the rotated token (that is its job), mode 0600.
    let state = std::fs::read_to_string(s.dir.path().join("state.json")).unwrap();
    assert!(state.contains(&s.sim.refresh_token("good").unwrap()));
}

/// One SIGTERM under a steady client loop: `/readyz` fails at once, the
/// proxy keeps serving (new connections too) for `drain_delay`, answers
/// close their keep-alive connections, then it stops accepting and exits.
/// The client loop stops 1.5 s after the signal, as a load balancer that
/// saw `/readyz` fail would: not one request fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_before_it_stops_accepting() {
    let s = Setup::new(&[("a", "personal")], "", "").await;
    s.write_server_line(&[("a", "personal")], "drain_delay = \"2s\"");
    let mut run = Running::spawn(&s.path);
    let proxy = run.addr("proxy listening", "proxy_addr").await;
    let admin = run.addr("admin listening", "admin_addr").await;
    let client = reqwest::Client::new();
    let readyz = |client: &reqwest::Client| {
        let request = client.get(format!("http://{admin}/readyz")).send();
        async move { request.await.map(|r| r.status().as_u16()) }
    };
    assert_eq!(readyz(&client).await.unwrap(), 200);

    // The steady loop: a request (a whole streamed answer) every 20 ms on
    // a keep-alive client,
    // until told to stop.
    let started = std::time::Instant::now();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let looping = {
        let (stop, proxy) = (Arc::clone(&stop), proxy.clone());
        tokio::spawn(async move {
            let client = reqwest::Client::new();
            let mut log = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let answer = client
                    .post(format!("http://{proxy}/ai/multi-agent"))
                    .bearer_auth(CLIENT_KEY)
                    .body("x")
                    .send()
                    .await;
                let outcome = match answer {
                    Ok(r) => {
                        let status = r.status().as_u16();
                        match r.bytes().await {
                            Ok(_) => Ok(status),
                            Err(e) => Err(e.to_string()),
                        }
                    }
                    Err(e) => Err(e.to_string()),
                };
                log.push((started.elapsed(), outcome));
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            log
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let signalled = started.elapsed();
    sigterm(&run.child);
    run.wait_for("draining: /readyz answers 503").await;
    assert_eq!(
        readyz(&client).await.unwrap(),
        503,
        "/readyz from the first moment"
    );
    let ready_failed = started.elapsed();

    // One second in: a new connection is still served, and told to close.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let fresh = reqwest::Client::new();
    let r = send(
        fresh
            .post(format!("http://{proxy}/ai/multi-agent"))
            .body("x"),
        CLIENT_KEY,
    )
    .await;
    assert_eq!(r.status(), 200, "a request 1 s after SIGTERM is served");
    assert_eq!(r.headers()["connection"], "close");
    let late = started.elapsed();
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let log = looping.await.unwrap();

    run.wait_for("proxy stopped accepting").await;
    let stopped = started.elapsed();
    assert!(
        tokio::net::TcpStream::connect(&proxy).await.is_err(),
        "no new connections after the drain"
    );
    let status = tokio::time::timeout(Duration::from_secs(10), run.child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status}");
    let exited = started.elapsed();

    let failed: Vec<_> = log.iter().filter(|(_, o)| o != &Ok(200)).collect();
    let during = log.iter().filter(|(t, _)| *t > signalled).count();
    eprintln!(
        "drain timeline: SIGTERM at {signalled:?}; /readyz 503 seen at {ready_failed:?}; \
         fresh connection served at {late:?}; stopped accepting at {stopped:?}; exited at {exited:?}; \
         client loop: {} requests ({during} after SIGTERM), {} failed",
        log.len(),
        failed.len()
    );
    assert!(
        failed.is_empty(),
        "requests failed during the drain: {failed:?}"
    );
    assert!(
        during >= 5,
        "the loop kept sending through the drain: {during}"
    );
    assert!(
        stopped >= signalled + Duration::from_secs(2),
        "accepting for drain_delay"
    );
}

/// The metrics text of the admin listener at `admin`.
async fn scrape(client: &reqwest::Client, admin: &str) -> String {
    client
        .get(format!("http://{admin}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// The port of an address the binary logged (`0.0.0.0:P`), on 127.0.0.1:
/// the test binds every interface but sends to loopback only.
fn on_loopback(logged: &str) -> String {
    let port = logged.rsplit(':').next().unwrap();
    format!("127.0.0.1:{port}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_never_opens_a_keyed_proxy_or_runs_on_an_empty_file() {
    let tokens = &[("a", "personal")];
    let s = Setup::new(tokens, "", "").await;
    let admin_token = "admin-token-91c2e7";
    let keyed = s
        .config(tokens, "", "")
        .replace(
            "[server]\nlisten = \"127.0.0.1:0\"",
            "[server]\nlisten = \"0.0.0.0:0\"",
        )
        .replace(
            "[admin]\nlisten = \"127.0.0.1:0\"",
            &format!("[admin]\nlisten = \"0.0.0.0:0\"\ntoken = \"{admin_token}\""),
        );
    assert!(keyed.contains("0.0.0.0:0\"\napi_keys") && keyed.contains(admin_token));
    s.write(&keyed);
    let mut run = Running::spawn(&s.path);
    let proxy = on_loopback(&run.addr("proxy listening", "proxy_addr").await);
    let admin = on_loopback(&run.addr("admin listening", "admin_addr").await);
    let client = reqwest::Client::new();
    let ai = || {
        client
            .post(format!("http://{proxy}/ai/multi-agent"))
            .body("x")
    };
    assert_eq!(ai().send().await.unwrap().status(), 401);
    assert_eq!(send(ai(), CLIENT_KEY).await.status(), 200);

    // A file with no [server] table: its default address is loopback, but
    // the listener stays bound on every interface.
    let (server_table, rest) = keyed.split_once("[admin]").unwrap();
    assert!(server_table.contains("api_keys"));
    s.write(&format!("[admin]{rest}"));
    let line = run.wait_for("config reload refused").await;
    assert!(line.contains("sets no [server] api_keys"), "{line}");
    assert_eq!(ai().send().await.unwrap().status(), 401, "still keyed");
    let m = scrape(&client, &admin).await;
    assert_eq!(metric(&m, "tokenpool_config_last_reload_successful"), 0.0);
    assert!(metric(&m, "tokenpool_config_reloads_total{result=\"failure\"}") >= 1.0);
    let r = send(
        client.post(format!("http://{admin}/admin/reload")),
        admin_token,
    )
    .await;
    assert_eq!(r.status(), 422);
    let body: serde_json::Value = serde_json::from_str(&r.text().await.unwrap()).unwrap();
    assert_eq!(body["error"]["code"], "config_rejected");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("which is not a loopback address, and this file sets no [server] api_keys"),
        "{body}"
    );

    // A zero-byte write (a truncated save) is not "all defaults".
    s.write("");
    let line = run.wait_for("config reload failed").await;
    assert!(line.contains("the file is empty"), "{line}");
    assert_eq!(send(ai(), CLIENT_KEY).await.status(), 200, "tokens kept");
    std::fs::write(&s.path, " \n\t\n").unwrap();
    run.wait_for("the file is empty").await;

    // Taking the admin token off the public admin listener is refused too.
    s.write(&keyed.replace(&format!("\ntoken = \"{admin_token}\""), ""));
    let line = run.wait_for("config reload refused").await;
    assert!(line.contains("removes [admin] token"), "{line}");
    let r = send(
        client.get(format!("http://{admin}/admin/pool")),
        admin_token,
    )
    .await;
    assert_eq!(r.status(), 200, "the admin token still works");

    // Removing every token is applied, and said at WARN.
    let (head, _) = keyed.split_once("[[tokens]]").unwrap();
    s.write(head);
    let line = run.wait_for("removes every token").await;
    assert!(line.contains("\"level\":\"WARN\""), "{line}");
    assert!(line.contains("1 before, 0 after"), "{line}");
    assert_eq!(send(ai(), CLIENT_KEY).await.status(), 503);
    assert_eq!(ai().send().await.unwrap().status(), 401);

    let logs = run.lines.lock().unwrap().join("\n");
    for secret in [CLIENT_KEY, admin_token, &rt("a"), "sim-web-api-key"] {
        assert!(!logs.contains(secret), "a secret is in the log");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_access_log_tells_which_tokens_a_request_tried() {
    let tokens = &[("q", "personal"), ("b", "personal"), ("g", "shared")];
    let s = Setup::new(tokens, "max_attempts = 3\nfailure_threshold = 1", "").await;
    let named = s
        .config(tokens, "max_attempts = 3\nfailure_threshold = 1", "")
        .replace(
            &format!("api_keys = [\"{CLIENT_KEY}\"]"),
            &format!("api_keys = [{{ name = \"team-a\", key = \"{CLIENT_KEY}\" }}]"),
        );
    assert!(named.contains("team-a"));
    s.write(&named);
    s.sim.set_ai("q", AiBehaviour::Quota);
    s.sim.set_ai("b", AiBehaviour::Blocked);
    let mut run = Running::spawn(&s.path);
    let proxy = run.addr("proxy listening", "proxy_addr").await;
    let admin = run.addr("admin listening", "admin_addr").await;
    let client = reqwest::Client::new();

    let r = send(
        client
            .post(format!("http://{proxy}/ai/multi-agent?sig=query-secret"))
            .header("x-request-id", "req-failover-1")
            .body("x"),
        CLIENT_KEY,
    )
    .await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-request-id"], "req-failover-1");
    let body = r.text().await.unwrap();
    assert!(body.ends_with("data: [DONE]\n\n"));
    let upstream_ids: Vec<String> = s
        .sim
        .seen()
        .iter()
        .filter_map(|(_, h)| {
            h.get("x-request-id")
                .map(|v| v.to_str().unwrap().to_string())
        })
        .collect();
    assert_eq!(
        upstream_ids, ["req-failover-1"; 3],
        "every attempt carries it"
    );

    let line = run.wait_for("req-failover-1").await;
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(v["target"], "tokenpool::access");
    assert_eq!(v["level"], "INFO");
    let f = &v["fields"];
    assert_eq!(f["method"], "POST");
    assert_eq!(f["path"], "/ai/multi-agent");
    assert_eq!(f["client"], "team-a");
    assert_eq!(f["status"], 200);
    assert_eq!(f["error"], "-");
    assert_eq!(f["error_source"], "-");
    // The client's address, also on the connection's span.
    let peer = f["peer"].as_str().unwrap();
    assert!(peer.starts_with("127.0.0.1:"), "{peer}");
    assert_eq!(v["span"]["name"], "connection");
    assert_eq!(v["span"]["peer"], peer);
    assert_eq!(f["tried"], "q/personal,b/personal,g/shared");
    // Over h2c too (hyper serves each stream in a task of its own), and a
    // refused request names where its error came from.
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let refused = h2
        .post(format!("http://{proxy}/ai/multi-agent"))
        .header("x-request-id", "req-h2-refused")
        .header("authorization", "Bearer not-a-key")
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(refused.version(), reqwest::Version::HTTP_2);
    assert_eq!(refused.status(), 401);
    let h2_line = run.wait_for("req-h2-refused").await;
    let h2v: serde_json::Value = serde_json::from_str(&h2_line).unwrap();
    assert_eq!(h2v["fields"]["error"], "unauthorized");
    assert_eq!(h2v["fields"]["error_source"], "client");
    let h2_peer = h2v["fields"]["peer"].as_str().unwrap();
    assert!(h2_peer.starts_with("127.0.0.1:"), "{h2_line}");
    assert_eq!(h2v["span"]["peer"], h2_peer, "{h2_line}");
    assert_eq!(f["token"], "g");
    assert_eq!(f["attempts"], 3);
    assert_eq!(f["upstream_status"], 200);
    assert_eq!(f["bytes"].as_u64(), Some(body.len() as u64));
    assert!(f["head_ms"].as_f64().unwrap() <= f["total_ms"].as_f64().unwrap());
    assert!(!line.contains("query-secret"), "no query string: {line}");

    // Both failovers were token state changes, each said at WARN.
    let logs = run.lines.lock().unwrap().join("\n");
    for (token, to, reason) in [
        ("q", "cooling_down", "quota_exhausted"),
        ("b", "disabled", "forbidden"),
    ] {
        let changed = logs
            .lines()
            .filter(|l| l.contains("token state changed"))
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .find(|l| l["fields"]["token"] == token)
            .unwrap_or_else(|| panic!("no state change for {token}:\n{logs}"));
        assert_eq!(changed["level"], "WARN");
        assert_eq!(changed["fields"]["from"], "active");
        assert_eq!(changed["fields"]["to"], to);
        assert_eq!(changed["fields"]["reason"], reason);
        assert!(
            changed["fields"]["back"].as_str().unwrap().contains('T'),
            "when it comes back: {changed}"
        );
    }

    // A refused request has a line too, with no client and no token.
    let r = client
        .post(format!("http://{proxy}/ai/multi-agent"))
        .header("x-request-id", "req-refused-2")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(r.headers()["x-request-id"], "req-refused-2");
    let line = run.wait_for("req-refused-2").await;
    let f: serde_json::Value = serde_json::from_str(&line).unwrap();
    let f = &f["fields"];
    assert_eq!(
        (
            f["status"].as_u64(),
            f["error"].as_str(),
            f["client"].as_str()
        ),
        (Some(401), Some("unauthorized"), Some("-"))
    );
    assert_eq!(
        (f["tried"].as_str(), f["attempts"].as_u64()),
        (Some("-"), Some(0))
    );

    let m = scrape(&client, &admin).await;
    assert_eq!(
        metric(
            &m,
            "tokenpool_client_requests_total{client=\"team-a\",outcome=\"success\"}"
        ),
        1.0
    );
    // The h2c request and this one.
    assert_eq!(
        metric(
            &m,
            "tokenpool_client_requests_total{client=\"-\",outcome=\"rejected\"}"
        ),
        2.0
    );
    for secret in [CLIENT_KEY, "sim-web-api-key", &rt("g")] {
        assert!(!logs.contains(secret), "a secret is in the log");
    }
}

#[tokio::test]
async fn fatal_errors_name_what_failed_in_the_chosen_format() {
    // A listener that cannot be bound: the error names it and its address.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokenpool.toml");
    std::fs::write(
        &path,
        format!("[server]\nlisten = \"127.0.0.1:{port}\"\n[admin]\nlisten = \"127.0.0.1:0\"\n[refresh]\nprovider = \"static\"\n"),
    )
    .unwrap();
    let bin = env!("CARGO_BIN_EXE_tokenpool");
    let out = run_to_end(
        tokio::process::Command::new(bin)
            .args(["serve", "-c"])
            .arg(&path),
    )
    .await;
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!(
            "cannot bind the proxy listener ([server] listen = 127.0.0.1:{port})"
        )),
        "{stderr}"
    );
    // Logs for a file or a collector carry no colour codes.
    assert!(!stderr.contains('\u{1b}'), "colour codes in {stderr:?}");

    // Under --log-format json, fatal errors are JSON lines too.
    let error = fatal_json(&path).await;
    assert!(error.contains("proxy listener"), "{error}");
    drop(taken);
    // So are config errors.
    std::fs::write(&path, "[pool]\ncooldown = \"5M\"\n").unwrap();
    let error = fatal_json(&path).await;
    assert!(
        error.contains(":2:12: [pool] cooldown = \"5M\" is not a duration"),
        "{error}"
    );
}

/// Runs `serve -c path` under `--log-format json`, which must fail; the
/// error of its last line, which must be a JSON log line at ERROR.
async fn fatal_json(path: &std::path::Path) -> String {
    let out = run_to_end(
        tokio::process::Command::new(env!("CARGO_BIN_EXE_tokenpool"))
            .args(["--log-format", "json", "serve", "-c"])
            .arg(path),
    )
    .await;
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let last = stderr.lines().last().unwrap();
    let v: serde_json::Value =
        serde_json::from_str(last).unwrap_or_else(|e| panic!("not JSON ({e}): {stderr}"));
    assert_eq!(v["level"], "ERROR");
    v["fields"]["error"].as_str().unwrap().to_string()
}
