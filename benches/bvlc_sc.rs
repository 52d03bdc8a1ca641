//! BACnet/SC BVLC codec: decode/encode of a broadcast Encapsulated-NPDU carrying a 20-byte
//! NPDU, and the hub's broadcast fan-out rewrite (`rewrite_for_forwarding`).
use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use hilbench::protocol::bvlc_sc::{
    decode, encode, encode_into, rewrite_for_forwarding, BvlcMessage, BvlcPayload, Vmac,
};

fn broadcast_npdu() -> BvlcMessage {
    BvlcMessage {
        destination: Some(Vmac::BROADCAST),
        ..BvlcMessage::new(0x4242, BvlcPayload::EncapsulatedNpdu((0u8..20).collect()))
    }
}

fn bench(c: &mut Criterion) {
    let msg = broadcast_npdu();
    let frame = encode(&msg).unwrap();
    let sender = Vmac([0x02, 0, 0, 0, 0, 0x01]);
    let mut g = c.benchmark_group("bvlc_sc");
    g.throughput(Throughput::Elements(1));
    g.bench_function("decode_broadcast_npdu20", |b| {
        b.iter(|| decode(black_box(&frame)).unwrap())
    });
    g.bench_function("encode_broadcast_npdu20", |b| {
        b.iter(|| encode(black_box(&msg)).unwrap())
    });
    let mut buf = Vec::with_capacity(128);
    g.bench_function("encode_into_broadcast_npdu20", |b| {
        b.iter(|| {
            buf.clear();
            encode_into(black_box(&msg), &mut buf).unwrap();
        })
    });
    let mut out = Vec::with_capacity(128);
    g.bench_function("rewrite_for_forwarding_broadcast", |b| {
        b.iter(|| {
            out.clear();
            rewrite_for_forwarding(black_box(&frame), sender, true, &mut out).unwrap();
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
