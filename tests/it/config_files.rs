//! Config fixtures: every valid file loads, every invalid file is rejected
//! with the expected message at the expected position; the example config
//! passes; `tokenpool check` prints a summary or a located error.

use std::path::{Path, PathBuf};
use std::process::Command;

use tokenpool::config::{Config, Tier};

fn fixtures(kind: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/config")
        .join(kind);
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    files.sort();
    files
}

fn fixture_env(name: &str) -> Option<String> {
    match name {
        "TOKENPOOL_FIXTURE_KEY" => Some("env-client-key".into()),
        "TOKENPOOL_FIXTURE_BOB" => Some("rt-bob-from-env".into()),
        _ => None,
    }
}

#[test]
fn valid_fixtures_load() {
    let files = fixtures("valid");
    assert!(files.len() >= 5);
    for file in files {
        let c = Config::load(&file, &fixture_env)
            .unwrap_or_else(|e| panic!("{} should load: {e}", file.display()));
        let summary = tokenpool::cli::summary(&c);
        for t in &c.tokens {
            assert!(
                summary.contains(&t.name),
                "{}: summary lacks {}",
                file.display(),
                t.name
            );
            assert!(
                !summary.contains(t.secret.expose()),
                "{}: summary shows a secret",
                file.display()
            );
        }
    }
    let c = Config::load(
        &Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/config/valid/secret_sources.toml"),
        &fixture_env,
    )
    .unwrap();
    assert_eq!(c.tokens[0].secret.expose(), "rt-file-secret");
    assert_eq!(c.tokens[1].secret.expose(), "rt-bob-from-env");
    assert_eq!(c.tokens[1].tier, Tier::Shared);
    assert_eq!(c.server.api_keys.len(), 2);
    assert_eq!(c.read_files.len(), 1);
}

#[test]
fn invalid_fixtures_are_rejected_where_they_are_wrong() {
    let files = fixtures("invalid");
    assert!(files.len() >= 15);
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        let want = text
            .lines()
            .next()
            .and_then(|l| l.strip_prefix("# expect: "))
            .unwrap_or_else(|| panic!("{} has no `# expect:` line", file.display()));
        let err = Config::load(&file, &fixture_env)
            .map(|_| ())
            .expect_err(&format!("{} should be rejected", file.display()))
            .to_string();
        let prefix = format!("{}:", file.display());
        let rest = err
            .strip_prefix(&prefix)
            .unwrap_or_else(|| panic!("error does not start with the file name: {err}"));
        assert!(
            rest.trim_start().starts_with(want),
            "{}\n got: {rest}\nwant: {want}",
            file.display()
        );
    }
}

#[test]
fn the_example_config_passes_with_its_secrets_set() {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("config.example.toml");
    let env = |name: &str| {
        (name.starts_with("TOKENPOOL_") || name == "WARP_FIREBASE_API_KEY")
            .then(|| format!("value-of-{name}"))
            .or_else(|| {
                name.starts_with("WARP_TOKEN_")
                    .then(|| format!("rt-{name}"))
            })
    };
    let c = Config::load(&example, &env).unwrap();
    assert_eq!(c.tokens.len(), 3);
    assert_eq!(c.upstream.url.to_string(), "https://app.warp.dev/");
    assert!(c.state.path.is_some());
    assert_eq!(
        c.refresh.url.as_deref(),
        Some("https://app.warp.dev/proxy/token?key=value-of-WARP_FIREBASE_API_KEY")
    );
    assert_eq!(c.server.api_keys[0].name.as_ref(), "team-a");
    // Only the relative state path is worth a word.
    let warnings = c.warnings();
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(warnings[0].contains("[state] path"));
    // Without its env secrets it names the first one missing, with its place.
    let err = Config::load(&example, &|_| None).unwrap_err().to_string();
    assert!(
        err.contains("environment variable TOKENPOOL_API_KEY is not set"),
        "{err}"
    );
    assert!(err.contains("config.example.toml:"), "{err}");
}

#[test]
fn check_command_prints_summary_or_located_error() {
    let bin = env!("CARGO_BIN_EXE_tokenpool");
    let valid =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/config/valid/static_keys.toml");
    let out = Command::new(bin)
        .args(["check", "-c"])
        .arg(&valid)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("key-1") && stdout.contains("key-2"),
        "{stdout}"
    );
    assert!(!stdout.contains("sk-one"), "secret in summary: {stdout}");

    let invalid = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/config/invalid/duplicate_name.toml");
    let out = Command::new(bin)
        .args(["check", "-c"])
        .arg(&invalid)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("duplicate_name.toml:7:8: duplicate token name `a`"),
        "{stderr}"
    );
}

#[test]
fn check_warns_about_likely_mistakes_and_refuses_empty_files() {
    let bin = env!("CARGO_BIN_EXE_tokenpool");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tokenpool.toml");
    std::fs::write(
        &file,
        "[admin]\nlisten = \"0.0.0.0:9090\"\n\
         [refresh]\nurl = \"https://app.warp.dev/proxy/token?key=YOUR_FIREBASE_WEB_API_KEY\"\n\
         margin = \"2h\"\n",
    )
    .unwrap();
    let out = Command::new(bin)
        .args(["check", "-c"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(out.status.success(), "warnings do not fail check");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let warnings: Vec<&str> = stdout
        .lines()
        .filter(|l| l.starts_with("warning: "))
        .collect();
    assert_eq!(warnings.len(), 4, "{stdout}");
    assert!(warnings[0].contains("[admin] listen = 0.0.0.0:9090 is not a loopback address"));
    assert!(warnings[1].contains("[refresh] margin = 2h"));
    assert!(warnings[2].contains("placeholder YOUR_FIREBASE_WEB_API_KEY"));
    assert!(warnings[3].contains("[upstream] routes is not set"));
    assert!(stdout.contains("routes:    every method and path (no [upstream] routes)"));

    for empty in ["", "\n  \n"] {
        std::fs::write(&file, empty).unwrap();
        let out = Command::new(bin)
            .args(["check", "-c"])
            .arg(&file)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("tokenpool.toml: the file is empty"),
            "{stderr}"
        );
    }
}

#[test]
fn env_only_mode_takes_warp2api_variables() {
    let bin = env!("CARGO_BIN_EXE_tokenpool");
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(bin)
        .arg("check")
        .current_dir(dir.path())
        .env_remove("TOKENPOOL_CONFIG")
        .env("WARP_REFRESH_TOKEN", "rt-one")
        .env("WARP_SHARED_TOKENS", "rt-two,rt-three")
        .env("WARP_ANONYMOUS_TOKEN", "rt-anon")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("environment only"), "{stdout}");
    assert!(stdout.contains("tokens:    4"), "{stdout}");
    assert!(!stdout.contains("rt-"), "{stdout}");
}
