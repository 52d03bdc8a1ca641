//! Shelly's RPC over BLE GATT, the device's side, sans-IO. Facts from
//! `../shared/reference/shelly.md` (mongoose-os rpc-gatts, aioshelly's
//! `BleRPC`):
//!
//! * The central writes the request's length as a u32 big-endian to TX-ctl
//!   (which drops any half-written frame), then data writes that add up to
//!   exactly that length; a write past the length, or data with no length
//!   announced, is refused; so is a length over [`MAX_FRAME`] and a single
//!   write over [`MAX_ATTRIBUTE`] bytes (BlueZ's attribute limit).
//! * The answer is announced by its length on RX-ctl (read, and notify);
//!   reading RX-ctl returns the pending length (0: nothing yet) and resets
//!   the read offset; each data read returns the next MTU − 2 bytes,
//!   whatever ATT offset it carries. One frame in flight: a new request
//!   drops an unread answer.
//!
//! Two field faults are settings: RX-ctl reporting a length off by
//! [`BleRpcChannel::length_skew`] while the JSON is whole, and the first
//! [`BleRpcChannel::empty_reads`] data reads of each answer returning no
//! bytes (a device that is not ready).

/// The longest request frame the device takes (a guess: mongoose-os's RPC
/// frame buffer).
pub const MAX_FRAME: u32 = 4096;
/// The largest attribute value BlueZ lets a write carry.
pub const MAX_ATTRIBUTE: usize = 512;

/// Why a write is refused (an ATT error to the central).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BleRefusal {
    /// TX-ctl not 4 bytes, or a length over [`MAX_FRAME`].
    BadLength,
    /// Data with no length announced, or past it.
    Overrun,
    /// One write over [`MAX_ATTRIBUTE`] bytes.
    TooLong,
}

/// One central's RPC channel.
#[derive(Debug, Clone, Default)]
pub struct BleRpcChannel {
    expected: Option<usize>,
    incoming: Vec<u8>,
    answer: Vec<u8>,
    read_at: usize,
    /// Added to the length RX-ctl reports (a firmware bug seen in the field).
    pub length_skew: i64,
    /// Data reads per answer that return nothing before the bytes come.
    pub empty_reads: u32,
    empties_left: u32,
}

impl BleRpcChannel {
    pub fn new() -> BleRpcChannel {
        BleRpcChannel::default()
    }

    /// A channel with the two field faults set.
    pub fn with_faults(length_skew: i64, empty_reads: u32) -> BleRpcChannel {
        BleRpcChannel { length_skew, empty_reads, ..BleRpcChannel::default() }
    }

    /// A TX-ctl write: the next request's length.
    pub fn tx_ctl_write(&mut self, value: &[u8]) -> Result<(), BleRefusal> {
        let len: [u8; 4] = value.try_into().map_err(|_| BleRefusal::BadLength)?;
        let len = u32::from_be_bytes(len);
        if len == 0 || len > MAX_FRAME {
            return Err(BleRefusal::BadLength);
        }
        self.expected = Some(len as usize);
        self.incoming.clear();
        Ok(())
    }

    /// A data write; the whole request once the announced length is reached.
    pub fn data_write(&mut self, value: &[u8]) -> Result<Option<Vec<u8>>, BleRefusal> {
        if value.len() > MAX_ATTRIBUTE {
            return Err(BleRefusal::TooLong);
        }
        let expected = self.expected.ok_or(BleRefusal::Overrun)?;
        if self.incoming.len() + value.len() > expected {
            return Err(BleRefusal::Overrun);
        }
        self.incoming.extend_from_slice(value);
        if self.incoming.len() < expected {
            return Ok(None);
        }
        self.expected = None;
        // A new request: an unread answer goes.
        self.answer.clear();
        self.read_at = 0;
        Ok(Some(std::mem::take(&mut self.incoming)))
    }

    /// The device's answer; returns what RX-ctl now says (for a notification).
    pub fn respond(&mut self, frame: Vec<u8>) -> [u8; 4] {
        self.answer = frame;
        self.read_at = 0;
        self.empties_left = self.empty_reads;
        self.rx_ctl_value()
    }

    fn rx_ctl_value(&self) -> [u8; 4] {
        if self.answer.is_empty() {
            return [0; 4];
        }
        let len = (self.answer.len() as i64 + self.length_skew).clamp(0, i64::from(u32::MAX)) as u32;
        len.to_be_bytes()
    }

    /// An RX-ctl read: the pending length (0: none); the data reads start over.
    pub fn rx_ctl_read(&mut self) -> [u8; 4] {
        self.read_at = 0;
        self.rx_ctl_value()
    }

    /// A data read at this ATT MTU: the next MTU − 2 bytes of the answer.
    pub fn data_read(&mut self, mtu: u16) -> Vec<u8> {
        if self.empties_left > 0 && self.read_at == 0 && !self.answer.is_empty() {
            self.empties_left -= 1;
            return Vec::new();
        }
        let chunk = usize::from(mtu.max(23)) - 2;
        let end = (self.read_at + chunk).min(self.answer.len());
        let out = self.answer.get(self.read_at..end).map(<[u8]>::to_vec).unwrap_or_default();
        self.read_at = end;
        out
    }

    /// Bytes of a request held while its length is not reached.
    pub fn held(&self) -> usize {
        self.incoming.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn len(n: u32) -> [u8; 4] {
        n.to_be_bytes()
    }

    #[test]
    fn a_request_in_any_chunking_and_its_answer_in_mtu_chunks() {
        let mut ch = BleRpcChannel::new();
        let req = br#"{"id":1,"method":"Shelly.GetDeviceInfo"}"#;
        ch.tx_ctl_write(&len(req.len() as u32)).unwrap();
        assert_eq!(ch.data_write(&req[..10]), Ok(None));
        assert_eq!(ch.data_write(&req[10..]), Ok(Some(req.to_vec())));
        assert_eq!(ch.rx_ctl_read(), [0; 4], "nothing to read yet");
        let answer: Vec<u8> = (0..100u8).collect();
        assert_eq!(ch.respond(answer.clone()), len(100));
        assert_eq!(ch.rx_ctl_read(), len(100));
        let mut got = Vec::new();
        loop {
            let c = ch.data_read(23);
            assert!(c.len() <= 21);
            if c.is_empty() {
                break;
            }
            got.extend(c);
        }
        assert_eq!(got, answer);
        // RX-ctl read resets the offset.
        assert_eq!(ch.rx_ctl_read(), len(100));
        assert_eq!(ch.data_read(185).len(), 100);
    }

    #[test]
    fn refusals() {
        let mut ch = BleRpcChannel::new();
        assert_eq!(ch.data_write(b"{}"), Err(BleRefusal::Overrun), "no length announced");
        assert_eq!(ch.tx_ctl_write(&[0, 1]), Err(BleRefusal::BadLength));
        assert_eq!(ch.tx_ctl_write(&len(MAX_FRAME + 1)), Err(BleRefusal::BadLength));
        ch.tx_ctl_write(&len(4)).unwrap();
        assert_eq!(ch.data_write(b"12345"), Err(BleRefusal::Overrun));
        assert_eq!(ch.data_write(&[b' '; 513]), Err(BleRefusal::TooLong));
        ch.data_write(b"12").unwrap();
        // A new length drops the half frame.
        ch.tx_ctl_write(&len(2)).unwrap();
        assert_eq!(ch.held(), 0);
        assert_eq!(ch.data_write(b"{}"), Ok(Some(b"{}".to_vec())));
    }

    #[test]
    fn field_faults_skewed_length_and_empty_reads() {
        let mut ch = BleRpcChannel::with_faults(7, 2);
        assert_eq!(ch.respond(b"{\"id\":1}".to_vec()), len(15));
        assert_eq!(ch.data_read(247), Vec::<u8>::new());
        assert_eq!(ch.data_read(247), Vec::<u8>::new());
        assert_eq!(ch.data_read(247), b"{\"id\":1}".to_vec());
    }
}
