// Voice messages in the browser (docs/protocol.md §14): the inbox of every device of the
// user, recording with the microphone into Ogg Opus pages sent as chunks while recording
// (so the recipient can listen while it uploads), and a player that reads the message
// with HTTP Range requests as it arrives and decodes it with WebCodecs.

import { OggOpusReader, OggOpusWriter, toBase64 } from "./ogg.js";
import { openMicrophone } from "./voice.js";

const RATE = 48_000;
const FRAME_SAMPLES = 960; // 20 ms
const PAGE_PACKETS = 25; // half a second per page (and per chunk)
const SYNC_PAGE = 200;
const PLAY_REPORT_MS = 1000;

function deviceId() {
  let id = localStorage.getItem("chorus.device");
  if (!id) {
    id = `web-${Array.from(crypto.getRandomValues(new Uint8Array(6)), (b) => b.toString(16).padStart(2, "0")).join("")}`;
    localStorage.setItem("chorus.device", id);
  }
  return id;
}

export class VoiceMessages extends EventTarget {
  constructor({ client, user, token, onError }) {
    super();
    this.client = client;
    this.user = user;
    this.token = token; // async () => a token for GET /vm/<id>
    this.onError = onError;
    this.device = deviceId();
    this.entries = new Map(); // message id → VmEntry
    this.progress = new Map(); // message id → {acked, duration_ms, status}
    this.recording = null;
    this.decodedFrames = 0;
    this.ctx = null;
  }

  changed() {
    this.dispatchEvent(new CustomEvent("change"));
  }

  /** Reads the whole inbox (pages of 200). */
  async sync() {
    let after = 0;
    for (let guard = 0; guard < 1000; guard++) {
      const page = await this.client.request("vm.sync", { device: this.device, after, limit: SYNC_PAGE });
      for (const entry of page.entries) this.keep(entry);
      if (page.next === undefined || page.next === null) break;
      after = page.next;
    }
    this.changed();
  }

  keep(entry) {
    const held = this.entries.get(entry.message_id);
    if (!held || entry.state.version >= held.state.version) this.entries.set(entry.message_id, entry);
  }

  /** Handles a vm.* notification; whether it was one. */
  notify(kind, body) {
    if (kind === "vm.message") {
      this.keep(body);
    } else if (kind === "vm.state") {
      const entry = this.entries.get(body.message_id);
      if (entry && body.state.version >= entry.state.version) entry.state = body.state;
    } else if (kind === "vm.bytes") {
      this.progress.set(body.message_id, body);
    } else {
      return false;
    }
    this.changed();
    return true;
  }

  /** Newest first. */
  list() {
    return [...this.entries.values()].sort((a, b) => b.seq - a.seq);
  }

  audio() {
    if (!this.ctx) this.ctx = new AudioContext({ sampleRate: RATE });
    this.ctx.resume().catch(() => {});
    return this.ctx;
  }

  // ------------------------------------------------------------- recording --

  /** Starts recording a message to `to` (user ids); chunks go out every half second. */
  async record(to) {
    if (this.recording) return;
    const ctx = this.audio();
    const sent = await this.client.request("vm.send", { to });
    const writer = new OggOpusWriter();
    const rec = {
      id: sent.message_id,
      to,
      writer,
      packets: [],
      offset: 0,
      acked: 0,
      durationMs: 0,
      queue: Promise.resolve(),
      failed: null,
    };
    this.recording = rec;
    for (const page of writer.headers()) this.sendPage(rec, page, false);
    try {
      rec.mic = await openMicrophone(ctx, {
        audio: { channelCount: 1 },
        bitrate: 24_000,
        onPacket: (packet) => {
          rec.packets.push(packet);
          // Keep one packet back, so that the last page (with end of stream) has audio.
          if (rec.packets.length > PAGE_PACKETS) {
            const page = rec.packets.splice(0, PAGE_PACKETS);
            this.sendPage(rec, writer.audio(page, FRAME_SAMPLES), false);
          }
        },
        onError: (error) => { rec.failed = error; },
      });
    } catch (error) {
      // No microphone (refused, none): nothing is recording.
      this.recording = null;
      this.changed();
      throw error;
    }
    this.changed();
    return rec.id;
  }

  /** Sends one page as a chunk, in order after the ones before it. */
  sendPage(rec, page, last) {
    const offset = rec.offset;
    rec.offset += page.length;
    rec.queue = rec.queue.then(async () => {
      if (rec.failed) return;
      for (let attempt = 0; attempt < 5; attempt++) {
        try {
          const state = await this.client.request("vm.chunk", {
            message_id: rec.id, offset, data: toBase64(page), ...(last ? { last: true } : {}),
          });
          rec.acked = state.acked;
          rec.durationMs = state.duration_ms;
          rec.status = state.status;
          this.changed();
          return;
        } catch (error) {
          // A lost connection or a busy node: the same chunk again (it is idempotent).
          if (error.code !== 0 && error.code !== 5001) {
            rec.failed = error;
            this.onError(error);
            return;
          }
          await new Promise((r) => setTimeout(r, 300 * (attempt + 1)));
        }
      }
    });
  }

  /** Stops recording and sends the rest with the end of the stream. */
  async stop() {
    const rec = this.recording;
    if (!rec) return null;
    if (rec.mic) await rec.mic.stop({ flush: true });
    if (rec.packets.length === 0) {
      rec.packets.push(new Uint8Array([0xf8, 0xff, 0xfe])); // one silent Opus frame
    }
    this.sendPage(rec, rec.writer.audio(rec.packets.splice(0), FRAME_SAMPLES, true), true);
    await rec.queue;
    this.recording = null;
    this.changed();
    if (rec.failed) throw rec.failed;
    return rec;
  }

  // --------------------------------------------------------------- playing --

  /** Plays a message from the start, while it may still be uploading. */
  async play(messageId) {
    const ctx = this.audio();
    const reader = new OggOpusReader();
    let nextTime = ctx.currentTime + 0.15;
    const decoder = new AudioDecoder({
      output: (data) => {
        try {
          const samples = new Float32Array(data.numberOfFrames);
          data.copyTo(samples, { planeIndex: 0, format: "f32-planar" });
          const buffer = ctx.createBuffer(1, data.numberOfFrames, data.sampleRate);
          buffer.copyToChannel(samples, 0);
          const source = ctx.createBufferSource();
          source.buffer = buffer;
          source.connect(ctx.destination);
          if (nextTime < ctx.currentTime) nextTime = ctx.currentTime + 0.05;
          source.start(nextTime);
          nextTime += buffer.duration;
          this.decodedFrames += 1;
        } finally {
          data.close();
        }
      },
      error: (error) => this.onError(error),
    });
    decoder.configure({ codec: "opus", sampleRate: RATE, numberOfChannels: 1 });
    const started = Date.now();
    let lastReport = 0;
    let offset = 0;
    let timestamp = 0;
    this.playing = messageId;
    this.changed();
    try {
      for (let guard = 0; guard < 10_000; guard++) {
        const response = await fetch(`/vm/${encodeURIComponent(messageId)}`, {
          headers: { authorization: `Bearer ${await this.token()}`, range: `bytes=${offset}-` },
        });
        if (response.status === 416) break; // past the end of an ended message
        if (response.status === 503) continue; // nothing new yet: ask again
        if (response.status !== 206 && response.status !== 200) {
          throw new Error(`the message could not be fetched (HTTP ${response.status})`);
        }
        const bytes = new Uint8Array(await response.arrayBuffer());
        offset += bytes.length;
        for (const packet of reader.push(bytes)) {
          decoder.decode(new EncodedAudioChunk({ type: "key", timestamp, data: packet }));
          timestamp += 20_000;
        }
        if (Date.now() - lastReport > PLAY_REPORT_MS) {
          lastReport = Date.now();
          this.client.request("vm.play", {
            message_id: messageId, device: this.device, position_ms: Date.now() - started, at_ms: Date.now(),
          }).catch(() => {});
        }
        const range = response.headers.get("content-range") || "";
        const total = range.split("/")[1];
        if (total && total !== "*" && offset >= Number(total)) break; // complete, all read
      }
      await decoder.flush();
      await this.client.request("vm.read", { message_id: messageId });
    } finally {
      decoder.close();
      this.playing = null;
      this.changed();
    }
  }
}
