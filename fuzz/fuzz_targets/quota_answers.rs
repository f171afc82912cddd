//! Quota reports from outside — rate-limit headers of every family and
//! Warp's GraphQL answer — are read without panicking, with any numbers
//! (10^40, negative, NaN, the year 9999), and what is read can be applied
//! to a token: its rest is never longer than the longest quota rest.
#![no_main]

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::{HeaderMap, HeaderName, HeaderValue};
use libfuzzer_sys::fuzz_target;
use tokenpool::config::Config;
use tokenpool::pool::token::MAX_QUOTA_REST;
use tokenpool::pool::Pool;

const NAMES: [&str; 9] = [
    "x-ratelimit-limit-requests",
    "x-ratelimit-remaining-requests",
    "x-ratelimit-reset-requests",
    "anthropic-ratelimit-requests-limit",
    "anthropic-ratelimit-requests-remaining",
    "anthropic-ratelimit-requests-reset",
    "ratelimit-limit",
    "ratelimit-remaining",
    "ratelimit-reset",
];

fuzz_target!(|data: &[u8]| {
    let now = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
    // Headers: the input split on newlines, each line `<n>:<value>` names
    // one of the families' headers by its first byte.
    let mut headers = HeaderMap::new();
    for line in data.split(|&b| b == b'\n') {
        let Some((&which, value)) = line.split_first() else {
            continue;
        };
        let name = HeaderName::from_static(NAMES[usize::from(which) % NAMES.len()]);
        if let Ok(value) = HeaderValue::from_bytes(value) {
            headers.append(name, value);
        }
    }
    let config = Config::parse(
        "[[tokens]]\nname = \"a\"\ntier = \"personal\"\ntoken = \"rt-a\"\n",
        None,
        &|_| None,
    )
    .unwrap();
    let pool = Pool::new(&config.pool, &config.tokens, true, None);
    let token = pool.get("a").unwrap();
    for quota in [
        tokenpool::quota::from_headers(&headers, now),
        tokenpool::quota::warp::parse_answer(data).ok(),
    ]
    .into_iter()
    .flatten()
    {
        token.learn_quota(quota);
        let snapshot = token.snapshot();
        if let Some(back) = snapshot.cooldown_until {
            let rest = back
                .duration_since(SystemTime::now())
                .unwrap_or_default();
            assert!(rest <= MAX_QUOTA_REST + Duration::from_secs(1), "{rest:?}");
        }
    }
});
