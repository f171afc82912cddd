//! Stopping a running instance: one trigger, any number of waiters.

use tokio::sync::watch;

/// Tells every part of a running instance to stop.
#[derive(Debug)]
pub struct ShutdownTrigger(watch::Sender<bool>);

/// Waits for the stop signal; clones wait for the same one.
#[derive(Debug, Clone)]
pub struct Shutdown(watch::Receiver<bool>);

/// A linked trigger and signal.
pub fn shutdown_pair() -> (ShutdownTrigger, Shutdown) {
    let (tx, rx) = watch::channel(false);
    (ShutdownTrigger(tx), Shutdown(rx))
}

impl ShutdownTrigger {
    /// Signals every waiter.
    pub fn trigger(&self) {
        let _ = self.0.send(true);
    }
}

impl Shutdown {
    /// Completes once shutdown was signalled (or the trigger is gone).
    pub async fn wait(&mut self) {
        let _ = self.0.wait_for(|stop| *stop).await;
    }
}
