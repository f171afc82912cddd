//! The refresh providers (`docs/configuration.md`): how a refresh call is made and how
//! its answer is read. The parsing functions are pure, so they are unit
//! tested and fuzzed without a network.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;

use crate::config::Secret;

/// Access-token lifetime when neither a JWT `exp` nor `expires_in` says.
pub const DEFAULT_TTL: Duration = Duration::from_secs(3600);
/// Longest lifetime believed of a refreshed access token, whatever the
/// answer or its JWT says: an absurd one (`expires_in` of 10^40, an `exp`
/// in the year 5000) would otherwise never be refreshed again.
pub const MAX_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

/// Codes in a refresh endpoint's error that mean the refresh token itself
/// is dead (`docs/tokens.md`).
const REVOKED_CODES: [&str; 5] = [
    "invalid_grant",
    "INVALID_REFRESH_TOKEN",
    "TOKEN_EXPIRED",
    "USER_DISABLED",
    "USER_NOT_FOUND",
];

/// What a successful refresh gave.
#[derive(Debug)]
pub struct Grant {
    /// The bearer to send upstream.
    pub bearer: Secret,
    /// How long it is valid from now.
    pub ttl: Duration,
    /// A new refresh token, when the endpoint rotated it.
    pub rotated: Option<Secret>,
}

/// Why a refresh call did not give an access token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RefreshError {
    /// The refresh token was rejected (one of the revocation codes).
    #[error("refresh token rejected ({code})")]
    Revoked {
        /// The code the endpoint gave (one of a fixed list: no secret).
        code: &'static str,
    },
    /// The endpoint refused the call for another reason (a 4xx).
    #[error("refresh endpoint refused the call (HTTP {status})")]
    Rejected {
        /// The HTTP status.
        status: u16,
    },
    /// The endpoint answered 429.
    #[error("refresh endpoint rate-limited us")]
    RateLimited {
        /// Its Retry-After.
        retry_after: Option<Duration>,
    },
    /// Unreachable, timed out, 5xx, or an answer that makes no sense: not
    /// the token's fault.
    #[error("refresh endpoint unavailable: {detail}")]
    Unavailable {
        /// What happened, without secrets.
        detail: String,
    },
}

/// Reads a successful (2xx) refresh answer.
pub fn parse_grant(body: &[u8], now: SystemTime) -> Result<Grant, RefreshError> {
    let garbage = |what: &str| RefreshError::Unavailable {
        detail: format!("unusable refresh answer: {what}"),
    };
    let value: serde_json::Value = serde_json::from_slice(body).map_err(|_| garbage("not JSON"))?;
    let obj = value
        .as_object()
        .ok_or_else(|| garbage("not a JSON object"))?;
    // Warp's answer carries both; the JWT in `id_token` is the bearer.
    let bearer = ["id_token", "access_token"]
        .iter()
        .find_map(|k| obj.get(*k).and_then(|v| v.as_str()))
        .filter(|s| !s.is_empty())
        .ok_or_else(|| garbage("no id_token or access_token"))?;
    if bearer.bytes().any(|b| !(0x21..=0x7e).contains(&b)) {
        return Err(garbage("the bearer has characters a header cannot carry"));
    }
    let expires_in = match obj.get("expires_in") {
        Some(serde_json::Value::Number(n)) => n.as_f64().map(|f| f.max(0.0) as u64),
        Some(serde_json::Value::String(s)) => s.trim().parse::<u64>().ok(),
        _ => None,
    };
    let ttl = match jwt_expiry(bearer) {
        Some(exp) => exp
            .duration_since(now)
            .map_err(|_| garbage("the JWT has already expired"))?,
        None => expires_in.map_or(DEFAULT_TTL, Duration::from_secs),
    }
    .min(MAX_TTL);
    if ttl.is_zero() {
        return Err(garbage("the access token has no lifetime"));
    }
    // A rotated refresh token replaces the one presented: one that is
    // there but cannot be used (not a string, padded) is an answer that
    // makes no sense, not "no rotation" — the endpoint may have retired
    // the token presented.
    let rotated = match obj.get("refresh_token") {
        None | Some(serde_json::Value::Null) => None,
        Some(serde_json::Value::String(s)) if s.is_empty() => None,
        Some(serde_json::Value::String(s)) if s.trim() == s => Some(Secret::new(s.as_str())),
        Some(_) => return Err(garbage("the refresh_token in the answer is not usable")),
    };
    Ok(Grant {
        bearer: Secret::new(bearer),
        ttl,
        rotated,
    })
}

/// The `exp` claim of a JWT, read without verifying the signature; `None`
/// when `token` is not a JWT or has no usable `exp`.
pub fn jwt_expiry(token: &str) -> Option<SystemTime> {
    let mut parts = token.split('.');
    let (_header, payload, _sig) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    let payload = payload.trim_end_matches('=');
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    let exp = claims.get("exp")?.as_f64()?;
    // Below one second the claim truncates to the epoch itself (found by
    // fuzzing: `"exp": 0.99999999`); past 1e11 it is not a date.
    if !exp.is_finite() || !(1.0..=1e11).contains(&exp) {
        return None;
    }
    Some(UNIX_EPOCH + Duration::from_secs(exp as u64))
}

/// Reads a failed refresh answer.
pub fn classify_failure(status: u16, body: &[u8], retry_after: Option<Duration>) -> RefreshError {
    if status == 429 {
        return RefreshError::RateLimited { retry_after };
    }
    if status >= 500 {
        return RefreshError::Unavailable {
            detail: format!("HTTP {status}"),
        };
    }
    if let Some(code) = revocation_code(body) {
        return RefreshError::Revoked { code };
    }
    RefreshError::Rejected { status }
}

/// The revocation code an error body names, if any. Matching a fixed list
/// means what we keep and log is never text the endpoint chose.
fn revocation_code(body: &[u8]) -> Option<&'static str> {
    let text = String::from_utf8_lossy(&body[..body.len().min(16 * 1024)]);
    REVOKED_CODES
        .iter()
        .copied()
        .find(|code| text.contains(code))
}

/// Parses a `Retry-After` value in seconds (the HTTP-date form is rare
/// from APIs and is treated as absent).
pub fn parse_retry_after(value: &str) -> Option<Duration> {
    value.trim().parse::<u64>().ok().map(Duration::from_secs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jwt(exp: u64) -> String {
        let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        format!(
            "{}.{}.sig",
            b64(r#"{"alg":"RS256"}"#),
            b64(&format!(r#"{{"exp":{exp},"sub":"u"}}"#))
        )
    }

    #[test]
    fn expiry_comes_from_jwt_then_expires_in_then_default() {
        let now = UNIX_EPOCH + Duration::from_secs(1_000_000);
        let cases: Vec<(String, Duration)> = vec![
            (
                format!(r#"{{"id_token":"{}","expires_in":"99"}}"#, jwt(1_000_600)),
                Duration::from_secs(600),
            ),
            (
                r#"{"access_token":"opaque","expires_in":"3600"}"#.into(),
                Duration::from_secs(3600),
            ),
            (
                r#"{"access_token":"opaque","expires_in":120}"#.into(),
                Duration::from_secs(120),
            ),
            (r#"{"access_token":"opaque"}"#.into(), DEFAULT_TTL),
            (
                r#"{"access_token":"a.b.c","expires_in":"7"}"#.into(),
                Duration::from_secs(7),
            ),
        ];
        for (body, want) in cases {
            let g = parse_grant(body.as_bytes(), now).unwrap();
            assert_eq!(g.ttl, want, "{body}");
        }
    }

    #[test]
    fn absurd_lifetimes_are_bounded_and_never_panic() {
        let now = UNIX_EPOCH + Duration::from_secs(1_000_000);
        for body in [
            r#"{"access_token":"opaque","expires_in":1e40}"#.to_string(),
            r#"{"access_token":"opaque","expires_in":1e300}"#.to_string(),
            r#"{"access_token":"opaque","expires_in":"99999999999999999999"}"#.to_string(),
            r#"{"access_token":"opaque","expires_in":18446744073709551615}"#.to_string(),
            // An exp in the year 5138.
            format!(r#"{{"id_token":"{}"}}"#, jwt(100_000_000_000)),
        ] {
            let grant = parse_grant(body.as_bytes(), now);
            if let Ok(g) = &grant {
                assert!(g.ttl <= MAX_TTL, "{body}: {:?}", g.ttl);
                // And the access token built from it stands.
                let access = crate::pool::AccessToken::new(g.bearer.expose(), g.ttl);
                assert_eq!(access.lifetime, g.ttl);
            }
        }
        for body in [
            r#"{"access_token":"opaque","expires_in":-5}"#,
            r#"{"access_token":"opaque","expires_in":0}"#,
        ] {
            assert!(parse_grant(body.as_bytes(), now).is_err(), "{body}");
        }
        // Absurd lifetimes handed straight to an access token are bounded
        // too (a ten-year static bearer is not).
        let access = crate::pool::AccessToken::new("x", Duration::MAX);
        assert_eq!(access.lifetime, crate::pool::AccessToken::MAX_LIFETIME);
        let far = UNIX_EPOCH + Duration::from_secs(253_402_300_799); // 9999-12-31
        let access = crate::pool::AccessToken::until("x", far, Duration::MAX);
        assert_eq!(access.lifetime, crate::pool::AccessToken::MAX_LIFETIME);
    }

    #[test]
    fn absurd_retry_afters_are_absent_or_bounded_where_used() {
        for value in [
            "-1",
            "1e300",
            "NaN",
            "10000000000000000000000000000000000000000",
            "Fri, 31 Dec 9999 23:59:59 GMT",
            "",
        ] {
            assert_eq!(parse_retry_after(value), None, "{value}");
        }
        // The largest that parses is bounded by whoever waits: a token's
        // rest by max_cooldown.
        let huge = parse_retry_after("18446744073709551615").unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        let _time = runtime.enter();
        let config = crate::config::Config::parse(
            "[[tokens]]\nname = \"a\"\ntier = \"personal\"\ntoken = \"rt-a\"\n",
            None,
            &|_| None,
        )
        .unwrap();
        let pool = crate::pool::Pool::new(&config.pool, &config.tokens, true, None);
        let token = pool.get("a").unwrap();
        let settings = pool.settings();
        token.report(crate::pool::Outcome::RateLimited(Some(huge)), settings);
        let back = token.snapshot().cooldown_until.unwrap();
        let rest = back.duration_since(SystemTime::now()).unwrap_or_default();
        assert!(rest <= settings.max_cooldown, "{rest:?}");
    }

    #[test]
    fn id_token_wins_and_rotation_is_read() {
        let now = UNIX_EPOCH;
        let g = parse_grant(
            br#"{"access_token":"acc","id_token":"idt","refresh_token":"new-rt","expires_in":"60"}"#,
            now,
        )
        .unwrap();
        assert_eq!(g.bearer.expose(), "idt");
        assert_eq!(g.rotated.unwrap().expose(), "new-rt");
    }

    #[test]
    fn garbage_is_unavailable_not_a_token_fault() {
        let now = UNIX_EPOCH + Duration::from_secs(2_000_000);
        for body in [
            &b"<html>"[..],
            b"[]",
            b"{}",
            br#"{"access_token":""}"#,
            br#"{"access_token":"has space"}"#,
        ] {
            assert!(matches!(
                parse_grant(body, now),
                Err(RefreshError::Unavailable { .. })
            ));
        }
        let expired = format!(r#"{{"id_token":"{}"}}"#, jwt(1_000_000));
        assert!(matches!(
            parse_grant(expired.as_bytes(), now),
            Err(RefreshError::Unavailable { .. })
        ));
    }

    #[test]
    fn failures_are_classified() {
        let cases: Vec<(u16, &str, RefreshError)> = vec![
            (
                400,
                r#"{"error":{"code":400,"message":"INVALID_REFRESH_TOKEN"}}"#,
                RefreshError::Revoked {
                    code: "INVALID_REFRESH_TOKEN",
                },
            ),
            (
                400,
                r#"{"error":{"message":"TOKEN_EXPIRED"}}"#,
                RefreshError::Revoked {
                    code: "TOKEN_EXPIRED",
                },
            ),
            (
                400,
                r#"{"error":"invalid_grant"}"#,
                RefreshError::Revoked {
                    code: "invalid_grant",
                },
            ),
            (
                403,
                "USER_DISABLED",
                RefreshError::Revoked {
                    code: "USER_DISABLED",
                },
            ),
            (
                400,
                "USER_NOT_FOUND",
                RefreshError::Revoked {
                    code: "USER_NOT_FOUND",
                },
            ),
            (
                400,
                r#"{"error":"invalid_request"}"#,
                RefreshError::Rejected { status: 400 },
            ),
            (429, "", RefreshError::RateLimited { retry_after: None }),
            (
                503,
                "",
                RefreshError::Unavailable {
                    detail: "HTTP 503".into(),
                },
            ),
        ];
        for (status, body, want) in cases {
            assert_eq!(
                classify_failure(status, body.as_bytes(), None),
                want,
                "{status} {body}"
            );
        }
    }

    #[test]
    fn jwt_expiry_rejects_non_jwts() {
        assert_eq!(jwt_expiry("abc"), None);
        assert_eq!(jwt_expiry("a.b"), None);
        assert_eq!(jwt_expiry("a.b.c.d"), None);
        assert_eq!(jwt_expiry("a.!!!.c"), None);
        assert_eq!(
            jwt_expiry(&jwt(5)),
            Some(UNIX_EPOCH + Duration::from_secs(5))
        );
        // Fuzzing regression: a fractional exp below one second truncated
        // to the epoch itself.
        assert_eq!(jwt_expiry(".eyJleHAiOjAuOTk5OTk5OTl9."), None);
    }
}
