//! Property tests: the decoders turn arbitrary bytes into a frame or an error, never a panic,
//! and valid frames survive a round trip.

use chorus_protocol::{
    decode_frame, ClientRequest, Encoding, Event, Frame, FrameLimits, RoomCommentRequest,
};
use proptest::prelude::*;

fn decode_all_the_way(encoding: Encoding, bytes: &[u8]) {
    let limits = FrameLimits::default();
    if let Ok(frame) = decode_frame(encoding, bytes, &limits) {
        match frame {
            Frame::Request(r) => {
                let _ = ClientRequest::decode(&r.kind, &r.body);
            }
            Frame::Notification(n) => {
                let _ = Event::decode(&n.kind, &n.body);
            }
            Frame::Response(_) => {}
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4096))]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        decode_all_the_way(Encoding::MsgPack, &bytes);
        decode_all_the_way(Encoding::Json, &bytes);
    }

    #[test]
    fn mutated_valid_frames_never_panic(
        text in ".{0,64}",
        seq in any::<u64>(),
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
    ) {
        let req = ClientRequest::RoomComment(RoomCommentRequest { room_id: "r-1".into(), text, request_id: None });
        for encoding in [Encoding::MsgPack, Encoding::Json] {
            let mut bytes = req.encode(encoding, seq).expect("encode").to_vec();
            for (index, value) in &flips {
                let i = index.index(bytes.len());
                bytes[i] = *value;
            }
            decode_all_the_way(encoding, &bytes);
            // truncations too
            let cut = flips[0].0.index(bytes.len());
            decode_all_the_way(encoding, &bytes[..cut]);
        }
    }

    #[test]
    fn valid_requests_round_trip(text in ".{0,200}", room in "[a-z0-9-]{1,40}", seq in any::<u64>()) {
        let req = ClientRequest::RoomComment(RoomCommentRequest { room_id: room, text, request_id: None });
        for encoding in [Encoding::MsgPack, Encoding::Json] {
            let bytes = req.encode(encoding, seq).expect("encode");
            let Frame::Request(frame) = decode_frame(encoding, &bytes, &FrameLimits::default()).expect("decode") else {
                panic!("not a request");
            };
            prop_assert_eq!(frame.seq, seq);
            prop_assert_eq!(ClientRequest::decode(&frame.kind, &frame.body).expect("body"), req.clone());
        }
    }
}
