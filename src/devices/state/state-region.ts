import { createHash } from 'node:crypto';
import { PhysMemory } from '../../kernel/mem/phys-memory.js';
import { internalError } from '../../uapi/error.js';
import { CHUNK_BYTES, configFingerprint, type StreamIdentity } from './stream-format.js';

/** Told before a device write changes region bytes (a saver tracks dirtiness, snapshots in-flight data). */
export type RegionWriteObserver = (region: StateRegion, offset: number, length: number) => void;

/**
 * One named piece of device state held in PhysMemory. `precopy` regions (device memory, tables) are
 * streamed while the device runs and tracked for dirtiness in CHUNK_BYTES chunks; the others
 * (registers, counters) are small and only sent once the device is stopped.
 *
 * Every change of the bytes must be announced with willWrite() (write()/setU32()/setU64() do it).
 */
export class StateRegion {
  readonly id: number;
  readonly name: string;
  readonly sizeBytes: number;
  readonly precopy: boolean;
  readonly memory: PhysMemory;
  readonly chunkCount: number;
  observer: RegionWriteObserver | undefined;
  #words: DataView | undefined;

  constructor(id: number, name: string, sizeBytes: number, precopy: boolean) {
    if (!Number.isSafeInteger(sizeBytes) || sizeBytes <= 0)
      throw internalError(`region ${name}: bad size ${sizeBytes}`);
    this.id = id;
    this.name = name;
    this.sizeBytes = sizeBytes;
    this.precopy = precopy;
    this.memory = new PhysMemory(sizeBytes);
    this.chunkCount = Math.ceil(sizeBytes / CHUNK_BYTES);
  }

  chunkLength(chunk: number): number {
    return Math.min(CHUNK_BYTES, this.sizeBytes - chunk * CHUNK_BYTES);
  }

  willWrite(offset: number, length: number): void {
    if (length > 0) this.observer?.(this, offset, length);
  }

  write(offset: number, data: Uint8Array): void {
    this.willWrite(offset, data.length);
    this.memory.write(offset, data);
  }

  /** A writable view, announced as written (for devices that fill or DMA into it). */
  mutate(offset: number, length: number): Uint8Array {
    this.willWrite(offset, length);
    return this.memory.view(offset, length);
  }

  /** Little-endian words of small (< 1 GiB) register regions. */
  get words(): DataView {
    this.#words ??= new DataView(this.memory.buffers[0]!, 0, this.sizeBytes);
    return this.#words;
  }

  u32(offset: number): number {
    return this.words.getUint32(offset, true);
  }

  setU32(offset: number, value: number): void {
    this.willWrite(offset, 4);
    this.words.setUint32(offset, value >>> 0, true);
  }

  u64(offset: number): bigint {
    return this.words.getBigUint64(offset, true);
  }

  setU64(offset: number, value: bigint): void {
    this.willWrite(offset, 8);
    this.words.setBigUint64(offset, BigInt.asUintN(64, value), true);
  }

  /** Back to zero (power-on content is then written by the device). */
  clear(): void {
    this.willWrite(0, this.sizeBytes);
    this.memory.fill(0);
  }
}

/** The whole migratable state of a device: its regions plus who it is and how it is configured. */
export class DeviceStateImage {
  readonly deviceType: string;
  readonly deviceVersion: number;
  readonly regions: readonly StateRegion[];
  readonly identity: StreamIdentity;

  /**
   * `regions` in stream order; `options` is a canonical description of configuration options that
   * must match between source and destination (beyond the region sizes).
   */
  constructor(
    deviceType: string,
    deviceVersion: number,
    regions: readonly { name: string; sizeBytes: number; precopy: boolean }[],
    options = '',
  ) {
    this.deviceType = deviceType;
    this.deviceVersion = deviceVersion;
    this.regions = regions.map((r, i) => new StateRegion(i, r.name, r.sizeBytes, r.precopy));
    const description = JSON.stringify({
      type: deviceType,
      version: deviceVersion,
      regions: this.regions.map((r) => [r.name, r.sizeBytes, r.precopy]),
      options,
    });
    this.identity = {
      deviceType,
      deviceVersion,
      fingerprint: configFingerprint(description),
      totalRegionBytes: BigInt(this.regions.reduce((n, r) => n + r.sizeBytes, 0)),
      regionCount: this.regions.length,
    };
  }

  region(name: string): StateRegion {
    const r = this.regions.find((x) => x.name === name);
    if (!r) throw internalError(`no region ${name}`);
    return r;
  }

  /** SHA-256 hex over every region's checksummed content (SIMD checksums in 1 MiB chunks). */
  digest(): string {
    const hash = createHash('sha256');
    hash.update(`${this.deviceType}/${this.deviceVersion}/${this.identity.fingerprint}`);
    for (const r of this.regions) hash.update(`${r.name}:${r.memory.digest()}`);
    return hash.digest('hex');
  }

  setObserver(observer: RegionWriteObserver | undefined): void {
    for (const r of this.regions) r.observer = observer;
  }
}
