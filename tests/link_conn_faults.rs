//! Connection faults on a real socket, seen by a WebSocket server nobody here
//! wrote (tokio-tungstenite's own server), with the client's WebSocket also
//! tokio-tungstenite running over the link's pump.

use std::sync::Arc;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use hilbench::link::fault::{FaultRule, FaultTrigger, LinkFault};
use hilbench::link::stream::{ConnFaults, FaultedConnector};
use hilbench::link::Direction;
use hilbench::transport::ws_client::{connect_ws, WsConnectError, WsConnectOptions, WsStream};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

/// How one server-side connection ended.
#[derive(Debug)]
enum ServerSaw {
    Message(Vec<u8>),
    /// The TCP connection was reset (ECONNRESET), not closed.
    Reset,
    /// Closed without a close frame (a FIN).
    ClosedWithoutHandshake,
    Other(#[allow(dead_code)] String),
}

/// An echo server: every binary message comes back, and the server reports what it saw.
async fn server() -> (String, mpsc::UnboundedReceiver<ServerSaw>, Arc<std::sync::atomic::AtomicUsize>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}", l.local_addr().unwrap());
    let (tx, rx) = mpsc::unbounded_channel();
    let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        loop {
            let (s, _) = l.accept().await.unwrap();
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let tx = tx.clone();
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(s).await else {
                    let _ = tx.send(ServerSaw::Other("handshake failed".into()));
                    return;
                };
                loop {
                    match ws.next().await {
                        Some(Ok(Message::Binary(b))) => {
                            let _ = tx.send(ServerSaw::Message(b.to_vec()));
                            if ws.send(Message::Binary(b)).await.is_err() {
                                return;
                            }
                        }
                        Some(Ok(_)) => {}
                        Some(Err(WsError::Io(e))) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                            let _ = tx.send(ServerSaw::Reset);
                            return;
                        }
                        Some(Err(WsError::Protocol(p))) => {
                            let _ = tx.send(if p.to_string().contains("without closing handshake") {
                                ServerSaw::ClosedWithoutHandshake
                            } else {
                                ServerSaw::Other(p.to_string())
                            });
                            return;
                        }
                        Some(Err(e)) => {
                            let _ = tx.send(ServerSaw::Other(e.to_string()));
                            return;
                        }
                        None => {
                            let _ = tx.send(ServerSaw::ClosedWithoutHandshake);
                            return;
                        }
                    }
                }
            });
        }
    });
    (url, rx, accepted)
}

fn options(faults: &Arc<ConnFaults>) -> WsConnectOptions {
    let mut o = WsConnectOptions::hub(None);
    o.subprotocol = None;
    o.timeout = Duration::from_secs(5);
    o.connector = Some(Arc::new(FaultedConnector(faults.clone())));
    o
}

fn rule(fault: LinkFault, trigger: FaultTrigger, name: Option<&str>) -> FaultRule {
    FaultRule { fault, trigger, name: name.map(String::from) }
}

async fn next(rx: &mut mpsc::UnboundedReceiver<ServerSaw>) -> ServerSaw {
    tokio::time::timeout(Duration::from_secs(5), rx.recv()).await.expect("the server saw nothing in 5 s").unwrap()
}

async fn echo(ws: &mut WsStream, rx: &mut mpsc::UnboundedReceiver<ServerSaw>, body: &[u8]) {
    ws.send(Message::Binary(body.to_vec().into())).await.unwrap();
    assert!(matches!(next(rx).await, ServerSaw::Message(m) if m == body));
    let back = tokio::time::timeout(Duration::from_secs(5), ws.next()).await.unwrap().unwrap().unwrap();
    assert_eq!(back, Message::Binary(body.to_vec().into()));
}

#[tokio::test]
async fn a_reset_is_an_rst_at_both_ends_and_the_next_connection_is_clean() {
    let (url, mut saw, _) = server().await;
    let faults = ConnFaults::new("t", 1);
    let mut ws = connect_ws(&url, &options(&faults)).await.unwrap();
    echo(&mut ws, &mut saw, b"hello").await;
    faults.add_rule(rule(LinkFault::Reset { bytes: None }, FaultTrigger::default(), None));
    assert!(matches!(next(&mut saw).await, ServerSaw::Reset));
    match tokio::time::timeout(Duration::from_secs(5), ws.next()).await.unwrap() {
        Some(Err(WsError::Io(e))) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset),
        other => panic!("expected a reset, got {other:?}"),
    }
    let mut ws = connect_ws(&url, &options(&faults)).await.unwrap();
    echo(&mut ws, &mut saw, b"again").await;
}

#[tokio::test]
async fn refused_and_accepted_then_closed_connections() {
    let (url, mut saw, accepted) = server().await;
    let faults = ConnFaults::new("t", 1);
    faults.add_rule(rule(LinkFault::Refuse, FaultTrigger::default(), None));
    faults.add_rule(rule(LinkFault::AcceptClose, FaultTrigger::default(), None));
    let e = connect_ws(&url, &options(&faults)).await.err().expect("refused");
    match &e {
        WsConnectError::Tcp { source, .. } => assert_eq!(source.kind(), std::io::ErrorKind::ConnectionRefused, "{e}"),
        other => panic!("{other}"),
    }
    assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 0, "a refused connection reaches no server");
    let e = connect_ws(&url, &options(&faults)).await.err().expect("closed at once");
    assert!(matches!(e, WsConnectError::Upgrade { .. }), "{e}");
    assert!(matches!(next(&mut saw).await, ServerSaw::Other(_)), "the server saw a connection end before its handshake");
    assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 1);
    let mut ws = connect_ws(&url, &options(&faults)).await.unwrap();
    echo(&mut ws, &mut saw, b"third time").await;
}

#[tokio::test]
async fn close_after_bytes_lets_exactly_those_bytes_through_then_fins() {
    let (url, mut saw, _) = server().await;
    let faults = ConnFaults::new("t", 1);
    let mut ws = connect_ws(&url, &options(&faults)).await.unwrap();
    // A masked client frame of 10 bytes is 2 + 4 + 10 = 16 bytes: two fit in 40, the third does not.
    let trigger = FaultTrigger { direction: Some(Direction::Request), ..Default::default() };
    faults.add_rule(rule(LinkFault::CloseAfter { bytes: 40 }, trigger, None));
    for i in 0..3u8 {
        ws.send(Message::Binary(vec![i; 10].into())).await.unwrap();
    }
    assert!(matches!(next(&mut saw).await, ServerSaw::Message(m) if m == vec![0; 10]));
    assert!(matches!(next(&mut saw).await, ServerSaw::Message(m) if m == vec![1; 10]));
    let end = next(&mut saw).await;
    assert!(matches!(end, ServerSaw::ClosedWithoutHandshake), "{end:?}");
}

#[tokio::test]
async fn half_open_holds_everything_until_cleared_by_name() {
    let (url, mut saw, _) = server().await;
    let faults = ConnFaults::new("t", 1);
    let mut ws = connect_ws(&url, &options(&faults)).await.unwrap();
    faults.add_rule(rule(LinkFault::HalfOpen, FaultTrigger::default(), Some("wifi")));
    ws.send(Message::Binary(b"held".to_vec().into())).await.unwrap();
    // Nothing moves and nothing closes: the server hears neither the message nor an end.
    assert!(tokio::time::timeout(Duration::from_millis(300), saw.recv()).await.is_err());
    assert!(faults.clear_named("wifi"));
    assert!(matches!(next(&mut saw).await, ServerSaw::Message(m) if m == b"held"));
    let back = tokio::time::timeout(Duration::from_secs(5), ws.next()).await.unwrap().unwrap().unwrap();
    assert_eq!(back, Message::Binary(b"held".to_vec().into()));
}

#[tokio::test]
async fn latency_and_bandwidth_delay_but_lose_nothing() {
    let (url, mut saw, _) = server().await;
    let faults = ConnFaults::new("t", 1);
    let mut ws = connect_ws(&url, &options(&faults)).await.unwrap();
    let always = FaultTrigger { always: true, direction: Some(Direction::Response), ..Default::default() };
    faults.add_rule(rule(LinkFault::Latency { ms: 200 }, always.clone(), Some("lag")));
    faults.add_rule(rule(LinkFault::Bandwidth { bytes_per_s: 20_000 }, always, Some("thin")));
    let body = vec![7u8; 4000];
    let sent = tokio::time::Instant::now();
    ws.send(Message::Binary(body.clone().into())).await.unwrap();
    assert!(matches!(next(&mut saw).await, ServerSaw::Message(m) if m == body));
    let back = tokio::time::timeout(Duration::from_secs(5), ws.next()).await.unwrap().unwrap().unwrap();
    assert_eq!(back, Message::Binary(body.into()));
    // At least the latency plus most of 4 kB at 20 kB/s: the lower bound is what the fault promises.
    assert!(sent.elapsed() >= Duration::from_millis(350), "{:?}", sent.elapsed());
}

#[tokio::test]
async fn a_slow_close_reaches_the_server_late() {
    let (url, mut saw, _) = server().await;
    let faults = ConnFaults::new("t", 1);
    let mut ws = connect_ws(&url, &options(&faults)).await.unwrap();
    echo(&mut ws, &mut saw, b"bye soon").await;
    faults.add_rule(rule(LinkFault::SlowClose { ms: 300 }, FaultTrigger::default(), None));
    let closed = tokio::time::Instant::now();
    drop(ws);
    let end = next(&mut saw).await;
    assert!(matches!(end, ServerSaw::ClosedWithoutHandshake), "{end:?}");
    assert!(closed.elapsed() >= Duration::from_millis(300), "the FIN came after {:?}", closed.elapsed());
}
