import { invalidArgument } from '../../uapi/error.js';
import { type AccessPattern, validateAccessPattern } from './access-pattern.js';
import { GUEST_PAGE_BYTES } from './guest-page.js';

/**
 * What a vCPU does: write guest RAM pages, in a pattern, at a rate. Guest RAM is addressed by
 * "guest RAM offsets": the RAM blocks concatenated in the order they were added to GuestRam.
 */
export interface VcpuWorkload {
  /** RAM this vCPU dirties per second of its run time (throttled time excluded), MiB/s; 0 (default) = as fast as it can. */
  dirtyRateMiBps?: number;
  /** Start of the working set in guest RAM offsets, 4 KiB aligned; default 0. */
  workingSetOffsetBytes?: number;
  /** Size of the working set, a positive multiple of 4 KiB; default all RAM from the offset. */
  workingSetBytes?: number;
  /** Default random. */
  pattern?: AccessPattern;
  /** PRNG seed (u32); vCPU i draws stream i of it. Default 1. */
  seed?: number;
  /** Bytes written per page write, a power of two from 4 to 4096; default 4096 (the whole page). */
  writeBytesPerPage?: number;
  /** Page writes after which the vCPU idles (a write skipped on unplugged memory counts); default none. */
  pageWriteLimit?: number;
}

/** A checked workload in pages, as a vCPU worker runs it (structured-cloneable). */
export interface ResolvedWorkload {
  /** 0 = unlimited. */
  dirtyRateBytesPerMs: number;
  /** First page of the working set, in guest RAM pages. */
  firstPage: number;
  pages: number;
  pattern: AccessPattern;
  seed: number;
  writeBytes: number;
  /** Infinity = none. */
  pageWriteLimit: number;
}

const MAX_RATE_MIBPS = 1 << 20;

/** Check a workload against guest RAM of `ramBytes` bytes; throws ERR_INVALID_ARGUMENT. */
export function resolveWorkload(workload: VcpuWorkload, ramBytes: number): ResolvedWorkload {
  const {
    dirtyRateMiBps = 0,
    workingSetOffsetBytes = 0,
    pattern = { kind: 'random' },
    seed = 1,
    writeBytesPerPage = GUEST_PAGE_BYTES,
    pageWriteLimit = Infinity,
  } = workload;
  if (!(typeof dirtyRateMiBps === 'number' && dirtyRateMiBps >= 0 && dirtyRateMiBps <= MAX_RATE_MIBPS)) {
    throw invalidArgument(`dirty rate ${dirtyRateMiBps} MiB/s is not in [0, ${MAX_RATE_MIBPS}]`);
  }
  const aligned = (n: number) => Number.isSafeInteger(n) && n >= 0 && n % GUEST_PAGE_BYTES === 0;
  if (!aligned(workingSetOffsetBytes) || workingSetOffsetBytes >= ramBytes) {
    throw invalidArgument(
      `working set offset ${workingSetOffsetBytes} is not a 4 KiB aligned offset inside ${ramBytes} bytes of RAM`,
    );
  }
  const workingSetBytes = workload.workingSetBytes ?? ramBytes - workingSetOffsetBytes;
  if (!aligned(workingSetBytes) || workingSetBytes === 0) {
    throw invalidArgument(`working set size ${workingSetBytes} is not a positive multiple of 4 KiB`);
  }
  if (workingSetOffsetBytes + workingSetBytes > ramBytes) {
    throw invalidArgument(
      `working set [${workingSetOffsetBytes}, +${workingSetBytes}) ends beyond ${ramBytes} bytes of RAM`,
    );
  }
  validateAccessPattern(pattern);
  if (!Number.isInteger(seed) || seed < 0 || seed > 0xffffffff) {
    throw invalidArgument(`seed ${seed} is not a u32`);
  }
  const w = writeBytesPerPage;
  if (!Number.isSafeInteger(w) || w < 4 || w > GUEST_PAGE_BYTES || (w & (w - 1)) !== 0) {
    throw invalidArgument(`write size ${w} is not a power of two from 4 to ${GUEST_PAGE_BYTES}`);
  }
  if (!(pageWriteLimit === Infinity || (Number.isSafeInteger(pageWriteLimit) && pageWriteLimit >= 0))) {
    throw invalidArgument(`page write limit ${pageWriteLimit} is not a count`);
  }
  return {
    dirtyRateBytesPerMs: (dirtyRateMiBps * 1048576) / 1000,
    firstPage: workingSetOffsetBytes / GUEST_PAGE_BYTES,
    pages: workingSetBytes / GUEST_PAGE_BYTES,
    pattern: { ...pattern },
    seed,
    writeBytes: w,
    pageWriteLimit,
  };
}
