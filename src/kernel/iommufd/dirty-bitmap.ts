/**
 * The dirty bits of one IOMMU domain: one bit per 4 KiB IOVA page, set by device DMA writes while
 * tracking is on (what the IOPTE dirty bits are on real hardware), read and cleared by
 * HWPT_GET_DIRTY_BITMAP, cleared for an IOVA range when it is unmapped.
 *
 * IOVA space is 64-bit and sparse, so the bits live in 4 KiB chunks (32 Ki pages = 128 MiB of
 * IOVA each) allocated on first write. Page numbers (IOVA >> 12, below 2^52) are plain numbers.
 */
const CHUNK_SHIFT = 15;
const CHUNK_PAGES = 1 << CHUNK_SHIFT;
const CHUNK_WORDS = CHUNK_PAGES >>> 5;
/** Slot after the bit words holding the number of non-zero words (a chunk goes when it is 0). */
const NZ = CHUNK_WORDS;

export class DirtyBitmap {
  #chunks = new Map<number, Uint32Array>();
  #lastKey = -1;
  #last: Uint32Array | undefined;

  /** Number of allocated chunks (for tests and memory accounting). */
  get chunkCount(): number {
    return this.#chunks.size;
  }

  #chunk(key: number): Uint32Array {
    if (key === this.#lastKey) return this.#last!;
    let c = this.#chunks.get(key);
    if (!c) {
      c = new Uint32Array(CHUNK_WORDS + 1);
      this.#chunks.set(key, c);
    }
    this.#lastKey = key;
    this.#last = c;
    return c;
  }

  /** Marks the pages touched by a `lengthBytes` write at `iova` (the device DMA hot path). */
  mark(iova: bigint, lengthBytes: number): void {
    if (lengthBytes <= 0) return;
    const first = Number(iova >> 12n);
    const last = lengthBytes === 1 ? first : Number((iova + BigInt(lengthBytes - 1)) >> 12n);
    this.markPages(first, last);
  }

  /** Marks pages [first, last]. */
  markPages(first: number, last: number): void {
    let p = first;
    while (p <= last) {
      const key = Math.floor(p / CHUNK_PAGES);
      const c = this.#chunk(key);
      const base = key * CHUNK_PAGES;
      const end = Math.min(last, base + CHUNK_PAGES - 1);
      for (let i = p - base; i <= end - base; i++) {
        const w = i >>> 5;
        const old = c[w]!;
        if (old === 0) c[NZ]!++;
        c[w] = old | (1 << (i & 31));
      }
      p = end + 1;
    }
  }

  /** Whether page `p` is dirty. */
  isDirty(p: number): boolean {
    const c = this.#chunks.get(Math.floor(p / CHUNK_PAGES));
    if (!c) return false;
    const i = p % CHUNK_PAGES;
    return (c[i >>> 5]! & (1 << (i & 31))) !== 0;
  }

  /** Clears every bit. */
  clear(): void {
    this.#chunks.clear();
    this.#lastKey = -1;
    this.#last = undefined;
  }

  /** Clears pages [first, last] (an unmapped range). */
  clearPages(first: number, last: number): void {
    this.forEachDirty(first, last, true, () => {});
  }

  /** Chunk keys holding pages in [first, last], ascending. */
  #keysIn(first: number, last: number): number[] {
    const k0 = Math.floor(first / CHUNK_PAGES);
    const k1 = Math.floor(last / CHUNK_PAGES);
    const keys: number[] = [];
    if (k1 - k0 < this.#chunks.size) {
      for (let k = k0; k <= k1; k++) if (this.#chunks.has(k)) keys.push(k);
    } else {
      for (const k of this.#chunks.keys()) if (k >= k0 && k <= k1) keys.push(k);
      keys.sort((a, b) => a - b);
    }
    return keys;
  }

  /**
   * Calls `fn(page)` for every dirty page in [first, last], ascending; clears those bits when
   * `clear`. Only allocated chunks and non-zero words are visited.
   */
  forEachDirty(first: number, last: number, clear: boolean, fn: (page: number) => void): void {
    if (first > last || this.#chunks.size === 0) return;
    for (const key of this.#keysIn(first, last)) {
      const c = this.#chunks.get(key)!;
      const base = key * CHUNK_PAGES;
      const lo = Math.max(first, base) - base;
      const hi = Math.min(last, base + CHUNK_PAGES - 1) - base;
      for (let w = lo >>> 5; w <= hi >>> 5; w++) {
        let word = c[w]!;
        if (word === 0) continue;
        // Keep only the bits of [lo, hi] in this word.
        const wlo = w << 5;
        if (wlo < lo) word &= ~0 << (lo - wlo);
        if (wlo + 31 > hi) word &= ~0 >>> (31 - (hi - wlo));
        if (word === 0) continue;
        if (clear) {
          c[w] = c[w]! & ~word;
          if (c[w] === 0) c[NZ]!--;
        }
        while (word !== 0) {
          const bit = 31 - Math.clz32(word & -word);
          fn(base + wlo + bit);
          word &= word - 1;
        }
      }
      if (clear && c[NZ] === 0) {
        this.#chunks.delete(key);
        if (this.#lastKey === key) {
          this.#lastKey = -1;
          this.#last = undefined;
        }
      }
    }
  }

  /** Every dirty page, ascending (tests). */
  pages(): number[] {
    const out: number[] = [];
    this.forEachDirty(0, Number.MAX_SAFE_INTEGER, false, (p) => out.push(p));
    return out;
  }
}
