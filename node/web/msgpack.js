// MessagePack, as docs/protocol.md §4.2 uses it: maps with string keys, strings (never
// bin), unsigned and signed integers, float64, bool, nil, arrays. Integers beyond 2^53
// decode as BigInt; everything else as plain JavaScript values.

const utf8 = new TextEncoder();
const fromUtf8 = new TextDecoder("utf-8", { fatal: true });

/** Encodes a JavaScript value as MessagePack bytes. */
export function encode(value) {
  const out = new Writer();
  write(out, value);
  return out.bytes();
}

class Writer {
  constructor() {
    this.buf = new Uint8Array(256);
    this.view = new DataView(this.buf.buffer);
    this.len = 0;
  }
  room(n) {
    if (this.len + n <= this.buf.length) return;
    let size = this.buf.length * 2;
    while (size < this.len + n) size *= 2;
    const next = new Uint8Array(size);
    next.set(this.buf.subarray(0, this.len));
    this.buf = next;
    this.view = new DataView(next.buffer);
  }
  u8(v) { this.room(1); this.buf[this.len++] = v; }
  u16(v) { this.room(2); this.view.setUint16(this.len, v); this.len += 2; }
  u32(v) { this.room(4); this.view.setUint32(this.len, v); this.len += 4; }
  u64(v) { this.room(8); this.view.setBigUint64(this.len, BigInt(v)); this.len += 8; }
  i64(v) { this.room(8); this.view.setBigInt64(this.len, BigInt(v)); this.len += 8; }
  f64(v) { this.room(8); this.view.setFloat64(this.len, v); this.len += 8; }
  raw(bytes) { this.room(bytes.length); this.buf.set(bytes, this.len); this.len += bytes.length; }
  bytes() { return this.buf.slice(0, this.len); }
}

function write(out, v) {
  if (v === null || v === undefined) return out.u8(0xc0);
  if (v === false) return out.u8(0xc2);
  if (v === true) return out.u8(0xc3);
  if (typeof v === "bigint") return v >= 0n ? (out.u8(0xcf), out.u64(v)) : (out.u8(0xd3), out.i64(v));
  if (typeof v === "number") {
    if (!Number.isInteger(v)) return (out.u8(0xcb), out.f64(v));
    if (v >= 0) {
      if (v < 0x80) return out.u8(v);
      if (v < 0x100) return (out.u8(0xcc), out.u8(v));
      if (v < 0x10000) return (out.u8(0xcd), out.u16(v));
      if (v < 0x100000000) return (out.u8(0xce), out.u32(v));
      return (out.u8(0xcf), out.u64(v));
    }
    if (v >= -32) return out.u8(v & 0xff);
    return (out.u8(0xd3), out.i64(v));
  }
  if (typeof v === "string") {
    const b = utf8.encode(v);
    if (b.length < 32) out.u8(0xa0 | b.length);
    else if (b.length < 0x100) (out.u8(0xd9), out.u8(b.length));
    else if (b.length < 0x10000) (out.u8(0xda), out.u16(b.length));
    else (out.u8(0xdb), out.u32(b.length));
    return out.raw(b);
  }
  if (v instanceof Uint8Array) {
    if (v.length < 0x100) (out.u8(0xc4), out.u8(v.length));
    else if (v.length < 0x10000) (out.u8(0xc5), out.u16(v.length));
    else (out.u8(0xc6), out.u32(v.length));
    return out.raw(v);
  }
  if (Array.isArray(v)) {
    if (v.length < 16) out.u8(0x90 | v.length);
    else if (v.length < 0x10000) (out.u8(0xdc), out.u16(v.length));
    else (out.u8(0xdd), out.u32(v.length));
    for (const item of v) write(out, item);
    return;
  }
  if (typeof v === "object") {
    const keys = Object.keys(v).filter((k) => v[k] !== undefined);
    if (keys.length < 16) out.u8(0x80 | keys.length);
    else if (keys.length < 0x10000) (out.u8(0xde), out.u16(keys.length));
    else (out.u8(0xdf), out.u32(keys.length));
    for (const k of keys) {
      write(out, k);
      write(out, v[k]);
    }
    return;
  }
  throw new TypeError(`cannot encode ${typeof v} as MessagePack`);
}

/** Decodes one MessagePack value that fills `bytes` (a Uint8Array or ArrayBuffer). */
export function decode(bytes) {
  const buf = bytes instanceof Uint8Array ? bytes : new Uint8Array(bytes);
  const r = { buf, view: new DataView(buf.buffer, buf.byteOffset, buf.byteLength), pos: 0 };
  const value = read(r);
  if (r.pos !== buf.length) throw new Error("trailing bytes after a MessagePack value");
  return value;
}

function need(r, n) {
  if (r.pos + n > r.buf.length) throw new Error("truncated MessagePack value");
}

function int64(big) {
  return big >= BigInt(Number.MIN_SAFE_INTEGER) && big <= BigInt(Number.MAX_SAFE_INTEGER) ? Number(big) : big;
}

function read(r) {
  need(r, 1);
  const t = r.buf[r.pos++];
  if (t < 0x80) return t;
  if (t >= 0xe0) return t - 0x100;
  if ((t & 0xf0) === 0x80) return map(r, t & 0x0f);
  if ((t & 0xf0) === 0x90) return array(r, t & 0x0f);
  if ((t & 0xe0) === 0xa0) return str(r, t & 0x1f);
  const v = r.view;
  let x;
  switch (t) {
    case 0xc0: return null;
    case 0xc2: return false;
    case 0xc3: return true;
    case 0xc4: need(r, 1); return bin(r, r.buf[r.pos++]);
    case 0xc5: need(r, 2); x = v.getUint16(r.pos); r.pos += 2; return bin(r, x);
    case 0xc6: need(r, 4); x = v.getUint32(r.pos); r.pos += 4; return bin(r, x);
    case 0xca: need(r, 4); x = v.getFloat32(r.pos); r.pos += 4; return x;
    case 0xcb: need(r, 8); x = v.getFloat64(r.pos); r.pos += 8; return x;
    case 0xcc: need(r, 1); return r.buf[r.pos++];
    case 0xcd: need(r, 2); x = v.getUint16(r.pos); r.pos += 2; return x;
    case 0xce: need(r, 4); x = v.getUint32(r.pos); r.pos += 4; return x;
    case 0xcf: need(r, 8); x = v.getBigUint64(r.pos); r.pos += 8; return int64(x);
    case 0xd0: need(r, 1); x = v.getInt8(r.pos); r.pos += 1; return x;
    case 0xd1: need(r, 2); x = v.getInt16(r.pos); r.pos += 2; return x;
    case 0xd2: need(r, 4); x = v.getInt32(r.pos); r.pos += 4; return x;
    case 0xd3: need(r, 8); x = v.getBigInt64(r.pos); r.pos += 8; return int64(x);
    case 0xd9: need(r, 1); return str(r, r.buf[r.pos++]);
    case 0xda: need(r, 2); x = v.getUint16(r.pos); r.pos += 2; return str(r, x);
    case 0xdb: need(r, 4); x = v.getUint32(r.pos); r.pos += 4; return str(r, x);
    case 0xdc: need(r, 2); x = v.getUint16(r.pos); r.pos += 2; return array(r, x);
    case 0xdd: need(r, 4); x = v.getUint32(r.pos); r.pos += 4; return array(r, x);
    case 0xde: need(r, 2); x = v.getUint16(r.pos); r.pos += 2; return map(r, x);
    case 0xdf: need(r, 4); x = v.getUint32(r.pos); r.pos += 4; return map(r, x);
    default: throw new Error(`unsupported MessagePack type 0x${t.toString(16)}`);
  }
}

function str(r, n) {
  need(r, n);
  const s = fromUtf8.decode(r.buf.subarray(r.pos, r.pos + n));
  r.pos += n;
  return s;
}

function bin(r, n) {
  need(r, n);
  const b = r.buf.slice(r.pos, r.pos + n);
  r.pos += n;
  return b;
}

function array(r, n) {
  const out = new Array(n);
  for (let i = 0; i < n; i++) out[i] = read(r);
  return out;
}

function map(r, n) {
  const out = {};
  for (let i = 0; i < n; i++) {
    const k = read(r);
    if (typeof k !== "string") throw new Error("a MessagePack map key that is not a string");
    out[k] = read(r);
  }
  return out;
}
