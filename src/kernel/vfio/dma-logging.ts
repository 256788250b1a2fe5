import { PAGE_SIZE, U64_MAX } from '../../uapi/arch.js';
import { popcount32 } from '../mem/popcount.js';
import { LOG_MAX_RANGES } from '../../uapi/device-feature.js';
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
    // The kernel's u64 `iova + length - 1`: a zero-length range at IOVA 0 wraps to the whole space.
    const start = iova;
    const last = (iova + length - 1n) & U64_MAX;
    if (accepted.some((r) => r.start <= last && start <= r.last)) {
      throw kernelError('EINVAL', `range ${i} overlaps an earlier range`, where);
    }
    accepted.push({ start, last });
  }
}

/** Bytes of bitmap a report of `length` bytes at `pageSize` needs: one bit per page, whole u64 words. */
export function reportBitmapBytes(length: bigint, pageSize: bigint): bigint {
  const bits = (length + pageSize - 1n) / pageSize;
  return ((bits + 63n) / 64n) * 8n;
}

/** Would page_size and the range pass the kernel's checks (everything but the bitmap)? */
export function loggingReportArgsValid(report: { iova: bigint; length: bigint; pageSize: bigint }): boolean {
  return (
    report.pageSize >= BigInt(PAGE_SIZE) &&
    isPowerOfTwo(report.pageSize) &&
    report.iova + report.length <= U64_MAX
  );
}

/** The VFIO core's checks of DMA_LOGGING_REPORT before the driver is asked. */
export function validateLoggingReport(report: DmaLoggingReport, where: { target: string; op: string }) {
  if (report.pageSize < BigInt(PAGE_SIZE) || !isPowerOfTwo(report.pageSize)) {
    throw kernelError('EINVAL', `page_size ${report.pageSize} is below 4096 or not a power of 2`, where);
  }
  if (report.iova + report.length > U64_MAX) throw kernelError('EOVERFLOW', 'iova + length overflows', where);
  const bytes = reportBitmapBytes(report.length, report.pageSize);
  if (BigInt(report.bitmap.length) < bytes) {
    throw kernelError('EFAULT', `bitmap needs ${bytes} bytes, has ${report.bitmap.length}`, where);
  }
}

/** Granules per sparse bitmap chunk; memory grows with what was written, not with range sizes. */
const CHUNK_GRANULES = 1 << 15;
const CHUNK_WORDS = CHUNK_GRANULES / 32;

/**
 * A device's DMA dirty tracker: the tracked ranges at one granularity, dirty granules kept as
 * sparse bitmap chunks so a 1 TiB range costs nothing until it is written.
 *
 * Granule numbers are plain numbers: IOVAs are below 2^64 and granules at least 4 KiB, so a granule
 * number stays below 2^52. markWritten costs a binary search plus one bit (or word) per granule
 * written; readAndClear costs the chunks that hold dirty bits inside the report range plus the
 * bits it reports, never the size of the range.
 */
export class DirtyPageLog {
  readonly granuleBytes: bigint;
  readonly #shift: bigint;
  readonly #ranges: { start: bigint; end: bigint }[];
  readonly #chunks = new Map<number, Uint32Array>();

  constructor(ranges: readonly DmaLoggingRange[], pageSizeHint: bigint) {
    this.granuleBytes = DirtyPageLog.chooseGranule(pageSizeHint);
    this.#shift = BigInt(this.granuleBytes.toString(2).length - 1);
    this.#ranges = ranges
      .filter((r) => r.length > 0n)
      .map((r) => ({ start: r.iova, end: r.iova + r.length }))
      .sort((a, b) => (a.start < b.start ? -1 : a.start > b.start ? 1 : 0));
  }

  /** The granularity the device picks for a hint: a power of two from 4 KiB to 1 GiB. */
  static chooseGranule(hint: bigint): bigint {
    let g = BigInt(PAGE_SIZE);
    while (g < hint && g < 1n << 30n) g <<= 1n;
    return g;
  }

  /** A device DMA write of `[iova, iova+length)`: mark the granules inside tracked ranges. */
  markWritten(iova: bigint, lengthBytes: number): void {
    if (!(lengthBytes > 0)) return;
    const end = iova + BigInt(lengthBytes);
    const ranges = this.#ranges;
    for (let i = this.#firstRangeEndingAfter(iova); i < ranges.length; i++) {
      const r = ranges[i]!;
      if (r.start >= end) break;
      const lo = iova > r.start ? iova : r.start;
      const hi = end < r.end ? end : r.end;
      this.#setGranules(Number(lo >> this.#shift), Number((hi - 1n) >> this.#shift));
    }
  }

  /**
   * Read-and-clear `[iova, iova+length)` into `bitmap` at `pageSize` granularity: bit k stands for
   * page `iova + k*pageSize` (u64 word k/64, bit k%64, little-endian = byte k/8, bit k%8). Bits are
   * only set, never cleared. A dirty granule sets the bit of every report page it overlaps inside
   * the range. It is cleared when the report covers all of its tracked bytes; a granule that
   * straddles the edge of the report range with tracked bytes outside it stays dirty, so a write
   * there is never lost to a report of a neighbouring range.
   */
  readAndClear(iova: bigint, length: bigint, pageSize: bigint, bitmap: Uint8Array): void {
    if (length <= 0n || this.#chunks.size === 0) return;
    const end = iova + length;
    const firstGranule = Number(iova >> this.#shift);
    const lastGranule = Number((end - 1n) >> this.#shift);
    const firstChunk = Math.floor(firstGranule / CHUNK_GRANULES);
    const lastChunk = Math.floor(lastGranule / CHUNK_GRANULES);
    let chunkIds: Iterable<number>;
    if (lastChunk - firstChunk + 1 <= this.#chunks.size) {
      const ids: number[] = [];
      for (let c = firstChunk; c <= lastChunk; c++) if (this.#chunks.has(c)) ids.push(c);
      chunkIds = ids;
    } else {
      chunkIds = [...this.#chunks.keys()].filter((c) => c >= firstChunk && c <= lastChunk);
    }
    for (const c of chunkIds) {
      const chunk = this.#chunks.get(c)!;
      const base = c * CHUNK_GRANULES;
      const wordLo = c === firstChunk ? (firstGranule - base) >>> 5 : 0;
      const wordHi = c === lastChunk ? (lastGranule - base) >>> 5 : CHUNK_WORDS - 1;
      for (let w = wordLo; w <= wordHi; w++) {
        let word = chunk[w]!;
        if (word === 0) continue;
        let keep = 0;
        while (word !== 0) {
          const low = word & -word;
          word ^= low;
          const granule = base + w * 32 + (31 - Math.clz32(low));
          if (granule < firstGranule || granule > lastGranule) {
            keep |= low;
            continue;
          }
          if (!this.#report(granule, iova, end, pageSize, bitmap)) keep |= low;
        }
        chunk[w] = keep >>> 0;
      }
      if (chunk.every((x) => x === 0)) this.#chunks.delete(c);
    }
  }

  /** Number of dirty granules (for tests and stats). */
  get dirtyGranules(): number {
    let n = 0;
    for (const chunk of this.#chunks.values()) for (const word of chunk) n += popcount32(word);
    return n;
  }

  /** Sparse chunks currently allocated (for tests: memory follows dirty data). */
  get chunkCount(): number {
    return this.#chunks.size;
  }

  /** Set the report bits of one dirty granule; true when the granule may be cleared. */
  #report(granule: number, iova: bigint, end: bigint, pageSize: bigint, bitmap: Uint8Array): boolean {
    const start = BigInt(granule) << this.#shift;
    const stop = start + this.granuleBytes;
    const lo = start > iova ? start : iova;
    const hi = stop < end ? stop : end;
    setBits(bitmap, Number((lo - iova) / pageSize), Number((hi - 1n - iova) / pageSize));
    return (start >= iova || !this.#tracked(start, iova)) && (stop <= end || !this.#tracked(end, stop));
  }

  /** Does any tracked range overlap `[start, end)`? */
  #tracked(start: bigint, end: bigint): boolean {
    const r = this.#ranges[this.#firstRangeEndingAfter(start)];
    return r !== undefined && r.start < end;
  }

  /** Index of the first tracked range whose end lies above `iova` (ranges are sorted, disjoint). */
  #firstRangeEndingAfter(iova: bigint): number {
    let lo = 0;
    let hi = this.#ranges.length;
    while (lo < hi) {
      const mid = (lo + hi) >>> 1;
      if (this.#ranges[mid]!.end > iova) hi = mid;
      else lo = mid + 1;
    }
    return lo;
  }

  /** Mark granules `from..to` (inclusive) dirty. */
  #setGranules(from: number, to: number): void {
    for (let c = Math.floor(from / CHUNK_GRANULES); c * CHUNK_GRANULES <= to; c++) {
      const base = c * CHUNK_GRANULES;
      let chunk = this.#chunks.get(c);
      if (!chunk) {
        chunk = new Uint32Array(CHUNK_WORDS);
        this.#chunks.set(c, chunk);
      }
      const a = Math.max(from, base) - base;
      const b = Math.min(to, base + CHUNK_GRANULES - 1) - base;
      setWordBits(chunk, a, b);
    }
  }
}

/** Set bits a..b (inclusive) of a little-endian bit array stored in u32 words. */
function setWordBits(words: Uint32Array, a: number, b: number): void {
  const wa = a >>> 5;
  const wb = b >>> 5;
  const maskFrom = (bit: number) => (0xffffffff << bit) >>> 0;
  const maskTo = (bit: number) => 0xffffffff >>> (31 - bit);
  if (wa === wb) {
    words[wa]! |= maskFrom(a & 31) & maskTo(b & 31);
    return;
  }
  words[wa]! |= maskFrom(a & 31);
  for (let w = wa + 1; w < wb; w++) words[w] = 0xffffffff;
  words[wb]! |= maskTo(b & 31);
}

/** Set bits a..b (inclusive) of a bitmap: bit k is byte k/8, bit k%8. */
function setBits(bitmap: Uint8Array, a: number, b: number): void {
  let k = a;
  for (; k <= b && (k & 7) !== 0; k++) bitmap[k >> 3]! |= 1 << (k & 7);
  if (k + 7 <= b) {
    bitmap.fill(0xff, k >> 3, (b + 1) >> 3);
    k = ((b + 1) >> 3) << 3;
  }
  for (; k <= b; k++) bitmap[k >> 3]! |= 1 << (k & 7);
}
