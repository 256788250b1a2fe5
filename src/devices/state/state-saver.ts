import { ChecksumClient, type PendingChecksum } from '../../kernel/mem/checksum-worker.js';
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

/** Records whose checksums are computed ahead on the checksum worker. */
export const AHEAD_RECORDS = 4;

/** Where the next record goes: region, offset, length, and its last chunk. */
interface RecordPlan {
  region: StateRegion;
  offset: number;
  length: number;
  last: number;
}

/** A checksum job for a record expected soon, over bytes no device write has touched since. */
interface Ahead {
  region: StateRegion;
  offset: number;
  length: number;
  job: PendingChecksum;
}

/**
 * The source side of a device-state stream (see state-loader.ts for the layout). Bytes are produced
 * lazily into whatever buffer read() gets: payloads are copied exactly once, from region memory to
 * the target; record headers are built in one reusable 24-byte buffer.
 *
 * Precopy: every precopy-region chunk starts INITIAL; device writes turn sent chunks DIRTY (the
 * regions announce writes through their observer). A write into the unsent part of the record being
 * read snapshots that part first, so the payload always matches its checksum.
 *
 * Checksums ahead: a record header carries the checksum of its payload, so the source pass must be
 * done when the header is produced. When a record starts, the saver predicts the next
 * AHEAD_RECORDS records (the same scan from the same chunk states) and queues their checksums on
 * the checksum worker (kernel/mem/checksum-worker.ts; records of CHECKSUM_OFFLOAD_MIN_BYTES and
 * more), so they are computed while this record's payload is copied. A job is only used for a
 * record with exactly its range, and only if no device write touched that range since the job was
 * queued: every write is announced to the observer before it changes bytes, and the observer
 * cancels the jobs it overlaps (in STOP_COPY the device cannot write, in precopy it may). Anything
 * else (no job, a cancelled one, a prediction that did not come true) is computed inline.
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
  readonly #checks = new ChecksumClient();
  #ahead: Ahead[] = [];

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
    this.#dropAhead();
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
      this.#dropAhead();
      encodeRecordHeader(this.#recordView, RecordKind.END, 0, 0, BigInt(this.#records), this.#chain);
      this.#header = this.#recordHeader;
      return true;
    }
    const regions = this.#image.regions;
    // Find the next pending chunk from the scan position, wrapping around once.
    for (let visited = 0; visited <= regions.length; visited++) {
      const r = regions[this.#scanRegion]!;
      const st = this.#state[this.#scanRegion]!;
      const c = firstPending(st, this.#scanChunk);
      if (c >= 0) {
        this.#startRecord(this.#plan(r, st, c));
        return true;
      }
      this.#scanRegion = (this.#scanRegion + 1) % regions.length;
      this.#scanChunk = 0;
    }
    return false;
  }

  /** The record that starts at pending chunk `first`: its run of chunks of one kind in one block. */
  #plan(r: StateRegion, st: Uint8Array, first: number): RecordPlan {
    const kind = st[first];
    const perRecord = RECORD_MAX_BYTES / CHUNK_BYTES;
    const limit = Math.min(st.length, (Math.floor(first / perRecord) + 1) * perRecord);
    let last = first;
    while (last + 1 < limit && st[last + 1] === kind) last++;
    const offset = first * CHUNK_BYTES;
    const length = Math.min(r.sizeBytes, (last + 1) * CHUNK_BYTES) - offset;
    return { region: r, offset, length, last };
  }

  #startRecord(plan: RecordPlan): void {
    const { region: r, offset, length, last } = plan;
    const st = this.#state[r.id]!;
    const first = offset / CHUNK_BYTES;
    const kind = st[first] as typeof INITIAL | typeof DIRTY;
    for (let c = first; c <= last; c++) st[c] = CLEAN;
    this.#pending -= last - first + 1;
    this.#scanChunk = last + 1;
    const sum = this.#takeAhead(r, offset, length) ?? r.memory.checksum(offset, length);
    encodeRecordHeader(this.#recordView, RecordKind.DATA, r.id, length, BigInt(offset), sum);
    this.#records++;
    this.#chain = chainRecord(this.#chain, r.id, BigInt(offset), length, sum);
    this.#header = this.#recordHeader;
    this.#flight = { region: r, offset, length, done: 0, kind, snapshot: undefined };
    this.#queueAhead();
  }

  /** The checksum of a job queued for exactly this record, if no write has cancelled it. */
  #takeAhead(r: StateRegion, offset: number, length: number): bigint | undefined {
    const i = this.#ahead.findIndex((a) => a.region === r && a.offset === offset && a.length === length);
    if (i < 0) return undefined;
    const [a] = this.#ahead.splice(i, 1);
    return a!.job.value();
  }

  /**
   * Queue checksums for the next records, as #nextRecord would pick them from the current chunk
   * states (without wrapping back to the scan region); jobs for records no longer expected go.
   */
  #queueAhead(): void {
    const regions = this.#image.regions;
    const want: RecordPlan[] = [];
    let ri = this.#scanRegion;
    let chunk = this.#scanChunk;
    for (let visited = 0; want.length < AHEAD_RECORDS && visited < regions.length;) {
      const st = this.#state[ri]!;
      const c = firstPending(st, chunk);
      if (c < 0) {
        ri = (ri + 1) % regions.length;
        chunk = 0;
        visited++;
        continue;
      }
      const plan = this.#plan(regions[ri]!, st, c);
      want.push(plan);
      chunk = plan.last + 1;
    }
    const same = (a: { region: StateRegion; offset: number; length: number }, b: typeof a) =>
      a.region === b.region && a.offset === b.offset && a.length === b.length;
    const kept: Ahead[] = [];
    for (const a of this.#ahead) {
      if (want.some((w) => same(w, a))) kept.push(a);
      else a.job.cancel();
    }
    for (const w of want) {
      if (kept.some((a) => same(w, a))) continue;
      const job = this.#checks.submit(w.region.memory, w.offset, w.length);
      if (job) kept.push({ region: w.region, offset: w.offset, length: w.length, job });
    }
    this.#ahead = kept;
  }

  #dropAhead(): void {
    for (const a of this.#ahead) a.job.cancel();
    this.#ahead = [];
    this.#checks.close();
  }

  #deviceWrite(r: StateRegion, offset: number, length: number): void {
    // Jobs that may have read bytes this write changes: their results can no longer be used.
    for (let i = 0; i < this.#ahead.length; i++) {
      const a = this.#ahead[i]!;
      if (a.region === r && offset < a.offset + a.length && offset + length > a.offset) {
        a.job.cancel();
        this.#ahead.splice(i--, 1);
      }
    }
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

/** The first INITIAL or DIRTY chunk at or after `from`, or -1. */
function firstPending(st: Uint8Array, from: number): number {
  const c = st.indexOf(INITIAL, from);
  const d = st.indexOf(DIRTY, from);
  return c < 0 || (d >= 0 && d < c) ? d : c;
}

/** Record headers needed for `bytes` of payload (an estimate: one per RECORD_MAX_BYTES). */
export function recordHeadersFor(bytes: number): number {
  return Math.ceil(bytes / CHUNK_BYTES) * RECORD_HEADER_BYTES;
}
