//! `hilbench load bsc`, `load merge` and `validate bsc-hub` against hubs over loopback:
//! our hub server (which must pass every check and lose nothing) and a deliberately
//! non-conformant hub written here (which the validator must catch).

use std::collections::HashMap;
use std::process::Command;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use hilbench::cli::validate::{validate_bsc_hub, Outcome};
use hilbench::device::bsc_hub::{HubHandle, HubServer, HubServerConfig};
use hilbench::protocol::bvlc_sc::{decode, encode, nak, BvlcPayload, DeviceUuid, Vmac, ERROR_CLASS_COMMUNICATION};
use hilbench::transport::tls::TlsDir;
use hilbench::transport::ws_client::{WsConnectOptions, HUB_SUBPROTOCOL};
use serde_json::Value;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message;

fn hilbench(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_hilbench")).args(args).output().expect("run hilbench");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn hub_blocking(tls: Option<TlsDir>) -> HubHandle {
    HubServer::start_blocking(HubServerConfig { tls, worker_threads: 1, ..HubServerConfig::default() }).expect("hub starts")
}

fn json(s: &str) -> Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("not JSON ({e}): {s}"))
}

fn u(v: &Value, k: &str) -> u64 {
    v[k].as_u64().unwrap_or_else(|| panic!("{k} missing in {v}"))
}

fn check_no_loss(s: &Value) {
    assert!(u(s, "delivered") > 0, "{s}");
    assert_eq!(s["lost"], 0, "{s}");
    assert_eq!(u(s, "expected"), u(s, "delivered"), "{s}");
    assert_eq!(u(s, "duplicates"), 0, "{s}");
    assert_eq!(u(s, "misrouted"), 0, "{s}");
    // Every delivery has a latency sample.
    assert_eq!(u(&s["latency_us"], "count"), u(s, "delivered"), "{s}");
}

#[test]
fn load_broadcast_run_loses_nothing_and_measures_the_hub() {
    let hub = hub_blocking(None);
    let pid = std::process::id().to_string();
    let (code, out, err) = hilbench(&[
        "load", "bsc", "--hub", &hub.url(), "--nodes", "20", "--senders", "2", "--duration", "2s", "--json", "--hub-pid", &pid,
    ]);
    assert_eq!(code, 0, "{out}\n{err}");
    let s = json(&out);
    assert_eq!(u(&s, "connected"), 20);
    assert_eq!(u(&s, "connect_failures"), 0);
    check_no_loss(&s);
    // Broadcast: each send reaches the 19 other nodes.
    assert_eq!(u(&s, "delivered"), u(&s, "sent") * 19, "{s}");
    assert!(s["cpu"]["hub_us_per_delivery"].as_f64().is_some_and(|v| v > 0.0), "{s}");
    assert!(s["latency_histogram"].as_str().is_some_and(|h| !h.is_empty()));
    hub.shutdown_blocking();
}

#[test]
fn load_unicast_at_a_rate_and_human_summary() {
    let hub = hub_blocking(None);
    let (code, out, err) = hilbench(&[
        "load", "bsc", "--hub", &hub.url(), "--nodes", "6", "--senders", "3", "--rate", "200", "--unicast", "--duration", "1s",
    ]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("unicast") && out.contains("lost 0, duplicated 0, misrouted 0"), "{out}");
    // About 200/s for 1 s per sender; pacing is loose on a loaded machine.
    let sent: u64 = out.split("sent").nth(1).and_then(|r| r.split_whitespace().next()).and_then(|n| n.parse().ok()).unwrap_or(0);
    assert!((300..=700).contains(&sent), "sent {sent}: {out}");
    hub.shutdown_blocking();
}

#[test]
fn two_shards_merge_into_one_lossless_summary() {
    let hub = hub_blocking(None);
    let dir = tempfile::tempdir().unwrap();
    let url = hub.url();
    let run = |shard: &'static str, path: std::path::PathBuf| {
        let url = url.clone();
        std::thread::spawn(move || {
            let (code, out, err) =
                hilbench(&["load", "bsc", "--hub", &url, "--nodes", "12", "--senders", "2", "--duration", "2s", "--shard", shard, "--json"]);
            assert_eq!(code, 0, "{out}\n{err}");
            std::fs::write(&path, &out).unwrap();
            json(&out)
        })
    };
    let (p0, p1) = (dir.path().join("s0.json"), dir.path().join("s1.json"));
    let a = run("0/2", p0.clone());
    let b = run("1/2", p1.clone());
    let (a, b) = (a.join().unwrap(), b.join().unwrap());
    // Each shard alone cannot know the other's sender: loss is left to merge.
    assert_eq!(a["lost"], Value::Null);
    assert_eq!(u(&a, "connected") + u(&b, "connected"), 12);
    let (code, out, err) = hilbench(&["load", "merge", p0.to_str().unwrap(), p1.to_str().unwrap(), "--json"]);
    assert_eq!(code, 0, "{out}\n{err}");
    let m = json(&out);
    assert_eq!(u(&m, "shards"), 2);
    assert_eq!(u(&m, "delivered"), u(&a, "delivered") + u(&b, "delivered"));
    assert_eq!(u(&m, "sent"), u(&a, "sent") + u(&b, "sent"));
    assert_eq!(u(&m["latency_us"], "count"), u(&a["latency_us"], "count") + u(&b["latency_us"], "count"));
    assert_eq!(u(&m["latency_us"], "max"), u(&a["latency_us"], "max").max(u(&b["latency_us"], "max")));
    check_no_loss(&m);
    // Merging complete shards warns about nothing; CPU warnings depend on the machine's
    // load (other processes on a shared runner) and pass through from the shards.
    let merge_warnings: Vec<_> = m["warnings"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|w| !w.as_str().is_some_and(|w| w.contains("CPU-bound") || w.contains("generator saturated")))
        .collect();
    assert!(merge_warnings.is_empty(), "{m}");
    // A lone shard cannot be judged.
    let (code, out, _) = hilbench(&["load", "merge", p1.to_str().unwrap()]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("only 1 of 2 shards"), "{out}");
    hub.shutdown_blocking();
}

#[test]
fn connect_only_holds_connections_and_bad_arguments_are_clear() {
    let hub = hub_blocking(None);
    // The hub runs in this test process, so its pid is ours.
    let pid = std::process::id().to_string();
    let (code, out, err) =
        hilbench(&["load", "bsc", "--hub", &hub.url(), "--connect-only", "50", "--hold", "500ms", "--hub-pid", &pid, "--json"]);
    assert_eq!(code, 0, "{out}\n{err}");
    let s = json(&out);
    assert_eq!((u(&s, "connected"), u(&s, "disconnects")), (50, 0), "{s}");
    assert_eq!(u(&s["connect_ms"], "count"), 50);
    assert_eq!(s["mode"], "connect_only");
    // The hub's memory before and with the connections held, per connection.
    let m = &s["hub_memory"];
    assert!(u(m, "rss_before_kb") > 0 && u(m, "rss_loaded_kb") > 0, "{s}");
    assert_eq!(
        u(m, "per_connection_bytes"),
        (u(m, "rss_loaded_kb").saturating_sub(u(m, "rss_before_kb"))) * 1024 / 50,
        "{s}"
    );
    // The whole machine's CPU is accounted, the others' share included.
    assert!(s["cpu"]["machine_busy_cores"].as_f64().is_some_and(|b| b >= 0.0), "{s}");
    assert!(s["cpu"]["others_cores"].as_f64().is_some(), "{s}");
    hub.shutdown_blocking();

    for (args, msg) in [
        (vec!["--payload", "10"], "--payload 10 must be between 20"),
        (vec!["--senders", "30"], "exceeds --nodes"),
        (vec!["--shard", "2/2"], "0 <= I < N"),
        (vec!["--duration", "2h"], "capped at 3600"),
    ] {
        let mut a = vec!["load", "bsc", "--hub", "ws://127.0.0.1:9", "--nodes", "20"];
        a.extend(args);
        let (code, out, err) = hilbench(&a);
        assert_eq!(code, 2, "{a:?}: {out}");
        assert!(err.contains(msg), "{a:?}: {err}");
    }
    let (code, _, err) = hilbench(&["load", "bsc", "--hub", "wss://127.0.0.1:9"]);
    assert_eq!(code, 2);
    assert!(err.contains("needs --tls-dir"), "{err}");
}

#[test]
fn load_over_tls_with_node_certificates() {
    let dir = tempfile::tempdir().unwrap();
    hilbench::cli::pki::generate(dir.path(), 2, &[], 30, false).expect("pki");
    let hub = hub_blocking(Some(TlsDir::hub(dir.path())));
    let (code, out, err) = hilbench(&[
        "load", "bsc", "--hub", &hub.url(), "--tls-dir", dir.path().to_str().unwrap(), "--nodes", "5", "--duration", "1s", "--json",
    ]);
    assert_eq!(code, 0, "{out}\n{err}");
    check_no_loss(&json(&out));
    hub.shutdown_blocking();
}

#[tokio::test]
async fn validate_reports_all_pass_against_our_hub() {
    let hub = HubServer::start(HubServerConfig { worker_threads: 1, ..HubServerConfig::default() }).await.unwrap();
    let r = validate_bsc_hub(&hub.url(), &[(WsConnectOptions::hub(None), None)], Duration::from_secs(3)).await;
    for c in &r.checks {
        assert_eq!(c.outcome, Outcome::Pass, "{}: {}", c.name, c.detail);
    }
    assert!(r.passed);
    assert!(r.checks.len() >= 15, "{:?}", r.checks.iter().map(|c| c.name).collect::<Vec<_>>());
    hub.shutdown().await;
}

#[test]
fn validate_cli_over_tls_passes_and_prints_json() {
    let dir = tempfile::tempdir().unwrap();
    hilbench::cli::pki::generate(dir.path(), 3, &[], 30, false).expect("pki");
    let hub = hub_blocking(Some(TlsDir::hub(dir.path())));
    let (code, out, err) =
        hilbench(&["validate", "bsc-hub", "--url", &hub.url(), "--tls-dir", dir.path().to_str().unwrap(), "--json"]);
    assert_eq!(code, 0, "{out}\n{err}");
    let r = json(&out);
    assert_eq!(r["passed"], true);
    assert!(r["checks"].as_array().unwrap().iter().all(|c| c["outcome"] == "pass"), "{r}");
    hub.shutdown_blocking();
}

#[test]
fn validate_flags_a_hub_that_lets_one_certificate_impersonate_another() {
    let dir = tempfile::tempdir().unwrap();
    hilbench::cli::pki::generate(dir.path(), 2, &[], 30, false).expect("pki");
    let verdict = |hub: &HubHandle| {
        let (code, out, err) =
            hilbench(&["validate", "bsc-hub", "--url", &hub.url(), "--tls-dir", dir.path().to_str().unwrap(), "--json"]);
        assert_eq!(code, 0, "a warning does not fail the run: {out}\n{err}");
        let r = json(&out);
        let c = r["checks"].as_array().unwrap().iter().find(|c| c["name"] == "certificate_bound_identity").cloned();
        c.unwrap_or_else(|| panic!("no certificate_bound_identity check: {r}"))
    };
    // Our hub binds identities by default: node-2's certificate naming node-1's device is refused.
    let hub = hub_blocking(Some(TlsDir::hub(dir.path())));
    let c = verdict(&hub);
    assert_eq!(c["outcome"], "pass", "{c}");
    assert!(c["detail"].as_str().unwrap().contains("class 4 code 1"), "{c}");
    hub.shutdown_blocking();
    // A hub that does not (--no-cert-binding) is flagged.
    let mut cfg = HubServerConfig { tls: Some(TlsDir::hub(dir.path())), worker_threads: 1, ..HubServerConfig::default() };
    cfg.core.bind_identity = false;
    let hub = HubServer::start_blocking(cfg).expect("hub starts");
    let c = verdict(&hub);
    assert_eq!(c["outcome"], "warn", "{c}");
    assert!(c["detail"].as_str().unwrap().contains("receives its unicasts"), "{c}");
    hub.shutdown_blocking();
}

/// A hub with the faults seen in one C implementation: limits in little-endian, code 113
/// for a duplicate VMAC, no forwarding at all.
async fn quirky_hub() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}", listener.local_addr().unwrap());
    let owners = std::sync::Arc::new(std::sync::Mutex::new(HashMap::<Vmac, DeviceUuid>::new()));
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else { return };
            let owners = owners.clone();
            tokio::spawn(async move {
                // The callback's error type is fixed by tungstenite.
                #[allow(clippy::result_large_err)]
                let cb = |_req: &Request, mut resp: Response| {
                    resp.headers_mut().insert("Sec-WebSocket-Protocol", HeaderValue::from_static(HUB_SUBPROTOCOL));
                    Ok(resp)
                };
                let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(tcp, cb).await else { return };
                while let Some(Ok(m)) = ws.next().await {
                    let Message::Binary(b) = m else { continue };
                    let Ok(msg) = decode(&b) else { continue };
                    let reply = match &msg.payload {
                        BvlcPayload::ConnectRequest { vmac, uuid, .. } => {
                            let mut o = owners.lock().unwrap();
                            match o.get(vmac) {
                                Some(u) if u != uuid => nak(&msg, ERROR_CLASS_COMMUNICATION, 113, "duplicate"),
                                _ => {
                                    o.insert(*vmac, *uuid);
                                    hilbench::protocol::bvlc_sc::BvlcMessage::new(
                                        msg.message_id,
                                        BvlcPayload::ConnectAccept {
                                            vmac: Vmac([2, 0, 0, 0, 0, 0xAA]),
                                            uuid: DeviceUuid([0xAA; 16]),
                                            max_bvlc: 1500u16.swap_bytes(),
                                            max_npdu: 1497u16.swap_bytes(),
                                        },
                                    )
                                }
                            }
                        }
                        BvlcPayload::HeartbeatRequest => {
                            hilbench::protocol::bvlc_sc::BvlcMessage::new(msg.message_id, BvlcPayload::HeartbeatAck)
                        }
                        _ => continue,
                    };
                    if ws.send(Message::Binary(encode(&reply).unwrap().into())).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    url
}

#[tokio::test]
async fn validate_catches_a_non_conformant_hub() {
    let url = quirky_hub().await;
    let r = validate_bsc_hub(&url, &[(WsConnectOptions::hub(None), None)], Duration::from_millis(500)).await;
    let outcome = |n: &str| r.check(n).unwrap_or_else(|| panic!("no check {n}: {r:?}")).outcome;
    assert_eq!(outcome("connect"), Outcome::Pass);
    let bo = r.check("limits_byte_order").unwrap();
    assert_eq!(bo.outcome, Outcome::Fail);
    assert!(bo.detail.contains("56325") && bo.detail.contains("1500"), "{}", bo.detail);
    assert_eq!(outcome("unicast_forwarding"), Outcome::Fail);
    assert_eq!(outcome("broadcast_forwarding"), Outcome::Fail);
    let dup = r.check("duplicate_vmac_nak").unwrap();
    assert_eq!(dup.outcome, Outcome::Warn, "{}", dup.detail);
    assert!(dup.detail.contains("113") && dup.detail.contains("151"), "{}", dup.detail);
    assert_eq!(outcome("unknown_must_understand_option"), Outcome::Fail, "it ACKs a heartbeat it should NAK");
    assert_eq!(outcome("subprotocol_wrong"), Outcome::Fail);
    assert!(!r.passed);
}
