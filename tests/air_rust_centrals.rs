//! Unmodified Rust BLE libraries on the virtual air: a bluer peripheral
//! registers an echo service on a peripheral adapter; a btleplug central
//! and a bluer central (with AcquireWrite/AcquireNotify) scan, connect,
//! discover, subscribe, write and get the answers cut to MTU 23.

mod air_support;

use std::time::Duration;

use air_support::*;
use btleplug::api::{Central, CharPropFlags, Manager as _, Peripheral as _, ScanFilter, WriteType};
use futures::StreamExt;
use tokio::time::timeout;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn btleplug_central_talks_to_bluer_peripheral() {
    let shared = shared_air();
    let air = &shared.air;
    let adapter = shared.adapter().await;
    let dev_address = adapter.address.clone();
    let periph = start_peripheral(&adapter.name).await;

    let manager = btleplug::platform::Manager::new().await.unwrap();
    let adapters = manager.adapters().await.unwrap();
    let mut central = None;
    for a in adapters {
        if a.adapter_info().await.unwrap().starts_with("hci0") {
            central = Some(a);
        }
    }
    let central = central.expect("btleplug sees hci0");
    central.start_scan(ScanFilter::default()).await.unwrap();
    let found = timeout(T, async {
        loop {
            for p in central.peripherals().await.unwrap() {
                if let Some(props) = p.properties().await.unwrap() {
                    if props.address.to_string() == dev_address {
                        return (p, props);
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("btleplug finds the advertising peripheral");
    let (p, props) = found;
    assert_eq!(props.local_name.as_deref(), Some(NAME));
    assert_eq!(props.manufacturer_data.get(&0x02E5), Some(&vec![1, 2, 3]));
    assert!(props.services.contains(&SERVICE));
    assert!(props.rssi.is_some_and(|r| r < 0), "RSSI {:?}", props.rssi);
    central.stop_scan().await.unwrap();

    timeout(T, p.connect()).await.unwrap().unwrap();
    timeout(T, p.discover_services()).await.unwrap().unwrap();
    let chars = p.characteristics();
    let notify = chars.iter().find(|c| c.uuid == NOTIFY).expect("notify characteristic").clone();
    let write = chars.iter().find(|c| c.uuid == WRITE).expect("write characteristic").clone();
    assert!(notify.properties.contains(CharPropFlags::NOTIFY));
    assert!(write.properties.contains(CharPropFlags::WRITE_WITHOUT_RESPONSE));
    assert_eq!(notify.service_uuid, SERVICE);

    let mut notes = p.notifications().await.unwrap();
    p.subscribe(&notify).await.unwrap();
    p.write(&write, b"hi", WriteType::WithoutResponse).await.unwrap();
    let mut got = Vec::new();
    for _ in 0..2 {
        let n = timeout(T, notes.next()).await.expect("notification").expect("stream open");
        assert_eq!(n.uuid, NOTIFY);
        got.push(n.value);
    }
    assert_eq!(got, answer_for(b"hi"), "two notifications of 20 + 14 bytes");
    // One notification longer than MTU−3 arrives cut, as BlueZ's server cuts it.
    p.write(&write, b"LONG", WriteType::WithResponse).await.unwrap();
    let n = timeout(T, notes.next()).await.unwrap().unwrap();
    assert_eq!(n.value, (0u8..20).collect::<Vec<u8>>());

    {
        let w = periph.writes.lock().unwrap();
        assert_eq!(w.len(), 2);
        assert!(w[0].command && !w[1].command, "write types reach the app: {w:?}");
        assert_eq!(w[0].mtu, 23);
        assert_eq!(w[0].device, format!("{}/{}", adapter.name, air.central_address()));
    }
    let frames = air.link(&adapter.name).unwrap().frames();
    assert!(frames.iter().any(|f| f.bytes == b"hi"), "the write is on the link capture");

    p.disconnect().await.unwrap();
    drop(periph);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bluer_central_uses_acquire_write_and_notify() {
    let shared = shared_air();
    let adapter_info = shared.adapter().await;
    let dev_address: bluer::Address = adapter_info.address.parse().unwrap();
    let periph = start_peripheral(&adapter_info.name).await;

    let session = bluer::Session::new().await.unwrap();
    let adapter = session.default_adapter().await.unwrap();
    assert_eq!(adapter.name(), "hci0");
    discover(&adapter, dev_address).await;
    let device = adapter.device(dev_address).unwrap();
    assert_eq!(device.name().await.unwrap().as_deref(), Some(NAME));
    timeout(T, device.connect()).await.unwrap().unwrap();
    assert!(device.is_connected().await.unwrap());
    let (notify, write) = echo_characteristics(&device).await.unwrap();
    let reader = notify.notify_io().await.expect("AcquireNotify");
    let writer = write.write_io().await.expect("AcquireWrite");
    writer.send(b"abc").await.unwrap();
    let mut got = Vec::new();
    for _ in 0..2 {
        got.push(timeout(T, reader.recv()).await.unwrap().unwrap());
    }
    assert_eq!(got, answer_for(b"abc"));
    // A write while AcquireWrite holds the characteristic is refused as BlueZ does.
    let err = write.write(b"x").await.unwrap_err();
    assert!(err.to_string().contains("Write acquired") || format!("{err:?}").contains("NotPermitted"), "{err:?}");
    drop(writer);
    drop(reader);
    device.disconnect().await.unwrap();
    drop(periph);
}

async fn discover(adapter: &bluer::Adapter, addr: bluer::Address) {
    let mut events = adapter.discover_devices().await.unwrap();
    timeout(T, async {
        while let Some(ev) = events.next().await {
            if matches!(ev, bluer::AdapterEvent::DeviceAdded(a) if a == addr) {
                return;
            }
        }
    })
    .await
    .expect("device discovered");
}

async fn char_paths(device: &bluer::Device) -> Vec<(u16, uuid::Uuid)> {
    let mut out = Vec::new();
    for s in device.services().await.unwrap() {
        for c in s.characteristics().await.unwrap() {
            out.push((c.id(), c.uuid().await.unwrap()));
        }
    }
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarting_the_peripheral_leaves_no_stale_objects_and_keeps_handles() {
    let shared = shared_air();
    let info = shared.adapter().await;
    let addr: bluer::Address = info.address.parse().unwrap();
    let session = bluer::Session::new().await.unwrap();
    let adapter = session.default_adapter().await.unwrap();

    let periph = start_peripheral(&info.name).await;
    discover(&adapter, addr).await;
    let device = adapter.device(addr).unwrap();
    timeout(T, device.connect()).await.unwrap().unwrap();
    let before = char_paths(&device).await;
    assert_eq!(before.len(), 2, "{before:?}");

    // The central lets go, then the peripheral stops (its handles
    // unregister the advertisement and the application). As BlueZ does,
    // the central keeps the device cached for its temporary timeout, but
    // no GATT object outlives the link.
    device.disconnect().await.unwrap();
    drop(periph);
    assert!(adapter.device_addresses().await.unwrap().contains(&addr), "the central keeps the device cached");
    assert!(!device.is_connected().await.unwrap());
    let conn = zbus::connection::Builder::address(shared.air.address()).build().await.unwrap();
    let om = zbus::fdo::ObjectManagerProxy::builder(&conn).destination("org.bluez").path("/").build().await.unwrap();
    let dev_path = format!("/org/bluez/hci0/dev_{}", info.address.replace(':', "_"));
    let leftovers: Vec<String> =
        om.get_managed_objects().await.unwrap().into_keys().map(|p| p.to_string()).filter(|p| p.starts_with(&format!("{dev_path}/"))).collect();
    assert!(leftovers.is_empty(), "no GATT objects outlive the link: {leftovers:?}");

    let periph = start_peripheral(&info.name).await;
    discover(&adapter, addr).await;
    let device = adapter.device(addr).unwrap();
    assert!(!device.is_connected().await.unwrap(), "a restarted peripheral starts unconnected");
    timeout(T, device.connect()).await.unwrap().unwrap();
    assert_eq!(char_paths(&device).await, before, "same handles after a restart");

    // A link fault from the scenario API: the next notification is lost.
    let link = shared.air.link(&info.name).unwrap();
    link.add_fault(hilbench::link::FaultRule {
        fault: hilbench::link::LinkFault::Drop,
        trigger: hilbench::link::fault::FaultTrigger {
            direction: Some(hilbench::link::Direction::Response),
            count: Some(1),
            ..Default::default()
        },
        name: None,
    });
    let (notify, write) = echo_characteristics(&device).await.unwrap();
    let mut stream = Box::pin(notify.notify().await.unwrap());
    write.write(b"xy").await.unwrap();
    let got = timeout(T, stream.next()).await.unwrap().unwrap();
    assert_eq!(got, answer_for(b"xy")[1], "the first chunk was dropped by the link");
    // Raising the MTU lets a long notification through whole.
    let m = shared.rt.spawn(async move { link.set_mtu(247).await }).await.unwrap();
    assert_eq!(m, 247);
    write.write(b"LONG").await.unwrap();
    let got = timeout(T, stream.next()).await.unwrap().unwrap();
    assert_eq!(got, (0u8..30).collect::<Vec<u8>>());
    drop(periph);
}

/// A peripheral whose first incoming method call is lost (bluer's
/// `Session::new` race: its method-call handler is installed by a task that
/// may not have run yet) still gets its advertisement registered: the air
/// asks for GetAll again instead of waiting out its call timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_advertisement_whose_first_get_all_is_lost_still_registers() {
    use zbus::message::Type;
    let shared = shared_air();
    let info = shared.adapter().await;
    let conn = zbus::connection::Builder::address(shared.air.address()).build().await.unwrap();
    let adv_path = "/test/lossy/advertisement0";
    let mut incoming = zbus::MessageStream::from(&conn);
    let server = conn.clone();
    let get_alls = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
    let counted = get_alls.clone();
    let serve = tokio::spawn(async move {
        while let Some(Ok(msg)) = incoming.next().await {
            let hdr = msg.header();
            if msg.message_type() != Type::MethodCall || hdr.member().map(|m| m.as_str()) != Some("GetAll") {
                continue;
            }
            // The first call vanishes, as bluer's filter swallows it.
            if counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0 {
                continue;
            }
            let props: std::collections::HashMap<&str, zbus::Variant<'_>> = std::collections::HashMap::from([
                ("Type", zbus::Variant::from("peripheral")),
                ("LocalName", zbus::Variant::from("lossy")),
            ]);
            server.reply(&hdr, &props).await.unwrap();
        }
    });
    let started = std::time::Instant::now();
    let reply = timeout(
        T,
        conn.call_method(
            Some("org.bluez"),
            info.path.as_str(),
            Some("org.bluez.LEAdvertisingManager1"),
            "RegisterAdvertisement",
            &(zbus::ObjectPath::try_from(adv_path).unwrap(), std::collections::HashMap::<&str, zbus::Variant<'_>>::new()),
        ),
    )
    .await
    .expect("RegisterAdvertisement answers");
    reply.unwrap_or_else(|e| panic!("RegisterAdvertisement failed after {:?}: {e}", started.elapsed()));
    assert!(get_alls.load(std::sync::atomic::Ordering::SeqCst) >= 2, "the air asked again");
    serve.abort();
}

/// The ATT capture of a bluer central's session decodes in tshark as ACL →
/// L2CAP → ATT with the handles the central saw: the CCC write that turns
/// notifications on, a write command, a write request and its response,
/// notifications, a read and its response, and the MTU exchange.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn att_capture_decodes_in_tshark_with_the_right_handles() {
    if std::process::Command::new("tshark").arg("--version").output().is_err() {
        panic!("tshark is not installed (ci/test.sh installs it)");
    }
    let shared = shared_air();
    let info = shared.adapter().await;
    let addr: bluer::Address = info.address.parse().unwrap();
    let periph = start_peripheral(&info.name).await;
    let session = bluer::Session::new().await.unwrap();
    let adapter = session.default_adapter().await.unwrap();
    discover(&adapter, addr).await;
    let device = adapter.device(addr).unwrap();
    timeout(T, device.connect()).await.unwrap().unwrap();
    let (notify, write) = echo_characteristics(&device).await.unwrap();
    // Handles as the central sees them (the object paths end in them).
    let value_handle = |c: &bluer::gatt::remote::Characteristic| c.id() + 1;
    let (notify_h, write_h) = (value_handle(&notify), value_handle(&write));
    let mut stream = Box::pin(notify.notify().await.unwrap());
    write.write_ext(b"hi", &bluer::gatt::remote::CharacteristicWriteRequest { op_type: bluer::gatt::WriteOp::Command, ..Default::default() }).await.unwrap();
    for _ in 0..2 {
        timeout(T, stream.next()).await.unwrap().unwrap();
    }
    write.write_ext(b"LONG", &bluer::gatt::remote::CharacteristicWriteRequest { op_type: bluer::gatt::WriteOp::Request, ..Default::default() }).await.unwrap();
    timeout(T, stream.next()).await.unwrap().unwrap();
    assert_eq!(notify.read().await.unwrap(), READ_VALUE);
    let link = shared.air.link(&info.name).unwrap();
    let l2 = link.clone();
    shared.rt.spawn(async move { l2.set_mtu(185).await }).await.unwrap();
    drop(stream);
    device.disconnect().await.unwrap();
    drop(periph);

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("att.pcapng");
    let frames = link.att_frames();
    let mut cap = hilbench::link::capture::PcapngCapture::create_as(&path, &frames[0].link, hilbench::link::capture::CaptureFormat::BleAtt).unwrap();
    for f in &frames {
        cap.write(f).unwrap();
    }
    cap.close().unwrap();
    let out = std::process::Command::new("tshark")
        .arg("-r")
        .arg(&path)
        .args(["-T", "fields", "-E", "separator=;", "-e", "bthci_acl.chandle", "-e", "btl2cap.cid", "-e", "btatt.opcode", "-e", "btatt.handle", "-e", "btatt.value", "-e", "btatt.client_rx_mtu", "-e", "btatt.server_rx_mtu"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "tshark failed: {}", String::from_utf8_lossy(&out.stderr));
    let rows: Vec<Vec<String>> = text.lines().map(|l| l.split(';').map(str::to_string).collect()).collect();
    assert_eq!(rows.len(), frames.len(), "one decoded packet per PDU:\n{text}");
    for r in &rows {
        assert_eq!((r[0].as_str(), r[1].as_str()), ("0x0040", "0x0004"), "ACL handle and ATT channel:\n{text}");
    }
    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    let h = |v: u16| format!("0x{v:04x}");
    let has = |op: &str, handle: Option<u16>, value: Option<&str>| {
        rows.iter().any(|r| {
            r[2] == op && handle.is_none_or(|x| r[3] == h(x)) && value.is_none_or(|v| r[4] == v)
        })
    };
    assert!(has("0x12", Some(notify_h + 1), Some("0100")), "CCC write turning notifications on:\n{text}");
    assert!(has("0x52", Some(write_h), Some(&hex(b"hi"))), "write command:\n{text}");
    assert!(has("0x1b", Some(notify_h), Some(&hex(&answer_for(b"hi")[0]))), "first notification:\n{text}");
    assert!(has("0x1b", Some(notify_h), Some(&hex(&answer_for(b"hi")[1]))), "second notification:\n{text}");
    assert!(has("0x12", Some(write_h), Some(&hex(b"LONG"))), "write request:\n{text}");
    assert!(has("0x13", None, None), "write response:\n{text}");
    assert!(has("0x1b", Some(notify_h), Some(&hex(&(0u8..20).collect::<Vec<u8>>()))), "notification cut to MTU−3:\n{text}");
    assert!(has("0x0a", Some(notify_h), None), "read request:\n{text}");
    assert!(has("0x0b", None, Some(&hex(READ_VALUE))), "read response:\n{text}");
    assert!(rows.iter().any(|r| r[2] == "0x02" && r[5] == "185"), "MTU exchange request:\n{text}");
    assert!(rows.iter().any(|r| r[2] == "0x03" && r[6] == "185"), "MTU exchange response:\n{text}");
    // And the full dissection names ATT.
    let v = std::process::Command::new("tshark").arg("-r").arg(&path).arg("-V").output().unwrap();
    let verbose = String::from_utf8_lossy(&v.stdout);
    assert!(verbose.contains("Bluetooth Attribute Protocol") && verbose.contains("Handle Value Notification"), "{verbose}");
}
