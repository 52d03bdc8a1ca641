//! The `bsc-node` actor against real hub servers over loopback: failover to the failover
//! hub and back to the primary, NPDU exchange, duplicate-VMAC NAK, link faults, TLS.

use std::time::{Duration, Instant};

use actix::prelude::*;
use hilbench::client::bsc_node::{BscNodeActor, BscNodeConfig, DisconnectNode, GetNodeStatus, SendNpdu, TakeReceived};
use hilbench::client::bsc_node_core::{HubChoice, NodeConfig, SendError};
use hilbench::client::poller::{ClientClearFaults, ClientFault, ClientFrames};
use hilbench::device::bsc_hub::{HubHandle, HubServer, HubServerConfig};
use hilbench::device::bsc_hub_core::{HubConfig, HubRole};
use hilbench::link::fault::{FaultRule, FaultTrigger, LinkFault};
use hilbench::link::record::Direction;
use hilbench::observe::{Observation, ObservationKind, ObservationLog};
use hilbench::protocol::bvlc_sc::{function, DeviceUuid, Vmac};
use hilbench::transport::tls::TlsDir;
use hilbench::transport::ws_client::WsConnectOptions;

/// Generous: a loaded 2-core CI machine.
const T: Duration = Duration::from_secs(20);

fn vmac(n: u8) -> Vmac {
    Vmac([0x02, 0xEE, 0, 0, 0, n])
}

fn uuid(n: u8) -> DeviceUuid {
    DeviceUuid([n; 16])
}

fn hub_config(role: HubRole, listen: std::net::SocketAddr) -> HubServerConfig {
    HubServerConfig {
        listen,
        worker_threads: 1,
        core: HubConfig { hub_status: role, ..HubConfig::default() },
        ..HubServerConfig::default()
    }
}

async fn start_hub(role: HubRole, listen: std::net::SocketAddr) -> HubHandle {
    HubServer::start(hub_config(role, listen)).await.expect("hub starts")
}

fn any_port() -> std::net::SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

fn node(name: &str, n: u8, primary: &str, failover: Option<&str>, log: &ObservationLog) -> Addr<BscNodeActor> {
    let mut s = NodeConfig::new(vmac(n), uuid(n));
    s.heartbeat_interval = Duration::from_secs(30);
    let mut cfg = BscNodeConfig::new(name, primary, s);
    cfg.failover_url = failover.map(str::to_string);
    cfg.backoff_min = Duration::from_millis(100);
    cfg.backoff_max = Duration::from_millis(400);
    cfg.ws.timeout = Duration::from_secs(5);
    BscNodeActor::new(cfg, log.clone()).start()
}

/// Polls `f` every 20 ms until it is true or `T` passes.
async fn until(what: &str, mut f: impl AsyncFnMut() -> bool) {
    let start = Instant::now();
    while start.elapsed() < T {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("timed out waiting for: {what} ({:?} elapsed)", start.elapsed());
}

async fn wait_on(addr: &Addr<BscNodeActor>, hub: Option<HubChoice>) {
    until(&format!("node on {hub:?}"), async || addr.send(GetNodeStatus).await.unwrap().connected_to == hub).await;
}

fn kinds(log: &ObservationLog, source: &str) -> Vec<ObservationKind> {
    log.snapshot().into_iter().filter(|o: &Observation| o.source == source).map(|o| o.kind).collect()
}

#[actix_rt::test]
async fn node_fails_over_and_returns_to_the_primary_when_it_is_back() {
    let log = ObservationLog::new(Instant::now());
    let primary = start_hub(HubRole::Primary, any_port()).await;
    let failover = start_hub(HubRole::Failover, any_port()).await;
    let (p_url, p_addr, f_url) = (primary.url(), primary.local_addr(), failover.url());

    let a = node("a", 1, &p_url, Some(&f_url), &log);
    let b = node("b", 2, &p_url, Some(&f_url), &log);
    wait_on(&a, Some(HubChoice::Primary)).await;
    wait_on(&b, Some(HubChoice::Primary)).await;

    // Traffic through the primary: unicast and broadcast carry the sender's VMAC.
    a.send(SendNpdu { dest: vmac(2), npdu: b"on-primary".to_vec() }).await.unwrap().unwrap();
    a.send(SendNpdu { dest: Vmac::BROADCAST, npdu: b"everyone".to_vec() }).await.unwrap().unwrap();
    let mut got = Vec::new();
    until("b receives two NPDUs", async || {
        got.extend(b.send(TakeReceived).await.unwrap());
        got.len() >= 2
    })
    .await;
    assert_eq!(got[0].npdu, b"on-primary");
    assert_eq!(got[0].from, Some(vmac(1)));
    assert!(!got[0].broadcast);
    assert_eq!(got[1].npdu, b"everyone");
    assert!(got[1].broadcast);
    assert_eq!(got[1].via, HubChoice::Primary);

    // The primary goes away: both move to the failover and can still talk.
    primary.shutdown().await;
    wait_on(&a, Some(HubChoice::Failover)).await;
    wait_on(&b, Some(HubChoice::Failover)).await;
    a.send(SendNpdu { dest: vmac(2), npdu: b"on-failover".to_vec() }).await.unwrap().unwrap();
    let mut got = Vec::new();
    until("b receives via the failover", async || {
        got.extend(b.send(TakeReceived).await.unwrap());
        !got.is_empty()
    })
    .await;
    assert_eq!((got[0].npdu.as_slice(), got[0].via), (&b"on-failover"[..], HubChoice::Failover));

    // Let a few primary probes fail (backoff), then bring the primary back on its port.
    let since = log.now_ms();
    until("a's probes of the primary fail twice", async || {
        log.count_since(since, |o| o.source == "a" && matches!(&o.kind, ObservationKind::BscConnectFailed { hub, .. } if hub == "primary")) >= 2
    })
    .await;
    let primary = start_hub(HubRole::Primary, p_addr).await;
    wait_on(&a, Some(HubChoice::Primary)).await;
    wait_on(&b, Some(HubChoice::Primary)).await;
    let st = a.send(GetNodeStatus).await.unwrap();
    assert_eq!((st.connects_primary, st.connects_failover), (2, 1), "{st:?}");
    // Back on the primary: the failover holds none of them any more.
    until("failover empty", async || failover.stats().connections == 0).await;

    let ka = kinds(&log, "a");
    let seq: Vec<String> = ka
        .iter()
        .filter_map(|k| match k {
            ObservationKind::BscConnected { hub, .. } => Some(format!("+{hub}")),
            ObservationKind::BscDisconnected { hub, .. } => Some(format!("-{hub}")),
            _ => None,
        })
        .collect();
    assert_eq!(seq, ["+primary", "-primary", "+failover", "+primary", "-failover"], "{ka:?}");
    assert!(ka.iter().any(|k| matches!(k, ObservationKind::BscConnectFailed { hub, .. } if hub == "primary")), "primary probes failed while it was down");
    assert!(kinds(&log, "b").iter().any(|k| matches!(k, ObservationKind::BscNpdu { broadcast: true, len: 8, .. })));

    a.send(DisconnectNode).await.unwrap();
    wait_on(&a, None).await;
    primary.shutdown().await;
    failover.shutdown().await;
}

#[actix_rt::test]
async fn duplicate_vmac_is_reported_as_a_nak_with_code_151() {
    let log = ObservationLog::new(Instant::now());
    let hub = start_hub(HubRole::Primary, any_port()).await;
    let first = node("first", 7, &hub.url(), None, &log);
    wait_on(&first, Some(HubChoice::Primary)).await;
    // Same VMAC, other UUID.
    let mut s = NodeConfig::new(vmac(7), uuid(99));
    s.connect_wait = Duration::from_secs(5);
    let mut cfg = BscNodeConfig::new("dup", hub.url(), s);
    cfg.backoff_min = Duration::from_secs(5);
    let dup = BscNodeActor::new(cfg, log.clone()).start();
    until("NAK observed", async || {
        kinds(&log, "dup").iter().any(|k| matches!(k, ObservationKind::BscNak { error_class: 7, error_code: 151, for_function: 6, .. }))
    })
    .await;
    let st = dup.send(GetNodeStatus).await.unwrap();
    assert_eq!(st.connected_to, None);
    assert_eq!(st.naks_received, 1);
    assert_eq!(
        dup.send(SendNpdu { dest: vmac(7), npdu: vec![1] }).await.unwrap(),
        Err(SendError::NotConnected)
    );
    // The original is untouched.
    assert_eq!(first.send(GetNodeStatus).await.unwrap().connected_to, Some(HubChoice::Primary));
    hub.shutdown().await;
}

#[actix_rt::test]
async fn link_faults_drop_npdus_and_a_cut_link_times_out_the_heartbeat() {
    let log = ObservationLog::new(Instant::now());
    let hub = start_hub(HubRole::Primary, any_port()).await;
    let mut s = NodeConfig::new(vmac(1), uuid(1));
    s.heartbeat_interval = Duration::from_millis(200);
    s.heartbeat_ack_wait = Duration::from_millis(300);
    let mut cfg = BscNodeConfig::new("a", hub.url(), s);
    cfg.backoff_min = Duration::from_millis(100);
    let a = BscNodeActor::new(cfg, log.clone()).start();
    let b = node("b", 2, &hub.url(), None, &log);
    wait_on(&a, Some(HubChoice::Primary)).await;
    wait_on(&b, Some(HubChoice::Primary)).await;

    // Drop the next NPDU a sends: b gets only the second.
    a.send(ClientFault(FaultRule {
        fault: LinkFault::Drop,
        trigger: FaultTrigger { direction: Some(Direction::Request), ..FaultTrigger::default() },
        name: None,
    }))
    .await
    .unwrap();
    a.send(SendNpdu { dest: vmac(2), npdu: b"one".to_vec() }).await.unwrap().unwrap();
    a.send(SendNpdu { dest: vmac(2), npdu: b"two".to_vec() }).await.unwrap().unwrap();
    // One WebSocket delivers in order: once "two" is there, "one" had its chance.
    let mut got = Vec::new();
    until("b receives the second NPDU", async || {
        got.extend(b.send(TakeReceived).await.unwrap());
        got.iter().any(|r| r.npdu == b"two")
    })
    .await;
    assert_eq!(got.iter().map(|r| r.npdu.as_slice()).collect::<Vec<_>>(), [&b"two"[..]]);

    // Delay: arrives, but late.
    a.send(ClientFault(FaultRule {
        fault: LinkFault::Delay { ms: 300, jitter_ms: 0 },
        trigger: FaultTrigger { direction: Some(Direction::Request), ..FaultTrigger::default() },
        name: None,
    }))
    .await
    .unwrap();
    let sent_at = Instant::now();
    a.send(SendNpdu { dest: vmac(2), npdu: b"late".to_vec() }).await.unwrap().unwrap();
    let mut got = Vec::new();
    until("b receives the delayed NPDU", async || {
        got.extend(b.send(TakeReceived).await.unwrap());
        !got.is_empty()
    })
    .await;
    assert!(sent_at.elapsed() >= Duration::from_millis(300), "arrived after {:?}", sent_at.elapsed());

    // Cut: heartbeats go unanswered, the node notices and reconnects.
    a.send(ClientFault(FaultRule { fault: LinkFault::Cut, trigger: FaultTrigger::default(), name: None })).await.unwrap();
    until("heartbeat timeout observed", async || {
        kinds(&log, "a").iter().any(|k| matches!(k, ObservationKind::BscHeartbeatTimeout { hub } if hub == "primary"))
    })
    .await;
    a.send(ClientClearFaults).await.unwrap();
    wait_on(&a, Some(HubChoice::Primary)).await;
    let since = log.now_ms();
    let acks = async || {
        let frames = a.send(ClientFrames).await.unwrap();
        frames.iter().filter(|f| f.direction == Direction::Response && f.bytes.first() == Some(&function::HEARTBEAT_ACK)).count()
    };
    let before = acks().await;
    until("three heartbeats answered after the restore", async || acks().await >= before + 3).await;
    assert_eq!(
        log.count_since(since, |o| o.source == "a" && matches!(o.kind, ObservationKind::BscHeartbeatTimeout { .. })),
        0,
        "heartbeats answered again once the link is restored"
    );
    hub.shutdown().await;
}

#[actix_rt::test]
async fn node_connects_over_tls_with_its_client_certificate() {
    let dir = tempfile::tempdir().unwrap();
    hilbench::cli::pki::generate(dir.path(), 1, &[], 30, false).expect("pki");
    let hub = HubServer::start(HubServerConfig { tls: Some(TlsDir::hub(dir.path())), ..hub_config(HubRole::Primary, any_port()) })
        .await
        .expect("tls hub");
    assert!(hub.url().starts_with("wss://"));
    let log = ObservationLog::new(Instant::now());
    // The Device UUID its certificate carries: the hub binds identities to certificates.
    let cert_uuid = DeviceUuid(TlsDir::node(dir.path(), "node-1").device_uuid().expect("pki writes a urn:uuid SAN"));
    let mut cfg = BscNodeConfig::new("tls", hub.url(), NodeConfig::new(vmac(3), cert_uuid));
    cfg.ws = WsConnectOptions::hub(Some(TlsDir::node(dir.path(), "node-1").client_config().unwrap()));
    let a = BscNodeActor::new(cfg, log.clone()).start();
    wait_on(&a, Some(HubChoice::Primary)).await;
    // Without a client certificate the hub refuses: the node reports the failure.
    let mut cfg = BscNodeConfig::new("anon", hub.url(), NodeConfig::new(vmac(4), uuid(4)));
    cfg.ws = WsConnectOptions::hub(Some(
        hilbench::transport::tls::node_client_config(&dir.path().join("ca.pem"), None).unwrap(),
    ));
    let _anon = BscNodeActor::new(cfg, log.clone()).start();
    until("anonymous node refused", async || !kinds(&log, "anon").is_empty()).await;
    assert!(kinds(&log, "anon").iter().all(|k| matches!(k, ObservationKind::BscConnectFailed { .. })));
    hub.shutdown().await;
}
