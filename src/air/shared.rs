//! One air per process, for runs of many scenarios.
//!
//! libdbus (under bluer and btleplug) reads `DBUS_SYSTEM_BUS_ADDRESS` once per
//! process and keeps connecting there, so a second air on a new address would
//! be invisible to every BLE library in this process. The scenario runner
//! therefore starts one air on first use, exports its address, and gives each
//! scenario fresh peripheral adapters that it removes afterwards. The air runs
//! on a runtime thread of its own: scenarios each run in their own actix
//! System, and the air's tasks must outlive them.

use std::future::Future;
use std::sync::{Arc, OnceLock};

use super::{Air, AirConfig};

pub struct SharedAir {
    air: Arc<Air>,
    runtime: tokio::runtime::Handle,
}

impl SharedAir {
    /// The bus address (also exported as `DBUS_SYSTEM_BUS_ADDRESS`).
    pub fn address(&self) -> &str {
        self.air.address()
    }

    /// Runs `f` on the air's runtime (zbus and the air's tasks live there).
    pub async fn run<F, Fut, T>(&self, f: F) -> Result<T, String>
    where
        F: FnOnce(Arc<Air>) -> Fut + Send + 'static,
        Fut: Future<Output = T> + Send + 'static,
        T: Send + 'static,
    {
        self.runtime
            .spawn(f(self.air.clone()))
            .await
            .map_err(|e| format!("the virtual air's task failed: {e}"))
    }
}

static SHARED: OnceLock<Result<SharedAir, String>> = OnceLock::new();

/// The process's air, started on first use.
pub fn shared() -> Result<&'static SharedAir, String> {
    SHARED.get_or_init(start).as_ref().map_err(Clone::clone)
}

fn start() -> Result<SharedAir, String> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("hilbench-air".into())
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build() {
                Ok(r) => r,
                Err(e) => {
                    let _ = tx.send(Err(format!("cannot build the air's runtime: {e}")));
                    return;
                }
            };
            let handle = runtime.handle().clone();
            runtime.block_on(async move {
                match Air::start(AirConfig::default()).await {
                    Ok(air) => {
                        let _ = tx.send(Ok(SharedAir { air: Arc::new(air), runtime: handle }));
                        // Serve for the life of the process.
                        std::future::pending::<()>().await;
                    }
                    Err(e) => {
                        let _ = tx.send(Err(format!("the virtual air did not start: {e:#}")));
                    }
                }
            });
        })
        .map_err(|e| format!("cannot start the air's thread: {e}"))?;
    let shared = rx.recv().map_err(|_| "the air's thread ended before reporting".to_string())??;
    // Set once, before any BLE library in this process connects.
    std::env::set_var("DBUS_SYSTEM_BUS_ADDRESS", shared.address());
    Ok(shared)
}

/// A fresh peripheral adapter of the process's air for one device, with its
/// link's MTU and RSSI set. Give it back with [`return_adapter`].
pub async fn lend_adapter(mtu: u16, rssi: Option<i16>) -> Result<String, String> {
    let air = shared()?;
    let info = air.run(|air| async move { air.add_peripheral_adapter().await.map_err(|e| format!("{e:#}")) }).await??;
    let name = info.name.clone();
    let set = with_link(&name, move |l| async move {
        l.set_rssi(rssi);
        l.set_mtu(mtu).await
    })
    .await;
    if let Err(e) = set {
        return_adapter(&name).await;
        return Err(e);
    }
    Ok(name)
}

/// Removes a lent adapter, so later scans never see its device.
pub async fn return_adapter(adapter: &str) {
    if let Ok(air) = shared() {
        let adapter = adapter.to_string();
        let _ = air.run(move |air| async move { air.remove_peripheral_adapter(&adapter).await }).await;
    }
}

/// Runs `f` on the link of the device that holds `adapter`.
pub async fn with_link<F, Fut, T>(adapter: &str, f: F) -> Result<T, String>
where
    F: FnOnce(super::LinkControl) -> Fut + Send + 'static,
    Fut: Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    let air = shared()?;
    let adapter = adapter.to_string();
    air.run(move |air| async move {
        match air.link(&adapter) {
            Some(link) => Ok(f(link).await),
            None => Err(format!("the air has no link for {adapter}")),
        }
    })
    .await?
}
