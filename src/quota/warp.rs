//! Polling Warp's `GetRequestLimitInfo` (`[quota] provider = "warp"`): a
//! GraphQL query that reads an account's request quota without spending
//! any (`docs/warp.md`).
//!
//! Each token is polled every `[quota] interval` (each at its own moment,
//! spread by a random tenth of it), soon after a refresh and after a quota
//! 429; at most [`CONCURRENCY`] polls run at once, in the background, with
//! the token's current access token (a token without one waits for its
//! next refresh). A failed poll is tried again after 30 s, doubling up to
//! the interval. Polls never touch a request.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde_json::{json, Value};
use tokio::sync::Semaphore;
use tokio::time::Instant;

use crate::config::{Config, QuotaProvider};
use crate::metrics::Metrics;
use crate::pool::{Pool, Quota, Token};

/// Polls running at once.
pub const CONCURRENCY: usize = 4;
/// First wait after a failed poll; doubles up to the interval.
const RETRY: Duration = Duration::from_secs(30);
/// Largest answer read.
const MAX_ANSWER: usize = 64 * 1024;

/// The GraphQL query, as Warp's client sends it.
const QUERY: &str = "query GetRequestLimitInfo($requestContext: RequestContext!) { \
user(requestContext: $requestContext) { __typename ... on UserOutput { user { \
requestLimitInfo { isUnlimited nextRefreshTime requestLimit requestsUsedSinceLastRefresh \
requestLimitRefreshDuration } } } } }";

/// Why a poll did not give a quota.
#[derive(Debug, thiserror::Error)]
pub enum PollError {
    /// The endpoint could not be reached or timed out.
    #[error("the quota endpoint is unreachable ({0})")]
    Unreachable(&'static str),
    /// It answered with a status other than 200.
    #[error("the quota endpoint answered {0}")]
    Status(u16),
    /// It answered 200 with GraphQL errors or an unexpected document.
    #[error("the quota endpoint's answer is not a quota ({0})")]
    Answer(&'static str),
}

/// Reads a `GetRequestLimitInfo` answer.
pub fn parse_answer(body: &[u8]) -> Result<Quota, PollError> {
    let doc: Value = serde_json::from_slice(body).map_err(|_| PollError::Answer("not JSON"))?;
    if doc
        .get("errors")
        .and_then(Value::as_array)
        .is_some_and(|e| !e.is_empty())
    {
        return Err(PollError::Answer("GraphQL errors"));
    }
    let info = doc
        .pointer("/data/user/user/requestLimitInfo")
        .and_then(Value::as_object)
        .ok_or(PollError::Answer("no requestLimitInfo"))?;
    if info.get("isUnlimited").and_then(Value::as_bool) == Some(true) {
        return Ok(Quota {
            unlimited: true,
            ..Quota::default()
        });
    }
    let number = |name| {
        info.get(name)
            .and_then(Value::as_u64)
            .filter(|&n| n <= 1_000_000_000_000)
    };
    let limit = number("requestLimit").ok_or(PollError::Answer("no requestLimit"))?;
    let used = number("requestsUsedSinceLastRefresh")
        .ok_or(PollError::Answer("no requestsUsedSinceLastRefresh"))?;
    let now = SystemTime::now();
    let resets_at = info
        .get("nextRefreshTime")
        .and_then(Value::as_str)
        .and_then(super::rfc3339)
        .filter(|&t| {
            t.duration_since(now)
                .is_ok_and(|d| d <= crate::pool::token::MAX_QUOTA_REST)
        });
    Ok(Quota {
        limit: Some(limit),
        remaining: Some(limit.saturating_sub(used)),
        resets_at,
        unlimited: false,
    })
}

/// The request body: the query and the client's context, taken from the
/// client headers `[upstream] headers` sends.
fn body(config: &Config) -> Value {
    let header = |name: &str| {
        config
            .upstream
            .headers
            .iter()
            .find(|(n, _)| n.as_str() == name)
            .and_then(|(_, v)| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    };
    json!({
        "operationName": "GetRequestLimitInfo",
        "query": QUERY,
        "variables": {"requestContext": {
            "clientContext": {"version": header("x-warp-client-version")},
            "osContext": {
                "category": header("x-warp-os-category"),
                "name": header("x-warp-os-name"),
                "version": header("x-warp-os-version"),
            },
        }},
    })
}

/// Polls one token's quota.
async fn poll(
    client: &reqwest::Client,
    config: &Config,
    url: &str,
    token: &Token,
) -> Result<Option<Quota>, PollError> {
    let Some(access) = token.credentials().valid_access(Instant::now()) else {
        return Ok(None);
    };
    let Some(authorization) = access.authorization() else {
        return Ok(None);
    };
    let mut request = client
        .post(url)
        .header(http::header::AUTHORIZATION, authorization.clone())
        .header(http::header::CONTENT_TYPE, "application/json")
        .header(http::header::ACCEPT, "application/json");
    for (name, value) in &config.upstream.headers {
        request = request.header(name, value);
    }
    let body = serde_json::to_vec(&body(config)).expect("a JSON value serialises");
    let response = request.body(body).send().await.map_err(|e| {
        PollError::Unreachable(if e.is_timeout() {
            "timed out"
        } else {
            "cannot connect"
        })
    })?;
    let status = response.status().as_u16();
    if status != 200 {
        return Err(PollError::Status(status));
    }
    let mut answer = Vec::new();
    let mut response = response;
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|_| PollError::Unreachable("broken answer"))?
    {
        answer.extend_from_slice(&chunk);
        if answer.len() > MAX_ANSWER {
            return Err(PollError::Answer("too large"));
        }
    }
    parse_answer(&answer).map(Some)
}

/// Where one token's polling stands.
#[derive(Debug, Clone, Copy)]
struct Due {
    /// When it is next due.
    at: Instant,
    /// Polls failed in a row (its backoff).
    failures: u32,
    /// A poll of it is under way.
    polling: bool,
}

/// Each token's [`Due`], by its address (a token carried over a reload is
/// the same `Arc`).
type Schedule = Arc<Mutex<HashMap<usize, Due>>>;

/// The client polls go through: the upstream's extra roots
/// (`[upstream] ca_file`) beside the built-in ones, as the quota endpoint
/// is usually on the upstream's host.
fn client(
    roots: &[rustls::pki_types::CertificateDer<'static>],
) -> reqwest::Result<reqwest::Client> {
    let mut builder = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .redirect(reqwest::redirect::Policy::none());
    for root in roots {
        builder = builder.add_root_certificate(reqwest::Certificate::from_der(root)?);
    }
    builder.build()
}

fn key(token: &Arc<Token>) -> usize {
    Arc::as_ptr(token) as usize
}

/// A random part of `d`, to spread polls over time.
fn spread(d: Duration, part: f64) -> Duration {
    d.mul_f64(fastrand::f64() * part)
}

/// Starts the poller: once a second it looks at the current generation
/// (through `current`) and polls what is due. Does nothing while `[quota]
/// provider` is not `warp` (a reload may set it).
pub fn spawn_poller<F>(current: F, metrics: Arc<Metrics>) -> tokio::task::JoinHandle<()>
where
    F: Fn() -> (Arc<Config>, Arc<Pool>) + Send + 'static,
{
    tokio::spawn(async move {
        // Built for the first generation that polls, again when its roots change.
        let mut built: Option<(
            Vec<rustls::pki_types::CertificateDer<'static>>,
            reqwest::Client,
        )> = None;
        let limit = Arc::new(Semaphore::new(CONCURRENCY));
        let schedule: Schedule = Arc::default();
        let failing = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_pool: Option<Arc<Pool>> = None;
        loop {
            tick.tick().await;
            let (config, pool) = current();
            let (QuotaProvider::Warp, Some(url)) =
                (config.quota.provider, config.quota.url.clone())
            else {
                continue;
            };
            let roots = &config.upstream.ca_certs;
            if built.as_ref().is_none_or(|(r, _)| r != roots) {
                match client(roots) {
                    Ok(c) => built = Some((roots.clone(), c)),
                    Err(e) => {
                        tracing::error!(error = %e, "cannot build the quota client; quotas are not polled");
                        built = None;
                        continue;
                    }
                }
            }
            let Some((_, client)) = &built else {
                continue;
            };
            let interval = config.quota.interval;
            let now = Instant::now();
            if !last_pool.as_ref().is_some_and(|p| Arc::ptr_eq(p, &pool)) {
                // A reload: forget tokens that left; new ones start soon,
                // spread over a minute.
                let mut s = schedule.lock().unwrap_or_else(|e| e.into_inner());
                let present: std::collections::HashSet<usize> =
                    pool.tokens().iter().map(key).collect();
                s.retain(|k, _| present.contains(k));
                for token in pool.tokens() {
                    s.entry(key(token)).or_insert_with(|| Due {
                        at: now + spread(interval.min(Duration::from_secs(60)), 1.0),
                        failures: 0,
                        polling: false,
                    });
                }
                last_pool = Some(Arc::clone(&pool));
            }
            // Due, or asked for (after a refresh or a quota 429).
            let due: Vec<&Arc<Token>> = {
                let s = schedule.lock().unwrap_or_else(|e| e.into_inner());
                pool.tokens()
                    .iter()
                    .filter(|t| {
                        // A wish for a poll waits out a failing endpoint's
                        // backoff, and is met by a poll under way.
                        let wanted = t.take_quota_poll();
                        let go = s.get(&key(t)).is_none_or(|d| {
                            !d.polling && (d.at <= now || (wanted && d.failures == 0))
                        });
                        go && !t.is_out_for_good()
                    })
                    .collect()
            };
            for (i, token) in due.iter().enumerate() {
                let Ok(permit) = Arc::clone(&limit).try_acquire_owned() else {
                    // The rest waits for the next tick.
                    for t in &due[i..] {
                        t.want_quota_poll();
                    }
                    break;
                };
                let (client, config, url) = (client.clone(), Arc::clone(&config), url.clone());
                let (token, schedule) = (Arc::clone(token), Arc::clone(&schedule));
                let (metrics, failing) = (Arc::clone(&metrics), Arc::clone(&failing));
                // Not due again until this poll ends and sets it.
                let failures = {
                    let mut s = schedule.lock().unwrap_or_else(|e| e.into_inner());
                    let due = s.entry(key(&token)).or_insert(Due {
                        at: now,
                        failures: 0,
                        polling: false,
                    });
                    due.polling = true;
                    due.failures
                };
                tokio::spawn(async move {
                    let result = poll(&client, &config, &url, &token).await;
                    drop(permit);
                    let next = match result {
                        Ok(Some(quota)) => {
                            metrics.quota_poll(true);
                            token.learn_quota(quota);
                            if failing.swap(false, std::sync::atomic::Ordering::Relaxed) {
                                tracing::info!("the quota endpoint answers again");
                            }
                            (Instant::now() + interval - spread(interval, 0.1), 0)
                        }
                        // No access token yet: after the next refresh (which asks).
                        Ok(None) => (Instant::now() + interval, failures),
                        Err(e) => {
                            metrics.quota_poll(false);
                            if !failing.swap(true, std::sync::atomic::Ordering::Relaxed) {
                                tracing::warn!(token = token.name(), error = %e, "quota poll failed; backing off");
                            } else {
                                tracing::debug!(token = token.name(), error = %e, "quota poll failed");
                            }
                            let wait = RETRY
                                .checked_mul(1 << failures.min(16))
                                .unwrap_or(interval)
                                .min(interval);
                            (Instant::now() + wait + spread(wait, 0.1), failures + 1)
                        }
                    };
                    // A token a reload removed meanwhile is not put back.
                    if let Some(due) = schedule
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .get_mut(&key(&token))
                    {
                        (due.at, due.failures, due.polling) = (next.0, next.1, false);
                    }
                });
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_read_and_nonsense_refused() {
        let q = parse_answer(
            br#"{"data":{"user":{"__typename":"UserOutput","user":{"requestLimitInfo":
            {"isUnlimited":false,"requestLimit":150,"requestsUsedSinceLastRefresh":12,
             "nextRefreshTime":"2099-01-01T00:00:00.000Z","requestLimitRefreshDuration":"MONTHLY"}}}}}"#,
        )
        .unwrap();
        // A refill decades away is no refill time.
        assert_eq!(
            (q.limit, q.remaining, q.resets_at),
            (Some(150), Some(138), None)
        );
        let soon = humantime::format_rfc3339_millis(SystemTime::now() + Duration::from_secs(86400));
        let q = parse_answer(
            format!(
                r#"{{"data":{{"user":{{"user":{{"requestLimitInfo":{{"isUnlimited":false,
                "requestLimit":150,"requestsUsedSinceLastRefresh":151,"nextRefreshTime":"{soon}"}}}}}}}}}}"#
            )
            .as_bytes(),
        )
        .unwrap();
        assert_eq!(q.remaining, Some(0), "used past the limit");
        assert!(q.resets_at.is_some());
        let q = parse_answer(
            br#"{"data":{"user":{"user":{"requestLimitInfo":{"isUnlimited":true,"nextRefreshTime":null}}}}}"#,
        )
        .unwrap();
        assert!(q.unlimited);
        // A refill in the year 9999, or a date that is none: no refill time.
        for when in ["9999-12-31T23:59:59.000Z", "NaN", "1e300", "-1"] {
            let q = parse_answer(
                format!(
                    r#"{{"data":{{"user":{{"user":{{"requestLimitInfo":{{"isUnlimited":false,
                    "requestLimit":150,"requestsUsedSinceLastRefresh":150,"nextRefreshTime":"{when}"}}}}}}}}}}"#
                )
                .as_bytes(),
            )
            .unwrap();
            assert_eq!((q.remaining, q.resets_at), (Some(0), None), "{when}");
        }
        for bad in [
            &br#"{"errors":[{"message":"Unauthorized"}],"data":null}"#[..],
            br#"{"data":{"user":{"requestLimitInfo":{"requestLimit":1}}}}"#,
            br#"{"data":{"user":{"user":{"requestLimitInfo":{"requestLimit":-1,"requestsUsedSinceLastRefresh":0}}}}}"#,
            br#"{"data":{"user":{"user":{"requestLimitInfo":{"requestLimit":"150","requestsUsedSinceLastRefresh":0}}}}}"#,
            // Numbers no quota has: 10^40, 1e300, fractions, negatives, NaN.
            br#"{"data":{"user":{"user":{"requestLimitInfo":{"requestLimit":10000000000000000000000000000000000000000,"requestsUsedSinceLastRefresh":0}}}}}"#,
            br#"{"data":{"user":{"user":{"requestLimitInfo":{"requestLimit":1e300,"requestsUsedSinceLastRefresh":0}}}}}"#,
            br#"{"data":{"user":{"user":{"requestLimitInfo":{"requestLimit":150,"requestsUsedSinceLastRefresh":-3}}}}}"#,
            br#"{"data":{"user":{"user":{"requestLimitInfo":{"requestLimit":150,"requestsUsedSinceLastRefresh":1.5}}}}}"#,
            br#"{"data":{"user":{"user":{"requestLimitInfo":{"requestLimit":"NaN","requestsUsedSinceLastRefresh":0}}}}}"#,
            b"<html>",
            b"",
        ] {
            assert!(parse_answer(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
    }
}
