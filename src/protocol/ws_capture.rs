//! One direction of a captured HTTP/1.1 or WebSocket connection, from its TCP bytes to
//! messages: HTTP messages ([`crate::protocol::http_message`]) until an upgrade (a `GET …
//! Upgrade: websocket` request, a `101` answer), then WebSocket frames (unmasked,
//! fragments joined; pings, pongs and closes skipped). What `capture import` needs for
//! Shelly RPC (HTTP and WebSocket) and BACnet/SC captures. Sans-IO, never panics, bounded.

use std::io::Cursor;

use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::FrameHeader;

use super::http_message::{HttpOutput, HttpReader};

/// The longest message kept; past it the stream is given up.
const MAX_MESSAGE: usize = 4 << 20;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WsOutput {
    /// A whole message (TEXT or BINARY, its fragments joined).
    Message { text: bool, payload: Vec<u8> },
    /// A whole HTTP message, in [`crate::protocol::http_message`]'s normal form.
    Http(Vec<u8>),
    /// Why bytes could not be read as WebSocket; the stream is given up when `fatal`.
    Gap { what: String, fatal: bool },
    /// The stream is neither HTTP nor WebSocket (TLS, another protocol); given up.
    NotHttp { what: String },
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum State {
    #[default]
    Http,
    Frames,
    /// Mid-stream capture or a given-up stream: nothing more is read.
    Done,
}

#[derive(Debug, Default)]
pub struct WsDirection {
    state: State,
    http: HttpReader,
    buf: Vec<u8>,
    /// A fragmented message being joined: its kind and bytes so far.
    partial: Option<(bool, Vec<u8>)>,
}

impl WsDirection {
    /// Bytes of this direction in order.
    pub fn push(&mut self, bytes: &[u8], out: &mut Vec<WsOutput>) {
        if self.state == State::Done {
            return;
        }
        self.buf.extend_from_slice(bytes);
        if self.state == State::Http {
            self.http(out);
        }
        if self.state == State::Frames {
            self.frames(out);
        }
    }

    /// Bytes of this direction were never captured: a frame cannot be found after them.
    pub fn missing(&mut self, n: u64, out: &mut Vec<WsOutput>) {
        if self.state != State::Done {
            out.push(WsOutput::Gap { what: format!("{n} bytes of the stream were not captured; the rest of it is not read"), fatal: true });
        }
        self.give_up();
    }

    fn give_up(&mut self) {
        self.state = State::Done;
        self.buf = Vec::new();
        self.partial = None;
    }

    fn http(&mut self, out: &mut Vec<WsOutput>) {
        let mut read = Vec::new();
        let used = self.http.read(&self.buf, &mut read);
        self.buf.drain(..used);
        for r in read {
            match r {
                HttpOutput::Message(m) => out.push(WsOutput::Http(m)),
                HttpOutput::Upgraded => self.state = State::Frames,
                HttpOutput::NotHttp { what } => {
                    out.push(WsOutput::NotHttp { what });
                    self.give_up();
                }
            }
        }
    }

    fn frames(&mut self, out: &mut Vec<WsOutput>) {
        let mut used = 0;
        loop {
            let mut cursor = Cursor::new(&self.buf[used..]);
            let (header, len) = match FrameHeader::parse(&mut cursor) {
                Ok(Some(h)) => h,
                Ok(None) => break,
                Err(e) => {
                    out.push(WsOutput::Gap { what: format!("a WebSocket frame header that does not parse: {e}"), fatal: true });
                    self.give_up();
                    return;
                }
            };
            let at = used + cursor.position() as usize;
            let Ok(len) = usize::try_from(len) else { return self.too_long(len, out) };
            if len > MAX_MESSAGE {
                return self.too_long(len as u64, out);
            }
            if self.buf.len() < at + len {
                break;
            }
            let mut payload = self.buf[at..at + len].to_vec();
            if let Some(mask) = header.mask {
                payload.iter_mut().enumerate().for_each(|(i, b)| *b ^= mask[i % 4]);
            }
            used = at + len;
            self.frame(header.opcode, header.is_final, payload, out);
        }
        self.buf.drain(..used);
    }

    fn frame(&mut self, opcode: OpCode, fin: bool, payload: Vec<u8>, out: &mut Vec<WsOutput>) {
        let started = match opcode {
            OpCode::Control(_) => return,
            OpCode::Data(Data::Text) => Some(true),
            OpCode::Data(Data::Binary) => Some(false),
            OpCode::Data(Data::Continue) => None,
            OpCode::Data(Data::Reserved(_)) => {
                out.push(WsOutput::Gap { what: "a frame with a reserved opcode, skipped".into(), fatal: false });
                return;
            }
        };
        let (text, mut bytes) = match (started, self.partial.take()) {
            (Some(text), None) => (text, Vec::new()),
            (None, Some(p)) => p,
            (Some(text), Some(_)) => {
                out.push(WsOutput::Gap { what: "a message began before the fragmented one was finished; the unfinished one is dropped".into(), fatal: false });
                (text, Vec::new())
            }
            (None, None) => {
                out.push(WsOutput::Gap { what: "a continuation frame with no message begun, skipped".into(), fatal: false });
                return;
            }
        };
        if bytes.len() + payload.len() > MAX_MESSAGE {
            return self.too_long((bytes.len() + payload.len()) as u64, out);
        }
        bytes.extend_from_slice(&payload);
        if fin {
            out.push(WsOutput::Message { text, payload: bytes });
        } else {
            self.partial = Some((text, bytes));
        }
    }

    fn too_long(&mut self, len: u64, out: &mut Vec<WsOutput>) {
        out.push(WsOutput::Gap { what: format!("a {len}-byte WebSocket message, past the {MAX_MESSAGE}-byte limit"), fatal: true });
        self.give_up();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(fin: bool, opcode: u8, mask: Option<[u8; 4]>, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![u8::from(fin) << 7 | opcode];
        let m = if mask.is_some() { 0x80 } else { 0 };
        match payload.len() {
            n if n < 126 => f.push(m | n as u8),
            n => {
                f.push(m | 126);
                f.extend_from_slice(&(n as u16).to_be_bytes());
            }
        }
        let mut p = payload.to_vec();
        if let Some(k) = mask {
            f.extend_from_slice(&k);
            p.iter_mut().enumerate().for_each(|(i, b)| *b ^= k[i % 4]);
        }
        f.extend_from_slice(&p);
        f
    }

    #[test]
    fn an_upgrade_then_masked_fragmented_and_control_frames_become_messages() {
        let mut stream = b"GET /rpc HTTP/1.1\r\nHost: shelly\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n".to_vec();
        stream.extend(frame(true, 1, Some([1, 2, 3, 4]), br#"{"id":1,"method":"Shelly.GetStatus"}"#));
        stream.extend(frame(true, 9, Some([9, 9, 9, 9]), b"ping"));
        stream.extend(frame(false, 2, Some([5, 6, 7, 8]), &[1, 2, 3]));
        stream.extend(frame(true, 0, Some([5, 6, 7, 8]), &[4; 300]));
        // Byte by byte, as TCP may deliver it.
        let mut d = WsDirection::default();
        let mut out = Vec::new();
        for b in &stream {
            d.push(std::slice::from_ref(b), &mut out);
        }
        assert_eq!(out.len(), 2, "{out:?}");
        assert_eq!(out[0], WsOutput::Message { text: true, payload: br#"{"id":1,"method":"Shelly.GetStatus"}"#.to_vec() });
        let WsOutput::Message { text: false, payload } = &out[1] else { panic!("{out:?}") };
        assert_eq!((payload.len(), &payload[..4]), (303, &[1, 2, 3, 4][..]));
    }

    #[test]
    fn plain_http_is_read_and_broken_frames_are_reported() {
        let mut d = WsDirection::default();
        let mut out = Vec::new();
        d.push(b"GET /rpc/Shelly.GetStatus HTTP/1.1\r\nHost: x\r\n\r\nGET /shelly HTTP/1.1\r\n\r\n", &mut out);
        assert_eq!(out, vec![WsOutput::Http(b"GET /rpc/Shelly.GetStatus HTTP/1.1\r\nHost: x\r\n\r\n".to_vec()), WsOutput::Http(b"GET /shelly HTTP/1.1\r\n\r\n".to_vec())]);
        let mut d = WsDirection::default();
        let mut out = Vec::new();
        d.push(b"\x16\x03\x01\x00\x05hello", &mut out);
        assert!(matches!(&out[..], [WsOutput::NotHttp { .. }]), "{out:?}");
        let mut d = WsDirection::default();
        let mut out = Vec::new();
        d.push(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n", &mut out);
        d.push(&frame(true, 0, None, b"lost"), &mut out);
        d.push(&[0xff, 0x7f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff], &mut out);
        assert!(matches!(&out[0], WsOutput::Gap { fatal: false, .. }), "{out:?}");
        assert!(matches!(&out[1], WsOutput::Gap { fatal: true, .. }), "{out:?}");
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut rng = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..2000 {
            let mut d = WsDirection::default();
            let mut out = Vec::new();
            d.push(b"HTTP/1.1 101 Switching Protocols\r\n\r\n", &mut out);
            for _ in 0..20 {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                let chunk: Vec<u8> = rng.to_le_bytes().iter().cycle().take((rng % 40) as usize).copied().collect();
                d.push(&chunk, &mut out);
            }
        }
    }
}
