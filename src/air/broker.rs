//! The air's D-Bus broker, open to every local peer (one BlueZ and its
//! clients), always on an abstract Unix socket or a private temporary
//! directory, so nothing is left in the file system however the process
//! that owns the air ends (a test's shared air is never dropped).
//!
//! Three kinds:
//! - `in-process` (the default): hilbench's own bus (`air/bus.rs`) on the
//!   air's runtime. No broker process to wake on every hop of a GATT round
//!   trip, so it is the fastest, and it needs nothing installed.
//! - `dbus-daemon`: the reference implementation, spawned with a generated
//!   configuration, for comparing against or when a client misbehaves on
//!   ours.
//! - `busd`, in-process. busd cannot serve bleak: zbus's match-rule parser
//!   (which busd uses) types `arg0path` as an object path, so bleak's
//!   `arg0path='/org/bluez/'` (a namespace, valid per the D-Bus
//!   specification) is refused with InvalidArgs "Invalid object path", and
//!   its matching is exact rather than by prefix.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::thread::JoinHandle;

use anyhow::{anyhow, bail, Context, Result};
use futures::channel::oneshot;

/// Which broker carries the air's bus.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum BrokerKind {
    /// hilbench's own bus in the air's process (`air/bus.rs`): one hop less per message.
    #[default]
    InProcess,
    /// `dbus-daemon` (package dbus-daemon), spawned with a generated config.
    DbusDaemon,
    /// busd, in-process (no argNpath match rules: not for bleak).
    Busd,
}

pub enum Broker {
    InProcess(super::bus::InProcessBus),
    Daemon(DaemonBroker),
    Busd(BusdBroker),
}

impl Broker {
    pub fn start(kind: BrokerKind) -> Result<Broker> {
        match kind {
            BrokerKind::InProcess => super::bus::InProcessBus::start().map(Broker::InProcess),
            BrokerKind::DbusDaemon => DaemonBroker::start().map(Broker::Daemon),
            BrokerKind::Busd => BusdBroker::start().map(Broker::Busd),
        }
    }

    /// The address clients use (`unix:path=…`), for DBUS_SYSTEM_BUS_ADDRESS.
    pub fn address(&self) -> &str {
        match self {
            Broker::InProcess(b) => b.address(),
            Broker::Daemon(d) => &d.address,
            Broker::Busd(b) => &b.address,
        }
    }
}

/// `dbus-daemon --nofork --print-address` on a generated configuration.
pub struct DaemonBroker {
    address: String,
    child: Child,
}

/// The daemon's configuration: our socket, everyone allowed everything,
/// limits raised so a thousand peripherals fit on one bus.
fn daemon_config(socket: &str) -> String {
    format!(
        r#"<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-BUS Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <listen>unix:abstract={}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <allow own="*"/>
    <allow send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_requested_reply="true"/>
    <allow receive_type="method_call"/>
    <allow receive_type="signal"/>
    <allow receive_requested_reply="true"/>
  </policy>
  <limit name="max_connections_per_user">20000</limit>
  <limit name="max_completed_connections">20000</limit>
  <limit name="max_incomplete_connections">2000</limit>
  <limit name="max_match_rules_per_connection">100000</limit>
  <limit name="max_replies_per_connection">100000</limit>
  <limit name="max_names_per_connection">10000</limit>
  <limit name="reply_timeout">60000</limit>
</busconfig>
"#,
        socket
    )
}

impl DaemonBroker {
    pub fn start() -> Result<DaemonBroker> {
        // The configuration file is read once at start; the directory goes
        // when this function returns. Its unique name names the socket.
        let dir = tempfile::Builder::new().prefix("hilbench-air-").tempdir().context("creating the bus directory")?;
        let socket = dir.path().join("system_bus_socket").display().to_string();
        let config = dir.path().join("bus.conf");
        std::fs::write(&config, daemon_config(&socket)).context("writing the dbus-daemon configuration")?;
        let mut cmd = Command::new("dbus-daemon");
        cmd.arg(format!("--config-file={}", config.display()))
            .args(["--nofork", "--nopidfile", "--print-address=1", "--nosyslog"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = spawn_tied(cmd)
            .map_err(|e| anyhow!("cannot run dbus-daemon ({e}): install the dbus-daemon package, or use the busd broker"))?;
        if let Some(stderr) = child.stderr.take() {
            forward_daemon_stderr(stderr);
        }
        let stdout = child.stdout.take().context("dbus-daemon stdout")?;
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).context("reading dbus-daemon's address")?;
        let address = line.trim().to_string();
        if address.is_empty() {
            let status = child.wait().ok();
            bail!("dbus-daemon exited without printing its address ({status:?})");
        }
        Ok(DaemonBroker { address, child })
    }
}

/// Passes dbus-daemon's messages on to our log, except the one it prints
/// on every start as root without CAP_SYS_RESOURCE: it tries to raise its
/// descriptor limit to 65536 whatever the configuration asks, and a hard
/// limit below that makes it say "Failed to set fd limit" and go on with
/// the limit it has (ours, which the configuration's limits fit in).
fn forward_daemon_stderr(stderr: std::process::ChildStderr) {
    let _ = std::thread::Builder::new().name("dbus-daemon-stderr".into()).spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { return };
            if line.contains("Failed to set fd limit") {
                tracing::debug!("dbus-daemon: {line}");
            } else {
                tracing::warn!("dbus-daemon: {line}");
            }
        }
    });
}

type SpawnRequest = (Command, std::sync::mpsc::Sender<std::io::Result<Child>>);

/// Spawns `cmd` so that it dies with this process, even when the Air is
/// never dropped (a test's shared air, a crash): the child gets SIGTERM
/// when the thread that forked it ends (PR_SET_PDEATHSIG), and that thread
/// is one that lives as long as the process.
fn spawn_tied(cmd: Command) -> std::io::Result<Child> {
    static SPAWNER: std::sync::OnceLock<std::sync::Mutex<std::sync::mpsc::Sender<SpawnRequest>>> = std::sync::OnceLock::new();
    let tx = SPAWNER
        .get_or_init(|| {
            let (tx, rx) = std::sync::mpsc::channel::<SpawnRequest>();
            let _ = std::thread::Builder::new().name("air-spawner".into()).spawn(move || {
                for (mut cmd, reply) in rx {
                    use std::os::unix::process::CommandExt;
                    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
                    unsafe {
                        cmd.pre_exec(|| {
                            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                                return Err(std::io::Error::last_os_error());
                            }
                            Ok(())
                        });
                    }
                    let _ = reply.send(cmd.spawn());
                }
                // Keep the thread (and so the children) alive until the process ends.
                loop {
                    std::thread::park();
                }
            });
            std::sync::Mutex::new(tx)
        })
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let (reply_tx, reply_rx) = std::sync::mpsc::channel();
    tx.send((cmd, reply_tx)).map_err(|_| std::io::Error::other("the spawner thread is gone"))?;
    reply_rx.recv().map_err(|_| std::io::Error::other("the spawner thread is gone"))?
}

impl Drop for DaemonBroker {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let _ = self.child.wait();
    }
}

pub struct BusdBroker {
    address: String,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

impl BusdBroker {
    /// Starts busd and waits until it listens.
    pub fn start() -> Result<BusdBroker> {
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
        Ok(BusdBroker { address, stop: Some(stop_tx), thread: Some(thread), _dir: dir })
    }
}

impl Drop for BusdBroker {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
