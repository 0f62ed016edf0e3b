// A Chorus client for the browser, written from docs/protocol.md: WebSocket with
// MessagePack (binary messages), `auth`, requests matched by `seq`, server pings answered,
// notifications deduplicated by their per-session `seq` (§5.5), and resume after a lost
// connection with jittered exponential backoff (§5.6), naming the rooms and the latest
// comment of each so that any node can take the session over.

import { encode, decode } from "./msgpack.js";

const REQUEST_TIMEOUT_MS = 10_000;
const BACKOFF_MAX_MS = 10_000;
const VOICE_FRAME_TAG = 0xc1;

/** An error response (or a local failure) with a code and words for people. */
export class ChorusError extends Error {
  constructor(code, message) {
    super(message);
    this.code = code;
  }
}

/** What the codes of docs/protocol.md §9.1 mean to a person. */
const CODE_WORDS = {
  1001: "That was too long to send.",
  1003: "The request was not understood.",
  2001: "Your sign-in token was refused: sign in again.",
  2002: "Your sign-in has expired: sign in again.",
  2004: "You are not allowed to do that here.",
  3000: "Slow down: too many requests.",
  3001: "You are in too many rooms.",
  3006: "You have too many open rooms.",
  4000: "There is no such room.",
  4001: "Join the room first.",
  4002: "This room has ended.",
  4003: "That is not valid.",
  5001: "The service is busy: try again in a moment.",
};

/** Words for an error: the code's meaning, then the server's own explanation. */
export function describe(error) {
  if (!(error instanceof ChorusError)) return String(error && error.message ? error.message : error);
  const words = CODE_WORDS[error.code];
  return words ? `${words} (${error.message})` : error.message;
}

export class ChorusClient extends EventTarget {
  /**
   * @param {object} options
   * @param {string} options.url  ws:// or wss:// URL of a node's /ws
   * @param {() => Promise<string>} options.token  a token for this user (asked again on each connect)
   */
  constructor({ url, token }) {
    super();
    this.url = url;
    this.tokenSource = token;
    this.seq = 0;
    this.pending = new Map();
    this.state = "idle";
    this.sessionId = null;
    this.lastProcessed = 0;
    this.rooms = new Map(); // room id → latest comment id
    this.attempt = 0;
    this.closedByUs = false;
    this.auth = null;
  }

  setState(state, detail = {}) {
    this.state = state;
    this.dispatchEvent(new CustomEvent("state", { detail: { state, ...detail } }));
  }

  /** Connects (and keeps reconnecting until `close`). Resolves after the first `auth`. */
  async connect() {
    this.closedByUs = false;
    return this.open();
  }

  open() {
    this.setState(this.sessionId ? "reconnecting" : "connecting");
    return new Promise((resolve, reject) => {
      let settled = false;
      const ws = new WebSocket(this.url);
      ws.binaryType = "arraybuffer";
      this.ws = ws;
      ws.onopen = async () => {
        try {
          const ok = await this.authenticate();
          this.attempt = 0;
          this.auth = ok;
          this.setState("live", { node: ok.node, resume: ok.resume });
          if (ok.resume === "resync") this.dispatchEvent(new CustomEvent("resync"));
          settled = true;
          resolve(ok);
        } catch (error) {
          if (!settled) {
            settled = true;
            reject(error);
          }
          ws.close(4000, "auth failed");
        }
      };
      ws.onmessage = (message) => this.receive(message.data);
      ws.onclose = (event) => {
        for (const [, p] of this.pending) p.reject(new ChorusError(0, "the connection was lost"));
        this.pending.clear();
        if (this.ws !== ws) return;
        if (this.closedByUs) {
          this.setState("closed");
          return;
        }
        if (!settled) {
          settled = true;
          if (!this.sessionId) {
            this.setState("closed", { reason: event.reason || `closed (${event.code})` });
            reject(new ChorusError(0, `could not connect to ${this.url}`));
            return;
          }
        }
        // Session-ending closes (§9.3): the token is bad; otherwise resume.
        if (event.code === 4101 || event.code === 4102) {
          this.setState("closed", { reason: event.reason });
          return;
        }
        this.scheduleReconnect();
      };
    });
  }

  scheduleReconnect() {
    this.setState("reconnecting");
    const delay = Math.random() * Math.min(BACKOFF_MAX_MS, 250 * 2 ** this.attempt);
    this.attempt = Math.min(this.attempt + 1, 10);
    setTimeout(() => {
      if (this.closedByUs) return;
      this.open().catch(() => {});
    }, delay);
  }

  async authenticate() {
    const body = { token: await this.tokenSource() };
    if (this.sessionId) {
      const rooms = {};
      for (const [room, latest] of this.rooms) rooms[room] = latest;
      body.resume = { session_id: this.sessionId, last_seq: this.lastProcessed, rooms };
    }
    const ok = await this.request("auth", body);
    if (ok.resume !== "resumed") {
      this.lastProcessed = ok.notification_seq || 0;
      if (ok.resume === "resync") this.rooms.clear();
    }
    this.sessionId = ok.session_id;
    return ok;
  }

  /** Sends a request; resolves with its `ok` body or rejects with a ChorusError. */
  request(kind, body = {}) {
    const ws = this.ws;
    if (!ws || ws.readyState !== WebSocket.OPEN) {
      return Promise.reject(new ChorusError(0, "not connected: waiting to reconnect"));
    }
    const seq = ++this.seq;
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.pending.delete(seq);
        reject(new ChorusError(0, `no answer to ${kind} in time`));
      }, REQUEST_TIMEOUT_MS);
      this.pending.set(seq, {
        resolve: (v) => { clearTimeout(timer); resolve(v); },
        reject: (e) => { clearTimeout(timer); reject(e); },
      });
      ws.send(encode({ type: "req", seq, kind, body }));
    });
  }

  receive(data) {
    if (!(data instanceof ArrayBuffer)) return; // this client speaks MessagePack only
    const bytes = new Uint8Array(data);
    if (bytes.length > 0 && bytes[0] === VOICE_FRAME_TAG) {
      this.dispatchEvent(new CustomEvent("voice", { detail: bytes }));
      return;
    }
    let frame;
    try {
      frame = decode(bytes);
    } catch (error) {
      console.warn("undecodable frame", error);
      return;
    }
    if (frame.type === "res") {
      const p = this.pending.get(frame.seq);
      if (!p) return;
      this.pending.delete(frame.seq);
      if (frame.error) p.reject(new ChorusError(frame.error.code, frame.error.message));
      else p.resolve(frame.ok || {});
    } else if (frame.type === "req") {
      // Server pings (§5.4), answered at once; any other server request is unknown.
      const answer = frame.kind === "ping"
        ? { type: "res", seq: frame.seq, ok: {} }
        : { type: "res", seq: frame.seq, error: { code: 1002, message: `unknown kind ${frame.kind}` } };
      this.ws.send(encode(answer));
    } else if (frame.type === "ntf") {
      if (frame.seq <= this.lastProcessed) return; // a duplicate after a resume
      if (frame.seq > this.lastProcessed + 1) {
        // A gap: resume from what we have (§5.5).
        this.ws.close(4000, "notification gap");
        return;
      }
      this.lastProcessed = frame.seq;
      const body = frame.body || {};
      if (frame.kind === "room.comment" && body.room_id) this.noteComment(body.room_id, body.comment_id);
      if (frame.kind === "room.ended" && body.room_id) this.rooms.delete(body.room_id);
      this.dispatchEvent(new CustomEvent("notification", { detail: { kind: frame.kind, body } }));
    }
  }

  noteComment(room, commentId) {
    if (!this.rooms.has(room)) return;
    if (commentId > (this.rooms.get(room) || 0)) this.rooms.set(room, commentId);
  }

  /** `room.join`, remembering the room for resume. */
  async join(room) {
    const ok = await this.request("room.join", { room_id: room });
    let latest = 0;
    for (const c of ok.recent_comments || []) latest = Math.max(latest, c.comment_id);
    this.rooms.set(room, Math.max(latest, this.rooms.get(room) || 0));
    return ok;
  }

  /** `room.leave`, forgetting the room. */
  async leave(room) {
    this.rooms.delete(room);
    return this.request("room.leave", { room_id: room });
  }

  /** Sends a voice frame (§13) if connected; whether it went. Voice is never queued. */
  sendVoice(frame) {
    const ws = this.ws;
    if (!ws || ws.readyState !== WebSocket.OPEN || this.state !== "live") return false;
    // A congested socket drops audio rather than delaying it.
    if (ws.bufferedAmount > 64 * 1024) return false;
    ws.send(frame);
    return true;
  }

  /** Drops the connection without ending the session (as a network loss would). */
  drop() {
    if (this.ws) this.ws.close(4000, "dropped");
  }

  /** Goodbye: ends the session (§5.7). */
  close() {
    this.closedByUs = true;
    if (this.ws) this.ws.close(1000, "goodbye");
  }
}
