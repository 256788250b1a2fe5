import type { PrecopyInfo, SavingSession } from '../../kernel/vfio/migration-driver.js';
import type { DeviceStateImage, StateRegion } from './state-region.js';
import {
  CHUNK_BYTES,
  chainRecord,
  encodeRecordHeader,
  encodeStreamHeader,
  RECORD_HEADER_BYTES,
  RECORD_MAX_BYTES,
  RecordKind,
  STREAM_HEADER_BYTES,
} from './stream-format.js';

/** Per-chunk send state. */
const CLEAN = 0; // sent (or not to be sent in this phase)
const INITIAL = 1; // never sent yet
const DIRTY = 2; // changed after being sent

interface InFlight {
  region: StateRegion;
  offset: number;
  length: number;
  /** Payload bytes already copied out. */
  done: number;
  kind: typeof INITIAL | typeof DIRTY;
  /** Set when the device wrote the not-yet-sent part: the original bytes, copied once. */
  snapshot: Uint8Array | undefined;
}

/**
 * The source side of a device-state stream (see state-loader.ts for the layout). Bytes are produced
 * lazily into whatever buffer read() gets: payloads are copied exactly once, from region memory to
 * the target; record headers are built in one reusable 24-byte buffer.
 *
 * Precopy: every precopy-region chunk starts INITIAL; device writes turn sent chunks DIRTY (the
 * regions announce writes through their observer). A write into the unsent part of the record being
 * read snapshots that part first, so the payload always matches its checksum.
 */
export class StateSaver implements SavingSession {
  readonly #image: DeviceStateImage;
  readonly #dataReady: () => void;
  readonly #stopDevice: () => void;
  readonly #state: Uint8Array[];
  #phase: 'precopy' | 'final' | 'done';
  #pending = 0;
  #initialBytes = 0;
  #dirtyBytes = 0;
  #scanRegion = 0;
  #scanChunk = 0;
  /** Header bytes to emit: the stream header, then each record header. */
  readonly #streamHeader = new Uint8Array(STREAM_HEADER_BYTES);
  readonly #recordHeader = new Uint8Array(RECORD_HEADER_BYTES);
  readonly #recordView = new DataView(this.#recordHeader.buffer);
  #header: Uint8Array | undefined;
  #headerDone = 0;
  #flight: InFlight | undefined;
  #staging: Uint8Array | undefined;
  #records = 0;
  #chain = 0n;
  #ended = false;

  constructor(
    image: DeviceStateImage,
    options: { precopy: boolean; dataReady: () => void; stopDevice: () => void },
  ) {
    this.#image = image;
    this.#dataReady = options.dataReady;
    this.#stopDevice = options.stopDevice;
    this.#state = image.regions.map((r) => new Uint8Array(r.chunkCount));
    encodeStreamHeader(image.identity, this.#streamHeader);
    this.#header = this.#streamHeader;
    this.#phase = options.precopy ? 'precopy' : 'final';
    this.#initialBytes = STREAM_HEADER_BYTES;
    for (const r of image.regions) {
      if (r.precopy || !options.precopy) this.#markAll(r);
    }
    image.setObserver((region, offset, length) => this.#deviceWrite(region, offset, length));
  }

  read(target: Uint8Array): number {
    let n = 0;
    while (n < target.length && !this.#ended) {
      if (this.#header) {
        const h = this.#header;
        const k = Math.min(h.length - this.#headerDone, target.length - n);
        target.set(h.subarray(this.#headerDone, this.#headerDone + k), n);
        this.#headerDone += k;
        n += k;
        if (h === this.#streamHeader) this.#initialBytes -= k;
        if (this.#headerDone === h.length) {
          if (h !== this.#streamHeader && this.#phase === 'done') this.#ended = true;
          this.#header = undefined;
          this.#headerDone = 0;
        }
        continue;
      }
      const f = this.#flight;
      if (f) {
        const k = Math.min(f.length - f.done, target.length - n);
        const src = f.snapshot
          ? f.snapshot.subarray(f.done, f.done + k)
          : f.region.memory.view(f.offset + f.done, k);
        target.set(src, n);
        f.done += k;
        n += k;
        if (f.kind === INITIAL) this.#initialBytes -= k;
        else this.#dirtyBytes -= k;
        if (f.done === f.length) this.#flight = undefined;
        continue;
      }
      if (!this.#nextRecord()) break;
    }
    return n;
  }

  precopyInfo(): PrecopyInfo {
    return { initialBytes: BigInt(this.#initialBytes), dirtyBytes: BigInt(this.#dirtyBytes) };
  }

  enterStopCopy(): void {
    this.#stopDevice();
    if (this.#phase !== 'precopy') return;
    this.#phase = 'final';
    for (const r of this.#image.regions) if (!r.precopy) this.#markAll(r);
  }

  /** Bytes still to produce until the END record, if the device stopped now. */
  remainingBytes(): bigint {
    let bytes = this.#header ? this.#header.length - this.#headerDone : 0;
    if (this.#flight) bytes += this.#flight.length - this.#flight.done;
    let pendingBytes = 0;
    for (const [i, r] of this.#image.regions.entries()) {
      const st = this.#state[i]!;
      if (this.#phase === 'precopy' && !r.precopy) {
        pendingBytes += r.sizeBytes;
        continue;
      }
      for (let c = 0; c < st.length; c++) if (st[c] !== CLEAN) pendingBytes += r.chunkLength(c);
    }
    if (this.#phase !== 'done') bytes += pendingBytes + recordHeadersFor(pendingBytes) + RECORD_HEADER_BYTES; // + END
    return BigInt(bytes);
  }

  end(): void {
    this.#image.setObserver(undefined);
    this.#ended = true;
    this.#flight = undefined;
    this.#header = undefined;
  }

  #markAll(r: StateRegion): void {
    const st = this.#state[r.id]!;
    for (let c = 0; c < st.length; c++) {
      if (st[c] === CLEAN) {
        st[c] = INITIAL;
        this.#pending++;
        if (this.#phase === 'precopy') this.#initialBytes += r.chunkLength(c);
      }
    }
  }

  /** Pick the next run of pending chunks and start its record; false when there is none now. */
  #nextRecord(): boolean {
    if (this.#pending === 0) {
      if (this.#phase !== 'final') return false;
      this.#phase = 'done';
      encodeRecordHeader(this.#recordView, RecordKind.END, 0, 0, BigInt(this.#records), this.#chain);
      this.#header = this.#recordHeader;
      return true;
    }
    const regions = this.#image.regions;
    // Find the next pending chunk from the scan position, wrapping around once.
    for (let visited = 0; visited <= regions.length; visited++) {
      const r = regions[this.#scanRegion]!;
      const st = this.#state[this.#scanRegion]!;
      let c = st.indexOf(INITIAL, this.#scanChunk);
      const d = st.indexOf(DIRTY, this.#scanChunk);
      if (c < 0 || (d >= 0 && d < c)) c = d;
      if (c >= 0) {
        this.#startRecord(r, st, c);
        return true;
      }
      this.#scanRegion = (this.#scanRegion + 1) % regions.length;
      this.#scanChunk = 0;
    }
    return false;
  }

  #startRecord(r: StateRegion, st: Uint8Array, first: number): void {
    const kind = st[first] as typeof INITIAL | typeof DIRTY;
    const perRecord = RECORD_MAX_BYTES / CHUNK_BYTES;
    const limit = Math.min(st.length, (Math.floor(first / perRecord) + 1) * perRecord);
    let last = first;
    while (last + 1 < limit && st[last + 1] === kind) last++;
    for (let c = first; c <= last; c++) st[c] = CLEAN;
    this.#pending -= last - first + 1;
    this.#scanChunk = last + 1;
    const offset = first * CHUNK_BYTES;
    const length = Math.min(r.sizeBytes, (last + 1) * CHUNK_BYTES) - offset;
    const sum = r.memory.checksum(offset, length);
    encodeRecordHeader(this.#recordView, RecordKind.DATA, r.id, length, BigInt(offset), sum);
    this.#records++;
    this.#chain = chainRecord(this.#chain, r.id, BigInt(offset), length, sum);
    this.#header = this.#recordHeader;
    this.#flight = { region: r, offset, length, done: 0, kind, snapshot: undefined };
  }

  #deviceWrite(r: StateRegion, offset: number, length: number): void {
    const f = this.#flight;
    if (f && f.region === r && !f.snapshot) {
      const from = f.offset + f.done;
      if (offset < f.offset + f.length && offset + length > from) {
        this.#staging ??= new Uint8Array(RECORD_MAX_BYTES);
        f.snapshot = this.#staging.subarray(0, f.length);
        r.memory.read(from, f.snapshot.subarray(f.done));
      }
    }
    if (this.#phase !== 'precopy' || !r.precopy) return;
    const st = this.#state[r.id]!;
    const last = Math.floor((offset + length - 1) / CHUNK_BYTES);
    let grew = false;
    for (let c = Math.floor(offset / CHUNK_BYTES); c <= last; c++) {
      if (st[c] === CLEAN) {
        st[c] = DIRTY;
        this.#pending++;
        this.#dirtyBytes += r.chunkLength(c);
        grew = true;
      }
    }
    if (grew) this.#dataReady();
  }
}

/** Record headers needed for `bytes` of payload (an estimate: one per RECORD_MAX_BYTES). */
export function recordHeadersFor(bytes: number): number {
  return Math.ceil(bytes / CHUNK_BYTES) * RECORD_HEADER_BYTES;
}
