//! The device models: each a real device's dump (`models/*.json`: identity,
//! config, status, dynamic components; network details scrubbed) that the
//! core makes its own (id and MAC rewritten) and keeps live.

use serde_json::Value;

/// A model a device can be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelSpec {
    /// The name `--model` and scenarios use.
    pub name: &'static str,
    pub description: &'static str,
    /// Shelly's BLE model id (advertised manufacturer data block 0x0B).
    pub ble_model_id: u16,
    dump: &'static str,
}

pub const MODELS: [ModelSpec; 8] = [
    ModelSpec { name: "plus1pm", description: "Shelly Plus 1PM (Gen2, SNSW-001P16EU)", ble_model_id: 0x1001, dump: include_str!("models/plus1pm.json") },
    ModelSpec { name: "plus2pm-switch", description: "Shelly Plus 2PM, switch profile (Gen2, SNSW-102P16EU)", ble_model_id: 0x1002, dump: include_str!("models/plus2pm-switch.json") },
    ModelSpec { name: "plus2pm-cover", description: "Shelly Plus 2PM, cover profile (Gen2, SNSW-102P16EU)", ble_model_id: 0x1002, dump: include_str!("models/plus2pm-cover.json") },
    ModelSpec { name: "pro3em-triphase", description: "Shelly Pro 3EM, triphase profile (Gen2, SPEM-003CEBEU)", ble_model_id: 0x1024, dump: include_str!("models/pro3em-triphase.json") },
    ModelSpec { name: "pro3em-monophase", description: "Shelly Pro 3EM, monophase profile (Gen2, SPEM-003CEBEU)", ble_model_id: 0x1024, dump: include_str!("models/pro3em-monophase.json") },
    ModelSpec { name: "plusplugs", description: "Shelly Plus Plug S (Gen2, SNPL-00112EU)", ble_model_id: 0x1800, dump: include_str!("models/plusplugs.json") },
    ModelSpec { name: "1pmg3", description: "Shelly 1PM Gen3 (S3SW-001P16EU, Matter-capable, 13 dynamic BTHome components)", ble_model_id: 0x1019, dump: include_str!("models/1pmg3.json") },
    ModelSpec { name: "1pmg4", description: "Shelly 1PM Gen4 (S4SW-001P16EU)", ble_model_id: 0x1029, dump: include_str!("models/1pmg4.json") },
];

pub fn find(name: &str) -> Result<&'static ModelSpec, String> {
    MODELS.iter().find(|m| m.name == name).ok_or_else(|| {
        let names: Vec<_> = MODELS.iter().map(|m| m.name).collect();
        format!("unknown Shelly model `{name}` (known: {})", names.join(", "))
    })
}

/// A model's dump with this device's identity.
#[derive(Debug, Clone)]
pub struct ModelDump {
    pub shelly: Value,
    pub config: Value,
    pub status: Value,
    pub components: Vec<Value>,
}

/// `AABBCCDDEEFF` from `aa:bb:cc:dd:ee:ff`, `AABBCCDDEEFF` or `aabbccddeeff`.
pub fn normalize_mac(mac: &str) -> Result<String, String> {
    let hex: String = mac.chars().filter(|c| *c != ':' && *c != '-').collect::<String>().to_ascii_uppercase();
    if hex.len() == 12 && hex.chars().all(|c| c.is_ascii_hexdigit()) {
        Ok(hex)
    } else {
        Err(format!("`{mac}` is not a MAC address (12 hex digits, colons optional)"))
    }
}

impl ModelSpec {
    /// The dump with `mac` in place of the original device's (in the id,
    /// the MAC fields, MQTT's client id and topic).
    pub fn load(&self, mac: &str) -> ModelDump {
        let original: Value = serde_json::from_str(self.dump).unwrap_or(Value::Null);
        let old_mac = original["shelly"]["mac"].as_str().unwrap_or_default().to_string();
        let text = if old_mac.is_empty() {
            self.dump.to_string()
        } else {
            self.dump.replace(&old_mac, mac).replace(&old_mac.to_ascii_lowercase(), &mac.to_ascii_lowercase())
        };
        let v: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        ModelDump {
            shelly: v["shelly"].clone(),
            config: v["config"].clone(),
            status: v["status"].clone(),
            components: v["components"].as_array().cloned().unwrap_or_default(),
        }
    }

    /// The original dump's MAC with its last three bytes from `seed`, so
    /// devices made from one model differ and keep the vendor's prefix.
    pub fn default_mac(&self, seed: u64) -> String {
        let v: Value = serde_json::from_str(self.dump).unwrap_or(Value::Null);
        let prefix: String = v["shelly"]["mac"].as_str().unwrap_or("441793000000").chars().take(6).collect();
        format!("{prefix}{:06X}", seed & 0xFF_FFFF)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_dump_loads_with_the_identity_aioshelly_needs() {
        for m in MODELS {
            let d = m.load("A1B2C3D4E5F6");
            let s = &d.shelly;
            let id = s["id"].as_str().unwrap();
            assert!(id.ends_with("-a1b2c3d4e5f6"), "{}: {id}", m.name);
            assert_eq!(s["mac"], "A1B2C3D4E5F6", "{}", m.name);
            assert!(s["gen"].as_u64().unwrap() >= 2, "{}", m.name);
            let fw = s["fw_id"].as_str().unwrap();
            assert!(fw.len() > 8 && fw[..8].chars().all(|c| c.is_ascii_digit()), "{}: {fw}", m.name);
            assert!(d.config["sys"]["device"]["name"].is_string() || d.config["sys"]["device"]["name"].is_null(), "{}", m.name);
            assert!(d.status["sys"].is_object(), "{}", m.name);
            assert_eq!(d.config["sys"]["device"]["mac"], "A1B2C3D4E5F6", "{}", m.name);
            let keys: Vec<_> = d.config.as_object().unwrap().keys().collect();
            let status_keys: Vec<_> = d.status.as_object().unwrap().keys().collect();
            assert_eq!(keys, status_keys, "{}: config and status name the same components", m.name);
        }
        assert!(find("nope").unwrap_err().contains("plus1pm"));
        assert_eq!(normalize_mac("44:17:93:d6:97:18").unwrap(), "441793D69718");
        assert!(normalize_mac("4417").is_err());
        assert_eq!(MODELS[0].default_mac(0x123456), "441793123456");
    }
}
