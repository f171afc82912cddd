//! Any bytes an upstream sends are taken apart into a head and a body, or
//! a clean error, never a panic; and the body and its end do not depend on
//! how the bytes were split across reads (the chunked decoder keeps its
//! state across pieces).
#![no_main]

use http::Method;
use libfuzzer_sys::fuzz_target;
use tokenpool::proxy::h1::take_apart;

fuzz_target!(|data: &[u8]| {
    // Byte 0 picks the method, bytes 1-2 where the reads end.
    let [m, a, b, rest @ ..] = data else {
        return;
    };
    let method = if m & 1 == 0 { Method::GET } else { Method::HEAD };
    let whole = take_apart(&method, rest, &[]);
    let split = take_apart(&method, rest, &[usize::from(*a), usize::from(*a) + usize::from(*b)]);
    match (whole, split) {
        (Ok(Some(w)), Ok(Some(s))) => {
            assert_eq!(w.body, s.body);
            assert_eq!(w.ended, s.ended);
            assert_eq!(w.head.status, s.head.status);
            if method == Method::HEAD {
                assert!(w.body.is_empty() && w.ended, "HEAD has no body");
            }
        }
        (Ok(None), Ok(None)) | (Err(_), Err(_)) => {}
        (w, s) => panic!("whole {w:?} but split {s:?}"),
    }
});
