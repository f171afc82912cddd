//! Watching the files a configuration reads (`docs/operations.md`): the config
//! file's *folder* — not the file — so in-place writes, editors'
//! write-then-rename, delete and re-create, and Kubernetes ConfigMap/Secret
//! volumes (a `..data` symlink swapped to a new `..<timestamp>` folder) are
//! all seen. Folders of `{ file = … }` secrets and of `[upstream] ca_file`
//! are watched the same way.
//!
//! [`ConfigWatch::changed`] completes [`DEBOUNCE`] after the first event
//! that touches a file the config reads, however many events follow (an
//! editor writes in several steps, Kubernetes swaps links in several);
//! events about other files in those folders (the state file, a busy
//! neighbour) neither start nor delay it. What a reload does, and who asks
//! for one, is not this module's business.

use std::collections::HashSet;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use notify::{RecommendedWatcher, RecursiveMode, Watcher};
use tokio::sync::mpsc;

/// How long after the first relevant event the change is reported: long
/// enough for an editor's or Kubernetes' several steps to land.
pub const DEBOUNCE: Duration = Duration::from_millis(200);

/// The folders to watch and the file names in them that matter.
#[derive(Debug, Default, PartialEq, Eq)]
struct Targets {
    dirs: HashSet<PathBuf>,
    names: HashSet<OsString>,
}

fn targets(config_path: &Path, read_files: &[PathBuf]) -> Targets {
    let mut t = Targets::default();
    for file in std::iter::once(config_path).chain(read_files.iter().map(PathBuf::as_path)) {
        let dir = match file.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        t.dirs.insert(dir);
        if let Some(name) = file.file_name() {
            t.names.insert(name.to_os_string());
        }
    }
    t
}

/// Whether an event touches something a reload would read: a watched
/// file name, or a Kubernetes `..data`/`..<timestamp>` entry.
fn relevant(event: &notify::Event, names: &HashSet<OsString>) -> bool {
    if matches!(event.kind, notify::EventKind::Access(_)) {
        return false;
    }
    event.paths.iter().any(|p| {
        p.file_name()
            .is_some_and(|n| names.contains(n) || n.to_string_lossy().starts_with(".."))
    })
}

/// A watch on the files a configuration reads.
pub struct ConfigWatch {
    config_path: PathBuf,
    /// `None` when the platform's watcher could not be made: then nothing
    /// is ever reported (SIGHUP and `POST /admin/reload` still work).
    watcher: Option<RecommendedWatcher>,
    events: mpsc::UnboundedReceiver<notify::Result<notify::Event>>,
    current: Targets,
}

impl std::fmt::Debug for ConfigWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConfigWatch")
            .field("config_path", &self.config_path)
            .finish_non_exhaustive()
    }
}

impl ConfigWatch {
    /// Watches `config_path` and the files it reads.
    pub fn new(config_path: &Path, read_files: &[PathBuf]) -> ConfigWatch {
        let (tx, events) = mpsc::unbounded_channel();
        let watcher = notify::recommended_watcher(move |event| {
            let _ = tx.send(event);
        })
        .inspect_err(|e| {
            tracing::error!(error = %e, "cannot watch the config file; reload with SIGHUP or POST /admin/reload");
        })
        .ok();
        let mut watch = ConfigWatch {
            config_path: config_path.to_path_buf(),
            watcher,
            events,
            current: Targets::default(),
        };
        watch.retarget(read_files);
        watch
    }

    /// Follows what the configuration now reads: folders no longer needed
    /// are dropped, new ones watched.
    pub fn retarget(&mut self, read_files: &[PathBuf]) {
        let Some(watcher) = self.watcher.as_mut() else {
            return;
        };
        let wanted = targets(&self.config_path, read_files);
        for dir in self.current.dirs.difference(&wanted.dirs) {
            let _ = watcher.unwatch(dir);
        }
        for dir in wanted.dirs.difference(&self.current.dirs) {
            match watcher.watch(dir, RecursiveMode::NonRecursive) {
                Ok(()) => tracing::debug!(dir = %dir.display(), "watching"),
                Err(e) => tracing::warn!(dir = %dir.display(), error = %e, "cannot watch folder"),
            }
        }
        self.current = wanted;
    }

    /// Completes [`DEBOUNCE`] after the next event that touches a file the
    /// configuration reads (a watcher error counts as one: reload to be
    /// safe). Never completes without a watcher (its channel is closed).
    pub async fn changed(&mut self) {
        loop {
            let Some(event) = self.events.recv().await else {
                return std::future::pending().await;
            };
            if self.matters(&event) {
                break;
            }
        }
        // Gather the rest of the burst, without letting it extend the wait.
        let until = tokio::time::Instant::now() + DEBOUNCE;
        while let Ok(Some(_)) = tokio::time::timeout_at(until, self.events.recv()).await {}
    }

    fn matters(&self, event: &notify::Result<notify::Event>) -> bool {
        match event {
            Ok(e) => relevant(e, &self.current.names),
            Err(e) => {
                tracing::warn!(error = %e, "file watcher error; reloading to be safe");
                true
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_cover_config_and_secret_folders() {
        let t = targets(
            Path::new("/etc/tp/tokenpool.toml"),
            &[
                PathBuf::from("/etc/tp/secrets/alice"),
                PathBuf::from("/etc/tp/bob"),
            ],
        );
        assert_eq!(t.dirs.len(), 2);
        assert!(t.names.contains(&OsString::from("tokenpool.toml")));
        assert!(t.names.contains(&OsString::from("alice")));
    }

    #[test]
    fn kubernetes_and_named_files_are_relevant_others_not() {
        let names: HashSet<OsString> = [OsString::from("tokenpool.toml")].into();
        let ev = |p: &str| notify::Event::new(notify::EventKind::Any).add_path(PathBuf::from(p));
        assert!(relevant(&ev("/c/tokenpool.toml"), &names));
        assert!(relevant(&ev("/c/..data"), &names));
        assert!(relevant(&ev("/c/..2026_11_26_10_00_00.123"), &names));
        assert!(!relevant(&ev("/c/tokenpool-state.json"), &names));
        assert!(!relevant(&ev("/c/.tokenpool-state.json.tmp"), &names));
    }

    /// A watch fed by hand instead of by the platform's watcher.
    fn fed() -> (
        ConfigWatch,
        mpsc::UnboundedSender<notify::Result<notify::Event>>,
    ) {
        let (tx, events) = mpsc::unbounded_channel();
        let watch = ConfigWatch {
            config_path: PathBuf::from("/c/tokenpool.toml"),
            watcher: None,
            events,
            current: targets(Path::new("/c/tokenpool.toml"), &[]),
        };
        (watch, tx)
    }

    fn event(path: &str) -> notify::Result<notify::Event> {
        Ok(notify::Event::new(notify::EventKind::Any).add_path(PathBuf::from(path)))
    }

    #[tokio::test(start_paused = true)]
    async fn a_change_is_reported_one_debounce_after_it_however_busy_the_folder() {
        let (mut watch, tx) = fed();
        // A neighbour file written every 50 ms never starts a reload.
        let busy = tx.clone();
        let neighbour = tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(50)).await;
                if busy.send(event("/c/tokenpool-state.json")).is_err() {
                    return;
                }
            }
        });
        let quiet = tokio::time::timeout(Duration::from_secs(5), watch.changed()).await;
        assert!(quiet.is_err(), "events about other files are not changes");

        // The config written every 100 ms for 2 s: reported 200 ms after
        // the first write, not after the last.
        let start = tokio::time::Instant::now();
        let writer = tokio::spawn(async move {
            for _ in 0..20 {
                if tx.send(event("/c/tokenpool.toml")).is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        watch.changed().await;
        assert_eq!(start.elapsed(), DEBOUNCE);
        neighbour.abort();
        writer.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn without_a_watcher_nothing_is_ever_reported() {
        let (mut watch, tx) = fed();
        drop(tx);
        let never = tokio::time::timeout(Duration::from_secs(3600), watch.changed()).await;
        assert!(never.is_err());
    }
}
