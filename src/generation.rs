//! Generations: one loaded configuration and everything built from it
//! ([`Generation`]), the current one behind an atomic swap, and how a new
//! configuration becomes the next one ([`Generations`]).
//!
//! A request loads the current generation once and finishes on it, so a
//! reload never changes anything under a request in flight. A token whose
//! name, tier and secret are unchanged is carried into the next generation
//! as the very same `Arc<Token>`, with all its state. This module decides
//! *what* a reload does; *when* one happens is [`crate::reload`]'s.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::SystemTime;

use arc_swap::ArcSwap;

use crate::cluster::Cluster;
use crate::config::{check_reload, Bound, Config, ConfigError, Provider};
use crate::metrics::Metrics;
use crate::pool::Pool;
use crate::refresh::Refresher;
use crate::state::StateStore;
use crate::upstream::Upstream;

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

/// What a reload did, for logs and `POST /admin/reload`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ReloadSummary {
    /// The new generation's id.
    pub generation: u64,
    /// Tokens carried over with their state.
    pub kept: usize,
    /// Names of the tokens new in this generation.
    pub added: Vec<String>,
    /// Names of the tokens whose secret or tier changed: they start afresh.
    pub replaced: Vec<String>,
    /// Names of the tokens gone.
    pub removed: Vec<String>,
    /// Settings that changed but need a restart.
    pub needs_restart: Vec<NeedsRestart>,
}

/// A setting a reload changed that only a restart applies; the running
/// value stays. Shown (and serialized) as the setting's name, with the two
/// addresses for a listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NeedsRestart {
    /// `[server] listen`.
    ProxyListen {
        /// The address bound.
        from: SocketAddr,
        /// The file's.
        to: SocketAddr,
    },
    /// `[admin] listen`.
    AdminListen {
        /// The address bound.
        from: SocketAddr,
        /// The file's.
        to: SocketAddr,
    },
    /// `[server] header_read_timeout`.
    HeaderReadTimeout,
    /// `[state] path`.
    StatePath,
    /// Anything in `[cluster]`.
    Cluster,
}

impl std::fmt::Display for NeedsRestart {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NeedsRestart::ProxyListen { from, to } => write!(f, "[server] listen {from} -> {to}"),
            NeedsRestart::AdminListen { from, to } => write!(f, "[admin] listen {from} -> {to}"),
            NeedsRestart::HeaderReadTimeout => f.write_str("[server] header_read_timeout"),
            NeedsRestart::StatePath => f.write_str("[state] path"),
            NeedsRestart::Cluster => f.write_str("[cluster]"),
        }
    }
}

impl serde::Serialize for NeedsRestart {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Reads an environment variable (injectable for tests).
pub type Env = Arc<dyn Fn(&str) -> Option<String> + Send + Sync>;

/// The current generation of a running instance, what outlives every
/// generation (metrics, the state file), and how the next one is made.
pub struct Generations {
    current: ArcSwap<Generation>,
    /// Every metric.
    pub metrics: Arc<Metrics>,
    /// The state file, if configured (its path needs a restart to change).
    state: Option<Arc<StateStore>>,
    /// The cluster, with `[cluster]` (a restart to change).
    cluster: Option<Arc<Cluster>>,
    /// The config file reloads read; `None` in env-only mode.
    config_path: Option<PathBuf>,
    env: Env,
    /// Serialises reloads, whoever asks.
    reload_lock: Mutex<()>,
    next_id: AtomicU64,
    /// Where the listeners are bound, once they are: reloads are checked
    /// against these, not against the new file's addresses.
    bound: OnceLock<Bound>,
}

impl std::fmt::Debug for Generations {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Generations").finish_non_exhaustive()
    }
}

impl Generations {
    /// Builds the first generation from `config`, restoring the state file.
    pub fn new(config: Config, env: Env) -> anyhow::Result<Arc<Generations>> {
        let metrics = Arc::new(Metrics::new());
        let state = config
            .state
            .path
            .as_ref()
            .map(|p| Arc::new(StateStore::new(p)));
        if let Some(store) = &state {
            store.check_writable()?;
        }
        let cluster = config
            .cluster
            .as_ref()
            .map(|c| Cluster::new(c, &metrics, state.clone(), config.refresh.timeout).map(Arc::new))
            .transpose()?;
        let pool = Arc::new(Pool::new(
            &config.pool,
            &config.tokens,
            config.refresh.provider != Provider::Static,
            None,
        ));
        if let Some(store) = &state {
            let restored = store.restore_tokens(&pool);
            if !restored.is_empty() {
                tracing::info!(tokens = restored.len(), path = %store.path().display(), "restored token state");
            }
            if let Some(cluster) = &cluster {
                // What the state file says of these tokens is history the
                // cluster's rule may go by while Redis is away.
                for name in &restored {
                    if let Some(token) = pool.get(name) {
                        cluster.known_from_state(token);
                    }
                }
            }
        }
        let refresher = Arc::new(Refresher::new(
            &config.refresh,
            Arc::clone(&metrics),
            state.clone(),
            cluster.clone(),
        )?);
        refresher.prime(&pool);
        let upstream = Upstream::new(&config.upstream, None)
            .map_err(|e| anyhow::anyhow!("cannot build the upstream client: {e}"))?;
        let generation = Generation {
            id: 1,
            loaded_at: SystemTime::now(),
            upstream: Arc::new(upstream),
            config: Arc::new(config),
            pool,
            refresher,
        };
        metrics.reload_result(true);
        Ok(Arc::new(Generations {
            config_path: generation.config.path.clone(),
            current: ArcSwap::from_pointee(generation),
            metrics,
            state,
            cluster,
            env,
            reload_lock: Mutex::new(()),
            next_id: AtomicU64::new(2),
            bound: OnceLock::new(),
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

    /// The state file, if one is configured.
    pub fn state(&self) -> Option<&Arc<StateStore>> {
        self.state.as_ref()
    }

    /// The cluster, with `[cluster]`.
    pub fn cluster(&self) -> Option<&Arc<Cluster>> {
        self.cluster.as_ref()
    }

    /// Records where the listeners are bound (once; later calls are ignored).
    pub fn set_bound(&self, bound: Bound) {
        let _ = self.bound.set(bound);
    }

    /// Reads the config again and, if it is valid, makes it the next
    /// generation. An invalid config changes nothing. Blocking (it reads
    /// files): call it from `spawn_blocking` on the async side.
    pub fn reload(&self) -> Result<ReloadSummary, ConfigError> {
        let _serial = self.reload_lock.lock().unwrap_or_else(|e| e.into_inner());
        let env = |name: &str| (self.env)(name);
        let loaded = match &self.config_path {
            Some(path) => Config::load(path, &env),
            None => Config::from_env(&env),
        };
        let result = loaded
            .inspect_err(|e| {
                tracing::error!(
                    error = %e,
                    generation = self.current().id,
                    "config reload failed; the running configuration stays"
                );
            })
            .and_then(|config| self.apply_locked(config));
        if result.is_err() {
            self.metrics.reload_result(false);
        }
        result
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
            needs_restart.push(NeedsRestart::ProxyListen {
                from: old.config.server.listen,
                to: config.server.listen,
            });
            config.server.listen = old.config.server.listen;
        }
        if config.admin.listen != old.config.admin.listen {
            needs_restart.push(NeedsRestart::AdminListen {
                from: old.config.admin.listen,
                to: config.admin.listen,
            });
            config.admin.listen = old.config.admin.listen;
        }
        if config.server.header_read_timeout != old.config.server.header_read_timeout {
            needs_restart.push(NeedsRestart::HeaderReadTimeout);
            config.server.header_read_timeout = old.config.server.header_read_timeout;
        }
        if config.state.path != old.config.state.path {
            needs_restart.push(NeedsRestart::StatePath);
            config.state.path = old.config.state.path.clone();
        }
        if config.cluster != old.config.cluster {
            needs_restart.push(NeedsRestart::Cluster);
            config.cluster = old.config.cluster.clone();
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
        // Said once the new generation is in place: a step below can still
        // refuse the reload, and the log must not say "applied" then.
        let warnings = config.reload_warnings();
        let refresher = if config.refresh == old.config.refresh {
            Arc::clone(&old.refresher)
        } else {
            Arc::new(
                Refresher::new(
                    &config.refresh,
                    Arc::clone(&self.metrics),
                    self.state.clone(),
                    self.cluster.clone(),
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
        let mut added = Vec::new();
        let mut replaced = Vec::new();
        for token in pool.tokens() {
            match old.pool.get(token.name()) {
                Some(o) if Arc::ptr_eq(o, token) => kept += 1,
                Some(_) => replaced.push(token.name().to_string()),
                None => added.push(token.name().to_string()),
            }
        }
        let mut removed = Vec::new();
        for token in old.pool.tokens() {
            if !pool
                .get(token.name())
                .is_some_and(|n| Arc::ptr_eq(n, token))
            {
                self.metrics.forget_token(token.tier(), token.name());
                if pool.get(token.name()).is_none() {
                    removed.push(token.name().to_string());
                }
            }
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let summary = ReloadSummary {
            generation: id,
            kept,
            added,
            replaced,
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
        for what in &summary.needs_restart {
            tracing::warn!(setting = %what, "this setting cannot change while running; restart to apply it");
        }
        for risk in &risks {
            tracing::warn!(change = %risk, "config reload applied with a risky change");
        }
        for warning in &warnings {
            tracing::warn!(warning = %warning, "config warning");
        }
        let names = |list: &[String]| {
            if list.is_empty() {
                "-".to_string()
            } else {
                list.join(",")
            }
        };
        tracing::info!(
            generation = id,
            kept = summary.kept,
            added = %names(&summary.added),
            replaced = %names(&summary.replaced),
            removed = %names(&summary.removed),
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
