//! The air's own D-Bus broker: `busd` as a library, on a thread of its own
//! (busd runs on zruntime, one runtime per thread that calls `block_on`),
//! listening on a Unix socket in a private temporary directory. No policy
//! file: every peer may own names and call everyone, which is what a test
//! bus for one BlueZ and its clients needs.

use std::path::PathBuf;
use std::thread::JoinHandle;

use anyhow::{anyhow, Context, Result};
use futures::channel::oneshot;

pub struct Broker {
    address: String,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

impl Broker {
    /// Starts the broker and waits until it listens.
    pub fn start() -> Result<Broker> {
        let dir = tempfile::Builder::new().prefix("hilbench-air-").tempdir().context("creating the bus directory")?;
        let socket: PathBuf = dir.path().join("system_bus_socket");
        let listen = format!("unix:path={}", socket.display());
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<String>>();
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("air-broker".into())
            .spawn(move || {
                zruntime::block_on(async move {
                    let mut bus = match busd::bus::Bus::for_address(Some(&listen)).await {
                        Ok(b) => b,
                        Err(e) => {
                            let _ = ready_tx.send(Err(anyhow!("the D-Bus broker cannot listen on {listen}: {e:#}")));
                            return;
                        }
                    };
                    let _ = ready_tx.send(Ok(bus.address().to_string()));
                    {
                        let run = std::pin::pin!(bus.run());
                        // Either the owner asks us to stop (or goes away), or the bus fails.
                        if let futures::future::Either::Right((Err(e), _)) = futures::future::select(stop_rx, run).await {
                            tracing::error!("air broker stopped: {e:#}");
                        }
                    }
                    let _ = bus.cleanup().await;
                })
            })
            .context("spawning the broker thread")?;
        let address = ready_rx
            .recv()
            .map_err(|_| anyhow!("the D-Bus broker thread ended before it was ready"))??;
        Ok(Broker { address, stop: Some(stop_tx), thread: Some(thread), _dir: dir })
    }

    /// The address clients use (`unix:path=…`), for DBUS_SYSTEM_BUS_ADDRESS.
    pub fn address(&self) -> &str {
        &self.address
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
