//! A second GATT device kind, declared in this file alone: an echo
//! peripheral (service 0xFF00, notify 0xFF01, write 0xFF02) built with the
//! GATT builder and placed on the air with the BLE transport. Registered
//! from here, it gets the `ble` step, link faults on its air link and ATT
//! capture with no change anywhere else, and bleak (unmodified, from PyPI)
//! talks to it in a scenario.

use std::path::Path;

use futures::future::LocalBoxFuture;
use hilbench::kind::ble::{self, AirDevice, AirLink, OnAir, BLE_STEP};
use hilbench::kind::{decode_keys, Declared, Kind, LinkDecl, LinkHomeDecl, Names, Role, Running, StartContext, StepDoc};
use hilbench::link::capture::CaptureFormat;
use hilbench::link::fault::LinkMedium;
use hilbench::scenario::runner::{run_file_blocking, RunOptions};
use hilbench::scenario::source::Problem;
use hilbench::scenario::Scenario;
use hilbench::transport::gatt::{uuid16, GattEvent, GattServer, GattService, Props, ReadValue};

struct EchoKind;

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct EchoKeys {
    name: String,
}

/// What the echo answers: the bytes in upper case, repeated to 34 bytes
/// (two notifications at the default MTU); `LONG` gets 0..30.
fn answer(v: &[u8]) -> Vec<u8> {
    if v == b"LONG" {
        return (0u8..30).collect();
    }
    v.to_ascii_uppercase().iter().copied().cycle().take(34).collect()
}

impl Kind for EchoKind {
    fn name(&self) -> &'static str {
        "gatt-echo"
    }
    fn role(&self) -> Role {
        Role::Device
    }
    fn about(&self) -> &'static str {
        "a test's echo peripheral"
    }
    fn decode(&self, entry: yaml_serde::Value) -> Result<Box<dyn Declared>, Problem> {
        Ok(Box::new(decode_keys::<EchoKeys>(entry)?))
    }
    fn steps(&self) -> &'static [StepDoc] {
        std::slice::from_ref(&BLE_STEP)
    }
}

impl Declared for EchoKeys {
    fn name(&self) -> &str {
        &self.name
    }
    fn kind_name(&self) -> &'static str {
        "gatt-echo"
    }
    fn links(&self) -> Vec<LinkDecl> {
        vec![LinkDecl {
            name: self.name.clone(),
            home: LinkHomeDecl::Own,
            capture: Some(CaptureFormat::BleAtt),
            checksum: None,
            carries: "echoed bytes in BLE notifications",
            medium: LinkMedium::Gatt,
        }]
    }
    fn on_air(&self) -> bool {
        true
    }
    fn check_step(&self, _step: &str, body: &yaml_serde::Value, _names: &Names<'_>) -> Result<(), Problem> {
        ble::check_step(body)
    }
    fn start<'a>(&'a self, _cx: &'a mut StartContext<'_>) -> LocalBoxFuture<'a, Result<Box<dyn Running>, String>> {
        Box::pin(async move {
            let air = AirLink::lend(None, None).await?;
            let session = bluer::Session::new().await.map_err(|e| e.to_string())?;
            let adapter = session.adapter(air.adapter()).map_err(|e| e.to_string())?;
            let address = adapter.address().await.map_err(|e| e.to_string())?.to_string();
            let service = GattService::primary(uuid16(0xFF00))
                .characteristic(uuid16(0xFF01), Props::READ | Props::NOTIFY, ReadValue::LastNotified)
                .characteristic(uuid16(0xFF02), Props::WRITE | Props::WRITE_WITHOUT_RESPONSE, ReadValue::Fixed(Vec::new()));
            let (gatt, mut events) = GattServer::serve(&adapter, &[service]).await.map_err(|e| e.to_string())?;
            let adv = bluer::adv::Advertisement {
                service_uuids: [uuid16(0xFF00)].into_iter().collect(),
                local_name: Some("hilbench-echo".into()),
                discoverable: Some(true),
                ..Default::default()
            };
            let adv = adapter.advertise(adv).await.map_err(|e| e.to_string())?;
            let serving = actix::spawn(async move {
                let _keep = (adv, session);
                while let Some(ev) = events.recv().await {
                    if let GattEvent::Write(w) = ev {
                        gatt.notify(uuid16(0xFF01), &answer(&w.value), w.mtu);
                        let _ = w.reply.send(Ok(()));
                    }
                }
            });
            Ok(Box::new(OnAir::new(self.name.clone(), address, air, Serving(serving))) as Box<dyn Running>)
        })
    }
}

/// The echo's own part: the task serving its GATT events.
struct Serving(tokio::task::JoinHandle<()>);

impl AirDevice for Serving {
    fn stop(self: Box<Self>) -> LocalBoxFuture<'static, ()> {
        self.0.abort();
        Box::pin(async {})
    }
}

static ECHO: EchoKind = EchoKind;

#[test]
fn a_second_gatt_kind_gets_the_ble_step_link_faults_and_att_capture() {
    hilbench::kind::register(&ECHO).unwrap();
    assert!(hilbench::kind::register(&ECHO).unwrap_err().contains("already exists"));
    let py = hilbench::python_with("bleak").unwrap_or_else(|e| panic!("{e}"));
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/py/bleak_echo.py");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("echo.yaml");
    // The first notification is cut to 4 bytes by a fault on the echo's link.
    let yaml = format!(
        "name: echo\ndevices:\n  - {{name: echo, kind: gatt-echo}}\nprocesses:\n  - name: central\n    command: {py}\n    args: [{script}, --address, '{{{{ble.echo}}}}']\n    timeout: 60s\nsteps:\n  - ble: {{device: echo, rssi: -40}}\n  - fault: {{link: echo, kind: truncate, keep: 4, direction: response, count: 1}}\n  - expect_exit: {{process: central, code: 0, within: 50s}}\n  - expect_output: {{process: central, contains: '\"notifications\": [\"48494849\", '}}\n",
        script = script.display()
    );
    std::fs::write(&file, yaml).unwrap();
    let captures = dir.path().join("captures");
    let scenario = Scenario::load(&file).unwrap();
    let report = run_file_blocking(scenario, file, RunOptions { capture_dir: Some(captures.clone()), ..Default::default() });
    assert!(report.passed, "{report:#?}");
    // The ATT capture of the echo's link holds the central's write of "hi".
    let pcaps: Vec<_> = walk(&captures);
    let echo = pcaps.iter().find(|p| p.to_string_lossy().contains("echo")).unwrap_or_else(|| panic!("no capture of `echo` in {pcaps:?}"));
    let bytes = std::fs::read(echo).unwrap();
    assert!(bytes.windows(2).any(|w| w == b"hi"), "the write of `hi` is in {}: {pcaps:?}", echo.display());
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().filter_map(|e| e.ok()) {
        let p = e.path();
        if p.is_dir() {
            files.extend(walk(&p));
        } else {
            files.push(p);
        }
    }
    files
}
