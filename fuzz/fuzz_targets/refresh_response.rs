//! Refresh answers of any shape and status are classified without panicking;
//! a grant always has a usable bearer and a bounded lifetime, and the
//! access token built from it stands (no time arithmetic overflows).
#![no_main]

use std::time::{Duration, UNIX_EPOCH};

use libfuzzer_sys::fuzz_target;
use tokenpool::pool::AccessToken;
use tokenpool::refresh::provider::{classify_failure, parse_grant, MAX_TTL};

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let status = u16::from_be_bytes([data[0], data[1]]) % 600;
    let body = &data[2..];
    let now = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
    if let Ok(grant) = parse_grant(body, now) {
        assert!(!grant.ttl.is_zero());
        assert!(grant.ttl <= MAX_TTL);
        let access = AccessToken::new(grant.bearer.expose(), grant.ttl);
        assert_eq!(access.lifetime, grant.ttl);
        assert!(grant.bearer.expose().bytes().all(|b| (0x21..=0x7e).contains(&b)));
    }
    let _ = classify_failure(status, body, None);
});
