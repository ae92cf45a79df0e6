//! A plain HTTP/1.1 client for the daemon's Unix socket: std sockets, one request per
//! connection (`Connection: close`, so the answer ends when the socket does), any
//! method and body, and the answer's status, headers and bytes as sent. Small on
//! purpose: the server's own client (`src/client.rs`) is under test, so this one
//! shares nothing with it.

use std::collections::BTreeMap;
use std::io::{Read as _, Write as _};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

/// One answer as the server sent it.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    /// Names lowercased.
    pub headers: BTreeMap<String, String>,
    pub body: Vec<u8>,
}

impl Answer {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }

    pub fn text(&self) -> String {
        String::from_utf8(self.body.clone()).expect("the answer is UTF-8")
    }

    /// The body as JSON; the content type must say so.
    pub fn json(&self) -> serde_json::Value {
        assert_eq!(
            self.header("content-type"),
            Some("application/json"),
            "{self:?}"
        );
        serde_json::from_slice(&self.body).expect("the body is JSON")
    }

    /// An error answer: checks its shape (a non-empty `message`), returns its `error`.
    pub fn error(&self) -> String {
        let v = self.json();
        assert!(v["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
        v["error"]
            .as_str()
            .expect("an error names itself")
            .to_owned()
    }
}

/// `METHOD path` with `body` on `socket`; panics when the server does not answer. Each
/// read is bounded by [`LONG`](super::LONG): a `min_valid` request may wait for a refresh.
pub fn request(socket: &Path, method: &str, path: &str, body: &[u8]) -> Answer {
    try_request(socket, method, path, body, super::LONG)
        .unwrap_or_else(|| panic!("no HTTP answer to {method} {path} on {}", socket.display()))
}

/// [`request`], `None` when nobody listens or the answer is no HTTP.
pub fn try_request(
    socket: &Path,
    method: &str,
    path: &str,
    body: &[u8],
    timeout: Duration,
) -> Option<Answer> {
    let mut conn = UnixStream::connect(socket).ok()?;
    conn.set_read_timeout(Some(timeout)).ok()?;
    conn.set_write_timeout(Some(timeout)).ok()?;
    write!(
        conn,
        "{method} {path} HTTP/1.1\r\nHost: tokend\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .ok()?;
    // A server may answer before it has read the body (413 for one too large) and
    // close: the rest of the body then cannot be written (EPIPE), and the answer, read
    // in full, ends in ECONNRESET rather than EOF (the kernel's word for a peer that
    // closed with unread data). What it answered is what counts.
    let _ = conn.write_all(body);
    let mut raw = Vec::new();
    let mut buf = [0; 8192];
    loop {
        match conn.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => raw.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset && !raw.is_empty() => break,
            Err(_) => return None,
        }
    }
    parse_answer(&raw)
}

/// The answer in `raw` (head and whatever followed it), `None` if it is no HTTP answer.
pub fn parse_answer(raw: &[u8]) -> Option<Answer> {
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&raw[..end]).ok()?;
    let mut lines = head.split("\r\n");
    let status = lines.next()?.split(' ').nth(1)?.parse().ok()?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Some(Answer {
        status,
        headers,
        body: raw[end + 4..].to_vec(),
    })
}
