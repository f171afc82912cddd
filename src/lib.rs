//! tokenpool: a reverse proxy that holds a pool of upstream credentials and
//! puts one on every request it forwards.
//!
//! The components, from the outside in:
//! - [`proxy`]: the client-facing listener — authentication, forwarding,
//!   failover across tokens, streaming.
//! - [`admin`]: the admin listener — metrics, health, pool inspection and
//!   control, reload.
//! - [`app`]: one running instance — the current [`app::Generation`]
//!   (config + pool + refresher) behind an atomic swap, and what starts and
//!   stops the listeners and background tasks.
//! - [`config`]: the TOML schema, validation and live reload.
//! - [`pool`]: tokens by tier, selection and the token state machine. No HTTP.
//! - [`refresh`]: turning refresh tokens into access tokens, single flight.
//! - [`state`]: the state file that survives restarts.
//! - [`metrics`]: every Prometheus metric.
//! - [`error`]: the errors the proxy itself answers with.
//! - [`sim`]: a simulated Warp-like upstream for tests and `tokenpool demo`.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod admin;
pub mod app;
pub mod cli;
pub mod config;
pub mod error;
pub mod metrics;
pub mod pool;
pub mod proxy;
pub mod refresh;
pub mod sim;
pub mod state;
