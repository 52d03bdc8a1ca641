//! `capture replay`: a fixture's captured requests sent to a live device, and the answers
//! held against the captured ones. This module is the sans-IO half: the fixture cut into
//! exchanges (a request and what the device sent after it), one exchange's live answer
//! compared with the captured one, and the report. The captured device kind decodes both
//! answers into named fields ([`crate::kind::Kind::fields`]), so a difference is shown as
//! the field that differs, side by side; a kind without fields is compared byte by byte.

use std::path::Path;

use crate::kind::{self, Kind, Role};
use crate::link::recognise::{CaptureTransport, CapturedFrameView};
use crate::link::record::Direction;

/// A captured request and the frames the device sent after it, until the next request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exchange {
    /// The request's place among the fixture's frames, 1-based.
    pub frame: usize,
    pub request: Vec<u8>,
    pub answers: Vec<Vec<u8>>,
}

impl Exchange {
    /// How many answer bytes the capture holds.
    pub fn answer_len(&self) -> usize {
        self.answers.iter().map(Vec::len).sum()
    }
}

/// A fixture ready to replay as the client.
#[derive(Debug, Clone)]
pub struct ReplayScript {
    pub transport: CaptureTransport,
    /// The captured device kind, when the import identified one.
    pub kind: Option<String>,
    pub exchanges: Vec<Exchange>,
    /// Device frames before the first request (nothing asked for them): not replayed.
    pub unsolicited: usize,
}

impl ReplayScript {
    /// The fixture at `path`, cut into exchanges.
    pub fn load(path: &Path) -> Result<ReplayScript, String> {
        let (header, frames) = super::import::read_fixture(path)?;
        let mut out = Vec::with_capacity(frames.len());
        for (i, f) in frames.into_iter().enumerate() {
            let bytes = super::spec::parse_hex(&f.hex).map_err(|e| format!("{}: frame {}: {e}", path.display(), i + 1))?;
            out.push((f.dir, bytes));
        }
        let (exchanges, unsolicited) = exchanges(out);
        if exchanges.is_empty() {
            return Err(format!("{} has no request to send", path.display()));
        }
        Ok(ReplayScript { transport: header.transport, kind: header.kind, exchanges, unsolicited })
    }

    fn kind(&self) -> Option<&'static dyn Kind> {
        self.kind.as_deref().and_then(|k| kind::find(Role::Device, k))
    }
}

/// Frames in captured order cut into exchanges; also how many device frames came before
/// the first request.
pub fn exchanges(frames: Vec<(Direction, Vec<u8>)>) -> (Vec<Exchange>, usize) {
    let mut out: Vec<Exchange> = Vec::new();
    let mut unsolicited = 0;
    for (i, (dir, bytes)) in frames.into_iter().enumerate() {
        match (dir, out.last_mut()) {
            (Direction::Request, _) => out.push(Exchange { frame: i + 1, request: bytes, answers: Vec::new() }),
            (Direction::Response, Some(e)) => e.answers.push(bytes),
            (Direction::Response, None) => unsolicited += 1,
        }
    }
    (out, unsolicited)
}

/// A serial answer arrives as a byte stream: it is cut where the captured frames end, so
/// frame k is held against captured frame k; bytes past the captured ones are one more frame.
pub fn cut_like(captured: &[Vec<u8>], live: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut rest = live;
    for c in captured {
        if rest.is_empty() {
            break;
        }
        let (piece, tail) = rest.split_at(c.len().min(rest.len()));
        out.push(piece.to_vec());
        rest = tail;
    }
    if !rest.is_empty() {
        out.push(rest.to_vec());
    }
    out
}

/// One row of a side-by-side comparison: a field and its two values (`None`: the frame
/// has no such field).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct FieldRow {
    pub field: String,
    pub captured: Option<String>,
    pub live: Option<String>,
}

/// Where a live answer departs from the captured one.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct AnswerDiff {
    /// Which frame of the answer (0-based).
    pub answer: usize,
    /// The two frames (`None`: that side sent no such frame).
    pub captured: Option<String>,
    pub live: Option<String>,
    /// The decoded meaning of each, when the kind recognises it.
    pub captured_meaning: Option<String>,
    pub live_meaning: Option<String>,
    /// The first field that differs (`frame` when one side is missing, `byte N` when
    /// the kind has no fields for it).
    pub field: String,
    /// The rows that differ, the first one first.
    pub rows: Vec<FieldRow>,
}

/// The first difference between the captured answer of `ex` and the live one (one entry
/// per frame: a datagram, or a serial stream cut with [`cut_like`]); `None`: the same.
pub fn compare(script: &ReplayScript, ex: &Exchange, live: &[Vec<u8>]) -> Option<AnswerDiff> {
    let n = ex.answers.len().max(live.len());
    (0..n).find_map(|i| {
        let (c, l) = (ex.answers.get(i), live.get(i));
        if c == l {
            return None;
        }
        Some(frame_diff(script, ex, i, c.map(Vec::as_slice), l.map(Vec::as_slice)))
    })
}

fn frame_diff(script: &ReplayScript, ex: &Exchange, i: usize, c: Option<&[u8]>, l: Option<&[u8]>) -> AnswerDiff {
    let kind = script.kind();
    let view = |b: &'static [u8]| CapturedFrameView { transport: script.transport, direction: Direction::Response, bytes: b, uuid: None, att_opcode: None };
    let meaning = |b: &[u8]| {
        let v = CapturedFrameView { bytes: b, ..view(&[]) };
        kind.and_then(|k| k.recognise(&v)).map(|v| v.meaning)
    };
    let fields = |b: &[u8]| {
        let v = CapturedFrameView { bytes: b, ..view(&[]) };
        kind.map(|k| k.fields(&v, Some(&ex.request))).unwrap_or_default()
    };
    let mut d = AnswerDiff {
        answer: i,
        captured: c.map(spaced_hex),
        live: l.map(spaced_hex),
        captured_meaning: c.and_then(meaning),
        live_meaning: l.and_then(meaning),
        field: "frame".into(),
        rows: Vec::new(),
    };
    let (Some(c), Some(l)) = (c, l) else {
        let what = |b: Option<&[u8]>| Some(b.map_or("none".to_string(), |b| format!("{} bytes", b.len())));
        d.rows.push(FieldRow { field: "frame".into(), captured: what(c), live: what(l) });
        return d;
    };
    let (fc, fl) = (fields(c), fields(l));
    d.rows = if fc.is_empty() || fl.is_empty() { Vec::new() } else { differing_fields(&fc, &fl) };
    if d.rows.is_empty() {
        // No fields, or fields that do not cover the bytes that differ.
        d.rows = differing_bytes(c, l);
    }
    if let Some(first) = d.rows.first() {
        d.field = first.field.clone();
    }
    d
}

/// The fields whose values differ, in the captured frame's order, then the live frame's
/// fields the captured one lacks.
fn differing_fields(c: &[(String, String)], l: &[(String, String)]) -> Vec<FieldRow> {
    let get = |fields: &[(String, String)], name: &str| fields.iter().find(|(n, _)| n == name).map(|(_, v)| v.clone());
    let mut rows: Vec<FieldRow> = c
        .iter()
        .filter_map(|(name, v)| {
            let live = get(l, name);
            (live.as_ref() != Some(v)).then(|| FieldRow { field: name.clone(), captured: Some(v.clone()), live })
        })
        .collect();
    rows.extend(l.iter().filter(|(n, _)| get(c, n).is_none()).map(|(n, v)| FieldRow { field: n.clone(), captured: None, live: Some(v.clone()) }));
    rows
}

/// The first byte that differs, and the lengths when they differ.
fn differing_bytes(c: &[u8], l: &[u8]) -> Vec<FieldRow> {
    let mut rows = Vec::new();
    let at = c.iter().zip(l).position(|(a, b)| a != b);
    if let Some(k) = at {
        rows.push(FieldRow { field: format!("byte {k}"), captured: Some(format!("0x{:02X}", c[k])), live: Some(format!("0x{:02X}", l[k])) });
    }
    if c.len() != l.len() {
        rows.push(FieldRow { field: "length".into(), captured: Some(c.len().to_string()), live: Some(l.len().to_string()) });
    }
    rows
}

/// One exchange that came back different.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ExchangeDiff {
    /// 1-based, in the fixture's order.
    pub exchange: usize,
    /// The request's frame in the fixture, 1-based.
    pub frame: usize,
    pub request: String,
    pub request_meaning: Option<String>,
    #[serde(flatten)]
    pub diff: AnswerDiff,
}

/// At most this many differing exchanges are kept in a report (the count goes on).
pub const MAX_REPORTED: usize = 1000;

/// What a replay as the client found.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ReplayClientReport {
    pub fixture: String,
    pub target: String,
    pub kind: Option<String>,
    pub exchanges: usize,
    pub same: usize,
    pub differ: usize,
    /// Device frames before the first request, not replayed.
    pub unsolicited: usize,
    /// The differing exchanges, in order (at most [`MAX_REPORTED`]).
    pub differences: Vec<ExchangeDiff>,
}

impl ReplayClientReport {
    pub fn new(fixture: &Path, target: String, script: &ReplayScript) -> Self {
        ReplayClientReport {
            fixture: fixture.display().to_string(),
            target,
            kind: script.kind.clone(),
            exchanges: 0,
            same: 0,
            differ: 0,
            unsolicited: script.unsolicited,
            differences: Vec::new(),
        }
    }

    /// Records exchange `index` (0-based) of `script` answered with `live`.
    pub fn record(&mut self, script: &ReplayScript, index: usize, live: &[Vec<u8>]) {
        let Some(ex) = script.exchanges.get(index) else { return };
        self.exchanges += 1;
        let Some(diff) = compare(script, ex, live) else {
            self.same += 1;
            return;
        };
        self.differ += 1;
        if self.differences.len() < MAX_REPORTED {
            let view = CapturedFrameView { transport: script.transport, direction: Direction::Request, bytes: &ex.request, uuid: None, att_opcode: None };
            self.differences.push(ExchangeDiff {
                exchange: index + 1,
                frame: ex.frame,
                request: spaced_hex(&ex.request),
                request_meaning: script.kind().and_then(|k| k.recognise(&view)).map(|v| v.meaning),
                diff,
            });
        }
    }

    /// The human report: the counts, the first difference side by side, one line for
    /// each further one.
    pub fn render(&self) -> String {
        let mut s = format!(
            "{} against {}: {} exchanges, {} same, {} differ{}\n",
            self.fixture,
            self.target,
            self.exchanges,
            self.same,
            self.differ,
            if self.unsolicited > 0 { format!(" ({} unsolicited device frames before the first request not replayed)", self.unsolicited) } else { String::new() }
        );
        let Some(first) = self.differences.first() else { return s };
        s.push_str(&format!(
            "first difference: exchange {} (fixture frame {}), answer frame {}, field `{}`\n",
            first.exchange,
            first.frame,
            first.diff.answer + 1,
            first.diff.field
        ));
        let line = |label: &str, hex: Option<&String>, meaning: Option<&String>| {
            let hex = hex.map_or("(nothing)".to_string(), |h| cut(h, 72));
            match meaning {
                Some(m) => format!("  {label:<9}{hex}\n  {:<9}= {}\n", "", cut(m, 160)),
                None => format!("  {label:<9}{hex}\n"),
            }
        };
        s.push_str(&line("request", Some(&first.request), first.request_meaning.as_ref()));
        s.push_str(&line("captured", first.diff.captured.as_ref(), first.diff.captured_meaning.as_ref()));
        s.push_str(&line("live", first.diff.live.as_ref(), first.diff.live_meaning.as_ref()));
        let width = first.diff.rows.iter().map(|r| r.field.chars().count()).max().unwrap_or(5).clamp(5, 40);
        let value_width = first.diff.rows.iter().filter_map(|r| r.captured.as_ref()).map(|v| v.chars().count()).max().unwrap_or(8).clamp(8, 40);
        s.push_str(&format!("  {:<width$}  {:<value_width$}  {}\n", "field", "captured", "live"));
        for r in &first.diff.rows {
            let v = |x: &Option<String>| x.clone().unwrap_or_else(|| "-".into());
            s.push_str(&format!("  {:<width$}  {:<value_width$}  {}\n", r.field, cut(&v(&r.captured), 40), cut(&v(&r.live), 40)));
        }
        const SHOWN: usize = 20;
        for d in self.differences.iter().skip(1).take(SHOWN) {
            let v = |x: Option<&String>| cut(x.map_or("-", |s| s.as_str()), 40);
            let row = d.diff.rows.first();
            s.push_str(&format!(
                "also exchange {} (fixture frame {}): field `{}`: captured {}, live {}\n",
                d.exchange,
                d.frame,
                d.diff.field,
                v(row.and_then(|r| r.captured.as_ref())),
                v(row.and_then(|r| r.live.as_ref()))
            ));
        }
        let more = self.differ.saturating_sub(1 + SHOWN);
        if more > 0 {
            s.push_str(&format!("… and {more} more differing exchanges (--json lists up to {MAX_REPORTED})\n"));
        }
        s
    }
}

/// Bytes as upper-case hex pairs separated by spaces, all of them.
fn spaced_hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02X}")).collect::<Vec<_>>().join(" ")
}

/// `s` cut to `n` characters, with an ellipsis when cut.
fn cut(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        return s.to_string();
    }
    let mut t: String = s.chars().take(n).collect();
    t.push('…');
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    fn script(kind: Option<&str>, frames: Vec<(Direction, Vec<u8>)>) -> ReplayScript {
        let (exchanges, unsolicited) = exchanges(frames);
        ReplayScript { transport: CaptureTransport::Serial, kind: kind.map(str::to_string), exchanges, unsolicited }
    }

    fn modbus(bytes: &[u8]) -> Vec<u8> {
        let mut v = bytes.to_vec();
        crate::protocol::modbus::append_crc(&mut v);
        v
    }

    #[test]
    fn frames_are_cut_into_exchanges() {
        use Direction::*;
        let (ex, unsolicited) = exchanges(vec![
            (Response, b"hello".to_vec()),
            (Request, b"A".to_vec()),
            (Response, b"a1".to_vec()),
            (Response, b"a2".to_vec()),
            (Request, b"B".to_vec()),
        ]);
        assert_eq!(unsolicited, 1);
        assert_eq!(ex.len(), 2);
        assert_eq!((ex[0].frame, ex[0].answers.len(), ex[0].answer_len()), (2, 2, 4));
        assert_eq!((ex[1].frame, ex[1].answers.len()), (5, 0), "B went unanswered");
    }

    #[test]
    fn a_serial_stream_is_cut_where_the_captured_frames_end() {
        let cap = vec![b"ab".to_vec(), b"cde".to_vec()];
        assert_eq!(cut_like(&cap, b"abcde"), cap);
        assert_eq!(cut_like(&cap, b"abcdefg"), [&b"ab"[..], b"cde", b"fg"]);
        assert_eq!(cut_like(&cap, b"a"), [b"a"]);
        assert!(cut_like(&cap, b"").is_empty());
        assert_eq!(cut_like(&[], b"xy"), [b"xy"]);
    }

    #[test]
    fn a_modbus_answer_differs_at_the_named_register() {
        let req = modbus(&[1, 3, 0, 0, 0, 47]);
        let mut regs = vec![1, 3, 94];
        regs.extend((0..47u16).flat_map(|r| (r * 10).to_be_bytes()));
        let captured = modbus(&regs);
        regs[3 + 22 * 2 + 1] = 99; // register 22, the SoC of lp4-v2
        let live = modbus(&regs);
        let s = script(Some("eg4-lp4"), vec![(Direction::Request, req), (Direction::Response, captured.clone())]);
        let ex = &s.exchanges[0];
        assert_eq!(compare(&s, ex, std::slice::from_ref(&captured)), None);
        let d = compare(&s, ex, &[live]).expect("differs");
        assert_eq!(d.field, "register 22 (SoC, %)");
        assert_eq!(d.rows[0].captured.as_deref(), Some("220 (0x00DC)"));
        assert_eq!(d.rows[0].live.as_deref(), Some("99 (0x0063)"));
        assert_eq!(d.rows[1].field, "crc", "the CRC differs too");
        let mut report = ReplayClientReport::new(Path::new("f.jsonl"), "/tmp/x".into(), &s);
        report.record(&s, 0, &[captured.clone()]);
        let mut bad_crc = captured.clone();
        *bad_crc.last_mut().unwrap() ^= 0xFF;
        report.record(&s, 0, &[bad_crc]);
        assert_eq!((report.exchanges, report.same, report.differ), (2, 1, 1));
        assert_eq!(report.differences[0].diff.field, "crc", "registers alike: the CRC is what differs");
        let text = report.render();
        assert!(text.contains("field `crc`") && text.contains("(bad: its bytes give"), "{text}");
    }

    #[test]
    fn silence_extra_frames_and_unknown_kinds() {
        let s = script(None, vec![(Direction::Request, b"Q".to_vec()), (Direction::Response, b"abc".to_vec())]);
        let ex = &s.exchanges[0];
        let d = compare(&s, ex, &[]).unwrap();
        assert_eq!((d.field.as_str(), d.rows[0].live.as_deref()), ("frame", Some("none")));
        let d = compare(&s, ex, &[b"abc".to_vec(), b"z".to_vec()]).unwrap();
        assert_eq!((d.answer, d.field.as_str()), (1, "frame"));
        let d = compare(&s, ex, &[b"abd".to_vec()]).unwrap();
        assert_eq!(d.field, "byte 2", "no kind: byte by byte");
        let d = compare(&s, ex, &[b"abcd".to_vec()]).unwrap();
        assert_eq!(d.field, "length");
    }

    #[test]
    fn jbd_and_smp_answers_differ_by_field() {
        use crate::protocol::jbd;
        let cells = |mv: u16| jbd::encode_response(jbd::reg::CELL_VOLTAGES, jbd::STATUS_OK, &[mv.to_be_bytes(), 3300u16.to_be_bytes()].concat()).unwrap();
        let s = ReplayScript {
            transport: CaptureTransport::BleAtt,
            ..script(Some("jbd-bms"), vec![(Direction::Request, jbd::encode_read(jbd::reg::CELL_VOLTAGES)), (Direction::Response, cells(3310))])
        };
        let d = compare(&s, &s.exchanges[0], &[cells(3290)]).unwrap();
        assert_eq!((d.field.as_str(), d.rows[0].captured.as_deref(), d.rows[0].live.as_deref()), ("cell 1, mV", Some("3310"), Some("3290")));
        assert_eq!(d.rows[1].field, "checksum");

        // SMP echo answers {"r": "hi"} and {"r": "ho"}.
        let echo = |r: &[u8]| [&[0x0b, 0, 0, 6, 0, 0, 7, 0, 0xa1, 0x61, 0x72, 0x62][..], r].concat();
        let s = ReplayScript {
            transport: CaptureTransport::Udp,
            ..script(Some("smp-server"), vec![(Direction::Request, b"req".to_vec()), (Direction::Response, echo(b"hi"))])
        };
        let d = compare(&s, &s.exchanges[0], &[echo(b"ho")]).unwrap();
        assert_eq!((d.field.as_str(), d.rows[0].captured.as_deref(), d.rows[0].live.as_deref()), ("r", Some("\"hi\""), Some("\"ho\"")));
    }
}
