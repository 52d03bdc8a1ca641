//! The JBD BMS GATT peripheral (bluer) on the virtual air, polled by the
//! jbd-client (btleplug) and by a bluer central: readings match the pack,
//! responses arrive in MTU − 3 notifications, the rejects-write-request
//! profile refuses write requests only, and a connected central hides the
//! BMS from others until it leaves.

mod air_support;

use std::time::{Duration, Instant};

use air_support::*;
use btleplug::api::WriteType;
use futures::StreamExt;
use hilbench::client::jbd_client::{central_adapter, find_bms, JbdClientActor, JbdClientConfig, JbdSession, JbdTarget};
use hilbench::device::eg4::{GetSnapshot, SetState};
use hilbench::device::jbd::{GetLinkState, JbdBmsDevice, JbdGattConfig, NOTIFY_UUID, WRITE_UUID};
use hilbench::device::jbd_core::{JbdBms, JbdConfig, JbdProfile};
use hilbench::model::PackSnapshot;
use hilbench::observe::{ObservationKind, ObservationLog};
use hilbench::protocol::jbd::{self, reg, Assembled, BasicInfo, CellVoltages, JbdResponseAssembler};
use tokio::time::timeout;

async fn start_bms(profile: JbdProfile, log: &ObservationLog) -> JbdBmsDevice {
    let shared = shared_air();
    let adapter = shared.adapter().await;
    let core = JbdBms::new(JbdConfig { profile, ..JbdConfig::default() }).unwrap();
    let cfg = JbdGattConfig { adapter: adapter.name.clone(), ..JbdGattConfig::default() };
    let dev = JbdBmsDevice::start("bms", core, cfg, log.clone()).await.expect("BMS registers on the air");
    assert_eq!(dev.address, adapter.address);
    dev
}

async fn set(dev: &JbdBmsDevice, key: &str, value: f64) {
    dev.addr.send(SetState { key: key.into(), value }).await.unwrap().unwrap();
}

/// The 0x03/0x04 values a client decoded against the pack a moment later
/// (the pack keeps running: SoC may tick, cells move by a millivolt).
fn assert_matches_pack(basic: &BasicInfo, cells: &CellVoltages, snap: &PackSnapshot) {
    assert!((f64::from(basic.voltage_10mv) * 10.0 - f64::from(snap.pack_mv)).abs() <= 40.0, "pack V {basic:?} vs {snap:?}");
    assert_eq!(f64::from(basic.current_10ma) / 100.0, snap.current_a, "current");
    assert!((f64::from(basic.rsoc_pct) - snap.soc_pct).abs() <= 1.0, "SoC {} vs {}", basic.rsoc_pct, snap.soc_pct);
    assert_eq!(usize::from(basic.cell_count), snap.cells_mv.len());
    assert_eq!(basic.temps_c().len(), snap.temps_c.len());
    for (got, want) in basic.temps_c().iter().zip(&snap.temps_c) {
        assert!((got - want).abs() <= 0.2, "temperature {got} vs {want}");
    }
    assert_eq!(cells.cells_mv.len(), snap.cells_mv.len());
    for (i, (got, want)) in cells.cells_mv.iter().zip(&snap.cells_mv).enumerate() {
        assert!(got.abs_diff(*want) <= 2, "cell {} {got} mV vs {want} mV", i + 1);
    }
}

#[actix_rt::test]
async fn jbd_client_polls_the_simulated_bms() {
    let log = ObservationLog::new(Instant::now());
    let dev = start_bms(JbdProfile::Standard, &log).await;
    set(&dev, "soc", 55.0).await;
    set(&dev, "current_a", -12.5).await;
    set(&dev, "cell3_mv", 3412.0).await;
    let cfg = JbdClientConfig {
        target: JbdTarget { address: Some(dev.address.clone()), name: None },
        interval: Duration::from_millis(500),
        timeout: Duration::from_secs(5),
        settle: Duration::ZERO,
        ..JbdClientConfig::default()
    };
    let client = actix::Actor::start(JbdClientActor::new(cfg, log.clone()));
    let reading = timeout(T, async {
        loop {
            let found = log.snapshot().into_iter().find_map(|o| match o.kind {
                ObservationKind::Reading { values, flags, .. } => Some((values, flags)),
                _ => None,
            });
            if let Some(r) = found {
                return r;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no reading; log: {:#?}", log.snapshot()));
    let snap = dev.addr.send(GetSnapshot).await.unwrap();
    let (v, flags) = reading;
    assert_eq!(v["current_a"], -12.5);
    assert!((v["soc_pct"] - snap.soc_pct).abs() <= 1.0, "{v:?}");
    assert!((v["pack_v"] - f64::from(snap.pack_mv) / 1000.0).abs() <= 0.04, "{v:?} vs {}", snap.pack_mv);
    assert_eq!(v["cell_count"], 16.0);
    assert_eq!(v["cell3_mv"], 3412.0, "a pinned cell reads exactly");
    for (i, mv) in snap.cells_mv.iter().enumerate() {
        assert!((v[&format!("cell{}_mv", i + 1)] - f64::from(*mv)).abs() <= 2.0, "cell {}", i + 1);
    }
    assert_eq!(v["charge_fet"], 1.0);
    assert_eq!(v["discharge_fet"], 1.0);
    assert!(flags.iter().any(|f| f == "model:JBD-SP16S020-L16S-200A-B-U"), "{flags:?}");
    let errors: Vec<_> = log.snapshot().into_iter().filter(|o| matches!(o.kind, ObservationKind::Error { .. })).collect();
    assert!(errors.is_empty(), "{errors:#?}");
    drop(client);
    dev.stop().await;
}

/// One request as a bluer central does it: a write command, then
/// notifications until the assembler has the answer.
async fn bluer_poll(
    write: &bluer::gatt::remote::Characteristic,
    notes: &mut (impl futures::Stream<Item = Vec<u8>> + Unpin),
    asm: &mut JbdResponseAssembler,
    command: &bluer::gatt::remote::CharacteristicWriteRequest,
    register: u8,
) -> (jbd::JbdResponse, Vec<usize>) {
    write.write_ext(&jbd::encode_read(register), command).await.unwrap();
    let mut sizes = Vec::new();
    loop {
        let chunk = timeout(T, notes.next()).await.expect("notification").expect("stream open");
        sizes.push(chunk.len());
        let mut got = asm.push(&chunk).into_iter();
        match (got.next(), got.next()) {
            (None, _) => {}
            (Some(Assembled::Response(r)), None) if r.reg == register => return (r, sizes),
            other => panic!("unexpected {other:?}"),
        }
    }
}

#[actix_rt::test]
async fn bluer_central_polls_with_write_commands() {
    let log = ObservationLog::new(Instant::now());
    let dev = start_bms(JbdProfile::Chins, &log).await;
    set(&dev, "current_a", 20.0).await;
    let address: bluer::Address = dev.address.parse().unwrap();
    let session = bluer::Session::new().await.unwrap();
    let adapter = session.default_adapter().await.unwrap();
    let mut events = adapter.discover_devices().await.unwrap();
    timeout(T, async {
        while let Some(ev) = events.next().await {
            if matches!(ev, bluer::AdapterEvent::DeviceAdded(a) if a == address) {
                return;
            }
        }
    })
    .await
    .expect("bluer discovers the BMS");
    drop(events);
    let device = adapter.device(address).unwrap();
    assert_eq!(device.name().await.unwrap().as_deref(), Some("xiaoxiang BMS"));
    timeout(T, device.connect()).await.unwrap().unwrap();
    let (mut notify, mut write) = (None, None);
    for s in device.services().await.unwrap() {
        for c in s.characteristics().await.unwrap() {
            match c.uuid().await.unwrap() {
                u if u == NOTIFY_UUID => notify = Some(c),
                u if u == WRITE_UUID => write = Some(c),
                _ => {}
            }
        }
    }
    let (notify, write) = (notify.unwrap(), write.unwrap());
    let flags = write.flags().await.unwrap();
    assert!(flags.write_without_response && flags.read && !flags.write, "0xFF02 is 0x06: {flags:?}");
    let mut notes = Box::pin(notify.notify().await.unwrap());
    let command = bluer::gatt::remote::CharacteristicWriteRequest { op_type: bluer::gatt::WriteOp::Command, ..Default::default() };
    let mut asm = JbdResponseAssembler::new();
    let (basic, basic_sizes) = bluer_poll(&write, &mut notes, &mut asm, &command, reg::BASIC_INFO).await;
    let (cells, _) = bluer_poll(&write, &mut notes, &mut asm, &command, reg::CELL_VOLTAGES).await;
    let basic = BasicInfo::decode(&basic.data).unwrap();
    let cells = CellVoltages::decode(&cells.data).unwrap();
    // Chins with 4 NTCs: 23 + 8 + 7 = 38 data bytes, 45 on the air: 20 + 20 + 5.
    assert_eq!(basic.extra.len(), 7);
    assert_eq!(basic_sizes, vec![20, 20, 5]);
    let snap = dev.addr.send(GetSnapshot).await.unwrap();
    assert_matches_pack(&basic, &cells, &snap);
    assert_eq!(basic.current_10ma, 2000);
    device.disconnect().await.unwrap();
    dev.stop().await;
}

#[actix_rt::test]
async fn rejects_write_request_profile_refuses_only_write_requests() {
    let log = ObservationLog::new(Instant::now());
    let dev = start_bms(JbdProfile::RejectsWriteRequest, &log).await;
    let central = central_adapter(Some("hci0")).await.unwrap();
    let target = JbdTarget { address: Some(dev.address.clone()), name: None };
    let p = find_bms(&central, &target, T).await.unwrap();
    let mut s = JbdSession::open(p, T, Duration::ZERO, None, Instant::now()).await.unwrap();
    let req = jbd::encode_read(reg::BASIC_INFO);
    let err = s.write_raw(&req, WriteType::WithResponse).await.expect_err("write request refused");
    assert!(err.detail.contains("not permitted"), "{err:?}");
    let x = s.transact(&req, reg::BASIC_INFO, WriteType::WithoutResponse, T, true).await.expect("write command answered");
    assert!(x.response.is_ok());
    assert_eq!(x.notification_sizes, vec![20, 18], "31 data bytes + 7 at MTU 23");
    // A request with a bad checksum gets the error reply.
    let mut bad = req.clone();
    bad[5] ^= 1;
    let x = s.transact(&bad, reg::BASIC_INFO, WriteType::WithoutResponse, T, true).await.unwrap();
    assert_eq!(x.response.status, jbd::STATUS_ERROR);
    s.close().await;
    dev.stop().await;
}

#[actix_rt::test]
async fn a_connected_central_hides_the_bms_from_others() {
    let log = ObservationLog::new(Instant::now());
    let dev = start_bms(JbdProfile::Standard, &log).await;
    let target = JbdTarget { address: Some(dev.address.clone()), name: None };
    // Central A connects and polls once: the session is A's.
    let central = central_adapter(Some("hci0")).await.unwrap();
    let p = find_bms(&central, &target, T).await.unwrap();
    let mut a = JbdSession::open(p, T, Duration::ZERO, None, Instant::now()).await.unwrap();
    a.transact(&jbd::encode_read(reg::BASIC_INFO), reg::BASIC_INFO, WriteType::WithoutResponse, T, true).await.unwrap();
    let state = dev.addr.send(GetLinkState).await.unwrap();
    assert!(state.central.is_some() && !state.advertising && state.subscribed, "{state:?}");

    // Central B (its own D-Bus connection) scans: BlueZ shows no advertisement
    // on the BMS's adapter and B hears nothing from it.
    let session = bluer::Session::new().await.unwrap();
    let bms_adapter = session.adapter(&dev.adapter).unwrap();
    assert_eq!(bms_adapter.active_advertising_instances().await.unwrap(), 0);
    let b = session.default_adapter().await.unwrap();
    let address: bluer::Address = dev.address.parse().unwrap();
    let mut scan = b.discover_devices().await.unwrap();
    let heard = b.device(address).unwrap();
    let mut adverts = heard.events().await.unwrap();
    let silence = timeout(Duration::from_millis(1500), async {
        while let Some(bluer::DeviceEvent::PropertyChanged(p)) = adverts.next().await {
            if matches!(p, bluer::DeviceProperty::Rssi(_)) {
                return;
            }
        }
    })
    .await;
    assert!(silence.is_err(), "B heard an advertisement while A was connected");

    // A leaves: the BMS advertises again and B finds it and polls it.
    a.close().await;
    timeout(T, async {
        while let Some(ev) = scan.next().await {
            if matches!(ev, bluer::AdapterEvent::DeviceAdded(x) if x == address) {
                return;
            }
        }
    })
    .await
    .expect("B discovers the BMS after A left");
    drop(scan);
    // The air publishes the device before RegisterAdvertisement returns to the BMS.
    let state = timeout(T, async {
        loop {
            let s = dev.addr.send(GetLinkState).await.unwrap();
            if s.advertising {
                return s;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the BMS takes its advertisement back");
    assert!(state.central.is_none(), "{state:?}");
    let p = find_bms(&central, &target, T).await.unwrap();
    let mut b2 = JbdSession::open(p, T, Duration::ZERO, None, Instant::now()).await.unwrap();
    b2.transact(&jbd::encode_read(reg::CELL_VOLTAGES), reg::CELL_VOLTAGES, WriteType::WithoutResponse, T, true).await.unwrap();
    b2.close().await;
    dev.stop().await;
}

#[actix_rt::test]
async fn jbd_client_reports_timeouts_from_a_silent_bms() {
    let log = ObservationLog::new(Instant::now());
    let dev = start_bms(JbdProfile::Standard, &log).await;
    set(&dev, "silent", 1.0).await;
    let cfg = JbdClientConfig {
        target: JbdTarget { address: Some(dev.address.clone()), name: None },
        interval: Duration::from_secs(30),
        timeout: Duration::from_millis(300),
        retries: 1,
        settle: Duration::ZERO,
        ..JbdClientConfig::default()
    };
    let client = actix::Actor::start(JbdClientActor::new(cfg, log.clone()));
    let timeouts = |log: &ObservationLog| {
        log.snapshot()
            .into_iter()
            .filter(|o| matches!(&o.kind, ObservationKind::Error { kind, attempt, .. } if kind == "timeout" && *attempt <= 2))
            .count()
    };
    // 0x03, 0x04 and 0x05, two attempts each.
    timeout(T, async {
        while timeouts(&log) < 6 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{:#?}", log.snapshot()));
    assert!(!log.snapshot().iter().any(|o| matches!(o.kind, ObservationKind::Reading { .. })), "no reading from a silent BMS");
    assert!(
        log.snapshot().iter().any(|o| o.source == "bms" && matches!(&o.kind, ObservationKind::DeviceSilent { .. })),
        "the BMS says why it was silent"
    );
    drop(client);
    dev.stop().await;
}
