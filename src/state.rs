//! The state file (`docs/operations.md`): what must survive a restart — rotated
//! refresh tokens above all, and each token's state, reason, cooldown end
//! and backoff levels.
//!
//! Written to a temporary file, fsynced, renamed over the old one (mode
//! 0600: it holds refresh tokens). Read back at start; a corrupt file is
//! moved aside with a warning and never stops the proxy.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::config::Secret;
use crate::pool::{Pool, Reason, Restored, TokenState};

/// How often changed token state is written to the state file.
const SAVE_INTERVAL: Duration = Duration::from_secs(5);

/// Starts the state writer: every `SAVE_INTERVAL` (5 s) it writes the state of
/// the pool `current` gives, if a token's persisted state changed since.
pub fn spawn_saver<F>(store: Arc<StateStore>, current: F) -> tokio::task::JoinHandle<()>
where
    F: Fn() -> Arc<Pool> + Send + 'static,
{
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(SAVE_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let pool = current();
            // `take_dirty` on every token, not just until the first.
            let dirty = pool
                .tokens()
                .iter()
                .fold(false, |any, t| t.take_dirty() | any);
            if dirty {
                let store = Arc::clone(&store);
                match tokio::task::spawn_blocking(move || store.save(&pool)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => tracing::error!(error = %e, "cannot save token state"),
                    Err(e) => tracing::error!(error = %e, "state writer failed"),
                }
            }
        }
    })
}

/// The file's contents.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StateFile {
    /// Format version, for future migrations.
    version: u32,
    /// Per token name.
    tokens: BTreeMap<String, TokenRecord>,
}

/// What is kept of one token.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenRecord {
    /// SHA-256 of the configured secret this record belongs to: when the
    /// operator changes the secret, the record no longer applies.
    configured_fingerprint: String,
    /// A rotated refresh token replacing the configured one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    refresh_token: Option<String>,
    /// How many rotations since the configured one (cluster mode keeps the
    /// refresh token with the most).
    #[serde(default, skip_serializing_if = "is_zero")]
    rotation: u64,
    state: TokenState,
    #[serde(default)]
    reason: Option<Reason>,
    /// Unix seconds when the cooldown or recovery wait ends.
    #[serde(default)]
    until: Option<u64>,
    #[serde(default)]
    backoff_level: u32,
    #[serde(default)]
    quota_level: u32,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// Reads and writes the state file. Writes are serialised.
#[derive(Debug)]
pub struct StateStore {
    path: PathBuf,
    write_lock: Mutex<()>,
}

/// What went wrong writing the state file.
#[derive(Debug, thiserror::Error)]
#[error("cannot write the state file {path} ([state] path): {source}")]
pub struct StateError {
    path: String,
    #[source]
    source: std::io::Error,
}

impl StateStore {
    /// A store for the file at `path` (nothing is read yet).
    pub fn new(path: impl Into<PathBuf>) -> StateStore {
        StateStore {
            path: path.into(),
            write_lock: Mutex::new(()),
        }
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Fails unless the file's folder takes a new file: a read-only mount
    /// (a Kubernetes ConfigMap, say) would lose every rotated refresh token
    /// at the first write, so it is refused at start instead.
    pub fn check_writable(&self) -> Result<(), StateError> {
        let probe = self
            .folder()
            .join(format!(".tokenpool-probe-{}", std::process::id()));
        let result = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&probe)
            .map(drop);
        let _ = std::fs::remove_file(&probe);
        result.map_err(|source| StateError {
            path: self.path.display().to_string(),
            source,
        })
    }

    fn folder(&self) -> PathBuf {
        match self.path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        }
    }

    /// Reads the file and restores every token of `pool` whose configured
    /// secret is unchanged. Returns how many tokens were restored.
    pub fn restore(&self, pool: &Pool) -> usize {
        self.restore_tokens(pool).len()
    }

    /// [`StateStore::restore`], returning the names of the tokens restored:
    /// those whose history the file holds.
    pub fn restore_tokens(&self, pool: &Pool) -> Vec<String> {
        let file = match self.read() {
            Some(file) => file,
            None => return Vec::new(),
        };
        let mut restored = Vec::new();
        for token in pool.tokens() {
            let Some(record) = file.tokens.get(token.name()) else {
                continue;
            };
            if record.configured_fingerprint != token.credentials().configured().fingerprint() {
                // The operator changed the secret: the operator wins.
                continue;
            }
            token.restore(Restored {
                refresh_token: record.refresh_token.as_deref().map(Secret::new),
                rotation: record.rotation,
                state: Some(record.state),
                reason: record.reason,
                // A number past what a clock holds is no time at all.
                until: record
                    .until
                    .and_then(|s| UNIX_EPOCH.checked_add(Duration::from_secs(s))),
                backoff_level: record.backoff_level,
                quota_level: record.quota_level,
            });
            restored.push(token.name().to_string());
        }
        restored
    }

    fn read(&self) -> Option<StateFile> {
        let bytes = match std::fs::read(&self.path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
            Err(e) => {
                tracing::warn!(path = %self.path.display(), error = %e, "cannot read state file; starting without it");
                return None;
            }
        };
        match serde_json::from_slice::<StateFile>(&bytes) {
            Ok(file) => Some(file),
            Err(e) => {
                let stamp = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs());
                let aside = self.path.with_extension(format!("corrupt-{stamp}"));
                match std::fs::rename(&self.path, &aside) {
                    Ok(()) => tracing::warn!(
                        path = %self.path.display(),
                        moved_to = %aside.display(),
                        error = %e,
                        "state file is corrupt; moved aside, starting without it"
                    ),
                    Err(re) => tracing::warn!(
                        path = %self.path.display(),
                        error = %e,
                        rename_error = %re,
                        "state file is corrupt and could not be moved aside; starting without it"
                    ),
                }
                None
            }
        }
    }

    /// Writes the state of every token of `pool` (blocking I/O: call from
    /// `spawn_blocking` on the async side).
    pub fn save(&self, pool: &Pool) -> Result<(), StateError> {
        let mut file = StateFile {
            version: 1,
            tokens: BTreeMap::new(),
        };
        for token in pool.tokens() {
            let s = token.snapshot();
            file.tokens.insert(
                token.name().to_string(),
                TokenRecord {
                    configured_fingerprint: token.credentials().configured().fingerprint(),
                    refresh_token: token
                        .credentials()
                        .rotated_refresh_token()
                        .map(|s| s.expose().to_string()),
                    rotation: token.credentials().rotation(),
                    state: s.state,
                    reason: s.reason,
                    until: s.cooldown_until.map(|u| {
                        u.duration_since(UNIX_EPOCH)
                            .map_or(0, |d| d.as_secs() + u64::from(d.subsec_nanos() > 0))
                    }),
                    backoff_level: s.backoff_level,
                    quota_level: s.quota_level,
                },
            );
        }
        let json = serde_json::to_vec_pretty(&file).expect("state serialises");
        let _guard = self.write_lock.lock().unwrap_or_else(|e| e.into_inner());
        self.write_atomically(&json).map_err(|source| StateError {
            path: self.path.display().to_string(),
            source,
        })
    }

    fn write_atomically(&self, bytes: &[u8]) -> std::io::Result<()> {
        let dir = self.folder();
        let name = self
            .path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "tokenpool-state.json".into());
        let tmp = dir.join(format!(".{name}.tmp"));
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create(true).truncate(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        let mut f = options.open(&tmp)?;
        #[cfg(unix)]
        {
            // `mode` applies only at creation; a leftover temp file keeps
            // whatever it had.
            use std::os::unix::fs::PermissionsExt;
            f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
        }
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, &self.path)?;
        // Make the rename itself durable.
        if let Ok(d) = std::fs::File::open(&dir) {
            let _ = d.sync_all();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, Tier};
    use crate::pool::Outcome;

    fn pool(text: &str) -> Pool {
        let c = Config::parse(text, None, &|_| None).unwrap();
        Pool::new(&c.pool, &c.tokens, true, None)
    }

    const TWO: &str = "[[tokens]]\nname = \"a\"\ntier = \"personal\"\ntoken = \"rt-a\"\n\
                       [[tokens]]\nname = \"b\"\ntier = \"shared\"\ntoken = \"rt-b\"\n";

    #[test]
    fn rotation_and_state_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::new(dir.path().join("state.json"));
        let p = pool(TWO);
        p.get("a")
            .unwrap()
            .credentials()
            .rotate(Secret::new("rt-a-rotated"));
        p.get("b").unwrap().report(Outcome::Revoked, p.settings());
        store.save(&p).unwrap();

        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(store.path())
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }

        let p2 = pool(TWO);
        assert_eq!(store.restore(&p2), 2);
        assert_eq!(
            p2.get("a").unwrap().credentials().refresh_token().expose(),
            "rt-a-rotated"
        );
        assert_eq!(p2.get("b").unwrap().snapshot().state, TokenState::Revoked);
        assert_eq!(p2.get("b").unwrap().tier(), Tier::Shared);
    }

    #[test]
    fn absurd_times_in_the_state_file_never_stop_the_start_nor_rest_for_years() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::new(dir.path().join("state.json"));
        let p = pool(TWO);
        let fp = p.get("a").unwrap().credentials().configured().fingerprint();
        for until in ["18446744073709551615", "253402300799", "1e300"] {
            std::fs::write(
                store.path(),
                format!(
                    r#"{{"version":1,"tokens":{{"a":{{"configured_fingerprint":"{fp}","state":"cooling_down","reason":"rate_limited","until":{until},"backoff_level":4294967295,"quota_level":0}}}}}}"#
                ),
            )
            .unwrap();
            let p = pool(TWO);
            store.restore(&p);
            let s = p.get("a").unwrap().snapshot();
            if let Some(back) = s.cooldown_until {
                let rest = back.duration_since(SystemTime::now()).unwrap_or_default();
                assert!(
                    rest <= Duration::from_secs(32 * 24 * 3600),
                    "{until}: {rest:?}"
                );
            }
        }
    }

    #[test]
    fn a_changed_secret_wins_over_the_state_file() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::new(dir.path().join("state.json"));
        let p = pool(TWO);
        p.get("a")
            .unwrap()
            .credentials()
            .rotate(Secret::new("rt-a-rotated"));
        store.save(&p).unwrap();
        let p2 = pool(&TWO.replace("rt-a\"", "rt-a-new\""));
        store.restore(&p2);
        assert_eq!(
            p2.get("a").unwrap().credentials().refresh_token().expose(),
            "rt-a-new"
        );
    }

    #[test]
    fn a_folder_that_takes_no_file_is_found_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::new(dir.path().join("state.json"));
        store.check_writable().unwrap();
        let store = StateStore::new(dir.path().join("missing/state.json"));
        let err = store.check_writable().unwrap_err().to_string();
        assert!(err.contains("missing/state.json ([state] path)"), "{err}");
    }

    #[test]
    fn a_corrupt_file_is_moved_aside() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        std::fs::write(&path, b"{ not json").unwrap();
        let store = StateStore::new(&path);
        assert_eq!(store.restore(&pool(TWO)), 0);
        assert!(!path.exists());
        let moved: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().contains("corrupt-"))
            .collect();
        assert_eq!(moved.len(), 1);
        assert_eq!(std::fs::read(moved[0].path()).unwrap(), b"{ not json");
    }
}
