//! The client side of a serial line: a real tty (USB RS-485 adapter) or the
//! slave side of one of our PTYs. Both open the same way, through
//! tokio-serial, so a client actor in CI exercises the real-hardware path.

use std::path::Path;
use std::time::Duration;

use tokio_serial::{SerialPortBuilderExt, SerialStream};

use super::TransportError;

/// Opens `path` at `baud` 8N1, no flow control, raw.
pub fn open_serial(path: &Path, baud: u32) -> Result<SerialStream, TransportError> {
    let err = |reason: String| TransportError::Serial {
        path: path.to_path_buf(),
        reason,
    };
    if !path.exists() {
        return Err(err("no such device (is the adapter plugged in / the simulator running?)".into()));
    }
    let s = tokio_serial::new(path.to_string_lossy(), baud)
        .data_bits(tokio_serial::DataBits::Eight)
        .parity(tokio_serial::Parity::None)
        .stop_bits(tokio_serial::StopBits::One)
        .flow_control(tokio_serial::FlowControl::None)
        .timeout(Duration::from_millis(10))
        .open_native_async()
        .map_err(|e| err(e.to_string()))?;
    Ok(s)
}

/// Modbus RTU inter-frame silence at `baud`: 3.5 character times, at least
/// 1.75 ms as the spec fixes for rates above 19200 (we round up to 2 ms,
/// the rule of thumb clients use).
pub fn rtu_silence(baud: u32) -> Duration {
    let t = Duration::from_secs_f64(35.0 / f64::from(baud.max(1)));
    t.max(Duration::from_millis(2))
}

/// Time one byte occupies the line: 10 bit-times (start, 8 data, stop).
pub fn byte_time(baud: u32) -> Duration {
    Duration::from_secs_f64(10.0 / f64::from(baud.max(1)))
}
