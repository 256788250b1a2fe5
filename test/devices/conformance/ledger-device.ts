import { createHash } from 'node:crypto';
import type {
  SampleDevice,
  SampleDeviceFactory,
  SampleDeviceOptions,
} from '../../../src/devices/sample-device.js';
import {
  ArcBrokeDevice,
  type MigrationDriver,
  type PrecopyInfo,
  type ResumingSession,
  type SavingSession,
} from '../../../src/kernel/vfio/migration-driver.js';
import { VfioDevice } from '../../../src/kernel/vfio/vfio-device.js';
import { kernelError } from '../../../src/uapi/error.js';
import { MigFeature } from '../../../src/uapi/migration.js';

/**
 * "ledger": a small but real migratable device for testing the conformance kit. Its state is a set
 * of pages plus registers, a PRNG and an operation counter; work() changes pages and registers.
 * It tracks the pages it dirties during PRE_COPY and sends them again, and its stream is
 * checksummed record by record:
 *
 *   header:  u32 magic "LDGR" | u16 version | u16 pageCount | u16 pageBytes | u8 typeLen |
 *            type[typeLen] | u32 crc32(header so far)
 *   record:  u8 kind | u16 index | payload | u32 crc32(kind..payload)
 *            kind 1 PAGE  index = page, payload = pageBytes of page content
 *            kind 2 REGS  index = 0,    payload = 8 x u32 regs | u32 rng | u32 ops
 *            kind 3 END   index = 0,    payload = u32 number of records before END
 *
 * Every stream carries every page at least once, then REGS, then END. All little-endian.
 *
 * `flaws` switch on one realistic bug each, for the kit's own tests.
 */
export interface LedgerFlaws {
  /** RESUMING -> STOP loads whatever arrived, even without the END record. */
  acceptsTruncated?: boolean;
  /** At the end of STOP_COPY data, read() fails ENOMSG instead of returning 0. */
  stopCopyEnomsg?: boolean;
  /** Record checksums are not verified on load. */
  ignoresChecksum?: boolean;
  /** Pages written during PRE_COPY are not tracked: dirty_bytes stays 0 and they are never resent. */
  noDirtyTracking?: boolean;
  /** work() changes state even while the device is stopped. */
  worksWhileStopped?: boolean;
}

export interface LedgerOptions extends SampleDeviceOptions {
  pageCount?: number;
  pageBytes?: number;
  /** A bad stream at RESUMING -> STOP: stay in RESUMING (plain EINVAL) or break to ERROR. */
  badLoad?: 'stay' | 'error';
  flaws?: LedgerFlaws;
  /** The VfioDevice class to wrap the driver in (broken FSM variants subclass it). */
  vfioClass?: typeof VfioDevice;
}

const MAGIC = 0x5244474c; // "LDGR"
const VERSION = 1;
const REG_COUNT = 8;
const KIND_PAGE = 1;
const KIND_REGS = 2;
const KIND_END = 3;
/** A resume stream longer than this can never be valid for our sizes; refused before buffering. */
const MAX_RESUME_BYTES = 16 << 20;

const CRC_TABLE = (() => {
  const table = new Uint32Array(256);
  for (let n = 0; n < 256; n++) {
    let c = n;
    for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
    table[n] = c >>> 0;
  }
  return table;
})();

export function crc32(bytes: Uint8Array): number {
  let c = 0xffffffff;
  for (const b of bytes) c = CRC_TABLE[(c ^ b) & 0xff]! ^ (c >>> 8);
  return (c ^ 0xffffffff) >>> 0;
}

function xorshift(x: number): number {
  let v = x >>> 0 || 0x9e3779b9;
  v ^= v << 13;
  v ^= v >>> 17;
  v ^= v << 5;
  return v >>> 0;
}

/** The device's migratable state. */
class LedgerState {
  readonly pages: Uint8Array;
  readonly regs = new Uint32Array(REG_COUNT);
  rng = 0;
  ops = 0;

  constructor(
    readonly pageCount: number,
    readonly pageBytes: number,
  ) {
    this.pages = new Uint8Array(pageCount * pageBytes);
  }

  powerOn(seed: number): void {
    let r = xorshift(seed ^ 0x5bd1e995);
    for (let i = 0; i < this.pages.length; i++) {
      r = xorshift(r);
      this.pages[i] = r & 0xff;
    }
    this.regs.fill(0);
    this.rng = xorshift(r);
    this.ops = 0;
  }

  page(index: number): Uint8Array {
    return this.pages.subarray(index * this.pageBytes, (index + 1) * this.pageBytes);
  }

  copyFrom(other: LedgerState): void {
    this.pages.set(other.pages);
    this.regs.set(other.regs);
    this.rng = other.rng;
    this.ops = other.ops;
  }

  digest(): string {
    const h = createHash('sha256');
    const meta = new DataView(new ArrayBuffer(16));
    meta.setUint32(0, this.pageCount, true);
    meta.setUint32(4, this.pageBytes, true);
    meta.setUint32(8, this.rng, true);
    meta.setUint32(12, this.ops, true);
    h.update(new Uint8Array(meta.buffer));
    h.update(this.pages);
    h.update(new Uint8Array(this.regs.buffer));
    return h.digest('hex');
  }
}

function withCrc(body: Uint8Array): Uint8Array {
  const out = new Uint8Array(body.length + 4);
  out.set(body);
  new DataView(out.buffer).setUint32(body.length, crc32(body), true);
  return out;
}

function record(kind: number, index: number, payload: Uint8Array): Uint8Array {
  const body = new Uint8Array(3 + payload.length);
  body[0] = kind;
  new DataView(body.buffer).setUint16(1, index, true);
  body.set(payload, 3);
  return withCrc(body);
}

function header(type: string, pageCount: number, pageBytes: number): Uint8Array {
  const name = new TextEncoder().encode(type);
  const body = new Uint8Array(11 + name.length);
  const v = new DataView(body.buffer);
  v.setUint32(0, MAGIC, true);
  v.setUint16(4, VERSION, true);
  v.setUint16(6, pageCount, true);
  v.setUint16(8, pageBytes, true);
  body[10] = name.length;
  body.set(name, 11);
  return withCrc(body);
}

function regsPayload(state: LedgerState): Uint8Array {
  const out = new Uint8Array(REG_COUNT * 4 + 8);
  const v = new DataView(out.buffer);
  for (const [i, r] of state.regs.entries()) v.setUint32(i * 4, r, true);
  v.setUint32(REG_COUNT * 4, state.rng, true);
  v.setUint32(REG_COUNT * 4 + 4, state.ops, true);
  return out;
}

function payloadBytes(kind: number, pageBytes: number): number | undefined {
  if (kind === KIND_PAGE) return pageBytes;
  if (kind === KIND_REGS) return REG_COUNT * 4 + 8;
  if (kind === KIND_END) return 4;
  return undefined;
}

class LedgerDriver implements MigrationDriver {
  readonly deviceType: string;
  readonly migrationFlags: number;
  readonly dmaLogging = false;
  readonly state: LedgerState;
  readonly flaws: LedgerFlaws;
  readonly badLoad: 'stay' | 'error';
  readonly #seed: number;
  running = true;
  saving: LedgerSaving | undefined;

  constructor(type: string, options: LedgerOptions) {
    this.deviceType = type;
    this.migrationFlags =
      options.migrationFlags ?? MigFeature.STOP_COPY | MigFeature.P2P | MigFeature.PRE_COPY;
    this.state = new LedgerState(options.pageCount ?? 32, options.pageBytes ?? 64);
    this.flaws = options.flaws ?? {};
    this.badLoad = options.badLoad ?? 'stay';
    this.#seed = options.seed ?? 1;
    this.state.powerOn(this.#seed);
  }

  stop(): void {
    this.running = false;
  }

  start(): void {
    this.running = true;
  }

  setP2pQuiesced(): void {}

  startSaving(options: { precopy: boolean }): SavingSession {
    this.saving = new LedgerSaving(this, !options.precopy);
    return this.saving;
  }

  startResuming(): ResumingSession {
    return new LedgerResuming(this);
  }

  stopCopyLength(): bigint {
    const s = this.state;
    const rec = 7 + s.pageBytes;
    return BigInt(header(this.deviceType, s.pageCount, s.pageBytes).length + s.pageCount * rec + 7 + 40 + 11);
  }

  reset(): void {
    this.saving = undefined;
    this.state.powerOn(this.#seed);
    this.running = true;
  }

  work(units: number): void {
    if (!this.running && !this.flaws.worksWhileStopped) return;
    const s = this.state;
    for (let i = 0; i < units; i++) {
      s.rng = xorshift(s.rng);
      const page = s.rng % s.pageCount;
      const offset = (s.rng >>> 8) % s.pageBytes;
      s.pages[page * s.pageBytes + offset]! ^= ((s.rng >>> 16) & 0xff) | 1;
      s.regs[page % REG_COUNT]! += 1;
      s.ops = (s.ops + 1) >>> 0;
      this.saving?.markDirty(page);
    }
  }
}

class LedgerSaving implements SavingSession {
  readonly #driver: LedgerDriver;
  #stopCopy: boolean;
  #headerSent = false;
  readonly #initialLeft: Set<number>;
  readonly #dirty = new Set<number>();
  #pending: Uint8Array = new Uint8Array(0);
  #pendingAt = 0;
  #pendingClass: 'initial' | 'dirty' | 'final' = 'initial';
  #records = 0;
  #finalSent = false;

  constructor(driver: LedgerDriver, stopCopy: boolean) {
    this.#driver = driver;
    this.#stopCopy = stopCopy;
    this.#initialLeft = new Set(Array.from({ length: driver.state.pageCount }, (_, i) => i));
  }

  get #recordBytes(): number {
    return 7 + this.#driver.state.pageBytes;
  }

  markDirty(page: number): void {
    if (this.#driver.flaws.noDirtyTracking) return;
    if (!this.#initialLeft.has(page)) this.#dirty.add(page);
  }

  read(target: Uint8Array): number {
    let n = 0;
    while (n < target.length) {
      if (this.#pendingAt === this.#pending.length && !this.#next()) break;
      const take = Math.min(target.length - n, this.#pending.length - this.#pendingAt);
      target.set(this.#pending.subarray(this.#pendingAt, this.#pendingAt + take), n);
      this.#pendingAt += take;
      n += take;
    }
    if (n === 0 && this.#stopCopy && this.#finalSent && this.#driver.flaws.stopCopyEnomsg) {
      throw kernelError('ENOMSG', 'no more data');
    }
    return n;
  }

  #emit(bytes: Uint8Array, cls: 'initial' | 'dirty' | 'final'): true {
    this.#pending = bytes;
    this.#pendingAt = 0;
    this.#pendingClass = cls;
    return true;
  }

  #next(): boolean {
    const s = this.#driver.state;
    if (!this.#headerSent) {
      this.#headerSent = true;
      return this.#emit(header(this.#driver.deviceType, s.pageCount, s.pageBytes), 'initial');
    }
    for (const [set, cls] of [
      [this.#initialLeft, 'initial'],
      [this.#dirty, 'dirty'],
    ] as const) {
      const first = set.values().next();
      if (!first.done) {
        set.delete(first.value);
        this.#records++;
        return this.#emit(record(KIND_PAGE, first.value, s.page(first.value).slice()), cls);
      }
    }
    if (!this.#stopCopy || this.#finalSent) return false;
    this.#finalSent = true;
    const regs = record(KIND_REGS, 0, regsPayload(s));
    const count = new Uint8Array(4);
    new DataView(count.buffer).setUint32(0, this.#records + 1, true);
    const end = record(KIND_END, 0, count);
    const both = new Uint8Array(regs.length + end.length);
    both.set(regs);
    both.set(end, regs.length);
    return this.#emit(both, 'final');
  }

  precopyInfo(): PrecopyInfo {
    const s = this.#driver.state;
    const pending = this.#pending.length - this.#pendingAt;
    const headerBytes = this.#headerSent
      ? 0
      : header(this.#driver.deviceType, s.pageCount, s.pageBytes).length;
    const initial =
      headerBytes +
      this.#initialLeft.size * this.#recordBytes +
      (this.#pendingClass === 'initial' ? pending : 0);
    const dirty = this.#dirty.size * this.#recordBytes + (this.#pendingClass === 'dirty' ? pending : 0);
    return { initialBytes: BigInt(initial), dirtyBytes: BigInt(dirty) };
  }

  enterStopCopy(): void {
    this.#stopCopy = true;
    this.#driver.running = false;
  }

  end(): void {
    if (this.#driver.saving === this) this.#driver.saving = undefined;
  }
}

class LedgerResuming implements ResumingSession {
  readonly #driver: LedgerDriver;
  readonly #staging: LedgerState;
  #buffer = new Uint8Array(0);
  #total = 0;
  #headerSeen = false;
  #records = 0;
  #regsSeen = false;
  #ended = false;
  readonly #pagesSeen = new Set<number>();
  #poison: string | undefined;

  constructor(driver: LedgerDriver) {
    this.#driver = driver;
    driver.running = false;
    this.#staging = new LedgerState(driver.state.pageCount, driver.state.pageBytes);
  }

  #bad(message: string): never {
    this.#poison ??= message;
    throw kernelError('EINVAL', message);
  }

  write(chunk: Uint8Array): void {
    if (this.#poison) this.#bad(this.#poison);
    if (this.#total + chunk.length > MAX_RESUME_BYTES) this.#bad('stream too long');
    this.#total += chunk.length;
    const joined = new Uint8Array(this.#buffer.length + chunk.length);
    joined.set(this.#buffer);
    joined.set(chunk, this.#buffer.length);
    this.#buffer = joined;
    this.#parse();
  }

  #crcOk(bytes: Uint8Array): boolean {
    if (this.#driver.flaws.ignoresChecksum) return true;
    const v = new DataView(bytes.buffer, bytes.byteOffset, bytes.length);
    return crc32(bytes.subarray(0, bytes.length - 4)) === v.getUint32(bytes.length - 4, true);
  }

  #parse(): void {
    const s = this.#staging;
    for (;;) {
      const b = this.#buffer;
      const v = new DataView(b.buffer, b.byteOffset, b.length);
      if (!this.#headerSeen) {
        if (b.length < 11) return;
        if (v.getUint32(0, true) !== MAGIC) this.#bad('bad magic');
        if (v.getUint16(4, true) !== VERSION) this.#bad('unknown version');
        const len = 11 + b[10]! + 4;
        if (b.length < len) return;
        if (!this.#crcOk(b.subarray(0, len))) this.#bad('header checksum mismatch');
        const type = new TextDecoder().decode(b.subarray(11, 11 + b[10]!));
        if (type !== this.#driver.deviceType) this.#bad(`stream of device type ${type}`);
        if (v.getUint16(6, true) !== s.pageCount || v.getUint16(8, true) !== s.pageBytes) {
          this.#bad('stream geometry differs from this device');
        }
        this.#headerSeen = true;
        this.#buffer = b.subarray(len);
        continue;
      }
      if (b.length === 0) return;
      if (this.#ended) this.#bad('bytes after the END record');
      const payload = payloadBytes(b[0]!, s.pageBytes);
      if (payload === undefined) this.#bad(`unknown record kind ${b[0]}`);
      const len = 3 + payload + 4;
      if (b.length < len) return;
      const rec = b.subarray(0, len);
      if (!this.#crcOk(rec)) this.#bad('record checksum mismatch');
      const index = v.getUint16(1, true);
      const body = rec.subarray(3, 3 + payload);
      const bv = new DataView(body.buffer, body.byteOffset, body.length);
      if (b[0] === KIND_PAGE) {
        if (index >= s.pageCount) this.#bad(`page ${index} out of range`);
        s.page(index).set(body);
        this.#pagesSeen.add(index);
        this.#records++;
      } else if (b[0] === KIND_REGS) {
        for (let i = 0; i < REG_COUNT; i++) s.regs[i] = bv.getUint32(i * 4, true);
        s.rng = bv.getUint32(REG_COUNT * 4, true);
        s.ops = bv.getUint32(REG_COUNT * 4 + 4, true);
        this.#regsSeen = true;
        this.#records++;
      } else {
        if (bv.getUint32(0, true) !== this.#records) this.#bad('record count mismatch');
        this.#ended = true;
      }
      this.#buffer = b.subarray(len);
    }
  }

  finish(): void {
    const fail = (message: string): never => {
      throw this.#driver.badLoad === 'error'
        ? new ArcBrokeDevice('EINVAL', message)
        : kernelError('EINVAL', message);
    };
    if (this.#poison) fail(this.#poison);
    if (!this.#driver.flaws.acceptsTruncated) {
      if (!this.#ended || this.#buffer.length > 0) fail('stream is incomplete');
      if (!this.#regsSeen || this.#pagesSeen.size !== this.#staging.pageCount) fail('stream lacks state');
    }
    this.#driver.state.copyFrom(this.#staging);
  }

  end(): void {}
}

/** A ledger device: the VFIO device plus work() and digest(). */
export function createLedger(type: string, options: LedgerOptions = {}): SampleDevice {
  const driver = new LedgerDriver(type, options);
  const Vfio = options.vfioClass ?? VfioDevice;
  const vfio = new Vfio({ name: options.name ?? `${type}0`, driver });
  return {
    vfio,
    work: (units = 1) => driver.work(units),
    digest: () => driver.state.digest(),
  };
}

/** A factory of ledger devices with fixed defaults (flags, sizes, flaws) under a type name. */
export function ledgerFactory(
  type: string,
  description: string,
  defaults: LedgerOptions = {},
): SampleDeviceFactory<LedgerOptions> {
  return {
    type,
    description,
    create: (options = {}) => createLedger(type, { ...defaults, ...options }),
  };
}

/** The correct reference device, every migration feature. */
export const ledgerReference = ledgerFactory('ledger', 'reference ledger device (STOP_COPY|P2P|PRE_COPY)');
