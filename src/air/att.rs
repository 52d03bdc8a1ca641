//! The ATT and BlueZ rules the air follows, as plain functions: how long a
//! notification may be, which write procedure a `WriteValue` becomes, and
//! how an application's D-Bus error turns into an ATT error code and back
//! into the D-Bus error a central sees. Each rule names the BlueZ source it
//! was read from (bluez/bluez at 690c16df).

/// The ATT MTU of a fresh LE link (Core spec Vol 3 Part F 3.2.8).
pub const DEFAULT_ATT_MTU: u16 = 23;
/// The largest ATT MTU BlueZ negotiates.
pub const MAX_ATT_MTU: u16 = 517;

pub const READ_NOT_PERMITTED: u8 = 0x02;
pub const WRITE_NOT_PERMITTED: u8 = 0x03;
pub const REQUEST_NOT_SUPPORTED: u8 = 0x06;
pub const INVALID_OFFSET: u8 = 0x07;
pub const AUTHORIZATION: u8 = 0x08;
pub const INVALID_ATTRIBUTE_VALUE_LEN: u8 = 0x0D;
pub const UNLIKELY: u8 = 0x0E;
const ALREADY_IN_PROGRESS: u8 = 0xFE;
const CCC_IMPROPERLY_CONFIGURED: u8 = 0xFD;

/// The bytes of a notification that fit one ATT_HANDLE_VALUE_NTF PDU: BlueZ
/// (`bt_gatt_server_send_notification`, src/shared/gatt-server.c) copies
/// `MIN(len, mtu - 1 - 2)` bytes after the opcode and handle and drops the
/// rest. It does not split.
pub fn notification_payload(value: &[u8], mtu: u16) -> &[u8] {
    let room = usize::from(mtu.max(DEFAULT_ATT_MTU)) - 3;
    &value[..value.len().min(room)]
}

/// The ATT procedure a remote `WriteValue` becomes, decided the way
/// `characteristic_write_value` (src/gatt-client.c) decides it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteProcedure {
    /// Write request (or a long write when it does not fit): the central
    /// waits for the peripheral's answer.
    Request,
    /// Write command: no answer, the central's call returns at once.
    Command,
    /// Reliable (prepared) write, answered like a request.
    Reliable,
}

impl WriteProcedure {
    /// The `type` option the peripheral's application is given.
    pub fn app_type(self) -> &'static str {
        match self {
            WriteProcedure::Request => "request",
            WriteProcedure::Command => "command",
            WriteProcedure::Reliable => "reliable",
        }
    }
}

/// Why a write is refused before anything goes on air.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteRefusal {
    /// org.bluez.Error.NotSupported
    NotSupported,
    /// org.bluez.Error.Failed "Failed to initiate write"
    FailedToInitiate,
}

/// Picks the write procedure from the `type` option and the characteristic
/// flags. With no type: reliable-write, then write, then
/// write-without-response. An explicit type is used as given (the server
/// decides whether it accepts it); an unknown type is NotSupported. A
/// command longer than MTU − 3 cannot be sent (`bt_att_send` refuses a PDU
/// over the MTU) and fails to initiate.
pub fn write_procedure(
    requested: Option<&str>,
    flags: &[String],
    offset: u16,
    len: usize,
    mtu: u16,
) -> Result<WriteProcedure, WriteRefusal> {
    let has = |f: &str| flags.iter().any(|x| x == f);
    match requested.map(str::to_ascii_lowercase).as_deref() {
        Some("reliable") => return Ok(WriteProcedure::Reliable),
        Some("request") => return Ok(WriteProcedure::Request),
        Some("command") => {}
        Some(_) => return Err(WriteRefusal::NotSupported),
        None if has("reliable-write") => return Ok(WriteProcedure::Reliable),
        None if has("write") => return Ok(WriteProcedure::Request),
        None if has("write-without-response") => {}
        None => return Err(WriteRefusal::NotSupported),
    }
    if offset != 0 {
        return Err(WriteRefusal::FailedToInitiate);
    }
    if len > usize::from(mtu) - 3 {
        return Err(WriteRefusal::FailedToInitiate);
    }
    Ok(WriteProcedure::Command)
}

/// Whether the peripheral's server lets a write through: a characteristic
/// gets ATT write permission from any of its write flags
/// (`check_permissions` in src/shared/gatt-server.c).
pub fn server_accepts_write(flags: &[String]) -> bool {
    flags.iter().any(|f| {
        matches!(
            f.as_str(),
            "write" | "write-without-response" | "reliable-write" | "authenticated-signed-writes"
                | "encrypt-write" | "encrypt-authenticated-write" | "secure-write"
        )
    })
}

/// Whether the server lets a read through.
pub fn server_accepts_read(flags: &[String]) -> bool {
    flags.iter().any(|f| {
        matches!(
            f.as_str(),
            "read" | "encrypt-read" | "encrypt-authenticated-read" | "secure-read"
        )
    })
}

/// The ATT error a peripheral's server sends when its application answers a
/// read or write with a D-Bus error (`dbus_error_to_att_ecode`,
/// src/gatt-database.c). `permission_error` is READ_ or WRITE_NOT_PERMITTED.
pub fn app_error_to_att(name: &str, message: &str, permission_error: u8) -> u8 {
    match name {
        "org.bluez.Error.Failed" => {
            let code = message.trim();
            let parsed = code
                .strip_prefix("0x")
                .or_else(|| code.strip_prefix("0X"))
                .map(|h| u32::from_str_radix(h, 16))
                .unwrap_or_else(|| code.parse::<u32>());
            match parsed {
                Ok(c) if (0x80..=0x9F).contains(&c) => c as u8,
                Ok(_) => UNLIKELY,
                Err(_) => 0x80,
            }
        }
        "org.bluez.Error.NotSupported" => REQUEST_NOT_SUPPORTED,
        "org.bluez.Error.NotAuthorized" => AUTHORIZATION,
        "org.bluez.Error.InvalidValueLength" => INVALID_ATTRIBUTE_VALUE_LEN,
        "org.bluez.Error.InvalidOffset" => INVALID_OFFSET,
        "org.bluez.Error.InProgress" => ALREADY_IN_PROGRESS,
        "org.bluez.Error.ImproperlyConfigured" => CCC_IMPROPERLY_CONFIGURED,
        "org.bluez.Error.NotPermitted" => permission_error,
        _ => UNLIKELY,
    }
}

/// The D-Bus error a central gets for an ATT error from the peer
/// (`create_gatt_dbus_error`, src/gatt-client.c): (error name, message).
pub fn att_error_to_central(code: u8) -> (&'static str, String) {
    match code {
        READ_NOT_PERMITTED => ("org.bluez.Error.NotPermitted", "Read not permitted".into()),
        WRITE_NOT_PERMITTED => ("org.bluez.Error.NotPermitted", "Write not permitted".into()),
        0x05 | 0x0C | 0x0F => ("org.bluez.Error.NotPermitted", "Not paired".into()),
        INVALID_OFFSET => ("org.bluez.Error.InvalidArguments", "Invalid offset".into()),
        INVALID_ATTRIBUTE_VALUE_LEN => ("org.bluez.Error.InvalidArguments", "Invalid Length".into()),
        AUTHORIZATION => ("org.bluez.Error.NotAuthorized", "Operation Not Authorized".into()),
        REQUEST_NOT_SUPPORTED => ("org.bluez.Error.NotSupported", "Operation is not supported".into()),
        0 => ("org.bluez.Error.Failed", "Operation failed".into()),
        c => ("org.bluez.Error.Failed", format!("Operation failed with ATT error: 0x{c:02x}")),
    }
}

/// ATT opcodes the air writes to its capture (Core spec Vol 3 Part F 3.4.8).
pub mod opcode {
    pub const ERROR_RSP: u8 = 0x01;
    pub const EXCHANGE_MTU_REQ: u8 = 0x02;
    pub const EXCHANGE_MTU_RSP: u8 = 0x03;
    pub const READ_REQ: u8 = 0x0A;
    pub const READ_RSP: u8 = 0x0B;
    pub const WRITE_REQ: u8 = 0x12;
    pub const WRITE_RSP: u8 = 0x13;
    pub const HANDLE_VALUE_NTF: u8 = 0x1B;
    pub const HANDLE_VALUE_IND: u8 = 0x1D;
    pub const HANDLE_VALUE_CFM: u8 = 0x1E;
    pub const WRITE_CMD: u8 = 0x52;
}

/// An ATT PDU that names an attribute: opcode, handle (little-endian), value.
pub fn pdu_with_handle(op: u8, handle: u16, value: &[u8]) -> Vec<u8> {
    let mut pdu = Vec::with_capacity(3 + value.len());
    pdu.push(op);
    pdu.extend_from_slice(&handle.to_le_bytes());
    pdu.extend_from_slice(value);
    pdu
}

/// An ATT PDU of an opcode and a plain payload (Read Response, Write Response).
pub fn pdu(op: u8, payload: &[u8]) -> Vec<u8> {
    let mut pdu = Vec::with_capacity(1 + payload.len());
    pdu.push(op);
    pdu.extend_from_slice(payload);
    pdu
}

/// ATT_ERROR_RSP: the opcode in error, the handle, the error code.
pub fn error_rsp(request: u8, handle: u16, code: u8) -> Vec<u8> {
    let h = handle.to_le_bytes();
    vec![opcode::ERROR_RSP, request, h[0], h[1], code]
}

/// ATT_EXCHANGE_MTU_REQ / _RSP carry one MTU (little-endian).
pub fn exchange_mtu(op: u8, mtu: u16) -> Vec<u8> {
    pdu(op, &mtu.to_le_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flags(f: &[&str]) -> Vec<String> {
        f.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn notifications_are_cut_at_mtu_minus_three() {
        let v: Vec<u8> = (0..40).collect();
        assert_eq!(notification_payload(&v, 23), &v[..20]);
        assert_eq!(notification_payload(&v, 247), &v[..]);
        assert_eq!(notification_payload(&v, 30), &v[..27]);
        // An MTU below the spec minimum is treated as the minimum.
        assert_eq!(notification_payload(&v, 5).len(), 20);
        assert!(notification_payload(&[], 23).is_empty());
    }

    #[test]
    fn write_type_follows_bluez() {
        let wwr = flags(&["write-without-response", "notify"]);
        let both = flags(&["write", "write-without-response"]);
        assert_eq!(write_procedure(None, &wwr, 0, 5, 23), Ok(WriteProcedure::Command));
        assert_eq!(write_procedure(None, &both, 0, 5, 23), Ok(WriteProcedure::Request));
        assert_eq!(write_procedure(Some("command"), &both, 0, 5, 23), Ok(WriteProcedure::Command));
        // An explicit request goes to the server whatever the flags say.
        assert_eq!(write_procedure(Some("request"), &wwr, 0, 5, 23), Ok(WriteProcedure::Request));
        assert_eq!(write_procedure(None, &flags(&["read"]), 0, 5, 23), Err(WriteRefusal::NotSupported));
        assert_eq!(write_procedure(Some("bogus"), &both, 0, 5, 23), Err(WriteRefusal::NotSupported));
        assert_eq!(write_procedure(Some("command"), &wwr, 0, 21, 23), Err(WriteRefusal::FailedToInitiate));
        assert_eq!(write_procedure(Some("command"), &wwr, 0, 20, 23), Ok(WriteProcedure::Command));
        assert_eq!(write_procedure(Some("command"), &wwr, 2, 5, 23), Err(WriteRefusal::FailedToInitiate));
    }

    #[test]
    fn app_errors_map_to_att_and_back() {
        assert_eq!(app_error_to_att("org.bluez.Error.Failed", "0x85", WRITE_NOT_PERMITTED), 0x85);
        assert_eq!(app_error_to_att("org.bluez.Error.Failed", "boom", WRITE_NOT_PERMITTED), 0x80);
        assert_eq!(app_error_to_att("org.bluez.Error.Failed", "0x10", WRITE_NOT_PERMITTED), UNLIKELY);
        assert_eq!(app_error_to_att("org.bluez.Error.NotPermitted", "", READ_NOT_PERMITTED), READ_NOT_PERMITTED);
        assert_eq!(app_error_to_att("org.freedesktop.DBus.Error.NoReply", "", READ_NOT_PERMITTED), UNLIKELY);
        assert_eq!(att_error_to_central(WRITE_NOT_PERMITTED).0, "org.bluez.Error.NotPermitted");
        assert_eq!(att_error_to_central(REQUEST_NOT_SUPPORTED).0, "org.bluez.Error.NotSupported");
        assert_eq!(att_error_to_central(0x80).1, "Operation failed with ATT error: 0x80");
    }

    #[test]
    fn pdus_are_laid_out_as_att_says() {
        assert_eq!(pdu_with_handle(opcode::WRITE_CMD, 0x000F, b"hi"), vec![0x52, 0x0F, 0x00, b'h', b'i']);
        assert_eq!(pdu(opcode::WRITE_RSP, &[]), vec![0x13]);
        assert_eq!(error_rsp(opcode::WRITE_REQ, 0x0102, WRITE_NOT_PERMITTED), vec![0x01, 0x12, 0x02, 0x01, 0x03]);
        assert_eq!(exchange_mtu(opcode::EXCHANGE_MTU_REQ, 247), vec![0x02, 0xF7, 0x00]);
    }

    #[test]
    fn permissions_come_from_flags() {
        assert!(server_accepts_write(&flags(&["write-without-response"])));
        assert!(!server_accepts_write(&flags(&["read", "notify"])));
        assert!(server_accepts_read(&flags(&["read"])));
        assert!(!server_accepts_read(&flags(&["notify"])));
    }
}
