//! All four protocol cores driven through the one sans-IO trait, with no
//! actor, socket or clock: the EG4 pack, the JBD BMS, and BACnet/SC node
//! sessions talking to the hub core over an in-memory wire.

use std::time::Duration;

use hilbench::client::bsc_node_core::{NodeConfig, NodeSession, SessionEvent};
use hilbench::device::bsc_hub_core::{BscHubCore, HubConfig, HubCoreEvent, HubEvent};
use hilbench::device::eg4_core::{Eg4Event, Eg4Pack};
use hilbench::device::jbd_core::{JbdBms, JbdConfig, JbdEvent, RX_TIMEOUT};
use hilbench::model::PackConfig;
use hilbench::protocol::bvlc_sc::{DeviceUuid, Vmac};
use hilbench::protocol::jbd::{encode_read, reg};
use hilbench::sans_io::{Input, Output, Peer, SansIoCore};

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// Feeds `script` in order, each input at its time, and every wake-up the
/// core asks for up to `until` in between, as a host would.
fn run<C: SansIoCore>(core: &mut C, script: &[(u64, Input<'_>)], until: u64) -> Vec<(Duration, Output<C::Event>)> {
    let mut log = Vec::new();
    let feed = |core: &mut C, input: Input<'_>, now: Duration, log: &mut Vec<(Duration, Output<C::Event>)>| {
        let mut out = Vec::new();
        core.handle_input(input, now, &mut out).unwrap();
        log.extend(out.into_iter().map(|o| (now, o)));
    };
    let wake_until = |core: &mut C, t: Duration, log: &mut Vec<_>| {
        for _ in 0..1000 {
            match core.next_wakeup() {
                Some(w) if w <= t => feed(core, Input::Timeout, w, log),
                _ => return,
            }
        }
        panic!("the core keeps asking for a wake-up at or before {t:?}");
    };
    for (at, input) in script {
        wake_until(core, ms(*at), &mut log);
        feed(core, *input, ms(*at), &mut log);
    }
    wake_until(core, ms(until), &mut log);
    log
}

fn sends<E>(log: &[(Duration, Output<E>)]) -> Vec<&[u8]> {
    log.iter()
        .filter_map(|(_, o)| match o {
            Output::Send { bytes, .. } => Some(bytes.as_slice()),
            _ => None,
        })
        .collect()
}

#[test]
fn an_eg4_pack_answers_a_modbus_read_and_is_silent_on_a_bad_crc() {
    let mut pack = Eg4Pack::new(1, PackConfig::default()).unwrap();
    let read = [0x01, 0x03, 0x00, 0x00, 0x00, 0x02, 0xC4, 0x0B];
    let bad = [0x01, 0x03, 0x00, 0x00, 0x00, 0x02, 0xC4, 0x0C];
    let log = run(
        &mut pack,
        &[
            (0, Input::Bytes { from: Peer::ONLY, bytes: &read }),
            (10, Input::Bytes { from: Peer::ONLY, bytes: &bad }),
            (20, Input::Set { key: "soc", value: 42.0 }),
        ],
        1000,
    );
    let replies = sends(&log);
    assert_eq!(replies.len(), 1);
    assert_eq!(&replies[0][..3], &[0x01, 0x03, 0x04]);
    assert!(log.iter().any(|(t, o)| *t == ms(10) && matches!(o, Output::Event(Eg4Event::Silent { .. }))));
    assert_eq!(pack.next_wakeup(), None, "a pack needs no wake-up");
    let mut out = Vec::new();
    assert!(pack.handle_input(Input::Set { key: "warp", value: 1.0 }, ms(30), &mut out).is_err());
}

#[test]
fn a_jbd_bms_answers_and_asks_for_the_wake_up_that_drops_a_partial_request() {
    let mut bms = JbdBms::new(JbdConfig::default()).unwrap();
    let read = encode_read(reg::BASIC_INFO);
    let log = run(
        &mut bms,
        &[
            (0, Input::Connected(Peer::ONLY)),
            (10, Input::Bytes { from: Peer::ONLY, bytes: &read }),
            (20, Input::Bytes { from: Peer::ONLY, bytes: &read[..3] }),
        ],
        5000,
    );
    let replies = sends(&log);
    assert!(replies.first().is_some_and(|r| r.starts_with(&[0xDD, 0x03])), "{replies:02X?}");
    // The core asked to be woken when the half request times out, and said so then.
    let dropped = log.iter().find(|(_, o)| matches!(o, Output::Event(JbdEvent::PartialDropped { bytes: 3 })));
    assert_eq!(dropped.map(|d| d.0), Some(ms(20) + RX_TIMEOUT), "{log:?}");
    assert_eq!(bms.next_wakeup(), None);
}

/// Two node sessions and the hub core on an in-memory wire: connect, a
/// heartbeat each node asks to be woken for, and a unicast through the hub.
#[test]
fn node_sessions_and_the_hub_core_talk_through_the_trait_alone() {
    let vmac = |n: u8| Vmac([0x02, 0, 0, 0, 0, n]);
    let mut hub = BscHubCore::new(HubConfig::default());
    let mut nodes: Vec<NodeSession> = (1..=2u8)
        .map(|n| {
            let mut cfg = NodeConfig::new(vmac(n), DeviceUuid([n; 16]));
            cfg.heartbeat_interval = ms(500);
            NodeSession::new(cfg, 100 * u16::from(n))
        })
        .collect();
    let mut node_events: Vec<Vec<SessionEvent>> = vec![Vec::new(), Vec::new()];
    let mut hub_events = Vec::new();
    // What is on the wire: (to the hub from node i) or (to node i from the hub).
    let mut to_hub: Vec<(usize, Vec<u8>)> = Vec::new();
    let mut to_node: Vec<(usize, Vec<u8>)> = Vec::new();
    let deliver = |nodes: &mut Vec<NodeSession>,
                   hub: &mut BscHubCore,
                   to_hub: &mut Vec<(usize, Vec<u8>)>,
                   to_node: &mut Vec<(usize, Vec<u8>)>,
                   node_events: &mut Vec<Vec<SessionEvent>>,
                   hub_events: &mut Vec<HubCoreEvent>,
                   now: Duration| {
        while !to_hub.is_empty() || !to_node.is_empty() {
            for (i, bytes) in std::mem::take(to_hub) {
                let mut out = Vec::new();
                hub.handle_input(Input::Bytes { from: Peer(i as u64 + 1), bytes: &bytes }, now, &mut out).unwrap();
                for o in out {
                    match o {
                        Output::Send { to, bytes } => to_node.push((to.0 as usize - 1, bytes)),
                        Output::Event(e) => hub_events.push(e),
                        Output::Close(p) => panic!("the hub closed {p:?}"),
                    }
                }
            }
            for (i, bytes) in std::mem::take(to_node) {
                let mut out = Vec::new();
                nodes[i].handle_input(Input::Bytes { from: Peer::ONLY, bytes: &bytes }, now, &mut out).unwrap();
                for o in out {
                    match o {
                        Output::Send { bytes, .. } => to_hub.push((i, bytes)),
                        Output::Event(e) => node_events[i].push(e),
                        Output::Close(_) => {}
                    }
                }
            }
        }
    };
    for (i, node) in nodes.iter_mut().enumerate() {
        let mut accepted = Vec::new();
        hub.handle_input(Input::Connected(Peer(i as u64 + 1)), ms(0), &mut accepted).unwrap();
        assert!(accepted.is_empty(), "{accepted:?}");
        let mut out = Vec::new();
        node.handle_input(Input::Connected(Peer::ONLY), ms(0), &mut out).unwrap();
        for o in out {
            if let Output::Send { bytes, .. } = o {
                to_hub.push((i, bytes));
            }
        }
    }
    deliver(&mut nodes, &mut hub, &mut to_hub, &mut to_node, &mut node_events, &mut hub_events, ms(0));
    for ev in &node_events {
        assert!(ev.iter().any(|e| matches!(e, SessionEvent::Accepted(_))), "{ev:?}");
    }
    assert_eq!(hub_events.iter().filter(|e| matches!(e, HubCoreEvent::Hub(HubEvent::Connected { .. }))).count(), 2);

    // Each node asks to be woken for its heartbeat; woken, it sends one and the hub answers.
    let wake = nodes[0].next_wakeup().expect("a connected node wants a heartbeat wake-up");
    assert_eq!(wake, ms(500));
    for (i, node) in nodes.iter_mut().enumerate() {
        let mut out = Vec::new();
        node.handle_input(Input::Timeout, wake, &mut out).unwrap();
        for o in out {
            if let Output::Send { bytes, .. } = o {
                to_hub.push((i, bytes));
            }
        }
    }
    deliver(&mut nodes, &mut hub, &mut to_hub, &mut to_node, &mut node_events, &mut hub_events, wake);
    for ev in &node_events {
        assert!(ev.iter().any(|e| matches!(e, SessionEvent::HeartbeatAck { echoed_id: true, .. })), "{ev:?}");
    }

    // A unicast from node 1 to node 2 through the hub.
    let mut frame = Vec::new();
    nodes[0].encode_npdu(vmac(2), &[0x01, 0x00, 0xAB], ms(600), &mut frame).unwrap();
    to_hub.push((0, frame));
    deliver(&mut nodes, &mut hub, &mut to_hub, &mut to_node, &mut node_events, &mut hub_events, ms(600));
    assert!(
        node_events[1].iter().any(|e| matches!(e, SessionEvent::Npdu { from: Some(f), broadcast: false, npdu } if *f == vmac(1) && npdu == &[0x01, 0x00, 0xAB])),
        "{:?}",
        node_events[1]
    );
}
