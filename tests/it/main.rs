//! Integration tests: one binary, driving real proxies against the
//! in-process simulated upstream, everything on 127.0.0.1 port 0.

mod admin;
mod cluster;
mod cluster_faults;
mod config_files;
mod conformance;
mod deploy;
mod downstream;
mod faults;
mod hardening;
mod harness;
mod metrics;
mod process;
mod proxy;
mod quota;
mod raw;
mod redis_server;
mod refresh;
mod reload;
mod upstream;
