//! Voice relay across nodes (SPEC R11).
//!
//! A speaker's frame enters at its connection's node (the edge), which checks it and
//! passes it to the room's owner: a message to the local room actor, or a QUIC datagram
//! to the owner node ([`FORWARD_KIND`]: the member key, then the client's uplink bytes as
//! they came). The owner's room decides (on stage, not muted, in order) and encodes the
//! downlink frame once; it goes to the owner's own members and, as one datagram per node,
//! to every other node with members, which hands the same bytes to its members' voice
//! queues. Nothing is retried or acknowledged: late audio is useless.

use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use chorus_actors::room_actor::RoomMsg;
use chorus_protocol::audio::{decode_frame, decode_uplink, AudioKind, AudioUplink, AUDIO_MARKER};

use crate::server::rooms::relay::RoomMirrors;
use crate::server::rooms::service::Rooms;
use crate::server::sessions::session::Session;

/// Second byte of a frame forwarded from an edge to a room's owner (inside the cluster;
/// clients never see it).
pub const FORWARD_KIND: u8 = 0x03;
/// Bytes before the client's uplink bytes in a forwarded frame: marker, kind, member key.
const FORWARD_HEADER_BYTES: usize = 10;

fn dropped(reason: &'static str) {
    metrics::counter!("chorus_audio_dropped_total", "reason" => reason).increment(1);
}

/// A forwarded frame: `uplink` (as the client sent it) from member `member_key`.
fn encode_forward(member_key: u64, uplink: &Bytes) -> Bytes {
    let mut out = BytesMut::with_capacity(FORWARD_HEADER_BYTES + uplink.len());
    out.put_u8(AUDIO_MARKER);
    out.put_u8(FORWARD_KIND);
    out.put_u64(member_key);
    out.put_slice(uplink);
    out.freeze()
}

/// The member key and uplink of a forwarded frame, if it is one and well formed.
fn decode_forward(datagram: &Bytes) -> Option<(u64, AudioUplink)> {
    if datagram.len() <= FORWARD_HEADER_BYTES
        || datagram[0] != AUDIO_MARKER
        || datagram[1] != FORWARD_KIND
    {
        return None;
    }
    let mut key = [0u8; 8];
    key.copy_from_slice(&datagram[2..FORWARD_HEADER_BYTES]);
    let uplink = decode_uplink(&datagram.slice(FORWARD_HEADER_BYTES..)).ok()?;
    Some((u64::from_be_bytes(key), uplink))
}

impl Rooms {
    /// Passes a checked voice frame of `session` to its room's owner (see the module docs).
    /// `bytes` is the frame as the client sent it, `uplink` its decoded parts.
    pub(crate) async fn route_audio(
        &self,
        session: &Arc<Session>,
        uplink: AudioUplink,
        bytes: &Bytes,
    ) {
        let member_key = session.member().key();
        let owner = self.ctx.owner_of(&uplink.room_id);
        if owner == self.ctx.cluster.node_id() {
            self.audio_to_room(member_key, uplink).await;
            return;
        }
        if let Err(error) = self
            .ctx
            .cluster
            .send_app_datagram(owner, encode_forward(member_key, bytes))
        {
            tracing::debug!(owner, %error, "voice frame not forwarded");
            dropped("forward");
        }
    }

    async fn audio_to_room(&self, member_key: u64, uplink: AudioUplink) {
        let Some(actor) = self.directory.find_running(&uplink.room_id).await else {
            return dropped("room_not_running");
        };
        let _ = actor.cast(RoomMsg::Audio {
            member_key,
            header: uplink.header,
            payload: uplink.payload,
        });
    }

    /// A voice datagram from another node: a frame forwarded to this node as a room's
    /// owner, or a relayed frame for this node's members.
    pub(crate) async fn audio_datagram(&self, datagram: Bytes) {
        match datagram.get(1).copied() {
            Some(FORWARD_KIND) => match decode_forward(&datagram) {
                Some((member_key, uplink)) => self.audio_to_room(member_key, uplink).await,
                None => dropped("malformed"),
            },
            Some(kind) if kind == AudioKind::Downlink as u8 => match decode_frame(&datagram) {
                Ok(frame) => self.mirrors.deliver_audio(&frame.room_id, &datagram),
                Err(_) => dropped("malformed"),
            },
            _ => dropped("malformed"),
        }
    }
}

impl RoomMirrors {
    /// Hands a relayed voice frame to this node's members of `room_id`.
    pub fn deliver_audio(&self, room_id: &str, frame: &Bytes) {
        for session in self.sessions(room_id) {
            chorus_actors::room_actor::MemberSink::deliver_audio(&*session, frame);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chorus_protocol::audio::{encode_uplink, AudioHeader};

    #[test]
    fn a_forwarded_frame_carries_the_member_and_the_uplink() {
        let header = AudioHeader {
            seq: 9,
            timestamp_ms: 180,
            level: 40,
        };
        let uplink = encode_uplink("r-1", header, b"opus").expect("encode");
        let forward = encode_forward(0xdead_beef_0001, &uplink);
        let (key, decoded) = decode_forward(&forward).expect("decode");
        assert_eq!(key, 0xdead_beef_0001);
        assert_eq!(decoded.room_id, "r-1");
        assert_eq!(decoded.header, header);
        assert_eq!(&decoded.payload[..], b"opus");
        // Cut anywhere before the packet's first byte: refused (a shorter packet is
        // still a packet).
        for len in 0..=forward.len() - b"opus".len() {
            assert!(decode_forward(&forward.slice(..len)).is_none(), "len {len}");
        }
    }
}
