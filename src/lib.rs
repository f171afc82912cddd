//! tokenpool: a reverse proxy that holds a pool of upstream credentials and
//! puts one on every request it forwards.
//!
//! The components, from the outside in (each depends only on those below
//! it; `docs/glossary.md` defines the project's words):
//! - [`cli`]: the command line — `serve`, `check`, `status`, `demo`.
//! - [`run`]: one running instance — binds the listeners, starts and stops
//!   every task.
//! - [`admin`]: the admin listener — metrics, health, pool inspection and
//!   control, reload.
//! - [`reload`]: the one task that reloads, whoever asks (file watch,
//!   SIGHUP, admin).
//! - [`proxy`]: the proxy listener — client authentication, failover across
//!   tokens, the response body.
//! - [`generation`]: the current [`generation::Generation`] (config, pool,
//!   refresher, upstream) behind an atomic swap, and how the next one is
//!   made.
//! - [`quota`]: request quotas from answers' headers and a quota endpoint.
//! - [`refresh`]: turning refresh tokens into access tokens, single flight.
//! - [`cluster`]: replicas sharing one pool through Redis (`[cluster]`).
//! - [`upstream`]: where a request goes and how: URL, header rules,
//!   connection pool, TLS.
//! - [`state`]: the state file that survives restarts.
//! - [`metrics`]: every Prometheus metric.
//! - [`pool`]: tokens by tier, selection and the token state machine. No HTTP.
//! - [`config`]: the TOML schema, validation, secrets and the file watch.
//! - [`error`]: the errors the proxy answers with, and their one mapping
//!   to HTTP.
//! - [`shutdown`]: the stop signal.
//! - [`sim`]: a simulated Warp-like upstream for tests and `tokenpool demo`.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod admin;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod error;
pub mod generation;
pub mod metrics;
pub mod pool;
pub mod proxy;
pub mod quota;
pub mod refresh;
pub mod reload;
pub mod run;
pub mod shutdown;
pub mod sim;
pub mod state;
pub mod upstream;
