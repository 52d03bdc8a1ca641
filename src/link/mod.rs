//! Links sit between every actor and its transport: they record each frame
//! (the capture tap) and apply the shared fault vocabulary.

pub mod capture;
pub mod conn;
pub mod fault;
pub mod recognise;
pub mod record;
pub mod stream;

pub use fault::{FaultRule, FaultSpec, LinkEngine, LinkFault};
pub use record::{Direction, FrameRecord};
