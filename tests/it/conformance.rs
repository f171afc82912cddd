//! Request-smuggling conformance: raw-byte requests from public research
//! against a real proxy, with a strict recording backend behind it, and a
//! malicious backend whose answers try to desynchronise the proxy.
//!
//! Sources the cases were written from (not copied): the PortSwigger
//! request-smuggling papers (CL.TE, TE.CL and TE.TE obfuscations, chunk
//! size tricks), the HTTP Garden list of parser discrepancies (bare LF and
//! CR, obs-fold, whitespace before the colon, NUL, chunk-size overflow and
//! leading zeros, duplicate and list-valued Content-Length), RFC 9112 §2,
//! §3, §5, §6 and §7 (framing), RFC 9110 §7.2 (Host) and h2c upgrade abuse.
//!
//! Every client case ends in one of three ways, and nothing else passes:
//! - *refused*: one answer of 400 or above, then the proxy closes; the
//!   backend saw nothing;
//! - *served*: the backend saw exactly the listed requests, in order, each
//!   whole and framed once (the backend refuses anything ambiguous), and
//!   the client got one answer for each;
//! - *either, then closed* (where RFC 9112 allows a server to refuse or to
//!   read the message its way): refused, or served as listed and then the
//!   connection closes, so that no byte after an ambiguous message is ever
//!   read as a request.
//!
//! And in every case: no request whose target says `SMUGGLED` reaches the
//! backend unless the case lists it, and the client's key never does.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::harness::{static_config, Proxy, CLIENT_KEY};
use crate::raw::Raw;

/// What the strict backend saw.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Seen {
    Request {
        method: String,
        target: String,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    },
    /// Something no strict HTTP/1.1 server would take.
    Violation(String),
}

/// One parse of the strict backend.
enum Parsed {
    More,
    Request(Seen, usize),
    Violation(String),
}

/// An HTTP/1.1 server that takes only unambiguous requests: one SP
/// between the parts of the request line, CRLF line ends, token header
/// names with no space before the colon, no obs-fold, no CR, LF or NUL in a
/// value, at most one framing header (a lone `Transfer-Encoding: chunked`
/// or one all-digits `Content-Length`), and strict chunks. It records what
/// it saw and answers `200` with a JSON body naming the target.
struct Recorder {
    url: String,
    log: Arc<Mutex<Vec<Seen>>>,
}

/// A malicious backend's answer to a target: the bytes it writes, and
/// whether it closes the connection after them. `None`: the usual answer.
type Script = fn(&str) -> Option<(Vec<u8>, bool)>;

fn token(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn line(buf: &[u8], from: usize) -> Option<(&[u8], usize)> {
    let rest = &buf[from..];
    let i = rest.windows(2).position(|w| w == b"\r\n")?;
    Some((&rest[..i], from + i + 2))
}

fn strict_parse(buf: &[u8]) -> Parsed {
    let Some((request_line, mut at)) = line(buf, 0) else {
        return Parsed::More;
    };
    let parts: Vec<&[u8]> = request_line.split(|&b| b == b' ').collect();
    if parts.len() != 3 || parts[2] != b"HTTP/1.1" || parts.iter().any(|p| p.is_empty()) {
        return Parsed::Violation(format!(
            "request line {:?}",
            String::from_utf8_lossy(request_line)
        ));
    }
    if !parts[0].iter().all(|&b| token(b)) || !parts[1].starts_with(b"/") {
        return Parsed::Violation("method or target".into());
    }
    let mut headers = Vec::new();
    loop {
        let Some((field, next)) = line(buf, at) else {
            return Parsed::More;
        };
        at = next;
        if field.is_empty() {
            break;
        }
        let Some(colon) = field.iter().position(|&b| b == b':') else {
            return Parsed::Violation("a field without a colon".into());
        };
        let (name, value) = (&field[..colon], &field[colon + 1..]);
        if name.is_empty() || !name.iter().all(|&b| token(b)) {
            return Parsed::Violation(format!("field name {:?}", String::from_utf8_lossy(name)));
        }
        if value.iter().any(|&b| b == b'\r' || b == b'\n' || b == 0) {
            return Parsed::Violation("CR, LF or NUL in a value".into());
        }
        let value = String::from_utf8_lossy(value).trim().to_string();
        headers.push((String::from_utf8_lossy(name).to_ascii_lowercase(), value));
    }
    let te: Vec<&String> = headers
        .iter()
        .filter(|(n, _)| n == "transfer-encoding")
        .map(|(_, v)| v)
        .collect();
    let cl: Vec<&String> = headers
        .iter()
        .filter(|(n, _)| n == "content-length")
        .map(|(_, v)| v)
        .collect();
    let seen = |body: Vec<u8>, headers: Vec<(String, String)>| Seen::Request {
        method: String::from_utf8_lossy(parts[0]).into_owned(),
        target: String::from_utf8_lossy(parts[1]).into_owned(),
        headers,
        body,
    };
    match (te.as_slice(), cl.as_slice()) {
        ([], []) => Parsed::Request(seen(Vec::new(), headers), at),
        ([], [n]) if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) && n.len() < 10 => {
            let n: usize = n.parse().unwrap();
            if buf.len() < at + n {
                return Parsed::More;
            }
            Parsed::Request(seen(buf[at..at + n].to_vec(), headers), at + n)
        }
        ([chunked], []) if chunked.as_str() == "chunked" => {
            let mut body = Vec::new();
            loop {
                let Some((size_line, next)) = line(buf, at) else {
                    return Parsed::More;
                };
                let size_text = size_line.split(|&b| b == b';').next().unwrap_or_default();
                if size_text.is_empty()
                    || size_text.len() > 8
                    || !size_text.iter().all(u8::is_ascii_hexdigit)
                {
                    return Parsed::Violation("chunk size".into());
                }
                let size =
                    usize::from_str_radix(std::str::from_utf8(size_text).unwrap(), 16).unwrap();
                at = next;
                if size == 0 {
                    // Trailer fields, then the empty line.
                    loop {
                        let Some((field, next)) = line(buf, at) else {
                            return Parsed::More;
                        };
                        at = next;
                        if field.is_empty() {
                            return Parsed::Request(seen(body, headers), at);
                        }
                    }
                }
                if buf.len() < at + size + 2 {
                    return Parsed::More;
                }
                if &buf[at + size..at + size + 2] != b"\r\n" {
                    return Parsed::Violation("chunk data not ended by CRLF".into());
                }
                body.extend_from_slice(&buf[at..at + size]);
                at += size + 2;
            }
        }
        _ => Parsed::Violation(format!(
            "framing: transfer-encoding {te:?}, content-length {cl:?}"
        )),
    }
}

impl Recorder {
    /// A strict backend; with a `script`, a malicious one.
    async fn start(script: Option<Script>) -> Recorder {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let log = Arc::new(Mutex::new(Vec::new()));
        let keep = Arc::clone(&log);
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(Recorder::serve(stream, Arc::clone(&keep), script));
            }
        });
        Recorder { url, log }
    }

    async fn serve(mut stream: TcpStream, log: Arc<Mutex<Vec<Seen>>>, script: Option<Script>) {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 8192];
        loop {
            match strict_parse(&buf) {
                Parsed::More => match stream.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                },
                Parsed::Violation(what) => {
                    log.lock().unwrap().push(Seen::Violation(what));
                    return;
                }
                Parsed::Request(seen, used) => {
                    buf.drain(..used);
                    let Seen::Request { target, body, .. } = &seen else {
                        unreachable!()
                    };
                    let (reply, close) = script.and_then(|s| s(target)).unwrap_or_else(|| {
                        let answer =
                            serde_json::json!({"target": target, "body_bytes": body.len()})
                                .to_string();
                        let head = format!(
                            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
                            answer.len()
                        );
                        (format!("{head}{answer}").into_bytes(), false)
                    });
                    log.lock().unwrap().push(seen);
                    if stream.write_all(&reply).await.is_err() || close {
                        return;
                    }
                }
            }
        }
    }

    fn take(&self) -> Vec<Seen> {
        std::mem::take(&mut *self.log.lock().unwrap())
    }
}

/// How a case must end.
#[derive(Debug, Clone, Copy)]
enum Want {
    /// One answer of 400 or above, then the close; the backend saw nothing.
    Refused,
    /// These `(method, target, body)` reached the backend, one answer each.
    Served(&'static [(&'static str, &'static str, &'static str)]),
    /// Refused, or served as listed and then closed.
    EitherThenClosed(&'static [(&'static str, &'static str, &'static str)]),
    /// Refused, or served as listed (an RFC leniency with nothing after it).
    Either(&'static [(&'static str, &'static str, &'static str)]),
    /// Served as listed, then refused and closed.
    ServedThenRefused(&'static [(&'static str, &'static str, &'static str)]),
    /// Answered by the proxy itself with this status; the backend saw nothing.
    Local(u16),
}

/// A client case: its name, where it comes from, its bytes (`K` stands for
/// the line with the client's key, `H` for `Host: x`, `BIG` for a body past
/// the limit), and how it must end.
type Case = (&'static str, &'static str, &'static str, Want);

const OK: &[(&str, &str, &str)] = &[("GET", "/ok", "")];
const POST_HELLO: &[(&str, &str, &str)] = &[("POST", "/ok", "hello")];
const POST_EMPTY: &[(&str, &str, &str)] = &[("POST", "/ok", "")];

const CASES: &[Case] = &[
    // The request line (RFC 9112 §3).
    ("plain GET", "baseline", "GET /ok HTTP/1.1\r\nH\r\nK\r\n\r\n", Want::Served(OK)),
    ("HTTP/1.0 without Host", "RFC 9112 §3.2", "GET /ok HTTP/1.0\r\nK\r\n\r\n", Want::Served(OK)),
    ("version 1.2", "RFC 9110 §2.5", "GET /ok HTTP/1.2\r\nH\r\nK\r\n\r\n", Want::Either(OK)),
    ("version 2.0 in a request line", "RFC 9112 §2.3", "GET /ok HTTP/2.0\r\nH\r\nK\r\n\r\n", Want::Refused),
    ("version 0.9 shape", "HTTP Garden", "GET /ok\r\n\r\n", Want::Refused),
    ("two spaces after the method", "HTTP Garden", "GET  /ok HTTP/1.1\r\nH\r\nK\r\n\r\n", Want::Refused),
    ("tabs between the parts", "HTTP Garden", "GET\t/ok\tHTTP/1.1\r\nH\r\nK\r\n\r\n", Want::Refused),
    ("a space inside the target", "RFC 9112 §3.2", "GET /o k HTTP/1.1\r\nH\r\nK\r\n\r\n", Want::Refused),
    ("lower-case version", "HTTP Garden", "GET /ok http/1.1\r\nH\r\nK\r\n\r\n", Want::Refused),
    ("bare LF line ends", "RFC 9112 §2.2", "GET /ok HTTP/1.1\nH\nK\n\n", Want::Either(OK)),
    ("absolute-form target", "RFC 9112 §3.2.2", "GET http://x/ok HTTP/1.1\r\nH\r\nK\r\n\r\n", Want::Refused),
    ("authority-form CONNECT", "RFC 9112 §3.2.3", "CONNECT x:443 HTTP/1.1\r\nHost: x:443\r\nK\r\n\r\n", Want::Refused),
    ("asterisk-form OPTIONS", "RFC 9112 §3.2.4", "OPTIONS * HTTP/1.1\r\nH\r\nK\r\n\r\n", Want::Local(204)),
    ("asterisk-form GET", "RFC 9112 §3.2.4", "GET * HTTP/1.1\r\nH\r\nK\r\n\r\n", Want::Refused),
    ("a target without a slash", "audit", "GET ok HTTP/1.1\r\nH\r\nK\r\n\r\n", Want::Refused),
    ("NUL in the target", "HTTP Garden", "GET /o\0k HTTP/1.1\r\nH\r\nK\r\n\r\n", Want::Refused),
    ("UTF-8 in the target", "audit", "GET /ok\u{e9} HTTP/1.1\r\nH\r\nK\r\n\r\n", Want::Refused),
    // Header fields (RFC 9112 §5).
    ("a space before the colon", "RFC 9112 §5.1", "GET /ok HTTP/1.1\r\nHost : x\r\nK\r\n\r\n", Want::Refused),
    ("a field without a colon", "HTTP Garden", "GET /ok HTTP/1.1\r\nH\r\nK\r\nno colon here\r\n\r\n", Want::Refused),
    ("an empty field name", "HTTP Garden", "GET /ok HTTP/1.1\r\nH\r\nK\r\n: x\r\n\r\n", Want::Refused),
    ("a space inside a field name", "HTTP Garden", "GET /ok HTTP/1.1\r\nH\r\nK\r\nX A: b\r\n\r\n", Want::Refused),
    ("NUL in a value", "HTTP Garden", "GET /ok HTTP/1.1\r\nH\r\nK\r\nX-A: a\0b\r\n\r\n", Want::Refused),
    ("bare CR in a value", "RFC 9112 §2.2", "GET /ok HTTP/1.1\r\nH\r\nK\r\nX-A: a\rb\r\n\r\n", Want::Refused),
    ("obs-fold", "RFC 9112 §5.2", "GET /ok HTTP/1.1\r\nH\r\nK\r\nX-A: a\r\n b\r\n\r\n", Want::Either(OK)),
    ("a line starting with a space before the first field", "RFC 9112 §2.2", "GET /ok HTTP/1.1\r\n X-A: a\r\nH\r\nK\r\n\r\n", Want::Refused),
    // Host (RFC 9110 §7.2, RFC 9112 §3.2).
    ("no Host on HTTP/1.1", "RFC 9112 §3.2", "GET /ok HTTP/1.1\r\nK\r\n\r\n", Want::Refused),
    ("two Hosts", "RFC 9112 §3.2", "GET /ok HTTP/1.1\r\nH\r\nHost: y\r\nK\r\n\r\n", Want::Refused),
    ("an empty Host", "RFC 9110 §7.2", "GET /ok HTTP/1.1\r\nHost:\r\nK\r\n\r\n", Want::Refused),
    ("a Host with user info", "RFC 9110 §4.2.4", "GET /ok HTTP/1.1\r\nHost: u@x\r\nK\r\n\r\n", Want::Refused),
    ("a Host with a path", "audit", "GET /ok HTTP/1.1\r\nHost: x/y\r\nK\r\n\r\n", Want::Refused),
    // Content-Length (RFC 9110 §8.6, RFC 9112 §6.3).
    ("a body by its length", "baseline", "POST /ok HTTP/1.1\r\nH\r\nK\r\nContent-Length: 5\r\n\r\nhello", Want::Served(POST_HELLO)),
    ("a length with leading zeros", "HTTP Garden", "POST /ok HTTP/1.1\r\nH\r\nK\r\nContent-Length: 005\r\n\r\nhello", Want::Served(POST_HELLO)),
    ("a length in spaces", "RFC 9110 §5.5", "POST /ok HTTP/1.1\r\nH\r\nK\r\nContent-Length:  5 \r\n\r\nhello", Want::Served(POST_HELLO)),
    ("a signed length", "HTTP Garden", "POST /ok HTTP/1.1\r\nH\r\nK\r\nContent-Length: +5\r\n\r\nhello", Want::Refused),
    ("a negative length", "HTTP Garden", "POST /ok HTTP/1.1\r\nH\r\nK\r\nContent-Length: -1\r\n\r\nhello", Want::Refused),
    ("a hex length", "HTTP Garden", "POST /ok HTTP/1.1\r\nH\r\nK\r\nContent-Length: 0x5\r\n\r\nhello", Want::Refused),
    ("a length past 64 bits", "HTTP Garden", "POST /ok HTTP/1.1\r\nH\r\nK\r\nContent-Length: 99999999999999999999999\r\n\r\nhello", Want::Refused),
    ("a length past the body limit", "docs/http.md", "POST /ok HTTP/1.1\r\nH\r\nK\r\nContent-Length: 999999999\r\n\r\nhello", Want::Refused),
    ("a list of equal lengths", "RFC 9110 §8.6", "POST /ok HTTP/1.1\r\nH\r\nK\r\nContent-Length: 5, 5\r\n\r\nhello", Want::Either(POST_HELLO)),
    ("a list of different lengths", "RFC 9110 §8.6", "POST /ok HTTP/1.1\r\nH\r\nK\r\nContent-Length: 5, 6\r\n\r\nhello", Want::Refused),
    ("two different lengths", "PortSwigger CL.CL", "POST /ok HTTP/1.1\r\nH\r\nK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!GET /SMUGGLED HTTP/1.1\r\nH\r\nK\r\n\r\n", Want::Refused),
    ("two equal lengths", "RFC 9110 §8.6", "POST /ok HTTP/1.1\r\nH\r\nK\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello", Want::Either(POST_HELLO)),
    ("pipelined after a length", "RFC 9112 §9.3.2", "POST /ok HTTP/1.1\r\nH\r\nK\r\nContent-Length: 5\r\n\r\nhelloGET /next HTTP/1.1\r\nH\r\nK\r\n\r\n", Want::Served(&[("POST", "/ok", "hello"), ("GET", "/next", "")])),
    // Transfer-Encoding (RFC 9112 §6, §7).
    ("chunks", "baseline", "POST /ok HTTP/1.1\r\nH\r\nK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nhel\r\n2\r\nlo\r\n0\r\n\r\n", Want::Served(POST_HELLO)),
    ("chunks with extensions", "RFC 9112 §7.1.1", "POST /ok HTTP/1.1\r\nH\r\nK\r\nTransfer-Encoding: chunked\r\n\r\n5;a=b;c=\"d\"\r\nhello\r\n0;e=f\r\n\r\n", Want::Served(POST_HELLO)),
    ("chunks and trailers", "RFC 9112 §7.1.2", "POST /ok HTTP/1.1\r\nH\r\nK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nX-Trailer: 1\r\nContent-Length: 99\r\n\r\n", Want::Served(POST_HELLO)),
    ("CHUNKED in capitals", "RFC 9112 §7", "POST /ok HTTP/1.1\r\nH\r\nK\r\nTransfer-Encoding: CHUNKED\r\n\r\n5\r\nhello\r\n0\r\n\r\n", Want::Served(POST_HELLO)),
    ("a tab before chunked", "RFC 9110 §5.6.3", "POST /ok HTTP/1.1\r\nH\r\nK\r\nTransfer-Encoding:\tchunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n", Want::Served(POST_HELLO)),
    ("CL.TE", "PortSwigger CL.TE", "POST /ok HTTP/1.1\r\nH\r\nK\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nG", Want::EitherThenClosed(POST_EMPTY)),
    ("TE.CL", "PortSwigger TE.CL", "POST /ok HTTP/1.1\r\nH\r\nK\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\nGET /SMUGGLED HTTP/1.1\r\nH\r\nK\r\n\r\n", Want::EitherThenClosed(POST_HELLO)),
    ("TE.CL, length first", "PortSwigger TE.CL", "POST /ok HTTP/1.1\r\nH\r\nK\r\nTransfer-Encoding: chunked\r\nContent-Length: 40\r\n\r\n5\r\nhello\r\n0\r\n\r\nGET /SMUGGLED HTTP/1.1\r\nH\r\nK\r\n\r\n", Want::EitherThenClosed(POST_HELLO)),
    ("TE.TE: xchunked", "PortSwigger TE.TE", "POST /ok HTTP/1.1\r\nH\r\nK\r\nContent-Length: 5\r\nTransfer-Encoding: xchunked\r\n\r\nhello", Want::Refused),
    ("TE.TE: space before the colon", "PortSwigger TE.TE", "POST /ok HTTP/1.1\r\nH\r\nK\r\nContent-Length: 5\r\nTransfer-Encoding : chunked\r\n\r\nhello", Want::Refused),
    ("TE.TE: a second, bogus coding", "PortSwigger TE.TE", "POST /ok HTTP/1.1\r\nH\r\nK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: x\r\n\r\n5\r\nhello\r\n0\r\n\r\n", Want::Refused),
    ("TE.TE: chunked, then identity", "PortSwigger TE.TE", "POST /ok HTTP/1.1\r\nH\r\nK\r\nTransfer-Encoding: chunked, identity\r\n\r\n5\r\nhello\r\n0\r\n\r\n", Want::Refused),
    ("TE.TE: obs-fold before chunked", "PortSwigger TE.TE", "POST /ok HTTP/1.1\r\nH\r\nK\r\nContent-Length: 5\r\nTransfer-Encoding:\r\n chunked\r\n\r\nhello", Want::Refused),
    ("TE.TE: a line feed inside the name", "PortSwigger TE.TE", "POST /ok HTTP/1.1\r\nH\r\nK\r\nContent-Length: 5\r\nX: X\nTransfer-Encoding: chunked\r\n\r\nhello", Want::EitherThenClosed(POST_HELLO)),
    ("TE.TE: chunked twice", "RFC 9112 §6.1", "POST /ok HTTP/1.1\r\nH\r\nK\r\nTransfer-Encoding: chunked, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n", Want::Refused),
    ("a coding the proxy cannot undo", "RFC 9112 §6.1", "POST /ok HTTP/1.1\r\nH\r\nK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n", Want::Refused),
    ("chunks from an HTTP/1.0 client", "RFC 9112 §6.1", "POST /ok HTTP/1.0\r\nK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\nGET /SMUGGLED HTTP/1.1\r\nH\r\nK\r\n\r\n", Want::EitherThenClosed(POST_HELLO)),
    // Chunk sizes and data (RFC 9112 §7.1).
    ("a chunk size with 17 digits", "audit", "POST /ok HTTP/1.1\r\nH\r\nK\r\nTransfer-Encoding: chunked\r\n\r\n00000000000000005\r\nhello\r\n0\r\n\r\n", Want::Served(POST_HELLO)),
    ("a chunk size past 64 bits", "HTTP Garden", "POST /ok HTTP/1.1\r\nH\r\nK\r\nTransfer-Encoding: chunked\r\n\r\n10000000000000005\r\nhello\r\n0\r\n\r\n", Want::Refused),
    ("a negative chunk size", "HTTP Garden", "POST /ok HTTP/1.1\r\nH\r\nK\r\nTransfer-Encoding: chunked\r\n\r\n-5\r\nhello\r\n0\r\n\r\n", Want::Refused),
    ("a 0x chunk size", "HTTP Garden", "POST /ok HTTP/1.1\r\nH\r\nK\r\nTransfer-Encoding: chunked\r\n\r\n0x5\r\nhello\r\n0\r\n\r\n", Want::Refused),
    ("an empty chunk size", "HTTP Garden", "POST /ok HTTP/1.1\r\nH\r\nK\r\nTransfer-Encoding: chunked\r\n\r\n\r\nhello\r\n0\r\n\r\n", Want::Refused),
    ("chunk data longer than its size", "audit (chunked resync)", "POST /a HTTP/1.1\r\nH\r\nK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhelloX\r\n0\r\n\r\nGET /SMUGGLED HTTP/1.1\r\nH\r\nK\r\n\r\n", Want::Refused),
    ("chunk data without its CRLF", "HTTP Garden", "POST /ok HTTP/1.1\r\nH\r\nK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello0\r\n\r\nGET /SMUGGLED HTTP/1.1\r\nH\r\nK\r\n\r\n", Want::Refused),
    ("a request line where a trailer goes", "HTTP Garden", "POST /ok HTTP/1.1\r\nH\r\nK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nGET /SMUGGLED HTTP/1.1\r\nH\r\nK\r\n\r\n", Want::Refused),
    ("a space after the chunk size", "HTTP Garden", "POST /ok HTTP/1.1\r\nH\r\nK\r\nTransfer-Encoding: chunked\r\n\r\n5 \r\nhello\r\n0\r\n\r\n", Want::Either(POST_HELLO)),
    ("bare LF around chunks", "HTTP Garden", "POST /ok HTTP/1.1\r\nH\r\nK\r\nTransfer-Encoding: chunked\r\n\r\n5\nhello\n0\n\n", Want::EitherThenClosed(POST_HELLO)),
    ("a bare LF ending the trailers", "audit (trailer swallow)", "POST /ok HTTP/1.1\r\nH\r\nK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\nGET /SMUGGLED HTTP/1.1\r\nH\r\nK\r\n\r\n", Want::EitherThenClosed(POST_HELLO)),
    ("a trailer field", "RFC 9112 §7.1.2", "POST /ok HTTP/1.1\r\nH\r\nK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nX-T: 1\r\n\r\n", Want::EitherThenClosed(POST_HELLO)),
    ("chunks past the body limit", "docs/http.md", "POST /ok HTTP/1.1\r\nH\r\nK\r\nTransfer-Encoding: chunked\r\n\r\nffff\r\nBIG", Want::Refused),
    // Hop-by-hop abuse and upgrades (RFC 9110 §7.6.1, §7.8; RFC 7540 §3.2).
    ("Expect: 100-continue", "RFC 9110 §10.1.1", "POST /ok HTTP/1.1\r\nH\r\nK\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\nhello", Want::Served(POST_HELLO)),
    ("an h2c upgrade", "h2c smuggling", "GET /ok HTTP/1.1\r\nH\r\nK\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n", Want::Served(OK)),
    ("an h2c upgrade without Connection", "h2c smuggling", "GET /ok HTTP/1.1\r\nH\r\nK\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n", Want::Served(OK)),
    ("a websocket upgrade", "h2c smuggling", "GET /ok HTTP/1.1\r\nH\r\nK\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n", Want::Served(OK)),
    ("Connection naming the length", "hop-by-hop abuse", "POST /ok HTTP/1.1\r\nH\r\nK\r\nConnection: Content-Length\r\nContent-Length: 5\r\n\r\nhello", Want::Served(POST_HELLO)),
    ("Connection naming Authorization", "hop-by-hop abuse", "GET /ok HTTP/1.1\r\nH\r\nK\r\nConnection: authorization\r\n\r\n", Want::Served(OK)),
    ("the HTTP/2 preface after a request", "h2c smuggling", "GET /ok HTTP/1.1\r\nH\r\nK\r\n\r\nPRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", Want::ServedThenRefused(OK)),
    ("three requests in one write", "RFC 9112 §9.3.2", "GET /ok HTTP/1.1\r\nH\r\nK\r\n\r\nPOST /ok HTTP/1.1\r\nH\r\nK\r\nContent-Length: 5\r\n\r\nhelloPOST /ok HTTP/1.1\r\nH\r\nK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", Want::Served(&[("GET", "/ok", ""), ("POST", "/ok", "hello"), ("POST", "/ok", "")])),
];

/// The bytes of a case (`BIG` stands for 5 000 bytes, past the body limit).
fn bytes(template: &str) -> Vec<u8> {
    template
        .replace("BIG", &"a".repeat(5000))
        .replace(
            "\r\nK\r\n",
            &format!("\r\nAuthorization: Bearer {CLIENT_KEY}\r\n"),
        )
        .replace("\nK\n", &format!("\nAuthorization: Bearer {CLIENT_KEY}\n"))
        .replace("\r\nH\r\n", "\r\nHost: x\r\n")
        .replace("\nH\n", "\nHost: x\n")
        .into_bytes()
}

/// Reads the next answer, or `None` if the connection ends first.
async fn next_answer(c: &mut Raw) -> Option<crate::raw::Answer> {
    while c.buf.is_empty() {
        if !c.fill().await {
            return None;
        }
    }
    let mut answer = c.answer(false).await;
    while answer.status() == 100 {
        answer = c.answer(false).await;
    }
    Some(answer)
}

/// Checks the backend saw exactly `want`, and each answer matches.
fn served_as(name: &str, seen: &[Seen], want: &[(&str, &str, &str)]) -> Result<(), String> {
    let got: Vec<(String, String, String)> = seen
        .iter()
        .map(|s| match s {
            Seen::Request {
                method,
                target,
                body,
                ..
            } => (
                method.clone(),
                target.clone(),
                String::from_utf8_lossy(body).into_owned(),
            ),
            Seen::Violation(v) => ("VIOLATION".into(), v.clone(), String::new()),
        })
        .collect();
    let want: Vec<(String, String, String)> = want
        .iter()
        .map(|(m, t, b)| (m.to_string(), t.to_string(), b.to_string()))
        .collect();
    if got != want {
        return Err(format!("{name}: the backend saw {got:?}, not {want:?}"));
    }
    Ok(())
}

/// Runs one case; `Err` says how it failed.
async fn run_case(proxy: SocketAddr, backend: &Recorder, case: &Case) -> Result<(), String> {
    let (name, _source, template, want) = *case;
    // Each case takes what it caused; anything here came in after the
    // case before ended (a request forwarded after its client was answered).
    let late = backend.take();
    if !late.is_empty() {
        return Err(format!(
            "{name}: {} request(s) reached the backend after the case before ended",
            late.len()
        ));
    }
    let mut c = Raw::connect(proxy).await;
    // The proxy may close before it has read everything: that is fine.
    let _ = c.stream.write_all(&bytes(template)).await;
    let first = next_answer(&mut c).await;
    let refused =
        |first: &Option<crate::raw::Answer>| first.as_ref().is_none_or(|a| a.status() >= 400);
    let result = match want {
        Want::Refused => {
            if !refused(&first) {
                return Err(format!("{name}: not refused: {:?}", first.map(|a| a.head)));
            }
            expect_close(name, &mut c).await
        }
        Want::Local(status) => match first {
            Some(a) if a.status() == status => Ok(()),
            other => Err(format!(
                "{name}: want {status}, got {:?}",
                other.map(|a| a.head)
            )),
        },
        Want::Served(list) => answers(name, &mut c, first, list.len()).await,
        Want::ServedThenRefused(list) => {
            answers(name, &mut c, first, list.len()).await?;
            let refusal = next_answer(&mut c).await;
            if !refused(&refusal) {
                return Err(format!("{name}: the tail was not refused"));
            }
            expect_close(name, &mut c).await
        }
        Want::Either(_) | Want::EitherThenClosed(_) if refused(&first) => {
            expect_close(name, &mut c).await
        }
        Want::Either(list) => answers(name, &mut c, first, list.len()).await,
        Want::EitherThenClosed(list) => {
            answers(name, &mut c, first, list.len()).await?;
            expect_close(name, &mut c).await
        }
    };
    result?;
    let seen = backend.take();
    for s in &seen {
        match s {
            Seen::Violation(v) => {
                return Err(format!("{name}: the backend got an ambiguous request: {v}"))
            }
            Seen::Request {
                target, headers, ..
            } => {
                let listed = match want {
                    Want::Served(l)
                    | Want::Either(l)
                    | Want::EitherThenClosed(l)
                    | Want::ServedThenRefused(l) => l,
                    Want::Refused | Want::Local(_) => &[][..],
                };
                if target.contains("SMUGGLED") && !listed.iter().any(|(_, t, _)| t == target) {
                    return Err(format!("{name}: a smuggled request reached the backend"));
                }
                for (header, value) in headers {
                    if value.contains(CLIENT_KEY) {
                        return Err(format!("{name}: the client's key went upstream"));
                    }
                    if matches!(
                        header.as_str(),
                        "upgrade"
                            | "http2-settings"
                            | "expect"
                            | "te"
                            | "connection"
                            | "keep-alive"
                    ) && !(header == "connection" && value.eq_ignore_ascii_case("keep-alive"))
                    {
                        return Err(format!("{name}: {header} went upstream"));
                    }
                }
            }
        }
    }
    match want {
        Want::Refused | Want::Local(_) => served_as(name, &seen, &[]),
        Want::Served(list) | Want::ServedThenRefused(list) => served_as(name, &seen, list),
        Want::Either(list) | Want::EitherThenClosed(list) => {
            if seen.is_empty() {
                Ok(())
            } else {
                served_as(name, &seen, list)
            }
        }
    }
}

/// Reads `n` answers (the first already read); each must be the backend's.
async fn answers(
    name: &str,
    c: &mut Raw,
    first: Option<crate::raw::Answer>,
    n: usize,
) -> Result<(), String> {
    let mut next = first;
    for i in 0..n {
        let Some(a) = next.take() else {
            return Err(format!("{name}: answer {} never came", i + 1));
        };
        if a.status() != 200 || a.header("x-tokenpool-error").is_some() {
            return Err(format!("{name}: answer {} is {}", i + 1, a.head));
        }
        if i + 1 < n {
            next = next_answer(c).await;
        }
    }
    Ok(())
}

/// The proxy must close the connection now, with no further answer.
async fn expect_close(name: &str, c: &mut Raw) -> Result<(), String> {
    let mut rest = std::mem::take(&mut c.buf);
    let mut chunk = [0u8; 4096];
    loop {
        match tokio::time::timeout(Duration::from_secs(5), c.stream.read(&mut chunk)).await {
            Err(_) => return Err(format!("{name}: the connection stayed open")),
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => rest.extend_from_slice(&chunk[..n]),
        }
    }
    if rest.windows(5).any(|w| w == b"HTTP/") {
        return Err(format!(
            "{name}: another answer followed: {}",
            String::from_utf8_lossy(&rest)
        ));
    }
    Ok(())
}

/// A proxy (static key, so no refresh endpoint) in front of `url`.
async fn proxy_for(url: &str, dir: &std::path::Path) -> Proxy {
    Proxy::start(&static_config(
        dir,
        url,
        "max_request_body_bytes = 4096",
        "",
    ))
    .await
}

#[tokio::test]
async fn client_requests_are_refused_or_served_unambiguously() {
    let backend = Recorder::start(None).await;
    let dir = tempfile::tempdir().unwrap();
    let p = proxy_for(&backend.url, dir.path()).await;
    let mut failures = Vec::new();
    for case in CASES {
        // Every wait inside has its own bound; this one names a case that
        // hangs anyway.
        match tokio::time::timeout(Duration::from_secs(8), run_case(p.addr, &backend, case)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => failures.push(format!("{e}  [{}]", case.1)),
            Err(_) => failures.push(format!("{}: no end within 8 s  [{}]", case.0, case.1)),
        }
    }
    // Nothing reaches the backend after the last case either.
    p.stop().await;
    let late = backend.take();
    if !late.is_empty() {
        failures.push(format!(
            "{} request(s) reached the backend after the last case ended",
            late.len()
        ));
    }
    eprintln!(
        "conformance: {} client cases, {} passed, {} failed",
        CASES.len(),
        CASES.len() - failures.len(),
        failures.len()
    );
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

/// What a malicious backend answers, by target.
fn malicious(target: &str) -> Option<(Vec<u8>, bool)> {
    let keep = |b: &[u8]| Some((b.to_vec(), false));
    let close = |b: &[u8]| Some((b.to_vec(), true));
    match target {
        "/cl-and-te" => keep(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\nb\r\nhello world\r\n0\r\n\r\n"),
        "/two-answers" => keep(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nokHTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nEVIL"),
        "/head-body" => keep(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nEVIL"),
        "/bad-length" => close(b"HTTP/1.1 200 OK\r\ncontent-length: abc\r\n\r\nok"),
        "/two-lengths" => close(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\nokk"),
        "/nul-value" => close(b"HTTP/1.1 200 OK\r\nx-a: a\0b\r\ncontent-length: 2\r\n\r\nok"),
        "/space-before-colon" => close(b"HTTP/1.1 200 OK\r\ncontent-length : 2\r\n\r\nok"),
        "/gzip-te" => close(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nraw bytes"),
        "/gzip-chunked-te" => keep(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"),
        "/switching" => keep(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\nEVIL"),
        "/many-1xx" => keep(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"),
        "/bad-status" => close(b"HTTP/1.1 2000 OK\r\ncontent-length: 2\r\n\r\nok"),
        "/hop-headers" => keep(b"HTTP/1.1 200 OK\r\nConnection: x-secret\r\nx-secret: 1\r\nKeep-Alive: timeout=5\r\nProxy-Authenticate: Basic\r\nTrailer: x-t\r\ncontent-length: 2\r\n\r\nok"),
        "/chunk-overflow" => close(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\nfffffffffffffffff1\r\nEVIL"),
        "/http10-close" => close(b"HTTP/1.0 200 OK\r\n\r\nuntil the close"),
        "/short" => close(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly this"),
        "/huge-head" => {
            let mut b = b"HTTP/1.1 200 OK\r\nx-big: ".to_vec();
            b.extend(std::iter::repeat_n(b'a', 600 * 1024));
            b.extend_from_slice(b"\r\ncontent-length: 2\r\n\r\nok");
            Some((b, true))
        }
        _ => None,
    }
}

/// How a malicious answer must reach the client.
#[derive(Debug, Clone, Copy)]
enum Reaches {
    /// 200 with this body, whole and cleanly ended.
    Whole(&'static str),
    /// The proxy's 502.
    BadGateway,
    /// 200, what arrived, then a break: never a clean, shorter body.
    Broken,
}

/// `(target, method, how it must reach the client)`.
const BACKEND_CASES: &[(&str, &str, Reaches)] = &[
    ("/cl-and-te", "GET", Reaches::Whole("hello world")),
    ("/two-answers", "GET", Reaches::Whole("ok")),
    ("/head-body", "HEAD", Reaches::Whole("")),
    ("/bad-length", "GET", Reaches::BadGateway),
    ("/two-lengths", "GET", Reaches::BadGateway),
    ("/nul-value", "GET", Reaches::BadGateway),
    ("/space-before-colon", "GET", Reaches::BadGateway),
    ("/gzip-te", "GET", Reaches::BadGateway),
    ("/gzip-chunked-te", "GET", Reaches::BadGateway),
    ("/switching", "GET", Reaches::BadGateway),
    ("/many-1xx", "GET", Reaches::Whole("ok")),
    ("/bad-status", "GET", Reaches::BadGateway),
    ("/hop-headers", "GET", Reaches::Whole("ok")),
    ("/chunk-overflow", "GET", Reaches::Broken),
    ("/http10-close", "GET", Reaches::Whole("until the close")),
    ("/short", "GET", Reaches::Broken),
    ("/huge-head", "GET", Reaches::BadGateway),
];

#[tokio::test]
async fn a_malicious_backend_cannot_desynchronise_the_proxy() {
    let backend = Recorder::start(Some(malicious)).await;
    let dir = tempfile::tempdir().unwrap();
    let p = proxy_for(&backend.url, dir.path()).await;
    let mut failures = Vec::new();
    for &(target, method, reaches) in BACKEND_CASES {
        let r = p
            .client
            .request(method.parse().unwrap(), p.url(target))
            .bearer_auth(CLIENT_KEY)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let names: Vec<String> = r.headers().keys().map(|k| k.to_string()).collect();
        let mut r = r;
        let (body, broke) = crate::harness::read_to_break(&mut r).await;
        let body = String::from_utf8_lossy(&body).into_owned();
        let ok = match reaches {
            Reaches::Whole(want) => status == 200 && !broke && body == want,
            Reaches::BadGateway => status == 502,
            Reaches::Broken => status == 200 && broke,
        };
        if !ok {
            failures.push(format!(
                "{target}: want {reaches:?}, got {status} {body:?} (broke: {broke}, headers {names:?})"
            ));
        }
        for hop in [
            "x-secret",
            "keep-alive",
            "proxy-authenticate",
            "trailer",
            "connection",
            "upgrade",
        ] {
            if names.iter().any(|n| n == hop) {
                failures.push(format!("{target}: {hop} reached the client"));
            }
        }
        if target == "/cl-and-te" && names.iter().any(|n| n == "content-length") {
            failures.push(format!(
                "{target}: the length beside the chunks reached the client"
            ));
        }
        // Whatever a bad answer left on the upstream connection, the next
        // request gets its own answer.
        let r = p
            .client
            .get(p.url("/next"))
            .bearer_auth(CLIENT_KEY)
            .send()
            .await
            .unwrap();
        let next = r.text().await.unwrap_or_default();
        if !next.contains("\"target\":\"/next\"") {
            failures.push(format!("{target}: the next request got {next:?}"));
        }
    }
    eprintln!(
        "conformance: {} backend cases, {} failures",
        BACKEND_CASES.len(),
        failures.len()
    );
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}
