//! A relay with a power meter, a cover motor and a three-phase energy meter,
//! as Shelly devices measure them. Pure: time moves only when the caller
//! passes it (`advance`), so scenarios are deterministic.
//!
//! Units are the firmware's: `apower` W, `voltage` V, `current` A, energy
//! `total` in Wh, `by_minute` in mWh for the last three whole minutes
//! (newest first), `minute_ts` the unix time the current minute began.
//! Counters change once a minute, as real devices report them.

use std::time::Duration;

/// Energy counted per minute.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct EnergyCounter {
    /// Wh up to the start of the current minute.
    pub total_wh: f64,
    /// mWh of the last three whole minutes, newest first.
    pub by_minute: [f64; 3],
    /// Unix time the current minute began.
    pub minute_ts: u64,
    /// mWh so far in the current minute (not reported until it ends).
    pending_mwh: f64,
}

impl EnergyCounter {
    pub fn new(total_wh: f64, unix: u64) -> EnergyCounter {
        EnergyCounter { total_wh, by_minute: [0.0; 3], minute_ts: unix - unix % 60, pending_mwh: 0.0 }
    }

    /// Adds `watts` for `dt` ending at `unix`; closes every minute passed.
    /// Returns whether a reported value changed.
    pub fn add(&mut self, watts: f64, dt: Duration, unix: u64) -> bool {
        self.pending_mwh += watts.max(0.0) * dt.as_secs_f64() / 3.6;
        let mut changed = false;
        while unix >= self.minute_ts + 60 {
            self.by_minute = [self.pending_mwh, self.by_minute[0], self.by_minute[1]];
            self.total_wh += self.pending_mwh / 1000.0;
            self.pending_mwh = 0.0;
            self.minute_ts += 60;
            changed = true;
        }
        changed
    }

    pub fn reset(&mut self) {
        self.total_wh = 0.0;
        self.by_minute = [0.0; 3];
        self.pending_mwh = 0.0;
    }
}

/// Why a protection tripped (the status's `errors`).
pub const OVERPOWER: &str = "overpower";
pub const OVERVOLTAGE: &str = "overvoltage";
pub const OVERCURRENT: &str = "overcurrent";

/// One switch channel: the relay, what is plugged into it, and its meter.
#[derive(Debug, Clone, PartialEq)]
pub struct RelayMeter {
    pub output: bool,
    /// What last switched it (`init`, `WS_in`, `HTTP_in`, `timer`, …).
    pub source: String,
    /// The load's draw while the relay is on.
    pub load_w: f64,
    pub voltage: f64,
    pub freq: f64,
    pub pf: f64,
    pub temperature_c: f64,
    pub energy: EnergyCounter,
    pub power_limit: f64,
    pub voltage_limit: f64,
    pub current_limit: f64,
    pub errors: Vec<&'static str>,
    /// A `toggle_after`: at this time, flip to this output.
    pub timer: Option<(Duration, bool)>,
    /// The running timer's length.
    pub timer_len: Duration,
}

impl RelayMeter {
    pub fn new(unix: u64) -> RelayMeter {
        RelayMeter {
            output: false,
            source: "init".into(),
            load_w: 0.0,
            voltage: 230.0,
            freq: 50.0,
            pf: 1.0,
            temperature_c: 45.0,
            energy: EnergyCounter::new(0.0, unix),
            power_limit: 4480.0,
            voltage_limit: 280.0,
            current_limit: 16.0,
            errors: Vec::new(),
            timer: None,
            timer_len: Duration::ZERO,
        }
    }

    pub fn apower(&self) -> f64 {
        if self.output {
            self.load_w
        } else {
            0.0
        }
    }

    pub fn current(&self) -> f64 {
        if self.voltage <= 0.0 || self.pf <= 0.0 {
            0.0
        } else {
            self.apower() / (self.voltage * self.pf)
        }
    }

    /// Switches; returns the output before. Turning on clears a tripped
    /// protection (it trips again at once if the cause remains).
    pub fn set(&mut self, on: bool, source: &str, toggle_after: Option<Duration>, now: Duration) -> bool {
        let was_on = self.output;
        self.output = on;
        self.source = source.to_string();
        if on {
            self.errors.clear();
        }
        self.timer = toggle_after.map(|d| (now + d, !on));
        self.timer_len = toggle_after.unwrap_or_default();
        self.protect();
        was_on
    }

    /// Trips the relay off when a limit is exceeded, as firmware does.
    pub fn protect(&mut self) {
        let mut tripped = Vec::new();
        if self.voltage > self.voltage_limit {
            tripped.push(OVERVOLTAGE);
        }
        if self.output && self.apower() > self.power_limit {
            tripped.push(OVERPOWER);
        }
        if self.output && self.current() > self.current_limit {
            tripped.push(OVERCURRENT);
        }
        if !tripped.is_empty() {
            self.output = false;
            self.timer = None;
            for t in tripped {
                if !self.errors.contains(&t) {
                    self.errors.push(t);
                }
            }
        }
    }

    /// Time passes from `now - dt` to `now` (unix at `now`). Returns
    /// whether the reported state changed.
    pub fn advance(&mut self, dt: Duration, now: Duration, unix: u64) -> bool {
        let mut changed = self.energy.add(self.apower(), dt, unix);
        if let Some((at, on)) = self.timer {
            if now >= at {
                self.set(on, "timer", None, now);
                changed = true;
            }
        }
        changed
    }

    pub fn next_wakeup(&self) -> Option<Duration> {
        self.timer.map(|(at, _)| at)
    }
}

/// A cover's motion state as firmware names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CoverState {
    Open,
    Closed,
    Opening,
    Closing,
    Stopped,
    Calibrating,
}

impl CoverState {
    pub fn name(self) -> &'static str {
        match self {
            CoverState::Open => "open",
            CoverState::Closed => "closed",
            CoverState::Opening => "opening",
            CoverState::Closing => "closing",
            CoverState::Stopped => "stopped",
            CoverState::Calibrating => "calibrating",
        }
    }
}

/// A roller shutter motor with position control.
#[derive(Debug, Clone, PartialEq)]
pub struct CoverModel {
    pub state: CoverState,
    pub source: String,
    /// 0 closed … 100 open, as a fraction for smooth motion.
    pub position: f64,
    pub target: Option<f64>,
    pub pos_control: bool,
    pub last_direction: Option<&'static str>,
    pub maxtime_open: f64,
    pub maxtime_close: f64,
    pub motor_w: f64,
    pub voltage: f64,
    pub freq: f64,
    pub temperature_c: f64,
    pub energy: EnergyCounter,
    pub move_started_at: Option<f64>,
    calibrate_left: u8,
}

impl CoverModel {
    pub fn new(unix: u64) -> CoverModel {
        CoverModel {
            state: CoverState::Stopped,
            source: "init".into(),
            position: 0.0,
            target: None,
            pos_control: true,
            last_direction: None,
            maxtime_open: 60.0,
            maxtime_close: 60.0,
            motor_w: 120.0,
            voltage: 230.0,
            freq: 50.0,
            temperature_c: 45.0,
            energy: EnergyCounter::new(0.0, unix),
            move_started_at: None,
            calibrate_left: 0,
        }
    }

    pub fn moving(&self) -> bool {
        matches!(self.state, CoverState::Opening | CoverState::Closing | CoverState::Calibrating)
    }

    pub fn apower(&self) -> f64 {
        if self.moving() {
            self.motor_w
        } else {
            0.0
        }
    }

    /// Moves toward `target` (0..=100); 100 is open, 0 closed.
    pub fn go_to(&mut self, target: f64, source: &str, unix: f64) {
        let target = target.clamp(0.0, 100.0);
        self.source = source.to_string();
        if (target - self.position).abs() < f64::EPSILON {
            self.state = self.rest_state();
            self.target = None;
            return;
        }
        let opening = target > self.position;
        self.state = if opening { CoverState::Opening } else { CoverState::Closing };
        self.last_direction = Some(if opening { "open" } else { "close" });
        self.target = Some(target);
        self.move_started_at = Some(unix);
    }

    pub fn stop(&mut self, source: &str) {
        self.source = source.to_string();
        self.target = None;
        self.calibrate_left = 0;
        self.state = CoverState::Stopped;
    }

    /// A calibration run: fully open, then fully closed.
    pub fn calibrate(&mut self, source: &str, unix: f64) {
        self.go_to(100.0, source, unix);
        self.state = CoverState::Calibrating;
        self.calibrate_left = 2;
    }

    fn rest_state(&self) -> CoverState {
        if self.position >= 100.0 {
            CoverState::Open
        } else if self.position <= 0.0 {
            CoverState::Closed
        } else {
            CoverState::Stopped
        }
    }

    /// Percent per second in the current direction.
    fn speed(&self, opening: bool) -> f64 {
        let t = if opening { self.maxtime_open } else { self.maxtime_close };
        100.0 / t.max(0.1)
    }

    pub fn advance(&mut self, dt: Duration, unix: u64) -> bool {
        let mut changed = self.energy.add(self.apower(), dt, unix);
        let Some(target) = self.target else { return changed };
        let opening = target > self.position;
        let step = self.speed(opening) * dt.as_secs_f64();
        self.position = if opening { (self.position + step).min(target) } else { (self.position - step).max(target) };
        changed = true;
        if (self.position - target).abs() < 1e-9 {
            self.target = None;
            if self.calibrate_left > 1 {
                self.calibrate_left -= 1;
                self.target = Some(0.0);
                self.last_direction = Some("close");
            } else {
                self.calibrate_left = 0;
                self.state = self.rest_state();
            }
        }
        changed
    }

    /// While moving, the position is reported each second.
    pub fn next_wakeup(&self, now: Duration) -> Option<Duration> {
        self.target.map(|_| now + Duration::from_secs(1))
    }
}

/// One phase of an energy meter.
#[derive(Debug, Clone, PartialEq)]
pub struct Phase {
    pub voltage: f64,
    pub current: f64,
    pub pf: f64,
    pub freq: f64,
    pub act_energy: EnergyCounter,
    pub ret_energy: EnergyCounter,
}

impl Phase {
    pub fn new(unix: u64) -> Phase {
        Phase { voltage: 230.0, current: 0.0, pf: 1.0, freq: 50.0, act_energy: EnergyCounter::new(0.0, unix), ret_energy: EnergyCounter::new(0.0, unix) }
    }

    /// Signed active power: negative when power flows back to the grid.
    pub fn act_power(&self) -> f64 {
        self.voltage * self.current * self.pf
    }

    pub fn aprt_power(&self) -> f64 {
        self.voltage * self.current
    }

    pub fn advance(&mut self, dt: Duration, unix: u64) -> bool {
        let p = self.act_power();
        let a = self.act_energy.add(p.max(0.0), dt, unix);
        let r = self.ret_energy.add((-p).max(0.0), dt, unix);
        a || r
    }
}
