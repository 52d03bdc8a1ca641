//! A bluer peripheral for air tests: an echo service (0xFF00) with a notify
//! characteristic (0xFF01) and a write characteristic (0xFF02, write and
//! write-without-response); 0xFF01 also reads as `echo`. Writing `x…` answers with the text upper-cased,
//! repeated to 34 bytes and sent in MTU−3 chunks, the way the JBD BMS
//! splits its frames; writing `LONG` answers with one 30-byte notification,
//! which the air must cut to MTU−3.

#![allow(dead_code)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bluer::adv::{Advertisement, AdvertisementHandle};
use bluer::gatt::local::{
    Application, ApplicationHandle, Characteristic, CharacteristicNotify, CharacteristicNotifyMethod, CharacteristicRead,
    CharacteristicWrite, CharacteristicWriteMethod, Service,
};
use futures::FutureExt;
use tokio::sync::mpsc;

pub const SERVICE: uuid::Uuid = uuid::Uuid::from_u128(0x0000ff00_0000_1000_8000_00805f9b34fb);
pub const NOTIFY: uuid::Uuid = uuid::Uuid::from_u128(0x0000ff01_0000_1000_8000_00805f9b34fb);
pub const WRITE: uuid::Uuid = uuid::Uuid::from_u128(0x0000ff02_0000_1000_8000_00805f9b34fb);
pub const NAME: &str = "hilbench-echo";
/// What reading the notify characteristic (0xFF01) returns.
pub const READ_VALUE: &[u8] = b"echo";

/// One air per test process: libdbus (under bluer and btleplug) reads
/// DBUS_SYSTEM_BUS_ADDRESS once per process and caches it. The air runs on
/// a runtime of its own so it outlives each test's runtime.
pub struct SharedAir {
    pub rt: tokio::runtime::Runtime,
    pub air: hilbench::air::Air,
}

static SHARED: std::sync::OnceLock<SharedAir> = std::sync::OnceLock::new();

pub fn shared_air() -> &'static SharedAir {
    SHARED.get_or_init(|| {
        // The air's warnings (an application that answers late, a call
        // asked again) go to stderr, which the test runner shows for a
        // failing test. RUST_LOG=hilbench=debug shows more.
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn,hilbench=info".into()),
            )
            .with_writer(std::io::stderr)
            .try_init();
        std::thread::spawn(|| {
            let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
            let air = rt.block_on(hilbench::air::Air::start(hilbench::air::AirConfig::default())).expect("air starts");
            std::env::set_var("DBUS_SYSTEM_BUS_ADDRESS", air.address());
            SharedAir { rt, air }
        })
        .join()
        .unwrap()
    })
}

impl SharedAir {
    /// A fresh peripheral adapter for one test.
    pub async fn adapter(&'static self) -> hilbench::air::PeripheralAdapterInfo {
        self.rt.spawn(async move { self.air.add_peripheral_adapter().await.unwrap() }).await.unwrap()
    }
}

/// The answer the peripheral sends for a write (before the MTU applies).
pub fn answer_for(input: &[u8]) -> Vec<Vec<u8>> {
    if input == b"LONG" {
        return vec![(0u8..30).collect()];
    }
    let up: Vec<u8> = input.to_ascii_uppercase();
    let whole: Vec<u8> = up.iter().copied().cycle().take(34).collect();
    whole.chunks(20).map(|c| c.to_vec()).collect()
}

/// What the peripheral saw of each write: (bytes, device option, mtu, type).
#[derive(Debug, Clone)]
pub struct SeenWrite {
    pub value: Vec<u8>,
    pub device: String,
    pub mtu: u16,
    pub command: bool,
}

pub struct Peripheral {
    pub session: bluer::Session,
    pub adapter: String,
    pub writes: Arc<Mutex<Vec<SeenWrite>>>,
    _adv: AdvertisementHandle,
    _app: ApplicationHandle,
}

pub async fn start_peripheral(adapter_name: &str) -> Peripheral {
    let session = bluer::Session::new().await.expect("bluer session on the air's bus");
    let adapter = session.adapter(adapter_name).expect("adapter");
    let adv = Advertisement {
        service_uuids: [SERVICE].into_iter().collect(),
        manufacturer_data: [(0x02E5u16, vec![1, 2, 3])].into_iter().collect(),
        local_name: Some(NAME.into()),
        discoverable: Some(true),
        ..Default::default()
    };
    let t0 = std::time::Instant::now();
    let adv = adapter
        .advertise(adv)
        .await
        .unwrap_or_else(|e| panic!("RegisterAdvertisement on {adapter_name} failed after {:?}: {e:?}", t0.elapsed()));
    let writes = Arc::new(Mutex::new(Vec::new()));
    let (tx, mut rx) = mpsc::unbounded_channel::<Vec<u8>>();
    let notifier_slot: Arc<tokio::sync::Mutex<Option<bluer::gatt::local::CharacteristicNotifier>>> = Default::default();
    let slot = notifier_slot.clone();
    tokio::spawn(async move {
        while let Some(input) = rx.recv().await {
            let mut guard = slot.lock().await;
            if let Some(n) = guard.as_mut() {
                for chunk in answer_for(&input) {
                    if n.notify(chunk).await.is_err() {
                        break;
                    }
                }
            }
        }
    });
    let seen = writes.clone();
    let app = Application {
        services: vec![Service {
            uuid: SERVICE,
            primary: true,
            characteristics: vec![
                Characteristic {
                    uuid: NOTIFY,
                    read: Some(CharacteristicRead {
                        read: true,
                        fun: Box::new(|_req| async move { Ok(READ_VALUE.to_vec()) }.boxed()),
                        ..Default::default()
                    }),
                    notify: Some(CharacteristicNotify {
                        notify: true,
                        method: CharacteristicNotifyMethod::Fun(Box::new(move |n| {
                            let slot = notifier_slot.clone();
                            async move {
                                *slot.lock().await = Some(n);
                            }
                            .boxed()
                        })),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
                Characteristic {
                    uuid: WRITE,
                    write: Some(CharacteristicWrite {
                        write: true,
                        write_without_response: true,
                        method: CharacteristicWriteMethod::Fun(Box::new(move |value, req| {
                            let tx = tx.clone();
                            let seen = seen.clone();
                            async move {
                                seen.lock().unwrap().push(SeenWrite {
                                    value: value.clone(),
                                    device: format!("{}/{}", req.adapter_name, req.device_address),
                                    mtu: req.mtu,
                                    command: req.op_type == bluer::gatt::WriteOp::Command,
                                });
                                let _ = tx.send(value);
                                Ok(())
                            }
                            .boxed()
                        })),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
            ],
            ..Default::default()
        }],
        ..Default::default()
    };
    let t0 = std::time::Instant::now();
    let app = adapter
        .serve_gatt_application(app)
        .await
        .unwrap_or_else(|e| panic!("RegisterApplication on {adapter_name} failed after {:?}: {e:?}", t0.elapsed()));
    Peripheral { session, adapter: adapter_name.to_string(), writes, _adv: adv, _app: app }
}

pub const T: Duration = Duration::from_secs(20);

/// A central's view of the echo service on `device`: its notify (0xFF01) and write
/// (0xFF02) characteristics, found by UUID among everything the device offers.
pub async fn echo_characteristics(
    device: &bluer::Device,
) -> Result<(bluer::gatt::remote::Characteristic, bluer::gatt::remote::Characteristic), String> {
    let (mut notify, mut write) = (None, None);
    for s in device.services().await.map_err(|e| e.to_string())? {
        for c in s.characteristics().await.map_err(|e| e.to_string())? {
            match c.uuid().await.map_err(|e| e.to_string())? {
                u if u == NOTIFY => notify = Some(c),
                u if u == WRITE => write = Some(c),
                _ => {}
            }
        }
    }
    Ok((notify.ok_or("no notify characteristic")?, write.ok_or("no write characteristic")?))
}
