import { SEGMENT_BYTES } from '../../kernel/mem/phys-memory.js';
import { encodeRamPages, MAX_NORMAL_PAGES, MAX_ZERO_PAGES, RAM_PAGE_BYTES } from './wire-format.js';

const PAGE_WORDS = RAM_PAGE_BYTES / 4;
const PAGES_PER_SEGMENT = SEGMENT_BYTES / RAM_PAGE_BYTES;

/**
 * A RAM block as the packet builders see it: its migration bitmap (1 = send the page) and its
 * memory segments. Both live in shared memory, so the source's channel threads build packets from
 * the same bitmap and send the same guest pages as the main thread would.
 */
export interface SharedRamBlock {
  bitmap: Uint32Array;
  segments: SharedArrayBuffer[];
}

/** One RAM_PAGES frame ready to send: header with meta, and the page data as views of guest RAM. */
export interface RamPacket {
  header: Buffer;
  body: Uint8Array[];
  normalPages: number;
  zeroPages: number;
  /** Header + body bytes. */
  bytes: number;
}

/** The bitmap words a scan takes pages from: `word` advances as words are emptied, up to `end`. */
export interface WordRange {
  word: number;
  end: number;
}

/**
 * Builds RAM_PAGES packets from one block: up to MAX_NORMAL_PAGES pages per packet, each page
 * tested for zero (QEMU's buffer_is_zero) and then listed by number only, the others sent as views
 * of guest RAM as it is (no copy: a page that changes before the socket takes it is dirty again and
 * goes in the next round). Taking a page clears its bit.
 */
export class RamPacketBuilder {
  readonly #block: number;
  readonly #bitmap: Uint32Array;
  readonly #segments: SharedArrayBuffer[];
  readonly #words: Int32Array[];
  readonly #normal = new Uint32Array(MAX_NORMAL_PAGES);
  readonly #zero = new Uint32Array(MAX_ZERO_PAGES);

  constructor(block: number, shared: SharedRamBlock) {
    this.#block = block;
    this.#bitmap = shared.bitmap;
    this.#segments = shared.segments;
    this.#words = shared.segments.map((s) => new Int32Array(s));
  }

  /** The next packet from the dirty pages of `range` (which it advances), or undefined once it is empty. */
  next(range: WordRange): RamPacket | undefined {
    const bitmap = this.#bitmap;
    let normal = 0;
    let zero = 0;
    while (range.word < range.end && normal < MAX_NORMAL_PAGES && zero < MAX_ZERO_PAGES) {
      let bits = bitmap[range.word]!;
      if (bits === 0) {
        range.word++;
        continue;
      }
      // Take pages from this word while the packet has room; the rest stays for the next packet.
      while (bits !== 0 && normal < MAX_NORMAL_PAGES && zero < MAX_ZERO_PAGES) {
        const bit = 31 - Math.clz32(bits & -bits);
        bits &= bits - 1;
        const page = range.word * 32 + bit;
        if (isZeroPage(this.#words, page)) this.#zero[zero++] = page;
        else this.#normal[normal++] = page;
      }
      bitmap[range.word] = bits;
      if (bits === 0) range.word++;
    }
    if (normal + zero === 0) return undefined;
    const header = encodeRamPages(
      this.#block,
      this.#normal.subarray(0, normal),
      this.#zero.subarray(0, zero),
    );
    return {
      header,
      body: this.#runs(normal),
      normalPages: normal,
      zeroPages: zero,
      bytes: header.length + normal * RAM_PAGE_BYTES,
    };
  }

  /** Views of the packet's normal pages, one per run of contiguous pages within a segment. */
  #runs(normal: number): Uint8Array[] {
    const body: Uint8Array[] = [];
    for (let i = 0; i < normal;) {
      const first = this.#normal[i]!;
      const segment = Math.floor(first / PAGES_PER_SEGMENT);
      let run = 1;
      while (
        i + run < normal &&
        this.#normal[i + run] === first + run &&
        Math.floor((first + run) / PAGES_PER_SEGMENT) === segment
      ) {
        run++;
      }
      const offset = (first % PAGES_PER_SEGMENT) * RAM_PAGE_BYTES;
      body.push(Buffer.from(this.#segments[segment]!, offset, run * RAM_PAGE_BYTES));
      i += run;
    }
    return body;
  }
}

function isZeroPage(segments: Int32Array[], page: number): boolean {
  const words = segments[Math.floor(page / PAGES_PER_SEGMENT)]!;
  const start = (page % PAGES_PER_SEGMENT) * PAGE_WORDS;
  const end = start + PAGE_WORDS;
  for (let i = start; i < end; i += 4) {
    if ((words[i]! | words[i + 1]! | words[i + 2]! | words[i + 3]!) !== 0) return false;
  }
  return true;
}
