//! Transports: the endpoints links talk through. A PTY pair in CI, a real
//! serial port on a bench; the RS-485 bus joins packs and ports.

pub mod bus;
pub mod framer;
pub mod gatt;
pub mod pty;
pub mod serial;
pub mod tls;
pub mod ws_client;

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("{path}: {reason}")]
    Path { path: PathBuf, reason: String },
    #[error("cannot open a PTY pair: {0}")]
    Pty(String),
    #[error("serial port {path}: {reason}")]
    Serial { path: PathBuf, reason: String },
}
