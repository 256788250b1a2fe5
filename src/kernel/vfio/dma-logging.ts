import { LOG_MAX_RANGES, PAGE_SIZE, U64_MAX } from '../../uapi/device-feature.js';
import { kernelError } from '../../uapi/error.js';

/** `struct vfio_device_feature_dma_logging_range`. */
export interface DmaLoggingRange {
  iova: bigint;
  length: bigint;
}

/** `struct vfio_device_feature_dma_logging_control`; `ranges` stands for the user pointer. */
export interface DmaLoggingControl {
  pageSize: bigint;
  numRanges: number;
  ranges: readonly DmaLoggingRange[];
}

/** `struct vfio_device_feature_dma_logging_report`; `bitmap` stands for the user buffer. */
export interface DmaLoggingReport {
  iova: bigint;
  length: bigint;
  pageSize: bigint;
  bitmap: Uint8Array;
}

/** The kernel's IS_ALIGNED(x, a): `(x & (a - 1)) == 0` in u64 arithmetic, whatever `a` is. */
function isAligned(x: bigint, a: bigint): boolean {
  return (x & ((a - 1n) & U64_MAX)) === 0n;
}

const isPowerOfTwo = (x: bigint) => x > 0n && (x & (x - 1n)) === 0n;

/**
 * The VFIO core's checks of DMA_LOGGING_START (vfio_ioctl_device_feature_logging_start), in its
 * order: count, then each range in turn for alignment, overflow, overlap with earlier ranges.
 */
export function validateLoggingStart(control: DmaLoggingControl, where: { target: string; op: string }) {
  const n = control.numRanges;
  if (n === 0) throw kernelError('EINVAL', 'num_ranges is 0', where);
  if (n > LOG_MAX_RANGES) throw kernelError('E2BIG', `num_ranges ${n} exceeds ${LOG_MAX_RANGES}`, where);
  const accepted: { start: bigint; last: bigint }[] = [];
  for (let i = 0; i < n; i++) {
    const range = control.ranges[i];
    if (range === undefined) throw kernelError('EFAULT', `range ${i} is outside the ranges array`, where);
    const { iova, length } = range;
    if (!isAligned(iova, control.pageSize) || !isAligned(length, control.pageSize)) {
      throw kernelError('EINVAL', `range ${i} is not aligned to page_size ${control.pageSize}`, where);
    }
    if (iova + length > U64_MAX) throw kernelError('EOVERFLOW', `range ${i} overflows`, where);
    const start = iova;
    const last = iova + length - 1n;
    if (accepted.some((r) => r.start <= last && start <= r.last)) {
      throw kernelError('EINVAL', `range ${i} overlaps an earlier range`, where);
    }
    accepted.push({ start, last });
  }
}

/** The VFIO core's checks of DMA_LOGGING_REPORT before the driver is asked. */
export function validateLoggingReport(report: DmaLoggingReport, where: { target: string; op: string }) {
  if (report.pageSize < BigInt(PAGE_SIZE) || !isPowerOfTwo(report.pageSize)) {
    throw kernelError('EINVAL', `page_size ${report.pageSize} is below 4096 or not a power of 2`, where);
  }
  if (report.iova + report.length > U64_MAX) throw kernelError('EOVERFLOW', 'iova + length overflows', where);
  const bits = (report.length + report.pageSize - 1n) / report.pageSize;
  const bytes = Number(((bits + 63n) / 64n) * 8n);
  if (report.bitmap.length < bytes) {
    throw kernelError('EFAULT', `bitmap needs ${bytes} bytes, has ${report.bitmap.length}`, where);
  }
}

/** Granules per sparse bitmap chunk; memory grows with what was written, not with range sizes. */
const CHUNK_GRANULES = 1 << 15;

/**
 * A device's DMA dirty tracker: the tracked ranges at one granularity, dirty granules kept as
 * sparse bitmap chunks so a 1 TiB range costs nothing until it is written.
 */
export class DirtyPageLog {
  readonly granuleBytes: bigint;
  readonly #ranges: { start: bigint; end: bigint }[];
  readonly #chunks = new Map<number, Uint8Array>();

  constructor(ranges: readonly DmaLoggingRange[], pageSizeHint: bigint) {
    this.granuleBytes = DirtyPageLog.chooseGranule(pageSizeHint);
    this.#ranges = ranges
      .filter((r) => r.length > 0n)
      .map((r) => ({ start: r.iova, end: r.iova + r.length }))
      .sort((a, b) => (a.start < b.start ? -1 : 1));
  }

  /** The granularity the device picks for a hint: a power of two from 4 KiB to 1 GiB. */
  static chooseGranule(hint: bigint): bigint {
    let g = BigInt(PAGE_SIZE);
    while (g < hint && g < 1n << 30n) g <<= 1n;
    return g;
  }

  /** A device DMA write of `[iova, iova+length)`: mark the granules inside tracked ranges. */
  markWritten(iova: bigint, lengthBytes: number): void {
    if (lengthBytes === 0) return;
    const end = iova + BigInt(lengthBytes);
    for (const r of this.#ranges) {
      if (r.start >= end) break;
      if (r.end <= iova) continue;
      const from = (iova > r.start ? iova : r.start) / this.granuleBytes;
      const to = ((end < r.end ? end : r.end) - 1n) / this.granuleBytes;
      for (let g = from; g <= to; g++) this.#set(g);
    }
  }

  /**
   * Read-and-clear `[iova, iova+length)` into `bitmap` at `pageSize` granularity: bit k stands for
   * page `iova + k*pageSize` (u64 word k/64, bit k%64, little-endian = byte k/8, bit k%8). Bits are
   * only set; tracked granules overlapping the range are cleared.
   */
  readAndClear(iova: bigint, length: bigint, pageSize: bigint, bitmap: Uint8Array): void {
    if (length === 0n) return;
    const end = iova + length;
    const g = this.granuleBytes;
    for (let granule = iova / g; granule * g < end; granule++) {
      if (!this.#test(granule)) continue;
      this.#clear(granule);
      const lo = granule * g > iova ? granule * g : iova;
      const hi = (granule + 1n) * g < end ? (granule + 1n) * g : end;
      for (let page = (lo - iova) / pageSize; iova + page * pageSize < hi; page++) {
        const k = Number(page);
        bitmap[k >> 3]! |= 1 << (k & 7);
      }
    }
  }

  /** Number of dirty granules (for tests and stats). */
  get dirtyGranules(): number {
    let n = 0;
    for (const chunk of this.#chunks.values()) for (const byte of chunk) n += popcount8(byte);
    return n;
  }

  #locate(granule: bigint): [number, number] {
    return [Number(granule / BigInt(CHUNK_GRANULES)), Number(granule % BigInt(CHUNK_GRANULES))];
  }

  #set(granule: bigint): void {
    const [c, bit] = this.#locate(granule);
    let chunk = this.#chunks.get(c);
    if (!chunk) {
      chunk = new Uint8Array(CHUNK_GRANULES / 8);
      this.#chunks.set(c, chunk);
    }
    chunk[bit >> 3]! |= 1 << (bit & 7);
  }

  #test(granule: bigint): boolean {
    const [c, bit] = this.#locate(granule);
    const chunk = this.#chunks.get(c);
    return chunk !== undefined && (chunk[bit >> 3]! & (1 << (bit & 7))) !== 0;
  }

  #clear(granule: bigint): void {
    const [c, bit] = this.#locate(granule);
    const chunk = this.#chunks.get(c);
    if (chunk) chunk[bit >> 3]! &= ~(1 << (bit & 7));
  }
}

function popcount8(b: number): number {
  let n = 0;
  for (let x = b; x; x &= x - 1) n++;
  return n;
}
