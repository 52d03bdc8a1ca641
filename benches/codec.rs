//! Codec micro-benchmarks: one Modbus frame per iteration, so criterion's "elem/s" is
//! frames per second on one core.
//!
//! Run: `cargo bench --bench codec`

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use hilbench::protocol::eg4::{Eg4Telemetry, RegisterProfile};
use hilbench::protocol::modbus::{
    decode_request, decode_response, decode_response_borrowed, encode_read_response_into,
    encode_request, encode_response_into, serve_into, ModbusRequest, ModbusResponse,
    ModbusRtuFrame, ResponseRef,
};

fn telemetry() -> Eg4Telemetry {
    Eg4Telemetry {
        pack_mv: 53_120,
        current_ca: -1234,
        cells_mv: (0..16).map(|i| 3320 + i).collect(),
        temps_c: vec![21, 22, 23, 24],
        pcb_temp_c: 27,
        soc_pct: 87,
        soh_pct: 99,
        heater_on: true,
        current_limit_ca: 10_000,
        capacity_dah: 1000,
        remaining_cah: 8_700,
        cycles: 42,
        uptime: 1234,
        ..Default::default()
    }
}

fn bench_codec(c: &mut Criterion) {
    let profile = RegisterProfile::Lp4V2;
    let image = profile.image(&telemetry());
    let (start, count) = profile.poll_request();
    let request = ModbusRequest::ReadHolding { start, count };
    let request_frame = encode_request(&ModbusRtuFrame {
        address: 1,
        pdu: request.clone(),
    })
    .unwrap();
    let mut response_frame = Vec::with_capacity(256);
    serve_into(1, &request, &image, &mut response_frame);
    assert_eq!(response_frame.len(), 99);
    let values = image.read_range(start, count).unwrap();
    let response = ModbusRtuFrame {
        address: 1,
        pdu: ModbusResponse::ReadHolding(values.clone()),
    };

    let mut g = c.benchmark_group("modbus");
    g.throughput(Throughput::Elements(1));

    g.bench_function("decode_response_47_regs_owned", |b| {
        b.iter(|| decode_response(black_box(&response_frame)).unwrap())
    });
    g.bench_function("decode_response_47_regs_borrowed", |b| {
        b.iter(|| {
            let f = decode_response_borrowed(black_box(&response_frame)).unwrap();
            match f.pdu {
                ResponseRef::ReadHolding(r) => r.iter().fold(0u32, |a, v| a + u32::from(v)),
                _ => 0,
            }
        })
    });
    g.bench_function("decode_request", |b| {
        b.iter(|| decode_request(black_box(&request_frame)).unwrap())
    });
    let mut out = Vec::with_capacity(256);
    g.bench_function("serve_into_lp4_v2_47_regs", |b| {
        b.iter(|| {
            out.clear();
            serve_into(1, black_box(&request), black_box(&image), &mut out);
            out.len()
        })
    });
    g.bench_function("encode_response_47_regs", |b| {
        b.iter(|| {
            out.clear();
            encode_response_into(black_box(&response), &mut out).unwrap();
            out.len()
        })
    });
    g.bench_function("encode_read_response_into_47_regs", |b| {
        b.iter(|| {
            out.clear();
            encode_read_response_into(1, 3, black_box(&values), &mut out).unwrap();
            out.len()
        })
    });
    g.finish();
}

criterion_group!(benches, bench_codec);
criterion_main!(benches);
