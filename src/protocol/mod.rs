//! Protocol cores for the simulated devices.
//!
//! Every module here is *sans-IO*: bytes in, typed values or errors out (and typed values
//! in, bytes out). None of them touches tokio, a serial port, a clock or any other I/O, so
//! the same code serves the simulator, the client actors, the passive sniffer, the fuzz
//! targets and the benches. Timing (RTU silence, wire time) and transport faults are the
//! link/transport layers' business.
//!
//! * [`modbus`] — Modbus RTU frame codec, stream framing, and a read-only register server.
//! * [`eg4`] — EG4 LifePower4 register profiles (`lp4-v2`, `eg4-ll`): telemetry ⇄ registers.
//! * [`eg4_legacy`] — the legacy EG4 `7E … 0D` binary protocol.
//! * [`jbd`] — JBD / Xiaoxiang smart-BMS frames (BLE 0xFF00), typed payloads, PIN
//!   handshake and the client-side notification reassembler.
//! * [`dbus`] — the D-Bus wire format as the virtual air's message bus needs it: SASL,
//!   framing, header fields and the sender stamp, match rules.
//! * [`bvlc_sc`] — BACnet/SC BVLC messages (ASHRAE 135 Annex AB), header options,
//!   and the hub's forwarding rewrite.
//! * [`mcuboot`] — MCUboot images: header, TLVs, the SHA-256 an SMP server reports.
//! * [`smp`] — MCUmgr SMP: header, CBOR payloads, error forms, serial console lines.
//! * [`shelly`] — Shelly Gen2+ RPC frames, error forms, digest authentication.
//! * [`capture_file`] — pcapng, pcap and btsnoop containers, read as a stream.
//! * [`hci`] — Bluetooth HCI from capture files down to ATT, with GATT discovery.
//! * [`ip`] — IP packets from capture files down to UDP datagrams.

pub mod bvlc_sc;
pub mod capture_file;
pub mod dbus;
pub mod eg4;
pub mod eg4_legacy;
pub mod hci;
pub mod http_message;
pub mod ip;
pub mod jbd;
pub mod mcuboot;
pub mod modbus;
pub mod shelly;
pub mod smp;
pub mod tcp_stream;
pub mod ws_capture;

/// Bytes as lower-case hex, no separators (digests as protocols print them).
pub fn lower_hex(b: &[u8]) -> String {
    use std::fmt::Write as _;
    b.iter().fold(String::with_capacity(b.len() * 2), |mut s, x| {
        let _ = write!(s, "{x:02x}");
        s
    })
}
