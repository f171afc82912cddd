//! Live reload (DESIGN §5.5): watches the config file's *folder* — not the
//! file — so in-place writes, editors' write-then-rename, delete and
//! re-create, and Kubernetes ConfigMap/Secret volumes (a `..data` symlink
//! swapped to a new `..<timestamp>` folder) are all seen. Folders of
//! `{ file = … }` secrets and of `[upstream] ca_file` are watched the
//! same way. A burst of events
//! becomes one reload.
//!
//! What a reload does is [`crate::app::App::reload`]; this module only
//! decides when.

use std::collections::HashSet;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;

use crate::app::{App, Shutdown};

/// Quiet time after the last file event before reloading: editors and
/// Kubernetes write in several steps, and one reload should see them all.
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

/// Starts watching the config file of `app` (none in env-only mode).
pub fn spawn_watcher(app: Arc<App>, mut shutdown: Shutdown) -> Option<tokio::task::JoinHandle<()>> {
    let config_path = app.config_path()?.to_path_buf();
    let (tx, mut rx) = mpsc::unbounded_channel::<notify::Result<notify::Event>>();
    let mut watcher = match notify::recommended_watcher(move |event| {
        let _ = tx.send(event);
    }) {
        Ok(w) => w,
        Err(e) => {
            tracing::error!(error = %e, "cannot watch the config file; reload with SIGHUP or POST /admin/reload");
            return None;
        }
    };
    let mut current = Targets::default();
    let mut update = move |watcher: &mut notify::RecommendedWatcher, read_files: &[PathBuf]| {
        let wanted = targets(&config_path, read_files);
        for dir in current.dirs.difference(&wanted.dirs) {
            let _ = watcher.unwatch(dir);
        }
        for dir in wanted.dirs.difference(&current.dirs) {
            match watcher.watch(dir, RecursiveMode::NonRecursive) {
                Ok(()) => tracing::debug!(dir = %dir.display(), "watching"),
                Err(e) => tracing::warn!(dir = %dir.display(), error = %e, "cannot watch folder"),
            }
        }
        current = wanted;
        current.names.clone()
    };
    let mut names = update(&mut watcher, &app.current().config.read_files);
    Some(tokio::spawn(async move {
        loop {
            let first = tokio::select! {
                event = rx.recv() => event,
                _ = shutdown.wait() => return,
            };
            let Some(first) = first else { return };
            let mut wanted = matches!(&first, Ok(e) if relevant(e, &names));
            if let Err(e) = &first {
                tracing::warn!(error = %e, "file watcher error; reloading to be safe");
                wanted = true;
            }
            // Debounce: gather the rest of the burst.
            loop {
                match tokio::time::timeout(DEBOUNCE, rx.recv()).await {
                    Ok(Some(event)) => wanted |= event.map_or(true, |e| relevant(&e, &names)),
                    Ok(None) => return,
                    Err(_) => break,
                }
            }
            if !wanted {
                continue;
            }
            tracing::info!("config change seen; reloading");
            let reloading = Arc::clone(&app);
            if let Ok(Ok(_)) = tokio::task::spawn_blocking(move || reloading.reload()).await {
                names = update(&mut watcher, &app.current().config.read_files);
            }
        }
    }))
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
}
