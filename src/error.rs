//! The errors the proxy itself answers with, on both listeners, and the
//! one place they become HTTP responses: an OpenAI-style JSON body plus
//! the `x-tokenpool-error` header, so a client can tell them from upstream
//! answers. Each error knows where it came from ([`ErrorSource`]) and how
//! it is counted (its `tokenpool_requests_total` outcome). Messages are
//! fixed text or configuration messages (which never carry a secret):
//! never a secret, never an internal path.
//!
//! Requests that hyper cannot parse at all (a malformed head, headers past
//! the limit) are answered by hyper itself with a bare 400 or 431 and the
//! connection is closed: no request exists yet to answer with JSON.

use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};

use crate::metrics::RequestOutcome;
use crate::upstream::UpstreamError;

/// Header that marks an answer made by the proxy, not the upstream.
pub const ERROR_HEADER: &str = "x-tokenpool-error";

/// Where an error came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorSource {
    /// The client's request (or an operator's admin call) was wrong.
    Client,
    /// The upstream could not be reached or was too slow.
    Upstream,
    /// The proxy itself cannot serve (no token, a failed task).
    Internal,
}

impl ErrorSource {
    /// The access log's `error_source`.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorSource::Client => "client",
            ErrorSource::Upstream => "upstream",
            ErrorSource::Internal => "internal",
        }
    }
}

/// An error the proxy answers with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProxyError {
    /// Missing or wrong client key (or admin token).
    #[error("missing or invalid API key")]
    Unauthorized,
    /// The body is larger than `max_request_body_bytes`.
    #[error("request body larger than {limit} bytes")]
    RequestTooLarge {
        /// The configured limit.
        limit: usize,
    },
    /// The client's request is not one the proxy serves, or its body could
    /// not be read.
    #[error("malformed request: {detail}")]
    BadRequest {
        /// What was wrong, in fixed words.
        detail: &'static str,
    },
    /// The request body did not arrive within `body_read_timeout`.
    #[error("the request body did not arrive within {timeout:?}")]
    RequestTimeout {
        /// The configured timeout.
        timeout: Duration,
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
    /// The request's method and path are not in `routes`: it never
    /// reaches the upstream.
    #[error("this method and path are not forwarded by the proxy")]
    RouteNotAllowed,
    /// The admin route does not exist.
    #[error("not found")]
    NotFound,
    /// The admin route exists with other methods.
    #[error("method not allowed")]
    MethodNotAllowed,
    /// An admin call named a token the pool does not have.
    #[error("no token of that name")]
    UnknownToken,
    /// `POST /admin/reload`: the config was refused; the running one stays.
    #[error("{message}")]
    ConfigRejected {
        /// The config error, `FILE:LINE:COL: message` (never a secret).
        message: String,
    },
    /// A task the answer depended on failed.
    #[error("internal error")]
    Internal,
}

impl ProxyError {
    /// Where the error came from.
    pub fn origin(&self) -> ErrorSource {
        match self {
            ProxyError::Unauthorized
            | ProxyError::RequestTooLarge { .. }
            | ProxyError::BadRequest { .. }
            | ProxyError::RequestTimeout { .. }
            | ProxyError::NotFound
            | ProxyError::RouteNotAllowed
            | ProxyError::MethodNotAllowed
            | ProxyError::UnknownToken
            | ProxyError::ConfigRejected { .. } => ErrorSource::Client,
            ProxyError::UpstreamUnreachable | ProxyError::UpstreamTimeout => ErrorSource::Upstream,
            ProxyError::NoTokenAvailable { .. } | ProxyError::Internal => ErrorSource::Internal,
        }
    }

    /// The `outcome` label of `tokenpool_requests_total` for a proxied
    /// request that ended with this error.
    pub fn outcome(&self) -> RequestOutcome {
        match self {
            ProxyError::Unauthorized => RequestOutcome::Rejected,
            ProxyError::NoTokenAvailable { .. } => RequestOutcome::NoToken,
            ProxyError::UpstreamUnreachable
            | ProxyError::UpstreamTimeout
            | ProxyError::Internal => RequestOutcome::UpstreamError,
            ProxyError::RequestTooLarge { .. }
            | ProxyError::BadRequest { .. }
            | ProxyError::RequestTimeout { .. }
            | ProxyError::NotFound
            | ProxyError::RouteNotAllowed
            | ProxyError::MethodNotAllowed
            | ProxyError::UnknownToken
            | ProxyError::ConfigRejected { .. } => RequestOutcome::ClientError,
        }
    }

    /// The machine-readable code (`error.code` and `x-tokenpool-error`).
    pub fn code(&self) -> &'static str {
        match self {
            ProxyError::Unauthorized => "unauthorized",
            ProxyError::RequestTooLarge { .. } => "request_too_large",
            ProxyError::BadRequest { .. } => "bad_request",
            ProxyError::RequestTimeout { .. } => "request_timeout",
            ProxyError::NoTokenAvailable { .. } => "no_token_available",
            ProxyError::UpstreamUnreachable => "upstream_unreachable",
            ProxyError::UpstreamTimeout => "upstream_timeout",
            ProxyError::NotFound => "not_found",
            ProxyError::RouteNotAllowed => "route_not_allowed",
            ProxyError::MethodNotAllowed => "method_not_allowed",
            ProxyError::UnknownToken => "unknown_token",
            ProxyError::ConfigRejected { .. } => "config_rejected",
            ProxyError::Internal => "internal_error",
        }
    }

    /// Whether the client's connection must end after this answer: the
    /// request was malformed or its body was not read, so nothing after it
    /// on the connection can be trusted to be a request.
    pub fn ends_connection(&self) -> bool {
        match self {
            ProxyError::BadRequest { .. }
            | ProxyError::RequestTooLarge { .. }
            | ProxyError::RequestTimeout { .. } => true,
            ProxyError::Unauthorized
            | ProxyError::NoTokenAvailable { .. }
            | ProxyError::UpstreamUnreachable
            | ProxyError::UpstreamTimeout
            | ProxyError::NotFound
            | ProxyError::RouteNotAllowed
            | ProxyError::MethodNotAllowed
            | ProxyError::UnknownToken
            | ProxyError::ConfigRejected { .. }
            | ProxyError::Internal => false,
        }
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::Unauthorized => StatusCode::UNAUTHORIZED,
            ProxyError::RequestTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ProxyError::BadRequest { .. } => StatusCode::BAD_REQUEST,
            ProxyError::RequestTimeout { .. } => StatusCode::REQUEST_TIMEOUT,
            ProxyError::NoTokenAvailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::UpstreamUnreachable => StatusCode::BAD_GATEWAY,
            ProxyError::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::NotFound | ProxyError::UnknownToken | ProxyError::RouteNotAllowed => {
                StatusCode::NOT_FOUND
            }
            ProxyError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ProxyError::ConfigRejected { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            ProxyError::Internal => StatusCode::INTERNAL_SERVER_ERROR,
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
            ProxyError::RequestTooLarge { .. }
            | ProxyError::BadRequest { .. }
            | ProxyError::RequestTimeout { .. }
            | ProxyError::UpstreamUnreachable
            | ProxyError::UpstreamTimeout
            | ProxyError::NotFound
            | ProxyError::RouteNotAllowed
            | ProxyError::MethodNotAllowed
            | ProxyError::UnknownToken
            | ProxyError::ConfigRejected { .. }
            | ProxyError::Internal => {}
        }
        response
    }
}

impl From<UpstreamError> for ProxyError {
    fn from(e: UpstreamError) -> ProxyError {
        if e.is_timeout() {
            ProxyError::UpstreamTimeout
        } else {
            ProxyError::UpstreamUnreachable
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_has_json_body_and_header() {
        let cases = [
            (
                ProxyError::Unauthorized,
                401,
                "unauthorized",
                ErrorSource::Client,
            ),
            (
                ProxyError::RequestTooLarge { limit: 10 },
                413,
                "request_too_large",
                ErrorSource::Client,
            ),
            (
                ProxyError::BadRequest { detail: "x" },
                400,
                "bad_request",
                ErrorSource::Client,
            ),
            (
                ProxyError::RequestTimeout {
                    timeout: Duration::from_secs(1),
                },
                408,
                "request_timeout",
                ErrorSource::Client,
            ),
            (
                ProxyError::NoTokenAvailable {
                    retry_after: Duration::from_millis(1500),
                },
                503,
                "no_token_available",
                ErrorSource::Internal,
            ),
            (
                ProxyError::UpstreamUnreachable,
                502,
                "upstream_unreachable",
                ErrorSource::Upstream,
            ),
            (
                ProxyError::UpstreamTimeout,
                504,
                "upstream_timeout",
                ErrorSource::Upstream,
            ),
            (ProxyError::NotFound, 404, "not_found", ErrorSource::Client),
            (
                ProxyError::RouteNotAllowed,
                404,
                "route_not_allowed",
                ErrorSource::Client,
            ),
            (
                ProxyError::MethodNotAllowed,
                405,
                "method_not_allowed",
                ErrorSource::Client,
            ),
            (
                ProxyError::UnknownToken,
                404,
                "unknown_token",
                ErrorSource::Client,
            ),
            (
                ProxyError::ConfigRejected {
                    message: "t.toml:1:1: no".into(),
                },
                422,
                "config_rejected",
                ErrorSource::Client,
            ),
            (
                ProxyError::Internal,
                500,
                "internal_error",
                ErrorSource::Internal,
            ),
        ];
        for (err, status, code, source) in cases {
            let r: Response<Bytes> = err.to_response();
            assert_eq!(r.status().as_u16(), status);
            assert_eq!(r.headers()[ERROR_HEADER], code);
            assert_eq!(err.origin(), source, "{code}");
            let v: serde_json::Value = serde_json::from_slice(r.body()).unwrap();
            assert_eq!(v["error"]["code"], code);
            assert_eq!(v["error"]["type"], "tokenpool_error");
            assert_eq!(v["error"]["message"], err.to_string());
        }
        let r: Response<Bytes> = ProxyError::NoTokenAvailable {
            retry_after: Duration::from_millis(1500),
        }
        .to_response();
        assert_eq!(r.headers()[header::RETRY_AFTER], "2");
    }

    #[test]
    fn upstream_errors_map_to_502_or_504() {
        let timeout = UpstreamError::NoAnswer(Duration::from_secs(1));
        assert_eq!(ProxyError::from(timeout), ProxyError::UpstreamTimeout);
        let silent = UpstreamError::Silent(Duration::from_secs(1));
        assert_eq!(ProxyError::from(silent), ProxyError::UpstreamTimeout);
        let refused = UpstreamError::Connect(std::io::ErrorKind::ConnectionRefused.into());
        assert_eq!(ProxyError::from(refused), ProxyError::UpstreamUnreachable);
    }
}
