//! From a peripheral's GATT application (what its ObjectManager lists) to
//! the attribute table a central discovers: services in a stable order,
//! ATT handles assigned the way a server lays out its database, and the
//! object paths BlueZ gives remote attributes (`service%04x`, `char%04x`
//! from the declaration handle, `desc%04x`). Plain data in, plain data out:
//! the same application always gets the same handles and paths.

use std::cmp::Ordering;

/// One object of a GATT application, reduced to what the layout needs.
#[derive(Debug, Clone, PartialEq)]
pub enum AppObject {
    Service {
        path: String,
        uuid: String,
        primary: bool,
    },
    Characteristic {
        path: String,
        uuid: String,
        service: String,
        flags: Vec<String>,
        /// The app offers AcquireNotify (`NotifyAcquired` property present).
        notify_acquired: bool,
        /// The app offers AcquireWrite (`WriteAcquired` property present).
        write_acquired: bool,
    },
    Descriptor {
        path: String,
        uuid: String,
        characteristic: String,
        flags: Vec<String>,
    },
}

/// The Client Characteristic Configuration descriptor.
pub const CCC_UUID: &str = "00002902-0000-1000-8000-00805f9b34fb";

/// First handle of the application's services: a server puts its own GAP
/// and GATT services in front (BlueZ uses 0x0001..=0x0009 for them).
pub const FIRST_APP_HANDLE: u16 = 0x000A;

#[derive(Debug, Clone, PartialEq)]
pub struct ServiceLayout {
    pub handle: u16,
    pub uuid: String,
    pub primary: bool,
    pub app_path: String,
    pub characteristics: Vec<CharacteristicLayout>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct CharacteristicLayout {
    /// Declaration handle: names the object (`char%04x`).
    pub handle: u16,
    pub value_handle: u16,
    pub uuid: String,
    pub flags: Vec<String>,
    pub app_path: String,
    pub notify_acquired: bool,
    pub write_acquired: bool,
    pub descriptors: Vec<DescriptorLayout>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct DescriptorLayout {
    pub handle: u16,
    pub uuid: String,
    pub flags: Vec<String>,
    /// None for the CCC descriptor the server adds itself.
    pub app_path: Option<String>,
}

impl CharacteristicLayout {
    pub fn notifies(&self) -> bool {
        self.flags.iter().any(|f| f == "notify" || f == "indicate")
    }
}

/// Paths sort like people number things: `service10` after `service9`.
fn natural_cmp(a: &str, b: &str) -> Ordering {
    let (mut a, mut b) = (a.as_bytes(), b.as_bytes());
    loop {
        match (a.first(), b.first()) {
            (None, None) => return Ordering::Equal,
            (None, _) => return Ordering::Less,
            (_, None) => return Ordering::Greater,
            (Some(x), Some(y)) if x.is_ascii_digit() && y.is_ascii_digit() => {
                let na = a.iter().take_while(|c| c.is_ascii_digit()).count();
                let nb = b.iter().take_while(|c| c.is_ascii_digit()).count();
                let (da, db) = (&a[..na], &b[..nb]);
                let trim = |d: &[u8]| -> usize { d.iter().take_while(|c| **c == b'0').count() };
                let (ta, tb) = (&da[trim(da)..], &db[trim(db)..]);
                let ord = ta.len().cmp(&tb.len()).then_with(|| ta.cmp(tb)).then_with(|| na.cmp(&nb));
                if ord != Ordering::Equal {
                    return ord;
                }
                a = &a[na..];
                b = &b[nb..];
            }
            (Some(x), Some(y)) => {
                if x != y {
                    return x.cmp(y);
                }
                a = &a[1..];
                b = &b[1..];
            }
        }
    }
}

/// Lays out an application's attribute table. Objects that point at a
/// parent the app does not export are an error naming the object, as
/// BlueZ refuses such an application.
pub fn layout(objects: &[AppObject]) -> Result<Vec<ServiceLayout>, String> {
    let mut services: Vec<&AppObject> = objects.iter().filter(|o| matches!(o, AppObject::Service { .. })).collect();
    services.sort_by(|a, b| natural_cmp(path_of(a), path_of(b)));
    let mut chars: Vec<&AppObject> = objects.iter().filter(|o| matches!(o, AppObject::Characteristic { .. })).collect();
    chars.sort_by(|a, b| natural_cmp(path_of(a), path_of(b)));
    let mut descs: Vec<&AppObject> = objects.iter().filter(|o| matches!(o, AppObject::Descriptor { .. })).collect();
    descs.sort_by(|a, b| natural_cmp(path_of(a), path_of(b)));

    for c in &chars {
        if let AppObject::Characteristic { path, service, .. } = c {
            if !services.iter().any(|s| path_of(s) == service) {
                return Err(format!("characteristic {path} names service {service}, which the application does not export"));
            }
        }
    }
    for d in &descs {
        if let AppObject::Descriptor { path, characteristic, .. } = d {
            if !chars.iter().any(|c| path_of(c) == characteristic) {
                return Err(format!(
                    "descriptor {path} names characteristic {characteristic}, which the application does not export"
                ));
            }
        }
    }

    let mut next: u32 = u32::from(FIRST_APP_HANDLE);
    fn alloc(next: &mut u32) -> Result<u16, String> {
        let h = u16::try_from(*next).map_err(|_| "the application needs more than 65535 ATT handles".to_string())?;
        *next += 1;
        Ok(h)
    }
    let mut out = Vec::new();
    for s in services {
        let AppObject::Service { path, uuid, primary } = s else { continue };
        let mut service = ServiceLayout {
            handle: alloc(&mut next)?,
            uuid: uuid.to_ascii_lowercase(),
            primary: *primary,
            app_path: path.clone(),
            characteristics: Vec::new(),
        };
        for c in chars.iter().filter(|c| matches!(c, AppObject::Characteristic { service: sp, .. } if sp == path)) {
            let AppObject::Characteristic { path: cpath, uuid, flags, notify_acquired, write_acquired, .. } = c else { continue };
            let handle = alloc(&mut next)?;
            let value_handle = alloc(&mut next)?;
            let mut descriptors = Vec::new();
            let mut has_ccc = false;
            for d in descs.iter().filter(|d| matches!(d, AppObject::Descriptor { characteristic: cp, .. } if cp == cpath)) {
                let AppObject::Descriptor { path: dpath, uuid, flags, .. } = d else { continue };
                has_ccc |= uuid.eq_ignore_ascii_case(CCC_UUID);
                descriptors.push(DescriptorLayout {
                    handle: alloc(&mut next)?,
                    uuid: uuid.to_ascii_lowercase(),
                    flags: flags.clone(),
                    app_path: Some(dpath.clone()),
                });
            }
            let notifies = flags.iter().any(|f| f == "notify" || f == "indicate");
            if notifies && !has_ccc {
                descriptors.insert(
                    0,
                    DescriptorLayout { handle: 0, uuid: CCC_UUID.into(), flags: vec!["read".into(), "write".into()], app_path: None },
                );
                // The server's CCC sits right after the value; renumber.
                let mut h = u32::from(value_handle);
                for d in descriptors.iter_mut() {
                    h += 1;
                    d.handle = u16::try_from(h).map_err(|_| "the application needs more than 65535 ATT handles".to_string())?;
                }
                next = h + 1;
            }
            service.characteristics.push(CharacteristicLayout {
                handle,
                value_handle,
                uuid: uuid.to_ascii_lowercase(),
                flags: flags.clone(),
                app_path: cpath.clone(),
                notify_acquired: *notify_acquired,
                write_acquired: *write_acquired,
                descriptors,
            });
        }
        out.push(service);
    }
    Ok(out)
}

fn path_of(o: &AppObject) -> &str {
    match o {
        AppObject::Service { path, .. } | AppObject::Characteristic { path, .. } | AppObject::Descriptor { path, .. } => path,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn app() -> Vec<AppObject> {
        vec![
            AppObject::Characteristic {
                path: "/app/service0/char1".into(),
                uuid: "0000FF02-0000-1000-8000-00805F9B34FB".into(),
                service: "/app/service0".into(),
                flags: vec!["write-without-response".into()],
                notify_acquired: false,
                write_acquired: false,
            },
            AppObject::Characteristic {
                path: "/app/service0/char0".into(),
                uuid: "0000ff01-0000-1000-8000-00805f9b34fb".into(),
                service: "/app/service0".into(),
                flags: vec!["notify".into()],
                notify_acquired: true,
                write_acquired: false,
            },
            AppObject::Service { path: "/app/service10".into(), uuid: "0000180f-0000-1000-8000-00805f9b34fb".into(), primary: true },
            AppObject::Service { path: "/app/service0".into(), uuid: "0000ff00-0000-1000-8000-00805f9b34fb".into(), primary: true },
            AppObject::Descriptor {
                path: "/app/service0/char1/desc0".into(),
                uuid: "00002901-0000-1000-8000-00805f9b34fb".into(),
                characteristic: "/app/service0/char1".into(),
                flags: vec!["read".into()],
            },
        ]
    }

    #[test]
    fn handles_are_deterministic_and_ordered() {
        let a = layout(&app()).unwrap();
        let mut reversed = app();
        reversed.reverse();
        assert_eq!(a, layout(&reversed).unwrap(), "order of GetManagedObjects must not matter");
        assert_eq!(a.len(), 2);
        assert_eq!(a[0].app_path, "/app/service0");
        assert_eq!(a[0].handle, 0x000A);
        let c0 = &a[0].characteristics[0];
        assert_eq!((c0.handle, c0.value_handle), (0x000B, 0x000C));
        assert_eq!(c0.uuid, "0000ff01-0000-1000-8000-00805f9b34fb");
        assert_eq!(c0.descriptors.len(), 1, "server-made CCC");
        assert_eq!(c0.descriptors[0].uuid, CCC_UUID);
        assert_eq!(c0.descriptors[0].handle, 0x000D);
        let c1 = &a[0].characteristics[1];
        assert_eq!((c1.handle, c1.value_handle), (0x000E, 0x000F));
        assert_eq!(c1.uuid, "0000ff02-0000-1000-8000-00805f9b34fb", "lower-cased");
        assert_eq!(c1.descriptors[0].handle, 0x0010);
        assert_eq!(a[1].handle, 0x0011);
    }

    #[test]
    fn orphans_are_refused_with_their_path() {
        let objs = vec![AppObject::Characteristic {
            path: "/app/s/c".into(),
            uuid: "x".into(),
            service: "/app/missing".into(),
            flags: vec![],
            notify_acquired: false,
            write_acquired: false,
        }];
        let e = layout(&objs).unwrap_err();
        assert!(e.contains("/app/s/c") && e.contains("/app/missing"), "{e}");
    }

    #[test]
    fn natural_order() {
        assert_eq!(natural_cmp("s9", "s10"), Ordering::Less);
        assert_eq!(natural_cmp("s10", "s10"), Ordering::Equal);
        assert_eq!(natural_cmp("a", "b"), Ordering::Less);
        assert_eq!(natural_cmp("s01", "s1"), Ordering::Greater);
    }
}
