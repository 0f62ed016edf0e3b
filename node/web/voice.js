// Live voice in the browser (docs/protocol.md §13): speakers capture the microphone,
// encode Opus with WebCodecs `AudioEncoder` and send voice frames over the WebSocket;
// listeners decode every speaker's frames with `AudioDecoder` and play them through Web
// Audio behind a small jitter buffer.

const RATE = 48_000;
const FRAME_SAMPLES = 960; // 20 ms
const JITTER_S = 0.08; // how far ahead of now a speaker's audio is scheduled
const LATE_RESET_S = 0.4; // further behind than this: start again from now
const utf8 = new TextEncoder();
const fromUtf8 = new TextDecoder();

/** Whether this browser can do live voice (WebCodecs Opus and Web Audio). */
export function voiceSupported() {
  return typeof AudioEncoder !== "undefined" && typeof AudioDecoder !== "undefined"
    && typeof AudioContext !== "undefined" && typeof AudioWorkletNode !== "undefined";
}

/** The level of a block of samples, in -dBov (0 loudest, 127 silence), as RFC 6464. */
export function level(samples) {
  let sum = 0;
  for (const s of samples) sum += s * s;
  const rms = Math.sqrt(sum / Math.max(1, samples.length));
  if (rms <= 1e-7) return 127;
  return Math.max(0, Math.min(127, Math.round(-20 * Math.log10(rms))));
}

/** An uplink voice frame (§13). */
export function uplinkFrame(room, seq, timestampMs, audioLevel, packet) {
  const roomBytes = utf8.encode(room);
  const frame = new Uint8Array(12 + roomBytes.length + packet.length);
  const view = new DataView(frame.buffer);
  frame[0] = 0xc1;
  frame[1] = 0x01;
  frame[2] = roomBytes.length;
  frame.set(roomBytes, 3);
  let at = 3 + roomBytes.length;
  view.setUint32(at, seq >>> 0);
  view.setUint32(at + 4, timestampMs >>> 0);
  frame[at + 8] = audioLevel;
  frame.set(packet, at + 9);
  return frame;
}

/** Reads a downlink voice frame; null if it is not one. */
export function parseDownlink(bytes) {
  if (bytes.length < 13 || bytes[0] !== 0xc1 || bytes[1] !== 0x02) return null;
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const r = bytes[2];
  if (3 + r + 1 > bytes.length) return null;
  const room = fromUtf8.decode(bytes.subarray(3, 3 + r));
  const s = bytes[3 + r];
  const at = 4 + r + s;
  if (at + 9 > bytes.length) return null;
  return {
    room,
    speaker: fromUtf8.decode(bytes.subarray(4 + r, 4 + r + s)),
    seq: view.getUint32(at),
    timestampMs: view.getUint32(at + 4),
    level: bytes[at + 8],
    packet: bytes.slice(at + 9),
  };
}

const workletLoaded = new WeakSet();

/**
 * The microphone, encoded with WebCodecs into 20 ms Opus packets at `bitrate`:
 * `onPacket(packet, level)` for each, with its RFC 6464 level (127, and silence sent,
 * while `silent()` says so). The samples come through an AudioWorklet
 * (`capture-worklet.js`). Returns `{ stop({ flush }) }`; with `flush`, the packets the
 * encoder still holds come out before it resolves.
 */
export async function openMicrophone(ctx, { audio, bitrate, silent = () => false, onPacket, onError }) {
  const stream = await navigator.mediaDevices.getUserMedia({ audio });
  if (!workletLoaded.has(ctx)) {
    await ctx.audioWorklet.addModule("/app/capture-worklet.js");
    workletLoaded.add(ctx);
  }
  const source = ctx.createMediaStreamSource(stream);
  // No outputs: a sink, which the audio graph runs without a path to the speakers.
  const node = new AudioWorkletNode(ctx, "chorus-capture", { numberOfOutputs: 0 });
  const levels = [];
  const encoder = new AudioEncoder({
    output: (chunk) => {
      const packet = new Uint8Array(chunk.byteLength);
      chunk.copyTo(packet);
      onPacket(packet, levels.shift() ?? 127);
    },
    error: onError,
  });
  encoder.configure({ codec: "opus", sampleRate: RATE, numberOfChannels: 1, bitrate });
  let pending = new Float32Array(FRAME_SAMPLES);
  let filled = 0;
  let timestampUs = 0;
  node.port.onmessage = (message) => {
    const block = message.data;
    let at = 0;
    while (at < block.length) {
      const n = Math.min(block.length - at, FRAME_SAMPLES - filled);
      pending.set(block.subarray(at, at + n), filled);
      filled += n;
      at += n;
      if (filled === FRAME_SAMPLES) {
        const quiet = silent();
        levels.push(quiet ? 127 : level(pending));
        encoder.encode(new AudioData({
          format: "f32-planar",
          sampleRate: RATE,
          numberOfFrames: FRAME_SAMPLES,
          numberOfChannels: 1,
          timestamp: timestampUs,
          data: quiet ? new Float32Array(FRAME_SAMPLES) : pending,
        }));
        timestampUs += (FRAME_SAMPLES * 1_000_000) / RATE;
        pending = new Float32Array(FRAME_SAMPLES);
        filled = 0;
      }
    }
  };
  source.connect(node);
  return {
    async stop({ flush = false } = {}) {
      node.port.onmessage = null;
      try { source.disconnect(); node.disconnect(); } catch { /* gone */ }
      for (const track of stream.getTracks()) track.stop();
      if (flush) await encoder.flush().catch(() => {});
      try { encoder.close(); } catch { /* closed */ }
    },
  };
}

/** Plays what the room's speakers say, and (on stage) sends what this user says. */
export class Voice extends EventTarget {
  constructor(client, self) {
    super();
    this.client = client;
    this.self = self;
    this.room = null;
    this.ctx = null;
    this.speakers = new Map(); // speaker → { decoder, lastSeq, nextTime }
    this.decoded = 0;
    this.sent = 0;
    this.capture = null;
    this.onVoice = (e) => this.receive(e.detail);
    client.addEventListener("voice", this.onVoice);
  }

  /** Starts playing `room` (call from a user gesture, so that audio may start). */
  enter(room) {
    this.room = room;
    if (!voiceSupported()) return;
    if (!this.ctx) this.ctx = new AudioContext({ sampleRate: RATE, latencyHint: "interactive" });
    this.ctx.resume().catch(() => {});
  }

  leave() {
    this.stopTalking();
    for (const s of this.speakers.values()) {
      try { s.decoder.close(); } catch { /* closed already */ }
    }
    this.speakers.clear();
    this.room = null;
  }

  speaker(name) {
    let s = this.speakers.get(name);
    if (s) return s;
    s = { lastSeq: null, nextTime: 0 };
    s.decoder = new AudioDecoder({
      output: (data) => this.play(s, data),
      error: (error) => console.warn(`decoding ${name}'s audio failed`, error),
    });
    s.decoder.configure({ codec: "opus", sampleRate: RATE, numberOfChannels: 1 });
    this.speakers.set(name, s);
    return s;
  }

  receive(bytes) {
    const frame = parseDownlink(bytes);
    if (!frame || frame.room !== this.room || frame.speaker === this.self || !this.ctx) return;
    const s = this.speaker(frame.speaker);
    // Only frames that come after the previous one of this speaker (serial arithmetic).
    if (s.lastSeq !== null && ((frame.seq - s.lastSeq) >>> 0) >= 0x80000000) return;
    if (s.lastSeq !== null && frame.seq === s.lastSeq) return;
    s.lastSeq = frame.seq;
    if (s.decoder.state !== "configured") return;
    s.decoder.decode(new EncodedAudioChunk({
      type: "key",
      timestamp: frame.timestampMs * 1000,
      data: frame.packet,
    }));
  }

  play(s, data) {
    try {
      const frames = data.numberOfFrames;
      const buffer = this.ctx.createBuffer(1, frames, data.sampleRate);
      const samples = new Float32Array(frames);
      data.copyTo(samples, { planeIndex: 0, format: "f32-planar" });
      buffer.copyToChannel(samples, 0);
      const now = this.ctx.currentTime;
      if (s.nextTime < now + 0.01 || s.nextTime > now + LATE_RESET_S + JITTER_S) s.nextTime = now + JITTER_S;
      const source = this.ctx.createBufferSource();
      source.buffer = buffer;
      source.connect(this.ctx.destination);
      source.start(s.nextTime);
      s.nextTime += buffer.duration;
      this.decoded += 1;
      this.dispatchEvent(new CustomEvent("decoded", { detail: this.decoded }));
    } finally {
      data.close();
    }
  }

  /** Starts sending the microphone to the room (the user must be on stage). */
  async startTalking() {
    if (!voiceSupported()) throw new Error("This browser cannot send voice (no WebCodecs Opus).");
    if (this.capture || !this.room) return;
    this.enter(this.room);
    const room = this.room;
    let seq = Math.floor(Math.random() * 0xffffffff);
    this.capture = await openMicrophone(this.ctx, {
      audio: { channelCount: 1, echoCancellation: true, noiseSuppression: true },
      bitrate: 32_000,
      silent: () => this.muted,
      onPacket: (packet, audioLevel) => {
        if (packet.length < 1 || packet.length > 1000) return;
        const sent = this.client.sendVoice(uplinkFrame(room, seq, Date.now(), audioLevel, packet));
        seq = (seq + 1) >>> 0;
        if (sent) this.sent += 1;
      },
      onError: (error) => console.warn("encoding the microphone failed", error),
    });
  }

  stopTalking() {
    const capture = this.capture;
    this.capture = null;
    if (capture) capture.stop();
  }

  get talking() {
    return Boolean(this.capture);
  }
}
