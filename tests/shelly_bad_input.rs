//! Bad input to the Shelly device's HTTP server and WebSocket, over real sockets: a body
//! past the limit, a frame that is not JSON, a binary WebSocket frame, an unknown path, a
//! request during a reboot. Each gets the answer firmware gives (or its silence), the
//! connection carries on where firmware's would, and nothing panics.

use std::time::Duration;

use futures::{SinkExt, StreamExt};
use hilbench::device::shelly_core::ShellyConfig;
use hilbench::device::shelly_host::{self, ShellyEndpoints, ShellyHandle, MAX_BODY};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;

async fn device() -> ShellyHandle {
    let endpoints = ShellyEndpoints { http: "127.0.0.1:0".parse().unwrap(), seed: 1, frame_limit: None, link_name: None, ble: None, connection_faults: None };
    let config = ShellyConfig { boot_time: Duration::from_millis(300), ..ShellyConfig::default() };
    shelly_host::serve(config, endpoints).await.unwrap()
}

type Ws = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

async fn open_ws(d: &ShellyHandle) -> Result<Ws, String> {
    let s = tokio::net::TcpStream::connect(d.http_addr()).await.map_err(|e| e.to_string())?;
    let (ws, _) = tokio_tungstenite::client_async(format!("ws://{}/rpc", d.http_addr()), s).await.map_err(|e| e.to_string())?;
    Ok(ws)
}

/// One request on its own connection: the status line and the body.
async fn http(d: &ShellyHandle, request: Vec<u8>) -> (String, String) {
    let mut s = tokio::net::TcpStream::connect(d.http_addr()).await.unwrap();
    // The server may answer (413) and close before a long body is all written.
    let _ = s.write_all(&request).await;
    let mut text = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut text)).await;
    let text = String::from_utf8_lossy(&text).into_owned();
    let status = text.lines().next().unwrap_or_default().to_string();
    let body = text.split("\r\n\r\n").nth(1).unwrap_or_default().to_string();
    (status, body)
}

fn post(path: &str, body: &[u8]) -> Vec<u8> {
    let mut r = format!("POST {path} HTTP/1.1\r\nHost: d\r\nConnection: close\r\nContent-Length: {}\r\n\r\n", body.len()).into_bytes();
    r.extend_from_slice(body);
    r
}

#[tokio::test]
async fn http_bad_input_gets_firmware_answers() {
    let d = device().await;
    let (status, _) = http(&d, post("/rpc/Shelly.GetStatus", &vec![b' '; 1_000_000])).await;
    assert!(status.contains("413"), "a 1 MB body: {status}");
    let (status, _) = http(&d, post("/rpc/Shelly.GetStatus", &vec![b' '; MAX_BODY])).await;
    assert!(status.contains("200"), "a body at the limit: {status}");
    let (status, _) = http(&d, post("/rpc", b"{not json")).await;
    assert!(status.contains("400"), "{status}");
    let (status, body) = http(&d, post("/rpc/Switch.Set", b"{\"id\":\"zero\",\"on\":true}")).await;
    assert!(status.contains("400") && body.contains("-103"), "{status} {body}");
    let (status, body) = http(&d, post("/rpc/Nope.Nothing", b"")).await;
    assert!(status.contains("404") && body.contains("No handler for Nope.Nothing"), "{status} {body}");
    let (status, _) = http(&d, b"GET /nowhere HTTP/1.1\r\nHost: d\r\nConnection: close\r\n\r\n".to_vec()).await;
    assert!(status.contains("404"), "{status}");
    let (status, body) = http(&d, b"GET /rpc/Switch.Set?id=0&on=true HTTP/1.1\r\nHost: d\r\nConnection: close\r\n\r\n".to_vec()).await;
    assert!(status.contains("200") && body == "{\"was_on\":false}", "{status} {body}");
    d.shutdown().await;
}

/// The HTTP status of each error is set per device, as a user's firmware gives it; a
/// slow device (`slow_ms`) answers HTTP as late as it answers the WebSocket.
#[tokio::test]
async fn http_statuses_are_configurable_and_slow_ms_delays_http() {
    let endpoints = ShellyEndpoints { http: "127.0.0.1:0".parse().unwrap(), seed: 1, frame_limit: None, link_name: None, ble: None, connection_faults: None };
    let config = ShellyConfig { http_status: [(-103, 500)].into(), ..ShellyConfig::default() };
    let d = shelly_host::serve(config, endpoints).await.unwrap();
    let get = |q: &str| format!("GET /rpc/{q} HTTP/1.1\r\nHost: d\r\nConnection: close\r\n\r\n").into_bytes();
    let (status, body) = http(&d, get("Switch.Set?id=zero&on=true")).await;
    assert!(status.contains("500") && body.contains("-103"), "{status} {body}");
    let (status, _) = http(&d, get("Nope.Nothing")).await;
    assert!(status.contains("404"), "the other errors keep theirs: {status}");
    d.set("slow_ms", 300.0).await.unwrap();
    let asked = std::time::Instant::now();
    let (status, _) = http(&d, get("Shelly.GetStatus")).await;
    assert!(status.contains("200") && asked.elapsed() >= Duration::from_millis(300), "{status} after {:?}", asked.elapsed());
    d.shutdown().await;
}

#[tokio::test]
async fn a_websocket_outlives_bad_frames_and_drops_on_reboot() {
    let d = device().await;
    let mut ws = open_ws(&d).await.unwrap();
    // Not JSON, not an object, a binary frame of garbage, a frame without method or outcome: no answer.
    for m in [Message::text("{not json"), Message::text("[1,2]"), Message::binary(vec![0xff, 0x00, 0x13]), Message::text("{\"id\":5}")] {
        ws.send(m).await.unwrap();
    }
    ws.send(Message::text(r#"{"id":6,"src":"t","method":"Shelly.GetDeviceInfo"}"#)).await.unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(5), ws.next()).await.unwrap().unwrap().unwrap();
    let v: serde_json::Value = serde_json::from_str(answer.to_text().unwrap()).unwrap();
    assert_eq!((v["id"].as_u64(), v["dst"].as_str()), (Some(6), Some("t")), "the first answer is to the first call: {v}");
    // A binary frame that is a call is answered as one (mongoose reads the bytes), in TEXT.
    ws.send(Message::binary(br#"{"id":7,"method":"Sys.GetStatus"}"#.to_vec())).await.unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(5), ws.next()).await.unwrap().unwrap().unwrap();
    assert!(answer.is_text() && answer.to_text().unwrap().contains("\"id\":7"), "{answer:?}");
    // A reboot: the answer, then the socket drops without a close frame.
    ws.send(Message::text(r#"{"id":8,"src":"t","method":"Shelly.Reboot","params":{"delay_ms":100}}"#)).await.unwrap();
    let mut saw_close_frame = false;
    let ended = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(m) = ws.next().await {
            match m {
                Ok(Message::Close(_)) => saw_close_frame = true,
                Ok(_) => {}
                Err(_) => break,
            }
        }
    })
    .await;
    assert!(ended.is_ok() && !saw_close_frame, "the socket must drop, not close cleanly");
    // While it is down nothing answers; then it is back.
    if let Ok(mut ws) = open_ws(&d).await {
        ws.send(Message::text(r#"{"id":9,"method":"Shelly.GetDeviceInfo"}"#)).await.ok();
        let r = tokio::time::timeout(Duration::from_millis(150), ws.next()).await;
        assert!(!matches!(r, Ok(Some(Ok(Message::Text(_))))), "a device that is down answered: {r:?}");
    }
    tokio::time::sleep(Duration::from_millis(400)).await;
    let (status, body) = http(&d, b"GET /shelly HTTP/1.1\r\nHost: d\r\nConnection: close\r\n\r\n".to_vec()).await;
    assert!(status.contains("200") && body.contains("\"gen\":2"), "{status} {body}");
    d.shutdown().await;
}

/// Connection faults on the device's TCP connections, as a Wi-Fi drop does them: a `reset`
/// ends the WebSocket without a close frame (1006 to the client) and the device keeps
/// running; `refuse` resets each new connection, HTTP included, until cleared.
#[tokio::test]
async fn connection_faults_reset_the_websocket_and_refuse_http_without_a_reboot() {
    use hilbench::link::fault::{FaultRule, FaultTrigger, LinkFault};
    use hilbench::link::stream::ConnFaults;
    let faults = ConnFaults::new("wifi", 1);
    let endpoints = ShellyEndpoints { http: "127.0.0.1:0".parse().unwrap(), seed: 1, frame_limit: None, link_name: None, ble: None, connection_faults: Some(faults) };
    let d = shelly_host::serve(ShellyConfig::default(), endpoints).await.unwrap();
    let mut ws = open_ws(&d).await.unwrap();
    let call = |id: u64| Message::text(format!(r#"{{"id":{id},"src":"t","method":"Sys.GetStatus"}}"#));
    ws.send(call(1)).await.unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(5), ws.next()).await.unwrap().unwrap().unwrap();
    assert!(answer.to_text().unwrap().contains("\"id\":1"), "{answer:?}");

    let rule = |fault, always, name: &str| FaultRule { fault, trigger: FaultTrigger { always, ..FaultTrigger::default() }, name: Some(name.into()) };
    d.add_fault(rule(LinkFault::Reset { bytes: None }, false, "drop")).unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Close(c))) => return format!("a close frame {c:?}"),
                Some(Ok(_)) => {}
                Some(Err(e)) => return format!("error {e}"),
                None => return "end".to_string(),
            }
        }
    })
    .await
    .expect("the reset ends the WebSocket");
    assert!(ended.contains("reset") || ended.contains("Reset"), "no close frame, a reset: {ended}");

    d.add_fault(rule(LinkFault::Refuse, true, "outage")).unwrap();
    let get = b"GET /shelly HTTP/1.1\r\nHost: d\r\nConnection: close\r\n\r\n".to_vec();
    let (status, _) = http(&d, get.clone()).await;
    assert_eq!(status, "", "a refused connection gets no answer");
    assert!(open_ws(&d).await.is_err(), "nor does a WebSocket");
    assert!(d.clear_faults(Some("outage")));
    let (status, body) = http(&d, get).await;
    assert!(status.contains("200") && body.contains("\"id\""), "{status} {body}");
    // The same device, still up: its uptime kept counting and it never rebooted.
    let mut ws = open_ws(&d).await.unwrap();
    ws.send(call(2)).await.unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(5), ws.next()).await.unwrap().unwrap().unwrap();
    assert!(answer.to_text().unwrap().contains("\"id\":2"), "{answer:?}");
    d.shutdown().await;
}

/// Without a pump a device says so instead of ignoring a connection fault.
#[tokio::test]
async fn a_device_without_connection_faults_refuses_one() {
    use hilbench::link::fault::{FaultRule, FaultTrigger, LinkFault};
    let d = device().await;
    let e = d.add_fault(FaultRule { fault: LinkFault::Refuse, trigger: FaultTrigger::default(), name: None }).unwrap_err();
    assert!(e.contains("takes no `refuse`"), "{e}");
    d.shutdown().await;
}
