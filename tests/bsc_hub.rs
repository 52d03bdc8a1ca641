//! The BACnet/SC hub server over loopback: real WebSocket (and TLS 1.3) clients written
//! here with tokio-tungstenite and the BVLC-SC codec, against `HubServer` and against the
//! `hilbench sim bsc-hub` process.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use hilbench::device::bsc_hub::{
    ClientCertPolicy, HubHandle, HubServer, HubServerConfig, HubServerEvent, HubServerStats, RefuseReason, HUB_SUBPROTOCOL,
};
use hilbench::device::bsc_hub_core::{CloseReason, ConnId, HubConfig, HubEvent, HubRole};
use hilbench::protocol::bvlc_sc::{
    decode, encode, error_code, function, is_node_duplicate_vmac, BvlcMessage, BvlcPayload, BvlcResult, DeviceUuid,
    HubStatus, Vmac,
};
use hilbench::transport::tls::{node_client_config, TlsDir};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::broadcast;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;

/// Generous: a loaded 2-core CI machine.
const T: Duration = Duration::from_secs(20);

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<S: AsyncRead + AsyncWrite + Unpin + Send> Io for S {}
type Ws = WebSocketStream<Box<dyn Io>>;

fn vmac(n: u8) -> Vmac {
    Vmac([0x02, 0, 0, 0, 0, n])
}

fn uuid(n: u8) -> DeviceUuid {
    DeviceUuid([n; 16])
}

async fn start(cfg: HubServerConfig) -> HubHandle {
    HubServer::start(cfg).await.expect("hub starts")
}

fn plain() -> HubServerConfig {
    HubServerConfig { worker_threads: 2, ..HubServerConfig::default() }
}

/// WebSocket upgrade over `io`, offering `protocol` if given.
async fn upgrade(io: Box<dyn Io>, url: &str, protocol: Option<&str>) -> Result<Ws, WsError> {
    let mut req = url.into_client_request()?;
    if let Some(p) = protocol {
        req.headers_mut().insert("Sec-WebSocket-Protocol", HeaderValue::from_str(p).unwrap());
    }
    let (ws, resp) = tokio::time::timeout(T, tokio_tungstenite::client_async(req, io)).await.expect("handshake timed out")?;
    if protocol == Some(HUB_SUBPROTOCOL) {
        assert_eq!(resp.headers()["Sec-WebSocket-Protocol"], HUB_SUBPROTOCOL, "hub echoes the subprotocol");
    }
    Ok(ws)
}

async fn ws_connect(hub: &HubHandle, protocol: Option<&str>) -> Result<Ws, WsError> {
    let tcp = TcpStream::connect(hub.local_addr()).await.unwrap();
    upgrade(Box::new(tcp), &hub.url(), protocol).await
}

async fn wss_connect(hub: &HubHandle, tls: std::sync::Arc<rustls::ClientConfig>) -> Result<Ws, String> {
    let tcp = TcpStream::connect(hub.local_addr()).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let s = tokio_rustls::TlsConnector::from(tls).connect(name, tcp).await.map_err(|e| e.to_string())?;
    upgrade(Box::new(s), &hub.url(), Some(HUB_SUBPROTOCOL)).await.map_err(|e| e.to_string())
}

fn bytes(m: &BvlcMessage) -> Message {
    Message::Binary(encode(m).unwrap().into())
}

fn npdu(id: u16, to: Vmac, data: &[u8]) -> BvlcMessage {
    let mut m = BvlcMessage::new(id, BvlcPayload::EncapsulatedNpdu(data.to_vec()));
    m.destination = Some(to);
    m
}

/// What a node reads next: a BVLC message or the hub's close.
#[derive(Debug)]
enum Rx {
    Msg(BvlcMessage),
    Close(Option<CloseFrame>),
    Ended(#[allow(dead_code)] String),
}

struct Node {
    ws: Ws,
    vmac: Vmac,
    next_id: u16,
}

impl Node {
    /// Connect-Request, expecting Connect-Accept.
    async fn join(ws: Ws, vmac: Vmac, uuid: DeviceUuid) -> Node {
        let mut n = Node { ws, vmac, next_id: 1 };
        let accept = n.request(BvlcPayload::ConnectRequest { vmac, uuid, max_bvlc: 1600, max_npdu: 1497 }).await;
        match accept {
            Rx::Msg(BvlcMessage { payload: BvlcPayload::ConnectAccept { vmac: hub_vmac, max_bvlc, max_npdu, .. }, .. }) => {
                assert_eq!(hub_vmac, HubConfig::default().vmac);
                assert_eq!((max_bvlc, max_npdu), (1600, 1497));
            }
            other => panic!("{vmac}: expected Connect-Accept, got {other:?}"),
        }
        n
    }

    async fn send(&mut self, m: &BvlcMessage) {
        self.ws.send(bytes(m)).await.expect("send");
    }

    /// Sends `payload` with a fresh message ID and returns the next thing received.
    async fn request(&mut self, payload: BvlcPayload) -> Rx {
        let id = self.next_id;
        self.next_id += 1;
        self.send(&BvlcMessage::new(id, payload)).await;
        self.recv().await
    }

    async fn recv(&mut self) -> Rx {
        recv(&mut self.ws).await
    }

    async fn recv_msg(&mut self) -> BvlcMessage {
        match self.recv().await {
            Rx::Msg(m) => m,
            other => panic!("{}: expected a message, got {other:?}", self.vmac),
        }
    }

    /// Proves nothing else was queued for this node: a heartbeat's ACK comes next.
    async fn expect_nothing_queued(&mut self) {
        match self.request(BvlcPayload::HeartbeatRequest).await {
            Rx::Msg(BvlcMessage { payload: BvlcPayload::HeartbeatAck, .. }) => {}
            other => panic!("{}: expected only the heartbeat ACK, got {other:?}", self.vmac),
        }
    }
}

async fn recv(ws: &mut Ws) -> Rx {
    let deadline = tokio::time::Instant::now() + T;
    loop {
        let m = tokio::time::timeout_at(deadline, ws.next()).await.expect("nothing received in time");
        return match m {
            Some(Ok(Message::Binary(b))) => Rx::Msg(decode(&b).expect("hub sends valid BVLC-SC")),
            Some(Ok(Message::Close(c))) => Rx::Close(c),
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            Some(Ok(other)) => panic!("unexpected {other:?}"),
            Some(Err(e)) => Rx::Ended(e.to_string()),
            None => Rx::Ended("stream ended".into()),
        };
    }
}

fn close_code(rx: &Rx) -> Option<CloseCode> {
    match rx {
        Rx::Close(Some(c)) => Some(c.code),
        _ => None,
    }
}

/// Waits until `pred(stats)` holds.
async fn until_stats(hub: &HubHandle, what: &str, pred: impl Fn(&HubServerStats) -> bool) -> HubServerStats {
    let deadline = Instant::now() + T;
    loop {
        let s = hub.stats();
        if pred(&s) {
            return s;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}: {s:#?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Waits for the first event matching `pick`.
async fn until_event<R>(
    events: &mut broadcast::Receiver<HubServerEvent>,
    what: &str,
    mut pick: impl FnMut(&HubServerEvent) -> Option<R>,
) -> R {
    let deadline = tokio::time::Instant::now() + T;
    loop {
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Ok(Ok(e)) => {
                if let Some(r) = pick(&e) {
                    return r;
                }
            }
            Ok(Err(broadcast::error::RecvError::Lagged(n))) => panic!("event subscriber lagged by {n}"),
            Ok(Err(e)) => panic!("events ended waiting for {what}: {e}"),
            Err(_) => panic!("no {what} event in time"),
        }
    }
}

#[tokio::test]
async fn broadcast_unicast_advertisement_and_shutdown() {
    let hub = start(plain()).await;
    assert!(hub.url().starts_with("ws://127.0.0.1:"), "{}", hub.url());
    let mut events = hub.subscribe();
    let mut a = Node::join(ws_connect(&hub, Some(HUB_SUBPROTOCOL)).await.unwrap(), vmac(1), uuid(1)).await;
    let mut b = Node::join(ws_connect(&hub, Some(HUB_SUBPROTOCOL)).await.unwrap(), vmac(2), uuid(2)).await;
    let mut c = Node::join(ws_connect(&hub, Some(HUB_SUBPROTOCOL)).await.unwrap(), vmac(3), uuid(3)).await;
    for want in [vmac(1), vmac(2), vmac(3)] {
        until_event(&mut events, "Connected", |e| match e {
            HubServerEvent::Core(HubEvent::Connected { vmac, .. }) if *vmac == want => Some(()),
            _ => None,
        })
        .await;
    }

    // Broadcast: every other node gets it with A's VMAC inserted and the broadcast kept.
    a.send(&npdu(10, Vmac::BROADCAST, b"\x01\x00hello")).await;
    for n in [&mut b, &mut c] {
        let m = n.recv_msg().await;
        assert_eq!(m.originating, Some(vmac(1)));
        assert_eq!(m.destination, Some(Vmac::BROADCAST));
        assert_eq!(m.message_id, 10);
        assert_eq!(m.payload, BvlcPayload::EncapsulatedNpdu(b"\x01\x00hello".to_vec()));
    }
    a.expect_nothing_queued().await;

    // Unicast A → B: destination removed, originating inserted; C sees nothing.
    a.send(&npdu(11, vmac(2), b"\x01\x00uni")).await;
    let m = b.recv_msg().await;
    assert_eq!((m.originating, m.destination, m.message_id), (Some(vmac(1)), None, 11));
    c.expect_nothing_queued().await;
    b.expect_nothing_queued().await;

    // Unknown destination: dropped (counted), nobody gets it.
    a.send(&npdu(12, vmac(9), b"\x01\x00x")).await;
    a.expect_nothing_queued().await;

    // The Advertisement reports this hub as primary.
    match a.request(BvlcPayload::AdvertisementSolicitation).await {
        Rx::Msg(BvlcMessage { payload: BvlcPayload::Advertisement { hub_status, accept_direct, max_bvlc, .. }, .. }) => {
            assert_eq!((hub_status, accept_direct, max_bvlc), (HubStatus::ConnectedToPrimary, false, 1600));
        }
        other => panic!("{other:?}"),
    }

    let s = until_stats(&hub, "counters", |s| s.frames_written >= s.deliveries).await;
    assert_eq!(s.connections, 3);
    assert_eq!(s.accepted, 3);
    assert_eq!(s.broadcast_deliveries, 2);
    assert_eq!(s.unicast_forwarded, 1);
    assert_eq!(s.drops.unknown_destination, 1);
    assert_eq!(s.drops.slow_consumer, 0);
    assert!(s.flushes > 0 && s.flushes <= s.frames_written, "{s:?}");

    // Disconnect-Request: ACK, then the hub closes.
    match a.request(BvlcPayload::DisconnectRequest).await {
        Rx::Msg(BvlcMessage { payload: BvlcPayload::DisconnectAck, .. }) => {}
        other => panic!("{other:?}"),
    }
    assert_eq!(close_code(&a.recv().await), Some(CloseCode::Normal));
    until_stats(&hub, "A gone", |s| s.connections == 2).await;

    // Shutdown closes every node with 1001 (going away).
    let closing = tokio::spawn(async move {
        let rb = b.recv().await;
        let rc = c.recv().await;
        (close_code(&rb), close_code(&rc))
    });
    tokio::time::timeout(T, hub.shutdown()).await.expect("shutdown in time");
    assert_eq!(closing.await.unwrap(), (Some(CloseCode::Away), Some(CloseCode::Away)));
}

#[tokio::test]
async fn failover_role_is_advertised() {
    let cfg = HubServerConfig { core: HubConfig { hub_status: HubRole::Failover, ..HubConfig::default() }, ..plain() };
    let hub = start(cfg).await;
    assert_eq!(hub.role(), HubRole::Failover);
    let mut a = Node::join(ws_connect(&hub, Some(HUB_SUBPROTOCOL)).await.unwrap(), vmac(1), uuid(1)).await;
    match a.request(BvlcPayload::AdvertisementSolicitation).await {
        Rx::Msg(BvlcMessage { payload: BvlcPayload::Advertisement { hub_status, .. }, .. }) => {
            assert_eq!(hub_status, HubStatus::ConnectedToFailover);
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn duplicate_vmac_is_nakked_and_same_uuid_replaces() {
    let hub = start(plain()).await;
    let mut events = hub.subscribe();
    let mut a = Node::join(ws_connect(&hub, Some(HUB_SUBPROTOCOL)).await.unwrap(), vmac(1), uuid(1)).await;
    let mut b = Node::join(ws_connect(&hub, Some(HUB_SUBPROTOCOL)).await.unwrap(), vmac(2), uuid(2)).await;

    // Same VMAC, another UUID: NAK node-duplicate-vmac, then close 1008.
    let mut dup = Node { ws: ws_connect(&hub, Some(HUB_SUBPROTOCOL)).await.unwrap(), vmac: vmac(1), next_id: 7 };
    let req = BvlcPayload::ConnectRequest { vmac: vmac(1), uuid: uuid(9), max_bvlc: 1600, max_npdu: 1497 };
    match dup.request(req).await {
        Rx::Msg(BvlcMessage {
            message_id: 7,
            payload: BvlcPayload::Result { for_function, result: BvlcResult::Nak { error_class, error_code: code, .. } },
            ..
        }) => {
            assert_eq!(for_function, function::CONNECT_REQUEST);
            assert_eq!(error_class, 7);
            assert!(is_node_duplicate_vmac(code), "error code {code}");
        }
        other => panic!("expected a NAK, got {other:?}"),
    }
    assert_eq!(close_code(&dup.recv().await), Some(CloseCode::Policy));
    until_event(&mut events, "DuplicateVmac", |e| match e {
        HubServerEvent::Core(HubEvent::DuplicateVmac { vmac: v, uuid: u, .. }) if *v == vmac(1) && *u == uuid(9) => Some(()),
        _ => None,
    })
    .await;
    // A is untouched.
    a.expect_nothing_queued().await;

    // Same VMAC and UUID (a node reconnecting): the new connection replaces the old one.
    let mut a2 = Node::join(ws_connect(&hub, Some(HUB_SUBPROTOCOL)).await.unwrap(), vmac(1), uuid(1)).await;
    assert_eq!(close_code(&a.recv().await), Some(CloseCode::Normal));
    until_event(&mut events, "Replaced", |e| match e {
        HubServerEvent::ClosedByHub { reason: CloseReason::Replaced { .. }, .. } => Some(()),
        _ => None,
    })
    .await;
    b.send(&npdu(3, vmac(1), b"\x01\x00to-a")).await;
    let m = a2.recv_msg().await;
    assert_eq!(m.originating, Some(vmac(2)));
    let s = hub.stats();
    assert!(s.naks_sent >= 1 && s.closed_by_hub >= 2, "{s:?}");
}

#[tokio::test]
async fn subprotocol_is_required() {
    let hub = start(plain()).await;
    let mut events = hub.subscribe();
    for (offer, shown) in [(None, None), (Some("dc.bsc.bacnet.org"), Some("dc.bsc.bacnet.org")), (Some("chat, superchat"), Some("chat, superchat"))] {
        match ws_connect(&hub, offer).await {
            Err(WsError::Http(resp)) => {
                assert_eq!(resp.status(), 400, "{offer:?}");
                let body = String::from_utf8_lossy(resp.body().as_deref().unwrap_or_default()).to_string();
                assert!(body.contains(HUB_SUBPROTOCOL), "{body}");
            }
            other => panic!("{offer:?}: expected HTTP 400, got {:?}", other.map(|_| ())),
        }
        let got = until_event(&mut events, "Refused", |e| match e {
            HubServerEvent::Refused { reason: RefuseReason::Subprotocol { offered }, .. } => Some(offered.clone()),
            _ => None,
        })
        .await;
        assert_eq!(got.as_deref(), shown);
    }
    // Offered among others: accepted, and only ours is echoed (checked in `upgrade`).
    let tcp = TcpStream::connect(hub.local_addr()).await.unwrap();
    let mut req = hub.url().into_client_request().unwrap();
    req.headers_mut().insert("Sec-WebSocket-Protocol", HeaderValue::from_str(&format!("chat, {HUB_SUBPROTOCOL}")).unwrap());
    let io: Box<dyn Io> = Box::new(tcp);
    let (ws, resp) = tokio_tungstenite::client_async(req, io).await.expect("accepted when offered among others");
    assert_eq!(resp.headers()["Sec-WebSocket-Protocol"], HUB_SUBPROTOCOL);
    Node::join(ws, vmac(1), uuid(1)).await;
    let s = hub.stats();
    assert_eq!(s.refused.subprotocol, 3);
    // A plain HTTP request (no upgrade) is refused too, and counted.
    let mut tcp = TcpStream::connect(hub.local_addr()).await.unwrap();
    tcp.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let mut reply = Vec::new();
    let _ = tokio::time::timeout(T, tcp.read_to_end(&mut reply)).await;
    until_stats(&hub, "handshake refusal", |s| s.refused.handshake == 1).await;
}

#[tokio::test]
async fn text_frame_closes_with_1003() {
    let hub = start(plain()).await;
    let mut a = Node::join(ws_connect(&hub, Some(HUB_SUBPROTOCOL)).await.unwrap(), vmac(1), uuid(1)).await;
    a.ws.send(Message::text("hello")).await.unwrap();
    assert_eq!(close_code(&a.recv().await), Some(CloseCode::Unsupported));
    let s = until_stats(&hub, "closed", |s| s.connections == 0).await;
    assert_eq!(s.closed_text_frame, 1);
}

#[tokio::test]
async fn oversize_messages_are_nakked_or_closed_without_buffering() {
    let hub = start(plain()).await;
    let mut a = Node::join(ws_connect(&hub, Some(HUB_SUBPROTOCOL)).await.unwrap(), vmac(1), uuid(1)).await;
    let _b = Node::join(ws_connect(&hub, Some(HUB_SUBPROTOCOL)).await.unwrap(), vmac(2), uuid(2)).await;

    // Above MaxBVLC (1600) but within the WebSocket cap: NAK message-too-long, still open.
    a.send(&npdu(5, vmac(2), &[0x01; 2000])).await;
    match a.recv_msg().await.payload {
        BvlcPayload::Result { result: BvlcResult::Nak { error_code: c, .. }, .. } => {
            assert_eq!(c, error_code::MESSAGE_TOO_LONG)
        }
        other => panic!("{other:?}"),
    }
    a.expect_nothing_queued().await;

    // Over the WebSocket cap (8 KiB): closed with 1009.
    a.ws.send(Message::Binary(vec![0x01; 9000].into())).await.unwrap();
    assert_eq!(close_code(&a.recv().await), Some(CloseCode::Size));

    // A frame header announcing 1 GiB: refused from the header alone (no payload sent).
    let mut c = ws_connect(&hub, Some(HUB_SUBPROTOCOL)).await.unwrap();
    let mut header = vec![0x82, 0x80 | 127];
    header.extend_from_slice(&(1u64 << 30).to_be_bytes());
    header.extend_from_slice(&[1, 2, 3, 4]); // mask key
    c.get_mut().write_all(&header).await.unwrap();
    c.get_mut().flush().await.unwrap();
    assert_eq!(close_code(&recv(&mut c).await), Some(CloseCode::Size));
    let s = until_stats(&hub, "oversize closes", |s| s.closed_oversize == 2).await;
    assert_eq!(s.naks_sent, 1);
}

#[tokio::test]
async fn tls_requires_a_client_certificate_from_the_ca() {
    let dir = tempfile::tempdir().unwrap();
    let pki = hilbench::cli::pki::generate(&dir.path().join("a"), 2, &[], 30, false).unwrap();
    let other = hilbench::cli::pki::generate(&dir.path().join("b"), 1, &[], 30, false).unwrap();
    let cfg = HubServerConfig { tls: Some(TlsDir::hub(&pki.dir)), ..plain() };
    let hub = start(cfg).await;
    assert!(hub.url().starts_with("wss://127.0.0.1:"), "{}", hub.url());
    let mut events = hub.subscribe();

    let n1 = TlsDir::node(&pki.dir, "node-1").client_config().unwrap();
    let n2 = TlsDir::node(&pki.dir, "node-2").client_config().unwrap();
    // Each node sends the Device UUID its certificate carries.
    let (u1, u2): (DeviceUuid, DeviceUuid) = (pki.nodes[0].uuid.parse().unwrap(), pki.nodes[1].uuid.parse().unwrap());
    let mut a = Node::join(wss_connect(&hub, n1).await.unwrap(), vmac(1), u1).await;
    let mut b = Node::join(wss_connect(&hub, n2).await.unwrap(), vmac(2), u2).await;
    a.send(&npdu(1, Vmac::BROADCAST, b"\x01\x00tls")).await;
    assert_eq!(b.recv_msg().await.originating, Some(vmac(1)));

    // No client certificate: the TLS handshake fails on the hub's side.
    let anon = node_client_config(&pki.ca_cert, None).unwrap();
    let r = wss_connect(&hub, anon).await;
    assert!(r.is_err(), "a node without a certificate got in");
    let why = until_event(&mut events, "TLS refusal", |e| match e {
        HubServerEvent::Refused { reason: RefuseReason::Tls(why), .. } => Some(why.clone()),
        _ => None,
    })
    .await;
    assert!(why.contains("no certificates"), "{why}");

    // A certificate from another CA (the node still trusts the hub's CA).
    let foreign = node_client_config(&pki.ca_cert, Some((&other.nodes[0].cert, &other.nodes[0].key))).unwrap();
    assert!(wss_connect(&hub, foreign).await.is_err(), "a node from another CA got in");
    let why = until_event(&mut events, "TLS refusal", |e| match e {
        HubServerEvent::Refused { reason: RefuseReason::Tls(why), .. } => Some(why.clone()),
        _ => None,
    })
    .await;
    assert!(why.contains("UnknownIssuer") || why.contains("BadSignature") || why.contains("unknown issuer"), "{why}");

    // Plain WebSocket to a TLS hub: refused too.
    let tcp = TcpStream::connect(hub.local_addr()).await.unwrap();
    assert!(upgrade(Box::new(tcp), &hub.url().replace("wss", "ws"), Some(HUB_SUBPROTOCOL)).await.is_err());
    let s = until_stats(&hub, "TLS refusals", |s| s.refused.tls >= 3).await;
    assert_eq!(s.connections, 2, "the good nodes are unaffected");
    a.expect_nothing_queued().await;
}

#[tokio::test]
async fn a_client_certificate_without_client_auth_is_refused_unless_relaxed() {
    let dir = tempfile::tempdir().unwrap();
    let pki = hilbench::cli::pki::generate(dir.path(), 1, &[], 30, false).unwrap();
    // Signed by the hub's own CA, but with no extended key usage at all:
    // webpki alone would take it for any purpose.
    let (cert, key) = hilbench::cli::pki::sign_leaf(dir.path(), "vendor-node", &[], Vec::new()).unwrap();
    let vendor = || node_client_config(&pki.ca_cert, Some((&cert, &key))).unwrap();

    let hub = start(HubServerConfig { tls: Some(TlsDir::hub(&pki.dir)), ..plain() }).await;
    let mut events = hub.subscribe();
    assert!(wss_connect(&hub, vendor()).await.is_err(), "a certificate without clientAuth got in");
    let why = until_event(&mut events, "TLS refusal", |e| match e {
        HubServerEvent::Refused { reason: RefuseReason::Tls(why), .. } => Some(why.clone()),
        _ => None,
    })
    .await;
    assert!(why.contains("extended key usage for client authentication"), "{why}");
    hub.shutdown().await;

    let relaxed = HubServerConfig {
        tls: Some(TlsDir::hub(&pki.dir)),
        client_certs: ClientCertPolicy { require_client_auth_eku: false },
        ..plain()
    };
    let hub = start(relaxed).await;
    let mut a = Node::join(wss_connect(&hub, vendor()).await.unwrap(), vmac(1), uuid(1)).await;
    let u1: DeviceUuid = pki.nodes[0].uuid.parse().unwrap();
    let mut b = Node::join(wss_connect(&hub, TlsDir::node(&pki.dir, "node-1").client_config().unwrap()).await.unwrap(), vmac(2), u1).await;
    a.send(&npdu(1, Vmac::BROADCAST, b"\x01\x00vendor")).await;
    assert_eq!(b.recv_msg().await.originating, Some(vmac(1)));
}

/// A Connect-Request from `ws` as (`vmac`, `uuid`); the NAK's error class and code.
async fn connect_nak(ws: Ws, vmac: Vmac, uuid: DeviceUuid) -> (u16, u16) {
    let mut n = Node { ws, vmac, next_id: 7 };
    match n.request(BvlcPayload::ConnectRequest { vmac, uuid, max_bvlc: 1600, max_npdu: 1497 }).await {
        Rx::Msg(BvlcMessage { payload: BvlcPayload::Result { result: BvlcResult::Nak { error_class, error_code, .. }, .. }, .. }) => {
            assert_eq!(close_code(&n.recv().await), Some(CloseCode::Policy), "closed after the NAK");
            (error_class, error_code)
        }
        other => panic!("{vmac}: expected a NAK, got {other:?}"),
    }
}

#[tokio::test]
async fn with_cert_binding_one_certificate_cannot_impersonate_another_node() {
    let dir = tempfile::tempdir().unwrap();
    let pki = hilbench::cli::pki::generate(dir.path(), 2, &[], 30, false).unwrap();
    let u1: DeviceUuid = pki.nodes[0].uuid.parse().unwrap();
    let u2: DeviceUuid = pki.nodes[1].uuid.parse().unwrap();
    let cert = |n: &str| TlsDir::node(&pki.dir, n).client_config().unwrap();
    let tls = Some(TlsDir::hub(&pki.dir));

    // Without binding (`--no-cert-binding`), node-1's certificate takes
    // node-2's place by naming its VMAC and UUID, and would receive its unicasts.
    let unbound = HubServerConfig { tls: tls.clone(), core: HubConfig { bind_identity: false, ..HubConfig::default() }, ..plain() };
    let hub = start(unbound).await;
    let mut two = Node::join(wss_connect(&hub, cert("node-2")).await.unwrap(), vmac(2), u2).await;
    let _thief = Node::join(wss_connect(&hub, cert("node-1")).await.unwrap(), vmac(2), u2).await;
    assert_eq!(close_code(&two.recv().await), Some(CloseCode::Normal), "replaced");
    hub.shutdown().await;

    // With it (the default).
    let hub = start(HubServerConfig { tls, ..plain() }).await;
    let mut events = hub.subscribe();
    let mut one = Node::join(wss_connect(&hub, cert("node-1")).await.unwrap(), vmac(1), u1).await;
    let mut two = Node::join(wss_connect(&hub, cert("node-2")).await.unwrap(), vmac(2), u2).await;
    // node-1's certificate naming node-2's VMAC and UUID: NAK security /
    // authentication-failed, and node-2 keeps its connection and its unicasts.
    assert_eq!(connect_nak(wss_connect(&hub, cert("node-1")).await.unwrap(), vmac(2), u2).await, (4, 1));
    let why = until_event(&mut events, "IdentityRefused", |e| match e {
        HubServerEvent::Core(HubEvent::IdentityRefused { reason, .. }) => Some(reason.clone()),
        _ => None,
    })
    .await;
    assert!(why.contains("is not the one in the client certificate"), "{why}");
    one.send(&npdu(3, vmac(2), b"\x01\x00to-two")).await;
    assert_eq!(two.recv_msg().await.originating, Some(vmac(1)));
    // A UUID of nobody's, on a free VMAC: refused the same way.
    assert_eq!(connect_nak(wss_connect(&hub, cert("node-1")).await.unwrap(), vmac(3), uuid(3)).await, (4, 1));
    // node-2 itself reconnecting (the same certificate) still replaces its old connection.
    let _two_again = Node::join(wss_connect(&hub, cert("node-2")).await.unwrap(), vmac(2), u2).await;
    assert_eq!(close_code(&two.recv().await), Some(CloseCode::Normal));
    one.expect_nothing_queued().await;
}

#[tokio::test]
async fn slow_consumer_does_not_stall_the_others() {
    const N: u16 = 6000;
    const WINDOW: u16 = 50;
    let cfg = HubServerConfig { queue_depth: 64, slow_consumer_close_after: None, ..plain() };
    let hub = start(cfg).await;
    let mut events = hub.subscribe();
    let mut s = Node::join(ws_connect(&hub, Some(HUB_SUBPROTOCOL)).await.unwrap(), vmac(1), uuid(1)).await;
    let mut r1 = Node::join(ws_connect(&hub, Some(HUB_SUBPROTOCOL)).await.unwrap(), vmac(2), uuid(2)).await;
    let mut r2 = Node::join(ws_connect(&hub, Some(HUB_SUBPROTOCOL)).await.unwrap(), vmac(3), uuid(3)).await;
    // The slow node joins and then never reads; a small receive buffer fills quickly.
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let tcp = sock.connect(hub.local_addr()).await.unwrap();
    let slow_ws = upgrade(Box::new(tcp), &hub.url(), Some(HUB_SUBPROTOCOL)).await.unwrap();
    let _slow = Node::join(slow_ws, vmac(4), uuid(4)).await;

    // 1400-byte NPDUs: megabytes for the slow node, far past any socket buffer.
    let started = Instant::now();
    let mut payload = vec![0x01, 0x00];
    payload.resize(1400, 0xAB);
    let mut seq = 0u16;
    while seq < N {
        for _ in 0..WINDOW {
            payload[2..4].copy_from_slice(&seq.to_be_bytes());
            s.send(&npdu(seq, Vmac::BROADCAST, &payload)).await;
            seq += 1;
        }
        for r in [&mut r1, &mut r2] {
            for k in seq - WINDOW..seq {
                let m = r.recv_msg().await;
                assert_eq!(m.message_id, k, "{} lost or reordered a broadcast", r.vmac);
                assert_eq!(m.originating, Some(vmac(1)));
            }
        }
        assert!(started.elapsed() < Duration::from_secs(120), "far too slow: stalled?");
    }
    let slow_conn: ConnId = until_event(&mut events, "Connected", |e| match e {
        HubServerEvent::Core(HubEvent::Connected { conn, vmac: v, .. }) if *v == vmac(4) => Some(*conn),
        _ => None,
    })
    .await;
    until_event(&mut events, "SlowConsumer", |e| match e {
        HubServerEvent::SlowConsumer { conn, vmac: v, queue_depth } => {
            assert_eq!((*conn, *v, *queue_depth), (slow_conn, Some(vmac(4)), 64), "only the slow node overflows");
            Some(())
        }
        _ => None,
    })
    .await;
    // Only the slow node lost frames (the others got all N, checked above): deliveries are
    // the 4 Connect-Accepts plus every broadcast copy but the dropped ones.
    let st = until_stats(&hub, "deliveries published", |s| {
        s.deliveries == 4 + s.broadcast_deliveries - s.drops.slow_consumer
    })
    .await;
    assert!(st.drops.slow_consumer > 0, "{st:?}");
    assert_eq!(st.broadcast_deliveries, 3 * u64::from(N));
    // Many frames per write: batching works.
    assert!(st.frames_written > st.flushes, "{st:?}");
}

#[tokio::test]
async fn slow_consumer_is_closed_after_the_bound() {
    let cfg = HubServerConfig {
        queue_depth: 8,
        slow_consumer_close_after: Some(Duration::from_millis(200)),
        ..plain()
    };
    let hub = start(cfg).await;
    let mut s = Node::join(ws_connect(&hub, Some(HUB_SUBPROTOCOL)).await.unwrap(), vmac(1), uuid(1)).await;
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let tcp = sock.connect(hub.local_addr()).await.unwrap();
    let _slow = Node::join(upgrade(Box::new(tcp), &hub.url(), Some(HUB_SUBPROTOCOL)).await.unwrap(), vmac(4), uuid(4)).await;
    let payload = vec![0x01; 1400];
    let deadline = Instant::now() + T;
    let mut id = 0u16;
    while hub.stats().closed_slow_consumer == 0 {
        assert!(Instant::now() < deadline, "slow consumer never closed: {:?}", hub.stats());
        s.send(&npdu(id, Vmac::BROADCAST, &payload)).await;
        id = id.wrapping_add(1);
        if id.is_multiple_of(64) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    until_stats(&hub, "slow node gone", |s| s.connections == 1).await;
    s.expect_nothing_queued().await;
}

#[tokio::test]
async fn silent_nodes_and_late_connect_requests_are_dropped() {
    let core = HubConfig {
        heartbeat_timeout: Duration::from_millis(1000),
        connect_wait: Duration::from_millis(500),
        ..HubConfig::default()
    };
    let hub = start(HubServerConfig { core, ..plain() }).await;
    let mut events = hub.subscribe();
    let mut talker = Node::join(ws_connect(&hub, Some(HUB_SUBPROTOCOL)).await.unwrap(), vmac(1), uuid(1)).await;
    let mut silent = Node::join(ws_connect(&hub, Some(HUB_SUBPROTOCOL)).await.unwrap(), vmac(2), uuid(2)).await;
    let mut mute = ws_connect(&hub, Some(HUB_SUBPROTOCOL)).await.unwrap(); // never sends Connect-Request

    // The talker heartbeats every 100 ms while the silent node's 2 × 1 s run out.
    let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
    let talking = tokio::spawn(async move {
        while stopped.try_recv().is_err() {
            talker.expect_nothing_queued().await;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        talker
    });
    assert_eq!(close_code(&silent.recv().await), Some(CloseCode::Normal));
    assert!(matches!(recv(&mut mute).await, Rx::Close(_)));
    let dropped = until_event(&mut events, "SilentPeerDropped", |e| match e {
        HubServerEvent::Core(HubEvent::SilentPeerDropped { vmac, silent_for, .. }) => Some((*vmac, *silent_for)),
        _ => None,
    })
    .await;
    assert_eq!(dropped.0, vmac(2));
    assert!(dropped.1 >= Duration::from_millis(2000), "{dropped:?}");
    stop.send(()).unwrap();
    let mut talker = talking.await.unwrap();
    talker.expect_nothing_queued().await;
    let s = until_stats(&hub, "closes", |s| s.connections == 1).await;
    assert_eq!(s.closed_by_hub, 2);
}

#[tokio::test]
async fn admission_limits_refuse_cleanly() {
    let hub = start(HubServerConfig { max_connections: 2, ..plain() }).await;
    let a = Node::join(ws_connect(&hub, Some(HUB_SUBPROTOCOL)).await.unwrap(), vmac(1), uuid(1)).await;
    let _b = Node::join(ws_connect(&hub, Some(HUB_SUBPROTOCOL)).await.unwrap(), vmac(2), uuid(2)).await;
    match ws_connect(&hub, Some(HUB_SUBPROTOCOL)).await {
        Err(WsError::Http(resp)) => assert_eq!(resp.status(), 503),
        other => panic!("expected HTTP 503, got {:?}", other.map(|_| ())),
    }
    // The hub counts the refusal after the 503 is on its way: wait for it.
    let s = until_stats(&hub, "capacity refusal", |s| s.refused.at_capacity >= 1).await;
    assert_eq!(s.refused.at_capacity, 1);
    // A slot frees when a node leaves.
    drop(a);
    until_stats(&hub, "slot freed", |s| s.connections == 1).await;
    let _c = Node::join(ws_connect(&hub, Some(HUB_SUBPROTOCOL)).await.unwrap(), vmac(3), uuid(3)).await;
    drop((_b, _c));
    hub.shutdown().await;

    let cfg = HubServerConfig {
        max_connections: 2,
        max_handshakes: 1,
        handshake_timeout: Duration::from_millis(500),
        ..plain()
    };
    let hub = start(cfg).await;
    let _a = Node::join(ws_connect(&hub, Some(HUB_SUBPROTOCOL)).await.unwrap(), vmac(1), uuid(1)).await;
    let _b = Node::join(ws_connect(&hub, Some(HUB_SUBPROTOCOL)).await.unwrap(), vmac(2), uuid(2)).await;

    // One handshake at a time: a second TCP connection while one idles is closed at once.
    // (The listener accepts in arrival order, so the idle one holds the only permit.)
    let _idle = TcpStream::connect(hub.local_addr()).await.unwrap();
    let mut second = TcpStream::connect(hub.local_addr()).await.unwrap();
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(T, second.read(&mut buf)).await.expect("closed promptly");
    assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
    let s = until_stats(&hub, "busy refusal", |s| s.refused.handshakes_busy >= 1).await;
    assert_eq!(s.refused.handshakes_busy, 1);
    // The idle one times out and handshakes work again (the hub is full again at 2, so 503).
    until_stats(&hub, "handshake timeout", |s| s.refused.timeout == 1).await;
    match ws_connect(&hub, Some(HUB_SUBPROTOCOL)).await {
        Err(WsError::Http(resp)) => assert_eq!(resp.status(), 503),
        other => panic!("expected HTTP 503, got {:?}", other.map(|_| ())),
    }
}

#[tokio::test]
async fn start_errors_are_clear() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr: SocketAddr = taken.local_addr().unwrap();
    let e = HubServer::start(HubServerConfig { listen: addr, ..plain() }).await.err().expect("port is taken");
    let e = e.to_string();
    assert!(e.contains(&addr.to_string()) && e.contains("in use"), "{e}");
    let dir = tempfile::tempdir().unwrap();
    let e = HubServer::start(HubServerConfig { tls: Some(TlsDir::hub(dir.path())), ..plain() }).await.err().unwrap();
    assert!(e.to_string().contains("missing ca.pem, hub.pem, hub.key"), "{e}");
    let e = HubServer::start(HubServerConfig { max_message: 100, ..plain() }).await.err().unwrap();
    assert!(e.to_string().contains("MaxBVLC"), "{e}");
}

#[test]
fn sim_bsc_hub_serves_and_exits_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let sim = common::start_sim(&["bsc-hub", "--listen", "127.0.0.1:0", "--plaintext", "--role", "failover"], dir.path());
    assert_eq!(sim.ready["ready"], true);
    assert_eq!(sim.ready["kind"], "bsc-hub");
    assert_eq!(sim.ready["role"], "failover");
    let url = sim.ready["url"].as_str().unwrap().to_string();
    assert!(url.starts_with("ws://127.0.0.1:"), "{url}");
    let addr: SocketAddr = url.trim_start_matches("ws://").parse().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let mut a = Node::join(upgrade(Box::new(tcp), &url, Some(HUB_SUBPROTOCOL)).await.unwrap(), vmac(1), uuid(1)).await;
        match a.request(BvlcPayload::AdvertisementSolicitation).await {
            Rx::Msg(BvlcMessage { payload: BvlcPayload::Advertisement { hub_status, .. }, .. }) => {
                assert_eq!(hub_status, HubStatus::ConnectedToFailover)
            }
            other => panic!("{other:?}"),
        }
    });
    let stderr = sim.stderr_path.clone();
    assert_eq!(sim.stop(), 0);
    let log = std::fs::read_to_string(stderr).unwrap();
    assert!(log.contains("\"stats\"") && log.contains("\"accepted\":1"), "{log}");

    // Taken port and incomplete TLS directory: exit 1 with a clear message.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().to_string();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_hilbench"))
        .args(["sim", "bsc-hub", "--listen", &port, "--plaintext"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot listen on") && err.contains("in use"), "{err}");
    assert!(out.stdout.is_empty(), "no ready line on failure");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_hilbench"))
        .args(["sim", "bsc-hub", "--listen", "127.0.0.1:0", "--tls-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("missing ca.pem, hub.pem, hub.key"), "{err}");
}

/// Refusals are counted one by one but logged once per kind per period
/// (issue 13: a flood of refused peers wrote one WARN line each, 176,258
/// lines in two minutes).
#[tokio::test]
async fn a_flood_of_refused_peers_is_counted_but_not_logged_line_by_line() {
    #[derive(Clone, Default)]
    struct Lines(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);
    impl std::io::Write for Lines {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let lines = Lines::default();
    let writer = lines.clone();
    let subscriber = tracing_subscriber::fmt().with_writer(move || writer.clone()).with_max_level(tracing::Level::WARN).with_ansi(false).finish();
    tracing::subscriber::set_global_default(subscriber).expect("the only subscriber in this test process");
    let hub = start(plain()).await;
    for _ in 0..300 {
        assert!(matches!(ws_connect(&hub, None).await, Err(WsError::Http(_))));
    }
    until_stats(&hub, "300 refusals counted", |s| s.refused.subprotocol == 300).await;
    let text = String::from_utf8_lossy(&lines.0.lock().unwrap()).to_string();
    let refusal_lines = text.lines().filter(|l| l.contains("refused")).count();
    assert!((1..=2).contains(&refusal_lines), "{refusal_lines} lines for 300 refusals:\n{text}");
}

/// Slowloris (issue 13): 200 sockets from one address that never finish a
/// handshake (half of them send half an HTTP request) held all 64 slots for
/// 10 s, and 1 of 28 legitimate connects got through. Now that source is
/// held to its share once the hub is busy, the rest of the slots stay free
/// for others, and a node from another address joins at once.
#[tokio::test]
async fn slow_handshakes_from_one_address_cannot_lock_others_out() {
    let hub = start(plain()).await;
    let mut bad = Vec::new();
    for i in 0..200 {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.bind("127.0.0.2:0".parse().unwrap()).unwrap();
        let mut s = sock.connect(hub.local_addr()).await.unwrap();
        if i % 2 == 0 {
            let _ = s.write_all(b"GET / HTTP/1.1\r\nHost: hub\r\n").await;
        }
        bad.push(s);
    }
    // The hub has seen all 200: the source took slots until only the reserve
    // was left, and everything past that was refused.
    let cfg = plain();
    let admitted = (cfg.max_handshakes - cfg.reserved_handshakes) as u64;
    let s = until_stats(&hub, "the flood refused", |s| s.refused.source_busy + s.refused.handshakes_busy >= 200 - admitted).await;
    assert_eq!(s.refused.handshakes_busy, 0, "the flood never took the last slots: {s:?}");
    let started = std::time::Instant::now();
    let node = Node::join(ws_connect(&hub, Some(HUB_SUBPROTOCOL)).await.expect("a node from another address is let in"), vmac(1), uuid(1)).await;
    eprintln!("joined under 200 slow sockets in {:?}", started.elapsed());
    drop((node, bad));
}
