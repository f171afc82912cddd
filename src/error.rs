//! The errors the proxy itself answers with (DESIGN §3.3), and the one
//! place they become HTTP responses: an OpenAI-style JSON body plus the
//! `x-tokenpool-error` header, so a client can tell them from upstream
//! answers. Messages are fixed text: never a secret, never a path.

use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};

/// Header that marks an answer made by the proxy, not the upstream.
pub const ERROR_HEADER: &str = "x-tokenpool-error";

/// An error the proxy answers with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProxyError {
    /// Missing or wrong client key.
    #[error("missing or invalid API key")]
    Unauthorized,
    /// The body is larger than `max_request_body_bytes`.
    #[error("request body larger than {limit} bytes")]
    RequestTooLarge {
        /// The configured limit.
        limit: usize,
    },
    /// The request head is longer than the proxy accepts.
    #[error("request headers larger than {limit} bytes")]
    HeadersTooLarge {
        /// The limit, in bytes.
        limit: usize,
    },
    /// The client's request could not be read.
    #[error("malformed request: {detail}")]
    BadRequest {
        /// What was wrong, in fixed words.
        detail: &'static str,
    },
    /// No token is available.
    #[error("no upstream token is available; retry later")]
    NoTokenAvailable {
        /// When a token is expected back.
        retry_after: Duration,
    },
    /// The upstream could not be reached.
    #[error("upstream unreachable")]
    UpstreamUnreachable,
    /// The upstream did not answer in time.
    #[error("upstream timed out")]
    UpstreamTimeout,
    /// The client closed its connection before its answer. Nobody reads
    /// this answer; it exists for the outcome and the log.
    #[error("the client closed the connection")]
    ClientClosed,
    /// The admin route does not exist.
    #[error("not found")]
    NotFound,
    /// The admin route exists with other methods.
    #[error("method not allowed")]
    MethodNotAllowed,
}

impl ProxyError {
    /// The machine-readable code (`error.code` and `x-tokenpool-error`).
    pub fn code(&self) -> &'static str {
        match self {
            ProxyError::Unauthorized => "unauthorized",
            ProxyError::RequestTooLarge { .. } => "request_too_large",
            ProxyError::HeadersTooLarge { .. } => "headers_too_large",
            ProxyError::BadRequest { .. } => "bad_request",
            ProxyError::NoTokenAvailable { .. } => "no_token_available",
            ProxyError::UpstreamUnreachable => "upstream_unreachable",
            ProxyError::UpstreamTimeout => "upstream_timeout",
            ProxyError::ClientClosed => "client_closed_request",
            ProxyError::NotFound => "not_found",
            ProxyError::MethodNotAllowed => "method_not_allowed",
        }
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::Unauthorized => StatusCode::UNAUTHORIZED,
            ProxyError::RequestTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ProxyError::HeadersTooLarge { .. } => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            ProxyError::BadRequest { .. } => StatusCode::BAD_REQUEST,
            ProxyError::NoTokenAvailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::UpstreamUnreachable => StatusCode::BAD_GATEWAY,
            ProxyError::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            // nginx's code for it.
            ProxyError::ClientClosed => StatusCode::from_u16(499).expect("a valid code"),
            ProxyError::NotFound => StatusCode::NOT_FOUND,
            ProxyError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
        }
    }

    /// The response: JSON body, `x-tokenpool-error`, and `Retry-After` or
    /// `WWW-Authenticate` where they apply.
    pub fn to_response<B: From<Bytes>>(&self) -> Response<B> {
        let body = serde_json::json!({
            "error": {
                "message": self.to_string(),
                "type": "tokenpool_error",
                "code": self.code(),
            }
        });
        let mut response = Response::new(B::from(Bytes::from(body.to_string())));
        *response.status_mut() = self.status();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        headers.insert(ERROR_HEADER, HeaderValue::from_static(self.code()));
        match self {
            ProxyError::NoTokenAvailable { retry_after } => {
                let secs = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
                headers.insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
            }
            ProxyError::Unauthorized => {
                headers.insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"tokenpool\""),
                );
            }
            _ => {}
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_has_json_body_and_header() {
        let cases = [
            (ProxyError::Unauthorized, 401, "unauthorized"),
            (
                ProxyError::RequestTooLarge { limit: 10 },
                413,
                "request_too_large",
            ),
            (ProxyError::BadRequest { detail: "x" }, 400, "bad_request"),
            (
                ProxyError::HeadersTooLarge { limit: 10 },
                431,
                "headers_too_large",
            ),
            (
                ProxyError::NoTokenAvailable {
                    retry_after: Duration::from_millis(1500),
                },
                503,
                "no_token_available",
            ),
            (ProxyError::UpstreamUnreachable, 502, "upstream_unreachable"),
            (ProxyError::UpstreamTimeout, 504, "upstream_timeout"),
            (ProxyError::ClientClosed, 499, "client_closed_request"),
        ];
        for (err, status, code) in cases {
            let r: Response<Bytes> = err.to_response();
            assert_eq!(r.status().as_u16(), status);
            assert_eq!(r.headers()[ERROR_HEADER], code);
            let v: serde_json::Value = serde_json::from_slice(r.body()).unwrap();
            assert_eq!(v["error"]["code"], code);
            assert_eq!(v["error"]["type"], "tokenpool_error");
        }
        let r: Response<Bytes> = ProxyError::NoTokenAvailable {
            retry_after: Duration::from_millis(1500),
        }
        .to_response();
        assert_eq!(r.headers()[header::RETRY_AFTER], "2");
    }
}
