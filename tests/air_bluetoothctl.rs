//! The air as Debian's `bluetoothctl` (bluez 5.66, the reference BlueZ
//! client) sees it, driven through a pseudo-terminal the way an engineer
//! types at a bench: 20 whole sessions against `hilbench sim jbd-bms`, none
//! may crash. bluetoothctl builds its controller list from the order of
//! GetManagedObjects, so that order is checked on its own too.
//!
//! Why a terminal: with stdin and stdout on pipes, bluetoothctl 5.66 prints
//! the prompt and command echoes but drops the output of asynchronous
//! replies (a `read`'s hex dump), so a pipe would hide exactly what is
//! being tested.
//!
//! What bluetoothctl 5.66 cannot show: it prints `Handle 0x0000` for every
//! remote service, characteristic and descriptor (it never reads the
//! property; bluez 5.78 fixed that), and `[CHG] … Value` only for the
//! selected attribute. So the handles are read over D-Bus here, and the
//! notification is watched through `acquire-notify`, which prints every
//! notification whatever is selected.

mod common;

use std::io::{Read, Write};
use std::os::unix::process::ExitStatusExt;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use common::start_sim;

const BMS: &str = "C0:DE:00:00:00:01";
const DEV: &str = "/org/bluez/hci0/dev_C0_DE_00_00_00_01";
/// JBD basic-info request (0x03) and cell-voltages request (0x04).
const BASIC_INFO: &str = "0xdd 0xa5 0x03 0x00 0xff 0xfd 0x77";
const CELLS: &str = "0xdd 0xa5 0x04 0x00 0xff 0xfc 0x77";
const T: Duration = Duration::from_secs(10);

fn have_bluetoothctl() -> bool {
    Command::new("bluetoothctl").arg("--version").output().is_ok_and(|o| o.status.success())
}

/// What bluetoothctl printed so far (escape sequences and carriage returns
/// removed), and whether its terminal closed.
#[derive(Default)]
struct Screen {
    text: String,
    closed: bool,
}

struct Bluetoothctl {
    child: Child,
    master: std::fs::File,
    screen: Arc<(Mutex<Screen>, Condvar)>,
    /// Where the next `expect` starts looking.
    cursor: usize,
}

fn strip_escapes(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len());
    let mut chars = raw.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\x1b' => {
                if chars.peek() == Some(&'[') {
                    chars.next();
                    // CSI: parameters and intermediates, then one final byte.
                    for c in chars.by_ref() {
                        if ('@'..='~').contains(&c) {
                            break;
                        }
                    }
                }
            }
            '\r' | '\x01' | '\x02' => {}
            _ => out.push(c),
        }
    }
    out
}

impl Bluetoothctl {
    fn start(bus: &str) -> Bluetoothctl {
        // Wide enough that readline never scrolls a long command sideways.
        let size = nix::pty::Winsize { ws_row: 50, ws_col: 1000, ws_xpixel: 0, ws_ypixel: 0 };
        let pty = nix::pty::openpty(Some(&size), None).expect("openpty");
        let slave = std::fs::File::from(pty.slave);
        let child = Command::new("bluetoothctl")
            .env("DBUS_SYSTEM_BUS_ADDRESS", bus)
            .env("TERM", "dumb")
            .stdin(Stdio::from(slave.try_clone().unwrap()))
            .stdout(Stdio::from(slave.try_clone().unwrap()))
            .stderr(Stdio::from(slave))
            .spawn()
            .expect("start bluetoothctl (Debian package bluez)");
        let master = std::fs::File::from(pty.master);
        let screen = Arc::new((Mutex::new(Screen::default()), Condvar::new()));
        let mut reader = master.try_clone().unwrap();
        let shared = screen.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            let mut pending = Vec::new();
            loop {
                // EIO once bluetoothctl exits and the slave side closes.
                let n = reader.read(&mut buf).unwrap_or(0);
                let (lock, changed) = &*shared;
                let mut s = lock.lock().unwrap();
                if n == 0 {
                    s.closed = true;
                    changed.notify_all();
                    return;
                }
                pending.extend_from_slice(&buf[..n]);
                // Keep an incomplete UTF-8 sequence for the next read.
                let valid = match std::str::from_utf8(&pending) {
                    Ok(v) => v.len(),
                    Err(e) => e.valid_up_to(),
                };
                let text = String::from_utf8_lossy(&pending[..valid]).to_string();
                pending.drain(..valid);
                s.text.push_str(&strip_escapes(&text));
                changed.notify_all();
            }
        });
        Bluetoothctl { child, master, screen, cursor: 0 }
    }

    /// The last lines printed (enough to see where a session stopped).
    fn transcript(&self) -> String {
        let text = &self.screen.0.lock().unwrap().text;
        let start = text.char_indices().rev().nth(4000).map_or(0, |(i, _)| i);
        text[start..].to_string()
    }

    /// Types `line` once bluetoothctl waits at its prompt (the screen ends
    /// with one), so the echo never lands in the middle of earlier output.
    fn send(&mut self, line: &str) -> Result<(), String> {
        let deadline = Instant::now() + T;
        let (lock, changed) = &*self.screen;
        let mut s = lock.lock().unwrap();
        while !s.text.ends_with("]# ") {
            let now = Instant::now();
            if s.closed || now >= deadline {
                return Err(format!("no prompt to type {line:?} at"));
            }
            s = changed.wait_timeout(s, deadline - now).unwrap().0;
        }
        self.cursor = s.text.len();
        drop(s);
        self.master.write_all(format!("{line}\n").as_bytes()).map_err(|e| e.to_string())
    }

    /// Waits until `needle` appears after the cursor; moves the cursor past it.
    fn expect(&mut self, needle: &str) -> Result<String, String> {
        let deadline = Instant::now() + T;
        let (lock, changed) = &*self.screen;
        let mut s = lock.lock().unwrap();
        loop {
            if let Some(at) = s.text[self.cursor..].find(needle) {
                let seen = s.text[self.cursor..self.cursor + at + needle.len()].to_string();
                self.cursor += at + needle.len();
                return Ok(seen);
            }
            let now = Instant::now();
            if s.closed || now >= deadline {
                let why = if s.closed { "bluetoothctl's terminal closed" } else { "timed out" };
                return Err(format!("{why} waiting for {needle:?}"));
            }
            s = changed.wait_timeout(s, deadline - now).unwrap().0;
        }
    }

    /// Sends `line`, waits for its echo and then for `needle`.
    fn run(&mut self, line: &str, needle: &str) -> Result<String, String> {
        self.send(line)?;
        self.expect(&format!("{line}\n"))?;
        self.expect(needle)
    }

    /// Sends `line` and returns everything printed until the next prompt.
    fn run_to_prompt(&mut self, line: &str) -> Result<String, String> {
        self.send(line)?;
        self.expect(&format!("{line}\n"))?;
        self.expect("]# ")
    }

    fn quit(mut self) -> Result<(), String> {
        let _ = self.send("quit");
        let deadline = Instant::now() + T;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                if let Some(sig) = status.signal() {
                    return Err(format!("bluetoothctl died of signal {sig}"));
                }
                return if status.success() { Ok(()) } else { Err(format!("bluetoothctl exited with {status}")) };
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                return Err("bluetoothctl did not quit".into());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Bluetoothctl {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Finds the BMS on the default controller. The device may still be in
/// the cache from the last session (then no scan is needed, and connect
/// must work on it); otherwise scan until it is heard.
fn find_bms(ctl: &mut Bluetoothctl) -> Result<(), String> {
    let listed = ctl.run_to_prompt("list")?;
    if !listed.contains("Controller C0:DE:C0:DE:00:00 hilbench-hci0 [default]") {
        return Err(format!("hci0 (the central) is not the default controller: {listed}"));
    }
    let shown = ctl.run_to_prompt("show")?;
    if !shown.contains("Roles: central") || !shown.contains("Powered: yes") {
        return Err(format!("show: {shown}"));
    }
    if ctl.run_to_prompt("devices")?.contains(&format!("Device {BMS} xiaoxiang BMS")) {
        return Ok(());
    }
    ctl.run("scan on", "Discovery started")?;
    let deadline = Instant::now() + T;
    while !ctl.run_to_prompt("devices")?.contains(&format!("Device {BMS} xiaoxiang BMS")) {
        if Instant::now() >= deadline {
            return Err("the BMS was not found by scanning".into());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    ctl.run("scan off", "Discovery stopped")?;
    Ok(())
}

fn session(bus: &str, remove_after: bool) -> Result<(), (String, String)> {
    let mut ctl = Bluetoothctl::start(bus);
    let steps = (|| -> Result<(), String> {
        ctl.expect("Agent registered")?;
        find_bms(&mut ctl)?;
        ctl.run(&format!("info {BMS}"), "Name: xiaoxiang BMS")?;
        ctl.run(&format!("connect {BMS}"), "Connection successful")?;
        ctl.run("menu gatt", "Menu gatt:")?;
        let attrs = ctl.run_to_prompt("list-attributes")?;
        for (path, uuid) in [
            ("/service000a", "0000ff00-"),
            ("/service000a/char000b", "0000ff01-"),
            ("/service000a/char000b/desc000d", "00002902-"),
            ("/service000a/char000e", "0000ff02-"),
        ] {
            if !attrs.contains(&format!("{DEV}{path}\n\t{uuid}")) {
                return Err(format!("list-attributes lacks {path} ({uuid}…): {attrs}"));
            }
        }
        let ff01 = format!("{DEV}/service000a/char000b");
        let ff02 = format!("{DEV}/service000a/char000e");
        // notify on/off on the selected characteristic.
        ctl.run(&format!("select-attribute {ff01}"), "char000b]# ")?;
        ctl.run("notify on", "Notify started")?;
        ctl.run("notify off", "Notify stopped")?;
        // Notifications through a socket, printed whatever is selected.
        ctl.run("acquire-notify", "AcquireNotify success")?;
        ctl.run(&format!("select-attribute {ff02}"), "char000e]# ")?;
        // Write without response (ff02 is write-without-response): the
        // basic-info answer comes back in notifications on ff01.
        ctl.run(&format!("write \"{BASIC_INFO}\""), &format!("[CHG] {ff01} Notification:"))?;
        ctl.expect("dd 03 00")?;
        // Write with response, as a request.
        ctl.run(&format!("write \"{BASIC_INFO}\" 0 request"), &format!("[CHG] {ff01} Notification:"))?;
        ctl.expect("dd 03 00")?;
        // Write through an acquired socket.
        ctl.run("acquire-write", "AcquireWrite success")?;
        ctl.run(&format!("write \"{CELLS}\""), &format!("[CHG] {ff01} Notification:"))?;
        ctl.expect("dd 04 00")?;
        ctl.run("release-write", "WriteAcquired: no")?;
        ctl.run(&format!("select-attribute {ff01}"), "char000b]# ")?;
        ctl.run("release-notify", "NotifyAcquired: no")?;
        // ff01 reads back the last bytes it notified: the cell answer's end.
        ctl.run("read", &format!("Attempting to read {ff01}"))?;
        ctl.expect(" 77 ")?;
        ctl.run("back", "Menu main:")?;
        ctl.run(&format!("disconnect {BMS}"), "Successful disconnected")?;
        if remove_after {
            ctl.run(&format!("remove {BMS}"), "Device has been removed")?;
        }
        Ok(())
    })();
    match steps {
        Ok(()) => ctl.quit().map_err(|e| (e, String::new())),
        Err(e) => {
            let transcript = ctl.transcript();
            let crashed = ctl.quit().err().unwrap_or_default();
            Err((format!("{e} {crashed}"), transcript))
        }
    }
}

/// `hilbench sim jbd-bms` on its own air; returns it and the air's bus address.
fn start_bms(dir: &std::path::Path) -> (common::Sim, String) {
    assert!(have_bluetoothctl(), "bluetoothctl is missing: ci/test.sh installs Debian's bluez package");
    let sim = start_sim(&["jbd-bms", "--name", "xiaoxiang BMS"], dir);
    let bus = sim.ready["dbus_system_bus_address"].as_str().unwrap().to_string();
    (sim, bus)
}

#[test]
fn twenty_bluetoothctl_sessions_against_the_simulated_bms() {
    let dir = tempfile::tempdir().unwrap();
    let (sim, bus) = start_bms(dir.path());
    let mut failed = Vec::new();
    let mut tried = 0;
    // Three failures say enough; each costs a timeout.
    while tried < 20 && failed.len() < 3 {
        // Every other session leaves the BMS in the cache, so the next
        // one connects to a cached device without scanning.
        if let Err((why, transcript)) = session(&bus, tried % 2 == 1) {
            failed.push(format!("session {tried}: {why}\n--- transcript ---\n{transcript}"));
        }
        tried += 1;
    }
    assert!(failed.is_empty(), "{} of {tried} sessions failed:\n{}", failed.len(), failed.join("\n"));
    assert_eq!(sim.stop(), 0);
}

/// Runs `dbus-send --print-reply` against the air's bus.
fn dbus_send(bus: &str, args: &[&str]) -> String {
    let out = Command::new("dbus-send")
        .arg(format!("--bus={bus}"))
        .args(["--print-reply", "--reply-timeout=5000", "--dest=org.bluez"])
        .args(args)
        .output()
        .expect("dbus-send (Debian package dbus-bin)");
    assert!(out.status.success(), "dbus-send {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// Each object path in a GetManagedObjects reply, with its interfaces, in the order sent.
fn objects_in_order(reply: &str) -> Vec<(String, Vec<String>)> {
    let mut objects: Vec<(String, Vec<String>)> = Vec::new();
    for line in reply.lines() {
        let t = line.trim();
        if let Some(p) = t.strip_prefix("object path \"") {
            objects.push((p.trim_end_matches('"').to_string(), Vec::new()));
        } else if let Some(s) = t.strip_prefix("string \"") {
            // An interface name: a dict key one level under an object (15 spaces deep in dbus-send's print).
            let name = s.trim_end_matches('"');
            let depth = line.len() - line.trim_start().len();
            if depth == 15 && (name.starts_with("org.bluez.") || name.starts_with("org.hilbench.")) {
                if let Some(last) = objects.last_mut() {
                    last.1.push(name.to_string());
                }
            }
        }
    }
    objects
}

#[test]
fn managed_objects_come_in_bluetoothds_order_every_time() {
    let dir = tempfile::tempdir().unwrap();
    let (sim, bus) = start_bms(dir.path());
    let get = || objects_in_order(&dbus_send(&bus, &["/", "org.freedesktop.DBus.ObjectManager.GetManagedObjects"]));
    let first = get();
    let paths: Vec<&str> = first.iter().map(|(p, _)| p.as_str()).collect();
    assert_eq!(&paths[..3], ["/org/bluez", "/org/bluez/hci0", "/org/bluez/hci1"], "{first:?}");
    for (path, ifaces) in &first[1..3] {
        assert_eq!(ifaces.first().map(String::as_str), Some("org.bluez.Adapter1"), "{path}: {ifaces:?}");
    }
    assert!(first[2].1.contains(&"org.bluez.LEAdvertisingManager1".to_string()), "{first:?}");
    for _ in 0..20 {
        assert_eq!(get(), first, "GetManagedObjects changed order between calls");
    }
    // Each GATT object carries the ATT handle in its name as its Handle
    // property (a characteristic's Handle is its value handle, as in BlueZ).
    let mut ctl = Bluetoothctl::start(&bus);
    {
        ctl.expect("Agent registered").unwrap();
        find_bms(&mut ctl).unwrap();
        ctl.run(&format!("connect {BMS}"), "Connection successful").unwrap();
        let connected = get();
        let gatt: Vec<&str> = connected.iter().map(|(p, _)| p.as_str()).filter(|p| p.starts_with(DEV) && p.len() > DEV.len()).collect();
        assert_eq!(
            gatt,
            [
                format!("{DEV}/service000a"),
                format!("{DEV}/service000a/char000b"),
                format!("{DEV}/service000a/char000b/desc000d"),
                format!("{DEV}/service000a/char000e"),
            ],
            "{connected:?}"
        );
        for (path, iface, handle) in [
            ("/service000a", "org.bluez.GattService1", 0x0a),
            ("/service000a/char000b", "org.bluez.GattCharacteristic1", 0x0c),
            ("/service000a/char000b/desc000d", "org.bluez.GattDescriptor1", 0x0d),
            ("/service000a/char000e", "org.bluez.GattCharacteristic1", 0x0f),
        ] {
            let reply = dbus_send(&bus, &[&format!("{DEV}{path}"), "org.freedesktop.DBus.Properties.Get", &format!("string:{iface}"), "string:Handle"]);
            assert!(reply.contains(&format!("uint16 {handle}")), "{path} Handle: {reply}");
        }
        ctl.run(&format!("disconnect {BMS}"), "Successful disconnected").unwrap();
        ctl.quit().unwrap();
    }
    assert_eq!(sim.stop(), 0);
}
