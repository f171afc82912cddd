//! Running an instance: the listeners, bound before anything else (so
//! tests bind port 0 and a bind error stops the start), and [`run`], which
//! starts every task and stops them in order.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use tokio::net::TcpListener;

use crate::config::{Bound, Config};
use crate::generation::Generations;
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

    let cluster_sync = generations.cluster().map(|cluster| {
        let current = Arc::clone(&generations);
        cluster.spawn(move || Arc::clone(&current.current().pool))
    });
    let current = Arc::clone(&generations);
    let refresh_loop = crate::refresh::spawn_refresh_loop(
        move || {
            let g = current.current();
            (Arc::clone(&g.refresher), Arc::clone(&g.pool))
        },
        generations.cluster().cloned(),
    );
    let current = Arc::clone(&generations);
    let quota_poller = crate::quota::warp::spawn_poller(
        move || {
            let g = current.current();
            (Arc::clone(&g.config), Arc::clone(&g.pool))
        },
        Arc::clone(&generations.metrics),
    );
    let saver = generations.state().map(|store| {
        let current = Arc::clone(&generations);
        crate::state::spawn_saver(Arc::clone(store), move || {
            Arc::clone(&current.current().pool)
        })
    });
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
    reloader.abort();
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
    let _ = admin.await;
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
