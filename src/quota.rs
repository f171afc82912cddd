//! Request quotas, as upstreams tell them: read from every answer's
//! headers ([`from_headers`]), and polled from a quota endpoint (Warp's
//! `GetRequestLimitInfo`, [`warp`]). What a token does with them — rest
//! until the refill at none left, rank by what is left — is the pool's.
//!
//! Three header families are read, the first one present winning:
//!
//! | family | limit | remaining | reset |
//! |---|---|---|---|
//! | OpenAI | `x-ratelimit-limit-requests` | `x-ratelimit-remaining-requests` | `x-ratelimit-reset-requests`: a duration, `6m0s`, `1.5s`, `20ms` |
//! | Anthropic | `anthropic-ratelimit-requests-limit` | `…-remaining` | `…-reset`: RFC 3339 |
//! | IETF | `RateLimit-Limit` | `RateLimit-Remaining` | `RateLimit-Reset`: seconds |
//!
//! A value that is not a plain count (negative, fractional, text, past
//! 10^12), a reset in the past or further than 40 days away, is ignored,
//! field by field; without a remaining count nothing is learned.

pub mod warp;

use std::time::{Duration, SystemTime};

use http::header::HeaderName;
use http::HeaderMap;

use crate::pool::token::MAX_QUOTA_REST;
use crate::pool::Quota;

/// The largest count believed: no upstream counts requests in trillions.
const MAX_COUNT: u64 = 1_000_000_000_000;

/// How a family writes its reset time.
#[derive(Clone, Copy)]
enum Reset {
    /// A duration from now in Go's notation (`6m0s`).
    GoDuration,
    /// An RFC 3339 time.
    Rfc3339,
    /// Seconds from now.
    Seconds,
}

/// A header family: `(limit, remaining, reset)` names and the reset's form.
struct Family {
    limit: HeaderName,
    remaining: HeaderName,
    reset: HeaderName,
    form: Reset,
}

/// The three families, first present wins.
static FAMILIES: [Family; 3] = [
    Family {
        limit: HeaderName::from_static("x-ratelimit-limit-requests"),
        remaining: HeaderName::from_static("x-ratelimit-remaining-requests"),
        reset: HeaderName::from_static("x-ratelimit-reset-requests"),
        form: Reset::GoDuration,
    },
    Family {
        limit: HeaderName::from_static("anthropic-ratelimit-requests-limit"),
        remaining: HeaderName::from_static("anthropic-ratelimit-requests-remaining"),
        reset: HeaderName::from_static("anthropic-ratelimit-requests-reset"),
        form: Reset::Rfc3339,
    },
    Family {
        limit: HeaderName::from_static("ratelimit-limit"),
        remaining: HeaderName::from_static("ratelimit-remaining"),
        reset: HeaderName::from_static("ratelimit-reset"),
        form: Reset::Seconds,
    },
];

/// The quota an answer's headers report, if they report one.
pub fn from_headers(headers: &HeaderMap, now: SystemTime) -> Option<Quota> {
    // One look at each name the answer has (most have none of these),
    // rather than three hashed lookups.
    let families = &FAMILIES;
    if !headers
        .keys()
        .any(|k| families.iter().any(|f| f.remaining == k))
    {
        return None;
    }
    families.iter().find_map(|f| {
        let remaining = count(headers.get(&f.remaining)?.to_str().ok()?)?;
        let limit = headers
            .get(&f.limit)
            .and_then(|v| v.to_str().ok())
            .and_then(count);
        let resets_at = headers
            .get(&f.reset)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| reset_time(v, f.form, now));
        Some(Quota {
            limit,
            // More left than allowed cannot be: believe the limit.
            remaining: Some(limit.map_or(remaining, |l| remaining.min(l))),
            resets_at,
            unlimited: false,
        })
    })
}

/// A plain count: ASCII digits only, at most [`MAX_COUNT`].
fn count(value: &str) -> Option<u64> {
    let v = value.trim();
    if v.is_empty() || v.len() > 13 || !v.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    v.parse().ok().filter(|&n| n <= MAX_COUNT)
}

/// A reset time in `form`, if it is ahead of `now` and within the longest
/// quota rest.
fn reset_time(value: &str, form: Reset, now: SystemTime) -> Option<SystemTime> {
    let at = match form {
        Reset::GoDuration => now.checked_add(go_duration(value.trim())?)?,
        Reset::Seconds => now.checked_add(Duration::from_secs(count(value)?))?,
        Reset::Rfc3339 => rfc3339(value.trim())?,
    };
    let ahead = at.duration_since(now).ok()?;
    (!ahead.is_zero() && ahead <= MAX_QUOTA_REST).then_some(at)
}

/// An RFC 3339 time, `Z` or a numeric offset.
pub(crate) fn rfc3339(value: &str) -> Option<SystemTime> {
    if let Ok(t) = humantime::parse_rfc3339(value) {
        return Some(t);
    }
    // humantime takes `Z` only: apply an offset by hand.
    let (stamp, sign, offset) = match value.len().checked_sub(6) {
        Some(i) if value.is_char_boundary(i) => {
            let (stamp, offset) = value.split_at(i);
            let sign = match offset.as_bytes()[0] {
                b'+' => 1i64,
                b'-' => -1,
                _ => return None,
            };
            (stamp, sign, &offset[1..])
        }
        _ => return None,
    };
    let (h, m) = offset.split_once(':')?;
    let minutes = count(h)?.checked_mul(60)?.checked_add(count(m)?)?;
    if minutes >= 24 * 60 {
        return None;
    }
    let utc = humantime::parse_rfc3339(&format!("{stamp}Z")).ok()?;
    let shift = Duration::from_secs(minutes * 60);
    if sign > 0 {
        utc.checked_sub(shift)
    } else {
        utc.checked_add(shift)
    }
}

/// A duration in Go's notation: `1h2m3.5s`, `6m0s`, `20ms`, `0s`.
fn go_duration(value: &str) -> Option<Duration> {
    if value.is_empty() || value.len() > 32 {
        return None;
    }
    let mut total = 0f64;
    let mut rest = value;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .filter(|&i| i > 0)?;
        let number: f64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let seconds = match &rest[..unit_len] {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 0.001,
            "us" | "µs" => 0.000_001,
            _ => return None,
        };
        total += number * seconds;
        rest = &rest[unit_len..];
    }
    (total.is_finite() && total <= MAX_QUOTA_REST.as_secs_f64())
        .then(|| Duration::from_secs_f64(total))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        h
    }

    #[test]
    fn each_family_is_read() {
        let now = humantime::parse_rfc3339("2026-11-30T10:00:00Z").unwrap();
        let openai = from_headers(
            &headers(&[
                ("x-ratelimit-limit-requests", "500"),
                ("x-ratelimit-remaining-requests", "499"),
                ("x-ratelimit-reset-requests", "6m0s"),
            ]),
            now,
        )
        .unwrap();
        assert_eq!((openai.limit, openai.remaining), (Some(500), Some(499)));
        assert_eq!(openai.resets_at, Some(now + Duration::from_secs(360)));

        let anthropic = from_headers(
            &headers(&[
                ("anthropic-ratelimit-requests-limit", "50"),
                ("anthropic-ratelimit-requests-remaining", "0"),
                ("anthropic-ratelimit-requests-reset", "2026-11-30T10:00:30Z"),
            ]),
            now,
        )
        .unwrap();
        assert_eq!((anthropic.limit, anthropic.remaining), (Some(50), Some(0)));
        assert_eq!(anthropic.resets_at, Some(now + Duration::from_secs(30)));

        let ietf = from_headers(
            &headers(&[
                ("RateLimit-Limit", "100"),
                ("RateLimit-Remaining", "7"),
                ("RateLimit-Reset", "60"),
            ]),
            now,
        )
        .unwrap();
        assert_eq!((ietf.limit, ietf.remaining), (Some(100), Some(7)));
        assert_eq!(ietf.resets_at, Some(now + Duration::from_secs(60)));

        assert_eq!(from_headers(&headers(&[("x-other", "1")]), now), None);
        // Only a limit: nothing to learn.
        assert_eq!(
            from_headers(&headers(&[("ratelimit-limit", "100")]), now),
            None
        );
    }

    #[test]
    fn malformed_values_are_ignored_field_by_field() {
        let now = humantime::parse_rfc3339("2026-11-30T10:00:00Z").unwrap();
        for remaining in [
            "-1",
            "1.5",
            "lots",
            "",
            "99999999999999999999",
            "1e3",
            "+3",
            "1e300",
            "NaN",
            "10000000000000000000000000000000000000000",
        ] {
            let h = headers(&[("ratelimit-remaining", remaining)]);
            assert_eq!(from_headers(&h, now), None, "remaining {remaining:?}");
        }
        for (reset, form) in [
            ("-5", "ietf"),
            ("999999999999", "ietf"),
            ("2026-11-30T09:00:00Z", "anthropic"),
            ("2031-01-01T00:00:00Z", "anthropic"),
            ("yesterday", "anthropic"),
            ("-6m", "openai"),
            ("6x", "openai"),
            ("9999999h", "openai"),
            ("10000000000000000000000000000000000000000", "ietf"),
            ("1e300", "ietf"),
            ("NaN", "ietf"),
            ("9999-12-31T23:59:59Z", "anthropic"),
            ("1e300s", "openai"),
            ("s", "openai"),
            ("0s", "openai"),
        ] {
            let names = match form {
                "ietf" => ("ratelimit-remaining", "ratelimit-reset"),
                "anthropic" => (
                    "anthropic-ratelimit-requests-remaining",
                    "anthropic-ratelimit-requests-reset",
                ),
                _ => (
                    "x-ratelimit-remaining-requests",
                    "x-ratelimit-reset-requests",
                ),
            };
            let q = from_headers(&headers(&[(names.0, "3"), (names.1, reset)]), now).unwrap();
            assert_eq!(q.remaining, Some(3));
            assert_eq!(q.resets_at, None, "reset {reset:?} of {form}");
        }
        // More left than the limit: the limit.
        let q = from_headers(
            &headers(&[("ratelimit-limit", "10"), ("ratelimit-remaining", "50")]),
            now,
        )
        .unwrap();
        assert_eq!(q.remaining, Some(10));
    }

    #[test]
    fn go_durations_and_offsets() {
        assert_eq!(
            go_duration("1h2m3.5s"),
            Some(Duration::from_millis(3_723_500))
        );
        assert_eq!(go_duration("20ms"), Some(Duration::from_millis(20)));
        assert_eq!(go_duration("1.5s"), Some(Duration::from_millis(1500)));
        assert_eq!(go_duration("6m0s"), Some(Duration::from_secs(360)));
        for bad in ["", "h", "1", "1d", "1..5s", "-1s", "1s2"] {
            assert_eq!(go_duration(bad), None, "{bad:?}");
        }
        let utc = humantime::parse_rfc3339("2026-11-30T10:00:00Z").unwrap();
        assert_eq!(rfc3339("2026-11-30T12:00:00+02:00"), Some(utc));
        assert_eq!(rfc3339("2026-11-30T05:30:00-04:30"), Some(utc));
        assert_eq!(rfc3339("2026-11-30T10:00:00.000Z"), Some(utc));
        assert_eq!(rfc3339("2026-11-30T12:00:00+99:00"), None);
        assert_eq!(rfc3339("2026-11-30"), None);
    }
}
