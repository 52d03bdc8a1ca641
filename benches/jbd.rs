//! JBD codec and device micro-benchmarks: one frame (or one request/response) per
//! iteration, so criterion's "elem/s" is frames per second on one core.
//!
//! Run: `cargo bench --bench jbd`

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use hilbench::device::jbd_core::{JbdBms, JbdConfig};
use hilbench::protocol::jbd::{
    decode_response, encode_read, encode_response, reg, BasicInfo, CellVoltages,
    JbdResponseAssembler,
};

fn bench_jbd(c: &mut Criterion) {
    let mut cfg = JbdConfig::default();
    cfg.pack.cells = 16;
    cfg.pack.ntc = 4;
    let mut bms = JbdBms::new(cfg).unwrap();
    bms.connected(Duration::ZERO);
    let info = bms.basic_info();
    let cells = CellVoltages {
        cells_mv: bms.snapshot().cells_mv,
    };
    let f03 = encode_response(reg::BASIC_INFO, 0, &info.encode().unwrap()).unwrap();
    let f04 = encode_response(reg::CELL_VOLTAGES, 0, &cells.encode().unwrap()).unwrap();
    assert_eq!((f03.len(), f04.len()), (38, 39));

    let mut g = c.benchmark_group("jbd");
    g.throughput(Throughput::Elements(1));
    g.bench_function("decode_0x03_16s_4ntc", |b| {
        b.iter(|| BasicInfo::decode(&decode_response(black_box(&f03)).unwrap().data).unwrap())
    });
    g.bench_function("decode_0x04_16s", |b| {
        b.iter(|| CellVoltages::decode(&decode_response(black_box(&f04)).unwrap().data).unwrap())
    });
    g.bench_function("encode_0x03_16s_4ntc", |b| {
        b.iter(|| encode_response(reg::BASIC_INFO, 0, &black_box(&info).encode().unwrap()).unwrap())
    });
    g.bench_function("encode_0x04_16s", |b| {
        b.iter(|| {
            encode_response(reg::CELL_VOLTAGES, 0, &black_box(&cells).encode().unwrap()).unwrap()
        })
    });
    // The client path: 20-byte notifications through the assembler.
    let mut a = JbdResponseAssembler::new();
    g.bench_function("assemble_0x03_in_20_byte_chunks", |b| {
        b.iter(|| {
            let mut n = 0;
            for chunk in black_box(&f03).chunks(20) {
                n += a.push(chunk).len();
            }
            n
        })
    });
    // The device path: request in, model rendered, frame out (the model advances 1 ms
    // per iteration, as under steady polling).
    let req03 = encode_read(reg::BASIC_INFO);
    let req04 = encode_read(reg::CELL_VOLTAGES);
    let mut now = Duration::ZERO;
    g.bench_function("device_0x03_request_to_response", |b| {
        b.iter(|| {
            now += Duration::from_millis(1);
            bms.handle_write(black_box(&req03), now)
        })
    });
    g.bench_function("device_0x04_request_to_response", |b| {
        b.iter(|| {
            now += Duration::from_millis(1);
            bms.handle_write(black_box(&req04), now)
        })
    });
    g.finish();
}

criterion_group!(benches, bench_jbd);
criterion_main!(benches);
