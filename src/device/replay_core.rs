//! A device that answers as a capture did: the core of the `replay` kind.
//!
//! It holds a fixture's frames in order. A request is matched against the captured
//! requests, starting after the last one matched and wrapping round once, so a client
//! that polls in the captured order walks the capture and one that repeats a request
//! gets that request's answer again. The answer is what the device sent after the
//! matched request in the capture, until the next request, byte for byte: a reply with
//! a broken CRC, a split frame, an echo, or nothing at all replay as they were. A request
//! that matches nothing is reported ([`ReplayEvent::Unmatched`]) and gets no answer, as
//! a device stays silent on a frame it cannot use. On a shared bus the first byte of a
//! request addresses the device (a Modbus slave address; 0x7E and 0xDD start every
//! EG4-legacy and JBD frame alike): a request whose first byte starts no captured request
//! is for another device, and is ignored without a report.
//!
//! Matching is byte for byte unless the captured kind gives a [`ReplayRule`] (SMP: the
//! sequence number is left out of the match and echoed in the answer). An HTTP request
//! ([`crate::protocol::http_message`]'s form) matches by method, target and body (the
//! rule's key of the body), not by its headers (a digest `Authorization`, a `Date`
//! change from run to run); the rule fits the body of its answer.
//!
//! Timing: by default every answer goes out at once (the capture's timing compressed).
//! With [`ReplayCore::keep_timing`] each answer goes out as long after the live request as
//! it came after the captured one, so a slow answer, a late second piece or a device that
//! answered after the client gave up replay as they were; answers wait in a queue the
//! host drains through [`SansIoCore::next_wakeup`] and `Input::Timeout`.

use std::time::Duration;

use crate::link::recognise::ReplayRule;
use crate::protocol::http_message;
use crate::link::record::Direction;
use crate::sans_io::{Input, Output, SansIoCore};

/// What the replay did with a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplayEvent {
    /// Matched captured request `index` (0-based among the fixture's frames) and sent
    /// `answers` frames (0: the device was silent in the capture).
    Answered { index: usize, answers: usize },
    /// No captured request is this one.
    Unmatched { bytes: Vec<u8> },
}

/// At most this many answers, and this many bytes of them, wait for their time (a client
/// flooding a slow replay); past either bound an answer goes at once rather than be lost.
pub const MAX_PENDING: usize = 4096;
pub const MAX_PENDING_BYTES: usize = 4 << 20;

#[derive(Debug, Clone)]
pub struct ReplayCore {
    frames: Vec<(Direction, Vec<u8>)>,
    /// Each captured request's match key (the rule's, or its bytes), computed once: a
    /// request is compared with every captured one, and must not cost an allocation each.
    keys: Vec<Option<Vec<u8>>>,
    /// The first bytes captured requests start with (`None`: an empty request), which on a
    /// shared bus address the device.
    addresses: std::collections::BTreeSet<Option<u8>>,
    /// Bytes in `pending`.
    pending_bytes: usize,
    /// Each frame's captured time (ns since the first), when the timing is kept.
    times: Option<Vec<u64>>,
    /// Answers waiting for their time: (due, to, bytes), in due order.
    pending: std::collections::VecDeque<(Duration, crate::sans_io::Peer, Vec<u8>)>,
    /// Where the next search starts.
    cursor: usize,
    /// The captured kind's matching rule (none: byte for byte).
    rule: Option<ReplayRule>,
    /// Where in a frame the kind's message starts, which the rule reads and fits (after
    /// a BLE replay's class and characteristic); the bytes before it match as they are.
    rule_at: usize,
    /// On a shared bus, requests for other devices are ignored (see the module docs).
    shared_bus: bool,
}

impl ReplayCore {
    /// A core over the fixture's frames, in captured order.
    pub fn new(frames: Vec<(Direction, Vec<u8>)>) -> Self {
        Self::with_rule(frames, None)
    }

    /// A core that matches and answers by the captured kind's rule.
    pub fn with_rule(frames: Vec<(Direction, Vec<u8>)>, rule: Option<ReplayRule>) -> Self {
        Self::with_rule_at(frames, rule, 0)
    }

    /// A core whose frames carry the kind's message from byte `at` on (a BLE replay's
    /// frames: class and characteristic first); the rule reads and fits that part.
    pub fn with_rule_at(frames: Vec<(Direction, Vec<u8>)>, rule: Option<ReplayRule>, at: usize) -> Self {
        let keys = frames.iter().map(|(d, b)| (*d == Direction::Request).then(|| match_key(rule, at, b))).collect();
        let addresses = frames.iter().filter(|(d, _)| *d == Direction::Request).map(|(_, b)| b.first().copied()).collect();
        ReplayCore { frames, keys, addresses, pending_bytes: 0, times: None, pending: Default::default(), cursor: 0, rule, rule_at: at, shared_bus: true }
    }

    /// The device has a link of its own (UDP, a connection): every request is for it.
    pub fn alone(mut self) -> Self {
        self.shared_bus = false;
        self
    }

    /// Answers keep their captured delay after the request (`times`: each frame's captured
    /// time in ns, as many as frames; otherwise the timing stays compressed).
    pub fn keep_timing(mut self, times: Vec<u64>) -> Self {
        if times.len() == self.frames.len() {
            self.times = Some(times);
        }
        self
    }

    /// How many captured requests there are.
    pub fn requests(&self) -> usize {
        self.frames.iter().filter(|(d, _)| *d == Direction::Request).count()
    }

    fn find(&self, bytes: &[u8]) -> Option<usize> {
        let n = self.frames.len();
        let wanted = match_key(self.rule, self.rule_at, bytes);
        (0..n).map(|k| (self.cursor + k) % n).find(|&i| self.keys[i].as_deref() == Some(&wanted[..]))
    }
}

/// A request's match key: the bytes before `at` as they are, the rest by the rule; an
/// HTTP request by its method, target and body.
fn match_key(rule: Option<ReplayRule>, at: usize, b: &[u8]) -> Vec<u8> {
    if at == 0 {
        if let Some((method, target, body)) = http_message::request_parts(b) {
            let mut k = format!("{method} {target}\n").into_bytes();
            k.extend_from_slice(&rule.map_or_else(|| body.to_vec(), |r| (r.key)(body)));
            return k;
        }
    }
    match (rule, b.get(at..)) {
        (Some(r), Some(message)) => {
            let mut k = b[..at].to_vec();
            k.extend_from_slice(&(r.key)(message));
            k
        }
        _ => b.to_vec(),
    }
}

impl SansIoCore for ReplayCore {
    type Event = ReplayEvent;

    fn handle_input(&mut self, input: Input<'_>, now: Duration, out: &mut Vec<Output<ReplayEvent>>) -> Result<(), String> {
        match input {
            Input::Bytes { from, bytes } => {
                if self.shared_bus && !self.addresses.contains(&bytes.first().copied()) {
                    return Ok(());
                }
                let Some(i) = self.find(bytes) else {
                    out.push(Output::Event(ReplayEvent::Unmatched { bytes: bytes.to_vec() }));
                    return Ok(());
                };
                let mut answers = 0;
                let mut j = i + 1;
                while let Some((Direction::Response, b)) = self.frames.get(j) {
                    let mut b = b.clone();
                    if let (Some(r), Some((_, _, req))) = (self.rule, http_message::request_parts(bytes).filter(|_| self.rule_at == 0)) {
                        http_message::fit_body(&mut b, |body| (r.answer)(req, body));
                    } else if let (Some(r), Some(req)) = (self.rule, bytes.get(self.rule_at..)) {
                        if b.len() >= self.rule_at {
                            let mut message = b.split_off(self.rule_at);
                            (r.answer)(req, &mut message);
                            b.extend_from_slice(&message);
                        }
                    }
                    match &self.times {
                        Some(t) if self.pending.len() < MAX_PENDING && self.pending_bytes + b.len() <= MAX_PENDING_BYTES => {
                            let after = Duration::from_nanos(t[j].saturating_sub(t[i]));
                            let due = now.saturating_add(after);
                            // Due times only grow within one answer; later requests may overtake.
                            let at = self.pending.partition_point(|(d, _, _)| *d <= due);
                            self.pending_bytes += b.len();
                            self.pending.insert(at, (due, from, b));
                        }
                        // Past the bound the answer goes at once rather than be lost.
                        _ => out.push(Output::Send { to: from, bytes: b }),
                    }
                    answers += 1;
                    j += 1;
                }
                self.cursor = j % self.frames.len().max(1);
                out.push(Output::Event(ReplayEvent::Answered { index: i, answers }));
                self.flush(now, out);
                Ok(())
            }
            Input::Timeout => {
                self.flush(now, out);
                Ok(())
            }
            Input::Set { key, .. } => Err(format!("a replayed device has no state to set (`{key}`): it answers as the capture did")),
            // Answers still waiting for a peer that went reach nobody.
            Input::Disconnected(peer) => {
                self.pending.retain(|(_, to, _)| *to != peer);
                self.pending_bytes = self.pending.iter().map(|(_, _, b)| b.len()).sum();
                Ok(())
            }
            Input::Connected(_) => Ok(()),
        }
    }

    fn next_wakeup(&self) -> Option<Duration> {
        self.pending.front().map(|(due, _, _)| *due)
    }
}

impl ReplayCore {
    /// Sends the waiting answers whose time has come.
    fn flush(&mut self, now: Duration, out: &mut Vec<Output<ReplayEvent>>) {
        while self.pending.front().is_some_and(|(due, _, _)| *due <= now) {
            if let Some((_, to, bytes)) = self.pending.pop_front() {
                self.pending_bytes -= bytes.len();
                out.push(Output::Send { to, bytes });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sans_io::Peer;

    fn core() -> ReplayCore {
        use Direction::*;
        ReplayCore::new(vec![
            (Request, b"A".to_vec()),
            (Response, b"a1".to_vec()),
            (Request, b"B".to_vec()),
            (Request, b"A".to_vec()),
            (Response, b"a2".to_vec()),
            (Response, b"a2-echo".to_vec()),
        ])
    }

    fn ask(c: &mut ReplayCore, b: &[u8]) -> Vec<Output<ReplayEvent>> {
        let mut out = Vec::new();
        c.handle_input(Input::Bytes { from: Peer::ONLY, bytes: b }, Duration::ZERO, &mut out).unwrap();
        out
    }

    fn sent(out: &[Output<ReplayEvent>]) -> Vec<&[u8]> {
        out.iter().filter_map(|o| if let Output::Send { bytes, .. } = o { Some(&bytes[..]) } else { None }).collect()
    }

    /// An HTTP request matches by method, target and body whatever its headers; with a
    /// rule, the body matches by the rule's key and the answer's body is fitted (its
    /// Content-Length following).
    #[test]
    fn http_requests_match_without_headers_and_answers_fit_their_body() {
        use Direction::*;
        let rule = ReplayRule {
            key: |b| b.iter().filter(|c| !c.is_ascii_digit()).copied().collect(),
            // As Shelly's: an answer is fitted only to a request it can read (a body here).
            answer: |req, ans| {
                let id: Vec<u8> = req.iter().filter(|c| c.is_ascii_digit()).copied().collect();
                if !id.is_empty() {
                    *ans = [b"answer to ".as_slice(), &id].concat();
                }
            },
        };
        let frames = vec![
            (Request, b"POST /rpc HTTP/1.1\r\nAuthorization: old\r\nContent-Length: 4\r\n\r\nid=1".to_vec()),
            (Response, b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\nanswer to 1".to_vec()),
            (Request, b"GET /shelly HTTP/1.1\r\nHost: a\r\n\r\n".to_vec()),
            (Response, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}".to_vec()),
        ];
        let mut c = ReplayCore::with_rule(frames, Some(rule));
        let out = ask(&mut c, b"POST /rpc HTTP/1.1\r\nAuthorization: new\r\nHost: b\r\nContent-Length: 5\r\n\r\nid=42");
        assert_eq!(sent(&out), vec![&b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\nanswer to 42"[..]]);
        let out = ask(&mut c, b"GET /shelly HTTP/1.1\r\nUser-Agent: x\r\n\r\n");
        assert_eq!(sent(&out), vec![&b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}"[..]]);
        let out = ask(&mut c, b"GET /other HTTP/1.1\r\n\r\n");
        assert!(matches!(&out[..], [Output::Event(ReplayEvent::Unmatched { .. })]), "{out:?}");
    }

    #[test]
    fn requests_walk_the_capture_in_order_and_wrap() {
        let mut c = core();
        assert_eq!(c.requests(), 3);
        assert_eq!(sent(&ask(&mut c, b"A")), [b"a1"]);
        let silent = ask(&mut c, b"B");
        assert!(sent(&silent).is_empty(), "B went unanswered in the capture");
        assert_eq!(silent, [Output::Event(ReplayEvent::Answered { index: 2, answers: 0 })]);
        assert_eq!(sent(&ask(&mut c, b"A")), [&b"a2"[..], b"a2-echo"]);
        assert_eq!(sent(&ask(&mut c, b"A")), [b"a1"], "past the end it starts over");
    }

    #[test]
    fn a_rule_matches_without_the_sequence_number_and_echoes_it() {
        use Direction::*;
        let rule = ReplayRule {
            key: |b| b.iter().skip(1).copied().collect(),
            answer: |req, ans| ans[0] = req[0],
        };
        let mut c = ReplayCore::with_rule(vec![(Request, b"7A".to_vec()), (Response, b"7a".to_vec())], Some(rule)).alone();
        assert_eq!(sent(&ask(&mut c, b"9A")), [b"9a"]);
        assert_eq!(ask(&mut c, b"9B"), [Output::Event(ReplayEvent::Unmatched { bytes: b"9B".to_vec() })], "alone, every request is for it");
    }

    #[test]
    fn a_rule_reads_the_message_after_the_frames_prefix() {
        use Direction::*;
        let rule = ReplayRule {
            key: |b| b.iter().skip(1).copied().collect(),
            answer: |req, ans| {
                if let (Some(r), Some(a)) = (req.first(), ans.first_mut()) {
                    *a = *r;
                }
            },
        };
        // A BLE replay's frames: class and characteristic (here "Wc"/"Nc") before the message.
        let frames = vec![(Request, b"Wc7A".to_vec()), (Response, b"Nc7a".to_vec())];
        let mut c = ReplayCore::with_rule_at(frames, Some(rule), 2).alone();
        assert_eq!(sent(&ask(&mut c, b"Wc9A")), [b"Nc9a"], "the prefix untouched, the message fitted");
        assert!(matches!(&ask(&mut c, b"Wd9A")[..], [Output::Event(ReplayEvent::Unmatched { .. })]), "another characteristic does not match");
        assert!(matches!(&ask(&mut c, b"W")[..], [Output::Event(ReplayEvent::Unmatched { .. })]), "a frame shorter than its prefix matches byte for byte");
    }

    #[test]
    fn kept_timing_sends_each_answer_as_long_after_the_request_as_captured() {
        use Direction::*;
        let ms = |n: u64| n * 1_000_000;
        let mut c = ReplayCore::new(vec![(Request, b"A".to_vec()), (Response, b"a1".to_vec()), (Response, b"a2".to_vec()), (Request, b"B".to_vec()), (Response, b"b".to_vec())])
            .keep_timing(vec![ms(1000), ms(1000), ms(1300), ms(2000), ms(2050)]);
        let at = |c: &mut ReplayCore, t: u64, input: Input<'_>| {
            let mut out = Vec::new();
            c.handle_input(input, Duration::from_millis(t), &mut out).unwrap();
            out.into_iter().filter_map(|o| if let Output::Send { bytes, .. } = o { Some(bytes) } else { None }).collect::<Vec<_>>()
        };
        let ask = |b: &'static [u8]| Input::Bytes { from: Peer::ONLY, bytes: b };
        assert_eq!(at(&mut c, 10, ask(b"A")), [b"a1".to_vec()], "captured at once: sent at once");
        assert_eq!(c.next_wakeup(), Some(Duration::from_millis(310)), "a2 came 300 ms after A");
        assert!(at(&mut c, 100, ask(b"B")).is_empty(), "b is due at 150 ms");
        assert_eq!(c.next_wakeup(), Some(Duration::from_millis(150)));
        assert_eq!(at(&mut c, 150, Input::Timeout), [b"b".to_vec()]);
        assert!(at(&mut c, 300, Input::Timeout).is_empty());
        assert_eq!(at(&mut c, 310, Input::Timeout), [b"a2".to_vec()]);
        assert_eq!(c.next_wakeup(), None);
        // Times that do not fit the frames leave the timing compressed.
        let c = ReplayCore::new(vec![(Request, b"A".to_vec())]).keep_timing(vec![]);
        assert!(c.times.is_none());
    }

    #[test]
    fn waiting_answers_are_bounded_in_bytes_and_dropped_with_their_peer() {
        use Direction::*;
        let big = vec![0x55u8; MAX_PENDING_BYTES / 2 + 1];
        let mut c = ReplayCore::new(vec![(Request, b"A".to_vec()), (Response, big.clone())]).keep_timing(vec![0, 1_000_000_000]).alone();
        let mut out = Vec::new();
        for p in 0..3 {
            c.handle_input(Input::Bytes { from: Peer(p), bytes: b"A" }, Duration::ZERO, &mut out).unwrap();
        }
        let sent = |out: &[Output<ReplayEvent>]| out.iter().filter(|o| matches!(o, Output::Send { .. })).count();
        assert_eq!(sent(&out), 2, "one answer waits; past the byte bound the others go at once");
        out.clear();
        c.handle_input(Input::Disconnected(Peer(0)), Duration::ZERO, &mut out).unwrap();
        c.handle_input(Input::Timeout, Duration::from_secs(2), &mut out).unwrap();
        assert_eq!(sent(&out), 0, "the waiting answer's peer went");
        assert_eq!((c.next_wakeup(), c.pending_bytes), (None, 0));
    }

    #[test]
    fn an_unknown_request_is_reported_and_unanswered() {
        let mut c = core();
        assert_eq!(ask(&mut c, b"AZ"), [Output::Event(ReplayEvent::Unmatched { bytes: b"AZ".to_vec() })]);
        assert_eq!(ask(&mut c, b"Z"), [], "a request for another device on the bus");
        let mut out = Vec::new();
        assert!(c.handle_input(Input::Set { key: "soc", value: 1.0 }, Duration::ZERO, &mut out).is_err());
        let mut empty = ReplayCore::new(Vec::new());
        assert_eq!(ask(&mut empty, b"A").len(), 0);
    }
}
