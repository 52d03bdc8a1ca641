//! The limits hilbench's servers apply to their clients, in one place, so
//! every server (the air's bus now; the hub, SMP and Shelly servers next)
//! is born with them: bounded queues in bytes, handshake timeouts, caps on
//! connections that have not finished their handshake, and logs that
//! cannot flood.

use std::time::{Duration, Instant};

/// The air's D-Bus bus.
pub mod air_bus {
    use std::time::Duration;

    /// Bytes waiting for one connection before it counts as not reading
    /// and is dropped (dbus-daemon drops a client past its byte limit).
    pub const MAX_QUEUED_BYTES: usize = 32 << 20;
    /// Bytes waiting for all connections together: past it the connection
    /// with the most waiting is dropped, so several clients that do not
    /// read cannot take together what one may not (the air itself, owner
    /// of `org.bluez`, is never the one dropped).
    pub const MAX_QUEUED_BYTES_ALL: usize = 48 << 20;
    /// What a queued message costs besides its bytes (its slot, its Arc).
    pub const QUEUED_OVERHEAD: usize = 128;
    /// Time a new connection has to authenticate (dbus-daemon's `auth_timeout`).
    pub const AUTH_TIMEOUT: Duration = Duration::from_secs(5);
    /// Connections still authenticating at once; a newcomer closes the
    /// oldest (dbus-daemon's `max_incomplete_connections` is 64 on the system bus).
    pub const MAX_INCOMPLETE: usize = 64;
    /// Method calls one connection may have waiting for replies; more get
    /// LimitsExceeded (dbus-daemon's `max_replies_per_connection`, 128 on
    /// the system bus).
    pub const MAX_PENDING_REPLIES: usize = 128;
    /// Method calls one connection may owe answers to, from all callers
    /// (those gone included); more get LimitsExceeded, except from a caller
    /// with fewer than [`LIGHT_CALLER_PENDING`] calls out, up to twice this.
    pub const MAX_PENDING_PER_CALLEE: usize = 256;
    /// A caller with fewer calls than this waiting is not flooding anyone.
    pub const LIGHT_CALLER_PENDING: usize = 8;
    /// Longest AddMatch rule text (dbus-daemon's DBUS_MAXIMUM_MATCH_RULE_LENGTH).
    pub const MAX_MATCH_RULE_LENGTH: usize = 1024;
    /// Match rules one connection may hold (dbus-daemon's system bus: 512).
    pub const MAX_MATCH_RULES: usize = 512;
}

/// How often a server writes a line about refused or failed connections
/// of one kind; the line says how many it stands for.
pub const REFUSAL_LOG_PERIOD: Duration = Duration::from_secs(10);

/// A log line that repeats says so once per `period`, with how many it
/// stood for, instead of once per event.
#[derive(Debug)]
pub struct LogEvery {
    period: Duration,
    last: Option<Instant>,
    suppressed: u64,
}

impl Default for LogEvery {
    /// Once per [`REFUSAL_LOG_PERIOD`].
    fn default() -> Self {
        LogEvery::new(REFUSAL_LOG_PERIOD)
    }
}

impl LogEvery {
    pub const fn new(period: Duration) -> Self {
        LogEvery { period, last: None, suppressed: 0 }
    }

    /// Whether to log now; `Some(n)`: log, and say `n` more were left out since the last line.
    pub fn check(&mut self, now: Instant) -> Option<u64> {
        match self.last {
            Some(t) if now.duration_since(t) < self.period => {
                self.suppressed += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_repeating_line_is_logged_once_per_period_with_a_count() {
        let mut l = LogEvery::new(Duration::from_secs(10));
        let t0 = Instant::now();
        assert_eq!(l.check(t0), Some(0));
        for i in 1..=500 {
            assert_eq!(l.check(t0 + Duration::from_millis(i * 10)), None);
        }
        assert_eq!(l.check(t0 + Duration::from_secs(10)), Some(500));
        assert_eq!(l.check(t0 + Duration::from_secs(11)), None);
    }
}
