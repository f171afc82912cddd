//! The header rules of forwarding: what of the client's request goes
//! upstream (not its credentials, hop-by-hop or forwarding headers; the
//! configured `[upstream] headers` are added, and each try puts the
//! token's bearer over the client's `Authorization`), and what of the
//! upstream's answer goes back (not its hop-by-hop headers).

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// How many names [`HOP_BY_HOP`] has.
const HOPS: usize = 8;

/// Headers that describe one hop and never cross a proxy (RFC 9110 §7.6.1),
/// plus the legacy `proxy-connection`.
static HOP_BY_HOP: [HeaderName; HOPS] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

/// Makes a client's headers ready to go upstream, in place, once per
/// request: hop-by-hop headers (and those its `Connection` names), its
/// other credentials (`x-api-key`), `Expect` and forwarding headers go;
/// `extra` (`[upstream] headers`) replace the client's of the same name.
/// What every attempt then sets itself — `Host` and `Authorization` — is
/// replaced, not removed here; `Content-Length` stays, since the body goes
/// as it came.
///
/// Most requests carry nothing to remove: one look at each name, and no
/// allocation.
pub fn prepare(headers: &mut HeaderMap, extra: &[(HeaderName, HeaderValue)], join_cookies: bool) {
    if join_cookies {
        join_cookie_fields(headers);
    }
    let listed = connection_listed(headers);
    let dropped = |name: &HeaderName| !forwardable(name) || listed.contains(name);
    if headers.keys().any(dropped) {
        let names: Vec<HeaderName> = headers.keys().filter(|n| dropped(n)).cloned().collect();
        for name in names {
            headers.remove(name);
        }
    }
    for (name, value) in extra {
        headers.insert(name.clone(), value.clone());
    }
}

/// HTTP/2 sends each cookie as a field of its own; one going on over
/// HTTP/1.1 must be one `Cookie` field, joined with `; ` (RFC 9113 §8.2.3).
fn join_cookie_fields(headers: &mut HeaderMap) {
    let cookies = headers.get_all(header::COOKIE);
    if cookies.iter().nth(1).is_none() {
        return;
    }
    let joined: Vec<&[u8]> = cookies.iter().map(HeaderValue::as_bytes).collect();
    if let Ok(value) = HeaderValue::from_bytes(&joined.join(&b"; "[..])) {
        headers.insert(header::COOKIE, value);
    }
}

/// Whether a message's `Transfer-Encoding`, if any, is one `chunked`:
/// the only coding hyper undoes. Another (gzip, or chunked applied twice)
/// would pass through undone, and the body mean something else.
pub fn chunked_at_most(headers: &HeaderMap) -> bool {
    let mut codings = headers
        .get_all(header::TRANSFER_ENCODING)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .map(<[u8]>::trim_ascii);
    match (codings.next(), codings.next()) {
        (None, _) => true,
        (Some(only), None) => only.eq_ignore_ascii_case(b"chunked"),
        (Some(_), Some(_)) => false,
    }
}

/// The place of `transfer-encoding` in [`HOP_BY_HOP`].
const TRANSFER_ENCODING: usize = 7;

/// Where `name` is in [`HOP_BY_HOP`]: one match on the name's text (which
/// compiles to a switch on its length first), not a comparison with each
/// of the eight, for every header of every request and answer.
fn hop_by_hop(name: &HeaderName) -> Option<usize> {
    Some(match name.as_str() {
        "connection" => 0,
        "keep-alive" => 1,
        "proxy-connection" => 2,
        "proxy-authenticate" => 3,
        "proxy-authorization" => 4,
        "te" => 5,
        "trailer" => 6,
        "transfer-encoding" => 7,
        _ => return None,
    })
}

/// Whether a client request header may go upstream (those the client's
/// `Connection` header names aside). `Host` and `Authorization` are
/// replaced by each attempt rather than removed.
fn forwardable(name: &HeaderName) -> bool {
    let text = name.as_str();
    !(hop_by_hop(name).is_some()
        || matches!(
            text,
            "upgrade" | "http2-settings" | "expect" | "x-api-key" | "forwarded" | "via"
        )
        || text.starts_with("x-forwarded-"))
}

/// The header names a message's `Connection` header lists (those are
/// hop-by-hop too), read once. Its usual options (`keep-alive`, `close`)
/// name no header of their own, so the usual message allocates nothing.
fn connection_listed(headers: &HeaderMap) -> Vec<HeaderName> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|s| s.split(','))
        .map(str::trim)
        .filter(|t| !t.eq_ignore_ascii_case("keep-alive") && !t.eq_ignore_ascii_case("close"))
        .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
        .collect()
}

/// Removes hop-by-hop headers from an upstream answer before it goes to
/// the client. An answer framed by `Transfer-Encoding` loses its
/// `Content-Length` too: hyper read the body by its chunks (RFC 9112
/// §6.3), and a length left beside them would frame the client's copy
/// differently — cut short, or with the next answer's bytes in it.
///
/// Every name is looked at once, by one match on its text; only the names
/// found are removed (each removal hashes). Most answers carry at most
/// `Connection: keep-alive`, so this is one removal.
pub fn strip_response_headers(headers: &mut HeaderMap) {
    let mut found = [false; HOPS + 1];
    let mut any = false;
    for name in headers.keys() {
        if let Some(i) = hop_by_hop(name) {
            found[i] = true;
            any = true;
        } else if name == header::UPGRADE {
            found[HOPS] = true;
            any = true;
        }
    }
    if !any {
        return;
    }
    let listed = if found[0] {
        connection_listed(headers)
    } else {
        Vec::new()
    };
    for (i, name) in HOP_BY_HOP.iter().enumerate() {
        if found[i] {
            headers.remove(name);
        }
    }
    if found[TRANSFER_ENCODING] {
        headers.remove(header::CONTENT_LENGTH);
    }
    if found[HOPS] {
        headers.remove(header::UPGRADE);
    }
    for name in &listed {
        headers.remove(name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hop_by_hop_match_agrees_with_the_list() {
        for (i, name) in HOP_BY_HOP.iter().enumerate() {
            assert_eq!(hop_by_hop(name), Some(i), "{name}");
        }
        for name in ["upgrade", "content-type", "x-connection", "t", "tes"] {
            assert_eq!(hop_by_hop(&HeaderName::from_static(name)), None, "{name}");
        }
    }

    #[test]
    fn request_headers_drop_credentials_and_hops() {
        let extra = [(
            HeaderName::from_static("x-warp-client-version"),
            HeaderValue::from_static("v1"),
        )];
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("authorization", "Bearer client-key"),
            ("x-api-key", "client-key"),
            ("connection", "keep-alive, x-secret-hop"),
            ("x-secret-hop", "1"),
            ("keep-alive", "timeout=5"),
            ("te", "trailers"),
            ("expect", "100-continue"),
            ("upgrade", "h2c"),
            ("http2-settings", "AAMA"),
            ("x-forwarded-for", "10.0.0.1"),
            ("forwarded", "for=10.0.0.1"),
            ("via", "1.1 lb"),
            ("host", "proxy.local"),
            ("x-warp-client-version", "client-chosen"),
            ("content-type", "application/x-protobuf"),
            ("content-length", "5"),
            ("accept", "text/event-stream"),
        ] {
            h.append(k, HeaderValue::from_static(v));
        }
        prepare(&mut h, &extra, false);
        let mut names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        names.sort();
        // Host and Authorization are replaced by each attempt.
        assert_eq!(
            names,
            [
                "accept",
                "authorization",
                "content-length",
                "content-type",
                "host",
                "x-warp-client-version"
            ]
        );
        assert_eq!(h["x-warp-client-version"], "v1");

        // The usual request: nothing to remove.
        let mut h = HeaderMap::new();
        h.insert("content-type", HeaderValue::from_static("application/json"));
        h.insert("authorization", HeaderValue::from_static("Bearer k"));
        prepare(&mut h, &[], false);
        assert_eq!(h.len(), 2);

        // Cookies of an HTTP/2 request become one field.
        let mut h = HeaderMap::new();
        h.append("cookie", HeaderValue::from_static("a=1"));
        h.append("cookie", HeaderValue::from_static("b=2"));
        prepare(&mut h, &[], true);
        assert_eq!(h.get_all("cookie").iter().collect::<Vec<_>>(), ["a=1; b=2"]);
    }

    #[test]
    fn only_one_chunked_coding_is_undone() {
        for (codings, ok) in [
            (&[][..], true),
            (&["chunked"][..], true),
            (&["Chunked "][..], true),
            (&["chunked, chunked"][..], false),
            (&["gzip, chunked"][..], false),
            (&["chunked, gzip"][..], false),
            (&["chunked", "chunked"][..], false),
            (&["gzip"][..], false),
            (&[""][..], false),
        ] {
            let mut h = HeaderMap::new();
            for c in codings {
                h.append("transfer-encoding", HeaderValue::from_static(c));
            }
            assert_eq!(chunked_at_most(&h), ok, "{codings:?}");
        }
    }

    #[test]
    fn response_hop_headers_are_stripped() {
        let mut h = HeaderMap::new();
        h.insert("connection", HeaderValue::from_static("close, x-hop"));
        h.insert("x-hop", HeaderValue::from_static("1"));
        h.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        h.insert(
            "content-type",
            HeaderValue::from_static("text/event-stream"),
        );
        strip_response_headers(&mut h);
        assert_eq!(h.len(), 1);

        let mut h = HeaderMap::new();
        h.insert("connection", HeaderValue::from_static("keep-alive"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("upgrade", HeaderValue::from_static("h2c"));
        h.insert("content-length", HeaderValue::from_static("2"));
        strip_response_headers(&mut h);
        assert_eq!(h.keys().collect::<Vec<_>>(), ["content-length"]);

        let mut h = HeaderMap::new();
        h.insert("content-type", HeaderValue::from_static("application/json"));
        strip_response_headers(&mut h);
        assert_eq!(h.len(), 1);

        // Chunks and a length: the length goes with the chunking.
        let mut h = HeaderMap::new();
        h.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        h.insert("content-length", HeaderValue::from_static("3"));
        h.insert("content-type", HeaderValue::from_static("text/plain"));
        strip_response_headers(&mut h);
        assert_eq!(h.keys().collect::<Vec<_>>(), ["content-type"]);
    }
}
