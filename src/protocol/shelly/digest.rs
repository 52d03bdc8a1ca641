//! Shelly's digest authentication (SHA-256), sans-IO: the device's side,
//! given the time. Facts from `../shared/reference/shelly.md`:
//!
//! * ha1 = SHA256("admin:" realm ":" password), realm = `auth_domain` or
//!   the device id; over RPC ha2 = SHA256("dummy_method:dummy_uri"), over
//!   HTTP ha2 = SHA256(method ":" uri) as RFC 7616 has it; response =
//!   SHA256(ha1 ":" nonce ":" nc ":" cnonce ":auth:" ha2), with numbers
//!   written in decimal (aioshelly hashes its integers that way).
//! * Firmware 1.x ([`AuthMode::V1`]): the nonce is a unix time, valid for
//!   an hour; nc is hashed, never enforced.
//! * Firmware 2.0 ([`AuthMode::V2`]): opaque base64 nonces (with `=`
//!   padding) valid an hour and 30,000 uses, in 32 slots; per nonce the
//!   first nc is 1 and each later one must be larger; an expired or unknown
//!   nonce gets a challenge with `stale: true`. With every slot live, asking
//!   for a nonce starts a 2 s throttle during which challenges are 429s;
//!   after it the oldest slot is reused.
//!
//! Choices where the reference is silent: a repeated or smaller nc gets a
//! plain (not stale) challenge; an RPC `auth` without `nc` counts as nc 1
//! (aioshelly's older `get_auth` sends none and hashes 1); a 1.x nonce from
//! the future is refused like an old one.

use std::time::Duration;

use base64::Engine;
use rand::RngCore;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde_json::Value;

use crate::protocol::lower_hex;
use crate::protocol::mcuboot::sha256;

/// The only user firmware knows.
pub const USERNAME: &str = "admin";
pub const NONCE_LIFETIME: Duration = Duration::from_secs(3600);
pub const NONCE_MAX_USES: u32 = 30_000;
pub const NONCE_SLOTS: usize = 32;
pub const THROTTLE: Duration = Duration::from_secs(2);

/// Which firmware's nonce rules apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AuthMode {
    /// Firmware 1.x: unix-time nonces, nc not enforced.
    V1,
    /// Firmware 2.0: opaque nonces, nc tracked, 32 slots, 429 throttle.
    V2,
}

impl std::str::FromStr for AuthMode {
    type Err = String;
    fn from_str(s: &str) -> Result<AuthMode, String> {
        match s {
            "1.x" | "1" => Ok(AuthMode::V1),
            "2.0" | "2" => Ok(AuthMode::V2),
            _ => Err(format!("unknown auth mode `{s}` (known: 1.x, 2.0)")),
        }
    }
}

fn sha256_hex(s: &str) -> String {
    lower_hex(&sha256(s.as_bytes()))
}

/// ha1 for the fixed user.
pub fn ha1(realm: &str, password: &str) -> String {
    sha256_hex(&format!("{USERNAME}:{realm}:{password}"))
}

/// ha2 as the RPC `auth` object hashes it.
pub fn rpc_ha2() -> String {
    sha256_hex("dummy_method:dummy_uri")
}

/// The `response` a client computes.
pub fn response(ha1: &str, nonce: &str, nc: &str, cnonce: &str, ha2: &str) -> String {
    sha256_hex(&format!("{ha1}:{nonce}:{nc}:{cnonce}:auth:{ha2}"))
}

/// A number or a string as it goes into the hash (aioshelly formats its
/// integers with `str()`).
fn hash_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// A nonce as the device hands it out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Nonce {
    /// 1.x: a unix time.
    Time(u64),
    /// 2.0: opaque base64.
    Opaque(String),
}

impl Nonce {
    fn json(&self) -> Value {
        match self {
            Nonce::Time(t) => Value::from(*t),
            Nonce::Opaque(s) => Value::from(s.as_str()),
        }
    }

    fn text(&self) -> String {
        match self {
            Nonce::Time(t) => t.to_string(),
            Nonce::Opaque(s) => s.clone(),
        }
    }
}

/// What a 401 carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Challenge {
    pub nonce: Nonce,
    pub realm: String,
    pub stale: bool,
}

impl Challenge {
    /// The 401 error message over RPC: a JSON string, written with the
    /// spaces firmware puts after `:` and `,`.
    pub fn to_message(&self) -> String {
        let nonce = self.nonce.json().to_string();
        let realm = Value::from(self.realm.as_str()).to_string();
        let stale = if self.stale { ", \"stale\": true" } else { "" };
        format!("{{\"auth_type\": \"digest\", \"nonce\": {nonce}, \"nc\": 1, \"realm\": {realm}, \"algorithm\": \"SHA-256\"{stale}}}")
    }

    /// The HTTP `WWW-Authenticate` value.
    pub fn to_www_authenticate(&self) -> String {
        let stale = if self.stale { ", stale=true" } else { "" };
        format!("Digest qop=\"auth\", realm=\"{}\", nonce=\"{}\", algorithm=SHA-256{stale}", self.realm, self.nonce.text())
    }
}

/// Why a call is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthFailure {
    /// 401 with this challenge.
    Challenge(Challenge),
    /// 429: no nonce can be handed out now.
    Throttled,
}

/// A digest answer, from an RPC `auth` object or an HTTP header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DigestAnswer {
    pub username: String,
    pub nonce: String,
    pub nc: String,
    pub cnonce: String,
    pub response: String,
    pub ha2: String,
}

impl DigestAnswer {
    /// From an RPC frame's `auth` object; `None` when a field is missing
    /// or of the wrong type.
    pub fn from_rpc(auth: &Value) -> Option<DigestAnswer> {
        let text = |k: &str| auth.get(k).and_then(hash_text);
        Some(DigestAnswer {
            username: text("username")?,
            nonce: text("nonce")?,
            nc: auth.get("nc").map_or(Some("1".to_string()), hash_text)?,
            cnonce: text("cnonce")?,
            response: text("response")?,
            ha2: rpc_ha2(),
        })
    }

    /// From an HTTP `Authorization: Digest …` header for `method` on `uri`;
    /// `None` when it is not a digest answer with every field.
    pub fn from_http(header: &str, method: &str) -> Option<DigestAnswer> {
        let rest = header.trim().strip_prefix("Digest")?;
        let fields = parse_auth_params(rest);
        let get = |k: &str| fields.iter().find(|(n, _)| n.eq_ignore_ascii_case(k)).map(|(_, v)| v.clone());
        if get("algorithm").is_some_and(|a| !a.eq_ignore_ascii_case("SHA-256")) {
            return None;
        }
        let uri = get("uri")?;
        Some(DigestAnswer {
            username: get("username")?,
            nonce: get("nonce")?,
            nc: get("nc")?,
            cnonce: get("cnonce")?,
            response: get("response")?,
            ha2: sha256_hex(&format!("{method}:{uri}")),
        })
    }
}

/// `k=v, k="v, with comma", …` as RFC 7235 auth-params; never panics.
fn parse_auth_params(s: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace() || *c == ',') {
            chars.next();
        }
        let name: String = std::iter::from_fn(|| chars.next_if(|c| *c != '=' && *c != ',')).collect();
        if chars.next() != Some('=') {
            return out;
        }
        let mut value = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            while let Some(c) = chars.next() {
                match c {
                    '"' => break,
                    '\\' => value.extend(chars.next()),
                    c => value.push(c),
                }
            }
        } else {
            value.extend(std::iter::from_fn(|| chars.next_if(|c| *c != ',')));
        }
        out.push((name.trim().to_string(), value.trim().to_string()));
    }
}

#[derive(Debug, Clone)]
struct NonceSlot {
    nonce: String,
    issued: Duration,
    uses: u32,
    last_nc: u64,
}

/// A device's digest state: its realm and password hash, and (2.0) the
/// nonces it handed out.
#[derive(Debug, Clone)]
pub struct DigestAuth {
    mode: AuthMode,
    realm: String,
    ha1: String,
    /// The unix time at `now` zero (1.x nonces are unix times).
    unix_at_zero: u64,
    slots: Vec<NonceSlot>,
    throttle_until: Option<Duration>,
    rng: ChaCha8Rng,
    /// How long a nonce is good for ([`NONCE_LIFETIME`] on firmware).
    lifetime: Duration,
}

impl DigestAuth {
    pub fn new(mode: AuthMode, realm: &str, password: &str, unix_at_zero: u64, seed: u64) -> DigestAuth {
        DigestAuth {
            mode,
            realm: realm.to_string(),
            ha1: ha1(realm, password),
            unix_at_zero,
            slots: Vec::new(),
            throttle_until: None,
            rng: ChaCha8Rng::seed_from_u64(seed),
            lifetime: NONCE_LIFETIME,
        }
    }

    /// Nonces good for `lifetime` instead of firmware's hour, so a scenario
    /// can see one go stale (whole seconds for 1.x's time nonces).
    pub fn with_nonce_lifetime(mut self, lifetime: Duration) -> DigestAuth {
        self.lifetime = lifetime;
        self
    }

    /// The password as `Shelly.SetAuth` sends it: its ha1, in hex.
    pub fn set_ha1(&mut self, ha1: &str) {
        self.ha1 = ha1.to_ascii_lowercase();
    }

    pub fn mode(&self) -> AuthMode {
        self.mode
    }

    pub fn realm(&self) -> &str {
        &self.realm
    }

    /// A reboot: every nonce handed out is gone.
    pub fn forget_nonces(&mut self) {
        self.slots.clear();
        self.throttle_until = None;
    }

    fn unix(&self, now: Duration) -> u64 {
        self.unix_at_zero.saturating_add(now.as_secs())
    }

    /// A fresh challenge, or 429 while the 2.0 slots are all live.
    pub fn challenge(&mut self, now: Duration, stale: bool) -> Result<Challenge, AuthFailure> {
        let nonce = match self.mode {
            AuthMode::V1 => Nonce::Time(self.unix(now)),
            AuthMode::V2 => Nonce::Opaque(self.new_opaque_nonce(now)?),
        };
        Ok(Challenge { nonce, realm: self.realm.clone(), stale })
    }

    fn new_opaque_nonce(&mut self, now: Duration) -> Result<String, AuthFailure> {
        let lifetime = self.lifetime;
        self.slots.retain(|s| now.saturating_sub(s.issued) < lifetime && s.uses < NONCE_MAX_USES);
        if self.slots.len() >= NONCE_SLOTS {
            match self.throttle_until {
                Some(until) if now >= until => {
                    self.throttle_until = None;
                    if let Some(oldest) = self.slots.iter().enumerate().min_by_key(|(_, s)| s.issued).map(|(i, _)| i) {
                        self.slots.remove(oldest);
                    }
                }
                Some(_) => return Err(AuthFailure::Throttled),
                None => {
                    self.throttle_until = Some(now + THROTTLE);
                    return Err(AuthFailure::Throttled);
                }
            }
        }
        let mut raw = [0u8; 16];
        self.rng.fill_bytes(&mut raw);
        let nonce = base64::engine::general_purpose::STANDARD.encode(raw);
        self.slots.push(NonceSlot { nonce: nonce.clone(), issued: now, uses: 0, last_nc: 0 });
        Ok(nonce)
    }

    /// Checks an answer (from [`DigestAnswer::from_rpc`] or `from_http`;
    /// `None` when the caller sent none or a malformed one).
    pub fn check(&mut self, answer: Option<&DigestAnswer>, now: Duration) -> Result<(), AuthFailure> {
        let Some(a) = answer else {
            return Err(AuthFailure::Challenge(self.challenge(now, false)?));
        };
        let expected = response(&self.ha1, &a.nonce, &a.nc, &a.cnonce, &a.ha2);
        if a.username != USERNAME || !a.response.eq_ignore_ascii_case(&expected) {
            return Err(AuthFailure::Challenge(self.challenge(now, false)?));
        }
        match self.mode {
            AuthMode::V1 => {
                let fresh = a.nonce.parse::<u64>().is_ok_and(|t| t <= self.unix(now) && self.unix(now) - t <= self.lifetime.as_secs());
                if fresh {
                    Ok(())
                } else {
                    Err(AuthFailure::Challenge(self.challenge(now, true)?))
                }
            }
            AuthMode::V2 => self.use_nonce(a, now),
        }
    }

    fn use_nonce(&mut self, a: &DigestAnswer, now: Duration) -> Result<(), AuthFailure> {
        // RFC 7616 writes nc in hex; the RPC form sends a decimal number.
        let nc = if a.ha2 == rpc_ha2() { a.nc.parse::<u64>().ok() } else { u64::from_str_radix(&a.nc, 16).ok() };
        let lifetime = self.lifetime;
        let live = self.slots.iter_mut().find(|s| s.nonce == a.nonce && now.saturating_sub(s.issued) < lifetime && s.uses < NONCE_MAX_USES);
        let Some(slot) = live else {
            return Err(AuthFailure::Challenge(self.challenge(now, true)?));
        };
        let in_order = match nc {
            Some(nc) if slot.last_nc == 0 => nc == 1,
            Some(nc) => nc > slot.last_nc,
            None => false,
        };
        if !in_order {
            return Err(AuthFailure::Challenge(self.challenge(now, false)?));
        }
        slot.last_nc = nc.unwrap_or(0);
        slot.uses += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const T0: Duration = Duration::from_secs(100);

    fn rpc_answer(realm: &str, password: &str, nonce: &Value, nc: u64, cnonce: u64) -> DigestAnswer {
        let h = response(&ha1(realm, password), &hash_text(nonce).unwrap(), &nc.to_string(), &cnonce.to_string(), &rpc_ha2());
        let auth = json!({"realm": realm, "username": "admin", "nonce": nonce, "cnonce": cnonce, "response": h, "algorithm": "SHA-256", "nc": nc});
        DigestAnswer::from_rpc(&auth).unwrap()
    }

    fn challenge_nonce(f: Result<(), AuthFailure>) -> (Value, bool) {
        match f {
            Err(AuthFailure::Challenge(c)) => {
                let m: Value = serde_json::from_str(&c.to_message()).unwrap();
                assert_eq!((m["auth_type"].as_str(), m["algorithm"].as_str(), m["nc"].as_u64()), (Some("digest"), Some("SHA-256"), Some(1)));
                (m["nonce"].clone(), m.get("stale").is_some())
            }
            other => panic!("expected a challenge, got {other:?}"),
        }
    }

    #[test]
    fn known_vector_computed_with_python_hashlib() {
        // hashlib.sha256 of the same strings, computed outside this code.
        let ha1 = ha1("shellypro4pm-f008d1d8b8b8", "pass");
        assert_eq!(ha1, "b2d4691b6df2e46452e28814d2a22ccede110fa63472fe8eed82e1d4b3305634");
        assert_eq!(rpc_ha2(), "6370ec69915103833b5222b368555393393f098bfbfbb59f47e0590af135f062");
        let r = response(&ha1, "1625038762", "1", "313273957", &rpc_ha2());
        assert_eq!(r, "01af6b757a2238a7d8205fcf8a1700e6893fccc9c4b29faab767e0562b177dcd");
    }

    #[test]
    fn v1_unix_nonces_and_nc_not_enforced() {
        let mut auth = DigestAuth::new(AuthMode::V1, "shellyplus1pm-aa", "secret", 1_700_000_000, 1);
        let (nonce, stale) = challenge_nonce(auth.check(None, T0));
        assert_eq!((nonce.clone(), stale), (json!(1_700_000_100u64), false));
        let good = rpc_answer("shellyplus1pm-aa", "secret", &nonce, 1, 7);
        assert_eq!(auth.check(Some(&good), T0), Ok(()));
        assert_eq!(auth.check(Some(&good), T0 + Duration::from_secs(5)), Ok(()), "1.x takes a repeated nc");
        let wrong = rpc_answer("shellyplus1pm-aa", "nope", &nonce, 1, 7);
        assert_eq!(challenge_nonce(auth.check(Some(&wrong), T0)).1, false);
        let late = T0 + NONCE_LIFETIME + Duration::from_secs(1);
        assert_eq!(challenge_nonce(auth.check(Some(&good), late)).1, true, "an hour-old nonce is stale");
    }

    #[test]
    fn v2_opaque_nonces_nc_must_grow() {
        let mut auth = DigestAuth::new(AuthMode::V2, "dev", "pw", 0, 7);
        let (nonce, _) = challenge_nonce(auth.check(None, T0));
        let s = nonce.as_str().unwrap();
        assert!(s.ends_with('=') && s.len() == 24, "{s}");
        assert_eq!(auth.check(Some(&rpc_answer("dev", "pw", &nonce, 2, 1)), T0).is_err(), true, "first nc is 1");
        assert_eq!(auth.check(Some(&rpc_answer("dev", "pw", &nonce, 1, 1)), T0), Ok(()));
        assert!(auth.check(Some(&rpc_answer("dev", "pw", &nonce, 1, 2)), T0).is_err(), "replayed nc");
        assert_eq!(auth.check(Some(&rpc_answer("dev", "pw", &nonce, 2, 3)), T0), Ok(()));
        let later = T0 + NONCE_LIFETIME;
        let (_, stale) = challenge_nonce(auth.check(Some(&rpc_answer("dev", "pw", &nonce, 3, 3)), later));
        assert!(stale, "expired nonce is stale");
        let unknown = json!("AAAAAAAAAAAAAAAAAAAAAA==");
        assert!(challenge_nonce(auth.check(Some(&rpc_answer("dev", "pw", &unknown, 1, 1)), T0)).1);
    }

    #[test]
    fn a_shorter_nonce_lifetime_makes_nonces_stale_sooner_in_both_modes() {
        let life = Duration::from_secs(2);
        let mut v2 = DigestAuth::new(AuthMode::V2, "dev", "pw", 0, 7).with_nonce_lifetime(life);
        let (nonce, _) = challenge_nonce(v2.check(None, T0));
        assert_eq!(v2.check(Some(&rpc_answer("dev", "pw", &nonce, 1, 1)), T0 + Duration::from_millis(1999)), Ok(()));
        assert!(challenge_nonce(v2.check(Some(&rpc_answer("dev", "pw", &nonce, 2, 1)), T0 + life)).1, "two seconds on: stale");
        let mut v1 = DigestAuth::new(AuthMode::V1, "dev", "pw", 1_700_000_000, 1).with_nonce_lifetime(life);
        let (nonce, _) = challenge_nonce(v1.check(None, T0));
        assert_eq!(v1.check(Some(&rpc_answer("dev", "pw", &nonce, 1, 1)), T0 + life), Ok(()));
        assert!(challenge_nonce(v1.check(Some(&rpc_answer("dev", "pw", &nonce, 1, 1)), T0 + life + Duration::from_secs(1))).1);
    }

    #[test]
    fn v2_slots_run_out_into_a_two_second_throttle() {
        let mut auth = DigestAuth::new(AuthMode::V2, "dev", "pw", 0, 7);
        for _ in 0..NONCE_SLOTS {
            challenge_nonce(auth.check(None, T0));
        }
        assert_eq!(auth.check(None, T0), Err(AuthFailure::Throttled));
        assert_eq!(auth.check(None, T0 + Duration::from_millis(1999)), Err(AuthFailure::Throttled));
        challenge_nonce(auth.check(None, T0 + THROTTLE));
        auth.forget_nonces();
        challenge_nonce(auth.check(None, T0 + THROTTLE));
    }

    #[test]
    fn http_header_answers_as_curl_sends_them() {
        let mut auth = DigestAuth::new(AuthMode::V2, "dev", "pw", 0, 3);
        let Err(AuthFailure::Challenge(c)) = auth.check(None, T0) else { panic!() };
        let header = c.to_www_authenticate();
        assert!(header.starts_with("Digest qop=\"auth\", realm=\"dev\", nonce=\"") && header.ends_with("algorithm=SHA-256"), "{header}");
        let nonce = c.nonce.text();
        let ha2 = sha256_hex("GET:/rpc/Shelly.GetStatus");
        let r = response(&ha1("dev", "pw"), &nonce, "00000001", "abc", &ha2);
        let h = format!("Digest username=\"admin\", realm=\"dev\", nonce=\"{nonce}\", uri=\"/rpc/Shelly.GetStatus\", algorithm=SHA-256, response=\"{r}\", qop=auth, nc=00000001, cnonce=\"abc\"");
        let a = DigestAnswer::from_http(&h, "GET").unwrap();
        assert_eq!(auth.check(Some(&a), T0), Ok(()));
        assert!(DigestAnswer::from_http("Basic YWRtaW46cHc=", "GET").is_none());
        assert!(DigestAnswer::from_http("Digest username=\"admin\", uri=\"/\", algorithm=MD5", "GET").is_none());
        for junk in ["Digest", "Digest ,,,,", "Digest a=\"", "Digest =x, \\", "Digest nc=zz, a"] {
            assert!(DigestAnswer::from_http(junk, "GET").is_none());
        }
    }
}
