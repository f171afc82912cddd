//! What a client request must be before anything is done for it: a
//! request target in origin form (a path; `*` only for `OPTIONS`), never
//! `CONNECT`, on HTTP/1.1 exactly one valid `Host` (RFC 9112 §3.2), and no
//! transfer coding but a single `chunked` — and where its key is.
//!
//! hyper has parsed the request; these are the rules it leaves to the
//! server. A proxy that forwarded `CONNECT host:443` as `CONNECT /`, or
//! picked one of two `Host` headers, would disagree with the servers
//! around it about what the request is.

use http::header::{self, HeaderMap, HeaderValue};
use http::request::Parts;
use http::uri::Authority;
use http::{Method, Version};

use crate::error::ProxyError;
use crate::upstream::headers;

fn bad(detail: &'static str) -> ProxyError {
    ProxyError::BadRequest { detail }
}

/// Longest request target (path and query) served, in bytes: nginx's
/// default header buffers take 8 KiB.
const MAX_TARGET: usize = 16 * 1024;

/// Refuses a request whose target or `Host` the proxy does not serve.
pub(super) fn check(parts: &Parts) -> Result<(), ProxyError> {
    if parts.method == Method::CONNECT {
        return Err(bad("CONNECT is not served"));
    }
    let uri = &parts.uri;
    // Over HTTP/2 the scheme and authority come from pseudo-headers; over
    // HTTP/1 they would mean an absolute-form or authority-form target.
    if parts.version < Version::HTTP_2 && (uri.scheme().is_some() || uri.authority().is_some()) {
        return Err(bad("the request target must be a path (origin-form)"));
    }
    let path = uri.path();
    let asterisk = path == "*" && parts.method == Method::OPTIONS && uri.query().is_none();
    if !(path.starts_with('/') || asterisk) {
        return Err(bad("the request target must be a path (origin-form)"));
    }
    if !uri.path_and_query().is_none_or(|pq| pq.as_str().is_ascii()) {
        return Err(bad("the request target has bytes outside ASCII"));
    }
    if uri
        .path_and_query()
        .is_some_and(|pq| pq.as_str().len() > MAX_TARGET)
    {
        // Joined to the upstream URL's own path it must still be a path
        // the http crate takes (under 64 KiB), or the request could not
        // go where it was checked to go.
        return Err(bad("the request target is longer than 16384 bytes"));
    }
    if !headers::chunked_at_most(&parts.headers) {
        // hyper reads the chunks and passes any other coding through
        // undone; the upstream would then get a body that means something
        // else (RFC 9112 §6.1 allows 501; a coding applied twice is invalid).
        return Err(bad("a transfer coding other than one chunked"));
    }
    let mut hosts = parts.headers.get_all(header::HOST).iter();
    match (hosts.next(), hosts.next()) {
        (Some(_), Some(_)) => Err(bad("more than one Host header")),
        (None, _) if parts.version == Version::HTTP_11 => {
            Err(bad("an HTTP/1.1 request needs a Host header"))
        }
        (Some(host), None) if !valid_host(host) => Err(bad("the Host header is not a valid host")),
        _ => Ok(()),
    }
}

/// A `Host` value: a host and optional port, nothing else (no user info,
/// not empty). The usual shape (a name or IPv4 address, maybe a port) is
/// told by its bytes; anything else is parsed as a URI authority.
fn valid_host(value: &HeaderValue) -> bool {
    let bytes = value.as_bytes();
    let plain = |b: &u8| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_');
    let (name, port) = match bytes.iter().position(|&b| b == b':') {
        Some(colon) => (&bytes[..colon], Some(&bytes[colon + 1..])),
        None => (bytes, None),
    };
    if !name.is_empty()
        && name.iter().all(plain)
        && port.is_none_or(|p| !p.is_empty() && p.len() <= 5 && p.iter().all(u8::is_ascii_digit))
    {
        return true;
    }
    !bytes.is_empty()
        && !bytes.contains(&b'@')
        && Authority::try_from(bytes).is_ok_and(|a| a.as_str().len() == bytes.len())
}

/// The client's key, from `Authorization: Bearer` or `x-api-key`.
pub(super) fn presented_key(headers: &HeaderMap) -> Option<&[u8]> {
    bearer(headers).or_else(|| headers.get("x-api-key").map(HeaderValue::as_bytes))
}

/// The token of an `Authorization: Bearer <token>` header (the scheme's
/// name in any case).
pub(crate) fn bearer(headers: &HeaderMap) -> Option<&[u8]> {
    headers
        .get(header::AUTHORIZATION)
        .map(HeaderValue::as_bytes)
        .and_then(|v| (v.len() > 7 && v[..7].eq_ignore_ascii_case(b"bearer ")).then(|| &v[7..]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Request;

    fn parts(method: &str, target: &str, version: Version, hosts: &[&[u8]]) -> Parts {
        let mut b = Request::builder()
            .method(method)
            .uri(target)
            .version(version);
        for h in hosts {
            b = b.header("host", HeaderValue::from_bytes(h).unwrap());
        }
        b.body(()).unwrap().into_parts().0
    }

    /// (method, target, version, `Host` values, refused with)
    type Case = (
        &'static str,
        &'static str,
        Version,
        &'static [&'static [u8]],
        Option<&'static str>,
    );

    #[test]
    fn targets_and_hosts() {
        use Version as V;
        let cases: &[Case] = &[
            (
                "POST",
                "/ai/multi-agent?x=1",
                V::HTTP_11,
                &[b"api.test"],
                None,
            ),
            ("GET", "/", V::HTTP_11, &[b"api.test:8080"], None),
            ("GET", "/", V::HTTP_11, &[b"[::1]:8080"], None),
            ("OPTIONS", "*", V::HTTP_11, &[b"x"], None),
            ("GET", "/", V::HTTP_10, &[], None),
            ("GET", "/", V::HTTP_2, &[], None),
            ("GET", "https://api.test/", V::HTTP_2, &[], None),
            (
                "CONNECT",
                "api.test:443",
                V::HTTP_11,
                &[b"api.test:443"],
                Some("CONNECT"),
            ),
            ("GET", "*", V::HTTP_11, &[b"x"], Some("origin-form")),
            ("OPTIONS", "*?x", V::HTTP_11, &[b"x"], Some("")),
            (
                "GET",
                "http://api.test/x",
                V::HTTP_11,
                &[b"api.test"],
                Some("origin-form"),
            ),
            (
                "GET",
                "api.test",
                V::HTTP_11,
                &[b"api.test"],
                Some("origin-form"),
            ),
            ("GET", "/", V::HTTP_11, &[], Some("needs a Host")),
            (
                "GET",
                "/",
                V::HTTP_11,
                &[b"a", b"b"],
                Some("more than one Host"),
            ),
            (
                "GET",
                "/",
                V::HTTP_10,
                &[b"a", b"a"],
                Some("more than one Host"),
            ),
            ("GET", "/", V::HTTP_11, &[b""], Some("not a valid host")),
            (
                "GET",
                "/",
                V::HTTP_11,
                &[b"user@api.test"],
                Some("not a valid host"),
            ),
            ("GET", "/", V::HTTP_11, &[b"a b"], Some("not a valid host")),
            (
                "GET",
                "/",
                V::HTTP_11,
                &[b"api.test/x"],
                Some("not a valid host"),
            ),
        ];
        for (method, target, version, hosts, refused) in cases {
            let Ok(uri) = target.parse::<http::Uri>() else {
                // Not even a URI: hyper refuses it before we see it.
                assert!(refused.is_some(), "{target}");
                continue;
            };
            let p = parts(method, &uri.to_string(), *version, hosts);
            let got = check(&p);
            match (refused, got) {
                (None, Ok(())) => {}
                (Some(want), Err(ProxyError::BadRequest { detail })) => {
                    assert!(detail.contains(want), "{method} {target}: {detail}")
                }
                (want, got) => panic!("{method} {target} {hosts:?}: want {want:?}, got {got:?}"),
            }
        }
    }

    #[test]
    fn keys_come_from_bearer_or_x_api_key() {
        let mut h = HeaderMap::new();
        h.insert("authorization", HeaderValue::from_static("bearer k1"));
        assert_eq!(presented_key(&h), Some(&b"k1"[..]));
        h.insert("authorization", HeaderValue::from_static("Basic k1"));
        assert_eq!(presented_key(&h), None);
        h.insert("x-api-key", HeaderValue::from_static("k2"));
        assert_eq!(presented_key(&h), Some(&b"k2"[..]));
    }
}
