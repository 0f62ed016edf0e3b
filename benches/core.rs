//! In-process benchmarks of the hot paths: frame decoding, notification framing for
//! fan-out, the room core ordering a comment for a large room, and the red-packet pool
//! core serving grabs (every timed grab granted).
//!
//! Run: `cargo bench --bench core`.

use chorus_actors::room::{RoomConfig, RoomCore, RoomDefinition};
use chorus_protocol::{
    decode_frame, ClientRequest, CommentEvent, Encoding, Event, FrameLimits, RoomCommentRequest,
};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use std::hint::black_box;

fn decoding(c: &mut Criterion) {
    let request = ClientRequest::RoomComment(RoomCommentRequest {
        room_id: "r-0123456789abcdef".into(),
        text: "hello everyone, what a show tonight".into(),
        request_id: None,
    });
    let mut group = c.benchmark_group("decode_request");
    for encoding in [Encoding::MsgPack, Encoding::Json] {
        let bytes = request.encode(encoding, 42).expect("encode");
        group.throughput(Throughput::Elements(1));
        group.bench_function(format!("{encoding:?}"), |b| {
            b.iter(|| {
                let frame = decode_frame(encoding, black_box(&bytes), &FrameLimits::default())
                    .expect("decode");
                black_box(frame)
            })
        });
    }
    group.finish();
}

fn framing(c: &mut Criterion) {
    let event = Event::Comment(CommentEvent {
        room_id: "r-0123456789abcdef".into(),
        comment_id: 12345,
        user_id: "user-42".into(),
        text: "hello everyone, what a show tonight".into(),
        at_ms: 1_790_000_000_000,
    });
    let body = event.encode_body().expect("encode");
    let mut group = c.benchmark_group("frame_notification_per_recipient");
    group.throughput(Throughput::Elements(1));
    for encoding in [Encoding::MsgPack, Encoding::Json] {
        group.bench_function(format!("{encoding:?}"), |b| {
            let mut seq = 0u64;
            b.iter(|| {
                seq += 1;
                black_box(body.frame(encoding, seq))
            })
        });
    }
    group.finish();
}

fn room_comment(c: &mut Criterion) {
    let config = RoomConfig::default();
    let mut group = c.benchmark_group("room_core_comment");
    for members in [1_000u64, 10_000] {
        let definition =
            RoomDefinition::new("r-1".into(), "bench", "host".into(), None, 0, &config)
                .expect("definition");
        let mut room = RoomCore::<u64>::new(definition, config.clone());
        for m in 0..members {
            room.handle_join(0, m, &format!("user-{m}")).expect("join");
        }
        room.drain_effects();
        group.throughput(Throughput::Elements(1));
        group.bench_function(format!("{members}_members"), |b| {
            let mut now_ms = 1_000u64;
            let mut author = 0u64;
            b.iter_batched(
                || {
                    // a different author each time, so the per-user rate limit never bites
                    author = (author + 1) % members;
                    now_ms += 1;
                    (author, now_ms)
                },
                |(author, now_ms)| {
                    let response = room.handle_comment(now_ms, &author, "hello");
                    black_box(room.drain_effects());
                    black_box(response)
                },
                BatchSize::SmallInput,
            )
        });
    }
    group.finish();
}

/// The red-packet pool core serving grabs (SPEC Q7): one granted grab each for distinct
/// users, and the split of a rain of a million packets.
fn rain_grab(c: &mut Criterion) {
    use chorus_actors::rain::{split, RainDefinition, RainPool};
    let definition = RainDefinition {
        rain_id: "rain-bench".into(),
        room_id: "r-bench".into(),
        creator: "boss".into(),
        total_cents: 100_000_000,
        count: 1_000_000,
        start_ms: 0,
        duration_ms: u64::MAX / 2,
        cap_per_user: 3,
        seed: 7,
    };
    let mut group = c.benchmark_group("rain");
    group.throughput(Throughput::Elements(1));
    let users: Vec<String> = (0..1_000_000).map(|i| format!("user-{i}")).collect();
    // Every timed grab is granted: a fresh pool (untimed) for each million grabs.
    group.bench_function("grab", |b| {
        b.iter_custom(|iters| {
            let mut elapsed = std::time::Duration::ZERO;
            let mut left = iters;
            while left > 0 {
                let n = left.min(users.len() as u64);
                let mut rain = definition.clone();
                rain.count = n as u32;
                rain.total_cents = n * 100;
                let mut pool = RainPool::create(rain, u32::MAX, 0).expect("rain");
                let started = std::time::Instant::now();
                for user in &users[..n as usize] {
                    black_box(pool.grab(1, user, "req-1"));
                }
                elapsed += started.elapsed();
                left -= n;
            }
            elapsed
        })
    });
    group.throughput(Throughput::Elements(u64::from(definition.count)));
    group.sample_size(10);
    group.bench_function("split_1m_packets", |b| {
        b.iter(|| black_box(split(definition.total_cents, definition.count, 7).expect("split")))
    });
    group.finish();
}

criterion_group!(benches, decoding, framing, room_comment, rain_grab);
criterion_main!(benches);
