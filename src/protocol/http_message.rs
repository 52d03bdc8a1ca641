//! HTTP/1.1 messages as a capture holds them and a replay answers them: one direction of
//! a TCP connection read into whole messages (heads by `httparse`, bodies by
//! Content-Length or chunked), each written out in one normal form (the head as captured
//! without Transfer-Encoding and with the body's Content-Length, then the body), and the
//! parts of that form a replay matches on (method, target, body) and answers with
//! (status, headers, body). Sans-IO, never panics, bounded.

/// The longest head and body kept; past them the stream is given up.
pub const MAX_HEAD: usize = 16 * 1024;
pub const MAX_BODY: usize = 4 << 20;
const MAX_HEADERS: usize = 64;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HttpOutput {
    /// A whole message in the normal form.
    Message(Vec<u8>),
    /// The head switched protocols (a WebSocket upgrade request, a 101 answer): what
    /// follows is not HTTP.
    Upgraded,
    /// Why the bytes could not be read as HTTP; the direction is given up.
    NotHttp { what: String },
}

/// Where the reader is in the current message.
#[derive(Debug, Default)]
enum State {
    #[default]
    Head,
    /// `left` more body bytes to a message whose head is `head`.
    Sized { head: Vec<u8>, left: usize, body: Vec<u8> },
    /// A chunked body: chunks so far.
    Chunked { head: Vec<u8>, body: Vec<u8> },
}

/// One direction of an HTTP/1.1 connection, message after message (keep-alive).
#[derive(Debug, Default)]
pub struct HttpReader {
    state: State,
}

impl HttpReader {
    /// Reads whole messages from the front of `buf` and returns how many bytes it used;
    /// bytes of an unfinished message stay for the next call (the caller keeps them).
    /// Stops after [`HttpOutput::Upgraded`] or [`HttpOutput::NotHttp`].
    pub fn read(&mut self, buf: &[u8], out: &mut Vec<HttpOutput>) -> usize {
        let mut used = 0;
        loop {
            let rest = &buf[used..];
            let step = match std::mem::take(&mut self.state) {
                State::Head => self.head(rest, out),
                State::Sized { head, left, mut body } => {
                    let n = left.min(rest.len());
                    body.extend_from_slice(&rest[..n]);
                    if n == left {
                        out.push(HttpOutput::Message(normal_form(&head, &body)));
                    } else {
                        self.state = State::Sized { head, left: left - n, body };
                    }
                    Step::Used(n)
                }
                State::Chunked { head, body } => self.chunk(rest, head, body, out),
            };
            match step {
                Step::Used(0) => return used,
                Step::Used(n) => used += n,
                Step::Stop(n) => return used + n,
            }
        }
    }

    fn head(&mut self, rest: &[u8], out: &mut Vec<HttpOutput>) -> Step {
        if rest.is_empty() {
            return Step::Used(0);
        }
        let head = match parse_head(rest) {
            Ok(Some(h)) => h,
            Ok(None) if rest.len() > MAX_HEAD => {
                out.push(HttpOutput::NotHttp { what: format!("no end of an HTTP head in the first {MAX_HEAD} bytes") });
                return Step::Stop(rest.len());
            }
            Ok(None) => return Step::Used(0),
            Err(what) => {
                out.push(HttpOutput::NotHttp { what });
                return Step::Stop(rest.len());
            }
        };
        let bytes = rest[..head.len].to_vec();
        if head.upgrade {
            out.push(HttpOutput::Upgraded);
            return Step::Stop(head.len);
        }
        match head.body {
            Body::None => out.push(HttpOutput::Message(normal_form(&bytes, &[]))),
            Body::Sized(n) if n > MAX_BODY => {
                out.push(HttpOutput::NotHttp { what: format!("a {n}-byte HTTP body, past the {MAX_BODY}-byte limit") });
                return Step::Stop(rest.len());
            }
            Body::Sized(0) => out.push(HttpOutput::Message(normal_form(&bytes, &[]))),
            Body::Sized(n) => self.state = State::Sized { head: bytes, left: n, body: Vec::new() },
            Body::Chunked => self.state = State::Chunked { head: bytes, body: Vec::new() },
            Body::ToEnd => {
                out.push(HttpOutput::NotHttp { what: "an HTTP response without Content-Length or chunked body (read to the connection's end) is not read".into() });
                return Step::Stop(rest.len());
            }
        }
        Step::Used(head.len)
    }

    /// One chunk (size line, data, CRLF) or the last chunk and its trailer.
    fn chunk(&mut self, rest: &[u8], head: Vec<u8>, mut body: Vec<u8>, out: &mut Vec<HttpOutput>) -> Step {
        let Some(eol) = rest.windows(2).position(|w| w == b"\r\n") else {
            if rest.len() > 1024 {
                out.push(HttpOutput::NotHttp { what: "a chunk size line over 1024 bytes".into() });
                return Step::Stop(rest.len());
            }
            self.state = State::Chunked { head, body };
            return Step::Used(0);
        };
        let line = String::from_utf8_lossy(&rest[..eol]);
        let hex = line.split(';').next().unwrap_or_default().trim();
        let Ok(size) = usize::from_str_radix(hex, 16) else {
            out.push(HttpOutput::NotHttp { what: format!("a chunk size `{}` that is not hex", line.chars().take(40).collect::<String>()) });
            return Step::Stop(rest.len());
        };
        if size == 0 {
            // The trailer: header lines up to an empty one.
            let Some(end) = find(&rest[eol..], b"\r\n\r\n").map(|p| eol + p + 4) else {
                // A trailer is header lines: bounded as a head is.
                if rest.len() > MAX_HEAD {
                    out.push(HttpOutput::NotHttp { what: format!("no end of a chunked body's trailer in {MAX_HEAD} bytes") });
                    return Step::Stop(rest.len());
                }
                self.state = State::Chunked { head, body };
                return Step::Used(0);
            };
            out.push(HttpOutput::Message(normal_form(&head, &body)));
            return Step::Used(end);
        }
        if body.len().saturating_add(size) > MAX_BODY {
            out.push(HttpOutput::NotHttp { what: format!("a chunked HTTP body past the {MAX_BODY}-byte limit") });
            return Step::Stop(rest.len());
        }
        let end = eol + 2 + size + 2;
        if rest.len() < end {
            self.state = State::Chunked { head, body };
            return Step::Used(0);
        }
        body.extend_from_slice(&rest[eol + 2..eol + 2 + size]);
        self.state = State::Chunked { head, body };
        Step::Used(end)
    }
}

enum Step {
    /// Bytes used; 0: wait for more.
    Used(usize),
    /// Bytes used, and nothing more is read.
    Stop(usize),
}

enum Body {
    None,
    Sized(usize),
    Chunked,
    ToEnd,
}

struct Head {
    len: usize,
    upgrade: bool,
    body: Body,
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn header<'h>(headers: &'h [httparse::Header<'_>], name: &str) -> Option<&'h [u8]> {
    headers.iter().find(|h| h.name.eq_ignore_ascii_case(name)).map(|h| h.value)
}

fn body_of(headers: &[httparse::Header<'_>], request: bool, status: u16) -> Result<Body, String> {
    if !request && (status < 200 || status == 204 || status == 304) {
        return Ok(Body::None);
    }
    if header(headers, "transfer-encoding").is_some_and(|v| String::from_utf8_lossy(v).to_ascii_lowercase().contains("chunked")) {
        return Ok(Body::Chunked);
    }
    match header(headers, "content-length") {
        Some(v) => std::str::from_utf8(v).ok().and_then(|s| s.trim().parse::<usize>().ok()).map(Body::Sized).ok_or_else(|| format!("a Content-Length `{}` that is not a number", String::from_utf8_lossy(v))),
        None if request => Ok(Body::None),
        None => Ok(Body::ToEnd),
    }
}

/// A request or response head at the front of `bytes`: `None` until it is whole.
fn parse_head(bytes: &[u8]) -> Result<Option<Head>, String> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    if bytes.starts_with(b"HTTP/") {
        let mut r = httparse::Response::new(&mut headers);
        return match r.parse(bytes) {
            Ok(httparse::Status::Complete(len)) => {
                let status = r.code.unwrap_or(0);
                Ok(Some(Head { len, upgrade: status == 101, body: body_of(r.headers, false, status)? }))
            }
            Ok(httparse::Status::Partial) => Ok(None),
            Err(e) => Err(format!("not an HTTP response head ({e})")),
        };
    }
    let mut r = httparse::Request::new(&mut headers);
    match r.parse(bytes) {
        Ok(httparse::Status::Complete(len)) => {
            let upgrade = header(r.headers, "upgrade").is_some_and(|v| v.eq_ignore_ascii_case(b"websocket"));
            Ok(Some(Head { len, upgrade, body: body_of(r.headers, true, 0)? }))
        }
        Ok(httparse::Status::Partial) => Ok(None),
        // Only the first byte is named: how much more was buffered depends on the segments.
        Err(e) => Err(format!("not HTTP (its first byte is {:#04x}: {e})", bytes.first().copied().unwrap_or(0))),
    }
}

/// The head's lines without Transfer-Encoding and Content-Length, the body's length
/// when there is a body, then the body.
fn normal_form(head: &[u8], body: &[u8]) -> Vec<u8> {
    let text = String::from_utf8_lossy(head);
    let mut out = String::with_capacity(head.len() + 24);
    // `lines`: httparse takes bare LF line ends too; the normal form has CRLF.
    for line in text.lines().filter(|l| !l.is_empty()) {
        let name = line.split(':').next().unwrap_or_default().trim();
        if name.eq_ignore_ascii_case("transfer-encoding") || name.eq_ignore_ascii_case("content-length") {
            continue;
        }
        out.push_str(line);
        out.push_str("\r\n");
    }
    if !body.is_empty() || text.starts_with("HTTP/") {
        out.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    out.push_str("\r\n");
    let mut bytes = out.into_bytes();
    bytes.extend_from_slice(body);
    bytes
}

/// A live request in the normal form: `METHOD TARGET HTTP/1.1`, its headers, the body.
pub fn request_message<'h>(method: &str, target: &str, headers: impl Iterator<Item = (&'h str, &'h [u8])>, body: &[u8]) -> Vec<u8> {
    let mut head = format!("{method} {target} HTTP/1.1\r\n").into_bytes();
    for (name, value) in headers {
        head.extend_from_slice(name.as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(value);
        head.extend_from_slice(b"\r\n");
    }
    head.extend_from_slice(b"\r\n");
    normal_form(&head, body)
}

/// A request in the normal form (or any whole request): its method and target, and its
/// body. `None` for anything else.
pub fn request_parts(bytes: &[u8]) -> Option<(String, String, &[u8])> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut r = httparse::Request::new(&mut headers);
    let httparse::Status::Complete(len) = r.parse(bytes).ok()? else { return None };
    Some((r.method?.to_string(), r.path?.to_string(), &bytes[len..]))
}

/// A response in the normal form: status, headers (without the ones the server that
/// sends it sets: length, encoding, connection, date) and body. `None` for anything else.
pub fn response_parts(bytes: &[u8]) -> Option<(u16, Vec<(String, Vec<u8>)>, &[u8])> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut r = httparse::Response::new(&mut headers);
    let httparse::Status::Complete(len) = r.parse(bytes).ok()? else { return None };
    let hop = ["content-length", "transfer-encoding", "connection", "keep-alive", "date"];
    let kept = r.headers.iter().filter(|h| !hop.iter().any(|n| h.name.eq_ignore_ascii_case(n))).map(|h| (h.name.to_string(), h.value.to_vec())).collect();
    Some((r.code?, kept, &bytes[len..]))
}

/// Lets `fit` change the body of a whole message (a replayed answer fitted to the live
/// request), its Content-Length following. Anything else is left as it is.
pub fn fit_body(message: &mut Vec<u8>, fit: impl FnOnce(&mut Vec<u8>)) {
    let Some(end) = find(message, b"\r\n\r\n").map(|p| p + 4) else { return };
    let mut body = message[end..].to_vec();
    let before = body.clone();
    fit(&mut body);
    if body != before {
        *message = normal_form(&message[..end], &body);
    }
}

/// Whether `bytes` start like an HTTP request (a method token, a space, a target).
pub fn is_request(bytes: &[u8]) -> bool {
    request_parts(bytes).is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_all(stream: &[u8], piece: usize) -> Vec<HttpOutput> {
        let (mut r, mut buf, mut out) = (HttpReader::default(), Vec::new(), Vec::new());
        for p in stream.chunks(piece) {
            buf.extend_from_slice(p);
            let used = r.read(&buf, &mut out);
            buf.drain(..used);
        }
        out
    }

    #[test]
    fn keep_alive_requests_and_sized_and_chunked_answers_in_any_pieces() {
        let requests = b"GET /shelly HTTP/1.1\r\nHost: d\r\n\r\nPOST /rpc HTTP/1.1\r\nHost: d\r\nContent-Length: 5\r\n\r\nhello";
        let answers = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}HTTP/1.1 401 Unauthorized\r\nTransfer-Encoding: chunked\r\n\r\n3;x=1\r\nabc\r\n2\r\nde\r\n0\r\n\r\n";
        for piece in [1, 7, 1000] {
            let out = read_all(requests, piece);
            assert_eq!(out, vec![HttpOutput::Message(b"GET /shelly HTTP/1.1\r\nHost: d\r\n\r\n".to_vec()), HttpOutput::Message(b"POST /rpc HTTP/1.1\r\nHost: d\r\nContent-Length: 5\r\n\r\nhello".to_vec())]);
            let out = read_all(answers, piece);
            assert_eq!(out[0], HttpOutput::Message(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}".to_vec()));
            assert_eq!(out[1], HttpOutput::Message(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 5\r\n\r\nabcde".to_vec()), "piece {piece}");
        }
        let HttpOutput::Message(m) = &read_all(answers, 3)[1] else { panic!() };
        let (status, headers, body) = response_parts(m).unwrap();
        assert_eq!((status, headers.len(), body), (401, 0, &b"abcde"[..]));
        let HttpOutput::Message(m) = &read_all(requests, 3)[1] else { panic!() };
        assert_eq!(request_parts(m), Some(("POST".into(), "/rpc".into(), &b"hello"[..])));
    }

    #[test]
    fn an_upgrade_stops_the_reader_and_other_bytes_are_not_http() {
        let mut out = Vec::new();
        let s = b"GET /rpc HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n\x81\x02hi";
        let used = HttpReader::default().read(s, &mut out);
        assert_eq!((out, &s[used..]), (vec![HttpOutput::Upgraded], &b"\x81\x02hi"[..]));
        let mut out = Vec::new();
        HttpReader::default().read(b"\x16\x03\x01\x02\x00\x01\x00", &mut out);
        assert!(matches!(&out[..], [HttpOutput::NotHttp { what }] if what.contains("not HTTP")), "{out:?}");
        let mut out = Vec::new();
        HttpReader::default().read(b"HTTP/1.1 200 OK\r\n\r\nbody to the end", &mut out);
        assert!(matches!(&out[..], [HttpOutput::NotHttp { what }] if what.contains("without Content-Length")), "{out:?}");
        let mut out = Vec::new();
        let mut endless_trailer = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n".to_vec();
        endless_trailer.extend(std::iter::repeat_n(b'x', MAX_HEAD + 1));
        let (mut r, mut held) = (HttpReader::default(), Vec::new());
        for piece in endless_trailer.chunks(1000) {
            held.extend_from_slice(piece);
            let used = r.read(&held, &mut out);
            held.drain(..used);
        }
        assert!(matches!(&out[..], [HttpOutput::NotHttp { what }] if what.contains("trailer")), "{out:?}");
        assert!(held.len() <= MAX_HEAD + 1000, "a trailer that never ends is not held: {} bytes", held.len());
        let mut out = Vec::new();
        HttpReader::default().read(b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999\r\n\r\n", &mut out);
        assert!(matches!(&out[..], [HttpOutput::NotHttp { what }] if what.contains("limit")), "{out:?}");
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut rng = 0x2545_f491_4f6c_dd1du64;
        for i in 0..3000 {
            let mut r = HttpReader::default();
            let (mut buf, mut out) = (Vec::new(), Vec::new());
            if i % 2 == 0 {
                buf.extend_from_slice(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n");
            }
            for _ in 0..20 {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                buf.extend(rng.to_le_bytes().iter().cycle().take((rng % 40) as usize).copied());
                let used = r.read(&buf, &mut out);
                buf.drain(..used);
                for o in &out {
                    if let HttpOutput::Message(m) = o {
                        let _ = (request_parts(m), response_parts(m));
                    }
                }
            }
        }
    }
}
