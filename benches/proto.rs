//! Criterion benchmarks of the pure parts: wire encode/decode, the reliable
//! channel's cost per cell (sans-IO, no sockets), frame assembly and
//! partition lookups.

use std::time::Duration;

use bytes::Bytes;
use cellnet::partition::Partition2d;
use cellnet::proto::frames::FrameAssembler;
use cellnet::proto::reliable::{ReliableConfig, ReliableEndpoint, ReliableEvent, ReliableTransmit};
use cellnet::proto::wire::{self, Control, DataKind, Header, MsgKind};
use cellnet::proto::Incarnation;
use criterion::{black_box, criterion_group, criterion_main, BatchSize, Criterion, Throughput};

fn wire_benches(c: &mut Criterion) {
    let mut g = c.benchmark_group("wire");
    let header = Header {
        kind: MsgKind::Cell,
        from: 7,
        incarnation: Incarnation(3),
        id: 123_456,
        frame: 42,
        aux: 0,
        to_incarnation: Incarnation(9),
    };
    g.bench_function("header_encode", |b| {
        b.iter(|| black_box(black_box(&header).encode()))
    });
    let bytes = header.encode();
    g.bench_function("header_decode", |b| {
        b.iter(|| Header::decode(black_box(&bytes)))
    });
    let fb = Control::Feedback(cellnet::proto::reliable::Feedback {
        cumulative: 1000,
        ranges: vec![(1002, 1010), (1020, 1030)],
        errors: Vec::new(),
    });
    let [h, body] = wire::encode_control(1, Incarnation(1), &fb);
    g.bench_function("feedback_decode", |b| {
        let frames = vec![Bytes::from(h.clone()), Bytes::from(body.clone())];
        b.iter(|| wire::decode_peer_msg(black_box(frames.clone())))
    });
    g.finish();
}

/// What `a` sent goes to `r`, which accepts every cell and answers; the
/// answers go back to `a` (at `later`: after the feedback delay, `None`:
/// flushed at once). `runs`: `r` takes the data and the completions as
/// runs (`handle_data_many`, `complete_many`, as the I/O thread does),
/// else one call per message. Returns how many of `a`'s messages resolved.
fn exchange(
    a: &mut ReliableEndpoint,
    r: &mut ReliableEndpoint,
    now: Duration,
    later: Option<Duration>,
    runs: bool,
) -> u64 {
    let data = std::iter::from_fn(|| a.poll_transmit(now)).filter_map(|(_, t)| match t {
        ReliableTransmit::Data(m) => Some(m),
        ReliableTransmit::Feedback(_) => None,
    });
    if runs {
        r.handle_data_many(now, 0, data);
    } else {
        for m in data {
            r.handle_data(now, 0, m);
        }
    }
    let delivered: Vec<u64> = std::iter::from_fn(|| r.poll_event())
        .filter_map(|e| match e {
            ReliableEvent::Deliver { msg, .. } => Some(msg.id),
            ReliableEvent::Resolved { .. } => None,
        })
        .collect();
    if runs {
        r.complete_many(now, 0, delivered.into_iter().map(|id| (id, Ok(()))));
    } else {
        for id in delivered {
            r.complete(now, 0, id, Ok(()));
        }
    }
    let at = match later {
        Some(later) => {
            r.handle_timeout(later);
            later
        }
        None => {
            r.flush_feedback(now);
            now
        }
    };
    while let Some((_, t)) = r.poll_transmit(at) {
        if let ReliableTransmit::Feedback(fb) = t {
            a.handle_feedback(at, 1, fb);
        }
    }
    let mut resolved = 0;
    while let Some(e) = a.poll_event() {
        resolved += u64::from(matches!(e, ReliableEvent::Resolved { .. }));
    }
    resolved
}

/// One cell through two endpoints in memory: send → deliver → complete →
/// feedback → resolved.
fn reliable_benches(c: &mut Criterion) {
    let mut g = c.benchmark_group("reliable");
    const BATCH: u64 = 64;
    g.throughput(Throughput::Elements(BATCH));
    let payload = Bytes::from(vec![0u8; 64]);
    // Fresh endpoints, 64 cells answered in one feedback after its delay.
    g.bench_function("cell_round_trip_x64", |b| {
        b.iter_batched(
            || {
                (
                    ReliableEndpoint::new(ReliableConfig::default(), 1),
                    ReliableEndpoint::new(ReliableConfig::default(), 2),
                )
            },
            |(mut a, mut r)| {
                let now = Duration::from_millis(1);
                for _ in 0..BATCH {
                    a.send(now, 1, 0, DataKind::Cell, payload.clone()).unwrap();
                }
                let later = now + Duration::from_millis(5);
                assert_eq!(exchange(&mut a, &mut r, now, Some(later), false), BATCH);
            },
            BatchSize::SmallInput,
        )
    });
    // The steady state of a long run: the same two endpoints throughout, a
    // window's worth of cells per round, frames of 16,384 cells (so the
    // replay store of answered cells is in use), answers every 64 cells;
    // a call per cell, or runs (`send_many` and the receiver's runs, as the
    // I/O thread takes a `send_many` chunk or a batch message).
    const ROUND: u64 = 4096;
    g.throughput(Throughput::Elements(ROUND));
    for (name, runs) in [
        ("cell_round_trip_steady_x4096", false),
        ("cell_round_trip_steady_runs_x4096", true),
    ] {
        g.bench_function(name, |b| {
            let mut a = ReliableEndpoint::new(ReliableConfig::default(), 1);
            let mut r = ReliableEndpoint::new(ReliableConfig::default(), 2);
            let mut sent = 0u64;
            let mut now = Duration::from_millis(1);
            b.iter(|| {
                let frame = sent / 16_384;
                if runs {
                    let cells = std::iter::repeat_n(payload.clone(), ROUND as usize);
                    let (_, n) = a.send_many(now, 1, frame, DataKind::Cell, cells);
                    assert_eq!(n as u64, ROUND);
                } else {
                    for _ in 0..ROUND {
                        a.send(now, 1, frame, DataKind::Cell, payload.clone())
                            .unwrap();
                    }
                }
                sent += ROUND;
                assert_eq!(exchange(&mut a, &mut r, now, None, runs), ROUND);
                now += Duration::from_micros(100);
            })
        });
    }
    g.finish();
}

fn frame_benches(c: &mut Criterion) {
    let mut g = c.benchmark_group("frames");
    g.throughput(Throughput::Elements(8 * 8));
    g.bench_function("assemble_8_peers_x8_cells", |b| {
        b.iter_batched(
            || {
                let mut a = FrameAssembler::new(0, 4);
                a.set_expected(0..8);
                a
            },
            |mut a| {
                let cell = Bytes::from_static(&[0u8; 64]);
                for peer in 0..8 {
                    for id in 1..=8 {
                        a.handle_cell(peer, id, 0, cell.clone()).unwrap();
                    }
                    a.handle_frame_end(peer, 0, 8).unwrap();
                }
                black_box(a.poll_frame().unwrap())
            },
            BatchSize::SmallInput,
        )
    });
    let p = Partition2d::new([4096, 4096], 6400).unwrap();
    g.bench_function("owner_of_6400_parts", |b| {
        b.iter(|| p.owner_of(black_box([3000, 1234])))
    });
    g.bench_function("neighbours_6400_parts", |b| {
        b.iter(|| p.neighbours(black_box(3333)))
    });
    g.finish();
}

criterion_group!(benches, wire_benches, reliable_benches, frame_benches);
criterion_main!(benches);
