import { popcount32 } from '../../kernel/mem/popcount.js';
import { internalError, invalidArgument } from '../../uapi/error.js';

/*
 * The software KVM dirty log of one RAM block: one bit per 4 KiB guest page, in a SharedArrayBuffer
 * that the host thread and every vCPU worker see.
 *
 *   byte 0    i32 ENABLED   1 while logging is on (KVM_MEM_LOG_DIRTY_PAGES), else 0
 *   byte 4..63              reserved (zero): the header has a cache line to itself
 *   byte 64   i32[words]    the bitmap: bit b of word w is page 32 w + b, words little-endian,
 *                           so the bytes are the kernel's bitmap layout (u64 LE words) as well
 *
 * Writers (host or vCPU) write the page first and mark it after (`Atomics.or`), so every write is
 * followed by a mark that a later sync sees: a sync that clears a bit before the write it stands for
 * has landed is harmless, the write's own mark comes after. Sync swaps each non-zero word with zero
 * (`Atomics.exchange`), so vCPUs keep running and no mark is ever lost between read and clear.
 */

const HEADER_BYTES = 64;
const ENABLED = 0;

/** The shared words of a dirty log, as a writer in any thread sees them. */
export interface DirtyLogViews {
  /** Header words (ENABLED at index 0). */
  readonly header: Int32Array;
  /** Bitmap words. */
  readonly bits: Int32Array;
}

/** Bytes of the SharedArrayBuffer behind the dirty log of `pages` pages. */
export function dirtyLogBufferBytes(pages: number): number {
  return HEADER_BYTES + dirtyBitmapWords(pages) * 4;
}

/** u32 words of a bitmap of `pages` pages. */
export function dirtyBitmapWords(pages: number): number {
  return Math.ceil(pages / 32);
}

/** Views over a dirty log buffer, e.g. one passed to a worker. */
export function dirtyLogViews(buffer: SharedArrayBuffer, pages: number): DirtyLogViews {
  if (buffer.byteLength !== dirtyLogBufferBytes(pages)) {
    throw internalError(`dirty log buffer of ${buffer.byteLength} bytes does not fit ${pages} pages`);
  }
  return {
    header: new Int32Array(buffer, 0, HEADER_BYTES / 4),
    bits: new Int32Array(buffer, HEADER_BYTES, dirtyBitmapWords(pages)),
  };
}

/** Mark one page dirty if logging is on. Call after the page's bytes were written. */
export function markDirtyPage(log: DirtyLogViews, page: number): void {
  if (Atomics.load(log.header, ENABLED) !== 0) Atomics.or(log.bits, page >>> 5, 1 << (page & 31));
}

/** Pages set in a bitmap. */
export function countDirtyPages(bitmap: Uint32Array | Int32Array): number {
  let n = 0;
  for (let i = 0; i < bitmap.length; i++) n += popcount32(bitmap[i]!);
  return n;
}

/** Is page `page` set in a bitmap? */
export function isPageDirty(bitmap: Uint32Array, page: number): boolean {
  return ((bitmap[page >>> 5]! >>> (page & 31)) & 1) === 1;
}

/** The software KVM dirty log of one RAM block (see the layout above). */
export class DirtyLog {
  readonly pages: number;
  /** u32 words of a bitmap this log returns. */
  readonly words: number;
  /** The shared buffer, to hand to worker threads (see `dirtyLogViews`). */
  readonly buffer: SharedArrayBuffer;
  readonly #views: DirtyLogViews;

  constructor(pages: number) {
    if (!Number.isSafeInteger(pages) || pages < 0) throw internalError(`bad dirty log page count ${pages}`);
    this.pages = pages;
    this.words = dirtyBitmapWords(pages);
    this.buffer = new SharedArrayBuffer(dirtyLogBufferBytes(pages));
    this.#views = dirtyLogViews(this.buffer, pages);
  }

  /** Is logging on? */
  get active(): boolean {
    return Atomics.load(this.#views.header, ENABLED) !== 0;
  }

  /** Start logging from a clean bitmap (KVM: set KVM_MEM_LOG_DIRTY_PAGES on the memslot). */
  start(): void {
    if (this.active) throw invalidArgument('dirty logging is already started');
    this.#views.bits.fill(0);
    Atomics.store(this.#views.header, ENABLED, 1);
  }

  /** Stop logging: writers stop marking; bits not yet synced are dropped at the next start. */
  stop(): void {
    if (!this.active) throw invalidArgument('dirty logging is not started');
    Atomics.store(this.#views.header, ENABLED, 0);
  }

  /**
   * KVM_GET_DIRTY_LOG + KVM_CLEAR_DIRTY_LOG: the pages dirtied since the last sync, cleared in the
   * log. ORed into `into` when given (a bitmap of `words` words, e.g. the migration bitmap), else
   * into a new bitmap; returns that bitmap. Swaps words, never walks pages: vCPUs keep running.
   */
  syncAndClear(into?: Uint32Array): Uint32Array {
    if (!this.active) throw invalidArgument('dirty logging is not started');
    if (into !== undefined && into.length !== this.words) {
      throw invalidArgument(`bitmap of ${into.length} words, the dirty log has ${this.words}`);
    }
    const out = into ?? new Uint32Array(this.words);
    const bits = this.#views.bits;
    for (let i = 0; i < bits.length; i++) {
      if (Atomics.load(bits, i) !== 0) out[i] = out[i]! | Atomics.exchange(bits, i, 0);
    }
    return out;
  }

  /** Mark `[first, first + count)` dirty if logging is on (writes by the host thread). */
  markPages(first: number, count: number): void {
    if (first < 0 || count < 0 || first + count > this.pages) {
      throw internalError(`pages [${first}, +${count}) beyond a dirty log of ${this.pages} pages`);
    }
    if (!this.active) return;
    const bits = this.#views.bits;
    let page = first;
    const end = first + count;
    while (page < end) {
      const word = page >>> 5;
      const from = page & 31;
      const to = Math.min(32, from + (end - page));
      const mask = to - from === 32 ? -1 : ((1 << (to - from)) - 1) << from;
      Atomics.or(bits, word, mask);
      page += to - from;
    }
  }

  /** Pages marked and not yet synced, without clearing them (also readable while stopped). */
  pendingPages(): number {
    return countDirtyPages(this.#views.bits);
  }
}
