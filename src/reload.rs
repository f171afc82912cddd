//! Who asks for a reload, and the one task that does it.
//!
//! A changed config or secret file ([`crate::config::watch`]), SIGHUP and
//! `POST /admin/reload` are three sources of one event: "reload". Each
//! reaches the reloader task, which reloads (one at a time, in arrival
//! order), answers the admin call with the result, and after every reload,
//! whoever asked for it, points the file watch at what the running
//! configuration now reads.

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use crate::config::watch::ConfigWatch;
use crate::config::ConfigError;
use crate::generation::{Generations, ReloadSummary};
use crate::shutdown::Shutdown;

/// Why a reload asked for by an operator did not happen.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The configuration was refused; the running one stays.
    #[error(transparent)]
    Rejected(#[from] ConfigError),
    /// The reloader is gone (the instance is stopping) or its reload task
    /// failed.
    #[error("the reloader is not running")]
    Unavailable,
}

type Answer = oneshot::Sender<Result<ReloadSummary, ConfigError>>;

/// Asks the reloader for a reload; clones ask the same one.
#[derive(Debug, Clone)]
pub struct Reloads {
    requests: mpsc::UnboundedSender<Answer>,
}

impl Reloads {
    /// Reloads now and waits for the result.
    pub async fn reload(&self) -> Result<ReloadSummary, ReloadError> {
        let (tx, rx) = oneshot::channel();
        self.requests
            .send(tx)
            .map_err(|_| ReloadError::Unavailable)?;
        Ok(rx.await.map_err(|_| ReloadError::Unavailable)??)
    }
}

/// Starts the reloader for `generations`: it follows the config file (in
/// file mode), SIGHUP and [`Reloads`] until `shutdown`.
pub fn spawn_reloader(
    generations: Arc<Generations>,
    mut shutdown: Shutdown,
) -> (Reloads, tokio::task::JoinHandle<()>) {
    let (requests, mut asked) = mpsc::unbounded_channel::<Answer>();
    let task = tokio::spawn(async move {
        let mut watch = generations
            .config_path()
            .map(|path| ConfigWatch::new(path, &generations.current().config.read_files));
        let mut hangups = hangups();
        loop {
            let answer = tokio::select! {
                _ = shutdown.wait() => return,
                () = changed(&mut watch) => {
                    tracing::info!("config change seen; reloading");
                    None
                }
                Some(()) = next_hangup(&mut hangups) => {
                    tracing::info!("SIGHUP: reloading configuration");
                    None
                }
                Some(answer) = asked.recv() => Some(answer),
            };
            let reloading = Arc::clone(&generations);
            let result = tokio::task::spawn_blocking(move || reloading.reload()).await;
            if let Some(watch) = watch.as_mut() {
                watch.retarget(&generations.current().config.read_files);
            }
            match (result, answer) {
                (Ok(result), Some(answer)) => {
                    let _ = answer.send(result);
                }
                (Ok(_), None) => {}
                (Err(e), _) => tracing::error!(error = %e, "the reload task failed"),
            }
        }
    });
    (Reloads { requests }, task)
}

async fn changed(watch: &mut Option<ConfigWatch>) {
    match watch {
        Some(watch) => watch.changed().await,
        None => std::future::pending().await,
    }
}

#[cfg(unix)]
type Hangups = Option<tokio::signal::unix::Signal>;
#[cfg(not(unix))]
type Hangups = ();

#[cfg(unix)]
fn hangups() -> Hangups {
    use tokio::signal::unix::{signal, SignalKind};
    signal(SignalKind::hangup())
        .inspect_err(|e| {
            tracing::warn!(error = %e, "cannot listen for SIGHUP; reload by file change or POST /admin/reload");
        })
        .ok()
}

#[cfg(not(unix))]
fn hangups() -> Hangups {}

#[cfg(unix)]
async fn next_hangup(hangups: &mut Hangups) -> Option<()> {
    match hangups {
        Some(signal) => signal.recv().await,
        None => std::future::pending().await,
    }
}

#[cfg(not(unix))]
async fn next_hangup(_: &mut Hangups) -> Option<()> {
    std::future::pending().await
}
