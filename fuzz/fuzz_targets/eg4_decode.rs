//! Arbitrary registers decoded through both EG4 profiles.
//! Input: 2 bytes start register (big-endian, reduced mod 256) then big-endian u16s.
//! Invariants: no panic; decoded telemetry is normalized; its image decodes back to it.
#![no_main]

use hilbench::protocol::eg4::RegisterProfile;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (start, rest) = match data {
        [hi, lo, rest @ ..] => (u16::from_be_bytes([*hi, *lo]) % 256, rest),
        _ => return,
    };
    let regs: Vec<u16> = rest
        .chunks_exact(2)
        .map(|c| u16::from_be_bytes([c[0], c[1]]))
        .collect();
    for profile in RegisterProfile::ALL {
        let info = profile.info_request().map(|(s, c)| {
            let mut t = Default::default();
            let r = profile.decode_info(start, &regs, &mut t);
            (r, t, s, c)
        });
        let Ok(t) = profile.decode(start, &regs) else {
            continue;
        };
        assert_eq!(
            profile.normalize(&t),
            t,
            "{profile}: decode output not normalized"
        );
        let img = profile.image(&t);
        let back = profile
            .read_map(&img)
            .expect("image must contain every profile block");
        assert_eq!(back, t, "{profile}: image(decode(x)) does not decode back");
        // decode_info on the same block must agree with decode's string fields.
        if let Some((Ok(()), info_t, _, _)) = info {
            assert_eq!(
                (info_t.model, info_t.firmware_str, info_t.serial),
                (t.model, t.firmware_str, t.serial)
            );
        }
    }
});
