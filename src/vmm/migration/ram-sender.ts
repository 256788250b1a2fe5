import { SEGMENT_BYTES } from '../../kernel/mem/phys-memory.js';
import { countDirtyPages } from '../machine/dirty-log.js';
import type { GuestRam } from '../machine/guest-ram.js';
import type { RamBlock } from '../machine/ram-block.js';
import { encodeRamPages, MAX_NORMAL_PAGES, MAX_ZERO_PAGES, RAM_PAGE_BYTES } from './wire-format.js';

const PAGE_WORDS = RAM_PAGE_BYTES / 4;
const PAGES_PER_SEGMENT = SEGMENT_BYTES / RAM_PAGE_BYTES;

/** One RAM_PAGES frame ready to send: header with meta, and the page data as views of guest RAM. */
export interface RamPacket {
  header: Buffer;
  body: Uint8Array[];
  normalPages: number;
  zeroPages: number;
  /** Header + body bytes. */
  bytes: number;
}

interface BlockState {
  block: RamBlock;
  /** The migration bitmap: 1 = the page must be sent (again). */
  bitmap: Uint32Array;
  /** Int32 views of the block's memory segments, for the zero-page test. */
  words: Int32Array[];
}

/**
 * The source's RAM side (QEMU's ram.c with multifd packets): a migration bitmap per RAM block,
 * filled from the dirty logs at each sync; packets of up to 128 dirty pages of one block, zero
 * pages listed by number only, the others sent from guest RAM as it is (no copy: a page that
 * changes before the socket takes it is dirty again and is resent in the next round).
 */
export class RamSender {
  readonly #blocks: BlockState[];
  #dirty = 0;
  #blockIndex = 0;
  #word = 0;
  readonly #normal = new Uint32Array(MAX_NORMAL_PAGES);
  readonly #zero = new Uint32Array(MAX_ZERO_PAGES);

  constructor(ram: GuestRam) {
    this.#blocks = ram.blocks.map((block) => ({
      block,
      bitmap: new Uint32Array(block.dirtyLog.words),
      words: block.memory.buffers.map((b) => new Int32Array(b)),
    }));
  }

  /** Pages waiting to be sent. */
  get dirtyPages(): number {
    return this.#dirty;
  }

  get dirtyBytes(): number {
    return this.#dirty * RAM_PAGE_BYTES;
  }

  /** The first round: every page, except the unplugged blocks of discardable regions. */
  markAll(): void {
    for (const s of this.#blocks) {
      const { bitmap, block } = s;
      bitmap.fill(0xffffffff);
      const tail = block.pages % 32;
      if (tail !== 0) bitmap[bitmap.length - 1] = (1 << tail) - 1;
      const discard = block.discard;
      if (discard !== undefined) {
        const pagesPerBlock = discard.blockSizeBytes / RAM_PAGE_BYTES;
        for (let b = 0; b < discard.blockCount; b++) {
          if (!discard.isPlugged(b)) clearRange(bitmap, b * pagesPerBlock, pagesPerBlock);
        }
      }
    }
    this.#recount();
  }

  /** Pull every block's dirty log into the bitmap (KVM_GET_DIRTY_LOG + clear); returns the pages dirty now. */
  syncDirtyLog(): number {
    for (const s of this.#blocks) s.block.dirtyLog.syncAndClear(s.bitmap);
    return this.#recount();
  }

  /** Mark pages dirty that a device (DMA log, IOMMU bitmap) or a pin reports. */
  markPages(blockIndex: number, first: number, count: number): void {
    const s = this.#blocks[blockIndex]!;
    for (let p = first; p < first + count; p++) {
      const bit = 1 << (p & 31);
      if ((s.bitmap[p >>> 5]! & bit) === 0) {
        s.bitmap[p >>> 5]! |= bit;
        this.#dirty++;
      }
    }
  }

  /** Start a new pass at the first page. */
  rewind(): void {
    this.#blockIndex = 0;
    this.#word = 0;
  }

  /** The next packet of this pass, or undefined when the pass has reached the end of RAM. */
  nextPacket(): RamPacket | undefined {
    while (this.#blockIndex < this.#blocks.length) {
      const packet = this.#packetOf(this.#blockIndex);
      if (packet !== undefined) return packet;
      this.#blockIndex++;
      this.#word = 0;
    }
    return undefined;
  }

  #packetOf(index: number): RamPacket | undefined {
    const s = this.#blocks[index]!;
    const { bitmap, block, words } = s;
    let normal = 0;
    let zero = 0;
    while (this.#word < bitmap.length && normal < MAX_NORMAL_PAGES && zero < MAX_ZERO_PAGES) {
      let bits = bitmap[this.#word]!;
      if (bits === 0) {
        this.#word++;
        continue;
      }
      // Take pages from this word while the packet has room; the rest stays for the next packet.
      while (bits !== 0 && normal < MAX_NORMAL_PAGES && zero < MAX_ZERO_PAGES) {
        const bit = 31 - Math.clz32(bits & -bits);
        bits &= bits - 1;
        const page = this.#word * 32 + bit;
        if (isZeroPage(words, page)) this.#zero[zero++] = page;
        else this.#normal[normal++] = page;
      }
      bitmap[this.#word] = bits;
      if (bits === 0) this.#word++;
    }
    if (normal + zero === 0) return undefined;
    this.#dirty -= normal + zero;
    const header = encodeRamPages(index, this.#normal.subarray(0, normal), this.#zero.subarray(0, zero));
    const body: Uint8Array[] = [];
    // Contiguous pages go as one view (never across a 1 GiB segment of the memory).
    for (let i = 0; i < normal;) {
      const first = this.#normal[i]!;
      let run = 1;
      while (
        i + run < normal &&
        this.#normal[i + run] === first + run &&
        Math.floor((first + run) / PAGES_PER_SEGMENT) === Math.floor(first / PAGES_PER_SEGMENT)
      ) {
        run++;
      }
      const view = block.memory.view(first * RAM_PAGE_BYTES, run * RAM_PAGE_BYTES);
      body.push(Buffer.from(view.buffer, view.byteOffset, view.byteLength));
      i += run;
    }
    return {
      header,
      body,
      normalPages: normal,
      zeroPages: zero,
      bytes: header.length + normal * RAM_PAGE_BYTES,
    };
  }

  #recount(): number {
    this.#dirty = this.#blocks.reduce((n, s) => n + countDirtyPages(s.bitmap), 0);
    return this.#dirty;
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

function clearRange(bitmap: Uint32Array, first: number, count: number): void {
  for (let p = first; p < first + count; p++) bitmap[p >>> 5]! &= ~(1 << (p & 31));
}
