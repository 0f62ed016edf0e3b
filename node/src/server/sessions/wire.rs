//! The outgoing side of a plain WebSocket connection (`ws://`), whose TCP socket the node
//! holds itself: a frame is written to the socket by whoever produces it.
//!
//! A room's fan-out, a response, a ping: each frame is framed for WebSocket once and, when
//! nothing waits before it, written straight to the socket with one `write` from the task
//! that produced it. No writer task is woken and nothing is queued, so a delivery costs
//! about what the system call costs (the fan-out floor, `benches/fanout.sh`). What the
//! socket does not take at once waits in the wire's queue, in order, for the connection's
//! flusher ([`flush`], run in the connection's own task), which writes it as the socket
//! drains; everything produced meanwhile queues behind it.
//!
//! **Bounds.** The queue holds at most `outgoing_queue_frames_max` frames: one more closes
//! the connection as a slow consumer (4203), as with the queued writer. A voice frame is
//! dropped while `audio_queue_frames_max` frames wait (late voice is worth nothing). The
//! WebSocket library's own frames (pongs, the close reply) count against the same bound.
//! An empty queue holds no memory.
//!
//! **Close.** A close frame goes last: after it nothing but the library's close reply is
//! written, and once the queue is out the flusher shuts the socket's sending side. An
//! immediate close ([`CloseSignal`]: slow consumer, takeover, shutdown) drops what waits
//! (but the rest of a frame already started) and sends the close frame.
//!
//! Over TLS and QUIC, frames go through the queued writer (`edge::connection`): those
//! streams cannot be written from another task.

use std::collections::VecDeque;
use std::future::Future;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::task::{Context, Poll};

use chorus_protocol::{EncodedBody, Encoding, ErrorCode};
use futures_util::task::AtomicWaker;
use socket2::SockRef;
use tokio::net::TcpStream;

use super::outgoing::{Backlog, CloseSignal, BACKLOG_HIGH_FRAMES, BACKLOG_LOW_FRAMES};

/// The WebSocket opcodes the node sends itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opcode {
    /// A text message (a JSON frame).
    Text = 0x1,
    /// A binary message (a MessagePack frame or a voice frame).
    Binary = 0x2,
    /// A close frame.
    Close = 0x8,
}

/// The longest header of an unmasked WebSocket frame.
const HEADER_BYTES_MAX: usize = 10;

/// Slices handed to one vectored write.
const WRITE_SLICES_MAX: usize = 64;

/// Close reasons are limited to 123 bytes by RFC 6455.
const CLOSE_REASON_BYTES_MAX: usize = 123;

/// Frames ready to write (one, or a batch written together): the bytes from `start` on
/// are still to go.
#[derive(Debug)]
struct Chunk {
    bytes: Vec<u8>,
    start: usize,
    /// How many frames the chunk holds (what the queue's bounds count).
    frames: usize,
    /// A response (or a ping): queued ahead of the notifications that wait.
    ahead: bool,
}

impl Chunk {
    fn rest(&self) -> &[u8] {
        &self.bytes[self.start..]
    }
}

/// A final, unmasked server frame with `opcode`; `write` appends the payload (about
/// `size_hint` bytes).
fn ws_frame(opcode: Opcode, size_hint: usize, write: impl FnOnce(&mut Vec<u8>)) -> Chunk {
    let mut bytes = Vec::with_capacity(HEADER_BYTES_MAX + size_hint);
    append_ws_frame(&mut bytes, opcode, write);
    Chunk {
        bytes,
        start: 0,
        frames: 1,
        ahead: false,
    }
}

/// Appends a final, unmasked server frame with `opcode` to `out`; `write` appends the
/// payload after room for the longest header, so the frame is built in one buffer.
fn append_ws_frame(out: &mut Vec<u8>, opcode: Opcode, write: impl FnOnce(&mut Vec<u8>)) {
    let at = out.len();
    out.resize(at + HEADER_BYTES_MAX, 0);
    write(out);
    let len = out.len() - at - HEADER_BYTES_MAX;
    let (header, header_len) = ws_header(opcode, len);
    // Close the gap the longest header left.
    out.copy_within(at + HEADER_BYTES_MAX.., at + header_len);
    out.truncate(out.len() - (HEADER_BYTES_MAX - header_len));
    out[at..at + header_len].copy_from_slice(&header[..header_len]);
}

/// The header of a final, unmasked frame with `opcode` and a payload of `len` bytes, and
/// its length.
fn ws_header(opcode: Opcode, len: usize) -> ([u8; HEADER_BYTES_MAX], usize) {
    let mut header = [0u8; HEADER_BYTES_MAX];
    header[0] = 0x80 | opcode as u8;
    let header_len = if len < 126 {
        header[1] = len as u8;
        2
    } else if let Ok(len) = u16::try_from(len) {
        header[1] = 126;
        header[2..4].copy_from_slice(&len.to_be_bytes());
        4
    } else {
        header[1] = 127;
        header[2..10].copy_from_slice(&(len as u64).to_be_bytes());
        10
    };
    (header, header_len)
}

/// The WebSocket close code for a Chorus close code: WebSocket has its own for an oversized
/// message (1009) and for a text message that is not UTF-8 (1007, RFC 6455 §8.1).
pub fn ws_close_code(code: u16) -> u16 {
    if code == ErrorCode::FrameTooLarge.close_code() {
        1009
    } else if code == ErrorCode::MalformedFrame.close_code() {
        1007
    } else {
        code
    }
}

/// `text` cut to at most `bytes_max` bytes on a character boundary.
pub fn truncate_utf8(text: &str, bytes_max: usize) -> &str {
    if text.len() <= bytes_max {
        return text;
    }
    let mut end = bytes_max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// What became of a frame handed to the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sent {
    /// Written, or queued behind what waits.
    Taken,
    /// A voice frame dropped: too much waits.
    Dropped,
    /// The queue is full: the client does not keep up.
    Full,
    /// The connection is closing or gone.
    Closed,
}

/// What a frame is, for the queue's bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Frame,
    Audio,
    /// The WebSocket library's own bytes (pongs, the close reply): taken while closing.
    Library,
}

/// What [`Wire::drain`] left.
enum Drain {
    /// Everything is written; the connection goes on.
    Idle,
    /// The socket is full: wait until it is writable.
    Blocked(Arc<TcpStream>),
    /// Closed: the close frame is out and the socket's sending side shut, or it is gone.
    Done,
    /// The socket failed.
    Failed,
}

#[derive(Debug, Default)]
struct State {
    /// `None` once the connection is done.
    socket: Option<Arc<TcpStream>>,
    queue: VecDeque<Chunk>,
    /// Frames in `queue`.
    frames: usize,
    /// A close frame is queued (or the peer's close is being answered): nothing but the
    /// library's own bytes follow it.
    closing: bool,
}

/// One plain WebSocket connection's outgoing side (see the module docs).
#[derive(Debug)]
pub struct Wire {
    state: Mutex<State>,
    /// Wakes the flusher: the queue became non-empty, or a close was queued.
    flusher: AtomicWaker,
    frames_max: usize,
    audio_frames_max: usize,
    /// The connection's close signal (an immediate close).
    pub close: Arc<CloseSignal>,
    /// The connection's encoding, set by the client's first frame.
    pub encoding: Arc<OnceLock<Encoding>>,
    /// [`Self::encoding`] once set: `ENCODING_*`.
    encoding_cached: AtomicU8,
    backlog: Backlog,
}

const ENCODING_UNSET: u8 = 0;
const ENCODING_MSGPACK: u8 = 1;
const ENCODING_JSON: u8 = 2;

/// `chorus_frames_out_total`, looked up once (it is counted per frame of a fan-out).
fn frames_out() -> &'static metrics::Counter {
    static COUNTER: OnceLock<metrics::Counter> = OnceLock::new();
    COUNTER.get_or_init(|| metrics::counter!("chorus_frames_out_total"))
}

impl Wire {
    /// The outgoing side of `socket`: at most `frames_max` frames wait, and voice is
    /// dropped while `audio_frames_max` do.
    pub fn new(socket: Arc<TcpStream>, frames_max: usize, audio_frames_max: usize) -> Self {
        Wire {
            state: Mutex::new(State {
                socket: Some(socket),
                ..State::default()
            }),
            flusher: AtomicWaker::new(),
            frames_max: frames_max.max(1),
            audio_frames_max: audio_frames_max.max(1),
            close: Arc::new(CloseSignal::default()),
            encoding: Arc::new(OnceLock::new()),
            encoding_cached: AtomicU8::new(ENCODING_UNSET),
            backlog: Backlog::default(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A poisoned lock means a panic while holding it; the queue is still consistent
        // (whole chunks), so keep serving.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn encoding(&self) -> Encoding {
        // Read once per frame: the cached copy sits beside the lock, the `OnceLock` in
        // another allocation (a cache miss per listener in a fan-out).
        match self.encoding_cached.load(Ordering::Relaxed) {
            ENCODING_MSGPACK => Encoding::MsgPack,
            ENCODING_JSON => Encoding::Json,
            _ => match self.encoding.get() {
                Some(&encoding) => {
                    let cached = match encoding {
                        Encoding::MsgPack => ENCODING_MSGPACK,
                        Encoding::Json => ENCODING_JSON,
                    };
                    self.encoding_cached.store(cached, Ordering::Relaxed);
                    encoding
                }
                None => Encoding::MsgPack,
            },
        }
    }

    fn opcode(&self, encoding: Encoding) -> Opcode {
        match encoding {
            Encoding::Json => Opcode::Text,
            Encoding::MsgPack => Opcode::Binary,
        }
    }

    /// Sends notifications (sequence number, body) in order, with one write.
    pub fn notifications(&self, list: &[(u64, &Arc<EncodedBody>)]) -> Sent {
        let encoding = self.encoding();
        let opcode = self.opcode(encoding);
        let size: usize = list
            .iter()
            .map(|(_, body)| HEADER_BYTES_MAX + body.frame_bytes_hint(encoding))
            .sum();
        let mut bytes = Vec::with_capacity(size);
        for (seq, body) in list {
            append_ws_frame(&mut bytes, opcode, |out| {
                body.frame_into(encoding, *seq, out)
            });
        }
        let chunk = Chunk {
            bytes,
            start: 0,
            frames: list.len(),
            ahead: false,
        };
        self.send(chunk, Kind::Frame)
    }

    /// Sends an encoded frame (a response, a ping) in the connection's encoding, ahead
    /// of the notifications that wait (after the responses that wait, and after a frame
    /// already begun): a client that reads behind the room still gets its answers soon,
    /// and the protocol promises no order between answers and notifications.
    pub fn encoded(&self, frame: &[u8]) -> Sent {
        let mut chunk = ws_frame(self.opcode(self.encoding()), frame.len(), |out| {
            out.extend_from_slice(frame)
        });
        chunk.ahead = true;
        self.send(chunk, Kind::Frame)
    }

    /// Sends a voice frame (a binary message even on a JSON connection: the audio marker
    /// tells it from a frame).
    pub fn audio(&self, frame: &[u8]) -> Sent {
        let chunk = ws_frame(Opcode::Binary, frame.len(), |out| {
            out.extend_from_slice(frame)
        });
        self.send(chunk, Kind::Audio)
    }

    /// Takes bytes the WebSocket library writes itself (whole frames: pongs, the close
    /// reply). An error when the queue is full (the connection is closed as a slow
    /// consumer) or the connection is gone.
    pub fn library(&self, bytes: &[u8]) -> io::Result<()> {
        let chunk = Chunk {
            bytes: bytes.to_vec(),
            start: 0,
            frames: 1,
            ahead: false,
        };
        match self.send(chunk, Kind::Library) {
            Sent::Taken | Sent::Dropped => Ok(()),
            Sent::Full => {
                self.close.slow_consumer();
                Err(io::Error::other("outgoing queue full"))
            }
            Sent::Closed => Err(io::ErrorKind::BrokenPipe.into()),
        }
    }

    fn send(&self, chunk: Chunk, kind: Kind) -> Sent {
        let mut state = self.lock();
        let State {
            socket,
            queue,
            frames,
            closing,
        } = &mut *state;
        let Some(socket) = socket else {
            return Sent::Closed;
        };
        if *closing && kind != Kind::Library {
            return Sent::Closed;
        }
        // Frames out count what is taken, written now or queued (not the library's own).
        let taken = |frames: usize| {
            if kind != Kind::Library {
                frames_out().increment(frames as u64);
            }
            Sent::Taken
        };
        if queue.is_empty() {
            let mut chunk = chunk;
            // A plain `send` on the descriptor: the runtime's readiness is not consulted
            // (one cache miss less per listener). A `WouldBlock` here leaves it stale, which
            // only costs the flusher one extra try before it waits.
            match SockRef::from(socket.as_ref()).send(chunk.rest()) {
                Ok(written) if written == chunk.rest().len() => return taken(chunk.frames),
                Ok(written) => chunk.start += written,
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
                Err(error) => {
                    drop(state);
                    tracing::debug!(%error, "write failed");
                    self.close.close(ErrorCode::Unavailable, "write failed");
                    return Sent::Closed;
                }
            }
            *frames += chunk.frames;
            let count = chunk.frames;
            queue.push_back(chunk);
            drop(state);
            self.flusher.wake();
            return taken(count);
        }
        if kind == Kind::Audio && *frames >= self.audio_frames_max {
            return Sent::Dropped;
        }
        if *frames + chunk.frames > self.frames_max {
            return Sent::Full;
        }
        *frames += chunk.frames;
        let count = chunk.frames;
        if chunk.ahead {
            // Behind a frame already begun and the answers queued before this one.
            let at = queue
                .iter()
                .position(|queued| queued.start == 0 && !queued.ahead)
                .unwrap_or(queue.len());
            queue.insert(at, chunk);
        } else {
            queue.push_back(chunk);
        }
        if *frames > BACKLOG_HIGH_FRAMES {
            self.backlog.raise();
        }
        taken(count)
    }

    /// Queues a close frame last (`None`: a normal close, else a Chorus close code and
    /// reason); the flusher shuts the socket once everything before it is out. Nothing
    /// is queued after it; a second close (or one after the peer's close) queues nothing
    /// but lets the flusher finish.
    pub fn finish(&self, reason: Option<(u16, String)>) {
        if self.close.is_requested() {
            // An immediate close came first: its reason wins.
            self.close_now();
            self.flusher.wake();
            return;
        }
        let mut state = self.lock();
        if state.socket.is_none() {
            return;
        }
        if !state.closing {
            state.queue.push_back(close_frame(reason));
            state.frames += 1;
            state.closing = true;
        }
        drop(state);
        // Also after the peer's close: the flusher shuts the socket once the reply is out.
        self.flusher.wake();
    }

    /// The peer's close frame arrived: nothing of ours follows the library's reply.
    pub fn peer_closed(&self) {
        self.lock().closing = true;
    }

    /// An immediate close: drops what waits (but the rest of a frame already started)
    /// and queues the close frame with the close signal's reason.
    fn close_now(&self) {
        let reason = self
            .close
            .reason()
            .map(|(code, reason)| (code.close_code(), reason));
        let mut state = self.lock();
        if state.socket.is_none() {
            return;
        }
        if !state.closing {
            let started = state.queue.front().is_some_and(|chunk| chunk.start > 0);
            state.queue.truncate(usize::from(started));
            state.frames = state.queue.iter().map(|chunk| chunk.frames).sum();
            state.queue.push_back(close_frame(reason));
            state.frames += 1;
            state.closing = true;
        }
        self.backlog.lower();
    }

    /// Writes what waits until the socket is full or the queue empty.
    fn drain(&self) -> Drain {
        let mut state = self.lock();
        let State {
            socket,
            queue,
            frames,
            closing,
        } = &mut *state;
        let Some(open) = socket else {
            return Drain::Done;
        };
        while !queue.is_empty() {
            let mut slices = [IoSlice::new(&[]); WRITE_SLICES_MAX];
            let mut count = 0;
            for (slot, chunk) in slices.iter_mut().zip(queue.iter()) {
                *slot = IoSlice::new(chunk.rest());
                count += 1;
            }
            let mut written = match open.try_write_vectored(&slices[..count]) {
                Ok(0) => return Drain::Failed,
                Ok(written) => written,
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                    return Drain::Blocked(open.clone());
                }
                Err(error) => {
                    tracing::debug!(%error, "write failed");
                    return Drain::Failed;
                }
            };
            while let Some(chunk) = queue.front_mut() {
                let rest = chunk.rest().len();
                if written < rest {
                    chunk.start += written;
                    break;
                }
                written -= rest;
                if let Some(done) = queue.pop_front() {
                    *frames -= done.frames;
                }
            }
            if *frames < BACKLOG_LOW_FRAMES {
                self.backlog.lower();
            }
        }
        // An emptied queue gives its memory back: most connections wait idle.
        queue.shrink_to_fit();
        if *closing {
            // Shut the sending side: the client sees the close frame, then the end.
            let _ = SockRef::from(open.as_ref()).shutdown(std::net::Shutdown::Write);
            *socket = None;
            return Drain::Done;
        }
        Drain::Idle
    }

    /// Lets go of the socket (the connection is over) and of what waits.
    fn shut(&self) {
        let mut state = self.lock();
        state.socket = None;
        state.queue = VecDeque::new();
        state.frames = 0;
        self.backlog.lower();
    }
}

fn close_frame(reason: Option<(u16, String)>) -> Chunk {
    let (code, reason) = reason.unwrap_or((1000, String::new()));
    let reason = truncate_utf8(&reason, CLOSE_REASON_BYTES_MAX);
    ws_frame(Opcode::Close, 2 + reason.len(), |out| {
        out.extend_from_slice(&ws_close_code(code).to_be_bytes());
        out.extend_from_slice(reason.as_bytes());
    })
}

/// The connection's flusher (see [`flush`]).
#[derive(Debug)]
pub struct Flush {
    wire: Arc<Wire>,
    /// The immediate close has been queued.
    closed_now: bool,
}

/// The connection's flusher: writes what the socket did not take at once, as it drains,
/// and closes. Ends once the close frame is out (or the socket failed). It runs in the
/// connection's task; dropped, it lets go of the socket (and of what waits).
pub fn flush(wire: Arc<Wire>) -> Flush {
    Flush {
        wire,
        closed_now: false,
    }
}

impl Future for Flush {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = &mut *self;
        let wire = &this.wire;
        // Registered before the queue is looked at: what is queued after is woken for.
        wire.flusher.register(cx.waker());
        if !this.closed_now && wire.close.poll_requested(cx).is_ready() {
            this.closed_now = true;
            wire.close_now();
        }
        loop {
            match wire.drain() {
                Drain::Idle => return Poll::Pending,
                Drain::Done => break,
                Drain::Failed => {
                    wire.close.close(ErrorCode::Unavailable, "write failed");
                    break;
                }
                Drain::Blocked(socket) => match socket.poll_write_ready(cx) {
                    Poll::Ready(Ok(())) => {}
                    Poll::Ready(Err(_)) => {
                        wire.close.close(ErrorCode::Unavailable, "write failed");
                        break;
                    }
                    Poll::Pending => return Poll::Pending,
                },
            }
        }
        wire.shut();
        Poll::Ready(())
    }
}

impl Drop for Flush {
    fn drop(&mut self) {
        self.wire.shut();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_carry_the_shortest_length_header() {
        for (len, header) in [(0, 2), (125, 2), (126, 4), (65_535, 4), (65_536, 10)] {
            let chunk = ws_frame(Opcode::Binary, len, |out| out.resize(out.len() + len, 7));
            let frame = chunk.rest();
            assert_eq!(frame.len(), header + len, "payload {len}");
            assert_eq!(frame[0], 0x82);
            let decoded = match frame[1] {
                126 => u16::from_be_bytes([frame[2], frame[3]]) as usize,
                127 => u64::from_be_bytes(frame[2..10].try_into().unwrap()) as usize,
                short => short as usize,
            };
            assert_eq!(decoded, len);
        }
    }

    #[test]
    fn a_batch_is_frames_back_to_back() {
        let mut out = Vec::new();
        for len in [5usize, 300, 0] {
            append_ws_frame(&mut out, Opcode::Text, |o| o.resize(o.len() + len, b'x'));
        }
        let mut rest = out.as_slice();
        for len in [5usize, 300, 0] {
            assert_eq!(rest[0], 0x81);
            let (decoded, header) = match rest[1] {
                126 => (u16::from_be_bytes([rest[2], rest[3]]) as usize, 4),
                short => (short as usize, 2),
            };
            assert_eq!(decoded, len);
            assert!(rest[header..header + len].iter().all(|b| *b == b'x'));
            rest = &rest[header + len..];
        }
        assert!(rest.is_empty());
    }

    #[test]
    fn close_frames_map_codes_and_cut_reasons_on_char_boundaries() {
        let reason = "é".repeat(100);
        let chunk = close_frame(Some((ErrorCode::FrameTooLarge.close_code(), reason)));
        let frame = chunk.rest();
        assert_eq!(frame[0], 0x88);
        let len = frame[1] as usize;
        assert!(len <= 125);
        assert_eq!(u16::from_be_bytes([frame[2], frame[3]]), 1009);
        assert!(std::str::from_utf8(&frame[4..]).is_ok());
        let normal = close_frame(None);
        assert_eq!(normal.rest(), &[0x88, 2, 0x03, 0xe8]);
    }
}
