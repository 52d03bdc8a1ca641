//! Cuts a serial byte stream into frames the way a pack's UART driver does.
//!
//! A real RTU slave delimits frames by silence (3.5 character times). A PTY
//! has no timing, and waiting for silence on every frame would add
//! milliseconds to each round trip, so we also end a frame as soon as its
//! length is known and its checksum is right. Anything else (garbage, a
//! truncated frame, a bad CRC) stays in the buffer until the line goes
//! silent and is then handed on as one frame, which the device will reject
//! exactly as a real one does.

use crate::protocol::eg4_legacy;
use crate::protocol::modbus::{self, FrameLength};

/// Which side of the conversation the bytes come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamRole {
    /// A master's requests.
    Requests,
    /// Devices' replies.
    Responses,
    /// Both, as a listener on a bus hears them; the CRC tells which length
    /// is right.
    Either,
}

/// The longest frame either protocol allows: Modbus RTU 256 bytes, EG4
/// legacy 6 + 255.
const MAX_FRAME: usize = 6 + eg4_legacy::MAX_PAYLOAD;

#[derive(Debug)]
pub struct StreamFramer {
    role: StreamRole,
    buf: Vec<u8>,
}

impl StreamFramer {
    pub fn new(role: StreamRole) -> Self {
        StreamFramer {
            role,
            buf: Vec::with_capacity(512),
        }
    }

    pub fn set_role(&mut self, role: StreamRole) {
        self.role = role;
    }

    pub fn pending(&self) -> usize {
        self.buf.len()
    }

    /// Length of a complete, checksum-valid frame at the start of `buf`.
    fn valid_frame(&self) -> Option<usize> {
        let b = &self.buf;
        if b.first() == Some(&0x7E) {
            if let FrameLength::Complete(n) = eg4_legacy::frame_length(b) {
                return Some(n);
            }
        }
        let check = |len: FrameLength| match len {
            FrameLength::Complete(n) if n >= 4 && n <= b.len() => {
                let crc = modbus::crc16(&b[..n - 2]);
                (crc.to_le_bytes() == [b[n - 2], b[n - 1]]).then_some(n)
            }
            _ => None,
        };
        match self.role {
            StreamRole::Requests => check(modbus::request_frame_length(b)),
            StreamRole::Responses => check(modbus::response_frame_length(b)),
            StreamRole::Either => {
                check(modbus::request_frame_length(b)).or_else(|| check(modbus::response_frame_length(b)))
            }
        }
    }

    /// Adds bytes; returns the frames that are now complete and valid.
    /// Leftovers wait for more bytes or for [`StreamFramer::flush`], except
    /// that bytes beyond the longest possible frame are handed on at once
    /// as one bad frame (as a UART receiver overruns), so a line that never
    /// goes quiet cannot grow the buffer without bound.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<Vec<u8>> {
        self.buf.extend_from_slice(bytes);
        let mut out = Vec::new();
        loop {
            if let Some(n) = self.valid_frame() {
                out.push(self.buf.drain(..n).collect());
            } else if self.buf.len() > MAX_FRAME {
                out.push(self.buf.drain(..MAX_FRAME).collect());
            } else {
                break;
            }
        }
        out
    }

    /// The line went silent: whatever is buffered is one (bad) frame.
    pub fn flush(&mut self) -> Option<Vec<u8>> {
        (!self.buf.is_empty()).then(|| std::mem::take(&mut self.buf))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req() -> Vec<u8> {
        let mut v = vec![1, 3, 0, 0, 0, 0x2F];
        modbus::append_crc(&mut v);
        v
    }

    #[test]
    fn whole_and_split_requests() {
        let mut f = StreamFramer::new(StreamRole::Requests);
        assert_eq!(f.push(&req()), vec![req()]);
        let r = req();
        assert!(f.push(&r[..3]).is_empty());
        assert_eq!(f.push(&r[3..]), vec![req()]);
        let mut two = req();
        two.extend(req());
        assert_eq!(f.push(&two).len(), 2);
    }

    #[test]
    fn garbage_waits_for_silence() {
        let mut f = StreamFramer::new(StreamRole::Requests);
        let mut g = vec![0x55, 0x12];
        g.extend(req());
        assert!(f.push(&g).is_empty());
        assert_eq!(f.flush(), Some(g));
        assert_eq!(f.flush(), None);
    }

    #[test]
    fn either_role_splits_request_and_reply_in_one_chunk() {
        let mut f = StreamFramer::new(StreamRole::Either);
        let mut reply = vec![1, 3, 4, 0, 1, 0, 2];
        modbus::append_crc(&mut reply);
        let mut chunk = req();
        chunk.extend(&reply);
        assert_eq!(f.push(&chunk), vec![req(), reply]);
    }

    #[test]
    fn endless_garbage_is_bounded() {
        let mut f = StreamFramer::new(StreamRole::Requests);
        let mut junk = 0;
        for _ in 0..100 {
            junk += f.push(&[0x55; 100]).len();
            assert!(f.pending() <= MAX_FRAME);
        }
        assert!(junk >= 30, "{junk}");
        // A good request after the noise (and a quiet line) still frames.
        f.flush();
        assert_eq!(f.push(&req()), vec![req()]);
    }

    #[test]
    fn legacy_frames() {
        let mut f = StreamFramer::new(StreamRole::Requests);
        let r = eg4_legacy::encode_request(1, eg4_legacy::LegacyCommand::GeneralStatus);
        assert_eq!(f.push(&r), vec![r.to_vec()]);
    }
}
