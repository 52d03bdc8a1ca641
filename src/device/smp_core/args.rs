//! Request arguments as Zephyr's handlers decode them with
//! zcbor_map_decode_bulk: a key that is absent leaves its default, a key
//! whose value has the wrong type fails the whole request (EINVAL), keys
//! nobody asked for are skipped.

use ciborium::Value;

use crate::protocol::smp;

/// The value had the wrong type.
pub(super) struct WrongType;

pub(super) fn text<'a>(m: &'a [(Value, Value)], key: &str) -> Result<Option<&'a str>, WrongType> {
    match smp::get(m, key) {
        None => Ok(None),
        Some(Value::Text(t)) => Ok(Some(t)),
        Some(_) => Err(WrongType),
    }
}

pub(super) fn bytes<'a>(m: &'a [(Value, Value)], key: &str) -> Result<Option<&'a [u8]>, WrongType> {
    match smp::get(m, key) {
        None => Ok(None),
        Some(Value::Bytes(b)) => Ok(Some(b)),
        Some(_) => Err(WrongType),
    }
}

pub(super) fn uint(m: &[(Value, Value)], key: &str) -> Result<Option<u64>, WrongType> {
    match smp::get(m, key) {
        None => Ok(None),
        Some(v) => smp::as_u64(v).map(Some).ok_or(WrongType),
    }
}
