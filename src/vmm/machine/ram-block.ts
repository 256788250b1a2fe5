import { PhysMemory } from '../../kernel/mem/phys-memory.js';
import { invalidArgument } from '../../uapi/error.js';
import { DirtyLog } from './dirty-log.js';
import { GUEST_PAGE_BYTES, pagesSpanned } from './guest-page.js';
import type { RamAccessFence } from './ram-access-fence.js';
import { RamDiscardManager } from './ram-discard.js';

/** Largest RAM block (1 TiB); the host's memory is the real limit. */
export const MAX_RAM_BLOCK_BYTES = 2 ** 40;
const GPA_LIMIT = 1n << 64n;

export interface RamDiscardOptions {
  /** Plug/unplug granularity: a power of two ≥ 4 KiB dividing the block size; the GPA is aligned to it. */
  blockSizeBytes: number;
  /** Plug state at creation; virtio-mem starts with nothing plugged. Default 'none'. */
  plugged?: 'all' | 'none';
}

export interface RamBlockOptions {
  /** Unique name (QEMU's RAMBlock idstr, e.g. 'pc.ram'). */
  name: string;
  /** A positive multiple of 4 KiB, at most MAX_RAM_BLOCK_BYTES. */
  sizeBytes: number;
  /** Guest-physical base, 4 KiB aligned; the block must end at or below 2^64. */
  gpa: bigint;
  /** Makes the block discardable (virtio-mem-like). */
  discard?: RamDiscardOptions;
  /**
   * The bytes of the block, when they exist already (a memory backend's memfd, RAM handed over
   * by a live update): a PhysMemory of exactly `sizeBytes`. Default a new zeroed one.
   */
  memory?: PhysMemory;
}

const isPowerOfTwo = (n: number) => n > 0 && Number.isSafeInteger(n) && (n & (n - 1)) === 0 && n <= 2 ** 30;

/** Check RAM block options; throws ERR_INVALID_ARGUMENT naming the bad field. */
export function validateRamBlockOptions(options: RamBlockOptions): void {
  const { name, sizeBytes, gpa, discard, memory } = options;
  if (typeof name !== 'string' || name.length === 0 || name.length > 255) {
    throw invalidArgument(`RAM block name must be 1-255 characters, got ${JSON.stringify(name)}`);
  }
  const what = `RAM block ${name}`;
  if (!Number.isSafeInteger(sizeBytes) || sizeBytes <= 0 || sizeBytes % GUEST_PAGE_BYTES !== 0) {
    throw invalidArgument(`${what}: size ${sizeBytes} is not a positive multiple of ${GUEST_PAGE_BYTES}`);
  }
  if (sizeBytes > MAX_RAM_BLOCK_BYTES) {
    throw invalidArgument(`${what}: size ${sizeBytes} exceeds ${MAX_RAM_BLOCK_BYTES}`);
  }
  if (typeof gpa !== 'bigint' || gpa < 0n || gpa % BigInt(GUEST_PAGE_BYTES) !== 0n) {
    throw invalidArgument(`${what}: guest-physical base ${String(gpa)} is not a 4 KiB aligned u64`);
  }
  if (gpa + BigInt(sizeBytes) > GPA_LIMIT) {
    throw invalidArgument(`${what}: [${gpa}, +${sizeBytes}) ends beyond 2^64`);
  }
  if (memory !== undefined && (!(memory instanceof PhysMemory) || memory.sizeBytes !== sizeBytes)) {
    throw invalidArgument(
      `${what}: the memory given is not a PhysMemory of ${sizeBytes} bytes (${String(memory?.sizeBytes)})`,
    );
  }
  if (discard !== undefined) {
    const { blockSizeBytes, plugged = 'none' } = discard;
    if (!isPowerOfTwo(blockSizeBytes) || blockSizeBytes < GUEST_PAGE_BYTES) {
      throw invalidArgument(
        `${what}: discard block size ${blockSizeBytes} is not a power of two from 4 KiB to 1 GiB`,
      );
    }
    if (sizeBytes % blockSizeBytes !== 0) {
      throw invalidArgument(
        `${what}: size ${sizeBytes} is not a multiple of the block size ${blockSizeBytes}`,
      );
    }
    if (gpa % BigInt(blockSizeBytes) !== 0n) {
      throw invalidArgument(`${what}: base ${gpa} is not aligned to the block size ${blockSizeBytes}`);
    }
    if (plugged !== 'all' && plugged !== 'none') {
      throw invalidArgument(`${what}: discard.plugged must be 'all' or 'none', got ${String(plugged)}`);
    }
  }
}

/**
 * One block of guest RAM (QEMU's RAMBlock + its memory region): bytes in a PhysMemory whose
 * SharedArrayBuffers vCPU workers write, a dirty log, and for a discardable block its plug state.
 * Created by GuestRam.addBlock, over a new PhysMemory or one given (the memory behind a memfd the
 * VMM maps shared, so device DMA through the IOMMU reaches the same bytes: see memfd-ram.ts).
 */
export class RamBlock {
  readonly name: string;
  readonly sizeBytes: number;
  /** Guest-physical base. */
  readonly gpa: bigint;
  /** Guest pages (4 KiB) in the block. */
  readonly pages: number;
  readonly memory: PhysMemory;
  /** The KVM dirty log of the block. */
  readonly dirtyLog: DirtyLog;
  /** Plug state of a discardable block, else undefined. */
  readonly discard: RamDiscardManager | undefined;

  constructor(options: RamBlockOptions, fence: RamAccessFence) {
    validateRamBlockOptions(options);
    this.name = options.name;
    this.sizeBytes = options.sizeBytes;
    this.gpa = options.gpa;
    this.pages = options.sizeBytes / GUEST_PAGE_BYTES;
    this.memory = options.memory ?? new PhysMemory(options.sizeBytes);
    this.dirtyLog = new DirtyLog(this.pages);
    this.discard =
      options.discard === undefined
        ? undefined
        : new RamDiscardManager(
            {
              name: this.name,
              gpa: this.gpa,
              sizeBytes: this.sizeBytes,
              fence,
              discard: (offset, length) => {
                this.memory.fill(0, offset, length);
                const { first, count } = pagesSpanned(offset, length);
                this.dirtyLog.markPages(first, count);
              },
            },
            options.discard.blockSizeBytes,
            options.discard.plugged ?? 'none',
          );
  }

  /** First guest-physical address after the block. */
  get endGpa(): bigint {
    return this.gpa + BigInt(this.sizeBytes);
  }

  /** Does `[gpa, gpa + lengthBytes)` lie inside the block? */
  contains(gpa: bigint, lengthBytes = 1): boolean {
    return gpa >= this.gpa && gpa + BigInt(lengthBytes) <= this.endGpa;
  }

  /** Read bytes at `offset` in the block (unplugged parts read as zero). */
  read(offset: number, target: Uint8Array): void {
    this.#checkRange(offset, target.length);
    this.memory.read(offset, target);
  }

  /**
   * A guest write from the host thread: the bytes, then the dirty pages (if logging is on).
   * Writing an unplugged part of a discardable block is refused.
   */
  write(offset: number, data: Uint8Array): void {
    this.#checkRange(offset, data.length);
    if (this.discard !== undefined && !this.discard.isRangePlugged(offset, data.length)) {
      throw invalidArgument(`${this.name}: write [${offset}, +${data.length}) touches unplugged memory`);
    }
    this.memory.write(offset, data);
    const { first, count } = pagesSpanned(offset, data.length);
    this.dirtyLog.markPages(first, count);
  }

  /** A digest of the block's bytes (PhysMemory.digest). */
  digest(): string {
    return this.memory.digest();
  }

  #checkRange(offset: number, length: number): void {
    if (!Number.isSafeInteger(offset) || offset < 0 || offset + length > this.sizeBytes) {
      throw invalidArgument(`${this.name}: range [${offset}, +${length}) is outside the block`);
    }
  }
}
