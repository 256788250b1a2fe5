/**
 * The device-state stream and its pure streaming decoder (bytes in, any chunking).
 *
 *   stream  = header record* end
 *
 *   header (64 bytes, little-endian)
 *     0  u32  magic 0x53445653 ('SVDS')
 *     4  u16  format version (1)
 *     6  u16  header bytes (64)
 *     8  [16] device type, ASCII, zero padded   ('accel', 'nic', 'basic')
 *    24  u32  device version
 *    28  u32  region count                    ┐
 *    32  u64  configuration fingerprint       │ configuration: region names, sizes, options
 *    40  u64  total region bytes              ┘
 *    48  [16] reserved, zero
 *
 *   record (24-byte header, then `length` payload bytes)
 *     0  u16  kind: 1 = DATA
 *     2  u16  region id (index in the device's region list)
 *     4  u32  length, 1..1 MiB; [offset, offset+length) inside the region and one 1 MiB block
 *     8  u64  offset in the region
 *    16  u64  checksum of the payload (PhysMemory.checksum, seed 0)
 *    24  ...  payload
 *
 *   end (24 bytes, no payload)
 *     0  u16  kind: 2 = END
 *     2  u16  0
 *     4  u32  0
 *     8  u64  number of DATA records before it
 *    16  u64  chain of every record's (region, offset, length, checksum)  (stream-format chainRecord)
 *
 * A chunk may be sent several times (precopy re-sends dirtied chunks); the last copy wins.
 * Headers are accumulated in a fixed 64-byte buffer; payloads go straight into the destination
 * region memory after the bounds checks, and are verified there with the SIMD checksum.
 * Errors are sticky: once the stream is known bad every write() and finish() throws the same error
 * (EINVAL for a stream that can never load, EIO for corrupted data).
 *
 * Verification of records of CHECKSUM_OFFLOAD_MIN_BYTES and more is deferred to the checksum
 * worker (kernel/mem/checksum-worker.ts), at most MAX_DEFERRED records behind the stream: the
 * payload is in place, its checksum is computed over the destination bytes on the other thread
 * while the next records arrive. A deferred record is settled (its value compared) when it is the
 * oldest and done, when the window is full, before a later record overwrites any of its bytes,
 * before any other error is reported (so the first bad record in stream order decides the error)
 * and, all of them, in finish(): RESUMING -> STOP never succeeds before every record is verified.
 * A mismatch makes EIO the sticky error, reported by the call that finds it. Small records (and
 * every record when the worker is unavailable) are verified inline, as they arrive.
 */
import { ChecksumClient, type PendingChecksum } from '../../kernel/mem/checksum-worker.js';
import type { ResumingSession } from '../../kernel/vfio/migration-driver.js';
import { kernelError, type VfioError } from '../../uapi/error.js';
import type { DeviceStateImage, StateRegion } from './state-region.js';
import {
  chainRecord,
  DEVICE_TYPE_BYTES,
  decodeDeviceType,
  FORMAT_VERSION,
  RECORD_HEADER_BYTES,
  RECORD_MAX_BYTES,
  RecordKind,
  STREAM_HEADER_BYTES,
  STREAM_MAGIC,
} from './stream-format.js';

type Phase = 'header' | 'record' | 'payload' | 'done';

/** Records whose verification may be pending at once (1 MiB each at most). */
export const MAX_DEFERRED = 32;

/** A record in place whose checksum the worker is computing. */
interface Deferred {
  region: StateRegion;
  offset: number;
  length: number;
  /** The checksum the stream carried. */
  sum: bigint;
  job: PendingChecksum;
}

export class StateLoader implements ResumingSession {
  readonly #image: DeviceStateImage;
  readonly #staging = new Uint8Array(STREAM_HEADER_BYTES);
  readonly #view = new DataView(this.#staging.buffer);
  #phase: Phase = 'header';
  #have = 0;
  #error: VfioError | undefined;
  // current record
  #region: StateRegion | undefined;
  #offset = 0;
  #length = 0;
  #done = 0;
  #sum = 0n;
  #records = 0;
  #chain = 0n;
  #ended = false;
  readonly #checks = new ChecksumClient();
  /** Verifications still pending, oldest first. */
  #deferred: Deferred[] = [];

  constructor(image: DeviceStateImage) {
    this.#image = image;
  }

  /** Records whose verification is still pending (deferred to the checksum worker). */
  get pendingVerifications(): number {
    return this.#deferred.length;
  }

  write(chunk: Uint8Array): void {
    this.#check();
    this.#settleDone();
    if (this.#phase === 'done' && chunk.length > 0) throw this.#fail('EINVAL', 'bytes after the END record');
    let at = 0;
    while (at < chunk.length) {
      const target = this.#target();
      const n = Math.min(target.length, chunk.length - at);
      target.set(chunk.subarray(at, at + n));
      at += n;
      this.#advance(n);
    }
  }

  /**
   * Let `fill` write the next stream bytes in place: a view of the destination region memory for a
   * record payload (at most the rest of it), else of the header staging buffer. Returns fill's n.
   */
  writeFrom(fill: (target: Uint8Array) => number): number {
    this.#check();
    this.#settleDone();
    const target = this.#target();
    const n = fill(target);
    if (!Number.isInteger(n) || n < 0 || n > target.length) {
      throw kernelError('EINVAL', `fill returned ${n} for ${target.length} bytes`, { op: 'write' });
    }
    if (n > 0) this.#advance(n);
    return n;
  }

  finish(): void {
    this.#check();
    this.#settle(this.#deferred.length);
    this.#checks.close();
    if (this.#phase !== 'done') {
      throw kernelError('EINVAL', `device state stream truncated (in ${this.#phase})`, { op: 'load' });
    }
  }

  end(): void {
    this.#ended = true;
    this.#region = undefined;
    this.#dropDeferred();
  }

  /** Where the next bytes go. */
  #target(): Uint8Array {
    switch (this.#phase) {
      case 'header':
        return this.#staging.subarray(this.#have, STREAM_HEADER_BYTES);
      case 'record':
        return this.#staging.subarray(this.#have, RECORD_HEADER_BYTES);
      case 'payload':
        return this.#region!.memory.view(this.#offset + this.#done, this.#length - this.#done);
      default:
        return this.#staging.subarray(0, 0); // done: nothing more is taken
    }
  }

  #advance(n: number): void {
    switch (this.#phase) {
      case 'header':
        this.#have += n;
        if (this.#have === STREAM_HEADER_BYTES) this.#parseHeader();
        return;
      case 'record':
        this.#have += n;
        if (this.#have === RECORD_HEADER_BYTES) this.#parseRecord();
        return;
      case 'payload':
        this.#done += n;
        if (this.#done === this.#length) this.#verifyPayload();
        return;
      default:
        throw this.#fail('EINVAL', 'bytes after the END record');
    }
  }

  #parseHeader(): void {
    const v = this.#view;
    const id = this.#image.identity;
    if (v.getUint32(0, true) !== STREAM_MAGIC)
      throw this.#fail('EINVAL', 'not a device state stream (magic)');
    const version = v.getUint16(4, true);
    if (version !== FORMAT_VERSION || v.getUint16(6, true) !== STREAM_HEADER_BYTES) {
      throw this.#fail('EINVAL', `unsupported stream format version ${version}`);
    }
    const type = decodeDeviceType(this.#staging);
    const padded = new Uint8Array(DEVICE_TYPE_BYTES);
    padded.set(new TextEncoder().encode(id.deviceType));
    if (type !== id.deviceType || !padded.every((b, i) => this.#staging[8 + i] === b))
      throw this.#fail('EINVAL', `stream of a ${type} device, this is ${id.deviceType}`);
    if (v.getUint32(24, true) !== id.deviceVersion) {
      throw this.#fail('EINVAL', `device version ${v.getUint32(24, true)}, this is ${id.deviceVersion}`);
    }
    if (
      v.getUint32(28, true) !== id.regionCount ||
      v.getBigUint64(32, true) !== id.fingerprint ||
      v.getBigUint64(40, true) !== id.totalRegionBytes
    ) {
      throw this.#fail('EINVAL', 'device configuration differs (region sizes or options)');
    }
    for (let i = 48; i < STREAM_HEADER_BYTES; i++) {
      if (this.#staging[i] !== 0) throw this.#fail('EINVAL', 'reserved header bytes are not zero');
    }
    this.#phase = 'record';
    this.#have = 0;
  }

  #parseRecord(): void {
    const v = this.#view;
    const kind = v.getUint16(0, true);
    const regionId = v.getUint16(2, true);
    const length = v.getUint32(4, true);
    const offset = v.getBigUint64(8, true);
    const sum = v.getBigUint64(16, true);
    this.#have = 0;
    if (kind === RecordKind.END) {
      if (regionId !== 0 || length !== 0) throw this.#fail('EINVAL', 'malformed END record');
      if (offset !== BigInt(this.#records)) {
        throw this.#fail('EIO', `END counts ${offset} records, stream had ${this.#records}`);
      }
      if (sum !== this.#chain) throw this.#fail('EIO', 'END chain checksum mismatch');
      this.#phase = 'done';
      return;
    }
    if (kind !== RecordKind.DATA) throw this.#fail('EINVAL', `unknown record kind ${kind}`);
    const region = this.#image.regions[regionId];
    if (!region) throw this.#fail('EINVAL', `record for region ${regionId} of ${this.#image.regions.length}`);
    // Bounds first, in bigint: nothing is touched for a hostile length or offset.
    if (length === 0 || length > RECORD_MAX_BYTES) throw this.#fail('EINVAL', `record length ${length}`);
    const size = BigInt(region.sizeBytes);
    if (offset >= size || offset + BigInt(length) > size) {
      throw this.#fail('EINVAL', `record [${offset}, +${length}) outside ${region.name} of ${size} bytes`);
    }
    const block = BigInt(RECORD_MAX_BYTES);
    if (offset / block !== (offset + BigInt(length) - 1n) / block) {
      throw this.#fail('EINVAL', `record [${offset}, +${length}) crosses a 1 MiB block`);
    }
    // A record that rewrites bytes of a record still being verified: settle that one first.
    const end = Number(offset) + length;
    for (let i = this.#deferred.length - 1; i >= 0; i--) {
      const d = this.#deferred[i]!;
      if (d.region === region && d.offset < end && Number(offset) < d.offset + d.length) {
        this.#settle(i + 1);
        break;
      }
    }
    this.#region = region;
    this.#offset = Number(offset);
    this.#length = length;
    this.#done = 0;
    this.#sum = sum;
    this.#phase = 'payload';
  }

  #verifyPayload(): void {
    const r = this.#region!;
    const job = this.#checks.submit(r.memory, this.#offset, this.#length);
    if (job) {
      this.#deferred.push({ region: r, offset: this.#offset, length: this.#length, sum: this.#sum, job });
      if (this.#deferred.length > MAX_DEFERRED) this.#settle(1);
    } else {
      const sum = r.memory.checksum(this.#offset, this.#length);
      if (sum !== this.#sum) {
        throw this.#fail('EIO', `checksum mismatch in ${r.name} [${this.#offset}, +${this.#length})`);
      }
    }
    this.#records++;
    this.#chain = chainRecord(this.#chain, r.id, BigInt(this.#offset), this.#length, this.#sum);
    this.#phase = 'record';
  }

  /** Settle the oldest deferred verifications that are already computed (never waits). */
  #settleDone(): void {
    let n = 0;
    while (n < this.#deferred.length && this.#deferred[n]!.job.ready) n++;
    if (n > 0) this.#settle(n);
  }

  /** Settle the `count` oldest deferred verifications; the first mismatch fails the load (EIO). */
  #settle(count: number): void {
    for (let i = 0; i < count; i++) {
      const d = this.#deferred.shift()!;
      if (d.job.value() !== d.sum) {
        this.#dropDeferred();
        this.#error = kernelError(
          'EIO',
          `checksum mismatch in ${d.region.name} [${d.offset}, +${d.length})`,
          {
            op: 'load',
          },
        );
        throw this.#error;
      }
    }
  }

  #dropDeferred(): void {
    for (const d of this.#deferred) d.job.cancel();
    this.#deferred = [];
    this.#checks.close();
  }

  #fail(errno: 'EINVAL' | 'EIO', message: string): VfioError {
    // Records before this point come first: a pending verification that fails is the error.
    try {
      this.#settle(this.#deferred.length);
    } catch (err) {
      return err as VfioError;
    }
    this.#error = kernelError(errno, message, { op: 'load' });
    return this.#error;
  }

  #check(): void {
    if (this.#error) throw this.#error;
    if (this.#ended) throw kernelError('ENODEV', 'resuming session has ended', { op: 'load' });
  }
}
