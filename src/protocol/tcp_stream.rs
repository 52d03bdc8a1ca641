//! One direction of a captured TCP connection put back in order: what `capture import`
//! needs to read the byte stream a WebSocket rides on. Sans-IO, never panics, bounded.
//!
//! Segments come as the capture has them: retransmitted (trimmed to what is new),
//! overlapping, out of order (held until the hole before them fills, up to a bound),
//! or after bytes the capture never saw (a gap: the stream goes on after it).

use std::collections::BTreeMap;

/// Out-of-order segments held per direction, and their bytes, before a hole is given up.
const MAX_HELD_SEGMENTS: usize = 256;
const MAX_HELD_BYTES: usize = 4 << 20;

/// What one direction delivered: bytes in order, or a hole in them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TcpOutput {
    Bytes(Vec<u8>),
    /// This many bytes were never captured; what follows comes after them.
    Missing(u64),
}

#[derive(Debug, Default)]
pub struct TcpDirection {
    /// The next sequence number in order; `None` until the first segment.
    next: Option<u32>,
    held: BTreeMap<u32, Vec<u8>>,
    held_bytes: usize,
}

impl TcpDirection {
    /// A segment with sequence number `seq`. A SYN takes one sequence number.
    pub fn push(&mut self, seq: u32, syn: bool, payload: &[u8], out: &mut Vec<TcpOutput>) {
        let (seq, payload) = if syn { (seq.wrapping_add(1), payload) } else { (seq, payload) };
        let next = *self.next.get_or_insert(seq);
        if syn && payload.is_empty() {
            self.next = Some(seq);
            return;
        }
        if payload.is_empty() {
            return;
        }
        // Signed distance from what is expected: behind is old (trim), ahead is a hole.
        let ahead = seq.wrapping_sub(next) as i32;
        if ahead > 0 {
            self.hold(seq, payload, out);
            return;
        }
        let old = ahead.unsigned_abs() as usize;
        if old >= payload.len() {
            return; // all retransmitted
        }
        self.deliver(&payload[old..], out);
        self.drain(out);
    }

    /// Gives up on every hole: the held bytes come out, each after its gap.
    pub fn finish(&mut self, out: &mut Vec<TcpOutput>) {
        while self.skip_hole(out) {}
    }

    fn deliver(&mut self, bytes: &[u8], out: &mut Vec<TcpOutput>) {
        let next = self.next.unwrap_or(0);
        self.next = Some(next.wrapping_add(bytes.len() as u32));
        match out.last_mut() {
            Some(TcpOutput::Bytes(b)) => b.extend_from_slice(bytes),
            _ => out.push(TcpOutput::Bytes(bytes.to_vec())),
        }
    }

    fn hold(&mut self, seq: u32, payload: &[u8], out: &mut Vec<TcpOutput>) {
        if self.held.insert(seq, payload.to_vec()).is_none() {
            self.held_bytes += payload.len();
        }
        while self.held.len() > MAX_HELD_SEGMENTS || self.held_bytes > MAX_HELD_BYTES {
            if !self.skip_hole(out) {
                break;
            }
        }
    }

    /// Segments held that the stream has reached, in order.
    fn drain(&mut self, out: &mut Vec<TcpOutput>) {
        loop {
            let Some(next) = self.next else { return };
            // The held segment nearest ahead of (or reaching back over) `next`.
            let Some((&seq, _)) = self.held.iter().min_by_key(|(s, _)| s.wrapping_sub(next).wrapping_add(1 << 31)) else { return };
            let ahead = seq.wrapping_sub(next) as i32;
            if ahead > 0 {
                return;
            }
            let payload = self.held.remove(&seq).unwrap_or_default();
            self.held_bytes -= payload.len();
            let old = ahead.unsigned_abs() as usize;
            if old < payload.len() {
                self.deliver(&payload[old..], out);
            }
        }
    }

    /// Skips to the nearest held segment: false when nothing is held.
    fn skip_hole(&mut self, out: &mut Vec<TcpOutput>) -> bool {
        let next = self.next.unwrap_or(0);
        let Some(&seq) = self.held.keys().min_by_key(|s| s.wrapping_sub(next)) else { return false };
        out.push(TcpOutput::Missing(u64::from(seq.wrapping_sub(next))));
        self.next = Some(seq);
        self.drain(out);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(out: &[TcpOutput]) -> Vec<u8> {
        out.iter().flat_map(|o| if let TcpOutput::Bytes(b) = o { b.clone() } else { Vec::new() }).collect()
    }

    #[test]
    fn retransmissions_overlaps_and_reordering_come_out_in_order() {
        let mut d = TcpDirection::default();
        let mut out = Vec::new();
        d.push(u32::MAX - 2, true, b"", &mut out); // the SYN: data starts at MAX - 1
        d.push(u32::MAX - 1, false, b"abc", &mut out); // wraps the sequence space
        d.push(4, false, b"ghi", &mut out); // ahead of "def": held
        d.push(1, false, b"def", &mut out);
        d.push(u32::MAX - 1, false, b"abcd", &mut out); // retransmitted, nothing new
        assert_eq!(bytes(&out), b"abcdefghi");
        assert!(!out.iter().any(|o| matches!(o, TcpOutput::Missing(_))), "{out:?}");
    }

    #[test]
    fn a_hole_never_filled_is_reported_at_the_end() {
        let mut d = TcpDirection::default();
        let mut out = Vec::new();
        d.push(100, false, b"ab", &mut out);
        d.push(110, false, b"xy", &mut out);
        d.finish(&mut out);
        assert_eq!(out, vec![TcpOutput::Bytes(b"ab".to_vec()), TcpOutput::Missing(8), TcpOutput::Bytes(b"xy".to_vec())]);
    }

    #[test]
    fn random_segments_never_panic_and_hold_a_bounded_amount() {
        let mut rng = 0x1234_5678_9abc_def0u64;
        let mut next = || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let mut d = TcpDirection::default();
        let mut out = Vec::new();
        for _ in 0..20_000 {
            let r = next();
            let len = (r % 3000) as usize;
            d.push((r >> 16) as u32, r & 0x100 != 0, &vec![0u8; len], &mut out);
            assert!(d.held.len() <= MAX_HELD_SEGMENTS && d.held_bytes <= MAX_HELD_BYTES);
            out.clear();
        }
        d.finish(&mut out);
    }
}
