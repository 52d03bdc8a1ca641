//! Connection-level faults, the sans-IO half: which connections a stream link
//! refuses or accepts-then-closes, and what happens to the bytes of the ones
//! it opens (reset, half-open, latency, bandwidth, close after N bytes, slow
//! close). [`super::stream`] carries the decisions out on a TCP socket.
//!
//! Triggers count connections, not frames: without `count`, `probability`
//! or `always` a fault acts on one connection, the one open when it is added
//! or else the next to open; `count: N` on N connections; `probability: P`
//! on each connection with that (seeded) chance; `always: true` on every
//! connection until cleared. Byte thresholds count from the moment the fault
//! reaches the connection, in the fault's direction (both when it has none).

use std::collections::BTreeMap;
use std::time::Duration;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::fault::{FaultRule, LinkFault};
use super::record::Direction;

/// One connection a link opened, numbered from 1.
pub type ConnId = u64;

/// What becomes of a connection the link is asked to open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opening {
    /// Refused before anything is sent (ECONNREFUSED).
    Refuse,
    /// The TCP handshake completes and the connection is closed at once.
    AcceptClose,
    /// Opened; its bytes follow [`ConnFaultEngine::budget`].
    Open(ConnId),
}

/// An effect in force on one open connection.
#[derive(Debug, Clone, PartialEq)]
enum Effect {
    /// Reset once the counter reaches the threshold (absolute bytes).
    Reset { at: u64 },
    HalfOpen,
    Latency(Duration),
    Bandwidth(u64),
    /// Closed gracefully once the counter reaches the threshold.
    CloseAt { at: u64 },
    SlowClose(Duration),
}

#[derive(Debug, Clone)]
struct AppliedEffect {
    /// The rule's name, for `clear_faults` by name.
    name: Option<String>,
    direction: Option<Direction>,
    effect: Effect,
}

#[derive(Debug, Default)]
struct OpenConn {
    /// Bytes carried: [request, response].
    moved: [u64; 2],
    effects: Vec<AppliedEffect>,
}

impl OpenConn {
    fn counter(&self, direction: Option<Direction>) -> u64 {
        match direction {
            Some(d) => self.moved[slot(d)],
            None => self.moved[0] + self.moved[1],
        }
    }
}

fn slot(d: Direction) -> usize {
    match d {
        Direction::Request => 0,
        Direction::Response => 1,
    }
}

#[derive(Debug)]
struct ConnRule {
    rule: FaultRule,
    /// Connections it may still act on; None = unlimited.
    remaining: Option<u32>,
}

/// What may happen to the bytes travelling one way on one connection now.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Budget {
    /// Half-open: nothing moves and nothing closes.
    pub hold: bool,
    /// Bytes that may pass before the connection is reset (0: reset now).
    pub reset_in: Option<u64>,
    /// Bytes that may pass before the connection is closed (0: close now).
    pub close_in: Option<u64>,
    pub latency: Duration,
    /// Bytes per second, when limited.
    pub bandwidth: Option<u64>,
    /// How long a close waits before it goes out.
    pub slow_close: Duration,
}

/// The connection faults of one link.
#[derive(Debug)]
pub struct ConnFaultEngine {
    rules: Vec<ConnRule>,
    open: BTreeMap<ConnId, OpenConn>,
    next_conn: ConnId,
    rng: ChaCha8Rng,
}

impl ConnFaultEngine {
    pub fn new(seed: u64) -> Self {
        ConnFaultEngine {
            rules: Vec::new(),
            open: BTreeMap::new(),
            next_conn: 1,
            rng: ChaCha8Rng::seed_from_u64(seed ^ 0xC0FF_EE00_5EED_0001),
        }
    }

    /// Whether a rule's fault is one this engine carries out.
    pub fn takes(fault: &LinkFault) -> bool {
        fault.is_connection_level()
    }

    /// Adds a rule. A per-connection fault acts first on the connections open
    /// now (a `reset` without `bytes` resets them at once).
    pub fn add_rule(&mut self, rule: FaultRule) {
        let remaining = rule.trigger.uses();
        let mut r = ConnRule { rule, remaining };
        if !matches!(r.rule.fault, LinkFault::Refuse | LinkFault::AcceptClose) {
            let ids: Vec<ConnId> = self.open.keys().copied().collect();
            for conn in ids {
                if r.remaining == Some(0) {
                    break;
                }
                if Self::fires(&mut self.rng, &mut r) {
                    let c = self.open.get_mut(&conn).expect("listed above");
                    Self::attach(c, &r);
                }
            }
        }
        if r.remaining != Some(0) {
            self.rules.push(r);
        }
    }

    /// Consumes one connection's worth of the rule; true when it acts.
    fn fires(rng: &mut ChaCha8Rng, r: &mut ConnRule) -> bool {
        if let Some(n) = r.remaining.as_mut() {
            *n = n.saturating_sub(1);
        }
        match r.rule.trigger.probability {
            Some(p) => rng.gen_bool(p.clamp(0.0, 1.0)),
            None => true,
        }
    }

    fn attach(c: &mut OpenConn, r: &ConnRule) {
        let direction = r.rule.trigger.direction;
        let from = c.counter(direction);
        let effect = match &r.rule.fault {
            LinkFault::Reset { bytes } => Effect::Reset { at: from.saturating_add(bytes.unwrap_or(0)) },
            LinkFault::HalfOpen => Effect::HalfOpen,
            LinkFault::Latency { ms } => Effect::Latency(Duration::from_millis(*ms)),
            LinkFault::Bandwidth { bytes_per_s } => Effect::Bandwidth(*bytes_per_s),
            LinkFault::CloseAfter { bytes } => Effect::CloseAt { at: from.saturating_add(*bytes) },
            LinkFault::SlowClose { ms } => Effect::SlowClose(Duration::from_millis(*ms)),
            _ => return,
        };
        c.effects.push(AppliedEffect { name: r.rule.name.clone(), direction, effect });
    }

    /// The link is asked for a new connection.
    pub fn open(&mut self) -> Opening {
        let gate = |f: &LinkFault| matches!(f, LinkFault::Refuse | LinkFault::AcceptClose);
        // The first gate rule that fires decides; per-connection faults wait for a connection that opens.
        let mut verdict = None;
        for r in self.rules.iter_mut().filter(|r| gate(&r.rule.fault)) {
            if Self::fires(&mut self.rng, r) {
                verdict = Some(if r.rule.fault == LinkFault::Refuse { Opening::Refuse } else { Opening::AcceptClose });
                break;
            }
        }
        let opened = if verdict.is_none() {
            let mut conn = OpenConn::default();
            for r in self.rules.iter_mut().filter(|r| !gate(&r.rule.fault)) {
                if Self::fires(&mut self.rng, r) {
                    Self::attach(&mut conn, r);
                }
            }
            let id = self.next_conn;
            self.next_conn += 1;
            self.open.insert(id, conn);
            Some(id)
        } else {
            None
        };
        self.rules.retain(|r| r.remaining != Some(0));
        verdict.unwrap_or_else(|| Opening::Open(opened.expect("opened when no verdict")))
    }

    /// `n` bytes went through `conn` in `direction`.
    pub fn moved(&mut self, conn: ConnId, direction: Direction, n: u64) {
        if let Some(c) = self.open.get_mut(&conn) {
            c.moved[slot(direction)] = c.moved[slot(direction)].saturating_add(n);
        }
    }

    /// The connection is gone.
    pub fn closed(&mut self, conn: ConnId) {
        self.open.remove(&conn);
    }

    /// What the bytes of `conn` going `direction` may do now.
    pub fn budget(&self, conn: ConnId, direction: Direction) -> Budget {
        let mut b = Budget::default();
        let Some(c) = self.open.get(&conn) else { return b };
        let min = |cur: Option<u64>, v: u64| Some(cur.map_or(v, |c: u64| c.min(v)));
        for e in &c.effects {
            let this_way = e.direction.is_none_or(|d| d == direction);
            match e.effect {
                // A threshold counted the other way bounds this direction only once reached:
                // a reset or a close ends the whole connection.
                Effect::Reset { at } | Effect::CloseAt { at } => {
                    let left = at.saturating_sub(c.counter(e.direction));
                    if !this_way && left > 0 {
                        continue;
                    }
                    if matches!(e.effect, Effect::Reset { .. }) {
                        b.reset_in = min(b.reset_in, left);
                    } else {
                        b.close_in = min(b.close_in, left);
                    }
                }
                Effect::HalfOpen => b.hold = true,
                Effect::SlowClose(d) => b.slow_close = b.slow_close.max(d),
                Effect::Latency(d) if this_way => b.latency += d,
                Effect::Bandwidth(r) if this_way => b.bandwidth = min(b.bandwidth, r),
                Effect::Latency(_) | Effect::Bandwidth(_) => {}
            }
        }
        b
    }

    /// Removes every rule and ends every effect.
    pub fn clear(&mut self) {
        self.rules.clear();
        for c in self.open.values_mut() {
            c.effects.clear();
        }
    }

    /// Removes the rules called `name` and their effects; false when none had it.
    pub fn clear_named(&mut self, name: &str) -> bool {
        let before = self.rules.len();
        self.rules.retain(|r| r.rule.name.as_deref() != Some(name));
        let mut found = self.rules.len() != before;
        // A one-shot rule already used up still has its effect on a connection.
        for c in self.open.values_mut() {
            let before = c.effects.len();
            c.effects.retain(|e| e.name.as_deref() != Some(name));
            found |= c.effects.len() != before;
        }
        found
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::link::fault::FaultTrigger;

    fn rule(fault: LinkFault, trigger: FaultTrigger, name: Option<&str>) -> FaultRule {
        FaultRule { fault, trigger, name: name.map(String::from) }
    }

    fn once(fault: LinkFault) -> FaultRule {
        rule(fault, FaultTrigger::default(), None)
    }

    fn open(e: &mut ConnFaultEngine) -> ConnId {
        match e.open() {
            Opening::Open(id) => id,
            other => panic!("expected an open connection, got {other:?}"),
        }
    }

    #[test]
    fn a_one_shot_reset_hits_the_open_connection_now_and_not_the_next() {
        let mut e = ConnFaultEngine::new(1);
        let a = open(&mut e);
        assert_eq!(e.budget(a, Direction::Request).reset_in, None);
        e.add_rule(once(LinkFault::Reset { bytes: None }));
        assert_eq!(e.budget(a, Direction::Request).reset_in, Some(0));
        assert_eq!(e.budget(a, Direction::Response).reset_in, Some(0));
        e.closed(a);
        let b = open(&mut e);
        assert_eq!(e.budget(b, Direction::Request), Budget::default());
    }

    #[test]
    fn with_no_connection_open_a_fault_waits_for_the_next() {
        let mut e = ConnFaultEngine::new(1);
        e.add_rule(once(LinkFault::HalfOpen));
        let a = open(&mut e);
        assert!(e.budget(a, Direction::Response).hold);
        e.closed(a);
        let b = open(&mut e);
        assert!(!e.budget(b, Direction::Response).hold);
    }

    #[test]
    fn refuse_and_accept_close_count_attempts_and_spare_per_connection_faults() {
        let mut e = ConnFaultEngine::new(1);
        e.add_rule(rule(LinkFault::Refuse, FaultTrigger { count: Some(2), ..Default::default() }, None));
        e.add_rule(once(LinkFault::AcceptClose));
        e.add_rule(once(LinkFault::Latency { ms: 50 }));
        assert_eq!(e.open(), Opening::Refuse);
        assert_eq!(e.open(), Opening::Refuse);
        assert_eq!(e.open(), Opening::AcceptClose);
        // The latency waited for a connection that opened.
        let a = open(&mut e);
        assert_eq!(e.budget(a, Direction::Request).latency, Duration::from_millis(50));
    }

    #[test]
    fn byte_thresholds_count_from_when_the_fault_arrives_in_its_direction() {
        let mut e = ConnFaultEngine::new(1);
        let a = open(&mut e);
        e.moved(a, Direction::Request, 100);
        let dir = FaultTrigger { direction: Some(Direction::Request), ..Default::default() };
        e.add_rule(rule(LinkFault::Reset { bytes: Some(10) }, dir, None));
        assert_eq!(e.budget(a, Direction::Request).reset_in, Some(10));
        // The other direction runs free until the reset happens.
        assert_eq!(e.budget(a, Direction::Response).reset_in, None);
        e.moved(a, Direction::Response, 1000);
        assert_eq!(e.budget(a, Direction::Request).reset_in, Some(10));
        e.moved(a, Direction::Request, 10);
        assert_eq!(e.budget(a, Direction::Request).reset_in, Some(0));
        assert_eq!(e.budget(a, Direction::Response).reset_in, Some(0));
    }

    #[test]
    fn close_after_without_direction_counts_both_ways() {
        let mut e = ConnFaultEngine::new(1);
        let a = open(&mut e);
        e.add_rule(once(LinkFault::CloseAfter { bytes: 30 }));
        e.moved(a, Direction::Request, 20);
        assert_eq!(e.budget(a, Direction::Response).close_in, Some(10));
        e.moved(a, Direction::Response, 10);
        assert_eq!(e.budget(a, Direction::Request).close_in, Some(0));
    }

    #[test]
    fn clearing_by_name_ends_only_that_effect_even_when_used_up() {
        let mut e = ConnFaultEngine::new(1);
        let a = open(&mut e);
        e.add_rule(rule(LinkFault::HalfOpen, FaultTrigger::default(), Some("wifi")));
        e.add_rule(rule(LinkFault::Bandwidth { bytes_per_s: 100 }, FaultTrigger::default(), Some("slow")));
        assert!(e.budget(a, Direction::Request).hold);
        assert!(e.clear_named("wifi"));
        assert!(!e.clear_named("wifi"));
        let b = e.budget(a, Direction::Request);
        assert!(!b.hold);
        assert_eq!(b.bandwidth, Some(100));
        e.clear();
        assert_eq!(e.budget(a, Direction::Request), Budget::default());
    }

    #[test]
    fn always_acts_on_every_connection_and_probability_is_seeded() {
        let mut e = ConnFaultEngine::new(1);
        e.add_rule(rule(LinkFault::Refuse, FaultTrigger { always: true, ..Default::default() }, None));
        for _ in 0..5 {
            assert_eq!(e.open(), Opening::Refuse);
        }
        let run = |seed| {
            let mut e = ConnFaultEngine::new(seed);
            e.add_rule(rule(LinkFault::Refuse, FaultTrigger { probability: Some(0.5), ..Default::default() }, None));
            (0..32).map(|_| e.open() == Opening::Refuse).collect::<Vec<_>>()
        };
        let first = run(7);
        assert_eq!(first, run(7));
        assert!(first.contains(&true) && first.contains(&false), "{first:?}");
    }

    #[test]
    fn latencies_and_bandwidths_follow_their_direction() {
        let mut e = ConnFaultEngine::new(1);
        let a = open(&mut e);
        let resp = FaultTrigger { direction: Some(Direction::Response), always: true, ..Default::default() };
        e.add_rule(rule(LinkFault::Latency { ms: 40 }, resp.clone(), None));
        e.add_rule(rule(LinkFault::Bandwidth { bytes_per_s: 500 }, resp, None));
        e.add_rule(once(LinkFault::Bandwidth { bytes_per_s: 200 }));
        assert_eq!(e.budget(a, Direction::Response).latency, Duration::from_millis(40));
        assert_eq!(e.budget(a, Direction::Response).bandwidth, Some(200));
        assert_eq!(e.budget(a, Direction::Request).latency, Duration::ZERO);
        assert_eq!(e.budget(a, Direction::Request).bandwidth, Some(200));
    }
}
