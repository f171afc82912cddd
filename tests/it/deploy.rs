//! What deploy/ relies on, tested on the binary (the container image
//! cannot be built here): the image's command, a non-root user, a
//! read-only config folder with secrets as files, state in the working
//! directory; and the files the repository ships for operators.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokenpool::sim::{RefreshBehaviour, Sim};

use crate::harness::{eventually, run_to_end, CLIENT_KEY};
use crate::process::Running;

/// The uid of the image's `nonroot` user.
const NONROOT: u32 = 65532;

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_container_layout_works_for_a_non_root_user() {
    // As root (CI), run as the image's user: the config is root's and
    // read-only to it, only the state folder is its own.
    let as_root = unsafe_free_uid() == 0 && Path::new("/usr/bin/setpriv").exists();
    let sim = Sim::start().await.unwrap();
    sim.add_account("acct", "rt-container-1");
    sim.set_refresh("acct", RefreshBehaviour::Rotate);
    let root = tempfile::tempdir().unwrap();
    let etc = root.path().join("etc/tokenpool");
    let secrets = root.path().join("etc/tokenpool-secrets");
    let state = root.path().join("var/lib/tokenpool");
    for dir in [&etc, &secrets, &state] {
        std::fs::create_dir_all(dir).unwrap();
    }
    std::fs::write(secrets.join("client"), format!("{CLIENT_KEY}\n")).unwrap();
    std::fs::write(secrets.join("acct"), "rt-container-1\n").unwrap();
    std::fs::write(
        etc.join("tokenpool.toml"),
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\napi_keys = [{{ name = \"c\", key = {{ file = \"{}\" }} }}]\n\
             [admin]\nlisten = \"127.0.0.1:0\"\n\
             [upstream]\npreset = \"warp\"\nurl = \"{}\"\n\
             [refresh]\nurl = \"{}\"\n\
             [state]\npath = \"tokenpool-state.json\"\n\
             [[tokens]]\nname = \"acct\"\ntier = \"personal\"\ntoken = {{ file = \"{}\" }}\n",
            secrets.join("client").display(),
            sim.url(),
            sim.refresh_url(),
            secrets.join("acct").display(),
        ),
    )
    .unwrap();
    if as_root {
        // Root's, readable by others, written by no one else.
        let everyone = |p: &Path, mode| {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
        };
        for dir in [root.path().join("etc"), etc.clone(), secrets.clone()] {
            everyone(&dir, 0o755);
        }
        everyone(root.path(), 0o755);
        everyone(&root.path().join("var"), 0o755);
        everyone(&root.path().join("var/lib"), 0o755);
        for f in ["client", "acct"] {
            everyone(&secrets.join(f), 0o644);
        }
        everyone(&etc.join("tokenpool.toml"), 0o644);
        std::os::unix::fs::chown(&state, Some(NONROOT), Some(NONROOT)).unwrap();
    }

    // The image's command, from its working directory.
    let bin = env!("CARGO_BIN_EXE_tokenpool");
    let config = etc.join("tokenpool.toml");
    let args = [
        "--log-format",
        "json",
        "serve",
        "-c",
        config.to_str().unwrap(),
    ];
    let mut command = if as_root {
        let mut c = tokio::process::Command::new("setpriv");
        c.args([
            &format!("--reuid={NONROOT}"),
            &format!("--regid={NONROOT}"),
            "--clear-groups",
            bin,
        ]);
        c
    } else {
        tokio::process::Command::new(bin)
    };
    command.args(args).current_dir(&state);
    let mut run = Running::start(command);
    let proxy = run.addr("proxy listening", "proxy_addr").await;

    // A request: the refresh rotates the token, which is written to the
    // state file in the working directory before it is used.
    let r = reqwest::Client::new()
        .post(format!("http://{proxy}/ai/multi-agent"))
        .bearer_auth(CLIENT_KEY)
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let file = state.join("tokenpool-state.json");
    eventually(
        "the state file is written",
        Duration::from_secs(10),
        || async { file.exists() },
    )
    .await;
    let saved = std::fs::read_to_string(&file).unwrap();
    assert!(
        saved.contains(&sim.refresh_token("acct").unwrap()),
        "the rotation"
    );
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let meta = std::fs::metadata(&file).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    if as_root {
        assert_eq!(meta.uid(), NONROOT, "written by the image's user");
    }
    assert!(
        !etc.join("tokenpool-state.json").exists(),
        "never next to the config"
    );
    let _ = run.child.kill().await;

    // A state folder it cannot write to stops the start, saying why.
    let config_text = std::fs::read_to_string(&config).unwrap().replace(
        "path = \"tokenpool-state.json\"",
        "path = \"missing/tokenpool-state.json\"",
    );
    std::fs::write(&config, config_text).unwrap();
    // `check` says so too, before `serve` would.
    for command in ["serve", "check"] {
        let out = run_to_end(
            tokio::process::Command::new(bin)
                .args([command, "-c", config.to_str().unwrap()])
                .current_dir(root.path()),
        )
        .await;
        assert_eq!(out.status.code(), Some(1), "{command}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains(
                "cannot write the state file missing/tokenpool-state.json ([state] path)"
            ),
            "{command}: {stderr}"
        );
    }
}

/// The effective uid, read from /proc (no `unsafe` for `geteuid`).
fn unsafe_free_uid() -> u32 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|v| v.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(u32::MAX)
}

#[test]
fn the_files_operators_rely_on_say_what_they_should() {
    // Every alert's runbook is a section of docs/operations.md.
    let alerts = std::fs::read_to_string(repo("dashboards/alerts.yml")).unwrap();
    let operations = std::fs::read_to_string(repo("docs/operations.md")).unwrap();
    let anchors: Vec<String> = operations
        .lines()
        .filter_map(|l| l.strip_prefix("### "))
        .map(|h| h.trim().to_lowercase())
        .collect();
    let mut runbooks = 0;
    for line in alerts.lines() {
        let Some(url) = line.trim().strip_prefix("runbook_url: ") else {
            continue;
        };
        runbooks += 1;
        let anchor = url
            .trim_matches('"')
            .strip_prefix("docs/operations.md#")
            .unwrap_or_else(|| panic!("runbook outside docs/operations.md: {url}"));
        assert!(
            anchors.iter().any(|a| a == anchor),
            "no section for {anchor}"
        );
    }
    assert_eq!(runbooks, alerts.matches("- alert:").count());
    assert!(
        !alerts.contains("job=\"tokenpool\""),
        "no rule names the job"
    );

    // The provisioned data source does not claim to be Grafana's default.
    let datasource =
        std::fs::read_to_string(repo("dashboards/provisioning/datasource.yml")).unwrap();
    assert!(datasource.contains("isDefault: false"), "{datasource}");

    // The licences Cargo.toml names are in the repository.
    let manifest = std::fs::read_to_string(repo("Cargo.toml")).unwrap();
    assert!(manifest.contains("license = \"MIT OR Apache-2.0\""));
    assert!(std::fs::read_to_string(repo("LICENSE-MIT"))
        .unwrap()
        .contains("MIT License"));
    assert!(std::fs::read_to_string(repo("LICENSE-APACHE"))
        .unwrap()
        .contains("Apache License"));

    // The docs stand on their own: nothing points outside the repository.
    for dir in ["docs", "src", "deploy"] {
        for entry in walk(&repo(dir)) {
            let text = std::fs::read_to_string(&entry).unwrap_or_default();
            assert!(
                !text.contains("../shared") && !text.contains("DESIGN §"),
                "{} points outside the repository",
                entry.display()
            );
        }
    }
    for file in ["README.md", "ARCHITECTURE.md", "config.example.toml"] {
        let text = std::fs::read_to_string(repo(file)).unwrap();
        assert!(
            !text.contains("../shared") && !text.contains("DESIGN §"),
            "{file}"
        );
    }
}

/// The image builds with the toolchain the crate asks for; the directory
/// operators apply holds no Secret to overwrite theirs, and its probes are
/// the right way round.
#[test]
fn the_image_and_the_applied_manifests_agree_with_the_crate() {
    let manifest = std::fs::read_to_string(repo("Cargo.toml")).unwrap();
    let rust_version = manifest
        .lines()
        .find_map(|l| l.strip_prefix("rust-version = "))
        .expect("Cargo.toml has a rust-version")
        .trim_matches('"');
    let dockerfile = std::fs::read_to_string(repo("deploy/Dockerfile")).unwrap();
    let image = dockerfile
        .lines()
        .find_map(|l| l.strip_prefix("ARG RUST_VERSION="))
        .expect("the Dockerfile names its toolchain in ARG RUST_VERSION");
    assert_eq!(
        image, rust_version,
        "the Dockerfile's toolchain is the crate's rust-version"
    );
    assert!(
        dockerfile.contains("FROM rust:${RUST_VERSION}-"),
        "{dockerfile}"
    );

    let mut applied = 0;
    for entry in std::fs::read_dir(repo("deploy/kubernetes"))
        .unwrap()
        .flatten()
    {
        let path = entry.path();
        if path.extension().is_none_or(|e| e != "yaml") {
            continue;
        }
        applied += 1;
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            !text.lines().any(|l| l.trim() == "kind: Secret"),
            "{} is applied with the directory and would overwrite the operator's Secret",
            path.display()
        );
        assert!(
            !text.contains("replace-with"),
            "{} holds a placeholder",
            path.display()
        );
    }
    assert!(applied >= 8, "{applied}");
    let example = std::fs::read_to_string(repo("deploy/kubernetes/examples/secret.yaml")).unwrap();
    assert!(example.contains("kind: Secret"));

    let statefulset = std::fs::read_to_string(repo("deploy/kubernetes/statefulset.yaml")).unwrap();
    let probe_path = |probe: &str| {
        let at = statefulset
            .find(probe)
            .unwrap_or_else(|| panic!("no {probe}"));
        statefulset[at..]
            .lines()
            .find_map(|l| l.trim().strip_prefix("path: "))
            .unwrap()
            .to_string()
    };
    assert_eq!(probe_path("livenessProbe:"), "/healthz");
    assert_eq!(probe_path("readinessProbe:"), "/readyz");
    assert!(
        !statefulset.contains("emptyDir"),
        "state on a volume that follows the pod"
    );
    let redis = std::fs::read_to_string(repo("deploy/kubernetes/redis.yaml")).unwrap();
    assert!(
        !redis.contains("--requirepass") && !redis.contains("REDIS_PASSWORD"),
        "no password on Redis's command line"
    );
    for file in ["servicemonitor.yaml", "prometheusrule.yaml"] {
        let text = std::fs::read_to_string(repo(&format!("deploy/kubernetes/{file}"))).unwrap();
        assert!(
            text.contains("    release: kube-prometheus-stack"),
            "{file}"
        );
    }
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out
}
