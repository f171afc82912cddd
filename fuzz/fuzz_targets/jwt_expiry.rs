//! The JWT `exp` decoder takes any string without panicking.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tokenpool::refresh::provider::jwt_expiry;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Some(exp) = jwt_expiry(text) {
            assert!(exp > std::time::UNIX_EPOCH);
        }
    }
});
