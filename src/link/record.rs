//! One frame seen on a simulated serial link, as recorded by the bench.

use std::fmt;

/// Which way a frame travelled on the bus.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    /// master → device (a request on the bus)
    Request,
    /// device → master (a reply)
    Response,
}

impl Direction {
    /// The other way along the link: a request's reply travels `Request.reverse()`.
    pub fn reverse(self) -> Direction {
        match self {
            Direction::Request => Direction::Response,
            Direction::Response => Direction::Request,
        }
    }

    /// The lowercase name, the same text serde uses: `"request"` / `"response"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Request => "request",
            Direction::Response => "response",
        }
    }
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A complete frame (address byte through CRC) captured on a link.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FrameRecord {
    pub link: String,
    pub direction: Direction,
    /// nanoseconds since the Unix epoch
    pub timestamp_ns: u64,
    pub bytes: Vec<u8>,
}

impl FrameRecord {
    /// Builds a record; `link` is the name of the bus (e.g. the PTY path or a logical name).
    pub fn new(
        link: impl Into<String>,
        direction: Direction,
        timestamp_ns: u64,
        bytes: impl Into<Vec<u8>>,
    ) -> Self {
        FrameRecord {
            link: link.into(),
            direction,
            timestamp_ns,
            bytes: bytes.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn direction_serializes_snake_case() {
        assert_eq!(
            serde_json::to_string(&Direction::Request).unwrap(),
            "\"request\""
        );
        assert_eq!(
            serde_json::to_string(&Direction::Response).unwrap(),
            "\"response\""
        );
        let d: Direction = serde_json::from_str("\"response\"").unwrap();
        assert_eq!(d, Direction::Response);
        assert_eq!(Direction::Request.to_string(), "request");
        assert_eq!(Direction::Request.reverse(), Direction::Response);
        assert_eq!(Direction::Response.reverse(), Direction::Request);
    }

    #[test]
    fn record_round_trips_through_json() {
        let rec = FrameRecord::new(
            "bus0",
            Direction::Request,
            1_700_000_000_123_456_789,
            vec![1, 3, 0, 0, 0, 0x2f],
        );
        let json = serde_json::to_string(&rec).unwrap();
        assert!(json.contains("\"direction\":\"request\""), "{json}");
        let back: FrameRecord = serde_json::from_str(&json).unwrap();
        assert_eq!(back, rec);
    }
}
