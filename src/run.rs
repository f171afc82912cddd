//! Running an instance: the listeners, bound before anything else (so
//! tests bind port 0 and a bind error stops the start), and [`run`], which
//! starts every task and stops them in order.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use tokio::net::TcpListener;

use crate::config::{Bound, Config};
use crate::generation::Generations;
use crate::metrics::Task;
use crate::shutdown::Shutdown;

/// The listeners of a running instance, already bound.
#[derive(Debug)]
pub struct Listeners {
    /// The proxy listener.
    pub proxy: TcpListener,
    /// The admin listener.
    pub admin: TcpListener,
}

impl Listeners {
    /// Binds the addresses of `config`; an error names the listener and
    /// the address.
    pub async fn bind(config: &Config) -> anyhow::Result<Listeners> {
        let proxy = TcpListener::bind(config.server.listen)
            .await
            .with_context(|| {
                format!(
                    "cannot bind the proxy listener ([server] listen = {})",
                    config.server.listen
                )
            })?;
        let admin = TcpListener::bind(config.admin.listen)
            .await
            .with_context(|| {
                format!(
                    "cannot bind the admin listener ([admin] listen = {})",
                    config.admin.listen
                )
            })?;
        Ok(Listeners { proxy, admin })
    }

    /// The bound addresses `(proxy, admin)`.
    pub fn addrs(&self) -> std::io::Result<(SocketAddr, SocketAddr)> {
        Ok((self.proxy.local_addr()?, self.admin.local_addr()?))
    }
}

/// Runs an instance until `shutdown`: the proxy and admin listeners, the
/// background refresher, the state writer and the reloader. On a drain,
/// `/readyz` fails at once and the proxy keeps accepting for `[server]
/// drain_delay`; then it stops accepting, lets requests finish within the
/// grace period, and saves state. The admin listener serves to the end.
pub async fn run(generations: Arc<Generations>, listeners: Listeners, shutdown: Shutdown) {
    let unknown = SocketAddr::from(([0, 0, 0, 0], 0));
    let (proxy_addr, admin_addr) = listeners.addrs().unwrap_or((unknown, unknown));
    generations.set_bound(Bound {
        proxy: proxy_addr,
        admin: admin_addr,
    });
    let config = Arc::clone(&generations.current().config);
    tracing::info!(%proxy_addr, "proxy listening");
    tracing::info!(%admin_addr, "admin listening (/metrics, /healthz, /readyz, /poolz, /admin/*)");
    if !proxy_addr.ip().is_loopback() && config.server.api_keys.is_empty() {
        tracing::warn!(
            %proxy_addr,
            "ANYONE WHO CAN REACH {proxy_addr} CAN USE THE TOKEN POOL: no api_keys are set and allow_unauthenticated = true"
        );
    }

    let metrics = &generations.metrics;
    let cluster_sync = generations.cluster().map(|cluster| {
        let (current, cluster) = (Arc::clone(&generations), Arc::clone(cluster));
        supervise(Task::ClusterSync, metrics, move || {
            let current = Arc::clone(&current);
            cluster.spawn(move || Arc::clone(&current.current().pool))
        })
    });
    let current = Arc::clone(&generations);
    let refresh_loop = supervise(Task::Refresh, metrics, move || {
        let cluster = current.cluster().cloned();
        let current = Arc::clone(&current);
        crate::refresh::spawn_refresh_loop(
            move || {
                let g = current.current();
                (Arc::clone(&g.refresher), Arc::clone(&g.pool))
            },
            cluster,
        )
    });
    let current = Arc::clone(&generations);
    let quota_poller = supervise(Task::QuotaPoll, metrics, move || {
        let current = Arc::clone(&current);
        crate::quota::warp::spawn_poller(
            {
                let current = Arc::clone(&current);
                move || {
                    let g = current.current();
                    (Arc::clone(&g.config), Arc::clone(&g.pool))
                }
            },
            Arc::clone(&current.metrics),
        )
    });
    let saver = generations.state().map(|store| {
        let (current, store) = (Arc::clone(&generations), Arc::clone(store));
        supervise(Task::StateSaver, metrics, move || {
            let current = Arc::clone(&current);
            crate::state::spawn_saver(Arc::clone(&store), move || {
                Arc::clone(&current.current().pool)
            })
        })
    });
    // The reloader and the admin listener hold what cannot be made again
    // (the reload channel, the bound socket): if one ends while the
    // instance runs, the instance stops rather than run without it.
    let (reloads, reloader) =
        crate::reload::spawn_reloader(Arc::clone(&generations), shutdown.clone());
    let (admin_stop, admin_stopped) = crate::shutdown::shutdown_pair();
    let admin = tokio::spawn(crate::admin::serve(
        listeners.admin,
        Arc::clone(&generations),
        reloads,
        shutdown.clone(),
        admin_stopped,
    ));
    let essential = spawn_essential_watch(reloader, admin, shutdown.clone());
    let drain = spawn_drain(shutdown.clone(), config.server.drain_delay);
    crate::proxy::serve(
        listeners.proxy,
        Arc::clone(&generations),
        shutdown,
        config.server.shutdown_grace,
    )
    .await;

    refresh_loop.abort();
    quota_poller.abort();
    if let Some(saver) = saver {
        saver.abort();
    }
    if let Some(cluster) = generations.cluster() {
        // What changed in the last moments, for the other replicas.
        cluster
            .flush(
                &generations.current().pool,
                std::time::Duration::from_secs(1),
            )
            .await;
    }
    if let Some(sync) = cluster_sync {
        sync.abort();
    }
    drain.abort();
    admin_stop.trigger();
    essential.finish().await;
    generations.save_state().await;
    tracing::info!("stopped");
}

/// Ends a drain: once one starts, `/readyz` already fails (the admin
/// listener reads it from `shutdown`); after `delay` the listeners stop
/// accepting, unless a stop came sooner.
fn spawn_drain(mut shutdown: Shutdown, delay: std::time::Duration) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        shutdown.draining().await;
        tracing::info!(
            drain_delay = ?delay,
            "draining: /readyz answers 503; still accepting until the drain delay is over"
        );
        let mut stopped = shutdown.clone();
        tokio::select! {
            () = tokio::time::sleep(delay) => shutdown.stop(),
            () = stopped.wait() => {}
        }
    })
}

/// A background task run under watch: when it ends or panics while the
/// instance runs, that is said at ERROR, counted
/// (`tokenpool_task_restarts_total{task}`), and the task is started again
/// a second later. Never silence.
struct Supervised {
    watcher: tokio::task::JoinHandle<()>,
    current: Arc<std::sync::Mutex<Option<tokio::task::AbortHandle>>>,
}

impl Supervised {
    /// Stops the watch and the task.
    fn abort(&self) {
        self.watcher.abort();
        if let Some(task) = self
            .current
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            task.abort();
        }
    }
}

/// Starts `task` (`start` starts it, again each time it is needed) under
/// watch.
fn supervise<F>(task: Task, metrics: &Arc<crate::metrics::Metrics>, start: F) -> Supervised
where
    F: Fn() -> tokio::task::JoinHandle<()> + Send + 'static,
{
    let current = Arc::new(std::sync::Mutex::new(None));
    let slot = Arc::clone(&current);
    let metrics = Arc::clone(metrics);
    let watcher = tokio::spawn(async move {
        loop {
            let running = start();
            *slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(running.abort_handle());
            match running.await {
                Err(e) if e.is_cancelled() => return,
                // The panic's message is on stderr already (the panic
                // hook); it is not repeated here, where it could carry
                // what the code was handling.
                Err(_) => {
                    tracing::error!(
                        task = task.as_str(),
                        "a background task panicked; starting it again"
                    )
                }
                Ok(()) => tracing::error!(
                    task = task.as_str(),
                    "a background task ended by itself; starting it again"
                ),
            }
            metrics.task_restarted(task);
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        }
    });
    Supervised { watcher, current }
}

/// The reloader and the admin listener, watched: one that ends or panics
/// while the instance runs stops the instance (at ERROR).
struct Essential {
    watcher: tokio::task::JoinHandle<()>,
    reloader: tokio::task::AbortHandle,
    admin: Arc<tokio::sync::Mutex<Option<tokio::task::JoinHandle<()>>>>,
}

impl Essential {
    /// At shutdown: the reloader is stopped; the admin listener, already
    /// told to stop, is waited for.
    async fn finish(self) {
        self.watcher.abort();
        self.reloader.abort();
        if let Some(admin) = self.admin.lock().await.take() {
            let _ = admin.await;
        }
    }
}

fn spawn_essential_watch(
    reloader: tokio::task::JoinHandle<()>,
    admin: tokio::task::JoinHandle<()>,
    shutdown: Shutdown,
) -> Essential {
    let reloader_abort = reloader.abort_handle();
    let admin = Arc::new(tokio::sync::Mutex::new(Some(admin)));
    let watched = Arc::clone(&admin);
    let watcher = tokio::spawn(async move {
        let mut stopping = shutdown.clone();
        let mut reloader = reloader;
        let mut admin_guard = watched.lock().await;
        let Some(admin) = admin_guard.as_mut() else {
            return;
        };
        let which = tokio::select! {
            ended = &mut reloader => ("reloader", ended),
            ended = admin => ("admin listener", ended),
            () = stopping.wait() => return,
        };
        if which.0 == "admin listener" {
            admin_guard.take();
        }
        drop(admin_guard);
        if !shutdown.is_draining() {
            let how = if which.1.is_err() {
                "panicked"
            } else {
                "ended"
            };
            tracing::error!(
                task = which.0,
                "the {} {how} while the instance ran; stopping the instance (a restart brings it back)",
                which.0
            );
            shutdown.stop();
        }
    });
    Essential {
        watcher,
        reloader: reloader_abort,
        admin,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[tokio::test(start_paused = true)]
    async fn a_task_that_panics_or_ends_is_said_counted_and_started_again() {
        let metrics = Arc::new(crate::metrics::Metrics::new());
        let starts = Arc::new(AtomicU32::new(0));
        let counted = Arc::clone(&starts);
        let task = supervise(Task::Refresh, &metrics, move || {
            let n = counted.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                match n {
                    0 => panic!("the first run panics"),
                    1 => {}
                    _ => std::future::pending().await,
                }
            })
        });
        tokio::time::sleep(std::time::Duration::from_secs(5)).await;
        assert_eq!(
            starts.load(Ordering::SeqCst),
            3,
            "started again after a panic and an end"
        );
        let text = String::from_utf8(
            metrics.render(&crate::pool::Pool::new(
                &crate::config::Config::parse("", None, &|_| None)
                    .unwrap()
                    .pool,
                &[],
                true,
                None,
            )),
        )
        .unwrap();
        assert!(
            text.contains("tokenpool_task_restarts_total{task=\"refresh\"} 2"),
            "{text}"
        );
        task.abort();
        tokio::time::sleep(std::time::Duration::from_secs(5)).await;
        assert_eq!(starts.load(Ordering::SeqCst), 3, "not after the abort");
    }
}
