//! Any bytes a client sends are taken apart into a request head and its
//! body, or the clean error the client would get, never a panic; and the
//! head, the body and its end do not depend on how the bytes were split
//! across reads (the chunked decoder keeps its state across pieces).
#![no_main]

use libfuzzer_sys::fuzz_target;
use tokenpool::proxy::downstream::take_apart_request;

fuzz_target!(|data: &[u8]| {
    // Bytes 0-1 pick where the reads end.
    let [a, b, rest @ ..] = data else {
        return;
    };
    let whole = take_apart_request(rest, &[]);
    let split = take_apart_request(rest, &[usize::from(*a), usize::from(*a) + usize::from(*b)]);
    match (whole, split) {
        (Ok(Some(w)), Ok(Some(s))) => {
            assert_eq!(w.body, s.body);
            assert_eq!(w.ended, s.ended);
            assert_eq!(w.keep_alive, s.keep_alive);
            assert_eq!(w.parts.method, s.parts.method);
            assert_eq!(w.parts.uri, s.parts.uri);
            assert_eq!(w.parts.headers, s.parts.headers);
            assert!(w.body.len() <= rest.len());
            // What framed the request on this connection never reaches
            // the upstream.
            assert!(!w.parts.headers.contains_key("transfer-encoding"));
            assert!(!w.parts.headers.contains_key("expect") || w.parts.headers["expect"] != "100-continue");
        }
        (Ok(None), Ok(None)) | (Err(_), Err(_)) => {}
        (w, s) => panic!("whole {w:?} but split {s:?}"),
    }
});
