//! `[upstream] routes`: the requests the proxy forwards, as a method and a
//! path (`POST /ai/multi-agent`; `*` for any method; a trailing `*`
//! matches a prefix). Anything else is refused with 404
//! `route_not_allowed` and never reaches the upstream.
//!
//! Paths are compared byte for byte, and only a path that cannot mean
//! another one to any upstream is matched: made of letters, digits,
//! `-._~!$&'()*+,=:@` and `/`, with no empty segment and no segment of dots
//! alone, and percent-encoding only of letters, digits, `-`, `_` and `~`.
//! So `..;`, `%2e`, `%c0%ae`, `%252e`, `\`, `;` and `//` never match: an
//! upstream that normalizes or decodes them could serve a path the route
//! does not name. The query string is not looked at.

use std::fmt;

use http::Method;

/// The route the Warp preset allows: its AI endpoint. Not `/graphql/v2`,
/// which serves every GraphQL operation, account management included (the
/// quota poller asks it directly).
pub const WARP_ROUTES: [&str; 1] = ["POST /ai/multi-agent"];

/// One allowed method and path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// `None`: any method.
    method: Option<Method>,
    /// The path, or its prefix.
    path: String,
    /// `path` is a prefix (the route ended in `*`).
    prefix: bool,
}

impl Route {
    /// Reads `POST /ai/multi-agent`, `GET /v1/models/*` or `* /v1/*`.
    pub fn parse(text: &str) -> Result<Route, String> {
        let mut words = text.split_whitespace();
        let (Some(method), Some(path), None) = (words.next(), words.next(), words.next()) else {
            return Err("a route is a method and a path, as \"POST /ai/multi-agent\"".into());
        };
        let method = match method {
            "*" => None,
            m if !m.is_empty() && m.bytes().all(|b| b.is_ascii_uppercase()) => {
                Some(Method::from_bytes(m.as_bytes()).map_err(|_| "not a method".to_string())?)
            }
            _ => {
                return Err(
                    "a route's method is in capitals (GET, POST, …), or * for any method".into(),
                )
            }
        };
        if !path.starts_with('/') {
            return Err("a route's path starts with /".into());
        }
        let (path, prefix) = match path.strip_suffix('*') {
            Some(p) => (p, true),
            None => (path, false),
        };
        if path.contains('*') {
            return Err("a route's path may end in *, and have no other *".into());
        }
        if !plain(path) {
            return Err(
                "a route's path is made of letters, digits, -._~!$&'()+,=:@ and /, \
                 with no empty segment and no segment of dots alone"
                    .into(),
            );
        }
        Ok(Route {
            method,
            path: path.to_string(),
            prefix,
        })
    }

    /// Whether a request of `method` for `path` (a plain one) is this route's.
    fn allows(&self, method: &Method, path: &str) -> bool {
        self.method.as_ref().is_none_or(|m| m == method)
            && if self.prefix {
                path.starts_with(&self.path)
            } else {
                path == self.path
            }
    }
}

impl fmt::Display for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let method = self.method.as_ref().map_or("*", Method::as_str);
        let star = if self.prefix { "*" } else { "" };
        write!(f, "{method} {}{star}", self.path)
    }
}

/// Whether a path means only what its bytes say to any upstream (see the
/// module documentation): a trailing `/` is one empty segment allowed.
fn plain(path: &str) -> bool {
    let bytes = path.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {}
            b'!' | b'$' | b'&' | b'\'' | b'(' | b')' | b'*' | b'+' | b',' | b'=' | b':' | b'@' => {}
            b'/' => {}
            b'%' => {
                let decoded = bytes
                    .get(i + 1..i + 3)
                    .and_then(|hex| std::str::from_utf8(hex).ok())
                    .and_then(|hex| u8::from_str_radix(hex, 16).ok());
                match decoded {
                    Some(b) if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'~') => {}
                    _ => return false,
                }
                i += 2;
            }
            _ => return false,
        }
        i += 1;
    }
    let inner = path.strip_suffix('/').unwrap_or(path);
    path.starts_with('/')
        && inner
            .split('/')
            .skip(1)
            .all(|segment| !segment.is_empty() && !segment.bytes().all(|b| b == b'.'))
        || path == "/"
}

/// Whether `routes` let a request of `method` for `path` go upstream.
pub fn allowed(routes: &[Route], method: &Method, path: &str) -> bool {
    plain(path) && routes.iter().any(|r| r.allows(method, path))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn routes(list: &[&str]) -> Vec<Route> {
        list.iter().map(|r| Route::parse(r).unwrap()).collect()
    }

    #[test]
    fn exact_routes_allow_their_method_and_path_only() {
        let r = routes(&WARP_ROUTES);
        assert!(allowed(&r, &Method::POST, "/ai/multi-agent"));
        for (method, path) in [
            (Method::GET, "/ai/multi-agent"),
            (Method::POST, "/ai/multi-agent/"),
            (Method::POST, "/ai/multi-agent/x"),
            (Method::POST, "/ai/multi-agenty"),
            (Method::POST, "/graphql/v2"),
            (Method::POST, "/AI/multi-agent"),
            (Method::POST, "/ai//multi-agent"),
            (Method::POST, "/ai/multi-agent/../../graphql/v2"),
            (Method::POST, "/ai/%6Dulti-agent"),
        ] {
            assert!(!allowed(&r, &method, path), "{method} {path}");
        }
    }

    #[test]
    fn prefixes_and_any_method_never_let_a_path_climb_out() {
        let r = routes(&["* /v1/*", "GET /models"]);
        assert!(allowed(&r, &Method::POST, "/v1/chat/completions"));
        assert!(allowed(&r, &Method::DELETE, "/v1/"));
        assert!(allowed(&r, &Method::GET, "/models"));
        // Encoded letters, digits and -_~ say nothing new; a trailing / is fine.
        assert!(allowed(&r, &Method::GET, "/v1/%41bc-%7e/x.json"));
        assert!(allowed(&r, &Method::GET, "/v1/models/"));
        for path in [
            "/v1/../admin",
            "/v1/./x",
            "/v1/%2e%2e/admin",
            "/v1/%2E%2E/admin",
            "/v1/..%2fadmin",
            "/v1/..%2Fadmin",
            "/v1/..\\admin",
            "/v1/%5c..",
            "/v1/..",
            "/v1/..;/admin",
            "/v1/x;a=b",
            "/v1/%c0%ae%c0%ae/admin",
            "/v1/%c0%af",
            "/v1/%252e%252e/admin",
            "/v1/%u002e%u002e/admin",
            "/v1/%ef%bc%8e%ef%bc%8e/admin",
            "/v1/..%00/admin",
            "/v1/..%20/admin",
            "/v1/.../admin",
            "/v1//admin",
            "/v1/a%2",
            "/v1/%zz",
            "/v2/x",
            "/v1",
        ] {
            assert!(!allowed(&r, &Method::POST, path), "{path}");
        }
        assert!(!allowed(&r, &Method::POST, "/models"));
    }

    #[test]
    fn routes_are_read_strictly_and_shown_as_written() {
        for text in ["POST /ai/multi-agent", "* /v1/*", "GET /"] {
            assert_eq!(Route::parse(text).unwrap().to_string(), text);
        }
        for bad in [
            "",
            "/ai/multi-agent",
            "post /ai",
            "POST ai",
            "POST /a*b",
            "POST /a/../b",
            "POST /a/%2e%2e/b",
            "POST /a?b",
            "POST /a#b",
            "POST /a;b",
            "POST /a//b",
            "POST /é",
            "POST /a extra",
            "PO ST /a",
        ] {
            assert!(Route::parse(bad).is_err(), "{bad:?}");
        }
    }
}
