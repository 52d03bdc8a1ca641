//! The SMP server's serial port as Zephyr's UART transport runs it, sans-IO:
//! bytes in at a time, SMP messages out at the time the firmware would have
//! them, and answers out as the line would carry them.
//!
//! Console framing (`drivers/console/uart_mcumgr.c`): the UART interrupt
//! fills one line buffer per line from a small pool
//! (CONFIG_UART_MCUMGR_RX_BUF_COUNT, 2, of CONFIG_UART_MCUMGR_RX_BUF_SIZE,
//! 128 bytes); a finished line goes to a work queue that decodes it and
//! frees its buffer. A line that starts while every buffer waits for the
//! work queue is dropped ("Insufficient buffers, fragment dropped"), or, on
//! newer drivers with flow control, the sender is paused until one frees.
//! A line over the buffer is dropped ("Line too long"). Raw framing
//! (CONFIG_UART_MCUMGR_RAW_PROTOCOL): bare header and payload, the length
//! from the header, no lines.
//!
//! Time is explicit so a test can run the line at any baud in no time: with
//! a baud rate each byte takes ten bit-times on the wire in each direction,
//! and the work queue takes `line_work` per line.

use std::collections::VecDeque;
use std::time::Duration;

use crate::protocol::smp::{self, serial};
use crate::transport::serial::byte_time;

/// How SMP messages are put on the line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum SerialFraming {
    /// Base64 lines with `06 09` / `04 14` markers, length and CRC (the
    /// "SMP over console" framing of Zephyr's UART and shell transports).
    Console,
    /// The bare SMP header and payload (CONFIG_MCUMGR_TRANSPORT_RAW_UART).
    Raw,
}

#[derive(Debug, Clone)]
pub struct SerialLinkConfig {
    pub framing: SerialFraming,
    /// Pace both directions at this many bits per second (8N1); `None`: no wire time.
    pub baud: Option<u32>,
    /// Line buffers in the receive pool (CONFIG_UART_MCUMGR_RX_BUF_COUNT).
    pub line_buffers: usize,
    /// Bytes a line buffer holds, newline included (CONFIG_UART_MCUMGR_RX_BUF_SIZE).
    pub line_size: usize,
    /// How long the work queue takes over one line before its buffer is free.
    pub line_work: Duration,
    /// Pause the sender while no line buffer is free (a driver with flow
    /// control) instead of dropping the line.
    pub pause_when_full: bool,
    /// The net buffer a packet is decoded into (mcumgr params `buf_size`).
    pub net_buf: usize,
    /// Answers as MCUboot's serial recovery writes them: the packet's base64
    /// in one piece, cut every 124 characters (Zephyr's mcumgr encodes each
    /// 3-byte group on its own).
    pub mcuboot_lines: bool,
}

impl Default for SerialLinkConfig {
    fn default() -> Self {
        SerialLinkConfig {
            framing: SerialFraming::Console,
            baud: None,
            line_buffers: 2,
            line_size: serial::MAX_RX_LINE,
            line_work: Duration::ZERO,
            pause_when_full: false,
            net_buf: 384,
            mcuboot_lines: false,
        }
    }
}

/// What came off the line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SerialArrival {
    /// A whole SMP message, due to the server at this time.
    Message(Vec<u8>),
    /// Bytes the firmware threw away, and why.
    Dropped(String),
}

pub struct SerialLink {
    cfg: SerialLinkConfig,
    byte: Duration,
    /// When the last byte received finished arriving.
    rx_wire_at: Duration,
    /// When the transmitter is free for the next byte.
    tx_wire_at: Duration,
    /// Console framing: the line in its buffer, whether it has one, and
    /// whether the rest of the line is being thrown away.
    line: Vec<u8>,
    line_has_buffer: bool,
    ignoring: Option<&'static str>,
    /// When each line handed to the work queue frees its buffer, in order.
    queued: VecDeque<Duration>,
    work_free_at: Duration,
    receiver: serial::Receiver,
    /// Raw framing: the message being assembled, and bytes of a refused one still to skip.
    raw: Vec<u8>,
    raw_skip: usize,
    /// Messages and drops, each at the time the firmware has it, in time order.
    due: VecDeque<(Duration, SerialArrival)>,
    /// What to write to the line, each at the time its last byte is on the wire.
    tx: VecDeque<(Duration, Vec<u8>)>,
}

impl SerialLink {
    pub fn new(cfg: SerialLinkConfig) -> SerialLink {
        let byte = cfg.baud.map(byte_time).unwrap_or_default();
        let receiver = serial::Receiver::with_limits(cfg.line_size, cfg.net_buf);
        SerialLink {
            cfg,
            byte,
            rx_wire_at: Duration::ZERO,
            tx_wire_at: Duration::ZERO,
            line: Vec::new(),
            line_has_buffer: false,
            ignoring: None,
            queued: VecDeque::new(),
            work_free_at: Duration::ZERO,
            receiver,
            raw: Vec::new(),
            raw_skip: 0,
            due: VecDeque::new(),
            tx: VecDeque::new(),
        }
    }

    /// Bytes the client wrote, read at `now`.
    pub fn receive(&mut self, bytes: &[u8], now: Duration) {
        for &b in bytes {
            let at = self.rx_wire_at.max(now) + self.byte;
            self.rx_wire_at = at;
            match self.cfg.framing {
                SerialFraming::Console => self.console_byte(b, at),
                SerialFraming::Raw => self.raw_byte(b, at),
            }
        }
    }

    /// One byte into the line buffers, as the UART interrupt takes it.
    fn console_byte(&mut self, b: u8, at: Duration) {
        let mut at = at;
        if self.ignoring.is_none() && !self.line_has_buffer {
            while self.queued.front().is_some_and(|&free| free <= at) {
                self.queued.pop_front();
            }
            if self.queued.len() >= self.cfg.line_buffers {
                if self.cfg.pause_when_full {
                    // The sender waits until the oldest queued line is decoded;
                    // everything after this byte shifts with it.
                    at = self.queued.pop_front().unwrap_or(at);
                    self.rx_wire_at = at;
                } else {
                    self.ignoring = Some("no free line buffer (the work queue is behind)");
                }
            }
            if self.ignoring.is_none() {
                self.line_has_buffer = true;
            }
        }
        if self.ignoring.is_none() {
            if self.line.len() >= self.cfg.line_size {
                self.line.clear();
                self.line_has_buffer = false;
                self.ignoring = Some("line longer than the line buffer");
            } else {
                self.line.push(b);
            }
        }
        if b != b'\n' {
            return;
        }
        if let Some(why) = self.ignoring.take() {
            self.push_due(at, SerialArrival::Dropped(format!("serial line dropped: {why}")));
            return;
        }
        self.line_has_buffer = false;
        let line = std::mem::take(&mut self.line);
        self.work_free_at = self.work_free_at.max(at) + self.cfg.line_work;
        let done = self.work_free_at;
        self.queued.push_back(done);
        match self.receiver.push_line(&line) {
            serial::LineOutcome::Message(m) => self.push_due(done, SerialArrival::Message(m)),
            serial::LineOutcome::Dropped(why) => self.push_due(done, SerialArrival::Dropped(format!("serial line dropped: {why}"))),
            serial::LineOutcome::Partial | serial::LineOutcome::Text => {}
        }
    }

    /// One byte of a bare message; the header says how many follow.
    fn raw_byte(&mut self, b: u8, at: Duration) {
        if self.raw_skip > 0 {
            self.raw_skip -= 1;
            return;
        }
        self.raw.push(b);
        let Some(len) = smp::frame_len(&self.raw) else { return };
        if len > self.cfg.net_buf {
            // Consumed unread, so the next header is found where this message ends.
            self.raw_skip = len - self.raw.len();
            self.raw.clear();
            self.push_due(at, SerialArrival::Dropped(format!("raw serial: a {len}-byte message is larger than the {}-byte net buffer", self.cfg.net_buf)));
        } else if self.raw.len() == len {
            let m = std::mem::take(&mut self.raw);
            self.push_due(at, SerialArrival::Message(m));
        }
    }

    fn push_due(&mut self, at: Duration, what: SerialArrival) {
        // Drops are known when their line ends, messages when the work queue
        // is done with them: keep the queue in time order.
        let pos = self.due.iter().rposition(|(t, _)| *t <= at).map_or(0, |p| p + 1);
        self.due.insert(pos, (at, what));
    }

    /// An answer: framed, then on the wire after whatever is still going out.
    pub fn send_message(&mut self, message: &[u8], now: Duration) {
        let wire = self.frame(message);
        self.send_wire(&wire, now);
    }

    /// Framed bytes (what [`SerialLink::frame`] made, perhaps changed by a
    /// fault), each console line due when its own wire time has passed.
    pub fn send_wire(&mut self, wire: &[u8], now: Duration) {
        match self.cfg.framing {
            SerialFraming::Console => {
                for line in wire.split_inclusive(|b| *b == b'\n') {
                    self.schedule_tx(line.to_vec(), now);
                }
            }
            SerialFraming::Raw => self.schedule_tx(wire.to_vec(), now),
        }
    }

    /// A message as it goes on the wire: Zephyr's lines, or itself (raw).
    pub fn frame(&self, message: &[u8]) -> Vec<u8> {
        match self.cfg.framing {
            SerialFraming::Console if self.cfg.mcuboot_lines => serial::encode(message, serial::MAX_LINE),
            SerialFraming::Console => serial::encode_as_zephyr(message),
            SerialFraming::Raw => message.to_vec(),
        }
    }

    pub fn framing(&self) -> SerialFraming {
        self.cfg.framing
    }

    /// Console text (a boot banner, a log line) between the SMP lines.
    pub fn send_text(&mut self, text: &[u8], now: Duration) {
        self.schedule_tx(text.to_vec(), now);
    }

    fn schedule_tx(&mut self, bytes: Vec<u8>, now: Duration) {
        let n = u32::try_from(bytes.len()).unwrap_or(u32::MAX);
        self.tx_wire_at = self.tx_wire_at.max(now) + self.byte * n;
        self.tx.push_back((self.tx_wire_at, bytes));
    }

    /// When something is next due (a message in, bytes out).
    pub fn next_due(&self) -> Option<Duration> {
        let a = self.due.front().map(|d| d.0);
        let b = self.tx.front().map(|t| t.0);
        match (a, b) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// What arrived by `now`, in order.
    pub fn take_arrivals(&mut self, now: Duration) -> Vec<SerialArrival> {
        let mut out = Vec::new();
        while self.due.front().is_some_and(|d| d.0 <= now) {
            out.extend(self.due.pop_front().map(|d| d.1));
        }
        out
    }

    /// Bytes to write by `now`, in order, joined.
    pub fn take_writes(&mut self, now: Duration) -> Vec<u8> {
        let mut out = Vec::new();
        while self.tx.front().is_some_and(|t| t.0 <= now) {
            if let Some((_, b)) = self.tx.pop_front() {
                out.extend(b);
            }
        }
        out
    }

    /// Forget what was on its way in (the device rebooted: RAM is gone).
    pub fn reset_rx(&mut self) {
        self.line.clear();
        self.line_has_buffer = false;
        self.ignoring = None;
        self.receiver = serial::Receiver::with_limits(self.cfg.line_size, self.cfg.net_buf);
        self.raw.clear();
        self.raw_skip = 0;
        self.due.retain(|d| matches!(d.1, SerialArrival::Dropped(_)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::smp::{SmpHeader, SmpOp, SmpVersion};

    fn echo(text: &str) -> Vec<u8> {
        let body = smp::encode_map(vec![("d", ciborium::Value::Text(text.into()))]);
        let mut m = SmpHeader::new(SmpVersion::V2, SmpOp::Write, 0, 0, 1, body.len() as u16).encode().to_vec();
        m.extend(body);
        m
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn a_burst_of_lines_is_decoded_when_the_work_queue_keeps_up() {
        let mut link = SerialLink::new(SerialLinkConfig { net_buf: 2048, ..Default::default() });
        let m = echo(&"x".repeat(1500));
        let lines = serial::encode(&m, serial::MAX_LINE);
        assert!(lines.iter().filter(|b| **b == b'\n').count() > 10);
        link.receive(&lines, ms(5));
        assert_eq!(link.next_due(), Some(ms(5)));
        assert_eq!(link.take_arrivals(ms(5)), vec![SerialArrival::Message(m)]);
    }

    /// native_sim's UART is polled every 20 ms: a burst finds two free
    /// buffers, and the third line of a request is dropped, so is the request.
    #[test]
    fn lines_past_the_pool_are_dropped_while_the_work_queue_is_behind() {
        let mut link = SerialLink::new(SerialLinkConfig { net_buf: 2048, line_work: ms(20), ..Default::default() });
        let m = echo(&"x".repeat(300));
        let lines = serial::encode(&m, serial::MAX_LINE);
        link.receive(&lines, ms(0));
        let got = link.take_arrivals(ms(1000));
        assert!(got.iter().any(|a| matches!(a, SerialArrival::Dropped(w) if w.contains("no free line buffer"))), "{got:?}");
        assert!(!got.iter().any(|a| matches!(a, SerialArrival::Message(_))), "{got:?}");
        // Lines written slower than the work queue takes them all get through.
        let mut link = SerialLink::new(SerialLinkConfig { net_buf: 2048, line_work: ms(20), ..Default::default() });
        for (i, line) in lines.split_inclusive(|b| *b == b'\n').enumerate() {
            link.receive(line, ms(100 + 25 * i as u64));
        }
        assert_eq!(link.take_arrivals(ms(1000)), vec![SerialArrival::Message(m.clone())]);
        // With flow control the sender is paused instead, and the message arrives late.
        let mut link = SerialLink::new(SerialLinkConfig { net_buf: 2048, line_work: ms(20), pause_when_full: true, ..Default::default() });
        link.receive(&lines, ms(0));
        let n = lines.iter().filter(|b| **b == b'\n').count() as u64;
        assert_eq!(link.next_due(), Some(ms(20 * n)), "{n} lines, 20 ms each");
        assert_eq!(link.take_arrivals(ms(20 * n)), vec![SerialArrival::Message(m)]);
    }

    #[test]
    fn wire_time_paces_both_directions() {
        let mut link = SerialLink::new(SerialLinkConfig { baud: Some(115_200), ..Default::default() });
        let m = echo("hi");
        let lines = serial::encode(&m, serial::MAX_LINE);
        link.receive(&lines, ms(0));
        let arrives = byte_time(115_200) * lines.len() as u32;
        assert_eq!(link.next_due(), Some(arrives));
        assert!(link.take_arrivals(arrives - Duration::from_micros(1)).is_empty());
        assert_eq!(link.take_arrivals(arrives), vec![SerialArrival::Message(m.clone())]);
        // An answer of two lines: each written when its last byte is on the wire.
        let answer = vec![7u8; 100];
        link.send_message(&answer, arrives);
        let text = serial::encode_as_zephyr(&answer);
        let first = text.iter().position(|b| *b == b'\n').unwrap() + 1;
        assert_eq!(link.next_due(), Some(arrives + byte_time(115_200) * first as u32));
        assert_eq!(link.take_writes(arrives + byte_time(115_200) * first as u32), text[..first]);
        assert_eq!(link.take_writes(arrives + byte_time(115_200) * text.len() as u32), text[first..]);
        assert_eq!(link.next_due(), None);
    }

    #[test]
    fn overlong_lines_and_text_are_not_messages() {
        let mut link = SerialLink::new(SerialLinkConfig::default());
        let mut long = vec![0x06, 0x09];
        long.extend([b'A'; 200]);
        long.push(b'\n');
        link.receive(&long, ms(0));
        link.receive(b"uart:~$ kernel uptime\r\n", ms(0));
        let m = echo("after");
        link.receive(&serial::encode(&m, serial::MAX_LINE), ms(0));
        let got = link.take_arrivals(ms(0));
        assert!(matches!(&got[0], SerialArrival::Dropped(w) if w.contains("longer than the line buffer")), "{got:?}");
        assert_eq!(got[1..], [SerialArrival::Message(m)]);
    }

    #[test]
    fn raw_framing_takes_the_length_from_the_header() {
        let mut link = SerialLink::new(SerialLinkConfig { framing: SerialFraming::Raw, net_buf: 64, ..Default::default() });
        let (a, b) = (echo("one"), echo("two"));
        let mut bytes = a.clone();
        bytes.extend(&b[..5]);
        link.receive(&bytes, ms(0));
        link.receive(&b[5..], ms(1));
        // Too big for the net buffer: skipped whole, and the next one is found.
        let big = echo(&"z".repeat(100));
        link.receive(&big, ms(2));
        link.receive(&a, ms(3));
        let got = link.take_arrivals(ms(3));
        assert_eq!(got[..2], [SerialArrival::Message(a.clone()), SerialArrival::Message(b.clone())]);
        assert!(matches!(&got[2], SerialArrival::Dropped(w) if w.contains("larger than the 64-byte net buffer")), "{got:?}");
        assert_eq!(got[3], SerialArrival::Message(a));
        link.send_message(&b, ms(3));
        assert_eq!(link.take_writes(ms(3)), b);
    }

    /// Seeded random inputs through the fuzz harness (no nightly here): half
    /// are real requests as console lines or raw, cut and mixed with noise.
    #[test]
    fn seeded_random_serial_input_keeps_the_invariants() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0x5350_5345);
        let mut reached = 0;
        for i in 0..1500 {
            let mode: u8 = rng.gen();
            let mut data = vec![mode];
            for _ in 0..rng.gen_range(0..6) {
                if i % 2 == 0 {
                    let m = echo(&"e".repeat(rng.gen_range(0..400)));
                    let mut bytes = if mode & 1 == 1 { m } else { serial::encode(&m, serial::MAX_LINE) };
                    if rng.gen_bool(0.2) {
                        let at = rng.gen_range(0..bytes.len());
                        bytes[at] = rng.gen();
                    }
                    data.extend(bytes);
                } else {
                    data.extend((0..rng.gen_range(0..200)).map(|_| rng.gen::<u8>()));
                }
                if rng.gen_bool(0.5) {
                    data.push(0xc0);
                }
            }
            if crate::fuzzing::smp_serial_link_keeps_time_and_bounds(&data) {
                reached += 1;
            }
        }
        assert!(reached > 300, "only {reached} inputs reached the server");
    }

    /// MCUboot's serial recovery writes the packet's base64 whole, 124
    /// characters a line; Zephyr's mcumgr encodes 3-byte groups on their own.
    #[test]
    fn mcuboot_lines_carry_124_base64_characters() {
        let message: Vec<u8> = (0..200u8).collect();
        let link = SerialLink::new(SerialLinkConfig { mcuboot_lines: true, ..Default::default() });
        let wire = link.frame(&message);
        let lines: Vec<&[u8]> = wire.split_inclusive(|b| *b == b'\n').collect();
        assert_eq!(lines[0].len(), 127, "06 09, 124 characters, newline");
        assert_eq!(&lines[1][..2], &serial::CONTINUATION);
        let mut rx = serial::Receiver::new();
        let got: Vec<_> = lines.iter().filter_map(|l| match rx.push_line(l) {
            serial::LineOutcome::Message(m) => Some(m),
            _ => None,
        }).collect();
        assert_eq!(got, vec![message.clone()]);
        // The two differ where Zephyr keeps the CRC off a line break.
        let zephyr = SerialLink::new(SerialLinkConfig::default());
        let differ = (1..=400usize).filter(|n| {
            let m: Vec<u8> = (0..*n).map(|i| i as u8).collect();
            link.frame(&m) != zephyr.frame(&m)
        });
        assert!(differ.count() > 0, "MCUboot's layout is Zephyr's for every length");
    }
}
