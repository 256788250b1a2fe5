import { kernelError } from '../../uapi/error.js';
import type { ByteStore } from './byte-store.js';
import { LazyBytes } from './lazy-bytes.js';
import type { MemFile } from './memfd.js';

export const PAGE_BYTES = 4096n;
const MMAP_BASE = 0x7f00_0000_0000n;
const TASK_SIZE = 1n << 47n;

interface MmRegionBase {
  readonly start: bigint;
  readonly lengthBytes: bigint;
  readonly writable: boolean;
}

/** Private anonymous memory: its own lazily allocated bytes, copied by fork. */
export interface MmPrivateRegion extends MmRegionBase {
  readonly store: LazyBytes;
  readonly shared?: false;
}

/** MAP_SHARED of a memfd from file offset 0: the file's store; fork shares it. */
export interface MmSharedRegion extends MmRegionBase {
  readonly store: ByteStore;
  readonly shared: true;
}

/** One mapping: [start, start + lengthBytes) backed by `store` from byte 0. */
export type MmRegion = MmPrivateRegion | MmSharedRegion;

export interface MmapArgs {
  lengthBytes: bigint | number;
  /** Fixed address (MAP_FIXED_NOREPLACE); page aligned. */
  at?: bigint;
  /** PROT_WRITE; default true. */
  writable?: boolean;
  /** MAP_SHARED of this memfd from offset 0; the mapping may not run past the file's end (EINVAL). */
  file?: MemFile;
}

const pageUp = (n: bigint): bigint => (n + PAGE_BYTES - 1n) & ~(PAGE_BYTES - 1n);

/**
 * A process address space: anonymous regions at addresses, backed by real (lazily allocated)
 * bytes, and the two pin counters the kernel keeps per mm, in pages.
 */
export class Mm {
  /** `mm->locked_vm` (pages): RLIMIT_MEMLOCK-charged pages (mlock, VFIO, iommufd per-mm mode). */
  lockedVm = 0;
  /** `mm->pinned_vm` (pages): every long-term pin, never limited. */
  pinnedVm = 0;
  /** False once no process uses this mm any more (exit, exec): new pins fault. */
  alive = true;
  #regions: MmRegion[] = [];
  #next = MMAP_BASE;

  get regions(): readonly MmRegion[] {
    return this.#regions;
  }

  mmap(args: MmapArgs): bigint {
    const length = pageUp(BigInt(args.lengthBytes));
    if (length === 0n || length > Number.MAX_SAFE_INTEGER) {
      throw kernelError('EINVAL', `bad mmap length ${args.lengthBytes}`, { op: 'mmap' });
    }
    if (args.file && length > pageUp(args.file.sizeBytes)) {
      throw kernelError('EINVAL', 'shared mapping runs past the end of the file', { op: 'mmap' });
    }
    let start: bigint;
    if (args.at !== undefined) {
      start = args.at;
      if (start % PAGE_BYTES !== 0n || start <= 0n || start + length > TASK_SIZE) {
        throw kernelError('EINVAL', `bad mmap address 0x${start.toString(16)}`, { op: 'mmap' });
      }
      if (this.#overlaps(start, length)) {
        throw kernelError('EEXIST', `0x${start.toString(16)} already mapped`, { op: 'mmap' });
      }
    } else {
      start = this.#next;
      while (this.#overlaps(start, length)) start += length;
      if (start + length > TASK_SIZE) throw kernelError('ENOMEM', 'address space full', { op: 'mmap' });
      this.#next = start + length + PAGE_BYTES; // a guard gap keeps regions from merging by accident
    }
    const writable = args.writable ?? true;
    const region: MmRegion = args.file
      ? { start, lengthBytes: length, writable, store: args.file.store, shared: true }
      : { start, lengthBytes: length, writable, store: new LazyBytes(Number(length)) };
    const at = this.#indexAfter(start);
    this.#regions.splice(at, 0, region);
    return start;
  }

  /** Removes the regions lying in [va, va + length); a region cut in two is refused (EINVAL). */
  munmap(va: bigint, lengthBytes: bigint | number): void {
    const end = va + BigInt(lengthBytes);
    const keep: MmRegion[] = [];
    for (const r of this.#regions) {
      const rEnd = r.start + r.lengthBytes;
      if (rEnd <= va || r.start >= end) keep.push(r);
      else if (r.start < va || rEnd > end) {
        throw kernelError('EINVAL', 'partial munmap of a region is not modeled', { op: 'munmap' });
      }
    }
    this.#regions = keep;
  }

  #overlaps(start: bigint, length: bigint): boolean {
    const end = start + length;
    return this.#regions.some((r) => r.start < end && start < r.start + r.lengthBytes);
  }

  /** Index of the first region starting after `va`. */
  #indexAfter(va: bigint): number {
    let lo = 0;
    let hi = this.#regions.length;
    while (lo < hi) {
      const mid = (lo + hi) >>> 1;
      if (this.#regions[mid]!.start <= va) lo = mid + 1;
      else hi = mid;
    }
    return lo;
  }

  /** The region holding `va`, or undefined. */
  regionAt(va: bigint): MmRegion | undefined {
    const i = this.#indexAfter(va) - 1;
    if (i < 0) return undefined;
    const r = this.#regions[i]!;
    return va < r.start + r.lengthBytes ? r : undefined;
  }

  /**
   * Whether [va, va + length) is fully mapped (by back-to-back regions), and writable when
   * `write`: what get_user_pages needs to succeed. Touches no bytes.
   */
  covers(va: bigint, lengthBytes: bigint, write: boolean): boolean {
    if (!this.alive) return false;
    let at = va;
    const end = va + lengthBytes;
    while (at < end) {
      const r = this.regionAt(at);
      if (!r || (write && !r.writable)) return false;
      at = r.start + r.lengthBytes;
    }
    return true;
  }

  #walk(va: bigint, length: number, fn: (r: MmRegion, offset: number, done: number, n: number) => void) {
    let done = 0;
    while (done < length) {
      const at = va + BigInt(done);
      const r = this.regionAt(at);
      if (!r) throw kernelError('EFAULT', `address 0x${at.toString(16)} not mapped`);
      const offset = Number(at - r.start);
      const n = Math.min(length - done, Number(r.lengthBytes) - offset);
      fn(r, offset, done, n);
      done += n;
    }
  }

  read(va: bigint, target: Uint8Array): void {
    this.#walk(va, target.length, (r, offset, done, n) => {
      r.store.read(offset, target.subarray(done, done + n));
    });
  }

  /** A process's own store; ignores PROT_WRITE only for DMA by `force` (pinned pages). */
  write(va: bigint, data: Uint8Array, force = false): void {
    this.#walk(va, data.length, (r, offset, done, n) => {
      if (!r.writable && !force) throw kernelError('EFAULT', 'write to a read-only mapping');
      r.store.write(offset, data.subarray(done, done + n));
    });
  }

  /** fork(): private copy of every private region (touched chunks duplicated), shared ones shared. */
  clone(): Mm {
    const copy = new Mm();
    copy.#regions = this.#regions.map((r) => (r.shared ? { ...r } : { ...r, store: r.store.clone() }));
    copy.#next = this.#next;
    return copy;
  }
}
