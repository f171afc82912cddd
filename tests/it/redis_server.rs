//! A real `redis-server` (Debian's package; `scripts/test.sh` installs
//! it), started by the test on a free loopback port with a temporary
//! folder, and stopped when dropped.

use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// Extra settings for a server: a password, TLS.
#[derive(Clone, Default)]
pub struct Options {
    pub password: Option<String>,
    /// `(cert, key, ca)` files: the server speaks TLS only.
    pub tls: Option<(String, String, String)>,
}

pub struct Redis {
    child: Option<Child>,
    pub port: u16,
    dir: tempfile::TempDir,
    options: Options,
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

impl Redis {
    /// A plain server, empty.
    pub async fn start() -> Redis {
        Redis::with(Options::default()).await
    }

    pub async fn with(options: Options) -> Redis {
        let dir = tempfile::tempdir().unwrap();
        let mut redis = Redis {
            child: None,
            port: 0,
            dir,
            options,
        };
        // A port taken between the probe and the start: try another.
        for _ in 0..5 {
            redis.port = free_port();
            if redis.spawn().await {
                return redis;
            }
        }
        panic!("redis-server did not start on any of 5 free ports");
    }

    /// Starts the server on its port; whether it came up.
    async fn spawn(&mut self) -> bool {
        let port = self.port.to_string();
        let mut cmd = Command::new("redis-server");
        cmd.arg("--bind")
            .arg("127.0.0.1")
            .arg("--dir")
            .arg(self.dir.path())
            .arg("--save")
            .arg("")
            .arg("--appendonly")
            .arg("no")
            .arg("--logfile")
            .arg("");
        match &self.options.tls {
            Some((cert, key, ca)) => {
                cmd.args(["--port", "0", "--tls-port", &port])
                    .args(["--tls-cert-file", cert, "--tls-key-file", key])
                    .args(["--tls-ca-cert-file", ca, "--tls-auth-clients", "no"]);
            }
            None => {
                cmd.args(["--port", &port]);
            }
        }
        if let Some(password) = &self.options.password {
            cmd.args(["--requirepass", password]);
        }
        cmd.stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true);
        let mut child = match cmd.spawn() {
            Ok(child) => child,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
                "redis-server is not installed: scripts/test.sh installs it \
                 (Debian: apt-get install redis-server)"
            ),
            Err(e) => panic!("cannot start redis-server: {e}"),
        };
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        let ready = tokio::time::timeout(Duration::from_secs(10), async {
            while let Ok(Some(line)) = lines.next_line().await {
                if line.contains("Ready to accept connections") {
                    return true;
                }
            }
            false
        })
        .await
        .unwrap_or(false);
        if !ready {
            let _ = child.kill().await;
            return false;
        }
        // Keep reading its log so that it never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        self.child = Some(child);
        true
    }

    /// The URL a replica uses (with the password, if any).
    pub fn url(&self) -> String {
        let scheme = if self.options.tls.is_some() {
            "rediss"
        } else {
            "redis"
        };
        match &self.options.password {
            Some(p) => format!("{scheme}://:{p}@127.0.0.1:{}/0", self.port),
            None => format!("{scheme}://127.0.0.1:{}/0", self.port),
        }
    }

    /// Kills it (SIGKILL) and waits until it is gone.
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().await.unwrap();
        }
    }

    /// Writes a snapshot (SAVE) and returns the RDB file's bytes.
    pub async fn snapshot(&self) -> Vec<u8> {
        let mut conn = self.conn().await;
        let () = redis::cmd("SAVE").query_async(&mut conn).await.unwrap();
        std::fs::read(self.dir.path().join("dump.rdb")).unwrap()
    }

    /// Kills it and starts it again on the same port from `rdb`: an old
    /// snapshot restored.
    pub async fn restore(&mut self, rdb: &[u8]) {
        self.kill().await;
        std::fs::write(self.dir.path().join("dump.rdb"), rdb).unwrap();
        assert!(self.spawn().await, "redis-server did not start again");
    }

    /// FLUSHALL: every key of every pool gone, the server running.
    pub async fn flushall(&self) {
        let mut conn = self.conn().await;
        let () = redis::cmd("FLUSHALL").query_async(&mut conn).await.unwrap();
    }

    /// Starts it again on the same port, empty (a new folder).
    pub async fn restart_empty(&mut self) {
        self.kill().await;
        self.dir = tempfile::tempdir().unwrap();
        assert!(self.spawn().await, "redis-server did not start again");
    }

    fn signal(&self, signal: &str) {
        let pid = self.child.as_ref().and_then(Child::id).expect("running");
        let status = std::process::Command::new("kill")
            .args([signal, &pid.to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Freezes it (SIGSTOP): connections stay open and nothing answers.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// Thaws it (SIGCONT).
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    /// A connection for reading what the replicas stored.
    pub async fn conn(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(format!("redis://127.0.0.1:{}/0", self.port))
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap()
    }

    /// Every value under `prefix`, as text: hash fields and values,
    /// strings, set members.
    pub async fn dump(&self, prefix: &str) -> Vec<(String, String)> {
        let mut conn = self.conn().await;
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{prefix}*"))
            .query_async(&mut conn)
            .await
            .unwrap();
        let mut out = Vec::new();
        for key in keys {
            let kind: String = redis::cmd("TYPE")
                .arg(&key)
                .query_async(&mut conn)
                .await
                .unwrap();
            let values: Vec<String> = match kind.as_str() {
                "hash" => redis::cmd("HGETALL").arg(&key).query_async(&mut conn).await,
                "zset" => {
                    redis::cmd("ZRANGE")
                        .arg(&key)
                        .arg(0)
                        .arg(-1)
                        .query_async(&mut conn)
                        .await
                }
                _ => redis::cmd("GET")
                    .arg(&key)
                    .query_async(&mut conn)
                    .await
                    .map(|v: Option<String>| v.into_iter().collect()),
            }
            .unwrap();
            for v in values {
                out.push((key.clone(), v));
            }
        }
        out
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.start_kill();
        }
    }
}
