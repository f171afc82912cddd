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
//! - [`error`]: the errors the proxy answers with, and their one mapping
//!   to HTTP.
//! - [`upstream`]: where a request goes and how: URL, header rules,
//!   connection pool, TLS.
//! - [`state`]: the state file that survives restarts.
//! - [`metrics`]: every Prometheus metric.
//! - [`pool`]: tokens by tier, selection and the token state machine. No HTTP.
//! - [`config`]: the TOML schema, validation, secrets and the file watch.
//! - [`shutdown`]: the stop signal.
//! - `sim` (with the default `sim` feature): the simulated Warp-like
//!   upstream of `tokenpool demo`, the tests and the benches. A test
//!   double, not part of the library's API: it may change with any release.

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
#[cfg(feature = "sim")]
pub mod sim;
pub mod state;
pub mod upstream;
