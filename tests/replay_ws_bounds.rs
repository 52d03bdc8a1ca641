//! The HTTP/WebSocket replay server's bounds, over real sockets: one source address holds
//! at most 64 connections (the next is closed at accept, and one is served again once a
//! held one goes), and a WebSocket client that asks but never reads is dropped once its
//! unread answers pass the bound, instead of the server buffering for it; an HTTP client
//! that announces a body and stalls gets 408 once the body timeout passes.

use std::time::Duration;

use futures::{SinkExt, StreamExt};
use hilbench::device::replay_core::ReplayCore;
use hilbench::link::Direction;
use hilbench::observe::ObservationLog;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const GET: &[u8] = b"GET /shelly HTTP/1.1\r\nHost: d\r\n\r\n";

async fn replay(frames: Vec<(Direction, Vec<u8>)>) -> hilbench::device::served::Served {
    let log = ObservationLog::bounded(std::time::Instant::now(), 1000);
    hilbench::device::replay_ws::start("bounds", ReplayCore::new(frames), "127.0.0.1:0".parse().unwrap(), log).await.unwrap()
}

/// Whether a GET /shelly on a new connection is answered with the captured 200.
async fn answered(addr: std::net::SocketAddr) -> bool {
    let Ok(mut s) = TcpStream::connect(addr).await else { return false };
    if s.write_all(GET).await.is_err() {
        return false;
    }
    let mut buf = vec![0u8; 256];
    matches!(tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf)).await, Ok(Ok(n)) if buf[..n].starts_with(b"HTTP/1.1 200"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_source_holds_at_most_64_connections() {
    let ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}".to_vec();
    let d = replay(vec![(Direction::Request, GET.to_vec()), (Direction::Response, ok)]).await;
    // 64 connections, each shown to be served (so each is held, not just queued).
    let mut held = Vec::new();
    for _ in 0..64 {
        let mut s = TcpStream::connect(d.local).await.unwrap();
        s.write_all(GET).await.unwrap();
        let mut buf = vec![0u8; 256];
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await.unwrap().unwrap();
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&buf[..n]));
        held.push(s);
    }
    assert!(!answered(d.local).await, "a 65th connection from the same address is closed unanswered");
    // One held connection goes; the server sees it end and serves a new one.
    drop(held.pop());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !answered(d.local).await {
        assert!(tokio::time::Instant::now() < deadline, "no connection served after one of the 64 closed");
    }
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_client_that_never_reads_is_dropped() {
    // Each request gets a 1 MiB answer; 40 of them would be 40 MiB held for one client.
    let big = format!("\"{}\"", "x".repeat(1 << 20)).into_bytes();
    let d = replay(vec![(Direction::Request, b"ask".to_vec()), (Direction::Response, big)]).await;
    let tcp = TcpStream::connect(d.local).await.unwrap();
    let (mut ws, _) = tokio_tungstenite::client_async(format!("ws://{}/rpc", d.local), tcp).await.unwrap();
    for _ in 0..40 {
        if ws.send(tokio_tungstenite::tungstenite::Message::text("ask")).await.is_err() {
            break;
        }
    }
    // Now read: some answers (what the socket buffers held), then the end.
    let mut got = 0;
    let ended = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(m) = ws.next().await {
            match m {
                Ok(m) if m.is_text() => got += 1,
                Ok(_) => {}
                Err(_) => break,
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the connection was not dropped ({got} answers read)");
    assert!(got < 40, "every answer was buffered for a client that did not read ({got})");
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_http_body_gets_408_and_frees_the_connection() {
    let d = replay(vec![(Direction::Request, b"POST /rpc HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}".to_vec()), (Direction::Response, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}".to_vec())]).await;
    let mut s = TcpStream::connect(d.local).await.unwrap();
    s.write_all(b"POST /rpc HTTP/1.1\r\nHost: d\r\nContent-Length: 100\r\n\r\n{").await.unwrap();
    let mut buf = vec![0u8; 256];
    let wait = hilbench::device::shelly_host::BODY_TIMEOUT + Duration::from_secs(5);
    let n = tokio::time::timeout(wait, s.read(&mut buf)).await.expect("an answer, not a held connection").unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 408"), "{}", String::from_utf8_lossy(&buf[..n]));
    d.stop().await;
}
