//! The one shape of every protocol core, device or client, after quinn-proto
//! and str0m: inputs at `now` in, outputs out, and the next wake-up the core
//! asks for. No core reads a clock, sleeps or does I/O, so the same core runs
//! under an actor (the generic driver in `device::driver`), a fuzzer, a
//! criterion bench or a replay of a field trace, unchanged.

use std::time::Duration;

/// Who bytes come from or go to: a connection, a central, the bus master.
/// A core with a single peer uses [`Peer::ONLY`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Peer(pub u64);

impl Peer {
    pub const ONLY: Peer = Peer(0);
}

/// What a core is told.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Input<'a> {
    /// Bytes from a link: a bus frame, a GATT write, a WebSocket message.
    Bytes { from: Peer, bytes: &'a [u8] },
    /// A peer came: a central connected, a WebSocket was accepted, the core's
    /// own connection opened (a client core then says hello).
    Connected(Peer),
    /// A peer went.
    Disconnected(Peer),
    /// A state change from a scenario or `--set`.
    Set { key: &'a str, value: f64 },
    /// Time passed: a wake-up the core asked for is due (early is harmless).
    Timeout,
}

/// What a core asks its host to do.
#[derive(Debug, Clone, PartialEq)]
pub enum Output<E> {
    /// Bytes for a peer.
    Send { to: Peer, bytes: Vec<u8> },
    /// End the connection with a peer.
    Close(Peer),
    /// Something an observer should hear of.
    Event(E),
}

/// A sans-IO protocol core.
pub trait SansIoCore {
    /// What the core reports (observations are made from these by the host).
    type Event;

    /// Takes one input at `now` (monotonic, from the host's epoch) and
    /// appends what follows from it to `out`. An `Err` is an input the core
    /// refuses (an unknown state key, a value out of range); bad bytes are
    /// never an error, they are the protocol's business.
    fn handle_input(&mut self, input: Input<'_>, now: Duration, out: &mut Vec<Output<Self::Event>>) -> Result<(), String>;

    /// When the core next needs [`Input::Timeout`]; `None`: only when an
    /// input comes.
    fn next_wakeup(&self) -> Option<Duration>;
}
