//! Battery pack model: per-cell SoC and voltage, coulomb counting, cycles,
//! temperatures, protections/warnings with hysteresis, FETs, balancing and
//! the BMS uptime counter.
//!
//! Conventions: current in A with + = charging; voltages in V inside the model
//! and mV in [`PackSnapshot`]; temperatures in °C; SoC/SoH in %.
//!
//! Time only moves in [`PackModel::advance`]; it sub-steps internally (at most
//! 1 s per step) so a 1 h step trips protections at the same point as 3600
//! 1 s steps would. Scenario overrides go through [`PackModel::set`], which
//! validates them, so NaN/inf never enter the state.
//!
//! Overrides and their lifetime:
//! - `cellN_mv` / `cell_mv` pin the reported cell voltage. The cell's SoC
//!   keeps integrating underneath; the pin lasts until `unpin_cell` or until
//!   the scenario sets `soc` (a new SoC means "the cells are at this charge
//!   now", so the pinned voltages would contradict it).
//! - `temp_c` / `tempN_c` / `mos_temp_c` pin temperatures until they are set
//!   again or `unpin_temps`; unpinned temperatures relax towards
//!   `ambient_c` plus I²-heating (first order, exact exponential).

use std::collections::BTreeSet;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Longest internal integration step, s. Protections are evaluated after each.
const MAX_STEP_S: f64 = 1.0;
/// Cap on sub-steps per `advance` so an absurd dt (days, `Duration::MAX`)
/// costs bounded time; beyond a day the steps simply get longer.
const MAX_SUBSTEPS: f64 = 86_400.0;
/// MOSFET heating: steady-state rise per A² (100 A → +15 °C) and time constant.
const MOS_RISE_C_PER_A2: f64 = 0.0015;
const MOS_TAU_S: f64 = 300.0;
/// Cells heat far less and far slower than the FETs (100 A → +3 °C).
const CELL_RISE_C_PER_A2: f64 = 0.0003;
const CELL_TAU_S: f64 = 1800.0;
/// Thermal state is kept inside what a real NTC can read.
const TEMP_MIN_C: f64 = -40.0;
const TEMP_MAX_C: f64 = 120.0;
/// A requested discharge smaller than this counts as "no load" for the
/// short-circuit release.
const SC_IDLE_A: f64 = 0.5;
/// EG4 register 46 counts about 1.25 ticks per second (= 5/4).
const TICKS_PER_S_NUM: u128 = 5;
const TICKS_PER_S_DEN: u128 = 4;

/// Every key accepted by [`PackModel::set`], with a description and unit,
/// for the CLI's `--help`.
pub const STATE_KEYS: &[(&str, &str)] = &[
    ("soc", "state of charge, % (0..100); also releases all cell voltage pins"),
    ("soh", "state of health, % (1..100); usable capacity = capacity_ah × soh"),
    ("current_a", "requested pack current, A (-2000..2000, + = charging); 0 flows in a direction whose FET is open"),
    ("temp_c", "all NTC temperatures, °C (-40..120); pinned until set again or unpin_temps"),
    ("tempN_c", "NTC N temperature (N = 1..NTC count), °C (-40..120); pinned"),
    ("mos_temp_c", "MOSFET/PCB temperature, °C (-40..120); pinned"),
    ("ambient_c", "ambient temperature unpinned temperatures relax to, °C (-40..120)"),
    ("cell_mv", "voltage of every cell, mV (0..5000); pins all cells"),
    ("cellN_mv", "voltage of cell N (N = 1..cell count), mV (0..5000); pinned until unpin_cell or soc is set"),
    ("unpin_cell", "release cell voltage pins: 0 = all cells, N = cell N"),
    ("unpin_temps", "release all temperature pins (NTCs and MOS); value ignored"),
    ("cycles", "cycle count (0..1000000, rounded)"),
    ("capacity_ah", "nominal capacity, Ah (0.1..10000)"),
    ("charge_fet", "commanded charge FET: 0 = off, 1 = allowed (protections can still open it)"),
    ("discharge_fet", "commanded discharge FET: 0 = off, 1 = allowed (protections can still open it)"),
];

/// Errors from [`PackModel::new`] and [`PackModel::set`].
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ModelError {
    #[error("invalid pack config: {0}")]
    InvalidConfig(String),
    #[error("unknown state key `{key}`; valid keys: {valid}")]
    UnknownKey { key: String, valid: String },
    #[error(
        "`{key}`: index {index} is out of range, the pack has {count} {what} (valid 1..={count})"
    )]
    IndexOutOfRange {
        key: String,
        index: usize,
        count: usize,
        what: &'static str,
    },
    #[error("`{key}` = {value} is out of range (allowed {allowed})")]
    OutOfRange {
        key: String,
        value: f64,
        allowed: String,
    },
    #[error("`{key}` = {value} is not a finite number")]
    NotFinite { key: String, value: f64 },
}

/// Cell chemistry; selects the open-circuit-voltage curve.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Chemistry {
    #[default]
    Lfp,
    Nmc,
}

impl Chemistry {
    /// (SoC %, open-circuit cell V), strictly increasing in both columns.
    #[rustfmt::skip]
    fn ocv_table(self) -> &'static [(f64, f64)] {
        match self {
            // LFP: steep below 10 %, a long flat ~3.3 V plateau (why SoC can't
            // be read from voltage), then a sharp knee to the 3.65 V cut-off.
            Chemistry::Lfp => &[
                (0.0, 2.500), (2.0, 2.800), (5.0, 3.000), (10.0, 3.200), (15.0, 3.260),
                (20.0, 3.300), (30.0, 3.305), (40.0, 3.310), (50.0, 3.318), (60.0, 3.324),
                (70.0, 3.330), (80.0, 3.337), (90.0, 3.360), (95.0, 3.400), (98.0, 3.450),
                (99.0, 3.500), (100.0, 3.650),
            ],
            Chemistry::Nmc => &[
                (0.0, 3.000), (5.0, 3.300), (10.0, 3.450), (20.0, 3.550), (30.0, 3.620),
                (40.0, 3.670), (50.0, 3.720), (60.0, 3.780), (70.0, 3.850), (80.0, 3.930),
                (90.0, 4.030), (100.0, 4.200),
            ],
        }
    }

    /// Open-circuit cell voltage at `soc_pct` (clamped to 0..100), linear
    /// interpolation in the table.
    pub fn ocv_v(self, soc_pct: f64) -> f64 {
        let table = self.ocv_table();
        let s = if soc_pct.is_nan() {
            0.0
        } else {
            soc_pct.clamp(0.0, 100.0)
        };
        for w in table.windows(2) {
            let ((s0, v0), (s1, v1)) = (w[0], w[1]);
            if s <= s1 {
                return v0 + (v1 - v0) * (s - s0) / (s1 - s0);
            }
        }
        table[table.len() - 1].1
    }
}

/// A condition a pack can warn about or protect against. Names follow the EG4
/// register documentation; protocol layers map these to their own bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PackFault {
    CellOv,
    CellUv,
    PackOv,
    PackUv,
    ChargeOc,
    DischargeOc,
    /// Short circuit: protection only, latched (see [`Thresholds::short_circuit_release_s`]).
    DischargeSc,
    ChargeOt,
    ChargeUt,
    DischargeOt,
    DischargeUt,
    MosOt,
    /// SoC low: warning only.
    LowCapacity,
}

impl PackFault {
    #[rustfmt::skip]
    pub const ALL: [PackFault; 13] = [
        PackFault::CellOv, PackFault::CellUv, PackFault::PackOv, PackFault::PackUv,
        PackFault::ChargeOc, PackFault::DischargeOc, PackFault::DischargeSc,
        PackFault::ChargeOt, PackFault::ChargeUt, PackFault::DischargeOt,
        PackFault::DischargeUt, PackFault::MosOt, PackFault::LowCapacity,
    ];

    /// snake_case name, e.g. `cell_ov`, `charge_ot` (same as the serde form).
    pub fn name(self) -> &'static str {
        match self {
            PackFault::CellOv => "cell_ov",
            PackFault::CellUv => "cell_uv",
            PackFault::PackOv => "pack_ov",
            PackFault::PackUv => "pack_uv",
            PackFault::ChargeOc => "charge_oc",
            PackFault::DischargeOc => "discharge_oc",
            PackFault::DischargeSc => "discharge_sc",
            PackFault::ChargeOt => "charge_ot",
            PackFault::ChargeUt => "charge_ut",
            PackFault::DischargeOt => "discharge_ot",
            PackFault::DischargeUt => "discharge_ut",
            PackFault::MosOt => "mos_ot",
            PackFault::LowCapacity => "low_capacity",
        }
    }

    pub fn from_name(name: &str) -> Option<PackFault> {
        PackFault::ALL.into_iter().find(|f| f.name() == name)
    }

    /// As a protection, this opens the charge FET.
    pub fn opens_charge_fet(self) -> bool {
        use PackFault::*;
        matches!(
            self,
            CellOv | PackOv | ChargeOc | ChargeOt | ChargeUt | MosOt
        )
    }

    /// As a protection, this opens the discharge FET.
    pub fn opens_discharge_fet(self) -> bool {
        use PackFault::*;
        matches!(
            self,
            CellUv | PackUv | DischargeOc | DischargeSc | DischargeOt | DischargeUt | MosOt
        )
    }
}

/// Active warnings and protections.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct PackFlags {
    pub warnings: BTreeSet<PackFault>,
    pub protections: BTreeSet<PackFault>,
}

impl PackFlags {
    pub fn warning(&self, f: PackFault) -> bool {
        self.warnings.contains(&f)
    }
    pub fn protection(&self, f: PackFault) -> bool {
        self.protections.contains(&f)
    }
}

/// One hysteresis band. For an "over" condition it trips at `value >= trip`
/// and clears at `value < release` (release below trip); for an "under"
/// condition it trips at `value <= trip` and clears at `value > release`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Limit {
    pub trip: f64,
    pub release: f64,
}

const fn lim(trip: f64, release: f64) -> Limit {
    Limit { trip, release }
}

/// Warning and protection bands of one condition (warnings trip earlier and
/// never open a FET).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Level {
    pub warning: Limit,
    pub protection: Limit,
}

const fn lvl(warning: Limit, protection: Limit) -> Level {
    Level {
        warning,
        protection,
    }
}

/// Protection settings. Units: cell V; pack limits in V *per cell* (pack V /
/// cell count) so one default serves 4S..24S; currents as magnitudes in A;
/// °C; SoC %.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Thresholds {
    pub cell_ov: Level,
    pub cell_uv: Level,
    pub pack_ov: Level,
    pub pack_uv: Level,
    pub charge_oc: Level,
    pub discharge_oc: Level,
    /// Discharge current (A) that trips the short-circuit protection at once.
    pub short_circuit_a: f64,
    /// The short-circuit latch releases after the load has been gone
    /// (requested current back to ~0) for this long, s.
    pub short_circuit_release_s: f64,
    pub charge_ot: Level,
    pub charge_ut: Level,
    pub discharge_ot: Level,
    pub discharge_ut: Level,
    pub mos_ot: Level,
    /// Low-capacity warning band on SoC % (there is no protection).
    pub low_capacity: Limit,
    /// Balancing needs the highest cell at or above this, V ...
    pub balance_start_v: f64,
    /// ... and cells more than this above the lowest cell get bled, V.
    pub balance_delta_v: f64,
}

impl Default for Thresholds {
    fn default() -> Self {
        Thresholds::for_chemistry(Chemistry::Lfp)
    }
}

impl Thresholds {
    /// Typical BMS settings for a chemistry (LFP values are EG4/JBD-like).
    pub fn for_chemistry(chem: Chemistry) -> Thresholds {
        let (cell_ov, cell_uv, pack_ov, pack_uv, balance_start_v) = match chem {
            Chemistry::Lfp => (
                lvl(lim(3.60, 3.45), lim(3.65, 3.40)),
                lvl(lim(2.80, 3.00), lim(2.50, 2.90)),
                lvl(lim(3.55, 3.40), lim(3.60, 3.40)),
                lvl(lim(2.90, 3.10), lim(2.70, 3.00)),
                3.40,
            ),
            Chemistry::Nmc => (
                lvl(lim(4.22, 4.10), lim(4.25, 4.10)),
                lvl(lim(3.20, 3.40), lim(3.00, 3.30)),
                lvl(lim(4.20, 4.05), lim(4.22, 4.05)),
                lvl(lim(3.30, 3.45), lim(3.10, 3.35)),
                4.00,
            ),
        };
        Thresholds {
            cell_ov,
            cell_uv,
            pack_ov,
            pack_uv,
            charge_oc: lvl(lim(105.0, 100.0), lim(120.0, 100.0)),
            discharge_oc: lvl(lim(105.0, 100.0), lim(150.0, 100.0)),
            short_circuit_a: 500.0,
            short_circuit_release_s: 10.0,
            charge_ot: lvl(lim(50.0, 45.0), lim(55.0, 50.0)),
            charge_ut: lvl(lim(5.0, 8.0), lim(0.0, 5.0)),
            discharge_ot: lvl(lim(55.0, 50.0), lim(60.0, 55.0)),
            discharge_ut: lvl(lim(-10.0, -5.0), lim(-20.0, -15.0)),
            mos_ot: lvl(lim(80.0, 70.0), lim(90.0, 75.0)),
            low_capacity: lim(10.0, 15.0),
            balance_start_v,
            balance_delta_v: 0.030,
        }
    }

    fn validate(&self, chem: Chemistry) -> Result<(), ModelError> {
        use Side::{Over, Under};
        let levels = [
            ("cell_ov", Over, self.cell_ov),
            ("cell_uv", Under, self.cell_uv),
            ("pack_ov", Over, self.pack_ov),
            ("pack_uv", Under, self.pack_uv),
            ("charge_oc", Over, self.charge_oc),
            ("discharge_oc", Over, self.discharge_oc),
            ("charge_ot", Over, self.charge_ot),
            ("charge_ut", Under, self.charge_ut),
            ("discharge_ot", Over, self.discharge_ot),
            ("discharge_ut", Under, self.discharge_ut),
            ("mos_ot", Over, self.mos_ot),
        ];
        let bands = levels
            .iter()
            .flat_map(|&(name, side, l)| {
                [
                    (name, "warning", side, l.warning),
                    (name, "protection", side, l.protection),
                ]
            })
            .chain([("low_capacity", "warning", Under, self.low_capacity)]);
        for (name, kind, side, l) in bands {
            // A release on the wrong side of the trip would make the latch
            // flip every evaluation.
            let (ordered, need) = match side {
                Over => (l.release <= l.trip, "release <= trip"),
                Under => (l.release >= l.trip, "release >= trip"),
            };
            if !(l.trip.is_finite() && l.release.is_finite() && ordered) {
                return Err(ModelError::InvalidConfig(format!(
                    "thresholds.{name}.{kind}: trip {} / release {} (need finite values, {need})",
                    l.trip, l.release
                )));
            }
        }
        for (name, v) in [
            ("short_circuit_a", self.short_circuit_a),
            ("short_circuit_release_s", self.short_circuit_release_s),
            ("balance_start_v", self.balance_start_v),
            ("balance_delta_v", self.balance_delta_v),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(ModelError::InvalidConfig(format!(
                    "thresholds.{name} = {v} (need a finite value >= 0)"
                )));
            }
        }
        // Catches LFP thresholds left on an NMC pack: a full pack at rest
        // would sit in over-voltage protection forever.
        let full_v = chem.ocv_v(100.0);
        if self.cell_ov.protection.trip < full_v {
            return Err(ModelError::InvalidConfig(format!(
                "thresholds.cell_ov.protection.trip {} V is below the {chem:?} full-charge voltage {full_v} V; \
                 use Thresholds::for_chemistry", self.cell_ov.protection.trip)));
        }
        Ok(())
    }
}

/// Pack construction parameters. `Default` is a 16S 100 Ah LFP pack with 4
/// NTCs at 80 % SoC, 100 % SoH, 25 °C.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PackConfig {
    /// Cells in series, 4..=24.
    pub cells: usize,
    /// Temperature sensors, 1..=6.
    pub ntc: usize,
    /// Nominal capacity, Ah.
    pub capacity_ah: f64,
    pub chemistry: Chemistry,
    pub initial_soc_pct: f64,
    pub soh_pct: f64,
    pub cycles: u32,
    /// Ambient temperature; every temperature starts here, °C.
    pub ambient_c: f64,
    /// Internal resistance per cell, mΩ (terminal V = OCV + I·R).
    pub cell_resistance_mohm: f64,
    /// Total deterministic SoC spread between the cells, % (cells sit
    /// between −spread/2 and +spread/2 around the pack SoC).
    pub cell_spread_pct: f64,
    /// Bleed current of a balancing cell, A.
    pub balance_current_a: f64,
    /// Must suit `chemistry` (see [`Thresholds::for_chemistry`]).
    pub thresholds: Thresholds,
}

impl Default for PackConfig {
    fn default() -> Self {
        PackConfig {
            cells: 16,
            ntc: 4,
            capacity_ah: 100.0,
            chemistry: Chemistry::Lfp,
            initial_soc_pct: 80.0,
            soh_pct: 100.0,
            cycles: 0,
            ambient_c: 25.0,
            cell_resistance_mohm: 0.5,
            cell_spread_pct: 1.0,
            balance_current_a: 0.1,
            thresholds: Thresholds::default(),
        }
    }
}

impl PackConfig {
    fn validate(&self) -> Result<(), ModelError> {
        let bad = |what: String| Err(ModelError::InvalidConfig(what));
        if !(4..=24).contains(&self.cells) {
            return bad(format!("cells = {} (allowed 4..=24)", self.cells));
        }
        if !(1..=6).contains(&self.ntc) {
            return bad(format!("ntc = {} (allowed 1..=6)", self.ntc));
        }
        for (name, v, min, max) in [
            ("capacity_ah", self.capacity_ah, 0.1, 10_000.0),
            ("initial_soc_pct", self.initial_soc_pct, 0.0, 100.0),
            ("soh_pct", self.soh_pct, 1.0, 100.0),
            ("ambient_c", self.ambient_c, TEMP_MIN_C, TEMP_MAX_C),
            (
                "cell_resistance_mohm",
                self.cell_resistance_mohm,
                0.0,
                1000.0,
            ),
            ("cell_spread_pct", self.cell_spread_pct, 0.0, 20.0),
            ("balance_current_a", self.balance_current_a, 0.0, 10.0),
        ] {
            if !(v.is_finite() && (min..=max).contains(&v)) {
                return bad(format!("{name} = {v} (allowed {min}..={max})"));
            }
        }
        self.thresholds.validate(self.chemistry)
    }
}

/// Everything a protocol layer renders, in wire-friendly units. Integer
/// fields are rounded and saturated, never wrapped.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PackSnapshot {
    pub cells_mv: Vec<u16>,
    /// Sum of `cells_mv`, so clients that cross-check see a consistent pack.
    pub pack_mv: u32,
    /// Current actually flowing (0 in a direction whose FET is open), A.
    pub current_a: f64,
    /// Current the scenario asks for, A.
    pub requested_current_a: f64,
    pub soc_pct: f64,
    pub soh_pct: f64,
    pub remaining_ah: f64,
    /// Nominal capacity, Ah.
    pub capacity_ah: f64,
    /// capacity_ah × SoH, Ah.
    pub full_capacity_ah: f64,
    pub cycles: u32,
    pub temps_c: Vec<f64>,
    pub mos_temp_c: f64,
    pub ambient_c: f64,
    pub charge_fet: bool,
    pub discharge_fet: bool,
    /// Bit i set = cell i+1 is being bled.
    pub balancing: u32,
    pub warnings: Vec<&'static str>,
    pub protections: Vec<&'static str>,
    pub uptime_ticks: u16,
    pub uptime_s: f64,
}

/// The battery pack. See the module docs for conventions.
#[derive(Debug, Clone)]
pub struct PackModel {
    cfg: PackConfig,
    /// Pack SoC as the BMS coulomb counter reports it.
    soc_pct: f64,
    /// Each cell's SoC = pack SoC + offset; balancing lowers offsets.
    cell_offset_pct: Vec<f64>,
    cell_pin_v: Vec<Option<f64>>,
    requested_a: f64,
    soh_pct: f64,
    capacity_ah: f64,
    cycles: u32,
    /// Discharged Ah not yet counted as a whole cycle.
    discharged_ah: f64,
    ambient_c: f64,
    temps_c: Vec<f64>,
    temp_pinned: Vec<bool>,
    mos_temp_c: f64,
    mos_pinned: bool,
    /// What the scenario/BMS command allows (JBD MOS control).
    fet_cmd_charge: bool,
    fet_cmd_discharge: bool,
    /// Actual FET states: command AND no protection in that direction.
    charge_fet: bool,
    discharge_fet: bool,
    flags: PackFlags,
    /// How long the load has been gone while short-circuit is latched, s.
    sc_idle_s: f64,
    balancing: u32,
    /// Kept as a Duration (integer ns) so the tick counter is exact however
    /// the time was chopped into steps.
    uptime: Duration,
}

#[derive(Clone, Copy)]
enum Side {
    Over,
    Under,
}

/// Hysteresis latch: trip on `trip_value`, hold while `hold_value` has not
/// crossed back past the release level.
fn latch(
    set: &mut BTreeSet<PackFault>,
    f: PackFault,
    side: Side,
    trip_value: f64,
    hold_value: f64,
    l: Limit,
) {
    let beyond = |v: f64, x: f64| match side {
        Side::Over => v >= x,
        Side::Under => v <= x,
    };
    let on = if set.contains(&f) {
        beyond(hold_value, l.release)
    } else {
        beyond(trip_value, l.trip)
    };
    if on {
        set.insert(f);
    } else {
        set.remove(&f);
    }
}

fn min_max(v: &[f64]) -> (f64, f64) {
    v.iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &x| {
            (lo.min(x), hi.max(x))
        })
}

/// First-order relaxation of `t` towards `target`; the exact exponential
/// solution, so it is stable for any step length.
fn relax(t: &mut f64, target: f64, h: f64, tau: f64) {
    *t = (*t + (target - *t) * (1.0 - (-h / tau).exp())).clamp(TEMP_MIN_C, TEMP_MAX_C);
}

/// Round and saturate to u16 (NaN → 0). `as` already saturates; this makes
/// the rounding explicit.
fn sat_u16(x: f64) -> u16 {
    if x.is_nan() {
        0
    } else {
        x.round().clamp(0.0, u16::MAX as f64) as u16
    }
}

/// A parsed `set` key; indices are 1-based and not yet range-checked.
#[derive(Clone, Copy)]
#[rustfmt::skip]
enum Key {
    Soc, Soh, Current, TempAll, Temp(usize), Mos, Ambient, CellAll, Cell(usize),
    UnpinCell, UnpinTemps, Cycles, Capacity, ChargeFet, DischargeFet,
}

impl Key {
    fn parse(key: &str) -> Option<Key> {
        // `cell7_mv` → Some(7); a number too large for usize still parses (as
        // usize::MAX) so the caller reports "index out of range", not "unknown".
        fn indexed(key: &str, prefix: &str, suffix: &str) -> Option<usize> {
            let digits = key.strip_prefix(prefix)?.strip_suffix(suffix)?;
            if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            Some(digits.parse().unwrap_or(usize::MAX))
        }
        Some(match key {
            "soc" => Key::Soc,
            "soh" => Key::Soh,
            "current_a" => Key::Current,
            "temp_c" => Key::TempAll,
            "mos_temp_c" => Key::Mos,
            "ambient_c" => Key::Ambient,
            "cell_mv" => Key::CellAll,
            "unpin_cell" => Key::UnpinCell,
            "unpin_temps" => Key::UnpinTemps,
            "cycles" => Key::Cycles,
            "capacity_ah" => Key::Capacity,
            "charge_fet" => Key::ChargeFet,
            "discharge_fet" => Key::DischargeFet,
            _ => {
                if let Some(n) = indexed(key, "cell", "_mv") {
                    Key::Cell(n)
                } else {
                    Key::Temp(indexed(key, "temp", "_c")?)
                }
            }
        })
    }
}

fn in_range(key: &str, value: f64, min: f64, max: f64, unit: &str) -> Result<f64, ModelError> {
    if (min..=max).contains(&value) {
        Ok(value)
    } else {
        Err(ModelError::OutOfRange {
            key: key.into(),
            value,
            allowed: format!("{min}..={max}{unit}"),
        })
    }
}

fn as_bool(key: &str, value: f64) -> Result<bool, ModelError> {
    if value == 0.0 || value == 1.0 {
        Ok(value == 1.0)
    } else {
        let allowed = "0 (off) or 1 (on)".into();
        Err(ModelError::OutOfRange {
            key: key.into(),
            value,
            allowed,
        })
    }
}

impl PackModel {
    pub fn new(config: PackConfig) -> Result<PackModel, ModelError> {
        config.validate()?;
        let n = config.cells;
        // Deterministic spread: i·29 mod n is a permutation of 0..n for every
        // n ≤ 24 (29 is a prime above 24), so the offsets cover the full
        // spread, average to zero and are not sorted by cell index.
        let cell_offset_pct = (0..n)
            .map(|i| config.cell_spread_pct * (((i * 29 + 3) % n) as f64 / (n - 1) as f64 - 0.5))
            .collect();
        let mut m = PackModel {
            soc_pct: config.initial_soc_pct,
            cell_offset_pct,
            cell_pin_v: vec![None; n],
            requested_a: 0.0,
            soh_pct: config.soh_pct,
            capacity_ah: config.capacity_ah,
            cycles: config.cycles,
            discharged_ah: 0.0,
            ambient_c: config.ambient_c,
            temps_c: vec![config.ambient_c; config.ntc],
            temp_pinned: vec![false; config.ntc],
            mos_temp_c: config.ambient_c,
            mos_pinned: false,
            fet_cmd_charge: true,
            fet_cmd_discharge: true,
            charge_fet: true,
            discharge_fet: true,
            flags: PackFlags::default(),
            sc_idle_s: 0.0,
            balancing: 0,
            uptime: Duration::ZERO,
            cfg: config,
        };
        m.evaluate(0.0);
        Ok(m)
    }

    /// The construction config (later `set` changes are not written back).
    pub fn config(&self) -> &PackConfig {
        &self.cfg
    }
    pub fn cell_count(&self) -> usize {
        self.cfg.cells
    }
    pub fn ntc_count(&self) -> usize {
        self.cfg.ntc
    }
    /// Current actually flowing: the requested current, or 0 if the FET for
    /// that direction is open.
    pub fn current_a(&self) -> f64 {
        let i = self.requested_a;
        if (i > 0.0 && !self.charge_fet) || (i < 0.0 && !self.discharge_fet) {
            0.0
        } else {
            i
        }
    }
    pub fn requested_current_a(&self) -> f64 {
        self.requested_a
    }
    pub fn soc_pct(&self) -> f64 {
        self.soc_pct
    }
    pub fn soh_pct(&self) -> f64 {
        self.soh_pct
    }
    pub fn capacity_ah(&self) -> f64 {
        self.capacity_ah
    }
    /// Usable capacity: nominal × SoH.
    pub fn full_capacity_ah(&self) -> f64 {
        self.capacity_ah * self.soh_pct / 100.0
    }
    pub fn remaining_ah(&self) -> f64 {
        self.full_capacity_ah() * self.soc_pct / 100.0
    }
    pub fn cycles(&self) -> u32 {
        self.cycles
    }
    pub fn temps_c(&self) -> &[f64] {
        &self.temps_c
    }
    pub fn mos_temp_c(&self) -> f64 {
        self.mos_temp_c
    }
    pub fn ambient_c(&self) -> f64 {
        self.ambient_c
    }
    pub fn charge_fet(&self) -> bool {
        self.charge_fet
    }
    pub fn discharge_fet(&self) -> bool {
        self.discharge_fet
    }
    /// Commanded FET states (charge, discharge).
    pub fn fet_command(&self) -> (bool, bool) {
        (self.fet_cmd_charge, self.fet_cmd_discharge)
    }
    pub fn balancing(&self) -> u32 {
        self.balancing
    }
    pub fn flags(&self) -> PackFlags {
        self.flags.clone()
    }
    pub fn uptime_s(&self) -> f64 {
        self.uptime.as_secs_f64()
    }
    /// EG4 register 46: +1.25 per second, wrapping at 16 bits.
    pub fn uptime_ticks(&self) -> u16 {
        (self.uptime.as_nanos() * TICKS_PER_S_NUM / (TICKS_PER_S_DEN * 1_000_000_000) % 65_536)
            as u16
    }

    /// SoC of cell `i` (0-based), %.
    fn cell_soc_pct(&self, i: usize) -> f64 {
        (self.soc_pct + self.cell_offset_pct[i]).clamp(0.0, 100.0)
    }

    /// Terminal cell voltages, V: pinned value, or OCV + I·R (charging raises it).
    pub fn cell_voltages_v(&self) -> Vec<f64> {
        let ir = self.current_a() * self.cfg.cell_resistance_mohm / 1000.0;
        (0..self.cfg.cells)
            .map(|i| match self.cell_pin_v[i] {
                Some(v) => v,
                None => (self.cfg.chemistry.ocv_v(self.cell_soc_pct(i)) + ir).max(0.0),
            })
            .collect()
    }

    pub fn pack_voltage_v(&self) -> f64 {
        self.cell_voltages_v().iter().sum()
    }

    /// Scenario/BMS FET command (JBD MOS control). A commanded-off FET stays
    /// open regardless of protections; commanded-on FETs still obey them.
    pub fn set_fet_command(&mut self, charge: bool, discharge: bool) {
        self.fet_cmd_charge = charge;
        self.fet_cmd_discharge = discharge;
        self.evaluate(0.0);
    }

    /// Evolve the pack by `dt`. Never panics; any dt is fine (sub-steps of at
    /// most 1 s, up to 86 400 of them).
    pub fn advance(&mut self, dt: Duration) {
        self.uptime = self.uptime.saturating_add(dt);
        let total = dt.as_secs_f64();
        if total <= 0.0 {
            return;
        }
        let steps = (total / MAX_STEP_S).ceil().clamp(1.0, MAX_SUBSTEPS);
        let h = total / steps;
        for _ in 0..steps as u64 {
            self.step(h);
        }
    }

    fn step(&mut self, h: f64) {
        let i = self.current_a();
        let full_ah = self.full_capacity_ah();
        let dah = i * h / 3600.0;
        self.soc_pct = (self.soc_pct + dah / full_ah * 100.0).clamp(0.0, 100.0);

        // One cycle per full (usable) capacity discharged. The tiny epsilon
        // keeps 3600 × (100 Ah / 3600) from landing just short of a cycle.
        if dah < 0.0 {
            self.discharged_ah += -dah;
            let whole = (self.discharged_ah / full_ah + 1e-9).floor();
            if whole >= 1.0 {
                self.cycles = self.cycles.saturating_add(whole as u32);
                self.discharged_ah = (self.discharged_ah - whole * full_ah).max(0.0);
            }
        }

        // Balancing bleeds the marked cells; the shunt doesn't see it, so the
        // pack SoC is unaffected.
        if self.balancing != 0 {
            let d = self.cfg.balance_current_a * h / 3600.0 / full_ah * 100.0;
            for (c, off) in self.cell_offset_pct.iter_mut().enumerate() {
                if self.balancing & (1 << c) != 0 {
                    *off = (*off - d).max(-100.0);
                }
            }
        }

        let heat = i * i;
        if !self.mos_pinned {
            relax(
                &mut self.mos_temp_c,
                self.ambient_c + MOS_RISE_C_PER_A2 * heat,
                h,
                MOS_TAU_S,
            );
        }
        for (t, pinned) in self.temps_c.iter_mut().zip(&self.temp_pinned) {
            if !pinned {
                relax(t, self.ambient_c + CELL_RISE_C_PER_A2 * heat, h, CELL_TAU_S);
            }
        }

        self.evaluate(h);
    }

    /// Update warnings, protections, FETs and balancing from the present
    /// state; `h` is the time since the last evaluation (short-circuit timer).
    fn evaluate(&mut self, h: f64) {
        use PackFault::*;
        use Side::{Over, Under};
        let t = self.cfg.thresholds;
        let i_eff = self.current_a();
        let i_req = self.requested_a;
        let v = self.cell_voltages_v();
        let (vmin, vmax) = min_max(&v);
        let vavg = v.iter().sum::<f64>() / v.len() as f64;
        let (tmin, tmax) = min_max(&self.temps_c);

        let checks = [
            (CellOv, Over, vmax, t.cell_ov),
            (CellUv, Under, vmin, t.cell_uv),
            (PackOv, Over, vavg, t.pack_ov),
            (PackUv, Under, vavg, t.pack_uv),
            (ChargeOc, Over, i_eff, t.charge_oc),
            (DischargeOc, Over, -i_eff, t.discharge_oc),
            (ChargeOt, Over, tmax, t.charge_ot),
            (ChargeUt, Under, tmin, t.charge_ut),
            (DischargeOt, Over, tmax, t.discharge_ot),
            (DischargeUt, Under, tmin, t.discharge_ut),
            (MosOt, Over, self.mos_temp_c, t.mos_ot),
        ];
        for (f, side, value, level) in checks {
            latch(
                &mut self.flags.warnings,
                f,
                side,
                value,
                value,
                level.warning,
            );
            // An over-current protection opens its FET, after which the
            // measured current is 0 and would release it at once (chatter).
            // So it holds on the *requested* current: it releases when the
            // load/charger backs off, like a BMS with load-detect release.
            let hold = match f {
                ChargeOc => i_req,
                DischargeOc => -i_req,
                _ => value,
            };
            latch(
                &mut self.flags.protections,
                f,
                side,
                value,
                hold,
                level.protection,
            );
        }
        latch(
            &mut self.flags.warnings,
            LowCapacity,
            Under,
            self.soc_pct,
            self.soc_pct,
            t.low_capacity,
        );

        // Short circuit trips instantly and stays latched until the load is
        // gone and the release delay has passed with it gone.
        if self.flags.protections.contains(&DischargeSc) {
            self.sc_idle_s = if i_req >= -SC_IDLE_A {
                self.sc_idle_s + h
            } else {
                0.0
            };
            if self.sc_idle_s >= t.short_circuit_release_s {
                self.flags.protections.remove(&DischargeSc);
            }
        } else if -i_eff >= t.short_circuit_a {
            self.flags.protections.insert(DischargeSc);
            self.sc_idle_s = 0.0;
        }

        let p = &self.flags.protections;
        self.charge_fet = self.fet_cmd_charge && !p.iter().any(|f| f.opens_charge_fet());
        self.discharge_fet = self.fet_cmd_discharge && !p.iter().any(|f| f.opens_discharge_fet());

        // Balancing after the FET update: it needs charge current to flow.
        self.balancing = self.balance_mask();
    }

    fn balance_mask(&self) -> u32 {
        if self.current_a() <= 0.0 {
            return 0;
        }
        let t = &self.cfg.thresholds;
        let v = self.cell_voltages_v();
        let (vmin, vmax) = min_max(&v);
        if vmax < t.balance_start_v || vmax - vmin <= t.balance_delta_v {
            return 0;
        }
        v.iter()
            .enumerate()
            .filter(|(_, &x)| x > vmin + t.balance_delta_v)
            .fold(0, |m, (i, _)| m | 1 << i)
    }

    fn check_index(
        key: &str,
        index: usize,
        count: usize,
        what: &'static str,
    ) -> Result<usize, ModelError> {
        if (1..=count).contains(&index) {
            Ok(index - 1)
        } else {
            Err(ModelError::IndexOutOfRange {
                key: key.into(),
                index,
                count,
                what,
            })
        }
    }

    /// Apply a scenario override (keys and ranges in [`STATE_KEYS`]).
    /// Flags and FETs are re-evaluated at once, so the next snapshot shows
    /// the consequence without an `advance`.
    pub fn set(&mut self, key: &str, value: f64) -> Result<(), ModelError> {
        let valid = || {
            STATE_KEYS
                .iter()
                .map(|(k, _)| *k)
                .collect::<Vec<_>>()
                .join(", ")
        };
        let k = Key::parse(key).ok_or_else(|| ModelError::UnknownKey {
            key: key.into(),
            valid: valid(),
        })?;
        let (cells, ntc) = (self.cfg.cells, self.cfg.ntc);
        let index = match k {
            Key::Cell(n) => Self::check_index(key, n, cells, "cells")?,
            Key::Temp(n) => Self::check_index(key, n, ntc, "NTCs")?,
            _ => 0,
        };
        if !value.is_finite() {
            return Err(ModelError::NotFinite {
                key: key.into(),
                value,
            });
        }
        let temp = |v| in_range(key, v, TEMP_MIN_C, TEMP_MAX_C, " °C");
        match k {
            Key::Soc => {
                self.soc_pct = in_range(key, value, 0.0, 100.0, " %")?;
                self.cell_pin_v.fill(None);
            }
            Key::Soh => self.soh_pct = in_range(key, value, 1.0, 100.0, " %")?,
            Key::Current => self.requested_a = in_range(key, value, -2000.0, 2000.0, " A")?,
            Key::TempAll => {
                self.temps_c.fill(temp(value)?);
                self.temp_pinned.fill(true);
            }
            Key::Temp(_) => {
                self.temps_c[index] = temp(value)?;
                self.temp_pinned[index] = true;
            }
            Key::Mos => {
                self.mos_temp_c = temp(value)?;
                self.mos_pinned = true;
            }
            Key::Ambient => self.ambient_c = temp(value)?,
            Key::CellAll => self
                .cell_pin_v
                .fill(Some(in_range(key, value, 0.0, 5000.0, " mV")? / 1000.0)),
            Key::Cell(_) => {
                self.cell_pin_v[index] = Some(in_range(key, value, 0.0, 5000.0, " mV")? / 1000.0)
            }
            Key::UnpinCell => {
                if value.fract() != 0.0 || !(0.0..=cells as f64).contains(&value) {
                    let allowed = format!("0 (all cells) or a cell number 1..={cells}");
                    return Err(ModelError::OutOfRange {
                        key: key.into(),
                        value,
                        allowed,
                    });
                }
                match value as usize {
                    0 => self.cell_pin_v.fill(None),
                    n => self.cell_pin_v[n - 1] = None,
                }
            }
            Key::UnpinTemps => {
                self.temp_pinned.fill(false);
                self.mos_pinned = false;
            }
            Key::Cycles => {
                self.cycles = in_range(key, value, 0.0, 1_000_000.0, "")?.round() as u32;
                self.discharged_ah = 0.0;
            }
            Key::Capacity => self.capacity_ah = in_range(key, value, 0.1, 10_000.0, " Ah")?,
            Key::ChargeFet => self.fet_cmd_charge = as_bool(key, value)?,
            Key::DischargeFet => self.fet_cmd_discharge = as_bool(key, value)?,
        }
        self.evaluate(0.0);
        Ok(())
    }

    pub fn snapshot(&self) -> PackSnapshot {
        let cells_mv: Vec<u16> = self
            .cell_voltages_v()
            .iter()
            .map(|v| sat_u16(v * 1000.0))
            .collect();
        let names = |s: &BTreeSet<PackFault>| s.iter().map(|f| f.name()).collect();
        PackSnapshot {
            pack_mv: cells_mv.iter().map(|&c| u32::from(c)).sum(),
            cells_mv,
            current_a: self.current_a(),
            requested_current_a: self.requested_a,
            soc_pct: self.soc_pct,
            soh_pct: self.soh_pct,
            remaining_ah: self.remaining_ah(),
            capacity_ah: self.capacity_ah,
            full_capacity_ah: self.full_capacity_ah(),
            cycles: self.cycles,
            temps_c: self.temps_c.clone(),
            mos_temp_c: self.mos_temp_c,
            ambient_c: self.ambient_c,
            charge_fet: self.charge_fet,
            discharge_fet: self.discharge_fet,
            balancing: self.balancing,
            warnings: names(&self.flags.warnings),
            protections: names(&self.flags.protections),
            uptime_ticks: self.uptime_ticks(),
            uptime_s: self.uptime_s(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use PackFault::*;

    fn secs(s: f64) -> Duration {
        Duration::from_secs_f64(s)
    }

    fn pack() -> PackModel {
        PackModel::new(PackConfig::default()).unwrap()
    }

    /// Voltage protections out of the way, to test pure coulomb counting.
    fn relaxed() -> PackModel {
        let mut t = Thresholds::default();
        for l in [&mut t.cell_ov, &mut t.pack_ov] {
            *l = lvl(lim(10.0, 9.0), lim(10.0, 9.0));
        }
        for l in [&mut t.cell_uv, &mut t.pack_uv] {
            *l = lvl(lim(0.0, 0.1), lim(0.0, 0.1));
        }
        PackModel::new(PackConfig {
            thresholds: t,
            ..PackConfig::default()
        })
        .unwrap()
    }

    #[test]
    fn soc_integrates_and_clamps() {
        let mut m = relaxed();
        m.set("soc", 50.0).unwrap();
        m.set("current_a", 100.0).unwrap();
        m.advance(secs(1800.0));
        assert!((m.soc_pct() - 100.0).abs() < 1e-6, "{}", m.soc_pct());
        m.advance(secs(1800.0));
        assert_eq!(m.soc_pct(), 100.0);
        assert!((m.remaining_ah() - 100.0).abs() < 1e-9);
        m.set("current_a", -100.0).unwrap();
        m.advance(secs(900.0));
        assert!((m.soc_pct() - 75.0).abs() < 1e-6);
        m.advance(secs(7200.0));
        assert_eq!(m.soc_pct(), 0.0);
        // SoC counts against capacity × SoH: 50 Ah usable, 25 A for 1 h = 50 %.
        m.set("soh", 50.0).unwrap();
        m.set("current_a", 25.0).unwrap();
        m.advance(secs(3600.0));
        assert!((m.soc_pct() - 50.0).abs() < 1e-6);
        assert!((m.remaining_ah() - 25.0).abs() < 1e-6);
    }

    #[test]
    fn cycles_count_discharged_capacity() {
        let mut m = relaxed();
        m.set("cycles", 5.0).unwrap();
        m.set("soc", 100.0).unwrap();
        m.set("current_a", -100.0).unwrap();
        m.advance(secs(3600.0));
        assert_eq!(m.cycles(), 6);
        m.set("current_a", 100.0).unwrap(); // charging never counts
        m.advance(secs(3600.0));
        assert_eq!(m.cycles(), 6);
        m.set("current_a", -100.0).unwrap();
        m.advance(secs(1800.0));
        assert_eq!(m.cycles(), 6);
        m.advance(secs(1800.0));
        assert_eq!(m.cycles(), 7);
        assert_eq!(m.snapshot().cycles, 7);
    }

    #[test]
    fn ocv_is_monotonic_and_matches_lfp_anchors() {
        for chem in [Chemistry::Lfp, Chemistry::Nmc] {
            let table = chem.ocv_table();
            assert!(table.windows(2).all(|w| w[1].0 > w[0].0 && w[1].1 > w[0].1));
            let mut last = f64::NEG_INFINITY;
            for k in 0..=10_000 {
                let v = chem.ocv_v(k as f64 / 100.0);
                assert!(v >= last, "{chem:?} not monotonic at {k}");
                last = v;
            }
        }
        let ocv = |s| Chemistry::Lfp.ocv_v(s);
        assert_eq!(ocv(0.0), 2.5);
        assert_eq!(ocv(-5.0), 2.5);
        assert_eq!(ocv(10.0), 3.2);
        assert_eq!(ocv(95.0), 3.4);
        assert_eq!(ocv(100.0), 3.65);
        assert_eq!(ocv(150.0), 3.65);
        assert!((20..=80).all(|s| (3.30..=3.34).contains(&ocv(s as f64))));
    }

    #[test]
    fn voltage_reflects_ocv_and_ir() {
        let mut m = pack();
        m.set("cell_spread_pct", 0.0).unwrap_err(); // config only, not a state key
        let rest = m.pack_voltage_v();
        assert!((52.8..53.6).contains(&rest), "{rest}");
        m.set("current_a", 50.0).unwrap();
        // 16 cells × 50 A × 0.5 mΩ = +0.4 V while charging.
        assert!((m.pack_voltage_v() - rest - 0.4).abs() < 1e-9);
        let s = m.snapshot();
        assert_eq!(s.pack_mv, s.cells_mv.iter().map(|&c| c as u32).sum::<u32>());
    }

    #[test]
    fn cell_ov_trips_on_full_charge_and_releases_with_hysteresis() {
        let mut m = pack();
        m.set("soc", 95.0).unwrap();
        m.set("current_a", 50.0).unwrap();
        let mut t = 0;
        while !m.flags().protection(CellOv) {
            m.advance(secs(10.0));
            t += 10;
            assert!(t < 7200, "never tripped");
        }
        assert!(m.flags().warning(CellOv));
        assert!(!m.charge_fet() && m.discharge_fet());
        assert_eq!(m.current_a(), 0.0);
        assert_eq!(m.requested_current_a(), 50.0);
        let soc_at_trip = m.soc_pct();
        assert!((98.0..100.0).contains(&soc_at_trip), "{soc_at_trip}");
        m.advance(secs(600.0)); // charger still there: nothing flows, still tripped
        assert_eq!(m.soc_pct(), soc_at_trip);
        assert!(m.flags().protection(CellOv));

        m.set("current_a", -50.0).unwrap();
        m.advance(secs(60.0)); // below the trip, above the release: still latched
        assert!(m.flags().protection(CellOv));
        let mut t = 0;
        while m.flags().protection(CellOv) {
            m.advance(secs(10.0));
            t += 10;
            assert!(t < 3600, "never released");
        }
        let vmax = m.cell_voltages_v().into_iter().fold(0.0, f64::max);
        assert!(vmax < 3.40, "{vmax}");
        assert!(m.soc_pct() < 97.0);
        m.set("current_a", 50.0).unwrap();
        assert!(m.charge_fet());
        assert_eq!(m.current_a(), 50.0);
    }

    #[test]
    fn pinned_cell_trips_ov_and_uv() {
        let mut m = pack();
        m.set("cell3_mv", 3700.0).unwrap();
        let s = m.snapshot();
        assert_eq!(s.cells_mv[2], 3700);
        assert!(s.protections.contains(&"cell_ov") && !s.charge_fet && s.discharge_fet);
        m.advance(secs(60.0));
        assert_eq!(m.snapshot().cells_mv[2], 3700, "pin holds over time");
        m.set("cell3_mv", 3500.0).unwrap(); // inside the hysteresis band
        assert!(m.flags().protection(CellOv));
        m.set("cell3_mv", 3350.0).unwrap();
        assert!(!m.flags().protection(CellOv) && m.charge_fet());

        m.set("cell16_mv", 2400.0).unwrap();
        assert!(m.flags().protection(CellUv) && !m.discharge_fet() && m.charge_fet());
        m.set("unpin_cell", 16.0).unwrap();
        assert!(!m.flags().protection(CellUv) && m.discharge_fet());
        assert_eq!(m.snapshot().cells_mv[2], 3350, "other pins untouched");
        m.set("soc", 50.0).unwrap(); // setting SoC releases all pins
        assert_ne!(m.snapshot().cells_mv[2], 3350);

        m.set("cell_mv", 2000.0).unwrap();
        let f = m.flags();
        assert!(f.protection(CellUv) && f.protection(PackUv));
        assert_eq!(m.snapshot().pack_mv, 32_000);
        m.set("unpin_cell", 0.0).unwrap();
        assert!(m.flags().protections.is_empty());
    }

    #[test]
    fn over_temp_trips_and_clears() {
        let mut m = pack();
        m.set("temp2_c", 56.0).unwrap();
        let f = m.flags();
        assert!(f.protection(ChargeOt) && f.warning(ChargeOt) && f.warning(DischargeOt));
        assert!(!f.protection(DischargeOt));
        assert!(!m.charge_fet() && m.discharge_fet());
        m.set("temp2_c", 52.0).unwrap();
        assert!(m.flags().protection(ChargeOt), "hysteresis");
        m.set("temp2_c", 61.0).unwrap();
        assert!(m.flags().protection(DischargeOt) && !m.discharge_fet());
        m.set("current_a", -50.0).unwrap();
        m.advance(secs(600.0));
        assert_eq!(m.temps_c()[1], 61.0, "pinned temperature stays");
        assert_eq!(m.current_a(), 0.0);
        m.set("temp2_c", 49.0).unwrap();
        assert!(m.flags().protections.is_empty() && m.charge_fet() && m.discharge_fet());

        m.set("temp_c", -5.0).unwrap();
        assert!(m.flags().protection(ChargeUt) && !m.charge_fet() && m.discharge_fet());
        m.set("temp_c", 25.0).unwrap();
        m.set("mos_temp_c", 95.0).unwrap();
        assert!(m.flags().protection(MosOt) && !m.charge_fet() && !m.discharge_fet());
        m.set("unpin_temps", 1.0).unwrap();
        m.advance(secs(3600.0)); // cools towards ambient, releases below 75 °C
        assert!(!m.flags().protection(MosOt), "{}", m.mos_temp_c());
    }

    #[test]
    fn mos_heats_with_current_first_order() {
        let mut m = relaxed(); // 10 h at 100 A would otherwise end in cell UV
        m.set("current_a", -100.0).unwrap();
        m.advance(secs(300.0));
        let after_tau = m.mos_temp_c();
        // One time constant: 63 % of the way to 25 + 15 °C.
        assert!(
            (after_tau - (25.0 + 15.0 * (1.0 - (-1.0f64).exp()))).abs() < 1e-9,
            "{after_tau}"
        );
        m.advance(secs(36_000.0));
        assert!((m.mos_temp_c() - 40.0).abs() < 1e-6);
        assert!(m.temps_c().iter().all(|&t| (t - 28.0).abs() < 0.1));
        assert!(m.flags().protections.is_empty());
    }

    #[test]
    fn over_current_trips_and_releases_on_load() {
        let mut m = pack();
        m.set("current_a", 130.0).unwrap();
        assert!(m.flags().protection(ChargeOc) && !m.charge_fet());
        m.advance(secs(60.0));
        assert!(
            m.flags().protection(ChargeOc),
            "held while the charger pushes"
        );
        m.set("current_a", 90.0).unwrap();
        assert!(!m.flags().protection(ChargeOc) && m.current_a() == 90.0);
        m.set("current_a", -160.0).unwrap();
        assert!(m.flags().protection(DischargeOc) && !m.discharge_fet());
        m.set("current_a", -104.0).unwrap();
        assert!(m.flags().protection(DischargeOc), "hysteresis");
        m.set("current_a", -99.0).unwrap();
        assert!(m.flags().protections.is_empty() && m.current_a() == -99.0);
    }

    #[test]
    fn short_circuit_latches_until_idle_delay() {
        let mut m = pack();
        m.set("current_a", -600.0).unwrap();
        assert!(m.flags().protection(DischargeSc) && !m.discharge_fet());
        assert_eq!(m.current_a(), 0.0);
        m.advance(secs(60.0));
        assert!(m.flags().protection(DischargeSc));
        m.set("current_a", 0.0).unwrap();
        m.advance(secs(5.0));
        m.set("current_a", -10.0).unwrap(); // load back before the delay: timer restarts
        m.advance(secs(5.0));
        m.set("current_a", 0.0).unwrap();
        m.advance(secs(9.0));
        assert!(m.flags().protection(DischargeSc));
        m.advance(secs(1.5));
        assert!(!m.flags().protection(DischargeSc) && m.discharge_fet());
        m.set("current_a", -50.0).unwrap();
        assert_eq!(m.current_a(), -50.0);
    }

    #[test]
    fn commanded_fet_forces_current_to_zero() {
        let mut m = pack();
        m.set_fet_command(false, true);
        m.set("current_a", 30.0).unwrap();
        let soc = m.soc_pct();
        m.advance(secs(600.0));
        let s = m.snapshot();
        assert_eq!(
            (s.current_a, s.requested_current_a, s.charge_fet),
            (0.0, 30.0, false)
        );
        assert_eq!(m.soc_pct(), soc);
        assert!(s.protections.is_empty());
        m.set("current_a", -30.0).unwrap();
        assert_eq!(m.current_a(), -30.0);
        m.set("discharge_fet", 0.0).unwrap();
        assert_eq!(m.current_a(), 0.0);
        m.set("charge_fet", 1.0).unwrap();
        m.set("current_a", 30.0).unwrap();
        assert_eq!(m.current_a(), 30.0);
        assert_eq!(m.fet_command(), (true, false));
    }

    #[test]
    fn balancing_marks_high_cells_while_charging() {
        let mut m = pack();
        m.set("soc", 90.0).unwrap();
        m.set("cell4_mv", 3450.0).unwrap();
        assert_eq!(m.balancing(), 0, "idle: no balancing");
        m.set("current_a", 1.0).unwrap();
        assert_eq!(m.balancing(), 1 << 3);
        let off = m.cell_offset_pct[3];
        m.advance(secs(3600.0));
        // 0.1 A for 1 h out of 100 Ah bleeds 0.1 % from that cell only;
        // the pack counter sees only the 1 A charge.
        assert!((m.cell_offset_pct[3] - (off - 0.1)).abs() < 1e-9);
        assert!((m.soc_pct() - 91.0).abs() < 1e-9);
        m.set("current_a", -1.0).unwrap();
        assert_eq!(m.balancing(), 0, "discharging: no balancing");

        // Natural spread near the top of charge: the high cells balance.
        let mut m = pack();
        m.set("soc", 98.5).unwrap();
        m.set("current_a", 5.0).unwrap();
        let mask = m.balancing();
        assert!(mask != 0 && mask.count_ones() < 16, "{mask:#x}");
        let v = m.cell_voltages_v();
        let vmin = v.iter().cloned().fold(f64::INFINITY, f64::min);
        for (i, &x) in v.iter().enumerate() {
            assert_eq!(mask & (1 << i) != 0, x > vmin + 0.030);
        }
        // Mid-SoC plateau: spread is only millivolts, no balancing.
        m.set("soc", 60.0).unwrap();
        assert_eq!(m.balancing(), 0);
    }

    #[test]
    fn uptime_ticks_wrap_at_16_bits() {
        let mut m = pack();
        m.advance(secs(1.0));
        assert_eq!(m.uptime_ticks(), 1);
        m.advance(secs(3.0));
        assert_eq!(m.uptime_ticks(), 5);
        m.advance(secs(65_535.0 / 1.25 - 4.0)); // exactly 65535 ticks
        assert_eq!(m.uptime_ticks(), 65_535);
        m.advance(secs(0.8));
        assert_eq!(m.uptime_ticks(), 0);
        m.advance(secs(0.8));
        assert_eq!(m.uptime_ticks(), 1);
        assert!((m.uptime_s() - 52_429.6).abs() < 1e-6);
    }

    #[test]
    fn fine_and_coarse_steps_agree() {
        for current in [40.0, -40.0] {
            let mut fine = pack();
            let mut coarse = pack();
            for m in [&mut fine, &mut coarse] {
                m.set("soc", 50.0).unwrap();
                m.set("current_a", current).unwrap();
            }
            for _ in 0..10_000 {
                fine.advance(Duration::from_millis(1));
            }
            coarse.advance(Duration::from_secs(10));
            let (f, c) = (fine.snapshot(), coarse.snapshot());
            assert!((f.soc_pct - c.soc_pct).abs() < 1e-9);
            assert!((f.mos_temp_c - c.mos_temp_c).abs() < 1e-9);
            assert!((f.temps_c[0] - c.temps_c[0]).abs() < 1e-9);
            assert_eq!((f.cells_mv, f.uptime_ticks), (c.cells_mv, c.uptime_ticks));
            assert!((f.uptime_s - 10.0).abs() < 1e-9);
            assert!((f.soc_pct - 50.0 - current * 10.0 / 3600.0).abs() < 1e-9);
        }
        // One hour in one call trips the protection like 3600 one-second calls.
        let mut a = pack();
        let mut b = pack();
        for m in [&mut a, &mut b] {
            m.set("soc", 97.0).unwrap();
            m.set("current_a", 20.0).unwrap();
        }
        a.advance(secs(3600.0));
        for _ in 0..3600 {
            b.advance(secs(1.0));
        }
        assert!(a.flags().protection(CellOv) && b.flags().protection(CellOv));
        assert!((a.soc_pct() - b.soc_pct()).abs() < 1e-9);
        assert!(a.soc_pct() < 100.0);
    }

    #[test]
    fn extreme_steps_do_not_panic() {
        let mut m = pack();
        m.set("current_a", -2000.0).unwrap();
        m.advance(Duration::ZERO);
        m.advance(Duration::MAX);
        m.advance(Duration::MAX);
        let s = m.snapshot();
        assert!(s.soc_pct.is_finite() && s.mos_temp_c.is_finite() && s.uptime_s.is_finite());
        assert_eq!(sat_u16(70_000.0), u16::MAX);
        assert_eq!(sat_u16(-3.0), 0);
        assert_eq!(sat_u16(f64::NAN), 0);
    }

    #[test]
    fn low_capacity_warning_with_hysteresis() {
        let mut m = pack();
        m.set("soc", 9.0).unwrap();
        assert!(m.flags().warning(LowCapacity) && !m.flags().protection(LowCapacity));
        m.set("soc", 12.0).unwrap();
        assert!(m.flags().warning(LowCapacity));
        m.set("soc", 16.0).unwrap();
        assert!(!m.flags().warning(LowCapacity));
    }

    #[test]
    fn set_errors() {
        let mut m = pack();
        let e = m.set("voltage", 1.0).unwrap_err();
        assert!(matches!(e, ModelError::UnknownKey { .. }));
        let msg = e.to_string();
        assert!(
            msg.contains("`voltage`")
                && msg.contains("soc, soh, current_a")
                && msg.contains("cellN_mv"),
            "{msg}"
        );
        assert!(matches!(
            m.set("cellx_mv", 1.0),
            Err(ModelError::UnknownKey { .. })
        ));

        let e = m.set("cell17_mv", 3300.0).unwrap_err();
        assert!(matches!(
            e,
            ModelError::IndexOutOfRange {
                index: 17,
                count: 16,
                ..
            }
        ));
        assert!(e.to_string().contains("the pack has 16 cells"), "{e}");
        assert!(matches!(
            m.set("cell0_mv", 3300.0),
            Err(ModelError::IndexOutOfRange { index: 0, .. })
        ));
        let e = m.set("temp5_c", 20.0).unwrap_err();
        assert!(e.to_string().contains("the pack has 4 NTCs"), "{e}");
        assert!(m.set("cell99999999999999999999999_mv", 1.0).is_err());

        let e = m.set("soc", 150.0).unwrap_err();
        assert_eq!(
            e.to_string(),
            "`soc` = 150 is out of range (allowed 0..=100 %)"
        );
        for (k, v) in [
            ("cell1_mv", 5001.0),
            ("temp_c", -41.0),
            ("mos_temp_c", 121.0),
            ("soh", 0.0),
            ("capacity_ah", 0.0),
            ("charge_fet", 0.5),
            ("cycles", -1.0),
            ("unpin_cell", 17.0),
            ("unpin_cell", 1.5),
        ] {
            assert!(
                matches!(m.set(k, v), Err(ModelError::OutOfRange { .. })),
                "{k} {v}"
            );
        }
        for v in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            let e = m.set("current_a", v).unwrap_err();
            assert!(matches!(e, ModelError::NotFinite { .. }));
            assert!(e.to_string().contains("current_a"));
        }
        // Nothing above changed the pack.
        let s = m.snapshot();
        assert_eq!(
            (s.soc_pct, s.requested_current_a, s.charge_fet),
            (80.0, 0.0, true)
        );
        assert!(s.protections.is_empty() && s.warnings.is_empty());
    }

    #[test]
    fn config_validation() {
        let bad = |c: PackConfig| PackModel::new(c).unwrap_err().to_string();
        assert!(bad(PackConfig {
            cells: 3,
            ..Default::default()
        })
        .contains("cells = 3"));
        assert!(bad(PackConfig {
            cells: 25,
            ..Default::default()
        })
        .contains("4..=24"));
        assert!(bad(PackConfig {
            ntc: 0,
            ..Default::default()
        })
        .contains("ntc"));
        assert!(bad(PackConfig {
            ntc: 7,
            ..Default::default()
        })
        .contains("ntc"));
        assert!(bad(PackConfig {
            capacity_ah: f64::NAN,
            ..Default::default()
        })
        .contains("capacity_ah"));
        assert!(bad(PackConfig {
            chemistry: Chemistry::Nmc,
            ..Default::default()
        })
        .contains("for_chemistry"));
        let mut t = Thresholds::default();
        t.cell_ov.warning.release = 3.7;
        assert!(bad(PackConfig {
            thresholds: t,
            ..Default::default()
        })
        .contains("cell_ov.warning"));
        for cells in 4..=24 {
            let m = PackModel::new(PackConfig {
                cells,
                ntc: 6,
                ..Default::default()
            })
            .unwrap();
            let s = m.snapshot();
            assert_eq!((s.cells_mv.len(), s.temps_c.len()), (cells, 6));
            assert!(
                s.protections.is_empty() && s.warnings.is_empty(),
                "{cells}S: {s:?}"
            );
        }
        let nmc = PackConfig {
            chemistry: Chemistry::Nmc,
            thresholds: Thresholds::for_chemistry(Chemistry::Nmc),
            ..Default::default()
        };
        assert!(PackModel::new(nmc).unwrap().flags().protections.is_empty());
    }

    #[test]
    fn names_serde_and_snapshot_json() {
        for f in PackFault::ALL {
            assert_eq!(serde_json::to_value(f).unwrap(), f.name());
            assert_eq!(PackFault::from_name(f.name()), Some(f));
        }
        let mut m = pack();
        m.set("cell2_mv", 3700.0).unwrap();
        let j = serde_json::to_value(m.snapshot()).unwrap();
        assert_eq!(j["protections"], serde_json::json!(["cell_ov"]));
        assert_eq!(j["cells_mv"][1], 3700);
        let cfg: PackConfig = serde_json::from_str(r#"{"cells": 8, "capacity_ah": 280}"#).unwrap();
        assert_eq!((cfg.cells, cfg.ntc, cfg.capacity_ah), (8, 4, 280.0));
        assert!(serde_json::from_str::<PackConfig>(r#"{"cels": 8}"#).is_err());
        assert_eq!(STATE_KEYS.len(), 15);
    }
}
