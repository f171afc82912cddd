//! Stopping a running instance: one trigger, any number of waiters, and
//! the process signals that pull it.
//!
//! A stop has two steps. *Draining*: readiness fails (`/readyz` 503) while
//! the listeners still accept, so that load balancers stop sending new
//! connections first. *Stopping*: the listeners stop accepting and the
//! requests in flight get the grace period. SIGTERM starts a drain; `run`
//! moves on to stopping after `[server] drain_delay`; a second signal, or
//! [`ShutdownTrigger::trigger`], stops at once.

use std::sync::Arc;

use tokio::sync::watch;

/// Where a running instance is in its stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Phase {
    /// Serving as usual.
    Serving,
    /// Readiness fails; the listeners still accept.
    Draining,
    /// The listeners stop accepting; requests in flight finish.
    Stopping,
}

/// Tells every part of a running instance to stop.
#[derive(Debug)]
pub struct ShutdownTrigger(Arc<watch::Sender<Phase>>);

/// Waits for the stop signal; clones wait for the same one.
#[derive(Debug, Clone)]
pub struct Shutdown {
    phase: watch::Receiver<Phase>,
    /// So that the drain, once over, can move on to stopping.
    sender: Arc<watch::Sender<Phase>>,
}

/// A linked trigger and signal.
pub fn shutdown_pair() -> (ShutdownTrigger, Shutdown) {
    let (tx, rx) = watch::channel(Phase::Serving);
    let sender = Arc::new(tx);
    (
        ShutdownTrigger(Arc::clone(&sender)),
        Shutdown { phase: rx, sender },
    )
}

/// Moves `sender` to `to` unless it is there or further already.
fn advance(sender: &watch::Sender<Phase>, to: Phase) {
    sender.send_if_modified(|phase| {
        let moved = *phase < to;
        if moved {
            *phase = to;
        }
        moved
    });
}

impl ShutdownTrigger {
    /// Stops now: the listeners stop accepting (skipping whatever is left
    /// of a drain) and requests in flight get the grace period.
    pub fn trigger(&self) {
        advance(&self.0, Phase::Stopping);
    }

    /// Starts a drain: readiness fails at once, the listeners keep
    /// accepting for `[server] drain_delay`, then the instance stops.
    pub fn drain(&self) {
        advance(&self.0, Phase::Draining);
    }
}

impl Shutdown {
    /// Completes once the listeners are to stop accepting (or the trigger
    /// is gone).
    pub async fn wait(&mut self) {
        let _ = self.phase.wait_for(|p| *p >= Phase::Stopping).await;
    }

    /// Completes once a drain or a stop was asked for.
    pub async fn draining(&mut self) {
        let _ = self.phase.wait_for(|p| *p >= Phase::Draining).await;
    }

    /// Whether a drain or a stop was asked for: readiness fails.
    pub fn is_draining(&self) -> bool {
        *self.phase.borrow() >= Phase::Draining
    }

    /// Ends the drain: the listeners stop accepting.
    pub(crate) fn stop(&self) {
        advance(&self.sender, Phase::Stopping);
    }
}

/// Completes on SIGINT or SIGTERM.
async fn termination() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
}

/// Pulls `trigger` on the process's signals: the first SIGTERM or SIGINT
/// starts a drain, a second one stops at once (an operator at a terminal
/// who presses Ctrl-C twice does not wait for the drain).
pub fn spawn_signal_handler(trigger: ShutdownTrigger) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        termination().await;
        tracing::info!("shutdown signal received: draining (a second signal stops at once)");
        trigger.drain();
        termination().await;
        tracing::info!("second shutdown signal received: stopping now");
        trigger.trigger();
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_drain_comes_before_the_stop_and_never_undoes_it() {
        let (trigger, mut shutdown) = shutdown_pair();
        assert!(!shutdown.is_draining());
        trigger.drain();
        shutdown.draining().await;
        assert!(shutdown.is_draining());
        // Still accepting: the stop has not come.
        assert!(
            tokio::time::timeout(std::time::Duration::ZERO, shutdown.wait())
                .await
                .is_err()
        );
        shutdown.stop();
        shutdown.wait().await;
        // A late drain does not move a stop back.
        trigger.drain();
        shutdown.wait().await;
        assert!(shutdown.is_draining());
    }

    #[tokio::test]
    async fn a_stop_is_also_a_drain() {
        let (trigger, mut shutdown) = shutdown_pair();
        trigger.trigger();
        shutdown.draining().await;
        shutdown.wait().await;
    }
}
