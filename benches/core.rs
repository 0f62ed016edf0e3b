//! In-process benchmarks of the hot paths: frame decoding, notification framing for
//! fan-out, and the room core ordering a comment for a large room.
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

criterion_group!(benches, decoding, framing, room_comment);
criterion_main!(benches);
