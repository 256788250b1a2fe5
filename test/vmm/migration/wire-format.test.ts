// The migration wire format: every encoder against the pure FrameDecoder (round trips, arbitrary
// chunking, pull-based resumption) and every rule of the format refused with ERR_MIGRATION_PROTOCOL
// from the header or meta alone, before a body byte is buffered or anything is allocated for it.
import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import fc from 'fast-check';
import { MigrationError, MigrationErrorCode } from '../../../src/vmm/migration/migration-error.js';
import type { MigrationPhase } from '../../../src/vmm/migration/migration-info.js';
import {
  DEVICE_STATE_CONFIG,
  encodeDeviceFrame,
  encodeDeviceState,
  encodeEmptyFrame,
  encodeJsonFrame,
  encodeRamPages,
  encodeRamPlugged,
  encodeU32Frame,
  FRAME_HEADER_BYTES,
  FrameDecoder,
  FrameType,
  MAX_DEVICE_PACKET_BYTES,
  MAX_META_BYTES,
  MAX_NORMAL_PAGES,
  MAX_ZERO_PAGES,
  RAM_PAGE_BYTES,
  type WireDirection,
  type WireEvent,
} from '../../../src/vmm/migration/wire-format.js';

// ---- helpers ---------------------------------------------------------------------------------------

/** A frame as the decoder should report it: fields (typed arrays as plain arrays) and its whole body. */
interface Decoded {
  frame: Record<string, unknown>;
  body: Uint8Array;
}

function plain(frame: object): Record<string, unknown> {
  const out: Record<string, unknown> = {};
  for (const [k, v] of Object.entries(frame)) out[k] = v instanceof Uint32Array ? [...v] : v;
  return out;
}

function concat(parts: readonly Uint8Array[]): Uint8Array {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const p of parts) {
    out.set(p, at);
    at += p.length;
  }
  return out;
}

/**
 * Pull every available event, folding them into frames; checks the event order rules on the way
 * (a body piece only inside a frame that has body bytes, `last` exactly on its final piece).
 */
class Collector {
  readonly frames: Decoded[] = [];
  #pieces: Uint8Array[] | undefined;
  #left = 0;

  pull(decoder: FrameDecoder, max = Infinity): number {
    let n = 0;
    while (n < max) {
      const event = decoder.next();
      if (event === undefined) break;
      this.take(event);
      n++;
    }
    return n;
  }

  take(event: WireEvent): void {
    if (event.kind === 'frame') {
      assert.equal(this.#pieces, undefined, 'a frame while a body was pending');
      const bodyBytes = (event.frame as { bodyBytes?: number }).bodyBytes ?? 0;
      const decoded: Decoded = { frame: plain(event.frame), body: new Uint8Array(0) };
      this.frames.push(decoded);
      if (bodyBytes > 0) {
        this.#pieces = [];
        this.#left = bodyBytes;
      }
      return;
    }
    assert.ok(this.#pieces !== undefined, 'a body piece outside a frame');
    assert.ok(event.bytes.length > 0 && event.bytes.length <= this.#left);
    this.#pieces.push(event.bytes.slice());
    this.#left -= event.bytes.length;
    assert.equal(event.last, this.#left === 0, '`last` marks exactly the final piece');
    if (event.last) {
      this.frames[this.frames.length - 1]!.body = concat(this.#pieces);
      this.#pieces = undefined;
    }
  }

  get idle(): boolean {
    return this.#pieces === undefined;
  }
}

function decodeAll(bytes: Uint8Array, direction: WireDirection = 'to-destination'): Decoded[] {
  const decoder = new FrameDecoder(direction);
  decoder.push(bytes);
  const c = new Collector();
  c.pull(decoder);
  decoder.end();
  assert.ok(c.idle);
  assert.ok(decoder.atFrameBoundary);
  return c.frames;
}

/** A raw 12-byte header with any values, to write what the encoders never would. */
function header(type: number, metaBytes: number, bodyBytes: number, reserved = [0, 0, 0]): Uint8Array {
  const out = new Uint8Array(FRAME_HEADER_BYTES);
  const v = new DataView(out.buffer);
  v.setUint8(0, type);
  v.setUint8(1, reserved[0]!);
  v.setUint8(2, reserved[1]!);
  v.setUint8(3, reserved[2]!);
  v.setUint32(4, metaBytes);
  v.setUint32(8, bodyBytes);
  return out;
}

function u32s(...values: number[]): Uint8Array {
  const out = new Uint8Array(4 * values.length);
  const v = new DataView(out.buffer);
  values.forEach((x, i) => v.setUint32(4 * i, x));
  return out;
}

function u16s(...values: number[]): Uint8Array {
  const out = new Uint8Array(2 * values.length);
  const v = new DataView(out.buffer);
  values.forEach((x, i) => v.setUint16(2 * i, x));
  return out;
}

function isProtocolError(err: unknown, pattern: RegExp, phase: MigrationPhase = 'load'): boolean {
  assert.ok(err instanceof MigrationError, `not a MigrationError: ${String(err)}`);
  assert.equal(err.code, MigrationErrorCode.PROTOCOL);
  assert.equal(err.phase, phase);
  assert.match(err.message, pattern);
  return true;
}

/** Push `bytes` (often a header alone) and expect the next event to be the refusal. */
function refuses(bytes: Uint8Array, pattern: RegExp, direction: WireDirection = 'to-destination'): void {
  const decoder = new FrameDecoder(direction);
  decoder.push(bytes);
  assert.throws(
    () => decoder.next(),
    (err) => isProtocolError(err, pattern),
  );
}

const bytesOf = (n: number, seed = 1) => Uint8Array.from({ length: n }, (_, i) => (i * 31 + seed) & 0xff);

// ---- round trips -------------------------------------------------------------------------------------

describe('wire format: encoders and the decoder agree', () => {
  test('HELLO, ACCEPT and ERROR carry their JSON', () => {
    const hello = { magic: 'softvfio-migration', version: 1, kind: 'main', config: { ram: [1, 2] }, ü: 'ß' };
    const error = { code: 'ERR_MIGRATION_PROTOCOL', phase: 'load', message: 'x'.repeat(1000) };
    assert.deepEqual(decodeAll(encodeJsonFrame(FrameType.HELLO, hello)), [
      { frame: { type: FrameType.HELLO, json: hello }, body: new Uint8Array(0) },
    ]);
    assert.deepEqual(decodeAll(encodeJsonFrame(FrameType.ERROR, error)), [
      { frame: { type: FrameType.ERROR, json: error }, body: new Uint8Array(0) },
    ]);
    const accept = { magic: 'softvfio-migration', session: 'abcdef01' };
    assert.deepEqual(decodeAll(encodeJsonFrame(FrameType.ACCEPT, accept), 'to-source'), [
      { frame: { type: FrameType.ACCEPT, json: accept }, body: new Uint8Array(0) },
    ]);
    assert.deepEqual(decodeAll(encodeJsonFrame(FrameType.ERROR, error), 'to-source')[0]!.frame.json, error);
  });

  test('RAM_PAGES: block, page numbers with and without data, the data as the body', () => {
    const data = bytesOf(3 * RAM_PAGE_BYTES);
    const bytes = concat([encodeRamPages(7, [10, 11, 500], [0, 4, 99999]), data]);
    assert.equal(bytes.length, FRAME_HEADER_BYTES + 12 + 4 * 6 + data.length);
    assert.deepEqual(decodeAll(bytes), [
      {
        frame: {
          type: FrameType.RAM_PAGES,
          block: 7,
          normal: [10, 11, 500],
          zero: [0, 4, 99999],
          bodyBytes: 3 * RAM_PAGE_BYTES,
        },
        body: data,
      },
    ]);
    // only zero pages: no body; the largest counts allowed
    const zeros = Array.from({ length: MAX_ZERO_PAGES }, (_, i) => i);
    const normal = Array.from({ length: MAX_NORMAL_PAGES }, (_, i) => 2 * i);
    assert.deepEqual(decodeAll(encodeRamPages(0, [], zeros))[0]!.frame.zero, zeros);
    const full = decodeAll(concat([encodeRamPages(65535, normal, zeros), bytesOf(normal.length * 4096)]));
    assert.equal(full[0]!.frame.block, 65535);
    assert.deepEqual(full[0]!.frame.normal, normal);
    assert.equal(full[0]!.body.length, MAX_NORMAL_PAGES * RAM_PAGE_BYTES);
  });

  test('SYNC, COMPLETE, CHANNEL_END carry a u32; the empty frames carry nothing', () => {
    const bytes = concat([
      encodeU32Frame(FrameType.SYNC, 1),
      encodeU32Frame(FrameType.COMPLETE, 0xffffffff),
      encodeU32Frame(FrameType.CHANNEL_END, 12345),
      encodeEmptyFrame(FrameType.SWITCHOVER),
      encodeEmptyFrame(FrameType.HANDOFF),
    ]);
    assert.deepEqual(
      decodeAll(bytes).map((d) => d.frame),
      [
        { type: FrameType.SYNC, round: 1 },
        { type: FrameType.COMPLETE, round: 0xffffffff },
        { type: FrameType.CHANNEL_END, frames: 12345 },
        { type: FrameType.SWITCHOVER },
        { type: FrameType.HANDOFF },
      ],
    );
    const back = concat([
      encodeEmptyFrame(FrameType.SWITCHOVER_ACK),
      encodeEmptyFrame(FrameType.LOADED),
      encodeEmptyFrame(FrameType.RUNNING),
    ]);
    assert.deepEqual(
      decodeAll(back, 'to-source').map((d) => d.frame),
      [{ type: FrameType.SWITCHOVER_ACK }, { type: FrameType.LOADED }, { type: FrameType.RUNNING }],
    );
  });

  test('DEVICE_PRECOPY, INIT_DATA_SENT, DEVICE_STATE, RAM_PLUGGED', () => {
    const precopy = bytesOf(MAX_DEVICE_PACKET_BYTES, 3);
    const state = bytesOf(5000, 9);
    const config = new TextEncoder().encode('{"dma":{}}');
    const bitmap = Uint8Array.of(0b1010_0101, 0b1);
    const bytes = concat([
      encodeDeviceFrame(FrameType.DEVICE_PRECOPY, 2, precopy.length),
      precopy,
      encodeDeviceFrame(FrameType.INIT_DATA_SENT, 2),
      encodeDeviceState(1, 0, 0, state.length),
      state,
      encodeDeviceState(65535, 0xfffffffe, DEVICE_STATE_CONFIG, config.length),
      config,
      encodeDeviceState(3, 4, 0, 0),
      encodeRamPlugged(1, 9),
      bitmap,
      encodeRamPlugged(2, 0),
    ]);
    assert.deepEqual(decodeAll(bytes), [
      { frame: { type: FrameType.DEVICE_PRECOPY, device: 2, bodyBytes: precopy.length }, body: precopy },
      { frame: { type: FrameType.INIT_DATA_SENT, device: 2 }, body: new Uint8Array(0) },
      {
        frame: { type: FrameType.DEVICE_STATE, device: 1, index: 0, flags: 0, bodyBytes: state.length },
        body: state,
      },
      {
        frame: {
          type: FrameType.DEVICE_STATE,
          device: 65535,
          index: 0xfffffffe,
          flags: DEVICE_STATE_CONFIG,
          bodyBytes: config.length,
        },
        body: config,
      },
      // an empty device-state packet is well-formed here; the loader refuses it
      {
        frame: { type: FrameType.DEVICE_STATE, device: 3, index: 4, flags: 0, bodyBytes: 0 },
        body: new Uint8Array(0),
      },
      { frame: { type: FrameType.RAM_PLUGGED, block: 1, blocks: 9, bodyBytes: 2 }, body: bitmap },
      { frame: { type: FrameType.RAM_PLUGGED, block: 2, blocks: 0, bodyBytes: 0 }, body: new Uint8Array(0) },
    ]);
  });

  test('bodies come as views of the pushed chunks, never copies', () => {
    const body = bytesOf(8192);
    const decoder = new FrameDecoder('to-destination');
    decoder.push(encodeDeviceState(0, 0, 0, body.length));
    decoder.push(body.subarray(0, 100));
    decoder.push(body.subarray(100));
    assert.equal(decoder.next()?.kind, 'frame');
    const first = decoder.next();
    const second = decoder.next();
    assert.ok(first?.kind === 'body' && second?.kind === 'body');
    assert.equal(first.bytes.buffer, body.buffer);
    assert.equal(second.bytes.buffer, body.buffer);
    assert.deepEqual(
      [first.bytes.length, first.last, second.bytes.length, second.last],
      [100, false, 8092, true],
    );
  });

  test('JSON encoders refuse what no frame can carry (a bug, not a protocol error)', () => {
    assert.throws(
      () => encodeJsonFrame(FrameType.HELLO, { big: 'x'.repeat(MAX_META_BYTES) }),
      (err) => err instanceof Error && (err as { code?: string }).code === 'ERR_INTERNAL',
    );
  });
});

// ---- arbitrary frames, arbitrary chunking --------------------------------------------------------------

interface FrameSpec {
  bytes: Uint8Array;
  expect: Decoded;
}

const json = fc.jsonValue({ maxDepth: 2 }).map((v) => JSON.parse(JSON.stringify(v)) as unknown);
const u32 = fc.integer({ min: 0, max: 0xffffffff });
const u16 = fc.integer({ min: 0, max: 0xffff });
const small = (max: number) => fc.uint8Array({ minLength: 1, maxLength: max });

const jsonFrame = (type: typeof FrameType.HELLO | typeof FrameType.ACCEPT | typeof FrameType.ERROR) =>
  json.map((value): FrameSpec => ({
    bytes: encodeJsonFrame(type, value),
    expect: { frame: { type, json: value }, body: new Uint8Array(0) },
  }));

const emptyFrame = (
  type:
    | typeof FrameType.SWITCHOVER
    | typeof FrameType.HANDOFF
    | typeof FrameType.SWITCHOVER_ACK
    | typeof FrameType.LOADED
    | typeof FrameType.RUNNING,
) =>
  fc.constant<FrameSpec>({
    bytes: encodeEmptyFrame(type),
    expect: { frame: { type }, body: new Uint8Array(0) },
  });

const toDestination: fc.Arbitrary<FrameSpec> = fc.oneof(
  jsonFrame(FrameType.HELLO),
  jsonFrame(FrameType.ERROR),
  fc
    .record({
      block: u16,
      normal: fc.array(u32, { maxLength: 3 }),
      zero: fc.array(u32, { maxLength: 20 }),
      seed: fc.nat(255),
    })
    .filter((r) => r.normal.length + r.zero.length > 0)
    .map(({ block, normal, zero, seed }): FrameSpec => {
      const body = bytesOf(normal.length * RAM_PAGE_BYTES, seed);
      return {
        bytes: concat([encodeRamPages(block, normal, zero), body]),
        expect: {
          frame: { type: FrameType.RAM_PAGES, block, normal, zero, bodyBytes: body.length },
          body,
        },
      };
    }),
  ...([FrameType.SYNC, FrameType.COMPLETE] as const).map((type) =>
    u32.map((round): FrameSpec => ({
      bytes: encodeU32Frame(type, round),
      expect: { frame: { type, round }, body: new Uint8Array(0) },
    })),
  ),
  u32.map((frames): FrameSpec => ({
    bytes: encodeU32Frame(FrameType.CHANNEL_END, frames),
    expect: { frame: { type: FrameType.CHANNEL_END, frames }, body: new Uint8Array(0) },
  })),
  fc.tuple(u16, small(3000)).map(([device, body]): FrameSpec => ({
    bytes: concat([encodeDeviceFrame(FrameType.DEVICE_PRECOPY, device, body.length), body]),
    expect: { frame: { type: FrameType.DEVICE_PRECOPY, device, bodyBytes: body.length }, body },
  })),
  u16.map((device): FrameSpec => ({
    bytes: encodeDeviceFrame(FrameType.INIT_DATA_SENT, device),
    expect: { frame: { type: FrameType.INIT_DATA_SENT, device }, body: new Uint8Array(0) },
  })),
  fc
    .tuple(u16, fc.integer({ min: 0, max: 0xfffffffe }), fc.constantFrom(0, DEVICE_STATE_CONFIG))
    .chain(([device, index, flags]) =>
      fc.uint8Array({ maxLength: 3000 }).map((body): FrameSpec => ({
        bytes: concat([encodeDeviceState(device, index, flags, body.length), body]),
        expect: {
          frame: { type: FrameType.DEVICE_STATE, device, index, flags, bodyBytes: body.length },
          body,
        },
      })),
    ),
  fc.tuple(u16, fc.integer({ min: 0, max: 200 }), fc.nat(255)).map(([block, blocks, seed]): FrameSpec => {
    const body = bytesOf(Math.ceil(blocks / 8), seed);
    return {
      bytes: concat([encodeRamPlugged(block, blocks), body]),
      expect: { frame: { type: FrameType.RAM_PLUGGED, block, blocks, bodyBytes: body.length }, body },
    };
  }),
  emptyFrame(FrameType.SWITCHOVER),
  emptyFrame(FrameType.HANDOFF),
);

const toSource: fc.Arbitrary<FrameSpec> = fc.oneof(
  jsonFrame(FrameType.ACCEPT),
  jsonFrame(FrameType.ERROR),
  emptyFrame(FrameType.SWITCHOVER_ACK),
  emptyFrame(FrameType.LOADED),
  emptyFrame(FrameType.RUNNING),
);

/** Cut `bytes` at the given points (any values, folded into range). */
function cut(bytes: Uint8Array, points: readonly number[]): Uint8Array[] {
  const at = [...new Set(points.map((p) => p % (bytes.length + 1)))].sort((a, b) => a - b);
  const out: Uint8Array[] = [];
  let from = 0;
  for (const p of [...at, bytes.length]) {
    out.push(bytes.subarray(from, p));
    from = p;
  }
  return out;
}

function chunkedProperty(direction: WireDirection, frames: fc.Arbitrary<FrameSpec>) {
  return fc.property(
    fc.array(frames, { maxLength: 12 }),
    fc.array(fc.nat(), { maxLength: 40 }),
    fc.nat(3),
    (specs, points, pullEvery) => {
      const stream = concat(specs.map((s) => s.bytes));
      const decoder = new FrameDecoder(direction);
      const c = new Collector();
      for (const chunk of cut(stream, points)) {
        decoder.push(chunk);
        // 0: pull everything now; n: pull at most n events, leaving the rest for later
        c.pull(decoder, pullEvery === 0 ? Infinity : pullEvery);
      }
      c.pull(decoder);
      decoder.end();
      assert.equal(decoder.bufferedBytes, 0);
      assert.equal(decoder.framesDecoded, specs.length);
      assert.deepEqual(
        c.frames,
        specs.map((s) => s.expect),
      );
    },
  );
}

describe('wire format: any valid frames, cut anywhere, decode the same', () => {
  test('source → destination streams', () => {
    fc.assert(chunkedProperty('to-destination', toDestination), { numRuns: 300 });
  });
  test('return-path streams', () => {
    fc.assert(chunkedProperty('to-source', toSource), { numRuns: 200 });
  });
});

describe('wire format: a pull-based decoder', () => {
  test('next() returns undefined until a whole header and meta are there, then body bytes as they come', () => {
    const body = bytesOf(3000);
    const stream = concat([encodeDeviceState(4, 2, 0, body.length), body, encodeU32Frame(FrameType.SYNC, 9)]);
    const decoder = new FrameDecoder('to-destination');
    assert.equal(decoder.next(), undefined);
    assert.ok(decoder.atFrameBoundary);
    const headerAndMeta = FRAME_HEADER_BYTES + 12;
    for (let i = 0; i < headerAndMeta - 1; i++) {
      decoder.push(stream.subarray(i, i + 1));
      assert.equal(decoder.next(), undefined, `after ${i + 1} bytes`);
      assert.equal(decoder.atFrameBoundary, false);
    }
    decoder.push(stream.subarray(headerAndMeta - 1, headerAndMeta));
    assert.deepEqual(decoder.next(), {
      kind: 'frame',
      frame: { type: FrameType.DEVICE_STATE, device: 4, index: 2, flags: 0, bodyBytes: 3000 },
    });
    assert.equal(decoder.next(), undefined, 'no body bytes yet');
    assert.equal(decoder.atFrameBoundary, false);

    // the reader stops after the first piece (backpressure); more bytes arrive meanwhile
    decoder.push(stream.subarray(headerAndMeta, headerAndMeta + 1000));
    const piece = decoder.next();
    assert.ok(piece?.kind === 'body' && piece.bytes.length === 1000 && !piece.last);
    decoder.push(stream.subarray(headerAndMeta + 1000));
    assert.equal(decoder.bufferedBytes, 2000 + FRAME_HEADER_BYTES + 4);
    const rest = decoder.next();
    assert.ok(rest?.kind === 'body' && rest.bytes.length === 2000 && rest.last);
    assert.deepEqual(decoder.next(), { kind: 'frame', frame: { type: FrameType.SYNC, round: 9 } });
    assert.equal(decoder.next(), undefined);
    assert.equal(decoder.framesDecoded, 2);
    assert.ok(decoder.atFrameBoundary);
    decoder.end();
  });

  test('a reader that places bodies: headerBytesMissing says what to read, pushPlaced delivers body bytes in place', () => {
    const normal = [7, 8, 9];
    const header = encodeRamPages(0, normal, [3]);
    const decoder = new FrameDecoder('to-destination');
    assert.equal(decoder.headerBytesMissing, FRAME_HEADER_BYTES);
    decoder.push(header.subarray(0, 5));
    assert.equal(decoder.headerBytesMissing, FRAME_HEADER_BYTES - 5);
    decoder.push(header.subarray(5, FRAME_HEADER_BYTES));
    assert.equal(decoder.headerBytesMissing, header.length - FRAME_HEADER_BYTES, 'the meta is next');
    decoder.push(header.subarray(FRAME_HEADER_BYTES));
    assert.equal(decoder.headerBytesMissing, 0);
    const frame = decoder.next();
    assert.ok(frame?.kind === 'frame' && frame.frame.type === FrameType.RAM_PAGES);
    assert.equal(decoder.bodyBytesLeft, 3 * RAM_PAGE_BYTES);
    assert.equal(decoder.headerBytesMissing, 0, 'inside a body');
    // the socket wrote two pages where they belong, then the last one
    const pages = new Uint8Array(3 * RAM_PAGE_BYTES);
    decoder.pushPlaced(pages.subarray(0, 2 * RAM_PAGE_BYTES));
    assert.deepEqual(decoder.next(), {
      kind: 'body',
      bytes: pages.subarray(0, 2 * RAM_PAGE_BYTES),
      last: false,
      placed: true,
    });
    assert.equal(decoder.bodyBytesLeft, RAM_PAGE_BYTES);
    assert.throws(() => decoder.pushPlaced(new Uint8Array(RAM_PAGE_BYTES + 1)), /ERR_INTERNAL|placed bytes/);
    decoder.pushPlaced(pages.subarray(2 * RAM_PAGE_BYTES));
    const last = decoder.next();
    assert.ok(last?.kind === 'body' && last.placed === true && last.last);
    assert.ok(decoder.atFrameBoundary);
    assert.equal(decoder.headerBytesMissing, FRAME_HEADER_BYTES);
    // placing while bytes are buffered would reorder the stream: a bug, refused
    decoder.push(encodeU32Frame(FrameType.SYNC, 1).subarray(0, 3));
    assert.throws(() => decoder.pushPlaced(new Uint8Array(1)));
  });

  test('empty pushes are ignored', () => {
    const decoder = new FrameDecoder('to-source');
    decoder.push(new Uint8Array(0));
    assert.equal(decoder.next(), undefined);
    decoder.end();
  });
});

// ---- violations ------------------------------------------------------------------------------------------

describe('wire format: every violation is ERR_MIGRATION_PROTOCOL, found before allocating', () => {
  test('unknown frame types, and frames of the other direction', () => {
    refuses(header(0x00, 0, 0), /unknown frame type 0x0 on a stream to-destination/);
    refuses(header(0x20, 0, 0), /unknown frame type 0x20 on a stream to-destination/);
    refuses(header(0xff, 0, 0), /unknown frame type 0xff/);
    for (const type of [FrameType.ACCEPT, FrameType.SWITCHOVER_ACK, FrameType.LOADED, FrameType.RUNNING]) {
      refuses(
        header(type, 0, 0),
        new RegExp(`unknown frame type 0x${type.toString(16)} on a stream to-destination`),
      );
    }
    for (const type of [
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
    ]) {
      refuses(
        header(type, 4, 0),
        new RegExp(`unknown frame type 0x${type.toString(16)} on a stream to-source`),
        'to-source',
      );
    }
  });

  test('non-zero reserved header bytes', () => {
    refuses(
      header(FrameType.SWITCHOVER, 0, 0, [1, 0, 0]),
      /frame SWITCHOVER: reserved header bytes are not zero/,
    );
    refuses(header(FrameType.SYNC, 4, 0, [0, 0x80, 0]), /frame SYNC: reserved header bytes/);
    refuses(header(FrameType.LOADED, 0, 0, [0, 0, 1]), /frame LOADED: reserved header bytes/, 'to-source');
  });

  test('JSON meta of 0 bytes or more than 64 KiB (the header alone is refused)', () => {
    refuses(header(FrameType.HELLO, 0, 0), /frame HELLO: JSON meta of 0 bytes \(1\.\.65536\)/);
    refuses(header(FrameType.HELLO, MAX_META_BYTES + 1, 0), /frame HELLO: JSON meta of 65537 bytes/);
    refuses(header(FrameType.ERROR, 0xffffffff, 0), /frame ERROR: JSON meta of 4294967295 bytes/);
    refuses(header(FrameType.ACCEPT, MAX_META_BYTES + 1, 0), /frame ACCEPT: JSON meta/, 'to-source');
    refuses(header(FrameType.HELLO, 2, 1), /frame HELLO: body of 1 bytes exceeds the limit of 0/);
  });

  test('fixed-layout frames with another meta length, or a body they cannot have', () => {
    refuses(header(FrameType.SYNC, 3, 0), /frame SYNC: meta of 3 bytes, expected 4/);
    refuses(header(FrameType.SWITCHOVER, 4, 0), /frame SWITCHOVER: meta of 4 bytes, expected 0/);
    refuses(header(FrameType.DEVICE_STATE, 8, 10), /frame DEVICE_STATE: meta of 8 bytes, expected 12/);
    refuses(header(FrameType.CHANNEL_END, 0xffffffff, 0), /frame CHANNEL_END: meta of 4294967295 bytes/);
    refuses(header(FrameType.COMPLETE, 4, 4), /frame COMPLETE: body of 4 bytes exceeds the limit of 0/);
    refuses(header(FrameType.INIT_DATA_SENT, 4, 1), /frame INIT_DATA_SENT: body of 1 bytes/);
    refuses(header(FrameType.RUNNING, 0, 1), /frame RUNNING: body of 1 bytes/, 'to-source');
  });

  test('RAM_PAGES: page counts out of range, meta or body not matching them', () => {
    const ram = (normal: number, zero: number, metaBytes = 12 + 4 * (normal + zero), body = normal * 4096) =>
      concat([
        header(FrameType.RAM_PAGES, metaBytes, body),
        u16s(0, 0),
        u32s(normal, zero),
        new Uint8Array(metaBytes - 12),
      ]);
    refuses(
      ram(MAX_NORMAL_PAGES + 1, 0, undefined, 0),
      /frame RAM_PAGES: 129 pages with data and 0 zero pages/,
    );
    refuses(ram(0, MAX_ZERO_PAGES + 1), /frame RAM_PAGES: 0 pages with data and 8193 zero pages/);
    refuses(ram(0, 0), /frame RAM_PAGES: 0 pages with data and 0 zero pages/);
    refuses(ram(1, 1, 12 + 4 * 3), /frame RAM_PAGES: meta of 24 bytes for 2 pages/);
    refuses(ram(2, 0, undefined, 4096), /frame RAM_PAGES: body of 4096 bytes for 2 pages/);
    refuses(ram(1, 0, undefined, 0), /frame RAM_PAGES: body of 0 bytes for 1 pages/);
    // header-level: meta not a whole number of u32, too small, or beyond the most pages a frame lists
    refuses(header(FrameType.RAM_PAGES, 13, 0), /frame RAM_PAGES: meta of 13 bytes/);
    refuses(header(FrameType.RAM_PAGES, 8, 0), /frame RAM_PAGES: meta of 8 bytes/);
    refuses(
      header(FrameType.RAM_PAGES, 12 + 4 * (MAX_NORMAL_PAGES + MAX_ZERO_PAGES) + 4, 0),
      /frame RAM_PAGES: meta of 33296 bytes/,
    );
    refuses(
      header(FrameType.RAM_PAGES, 16, MAX_NORMAL_PAGES * RAM_PAGE_BYTES + 1),
      /frame RAM_PAGES: body of 524289 bytes exceeds the limit of 524288/,
    );
    refuses(
      concat([header(FrameType.RAM_PAGES, 16, 0), u16s(0, 1), u32s(0, 1, 0)]),
      /RAM_PAGES: reserved meta bytes/,
    );
  });

  test('a DEVICE_STATE header announcing more than 1 MiB is refused from its 12 bytes alone', () => {
    const decoder = new FrameDecoder('to-destination', () => 'stop-copy');
    decoder.push(header(FrameType.DEVICE_STATE, 12, MAX_DEVICE_PACKET_BYTES + 1));
    assert.equal(decoder.bufferedBytes, FRAME_HEADER_BYTES, 'only the header is there: no meta, no body');
    assert.throws(
      () => decoder.next(),
      (err) =>
        isProtocolError(
          err,
          /frame DEVICE_STATE: body of 1048577 bytes exceeds the limit of 1048576/,
          'stop-copy',
        ),
    );
    refuses(header(FrameType.DEVICE_STATE, 12, 0xffffffff), /body of 4294967295 bytes exceeds/);
    refuses(
      header(FrameType.DEVICE_PRECOPY, 4, MAX_DEVICE_PACKET_BYTES + 1),
      /frame DEVICE_PRECOPY: body of 1048577/,
    );
    refuses(header(FrameType.RAM_PLUGGED, 8, (1 << 21) + 1), /frame RAM_PLUGGED: body of 2097153 bytes/);
  });

  test('DEVICE_STATE: index 0xffffffff, unknown flags, reserved bytes', () => {
    const state = (device: number, reserved: number, index: number, flags: number) =>
      concat([header(FrameType.DEVICE_STATE, 12, 10), u16s(device, reserved), u32s(index, flags)]);
    refuses(state(0, 0, 0xffffffff, 0), /frame DEVICE_STATE: index 0xffffffff is invalid/);
    refuses(state(0, 0, 1, 2), /frame DEVICE_STATE: unknown flags 0x2/);
    refuses(state(0, 0, 1, 0x80000001), /unknown flags 0x80000001/);
    refuses(state(0, 7, 1, 0), /frame DEVICE_STATE: reserved meta bytes are not zero/);
  });

  test('DEVICE_PRECOPY without data, INIT_DATA_SENT with reserved bytes', () => {
    refuses(encodeDeviceFrame(FrameType.DEVICE_PRECOPY, 1, 0), /frame DEVICE_PRECOPY: empty body/);
    refuses(
      concat([header(FrameType.INIT_DATA_SENT, 4, 0), u16s(1, 1)]),
      /INIT_DATA_SENT: reserved meta bytes/,
    );
  });

  test('RAM_PLUGGED: bitmap size not ⌈blocks / 8⌉, too many blocks', () => {
    const plugged = (blocks: number, body: number) =>
      concat([header(FrameType.RAM_PLUGGED, 8, body), u16s(0, 0), u32s(blocks)]);
    refuses(plugged(9, 1), /frame RAM_PLUGGED: 9 blocks in a 1-byte bitmap/);
    refuses(plugged(8, 2), /frame RAM_PLUGGED: 8 blocks in a 2-byte bitmap/);
    refuses(plugged(0, 1), /0 blocks in a 1-byte bitmap/);
    refuses(plugged((1 << 24) + 1, 1 << 21), /16777217 blocks in a 2097152-byte bitmap/);
  });

  test('HELLO meta that is not UTF-8 JSON', () => {
    const hello = (meta: Uint8Array) => concat([header(FrameType.HELLO, meta.length, 0), meta]);
    refuses(hello(Uint8Array.of(0x7b, 0xff, 0x7d)), /frame HELLO: meta is not UTF-8 JSON/);
    refuses(hello(Uint8Array.of(0xc3)), /frame HELLO: meta is not UTF-8 JSON/);
    refuses(hello(new TextEncoder().encode('{"magic":')), /frame HELLO: meta is not UTF-8 JSON/);
    refuses(hello(new TextEncoder().encode('hello')), /frame HELLO: meta is not UTF-8 JSON/);
    const error = concat([header(FrameType.ERROR, 1, 0), Uint8Array.of(0x80)]);
    refuses(error, /frame ERROR: meta is not UTF-8 JSON/, 'to-source');
  });

  test('end() inside a header, a meta or a body: a truncated stream', () => {
    const truncated = (bytes: Uint8Array, pattern: RegExp) => {
      const decoder = new FrameDecoder('to-destination');
      decoder.push(bytes);
      new Collector().pull(decoder);
      assert.throws(
        () => decoder.end(),
        (err) => isProtocolError(err, pattern),
      );
    };
    truncated(
      header(FrameType.SYNC, 4, 0).subarray(0, 5),
      /stream truncated inside a frame header \(5 bytes\)/,
    );
    truncated(header(FrameType.SYNC, 4, 0), /stream truncated inside a frame header \(12 bytes\)/);
    truncated(encodeU32Frame(FrameType.SYNC, 1).subarray(0, 14), /inside a frame header \(14 bytes\)/);
    const body = bytesOf(100);
    truncated(
      concat([encodeDeviceState(0, 0, 0, 1000), body]),
      /stream truncated: 900 bytes of a frame body missing/,
    );
    truncated(encodeDeviceState(0, 0, 0, 1000), /stream truncated: 1000 bytes of a frame body missing/);
  });

  test('after an error the decoder keeps throwing it, whatever comes next', () => {
    const decoder = new FrameDecoder('to-destination');
    decoder.push(header(0x33, 0, 0));
    let first: unknown;
    assert.throws(
      () => decoder.next(),
      (err) => {
        first = err;
        return isProtocolError(err, /unknown frame type 0x33/);
      },
    );
    decoder.push(encodeEmptyFrame(FrameType.SWITCHOVER));
    assert.throws(
      () => decoder.next(),
      (err) => err === first,
    );
    assert.throws(
      () => decoder.next(),
      (err) => err === first,
    );
    assert.throws(
      () => decoder.end(),
      (err) => err === first,
    );
    // a truncation error sticks as well
    const short = new FrameDecoder('to-destination');
    short.push(header(FrameType.SYNC, 4, 0).subarray(0, 3));
    assert.throws(() => short.end(), /truncated/);
    short.push(header(FrameType.SYNC, 4, 0).subarray(3));
    assert.throws(() => short.next(), /truncated inside a frame header \(3 bytes\)/);
  });

  test('a decoder given a name puts it in its messages (a reader names its channel)', () => {
    let name = 'an incoming connection';
    const decoder = new FrameDecoder(
      'to-destination',
      () => 'stop-copy',
      () => name,
    );
    decoder.push(encodeJsonFrame(FrameType.HELLO, {}));
    assert.equal(decoder.next()?.kind, 'frame');
    name = 'multifd channel 2';
    decoder.push(encodeDeviceState(0, 0, 0, 10));
    decoder.next();
    assert.throws(
      () => decoder.end(),
      (err) =>
        isProtocolError(
          err,
          /^stop-copy: multifd channel 2: stream truncated: 10 bytes of a frame body missing$/,
          'stop-copy',
        ),
    );
  });

  test("the error's phase is the one the constructor's function names at the time of the failure", () => {
    let phase: MigrationPhase = 'precopy';
    const decoder = new FrameDecoder('to-destination', () => phase);
    decoder.push(encodeU32Frame(FrameType.SYNC, 1));
    assert.equal(decoder.next()?.kind, 'frame');
    phase = 'stop-copy';
    decoder.push(header(0x50, 0, 0));
    assert.throws(
      () => decoder.next(),
      (err) => isProtocolError(err, /^stop-copy: unknown frame type 0x50/, 'stop-copy'),
    );
    phase = 'cleanup';
    assert.throws(
      () => decoder.next(),
      (err) => err instanceof MigrationError && err.phase === 'stop-copy',
    );
    const handshake = new FrameDecoder('to-source', () => 'handshake');
    handshake.push(header(FrameType.ACCEPT, 0, 0));
    assert.throws(
      () => handshake.next(),
      (err) => isProtocolError(err, /^handshake: frame ACCEPT: JSON meta of 0 bytes/, 'handshake'),
    );
  });
});
