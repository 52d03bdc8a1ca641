//! hilbench: a hardware-in-the-loop test bench. Simulated field devices that
//! production clients cannot tell from real ones, scripted link faults, and
//! client actors that validate real hardware.
//!
//! Layers, bottom up: `protocol` (sans-IO codecs) → `model` (physics) →
//! `device` / `client` (actors) → `link` (faults + capture) → `transport`
//! (PTY, serial, the RS-485 bus), driven by `scenario` and `cli`.

pub mod cli;
pub mod air;
pub mod client;
pub mod device;
pub mod fuzzing;
pub mod kind;
pub mod limits;
pub mod link;
pub mod model;
pub mod observe;
pub mod protocol;
pub mod sans_io;
pub mod scenario;
pub mod transport;

/// The Python that runs third-party clients in scenarios (`{{python}}`):
/// `$HILBENCH_PYTHON`, else the test venv under `target/venv`, else python3.
pub fn python_path() -> String {
    if let Ok(p) = std::env::var("HILBENCH_PYTHON") {
        return p;
    }
    let venv = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/venv/bin/python");
    if venv.exists() {
        return venv.display().to_string();
    }
    "python3".into()
}

/// [`python_path`] if that Python imports every module in `modules`
/// (`"pymodbus, serial"`), else what is missing and how to get it.
pub fn python_with(modules: &str) -> Result<String, String> {
    let py = python_path();
    let out = std::process::Command::new(&py).args(["-c", &format!("import {modules}")]).output();
    match out {
        Ok(o) if o.status.success() => Ok(py),
        Ok(o) => Err(format!(
            "`{py}` cannot import {modules}: run ci/test.sh once (it creates target/venv from ci/requirements.txt), \
             or set HILBENCH_PYTHON to a Python with `pip install -r ci/requirements.txt`; {}",
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Err(e) => Err(format!("cannot run `{py}`: {e}")),
    }
}
