//! A client that speaks HTTP/1.1 byte by byte: it writes raw bytes and
//! reads answers one by one, as they are framed on the wire.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// One answer as the client read it.
#[derive(Debug)]
pub struct Answer {
    /// Status line and headers, names as sent.
    pub head: String,
    pub body: Vec<u8>,
}

impl Answer {
    pub fn status(&self) -> u16 {
        self.head[9..12].parse().unwrap()
    }

    /// The value of header `name` (sent in lower case by the proxy).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.head
            .lines()
            .skip(1)
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(": "))
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("{e}: {}{}", self.head, String::from_utf8_lossy(&self.body)))
    }
}

/// A client connection that writes raw bytes and reads answers one by one.
pub struct Raw {
    pub stream: TcpStream,
    pub buf: Vec<u8>,
}

impl Raw {
    pub async fn connect(addr: SocketAddr) -> Raw {
        Raw {
            stream: TcpStream::connect(addr).await.unwrap(),
            buf: Vec::new(),
        }
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.unwrap();
    }

    /// Reads more bytes; false at the end of the stream.
    pub async fn fill(&mut self) -> bool {
        let mut chunk = [0u8; 16 * 1024];
        let n = tokio::time::timeout(Duration::from_secs(10), self.stream.read(&mut chunk))
            .await
            .expect("the proxy answers within 10 s")
            .unwrap_or(0);
        self.buf.extend_from_slice(&chunk[..n]);
        n > 0
    }

    /// Reads `n` bytes of the buffer, filling it as needed.
    pub async fn take(&mut self, n: usize) -> Vec<u8> {
        while self.buf.len() < n {
            assert!(self.fill().await, "the stream ended inside a body");
        }
        self.buf.drain(..n).collect()
    }

    /// Reads up to and including the next CRLF.
    pub async fn line(&mut self) -> String {
        loop {
            if let Some(i) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let line: Vec<u8> = self.buf.drain(..i + 2).collect();
                return String::from_utf8(line).unwrap();
            }
            assert!(self.fill().await, "the stream ended inside a line");
        }
    }

    /// Reads the next answer; `bodiless` for the answer to a HEAD.
    pub async fn answer(&mut self, bodiless: bool) -> Answer {
        let mut head = String::new();
        loop {
            let line = self.line().await;
            if line == "\r\n" {
                break;
            }
            head.push_str(&line);
        }
        let mut answer = Answer {
            head,
            body: Vec::new(),
        };
        if bodiless || answer.status() < 200 || answer.status() == 204 || answer.status() == 304 {
            return answer;
        }
        if let Some(n) = answer.header("content-length") {
            answer.body = self.take(n.parse().unwrap()).await;
        } else if answer.header("transfer-encoding") == Some("chunked") {
            loop {
                let size = usize::from_str_radix(self.line().await.trim_end(), 16).unwrap();
                answer.body.extend(self.take(size).await);
                assert_eq!(self.take(2).await, b"\r\n");
                if size == 0 {
                    break;
                }
            }
        } else {
            while self.fill().await {}
            answer.body = std::mem::take(&mut self.buf);
        }
        answer
    }

    /// Whether the proxy closed the connection (after any bytes left).
    pub async fn closed(&mut self) -> bool {
        !self.fill().await
    }
}
