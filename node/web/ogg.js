// Opus in Ogg (RFC 7845, RFC 3533) for voice messages: a writer that turns Opus packets
// into pages as they are recorded, and a reader that takes packets out of pages as bytes
// arrive.

const CRC_TABLE = (() => {
  const table = new Uint32Array(256);
  for (let i = 0; i < 256; i++) {
    let r = i << 24;
    for (let j = 0; j < 8; j++) r = r & 0x80000000 ? (r << 1) ^ 0x04c11db7 : r << 1;
    table[i] = r >>> 0;
  }
  return table;
})();

function crc32(bytes) {
  let crc = 0;
  for (const b of bytes) crc = ((crc << 8) ^ CRC_TABLE[((crc >>> 24) ^ b) & 0xff]) >>> 0;
  return crc >>> 0;
}

const PRE_SKIP = 312;

/** Writes one logical Ogg Opus stream, a page at a time. */
export class OggOpusWriter {
  constructor() {
    this.serial = crypto.getRandomValues(new Uint32Array(1))[0];
    this.sequence = 0;
    this.granule = PRE_SKIP;
  }

  page(packets, { bos = false, eos = false, granule }) {
    const segments = [];
    for (const p of packets) {
      let left = p.length;
      while (left >= 255) {
        segments.push(255);
        left -= 255;
      }
      segments.push(left);
    }
    if (segments.length > 255) throw new Error("too many packets for one Ogg page");
    const bodyLength = packets.reduce((n, p) => n + p.length, 0);
    const page = new Uint8Array(27 + segments.length + bodyLength);
    const view = new DataView(page.buffer);
    page.set([0x4f, 0x67, 0x67, 0x53], 0); // OggS
    page[4] = 0;
    page[5] = (bos ? 0x02 : 0) | (eos ? 0x04 : 0);
    view.setBigUint64(6, BigInt(granule), true);
    view.setUint32(14, this.serial, true);
    view.setUint32(18, this.sequence++, true);
    page[26] = segments.length;
    page.set(segments, 27);
    let at = 27 + segments.length;
    for (const p of packets) {
      page.set(p, at);
      at += p.length;
    }
    view.setUint32(22, crc32(page), true);
    return page;
  }

  /** The two header pages: OpusHead (mono, 48 kHz) and OpusTags. */
  headers() {
    const head = new Uint8Array(19);
    const hv = new DataView(head.buffer);
    head.set(new TextEncoder().encode("OpusHead"), 0);
    head[8] = 1; // version
    head[9] = 1; // channels
    hv.setUint16(10, PRE_SKIP, true);
    hv.setUint32(12, 48_000, true);
    hv.setInt16(16, 0, true);
    head[18] = 0; // mapping family
    const vendor = new TextEncoder().encode("chorus-web");
    const tags = new Uint8Array(8 + 4 + vendor.length + 4);
    const tv = new DataView(tags.buffer);
    tags.set(new TextEncoder().encode("OpusTags"), 0);
    tv.setUint32(8, vendor.length, true);
    tags.set(vendor, 12);
    tv.setUint32(12 + vendor.length, 0, true);
    return [this.page([head], { bos: true, granule: 0 }), this.page([tags], { granule: 0 })];
  }

  /** A page of audio packets of `samples` samples each (at 48 kHz). */
  audio(packets, samples, eos = false) {
    this.granule += packets.length * samples;
    return this.page(packets, { eos, granule: this.granule });
  }
}

/** Reads Opus packets out of an Ogg stream given in pieces. */
export class OggOpusReader {
  constructor() {
    this.buffer = new Uint8Array(0);
    this.partial = [];
    this.headersLeft = 2;
  }

  /** Adds bytes; returns the complete audio packets they finish (headers skipped). */
  push(bytes) {
    const joined = new Uint8Array(this.buffer.length + bytes.length);
    joined.set(this.buffer, 0);
    joined.set(bytes, this.buffer.length);
    const packets = [];
    let at = 0;
    while (joined.length - at >= 27) {
      if (joined[at] !== 0x4f || joined[at + 1] !== 0x67 || joined[at + 2] !== 0x67 || joined[at + 3] !== 0x53) {
        throw new Error("not an Ogg page");
      }
      const count = joined[at + 26];
      if (joined.length - at < 27 + count) break;
      const lacing = joined.subarray(at + 27, at + 27 + count);
      const bodyLength = lacing.reduce((n, v) => n + v, 0);
      if (joined.length - at < 27 + count + bodyLength) break;
      let body = at + 27 + count;
      for (const v of lacing) {
        this.partial.push(joined.subarray(body, body + v));
        body += v;
        if (v < 255) {
          const length = this.partial.reduce((n, p) => n + p.length, 0);
          const packet = new Uint8Array(length);
          let o = 0;
          for (const p of this.partial) {
            packet.set(p, o);
            o += p.length;
          }
          this.partial = [];
          if (this.headersLeft > 0) this.headersLeft -= 1;
          else packets.push(packet);
        }
      }
      at = body;
    }
    this.buffer = joined.slice(at);
    return packets;
  }
}

/** Standard base64 with padding, as `vm.chunk` and `vm.fetch` carry audio. */
export function toBase64(bytes) {
  let s = "";
  for (let i = 0; i < bytes.length; i += 0x8000) s += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  return btoa(s);
}
