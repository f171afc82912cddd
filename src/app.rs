//! One running instance: the current [`Generation`] behind an atomic swap,
//! how a new configuration becomes the next generation, and what starts
//! and stops the listeners and background tasks.
//!
//! A request loads the current generation once and finishes on it, so a
//! reload never changes anything under a request in flight.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use subtle::ConstantTimeEq;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::config::{check_reload, Bound, Config, ConfigError, Provider, Secret};
use crate::metrics::Metrics;
use crate::pool::Pool;
use crate::proxy::upstream::Upstream;
use crate::refresh::Refresher;
use crate::state::StateStore;

/// How often changed token state is written to the state file.
const STATE_SAVE_INTERVAL: Duration = Duration::from_secs(5);

/// One loaded configuration and everything built from it.
pub struct Generation {
    /// Increases by one with every successful load.
    pub id: u64,
    /// When it was loaded.
    pub loaded_at: SystemTime,
    /// Its configuration.
    pub config: Arc<Config>,
    /// Its tokens.
    pub pool: Arc<Pool>,
    /// Its refresh settings.
    pub refresher: Arc<Refresher>,
    /// Its upstream.
    pub upstream: Arc<Upstream>,
}

impl std::fmt::Debug for Generation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Generation")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

/// Checks a presented key against a list in constant time per key.
pub fn key_matches(keys: &[Secret], presented: &[u8]) -> bool {
    let mut ok = subtle::Choice::from(0);
    for key in keys {
        ok |= key.expose().as_bytes().ct_eq(presented);
    }
    ok.into()
}

/// What a reload did, for logs and `POST /admin/reload`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ReloadSummary {
    /// The new generation's id.
    pub generation: u64,
    /// Tokens carried over with their state.
    pub kept: usize,
    /// Tokens new in this generation (or whose secret changed).
    pub added: usize,
    /// Tokens gone.
    pub removed: usize,
    /// Settings that changed but need a restart.
    pub needs_restart: Vec<String>,
}

/// Reads an environment variable (injectable for tests).
pub type Env = Arc<dyn Fn(&str) -> Option<String> + Send + Sync>;

/// A running instance's shared state.
pub struct App {
    current: ArcSwap<Generation>,
    /// Every metric.
    pub metrics: Arc<Metrics>,
    state: Option<Arc<StateStore>>,
    /// The config file reloads read; `None` in env-only mode.
    config_path: Option<PathBuf>,
    env: Env,
    /// Serialises reloads (file watcher, SIGHUP, admin).
    reload_lock: Mutex<()>,
    next_id: AtomicU64,
    /// Where the listeners are bound, once [`run`] has them: reloads are
    /// checked against these, not against the new file's addresses.
    bound: std::sync::OnceLock<Bound>,
}

impl std::fmt::Debug for App {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("App").finish_non_exhaustive()
    }
}

impl App {
    /// Builds the first generation from `config`, restoring the state file.
    pub fn new(config: Config, env: Env) -> anyhow::Result<Arc<App>> {
        let metrics = Arc::new(Metrics::new());
        let state = config
            .state
            .path
            .as_ref()
            .map(|p| Arc::new(StateStore::new(p)));
        let pool = Arc::new(Pool::new(
            &config.pool,
            &config.tokens,
            config.refresh.provider != Provider::Static,
            None,
        ));
        if let Some(store) = &state {
            let n = store.restore(&pool);
            if n > 0 {
                tracing::info!(tokens = n, path = %store.path().display(), "restored token state");
            }
        }
        let refresher = Arc::new(Refresher::new(
            &config.refresh,
            Arc::clone(&metrics),
            state.clone(),
        )?);
        refresher.prime(&pool);
        let generation = Generation {
            id: 1,
            loaded_at: SystemTime::now(),
            upstream: Arc::new(
                Upstream::new(&config.upstream, None)
                    .map_err(|e| anyhow::anyhow!("cannot build the upstream client: {e}"))?,
            ),
            config: Arc::new(config),
            pool,
            refresher,
        };
        metrics.reload_result(true);
        Ok(Arc::new(App {
            config_path: generation.config.path.clone(),
            current: ArcSwap::from_pointee(generation),
            metrics,
            state,
            env,
            reload_lock: Mutex::new(()),
            next_id: AtomicU64::new(2),
            bound: std::sync::OnceLock::new(),
        }))
    }

    /// The current generation.
    pub fn current(&self) -> Arc<Generation> {
        self.current.load_full()
    }

    /// The config file, if any.
    pub fn config_path(&self) -> Option<&std::path::Path> {
        self.config_path.as_deref()
    }

    /// Reads the config again and, if it is valid, makes it the next
    /// generation. An invalid config changes nothing.
    pub fn reload(&self) -> Result<ReloadSummary, ConfigError> {
        let _serial = self.reload_lock.lock().unwrap_or_else(|e| e.into_inner());
        let env = |name: &str| (self.env)(name);
        let loaded = match &self.config_path {
            Some(path) => Config::load(path, &env),
            None => Config::from_env(&env),
        };
        match loaded {
            Ok(config) => self
                .apply_locked(config)
                .inspect_err(|_| self.metrics.reload_result(false)),
            Err(e) => {
                self.metrics.reload_result(false);
                tracing::error!(
                    error = %e,
                    generation = self.current().id,
                    "config reload failed; the running configuration stays"
                );
                Err(e)
            }
        }
    }

    /// Makes `config` the next generation.
    pub fn apply(&self, config: Config) -> Result<ReloadSummary, ConfigError> {
        let _serial = self.reload_lock.lock().unwrap_or_else(|e| e.into_inner());
        self.apply_locked(config)
    }

    fn apply_locked(&self, mut config: Config) -> Result<ReloadSummary, ConfigError> {
        let old = self.current();
        let mut needs_restart = Vec::new();
        if config.server.listen != old.config.server.listen {
            needs_restart.push(format!(
                "[server] listen {} -> {}",
                old.config.server.listen, config.server.listen
            ));
            config.server.listen = old.config.server.listen;
        }
        if config.admin.listen != old.config.admin.listen {
            needs_restart.push(format!(
                "[admin] listen {} -> {}",
                old.config.admin.listen, config.admin.listen
            ));
            config.admin.listen = old.config.admin.listen;
        }
        if config.server.header_read_timeout != old.config.server.header_read_timeout {
            needs_restart.push("[server] header_read_timeout".to_string());
            config.server.header_read_timeout = old.config.server.header_read_timeout;
        }
        if config.state.path != old.config.state.path {
            needs_restart.push("[state] path".to_string());
            config.state.path = old.config.state.path.clone();
        }
        let bound = self.bound.get().copied().unwrap_or(Bound {
            proxy: old.config.server.listen,
            admin: old.config.admin.listen,
        });
        let risks = check_reload(&old.config, bound, &config).inspect_err(|e| {
            tracing::error!(
                error = %e,
                generation = old.id,
                "config reload refused; the running configuration stays"
            );
        })?;
        for what in &needs_restart {
            tracing::warn!(setting = %what, "this setting cannot change while running; restart to apply it");
        }
        for risk in &risks {
            tracing::warn!(change = %risk, "config reload applied with a risky change");
        }
        for warning in config.warnings() {
            tracing::warn!(warning = %warning, "config warning");
        }
        let refresher = if config.refresh == old.config.refresh {
            Arc::clone(&old.refresher)
        } else {
            Arc::new(
                Refresher::new(
                    &config.refresh,
                    Arc::clone(&self.metrics),
                    self.state.clone(),
                )
                .map_err(|e| config.error(format!("cannot build the refresh client: {e}")))?,
            )
        };
        let upstream = Upstream::new(&config.upstream, Some(&old.upstream))
            .map_err(|e| config.error(format!("cannot build the upstream client: {e}")))?;
        let pool = Arc::new(Pool::new(
            &config.pool,
            &config.tokens,
            config.refresh.provider != Provider::Static,
            Some(&old.pool),
        ));
        refresher.prime(&pool);
        let mut kept = 0;
        for token in pool.tokens() {
            if old
                .pool
                .get(token.name())
                .is_some_and(|o| Arc::ptr_eq(o, token))
            {
                kept += 1;
            }
        }
        let mut removed = 0;
        for token in old.pool.tokens() {
            if !pool
                .get(token.name())
                .is_some_and(|n| Arc::ptr_eq(n, token))
            {
                self.metrics.forget_token(token.tier(), token.name());
                if pool.get(token.name()).is_none() {
                    removed += 1;
                }
            }
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let summary = ReloadSummary {
            generation: id,
            kept,
            added: pool.tokens().len() - kept,
            removed,
            needs_restart,
        };
        let generation = Generation {
            id,
            loaded_at: SystemTime::now(),
            upstream: Arc::new(upstream),
            config: Arc::new(config),
            pool,
            refresher,
        };
        self.current.store(Arc::new(generation));
        self.metrics.reload_result(true);
        tracing::info!(
            generation = id,
            kept = summary.kept,
            added = summary.added,
            removed = summary.removed,
            "configuration loaded"
        );
        Ok(summary)
    }

    /// Writes the state file now, if one is configured.
    pub async fn save_state(&self) {
        let Some(store) = self.state.clone() else {
            return;
        };
        let pool = Arc::clone(&self.current().pool);
        match tokio::task::spawn_blocking(move || store.save(&pool)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "cannot save token state"),
            Err(e) => tracing::error!(error = %e, "state writer failed"),
        }
    }
}

/// Tells every part of a running instance to stop.
#[derive(Debug)]
pub struct ShutdownTrigger(watch::Sender<bool>);

/// Waits for the stop signal.
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
    /// Completes once shutdown was signalled.
    pub async fn wait(&mut self) {
        let _ = self.0.wait_for(|stop| *stop).await;
    }
}

/// The listeners of a running instance, already bound (so tests bind port 0).
#[derive(Debug)]
pub struct Listeners {
    /// The proxy listener.
    pub proxy: TcpListener,
    /// The admin listener.
    pub admin: TcpListener,
}

impl Listeners {
    /// Binds the addresses of `config`.
    pub async fn bind(config: &Config) -> std::io::Result<Listeners> {
        let proxy = TcpListener::bind(config.server.listen).await?;
        let admin = TcpListener::bind(config.admin.listen).await?;
        Ok(Listeners { proxy, admin })
    }

    /// The bound addresses `(proxy, admin)`.
    pub fn addrs(&self) -> std::io::Result<(SocketAddr, SocketAddr)> {
        Ok((self.proxy.local_addr()?, self.admin.local_addr()?))
    }
}

/// Runs an instance until `shutdown`: the proxy and admin listeners, the
/// background refresher, the state writer and the config watcher. On
/// shutdown, stops accepting, lets requests finish within the grace
/// period, and saves state.
pub async fn run(app: Arc<App>, listeners: Listeners, shutdown: Shutdown) {
    let unknown = SocketAddr::from(([0, 0, 0, 0], 0));
    let (proxy_addr, admin_addr) = listeners.addrs().unwrap_or((unknown, unknown));
    let config = Arc::clone(&app.current().config);
    let _ = app.bound.set(Bound {
        proxy: proxy_addr,
        admin: admin_addr,
    });
    tracing::info!(%proxy_addr, "proxy listening");
    tracing::info!(%admin_addr, "admin listening (/metrics, /healthz, /readyz, /admin/*)");
    if !proxy_addr.ip().is_loopback() && config.server.api_keys.is_empty() {
        tracing::warn!(
            %proxy_addr,
            "ANYONE WHO CAN REACH {proxy_addr} CAN USE THE TOKEN POOL: no api_keys are set and allow_unauthenticated = true"
        );
    }

    let refresh_app = Arc::clone(&app);
    let refresh_loop = crate::refresh::spawn_refresh_loop(move || {
        let g = refresh_app.current();
        (Arc::clone(&g.refresher), Arc::clone(&g.pool))
    });
    let saver = spawn_state_saver(Arc::clone(&app));
    let watcher = crate::config::reload::spawn_watcher(Arc::clone(&app), shutdown.clone());
    let sighup = spawn_sighup(Arc::clone(&app));

    let admin = tokio::spawn(crate::admin::serve(
        listeners.admin,
        Arc::clone(&app),
        shutdown.clone(),
    ));
    crate::proxy::serve(
        listeners.proxy,
        Arc::clone(&app),
        shutdown,
        config.server.shutdown_grace,
    )
    .await;

    refresh_loop.abort();
    saver.abort();
    sighup.abort();
    if let Some(w) = watcher {
        w.abort();
    }
    let _ = admin.await;
    app.save_state().await;
    tracing::info!("stopped");
}

fn spawn_state_saver(app: Arc<App>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(STATE_SAVE_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if app.state.is_none() {
                return;
            }
            let pool = Arc::clone(&app.current().pool);
            // `take_dirty` on every token, not just until the first.
            let dirty = pool
                .tokens()
                .iter()
                .fold(false, |any, t| t.take_dirty() | any);
            if dirty {
                app.save_state().await;
            }
        }
    })
}

fn spawn_sighup(app: Arc<App>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            let Ok(mut hup) = signal(SignalKind::hangup()) else {
                tracing::warn!(
                    "cannot listen for SIGHUP; reload by file change or POST /admin/reload"
                );
                return;
            };
            while hup.recv().await.is_some() {
                tracing::info!("SIGHUP: reloading configuration");
                let app = Arc::clone(&app);
                let _ = tokio::task::spawn_blocking(move || app.reload()).await;
            }
        }
        #[cfg(not(unix))]
        drop(app);
    })
}
