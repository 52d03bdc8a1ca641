//! Arbitrary bytes as one BACnet/SC BVLC message.
//! Invariants: no panic; a decoded message re-encodes and decodes to itself; the hub's
//! forwarding rewrite succeeds exactly on frames whose header is sound, and for decodable
//! frames equals decode -> set originating / drop destination -> encode.
#![no_main]

use hilbench::protocol::bvlc_sc::{decode, encode, encode_into, rewrite_for_forwarding, Vmac};
use libfuzzer_sys::fuzz_target;

const SENDER: Vmac = Vmac([0x02, 0xAA, 0xBB, 0xCC, 0xDD, 0xEE]);

fuzz_target!(|data: &[u8]| {
    let decoded = decode(data);
    for keep in [false, true] {
        let mut out = vec![0x5A];
        let rewritten = rewrite_for_forwarding(data, SENDER, keep, &mut out);
        if rewritten.is_err() {
            assert_eq!(out, [0x5A], "rewrite must leave the buffer alone on error");
        }
        if let Ok(m) = &decoded {
            assert!(
                rewritten.is_ok(),
                "decodable frame rejected by rewrite: {rewritten:?}"
            );
            let mut fwd = m.clone();
            fwd.originating = Some(SENDER);
            if !keep {
                fwd.destination = None;
            }
            let mut want = vec![0x5A];
            encode_into(&fwd, &mut want).expect("forwarded message encodes");
            assert_eq!(out, want);
        }
    }
    if let Ok(m) = decoded {
        let bytes = encode(&m).expect("decoded message must re-encode");
        let again = decode(&bytes).expect("re-encoded message must decode");
        assert_eq!(again, m);
    }
});
