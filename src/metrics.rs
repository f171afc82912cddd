//! Every Prometheus metric (`docs/metrics.md`), registered in one place.
//!
//! Counters and histograms move where things happen (proxy, refresher,
//! reload); the per-state and per-token families are computed from the
//! pool at scrape time by [`Metrics::render`], so they can never drift
//! from the pool's real state. Labels carry tier, token *names*, states,
//! reasons, outcomes and status codes — never a secret.

use std::sync::OnceLock;
use std::time::Duration;

use prometheus::proto::{
    Counter as ProtoCounter, Gauge as ProtoGauge, LabelPair, Metric, MetricFamily, MetricType,
};
use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::config::Tier;
use crate::pool::{Affinity, Pool, Reason, Snapshot, StateCounts, TokenState};

/// How a client request ended (`outcome` of `tokenpool_requests_total`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestOutcome {
    /// The client got an answer below 400.
    Success,
    /// The upstream answered 5xx, or the proxy could not reach it (502/504).
    UpstreamError,
    /// The upstream answered 4xx, or the request was bad (413, 400), or the
    /// client left.
    ClientError,
    /// No token was available (503).
    NoToken,
    /// The client did not authenticate (401 from the proxy).
    Rejected,
}

impl RequestOutcome {
    /// Every outcome, in the order of the cached series.
    pub const ALL: [RequestOutcome; 5] = [
        RequestOutcome::Success,
        RequestOutcome::UpstreamError,
        RequestOutcome::ClientError,
        RequestOutcome::NoToken,
        RequestOutcome::Rejected,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            RequestOutcome::Success => "success",
            RequestOutcome::UpstreamError => "upstream_error",
            RequestOutcome::ClientError => "client_error",
            RequestOutcome::NoToken => "no_token",
            RequestOutcome::Rejected => "rejected",
        }
    }

    /// The outcome of a request whose answer (the upstream's, passed
    /// through) has `status`.
    pub fn of_status(status: http::StatusCode) -> RequestOutcome {
        match status.as_u16() {
            0..=399 => RequestOutcome::Success,
            400..=499 => RequestOutcome::ClientError,
            _ => RequestOutcome::UpstreamError,
        }
    }
}

/// How a refresh call ended (`outcome` of `tokenpool_refreshes_total`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RefreshOutcome {
    /// A new access token.
    Success,
    /// The endpoint rejected the call for a reason other than revocation.
    Failed,
    /// The refresh token was rejected.
    Revoked,
    /// Unreachable, timed out, 5xx or garbage.
    Unavailable,
    /// The endpoint answered 429.
    RateLimited,
}

impl RefreshOutcome {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            RefreshOutcome::Success => "success",
            RefreshOutcome::Failed => "failed",
            RefreshOutcome::Revoked => "revoked",
            RefreshOutcome::Unavailable => "unavailable",
            RefreshOutcome::RateLimited => "rate_limited",
        }
    }
}

/// The background tasks that are started again when they end or panic
/// (`task` of `tokenpool_task_restarts_total`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Task {
    /// The background refresher.
    Refresh,
    /// The quota poller.
    QuotaPoll,
    /// The state file's writer.
    StateSaver,
    /// The cluster's sync task.
    ClusterSync,
}

impl Task {
    /// Every task.
    pub const ALL: [Task; 4] = [
        Task::Refresh,
        Task::QuotaPoll,
        Task::StateSaver,
        Task::ClusterSync,
    ];

    /// The label value (and the name the log uses).
    pub fn as_str(self) -> &'static str {
        match self {
            Task::Refresh => "refresh",
            Task::QuotaPoll => "quota_poll",
            Task::StateSaver => "state_saver",
            Task::ClusterSync => "cluster_sync",
        }
    }
}

/// Why a replica did not present a refresh token (`why` of
/// `tokenpool_cluster_refresh_refused_total`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// Redis is away, frozen, slow or unreachable.
    Away,
    /// Redis lost or rolled back its data moments ago.
    Fenced,
    /// A wrong or missing encryption_key, or another pool's key_prefix.
    Misconfigured,
    /// Its refresh token has rotated: only a lease makes it safe.
    Rotated,
    /// No state file and the cluster's record never read.
    NoHistory,
    /// The cluster's record is ahead of this replica's refresh token.
    Behind,
    /// An earlier refresh ended without its result in the cluster.
    Unsettled,
}

impl Refusal {
    /// Every reason.
    pub const ALL: [Refusal; 7] = [
        Refusal::Away,
        Refusal::Fenced,
        Refusal::Misconfigured,
        Refusal::Rotated,
        Refusal::NoHistory,
        Refusal::Behind,
        Refusal::Unsettled,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::Away => "away",
            Refusal::Fenced => "fenced",
            Refusal::Misconfigured => "misconfigured",
            Refusal::Rotated => "rotated",
            Refusal::NoHistory => "no_history",
            Refusal::Behind => "behind",
            Refusal::Unsettled => "unsettled",
        }
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The cluster's metrics.
#[derive(Clone)]
pub struct ClusterMetrics {
    /// 1 while connected.
    up: IntGauge,
    /// Exchanges with Redis by result.
    sync: IntCounterVec,
    /// Changes by direction (`sent`, `received`).
    events: IntCounterVec,
    /// 0 while the cluster's configuration is wrong (another
    /// encryption_key, none, or another pool holding the same tokens).
    config_ok: IntGauge,
    /// Refreshes this replica would not present a refresh token for, by why.
    refresh_refused: IntCounterVec,
}

impl ClusterMetrics {
    /// Says whether this replica is connected and sharing the pool.
    pub fn connected(&self, up: bool) {
        self.up.set(i64::from(up));
    }

    /// Says whether the cluster's configuration is right.
    pub fn config_ok(&self, ok: bool) {
        self.config_ok.set(i64::from(ok));
    }

    /// Counts an exchange with Redis.
    pub fn exchange(&self, ok: bool) {
        self.sync
            .with_label_values(&[if ok { "ok" } else { "error" }])
            .inc();
    }

    /// Counts changes sent to other replicas.
    pub fn sent(&self, n: u64) {
        self.events.with_label_values(&["sent"]).inc_by(n);
    }

    /// Counts changes taken from other replicas.
    pub fn received(&self, n: u64) {
        self.events.with_label_values(&["received"]).inc_by(n);
    }

    /// Counts a refresh not made because the refresh token could not be
    /// shown to be current.
    pub fn refused(&self, why: Refusal) {
        self.refresh_refused
            .with_label_values(&[why.as_str()])
            .inc();
    }
}

/// Status codes below this have their `upstream_requests_total` series
/// handle cached per tier.
const CACHED_CODES: usize = 600;

/// Series handles the request path uses, looked up once instead of hashing
/// their labels on every request.
struct Hot {
    /// `requests_total` by outcome, in [`RequestOutcome::ALL`] order.
    requests: Vec<IntCounter>,
    /// `upstream_response_seconds` by tier, in [`Tier::ALL`] order.
    upstream_response: Vec<Histogram>,
    /// `upstream_requests_total` by tier and code, created on first use.
    upstream_requests: Vec<OnceLock<IntCounter>>,
    /// `affinity_total` by result, in [`AFFINITY`] order.
    affinity: Vec<IntCounter>,
}

/// The `result` labels of `affinity_total`, in [`Affinity`] order.
const AFFINITY: [Affinity; 3] = [Affinity::Hit, Affinity::Moved, Affinity::None];

/// The registry and every metric family.
pub struct Metrics {
    registry: Registry,
    hot: Hot,
    /// Requests by outcome.
    requests: IntCounterVec,
    /// Time to response headers.
    request_duration: Histogram,
    /// Requests being served.
    inflight: IntGauge,
    /// Requests served by a lower tier than the first.
    tier_fallbacks: IntCounterVec,
    /// Requests that moved to another token, by the reason.
    failovers: IntCounterVec,
    /// Failures charged to a token.
    token_failures: IntCounterVec,
    /// Tokens per tier and state.
    tokens: IntGaugeVec,
    /// Refresh calls by outcome.
    refreshes: IntCounterVec,
    /// Refresh call latency.
    refresh_duration: HistogramVec,
    /// Upstream answers by status code.
    upstream_requests: IntCounterVec,
    /// Upstream time to headers.
    upstream_response: HistogramVec,
    /// Requests by client key name and outcome.
    client_requests: IntCounterVec,
    /// Reloads by result.
    reloads: IntCounterVec,
    /// Quota polls by result.
    quota_polls: IntCounterVec,
    /// Background tasks started again after they ended or panicked.
    task_restarts: IntCounterVec,
    /// Requests of sessions by how their affinity went.
    affinity: IntCounterVec,
    /// 1 when the last reload succeeded.
    last_reload_successful: IntGauge,
    /// Unix time of the last successful reload (or the first load).
    last_reload_success_timestamp: Gauge,
}

/// Buckets from 5 ms to 30 s, for refresh calls.
const REFRESH_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
/// Buckets from 5 ms to 60 s, for time to upstream headers.
const UPSTREAM_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];
/// Buckets from 1 ms to 60 s, for time to response headers.
const REQUEST_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

fn opts(name: &str, help: &str) -> Opts {
    Opts::new(name, help).namespace("tokenpool")
}

fn hopts(name: &str, help: &str, buckets: &[f64]) -> HistogramOpts {
    HistogramOpts::new(name, help)
        .namespace("tokenpool")
        .buckets(buckets.to_vec())
}

impl Metrics {
    /// Registers every family (and the process collector) in a new registry.
    pub fn new() -> Metrics {
        let registry = Registry::new();
        macro_rules! reg {
            ($m:expr) => {{
                let m = $m.expect("metric definition is valid");
                registry
                    .register(Box::new(m.clone()))
                    .expect("metric names are unique");
                m
            }};
        }
        let mut m = Metrics {
            hot: Hot {
                requests: Vec::new(),
                upstream_response: Vec::new(),
                affinity: Vec::new(),
                upstream_requests: (0..Tier::ALL.len() * CACHED_CODES)
                    .map(|_| OnceLock::new())
                    .collect(),
            },
            requests: reg!(IntCounterVec::new(
                opts("requests_total", "Client requests by outcome."),
                &["outcome"]
            )),
            request_duration: reg!(Histogram::with_opts(hopts(
                "request_duration_seconds",
                "Time from a client request to its response headers.",
                REQUEST_BUCKETS
            ))),
            inflight: reg!(IntGauge::with_opts(opts(
                "inflight_requests",
                "Client requests being served, streams included."
            ))),
            tier_fallbacks: reg!(IntCounterVec::new(
                opts(
                    "tier_fallbacks_total",
                    "Requests served by a lower tier because every token above was unavailable."
                ),
                &["from_tier", "to_tier"]
            )),
            failovers: reg!(IntCounterVec::new(
                opts(
                    "failovers_total",
                    "Requests moved to another token, by reason."
                ),
                &["tier", "reason"]
            )),
            token_failures: reg!(IntCounterVec::new(
                opts(
                    "token_failures_total",
                    "Failures charged to a token, by reason."
                ),
                &["tier", "token", "reason"]
            )),
            tokens: reg!(IntGaugeVec::new(
                opts("tokens", "Tokens per tier and state."),
                &["tier", "state"]
            )),
            refreshes: reg!(IntCounterVec::new(
                opts("refreshes_total", "Refresh calls by outcome."),
                &["tier", "outcome"]
            )),
            refresh_duration: reg!(HistogramVec::new(
                hopts(
                    "refresh_duration_seconds",
                    "Refresh call latency.",
                    REFRESH_BUCKETS
                ),
                &["tier"]
            )),
            upstream_requests: reg!(IntCounterVec::new(
                opts(
                    "upstream_requests_total",
                    "Upstream answers by status code."
                ),
                &["tier", "code"]
            )),
            upstream_response: reg!(HistogramVec::new(
                hopts(
                    "upstream_response_seconds",
                    "Time from sending upstream to the upstream's response headers.",
                    UPSTREAM_BUCKETS
                ),
                &["tier"]
            )),
            client_requests: reg!(IntCounterVec::new(
                opts(
                    "client_requests_total",
                    "Client requests by the name of the client's key (\"-\": none) and outcome."
                ),
                &["client", "outcome"]
            )),
            reloads: reg!(IntCounterVec::new(
                opts("config_reloads_total", "Config reloads by result."),
                &["result"]
            )),
            quota_polls: reg!(IntCounterVec::new(
                opts(
                    "quota_polls_total",
                    "Polls of the quota endpoint ([quota]) by result."
                ),
                &["result"]
            )),
            task_restarts: reg!(IntCounterVec::new(
                opts(
                    "task_restarts_total",
                    "Background tasks (refresh, quota_poll, state_saver, cluster_sync) started again after they ended or panicked while the instance ran."
                ),
                &["task"]
            )),
            affinity: reg!(IntCounterVec::new(
                opts(
                    "affinity_total",
                    "Requests by how their session affinity went: hit (on its token), moved (its token was unavailable, or the request failed over), none (no session header, or an empty one)."
                ),
                &["result"]
            )),
            last_reload_successful: reg!(IntGauge::with_opts(opts(
                "config_last_reload_successful",
                "1 when the last config reload succeeded."
            ))),
            last_reload_success_timestamp: reg!(Gauge::with_opts(opts(
                "config_last_reload_success_timestamp_seconds",
                "Unix time of the last successful config load."
            ))),
            registry,
        };
        let build_info = IntGaugeVec::new(
            opts(
                "build_info",
                "Always 1; the version label says which build runs.",
            ),
            &["version"],
        )
        .expect("metric definition is valid");
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        m.registry
            .register(Box::new(build_info))
            .expect("metric names are unique");
        #[cfg(target_os = "linux")]
        {
            let process = prometheus::process_collector::ProcessCollector::for_self();
            // Registration fails only when /proc is missing; metrics then lack it.
            let _ = m.registry.register(Box::new(process));
        }

        // Series that must exist from the start, with zeros.
        m.hot.requests = RequestOutcome::ALL
            .iter()
            .map(|o| m.requests.with_label_values(&[o.as_str()]))
            .collect();
        m.hot.upstream_response = Tier::ALL
            .iter()
            .map(|t| m.upstream_response.with_label_values(&[t.as_str()]))
            .collect();
        for tier in Tier::ALL {
            for state in TokenState::ALL {
                m.tokens.with_label_values(&[tier.as_str(), state.as_str()]);
            }
            for reason in Reason::METRIC {
                m.failovers
                    .with_label_values(&[tier.as_str(), reason.as_str()]);
            }
            for o in [
                RefreshOutcome::Success,
                RefreshOutcome::Failed,
                RefreshOutcome::Revoked,
                RefreshOutcome::Unavailable,
                RefreshOutcome::RateLimited,
            ] {
                m.refreshes.with_label_values(&[tier.as_str(), o.as_str()]);
            }
        }
        for result in ["success", "failure"] {
            m.reloads.with_label_values(&[result]);
        }
        for result in ["ok", "failed"] {
            m.quota_polls.with_label_values(&[result]);
        }
        for task in Task::ALL {
            m.task_restarts.with_label_values(&[task.as_str()]);
        }
        m.hot.affinity = AFFINITY
            .iter()
            .map(|a| m.affinity.with_label_values(&[a.as_str()]))
            .collect();
        // Every pair of tiers, so that the rate of fallbacks is 0, not
        // absent, before the first one.
        for from in Tier::ALL {
            for to in Tier::ALL.into_iter().filter(|&to| to != from) {
                m.tier_fallbacks
                    .with_label_values(&[from.as_str(), to.as_str()]);
            }
        }
        m
    }

    /// Counts a client request begun (`tokenpool_inflight_requests`).
    pub fn request_started(&self) {
        self.inflight.inc();
    }

    /// Counts a client request that is no longer served (its answer's body
    /// ended, or the client left).
    pub fn request_ended(&self) {
        self.inflight.dec();
    }

    /// Counts a client request answered, the time it took to its
    /// response headers, and the client whose key is named `client`
    /// (`None`: no key, or no keys configured).
    pub fn request_done(&self, outcome: RequestOutcome, client: Option<&str>, elapsed: Duration) {
        let i = RequestOutcome::ALL
            .iter()
            .position(|&o| o == outcome)
            .expect("ALL holds every outcome");
        self.hot.requests[i].inc();
        self.request_duration.observe(elapsed.as_secs_f64());
        self.client_requests
            .with_label_values(&[client.unwrap_or("-"), outcome.as_str()])
            .inc();
    }

    /// Counts a refresh call of a token of `tier`, and how long it took.
    pub fn refresh_done(&self, tier: Tier, outcome: RefreshOutcome, elapsed: Duration) {
        self.refresh_duration
            .with_label_values(&[tier.as_str()])
            .observe(elapsed.as_secs_f64());
        self.refreshes
            .with_label_values(&[tier.as_str(), outcome.as_str()])
            .inc();
    }

    /// Counts an upstream answer of `tier`'s token and its time to headers.
    pub fn upstream_answer(&self, tier: Tier, status: http::StatusCode, elapsed: Duration) {
        let t = tier.index();
        self.hot.upstream_response[t].observe(elapsed.as_secs_f64());
        let code = usize::from(status.as_u16());
        if code < CACHED_CODES {
            self.hot.upstream_requests[t * CACHED_CODES + code]
                .get_or_init(|| {
                    self.upstream_requests
                        .with_label_values(&[tier.as_str(), status.as_str()])
                })
                .inc();
        } else {
            self.upstream_requests
                .with_label_values(&[tier.as_str(), status.as_str()])
                .inc();
        }
    }

    /// Counts a token failure and the failover it causes.
    pub fn token_failure(&self, tier: Tier, token: &str, reason: Reason) {
        self.token_failures
            .with_label_values(&[tier.as_str(), token, reason.as_str()])
            .inc();
    }

    /// Counts a request served by a lower tier than the first with tokens.
    pub fn tier_fallback(&self, from: Tier, to: Tier) {
        self.tier_fallbacks
            .with_label_values(&[from.as_str(), to.as_str()])
            .inc();
    }

    /// Counts a request moving to another token.
    pub fn failover(&self, tier: Tier, reason: Reason) {
        self.failovers
            .with_label_values(&[tier.as_str(), reason.as_str()])
            .inc();
    }

    /// Deletes every per-token series of a token that left the pool (the
    /// per-token families built at scrape time need nothing deleted).
    pub fn forget_token(&self, tier: Tier, token: &str) {
        for reason in Reason::METRIC {
            let _ =
                self.token_failures
                    .remove_label_values(&[tier.as_str(), token, reason.as_str()]);
        }
    }

    /// Registers the cluster's families (only with `[cluster]`: without
    /// it there is no `tokenpool_cluster_up` to alert on).
    pub fn cluster(&self) -> ClusterMetrics {
        let up = IntGauge::with_opts(opts(
            "cluster_up",
            "1 while this replica is connected to the cluster's Redis and shares its pool.",
        ))
        .expect("metric definition is valid");
        let sync = IntCounterVec::new(
            opts(
                "cluster_sync_total",
                "Exchanges with the cluster's Redis (reads and writes of shared state), by result.",
            ),
            &["result"],
        )
        .expect("metric definition is valid");
        let events = IntCounterVec::new(
            opts(
                "cluster_events_total",
                "Token changes sent to other replicas, and received from them.",
            ),
            &["direction"],
        )
        .expect("metric definition is valid");
        let config_ok = IntGauge::with_opts(opts(
            "cluster_config_ok",
            "0 while the cluster's configuration is wrong: another encryption_key (or none), or another key_prefix holding the same tokens. Nothing is refreshed then.",
        ))
        .expect("metric definition is valid");
        config_ok.set(1);
        let refresh_refused = IntCounterVec::new(
            opts(
                "cluster_refresh_refused_total",
                "Refreshes this replica did not make because it could not show the refresh token is current, by why.",
            ),
            &["why"],
        )
        .expect("metric definition is valid");
        for m in [
            Box::new(up.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(sync.clone()),
            Box::new(events.clone()),
            Box::new(config_ok.clone()),
            Box::new(refresh_refused.clone()),
        ] {
            // Registered once per process; a second cluster would be a bug.
            let _ = self.registry.register(m);
        }
        for result in ["ok", "error"] {
            sync.with_label_values(&[result]);
        }
        for direction in ["sent", "received"] {
            events.with_label_values(&[direction]);
        }
        for why in Refusal::ALL {
            refresh_refused.with_label_values(&[why.as_str()]);
        }
        ClusterMetrics {
            up,
            sync,
            events,
            config_ok,
            refresh_refused,
        }
    }

    /// Counts a background task started again.
    pub fn task_restarted(&self, task: Task) {
        self.task_restarts.with_label_values(&[task.as_str()]).inc();
    }

    /// Counts a quota poll.
    pub fn quota_poll(&self, ok: bool) {
        self.quota_polls
            .with_label_values(&[if ok { "ok" } else { "failed" }])
            .inc();
    }

    /// Counts how a request's session affinity went.
    pub fn affinity(&self, result: Affinity) {
        let i = match result {
            Affinity::Hit => 0,
            Affinity::Moved => 1,
            Affinity::None => 2,
        };
        self.hot.affinity[i].inc();
    }

    /// Records the result of a config load or reload.
    pub fn reload_result(&self, ok: bool) {
        if ok {
            self.reloads.with_label_values(&["success"]).inc();
            self.last_reload_successful.set(1);
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64());
            self.last_reload_success_timestamp.set(now);
        } else {
            self.reloads.with_label_values(&["failure"]).inc();
            self.last_reload_successful.set(0);
        }
    }

    /// The text exposition of every metric, with the per-token and
    /// per-state families computed from `pool` now.
    ///
    /// Per-token families are built for the scrape and dropped after it
    /// rather than kept as registered series: a series costs about 500
    /// bytes for as long as it lives, and a token has four of them. Removed
    /// tokens disappear from the next scrape by themselves.
    pub fn render(&self, pool: &Pool) -> Vec<u8> {
        let snapshots = pool.snapshots();
        let counts = StateCounts::of(&snapshots);
        for tier in Tier::ALL {
            for state in TokenState::ALL {
                self.tokens
                    .with_label_values(&[tier.as_str(), state.as_str()])
                    .set(counts.get(tier, state) as i64);
            }
        }
        let mut families = self.registry.gather();
        families.extend(token_families(&snapshots));
        families.sort_by(|a, b| a.name().cmp(b.name()));
        let mut out = Vec::with_capacity(16 * 1024);
        // Encoding into a Vec cannot fail for well-formed families.
        let _ = TextEncoder::new().encode(&families, &mut out);
        out
    }
}

fn label(name: &str, value: &str) -> LabelPair {
    let mut l = LabelPair::default();
    l.set_name(name.to_string());
    l.set_value(value.to_string());
    l
}

fn family(name: &str, help: &str, kind: MetricType, metrics: Vec<Metric>) -> MetricFamily {
    let mut f = MetricFamily::default();
    f.set_name(format!("tokenpool_{name}"));
    f.set_help(help.to_string());
    f.set_field_type(kind);
    f.set_metric(metrics);
    f
}

fn gauge(labels: Vec<LabelPair>, value: f64) -> Metric {
    let mut g = ProtoGauge::default();
    g.set_value(value);
    let mut m = Metric::from_label(labels);
    m.set_gauge(g);
    m
}

/// The per-token families, from `snapshots` (one per token, in pool
/// order): each token's lock was taken once, for its snapshot.
fn token_families(snapshots: &[Snapshot]) -> Vec<MetricFamily> {
    let n = snapshots.len();
    let (mut picks, mut up, mut state, mut expiry) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::new(),
    );
    let (mut limit, mut remaining, mut reset) = (Vec::new(), Vec::new(), Vec::new());
    let mut changes = Vec::with_capacity(n);
    for s in snapshots {
        let tier = s.tier.as_str();
        let base = || vec![label("tier", tier), label("token", &s.name)];
        let mut c = ProtoCounter::default();
        c.set_value(s.requests as f64);
        let mut m = Metric::from_label(base());
        m.set_counter(c);
        picks.push(m);
        let mut c = ProtoCounter::default();
        c.set_value(s.state_changes as f64);
        let mut m = Metric::from_label(base());
        m.set_counter(c);
        changes.push(m);
        up.push(gauge(
            base(),
            f64::from(u8::from(s.state == TokenState::Active)),
        ));
        // Labels in name order, as the registry's own series have them.
        let labels = vec![
            label("reason", s.reason.map_or("", |r| r.as_str())),
            label("state", s.state.as_str()),
            label("tier", tier),
            label("token", &s.name),
        ];
        state.push(gauge(labels, 1.0));
        if let Some(at) = s.access_token_expires_at {
            let secs = at
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64());
            expiry.push(gauge(base(), secs));
        }
        if let Some(q) = s.quota {
            if let Some(n) = q.limit {
                limit.push(gauge(base(), n as f64));
            }
            if let Some(n) = q.remaining {
                remaining.push(gauge(base(), n as f64));
            }
            if let Some(at) = q.resets_at {
                let secs = at
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0.0, |d| d.as_secs_f64());
                reset.push(gauge(base(), secs));
            }
        }
    }
    let mut out = vec![
        family(
            "selections_total",
            "Tokens picked for a request.",
            MetricType::COUNTER,
            picks,
        ),
        family(
            "token_state_changes_total",
            "Changes of the token's state or reason since the process started.",
            MetricType::COUNTER,
            changes,
        ),
        family(
            "token_up",
            "1 when the token is in rotation, else 0.",
            MetricType::GAUGE,
            up,
        ),
        // 1 for each token's current state (and reason): per-token alerts
        // (revoked, disabled) need the state itself, not a counter that may
        // have moved before the first scrape.
        family(
            "token_state",
            "1 for the token's current state; reason says why it is not active.",
            MetricType::GAUGE,
            state,
        ),
    ];
    if !expiry.is_empty() {
        out.push(family(
            "token_access_expiry_timestamp_seconds",
            "Unix time when the token's access token expires.",
            MetricType::GAUGE,
            expiry,
        ));
    }
    out.push(family(
        "token_quota_limit",
        "Requests the token's quota allows per period, as the upstream last said.",
        MetricType::GAUGE,
        limit,
    ));
    out.push(family(
        "token_quota_remaining",
        "Requests left in the token's quota: as the upstream last said, less those answered since.",
        MetricType::GAUGE,
        remaining,
    ));
    out.push(family(
        "token_quota_reset_timestamp_seconds",
        "Unix time when the token's quota refills.",
        MetricType::GAUGE,
        reset,
    ));
    // An empty family is not valid exposition.
    out.retain(|f| !f.get_metric().is_empty());
    out
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};
    use std::time::{Duration, SystemTime};

    use super::*;
    use crate::config::Config;
    use crate::pool::{AccessToken, Quota};

    /// (family, label) → the values `docs/metrics.md` lists for it, in
    /// parentheses after the label's name (`result` (`ok`, `error`)).
    fn documented_values() -> BTreeMap<(String, String), BTreeSet<String>> {
        let doc = include_str!("../docs/metrics.md");
        let mut out = BTreeMap::new();
        for row in doc.lines().filter(|l| l.starts_with("| `tokenpool_")) {
            let cells: Vec<&str> = row.split('|').map(str::trim).collect();
            let name = cells[1].trim_matches('`').to_string();
            let mut rest = cells[3];
            while let Some(open) = rest.find('(') {
                let label = rest[..open].trim().trim_end_matches(',').trim();
                let label = label.rsplit(',').next().unwrap().trim().trim_matches('`');
                let close = rest[open..].find(')').map_or(rest.len(), |c| open + c);
                let values: BTreeSet<String> = rest[open + 1..close]
                    .split(',')
                    .map(|v| v.trim().trim_matches('`').to_string())
                    .collect();
                out.insert((name.clone(), label.to_string()), values);
                rest = &rest[(close + 1).min(rest.len())..];
            }
        }
        out
    }

    /// (family, label) → the values a scrape shows.
    fn exposed_values(text: &str) -> BTreeMap<(String, String), BTreeSet<String>> {
        let mut out: BTreeMap<(String, String), BTreeSet<String>> = BTreeMap::new();
        for line in text.lines().filter(|l| l.starts_with("tokenpool_")) {
            let Some((series, rest)) = line.split_once('{') else {
                continue;
            };
            for pair in rest.split_once('}').unwrap().0.split(',') {
                let (label, value) = pair.split_once('=').unwrap();
                out.entry((series.to_string(), label.to_string()))
                    .or_default()
                    .insert(value.trim_matches('"').to_string());
            }
        }
        out
    }

    /// Family name → (type, label names), as `docs/metrics.md` lists them.
    fn documented() -> BTreeMap<String, (String, BTreeSet<String>)> {
        let doc = include_str!("../docs/metrics.md");
        let mut out = BTreeMap::new();
        for row in doc.lines().filter(|l| l.starts_with("| `tokenpool_")) {
            let cells: Vec<&str> = row.split('|').map(str::trim).collect();
            let name = cells[1].trim_matches('`').to_string();
            // Label names are the backticked words outside parentheses
            // (inside them: the label's values).
            let mut labels = BTreeSet::new();
            let mut depth = 0;
            let mut word: Option<String> = None;
            for c in cells[3].chars() {
                match c {
                    '(' => depth += 1,
                    ')' => depth -= 1,
                    '`' if depth == 0 => match word.take() {
                        Some(w) => {
                            labels.insert(w);
                        }
                        None => word = Some(String::new()),
                    },
                    c => {
                        if let Some(w) = word.as_mut() {
                            w.push(c);
                        }
                    }
                }
            }
            out.insert(name, (cells[2].to_string(), labels));
        }
        out
    }

    /// The same, read off a scrape.
    fn exposed(text: &str) -> BTreeMap<String, (String, BTreeSet<String>)> {
        let mut out: BTreeMap<String, (String, BTreeSet<String>)> = BTreeMap::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').unwrap();
                if name.starts_with("tokenpool_") {
                    out.insert(name.to_string(), (kind.to_string(), BTreeSet::new()));
                }
                continue;
            }
            if line.starts_with('#') || !line.starts_with("tokenpool_") {
                continue;
            }
            let (series, labels) = match line.split_once('{') {
                Some((series, rest)) => (series, rest.split_once('}').unwrap().0),
                None => (line.split_once(' ').unwrap().0, ""),
            };
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| {
                    series
                        .strip_suffix(s)
                        .filter(|f| out.get(*f).is_some_and(|(k, _)| k == "histogram"))
                })
                .unwrap_or(series);
            let entry = out.get_mut(family).expect("a series of a declared family");
            for pair in labels.split(',').filter(|p| !p.is_empty()) {
                let name = pair.split_once('=').unwrap().0;
                if name != "le" {
                    entry.1.insert(name.to_string());
                }
            }
        }
        out
    }

    /// Every family the proxy can expose is in `docs/metrics.md` with its
    /// type and labels, and every documented family is exposed: a rename
    /// on either side fails here.
    #[tokio::test]
    async fn the_reference_and_the_registry_agree() {
        let config = Config::parse(
            "[[tokens]]\nname = \"a\"\ntier = \"personal\"\ntoken = \"rt-a\"\n",
            None,
            &|_| None,
        )
        .unwrap();
        let pool = Pool::new(&config.pool, &config.tokens, true, None);
        let token = pool.get("a").unwrap();
        // Everything a token can show: an access token, a quota, a change.
        token.set_access(AccessToken::new("bearer", Duration::from_secs(600)));
        token.learn_quota(Quota {
            limit: Some(100),
            remaining: Some(40),
            resets_at: Some(SystemTime::now() + Duration::from_secs(3600)),
            unlimited: false,
        });
        token.disable_manually();
        let metrics = Metrics::new();
        let cluster = metrics.cluster();
        // Families whose series appear on first use.
        cluster.refused(Refusal::Away);
        metrics.request_done(RequestOutcome::Success, Some("team"), Duration::ZERO);
        metrics.upstream_answer(Tier::Personal, http::StatusCode::OK, Duration::ZERO);
        metrics.token_failure(Tier::Personal, "a", Reason::Forbidden);
        metrics.refresh_done(Tier::Personal, RefreshOutcome::Success, Duration::ZERO);
        metrics.reload_result(true);
        let text = String::from_utf8(metrics.render(&pool)).unwrap();
        let exposed = exposed(&text);
        let documented = documented();
        let names = |m: &BTreeMap<String, _>| m.keys().cloned().collect::<BTreeSet<_>>();
        assert_eq!(
            names(&exposed),
            names(&documented),
            "left: exposed, right: documented"
        );
        for (name, (kind, labels)) in &exposed {
            let (doc_kind, doc_labels) = &documented[name];
            assert_eq!(kind, doc_kind, "{name}'s type");
            assert_eq!(labels, doc_labels, "{name}'s labels");
        }
        // Every value a documented list names is the only kind shown (the
        // dashboards and alerts match on them).
        let values = exposed_values(&text);
        let mut listed = documented_values();
        assert!(listed.len() >= 7, "{listed:?}");
        // And the lists of the reference's opening bullets: `tier`,
        // `state`, `reason` wherever they are labels, `outcome` of a
        // request and of a refresh.
        let doc = include_str!("../docs/metrics.md");
        let intro = doc.split("| family |").next().unwrap();
        for bullet in intro.split("\n- ").skip(1) {
            let words: Vec<&str> = bullet.split('`').skip(1).step_by(2).collect();
            let (label, rest) = words.split_first().unwrap();
            let mut allowed: BTreeSet<String> = rest.iter().map(|w| w.to_string()).collect();
            allowed.insert(String::new());
            let families: Vec<&str> = match *label {
                "outcome" if bullet.contains("of a request") => vec![
                    "tokenpool_requests_total",
                    "tokenpool_client_requests_total",
                ],
                "outcome" => vec!["tokenpool_refreshes_total"],
                _ => exposed.keys().map(String::as_str).collect(),
            };
            for family in families {
                if values.contains_key(&(family.to_string(), label.to_string())) {
                    listed.insert((family.to_string(), label.to_string()), allowed.clone());
                }
            }
        }
        assert!(listed.len() >= 20, "{listed:?}");
        for ((family, label), allowed) in &listed {
            let shown = values
                .get(&(family.clone(), label.clone()))
                .unwrap_or_else(|| panic!("{family} shows no {label}"));
            assert!(
                shown.is_subset(allowed),
                "{family}{{{label}}}: {shown:?} not all in {allowed:?}"
            );
        }
        assert!(!text.contains("rt-a") && !text.contains("bearer"));
    }
}
