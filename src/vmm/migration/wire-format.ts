import { internalError } from '../../uapi/error.js';
import { MigrationError, MigrationErrorCode } from './migration-error.js';
import type { MigrationPhase } from './migration-info.js';

/*
 * The softvfio migration wire format: the same framing on every channel (the main channel, each
 * multifd channel) and in both directions (the main channel's reverse direction is the return
 * path). All integers are big-endian.
 *
 *   0       1       2               4                               8                              12
 *   +-------+-------+---------------+-------------------------------+-------------------------------+
 *   | type  | 0     | 0             | meta length (u32)             | body length (u32)             |
 *   +-------+-------+---------------+-------------------------------+-------------------------------+
 *   | meta: fixed fields of the type (JSON text for HELLO, ACCEPT and ERROR), ≤ MAX_META_BYTES        |
 *   | body: page data or device bytes, ≤ the type's body limit; delivered to the reader in pieces     |
 *   +-------------------------------------------------------------------------------------------------+
 *
 * Source → destination                                   meta                               body
 *   0x01 HELLO           first frame of every channel    JSON (handshake.ts)                -
 *   0x02 RAM_PAGES       pages of one RAM block          u16 block, u16 0, u32 normal,      normal × 4 KiB
 *                                                        u32 zero, u32 page[normal + zero]
 *   0x03 SYNC            end of a dirty-bitmap round     u32 round                          -
 *   0x04 DEVICE_PRECOPY  device data read in precopy     u16 device, u16 0                  ≤ 1 MiB
 *   0x05 INIT_DATA_SENT  a device's initial bytes sent   u16 device, u16 0                  -
 *   0x06 SWITCHOVER      the VM stopped: state follows   -                                  -
 *   0x07 DEVICE_STATE    device state at switchover      u16 device, u16 0, u32 index,      ≤ 1 MiB
 *                                                        u32 flags (bit 0 CONFIG_STATE)
 *   0x08 CHANNEL_END     a multifd channel's last frame  u32 frames sent before it          -
 *   0x09 COMPLETE        everything has been sent        u32 last round                     -
 *   0x0a RAM_PLUGGED     plug bitmap of a discardable    u16 block, u16 0, u32 blocks       ⌈blocks/8⌉
 *                        block, sent in setup
 *   0x0b HANDOFF         the source committed: run now   -                                  -
 * Destination → source (return path)
 *   0x41 ACCEPT          handshake accepted              JSON                               -
 *   0x42 SWITCHOVER_ACK  devices' initial data loaded    -                                  -
 *   0x43 LOADED          all state loaded, devices STOP  -                                  -
 *   0x44 RUNNING         the VM runs on the destination  -                                  -
 * Either direction
 *   0x7f ERROR           a refusal or a failure          JSON {code, phase, message, device?, errno?}
 *
 * Page numbers are 4 KiB pages within the block; zero pages travel as a number only. Device
 * numbers index the device list of the handshake. A device's state packets carry consecutive
 * indexes from 0; the one with CONFIG_STATE is its last.
 */

export const FRAME_HEADER_BYTES = 12;
export const MAX_META_BYTES = 64 * 1024;
export const RAM_PAGE_BYTES = 4096;
/** Pages with data in one RAM_PAGES frame (QEMU's MULTIFD_PACKET_SIZE: 512 KiB). */
export const MAX_NORMAL_PAGES = 128;
/** Header and meta of a full RAM_PAGES frame (MAX_NORMAL_PAGES page numbers), the bulk of a migration. */
export const FULL_RAM_HEAD_BYTES = FRAME_HEADER_BYTES + 12 + 4 * MAX_NORMAL_PAGES;
/** Zero pages listed in one RAM_PAGES frame. */
export const MAX_ZERO_PAGES = 8192;
/** Device bytes in one DEVICE_PRECOPY or DEVICE_STATE frame (QEMU's 1 MiB VFIO buffer). */
export const MAX_DEVICE_PACKET_BYTES = 1 << 20;
/** Discard blocks in one RAM_PLUGGED bitmap. */
export const MAX_PLUG_BLOCKS = 1 << 24;
export const DEVICE_STATE_CONFIG = 1;

export const FrameType = {
  HELLO: 0x01,
  RAM_PAGES: 0x02,
  SYNC: 0x03,
  DEVICE_PRECOPY: 0x04,
  INIT_DATA_SENT: 0x05,
  SWITCHOVER: 0x06,
  DEVICE_STATE: 0x07,
  CHANNEL_END: 0x08,
  COMPLETE: 0x09,
  RAM_PLUGGED: 0x0a,
  HANDOFF: 0x0b,
  ACCEPT: 0x41,
  SWITCHOVER_ACK: 0x42,
  LOADED: 0x43,
  RUNNING: 0x44,
  ERROR: 0x7f,
} as const;
export type FrameTypeValue = (typeof FrameType)[keyof typeof FrameType];

export const FRAME_TYPE_NAMES: Readonly<Record<number, string>> = Object.fromEntries(
  Object.entries(FrameType).map(([name, value]) => [value, name]),
);

/** Which way a stream flows: what frames it may carry. */
export type WireDirection = 'to-destination' | 'to-source';

const TO_DESTINATION: ReadonlySet<number> = new Set([
  FrameType.HELLO,
  FrameType.RAM_PAGES,
  FrameType.SYNC,
  FrameType.DEVICE_PRECOPY,
  FrameType.INIT_DATA_SENT,
  FrameType.SWITCHOVER,
  FrameType.DEVICE_STATE,
  FrameType.CHANNEL_END,
  FrameType.COMPLETE,
  FrameType.RAM_PLUGGED,
  FrameType.HANDOFF,
  FrameType.ERROR,
]);
const TO_SOURCE: ReadonlySet<number> = new Set([
  FrameType.ACCEPT,
  FrameType.SWITCHOVER_ACK,
  FrameType.LOADED,
  FrameType.RUNNING,
  FrameType.ERROR,
]);

export type Frame =
  | { type: typeof FrameType.HELLO; json: unknown }
  | { type: typeof FrameType.ACCEPT; json: unknown }
  | { type: typeof FrameType.ERROR; json: unknown }
  | {
      type: typeof FrameType.RAM_PAGES;
      block: number;
      normal: Uint32Array;
      zero: Uint32Array;
      bodyBytes: number;
    }
  | { type: typeof FrameType.SYNC; round: number }
  | { type: typeof FrameType.COMPLETE; round: number }
  | { type: typeof FrameType.DEVICE_PRECOPY; device: number; bodyBytes: number }
  | { type: typeof FrameType.INIT_DATA_SENT; device: number }
  | { type: typeof FrameType.DEVICE_STATE; device: number; index: number; flags: number; bodyBytes: number }
  | { type: typeof FrameType.CHANNEL_END; frames: number }
  | { type: typeof FrameType.RAM_PLUGGED; block: number; blocks: number; bodyBytes: number }
  | {
      type:
        | typeof FrameType.SWITCHOVER
        | typeof FrameType.HANDOFF
        | typeof FrameType.SWITCHOVER_ACK
        | typeof FrameType.LOADED
        | typeof FrameType.RUNNING;
    };

/**
 * What the decoder yields: a frame (header and meta parsed and checked), then its body in one or
 * more pieces (views into the bytes pushed, never copies), the last with `last: true`.
 */
export type WireEvent =
  | { kind: 'frame'; frame: Frame }
  /** `placed`: the bytes were read straight into their destination (see `pushPlaced`). */
  | { kind: 'body'; bytes: Uint8Array; last: boolean; placed?: true };

/** A broken rule of the format, found while decoding; `next()` reports it in the reader's phase. */
class WireViolation extends Error {}
const protocolError = (message: string) => new WireViolation(message);

/**
 * A pure, pull-based decoder of one direction of one channel: `push` bytes as they arrive, take
 * events with `next()` until it returns undefined (more bytes needed), call `end()` at EOF. The
 * reader may stop pulling at any event (to apply backpressure) and continue later. Every length
 * is checked against its limit before anything is allocated; a violation throws
 * ERR_MIGRATION_PROTOCOL and the decoder is then unusable.
 */
export class FrameDecoder {
  readonly direction: WireDirection;
  readonly #chunks: Uint8Array[] = [];
  #chunkOffset = 0;
  #buffered = 0;
  /** Body bytes of the current frame still to deliver. */
  #bodyLeft = 0;
  #failed: MigrationError | undefined;
  #framesDecoded = 0;
  #placed: Uint8Array | undefined;
  readonly #phase: () => MigrationPhase;
  readonly #where: (() => string) | undefined;

  /**
   * `phase` names the migration phase a protocol error is reported in (default 'load'); `where`,
   * if given, names the stream at the start of its messages ("multifd channel 2: …").
   */
  constructor(direction: WireDirection, phase: () => MigrationPhase = () => 'load', where?: () => string) {
    this.direction = direction;
    this.#phase = phase;
    this.#where = where;
  }

  /** Bytes pushed and not yet decoded. */
  get bufferedBytes(): number {
    return this.#buffered;
  }

  get framesDecoded(): number {
    return this.#framesDecoded;
  }

  /** Is the decoder between frames (nothing partial pending)? */
  get atFrameBoundary(): boolean {
    return this.#buffered === 0 && this.#bodyLeft === 0;
  }

  /**
   * Bytes still missing before the current frame's header and meta are complete: 0 inside a body
   * (a reader that places bodies reads just these, so no body byte lands in its staging buffer).
   */
  get headerBytesMissing(): number {
    if (this.#bodyLeft > 0 || this.#placed !== undefined) return 0;
    if (this.#buffered < FRAME_HEADER_BYTES) return FRAME_HEADER_BYTES - this.#buffered;
    const header = this.#peek(FRAME_HEADER_BYTES);
    const metaBytes = new DataView(header.buffer, header.byteOffset, FRAME_HEADER_BYTES).getUint32(4);
    return Math.max(0, FRAME_HEADER_BYTES + Math.min(metaBytes, MAX_META_BYTES + 1) - this.#buffered);
  }

  /** Body bytes of the current frame not yet delivered (0 between frames). */
  get bodyBytesLeft(): number {
    return this.#bodyLeft;
  }

  /**
   * Body bytes the reader had the socket write straight to where they belong (a RAM page run): the
   * decoder, with nothing else buffered, delivers them as a `placed` body event without looking at
   * them. They must not exceed what is left of the current body.
   */
  pushPlaced(bytes: Uint8Array): void {
    if (this.#buffered !== 0 || this.#placed !== undefined || bytes.length > this.#bodyLeft) {
      throw internalError(
        `${bytes.length} placed bytes with ${this.#buffered} buffered, ${this.#bodyLeft} body left`,
      );
    }
    if (bytes.length > 0) this.#placed = bytes;
  }

  /**
   * Copy the bytes still buffered into memory of the decoder's own, so the caller may reuse the
   * buffers it pushed (a reader with one read buffer calls this after each read).
   */
  detach(): void {
    if (this.#buffered === 0) return;
    const own = new Uint8Array(this.#buffered);
    let at = 0;
    for (const [i, chunk] of this.#chunks.entries()) {
      const piece = i === 0 ? chunk.subarray(this.#chunkOffset) : chunk;
      own.set(piece, at);
      at += piece.length;
    }
    this.#chunks.length = 0;
    this.#chunks.push(own);
    this.#chunkOffset = 0;
  }

  push(chunk: Uint8Array): void {
    if (chunk.length === 0) return;
    this.#chunks.push(chunk);
    this.#buffered += chunk.length;
  }

  next(): WireEvent | undefined {
    if (this.#failed) throw this.#failed;
    try {
      return this.#next();
    } catch (err) {
      if (!(err instanceof WireViolation)) throw err;
      throw this.#fail(err.message);
    }
  }

  /** The stream ended: an error if it stopped inside a frame (a truncated stream). */
  end(): void {
    if (this.#failed) throw this.#failed;
    if (!this.atFrameBoundary) {
      throw this.#fail(
        this.#bodyLeft > 0
          ? `stream truncated: ${this.#bodyLeft} bytes of a frame body missing`
          : `stream truncated inside a frame header (${this.#buffered} bytes)`,
      );
    }
  }

  #fail(message: string): MigrationError {
    const where = this.#where?.();
    this.#failed = new MigrationError(
      MigrationErrorCode.PROTOCOL,
      this.#phase(),
      where === undefined ? message : `${where}: ${message}`,
    );
    return this.#failed;
  }

  #next(): WireEvent | undefined {
    const placed = this.#placed;
    if (placed !== undefined) {
      this.#placed = undefined;
      this.#bodyLeft -= placed.length;
      return { kind: 'body', bytes: placed, last: this.#bodyLeft === 0, placed: true };
    }
    if (this.#bodyLeft > 0) {
      if (this.#buffered === 0) return undefined;
      const chunk = this.#chunks[0]!;
      const n = Math.min(chunk.length - this.#chunkOffset, this.#bodyLeft);
      const bytes = chunk.subarray(this.#chunkOffset, this.#chunkOffset + n);
      this.#consume(n);
      this.#bodyLeft -= n;
      return { kind: 'body', bytes, last: this.#bodyLeft === 0 };
    }
    if (this.#buffered < FRAME_HEADER_BYTES) return undefined;
    const header = this.#peek(FRAME_HEADER_BYTES);
    const hv = new DataView(header.buffer, header.byteOffset, FRAME_HEADER_BYTES);
    const type = hv.getUint8(0);
    const allowed = this.direction === 'to-destination' ? TO_DESTINATION : TO_SOURCE;
    if (!allowed.has(type)) {
      throw protocolError(`unknown frame type 0x${type.toString(16)} on a stream ${this.direction}`);
    }
    if (hv.getUint8(1) !== 0 || hv.getUint16(2) !== 0) {
      throw protocolError(`frame ${FRAME_TYPE_NAMES[type]}: reserved header bytes are not zero`);
    }
    const metaBytes = hv.getUint32(4);
    const bodyBytes = hv.getUint32(8);
    checkLengths(type, metaBytes, bodyBytes);
    if (this.#buffered < FRAME_HEADER_BYTES + metaBytes) return undefined;
    const all = this.#peek(FRAME_HEADER_BYTES + metaBytes);
    const meta = all.subarray(FRAME_HEADER_BYTES);
    const frame = parseMeta(type as FrameTypeValue, meta, bodyBytes);
    this.#consume(FRAME_HEADER_BYTES + metaBytes);
    this.#bodyLeft = bodyBytes;
    this.#framesDecoded++;
    return { kind: 'frame', frame };
  }

  /** The first `n` buffered bytes, contiguous (a view when they lie in one chunk, else a copy ≤ 64 KiB). */
  #peek(n: number): Uint8Array {
    const first = this.#chunks[0]!;
    if (first.length - this.#chunkOffset >= n)
      return first.subarray(this.#chunkOffset, this.#chunkOffset + n);
    const out = new Uint8Array(n);
    let filled = 0;
    let offset = this.#chunkOffset;
    for (const chunk of this.#chunks) {
      const take = Math.min(chunk.length - offset, n - filled);
      out.set(chunk.subarray(offset, offset + take), filled);
      filled += take;
      offset = 0;
      if (filled === n) break;
    }
    return out;
  }

  #consume(n: number): void {
    this.#buffered -= n;
    while (n > 0) {
      const chunk = this.#chunks[0]!;
      const left = chunk.length - this.#chunkOffset;
      if (n < left) {
        this.#chunkOffset += n;
        return;
      }
      n -= left;
      this.#chunks.shift();
      this.#chunkOffset = 0;
    }
  }
}

const JSON_TYPES: ReadonlySet<number> = new Set([FrameType.HELLO, FrameType.ACCEPT, FrameType.ERROR]);

/** Meta length each fixed-layout type must have (RAM_PAGES: its minimum). */
const FIXED_META: Readonly<Record<number, number>> = {
  [FrameType.RAM_PAGES]: 12,
  [FrameType.SYNC]: 4,
  [FrameType.DEVICE_PRECOPY]: 4,
  [FrameType.INIT_DATA_SENT]: 4,
  [FrameType.SWITCHOVER]: 0,
  [FrameType.DEVICE_STATE]: 12,
  [FrameType.CHANNEL_END]: 4,
  [FrameType.COMPLETE]: 4,
  [FrameType.RAM_PLUGGED]: 8,
  [FrameType.HANDOFF]: 0,
  [FrameType.SWITCHOVER_ACK]: 0,
  [FrameType.LOADED]: 0,
  [FrameType.RUNNING]: 0,
};

const BODY_LIMIT: Readonly<Record<number, number>> = {
  [FrameType.RAM_PAGES]: MAX_NORMAL_PAGES * RAM_PAGE_BYTES,
  [FrameType.DEVICE_PRECOPY]: MAX_DEVICE_PACKET_BYTES,
  [FrameType.DEVICE_STATE]: MAX_DEVICE_PACKET_BYTES,
  [FrameType.RAM_PLUGGED]: MAX_PLUG_BLOCKS / 8,
};

function checkLengths(type: number, metaBytes: number, bodyBytes: number): void {
  const name = FRAME_TYPE_NAMES[type];
  if (JSON_TYPES.has(type)) {
    if (metaBytes === 0 || metaBytes > MAX_META_BYTES) {
      throw protocolError(`frame ${name}: JSON meta of ${metaBytes} bytes (1..${MAX_META_BYTES})`);
    }
  } else if (type === FrameType.RAM_PAGES) {
    const max = 12 + 4 * (MAX_NORMAL_PAGES + MAX_ZERO_PAGES);
    if (metaBytes < 12 || metaBytes > max || metaBytes % 4 !== 0) {
      throw protocolError(`frame RAM_PAGES: meta of ${metaBytes} bytes`);
    }
  } else if (metaBytes !== FIXED_META[type]) {
    throw protocolError(`frame ${name}: meta of ${metaBytes} bytes, expected ${FIXED_META[type]}`);
  }
  const limit = BODY_LIMIT[type] ?? 0;
  if (bodyBytes > limit) {
    throw protocolError(`frame ${name}: body of ${bodyBytes} bytes exceeds the limit of ${limit}`);
  }
}

function parseMeta(type: FrameTypeValue, meta: Uint8Array, bodyBytes: number): Frame {
  const v = new DataView(meta.buffer, meta.byteOffset, meta.byteLength);
  const name = FRAME_TYPE_NAMES[type];
  const noReserved = (at: number) => {
    if (v.getUint16(at) !== 0) throw protocolError(`frame ${name}: reserved meta bytes are not zero`);
  };
  switch (type) {
    case FrameType.HELLO:
    case FrameType.ACCEPT:
    case FrameType.ERROR: {
      let json: unknown;
      try {
        json = JSON.parse(new TextDecoder('utf-8', { fatal: true }).decode(meta));
      } catch (err) {
        throw protocolError(`frame ${name}: meta is not UTF-8 JSON: ${(err as Error).message}`);
      }
      return { type, json };
    }
    case FrameType.RAM_PAGES: {
      const block = v.getUint16(0);
      noReserved(2);
      const normal = v.getUint32(4);
      const zero = v.getUint32(8);
      if (normal > MAX_NORMAL_PAGES || zero > MAX_ZERO_PAGES || normal + zero === 0) {
        throw protocolError(`frame RAM_PAGES: ${normal} pages with data and ${zero} zero pages`);
      }
      if (meta.length !== 12 + 4 * (normal + zero)) {
        throw protocolError(`frame RAM_PAGES: meta of ${meta.length} bytes for ${normal + zero} pages`);
      }
      if (bodyBytes !== normal * RAM_PAGE_BYTES) {
        throw protocolError(`frame RAM_PAGES: body of ${bodyBytes} bytes for ${normal} pages`);
      }
      const pages = new Uint32Array(normal + zero);
      for (let i = 0; i < pages.length; i++) pages[i] = v.getUint32(12 + 4 * i);
      return { type, block, normal: pages.subarray(0, normal), zero: pages.subarray(normal), bodyBytes };
    }
    case FrameType.SYNC:
    case FrameType.COMPLETE:
      return { type, round: v.getUint32(0) };
    case FrameType.CHANNEL_END:
      return { type, frames: v.getUint32(0) };
    case FrameType.DEVICE_PRECOPY:
      noReserved(2);
      if (bodyBytes === 0) throw protocolError('frame DEVICE_PRECOPY: empty body');
      return { type, device: v.getUint16(0), bodyBytes };
    case FrameType.INIT_DATA_SENT:
      noReserved(2);
      return { type, device: v.getUint16(0) };
    case FrameType.DEVICE_STATE: {
      noReserved(2);
      const index = v.getUint32(4);
      const flags = v.getUint32(8);
      if (index === 0xffffffff) throw protocolError('frame DEVICE_STATE: index 0xffffffff is invalid');
      if ((flags & ~DEVICE_STATE_CONFIG) !== 0) {
        throw protocolError(`frame DEVICE_STATE: unknown flags 0x${flags.toString(16)}`);
      }
      return { type, device: v.getUint16(0), index, flags, bodyBytes };
    }
    case FrameType.RAM_PLUGGED: {
      noReserved(2);
      const blocks = v.getUint32(4);
      if (blocks > MAX_PLUG_BLOCKS || bodyBytes !== Math.ceil(blocks / 8)) {
        throw protocolError(`frame RAM_PLUGGED: ${blocks} blocks in a ${bodyBytes}-byte bitmap`);
      }
      return { type, block: v.getUint16(0), blocks, bodyBytes };
    }
    case FrameType.SWITCHOVER:
    case FrameType.HANDOFF:
    case FrameType.SWITCHOVER_ACK:
    case FrameType.LOADED:
    case FrameType.RUNNING:
      return { type };
  }
}

// ---- encoders: header + meta as one buffer; bodies are written after it as they are -------------

function frame(type: FrameTypeValue, metaBytes: number, bodyBytes: number): { out: Buffer; meta: DataView } {
  const out = Buffer.allocUnsafe(FRAME_HEADER_BYTES + metaBytes);
  out.writeUInt8(type, 0);
  out.writeUInt8(0, 1);
  out.writeUInt16BE(0, 2);
  out.writeUInt32BE(metaBytes, 4);
  out.writeUInt32BE(bodyBytes, 8);
  return { out, meta: new DataView(out.buffer, out.byteOffset + FRAME_HEADER_BYTES, metaBytes) };
}

/** A JSON frame (HELLO, ACCEPT, ERROR). */
export function encodeJsonFrame(
  type: typeof FrameType.HELLO | typeof FrameType.ACCEPT | typeof FrameType.ERROR,
  value: unknown,
): Buffer {
  const text = Buffer.from(JSON.stringify(value), 'utf8');
  if (text.length === 0 || text.length > MAX_META_BYTES) {
    throw internalError(`a ${FRAME_TYPE_NAMES[type]} of ${text.length} bytes does not fit a frame`);
  }
  const { out } = frame(type, text.length, 0);
  text.copy(out, FRAME_HEADER_BYTES);
  return out;
}

/** A frame without meta or body (SWITCHOVER, HANDOFF, SWITCHOVER_ACK, LOADED, RUNNING). */
export function encodeEmptyFrame(
  type:
    | typeof FrameType.SWITCHOVER
    | typeof FrameType.HANDOFF
    | typeof FrameType.SWITCHOVER_ACK
    | typeof FrameType.LOADED
    | typeof FrameType.RUNNING,
): Buffer {
  return frame(type, 0, 0).out;
}

/** A frame whose meta is one u32 (SYNC, COMPLETE, CHANNEL_END). */
export function encodeU32Frame(
  type: typeof FrameType.SYNC | typeof FrameType.COMPLETE | typeof FrameType.CHANNEL_END,
  value: number,
): Buffer {
  const { out, meta } = frame(type, 4, 0);
  meta.setUint32(0, value);
  return out;
}

/** RAM_PAGES header: `normal` pages follow as the body (4 KiB each, in that order). */
export function encodeRamPages(block: number, normal: ArrayLike<number>, zero: ArrayLike<number>): Buffer {
  const count = normal.length + zero.length;
  const { out, meta } = frame(FrameType.RAM_PAGES, 12 + 4 * count, normal.length * RAM_PAGE_BYTES);
  meta.setUint16(0, block);
  meta.setUint16(2, 0);
  meta.setUint32(4, normal.length);
  meta.setUint32(8, zero.length);
  for (let i = 0; i < normal.length; i++) meta.setUint32(12 + 4 * i, normal[i]!);
  for (let i = 0; i < zero.length; i++) meta.setUint32(12 + 4 * (normal.length + i), zero[i]!);
  return out;
}

/** DEVICE_PRECOPY or INIT_DATA_SENT header (`bodyBytes` of device data follow a precopy frame). */
export function encodeDeviceFrame(
  type: typeof FrameType.DEVICE_PRECOPY | typeof FrameType.INIT_DATA_SENT,
  device: number,
  bodyBytes = 0,
): Buffer {
  const { out, meta } = frame(type, 4, bodyBytes);
  meta.setUint16(0, device);
  meta.setUint16(2, 0);
  return out;
}

/** DEVICE_STATE header; `bodyBytes` of state follow. */
export function encodeDeviceState(device: number, index: number, flags: number, bodyBytes: number): Buffer {
  const { out, meta } = frame(FrameType.DEVICE_STATE, 12, bodyBytes);
  meta.setUint16(0, device);
  meta.setUint16(2, 0);
  meta.setUint32(4, index);
  meta.setUint32(8, flags);
  return out;
}

/** RAM_PLUGGED header; the bitmap (`⌈blocks / 8⌉` bytes, bit i of byte i>>3 = block i) follows. */
export function encodeRamPlugged(block: number, blocks: number): Buffer {
  const { out, meta } = frame(FrameType.RAM_PLUGGED, 8, Math.ceil(blocks / 8));
  meta.setUint16(0, block);
  meta.setUint16(2, 0);
  meta.setUint32(4, blocks);
  return out;
}
