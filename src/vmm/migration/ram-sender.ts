import { popcount32 } from '../../kernel/mem/popcount.js';
import { countDirtyPages } from '../machine/dirty-log.js';
import type { GuestRam } from '../machine/guest-ram.js';
import type { RamBlock } from '../machine/ram-block.js';
import { type RamPacket, RamPacketBuilder, type SharedRamBlock } from './ram-scan.js';
import { RAM_PAGE_BYTES } from './wire-format.js';

/** A slice of one block's bitmap for a channel thread to send (see RamSender.nextJob). */
export interface RamJob {
  block: number;
  fromWord: number;
  toWord: number;
  /** Dirty pages in the slice when it was cut. */
  pages: number;
}

interface BlockState {
  block: RamBlock;
  shared: SharedRamBlock;
  packets: RamPacketBuilder;
}

/**
 * The source's RAM side (QEMU's ram.c with multifd packets): a migration bitmap per RAM block, in
 * shared memory, filled from the dirty logs at each sync. Pages leave either as packets built here
 * (nextPacket, for a channel of this thread) or as jobs: slices of the bitmap that a channel
 * thread turns into packets itself (nextJob; QEMU's send threads likewise test pages for zero and
 * write them), so the bulk of RAM costs this thread one message per slice.
 */
export class RamSender {
  readonly #blocks: BlockState[];
  #dirty = 0;
  #blockIndex = 0;
  readonly #cursor = { word: 0, end: 0 };

  constructor(ram: GuestRam) {
    this.#blocks = ram.blocks.map((block, index) => {
      const shared: SharedRamBlock = {
        bitmap: new Uint32Array(new SharedArrayBuffer(block.dirtyLog.words * 4)),
        segments: block.memory.buffers,
      };
      return { block, shared, packets: new RamPacketBuilder(index, shared) };
    });
    this.rewind();
  }

  /** The blocks' bitmaps and memory, for the channel threads that run jobs. */
  get sharedBlocks(): SharedRamBlock[] {
    return this.#blocks.map((s) => s.shared);
  }

  /** Pages waiting to be sent (pages handed out in jobs no longer count). */
  get dirtyPages(): number {
    return this.#dirty;
  }

  get dirtyBytes(): number {
    return this.#dirty * RAM_PAGE_BYTES;
  }

  /** The first round: every page, except the unplugged blocks of discardable regions. */
  markAll(): void {
    for (const { block, shared } of this.#blocks) {
      const bitmap = shared.bitmap;
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

  /**
   * Pull every block's dirty log into the bitmap (KVM_GET_DIRTY_LOG + clear); returns the pages
   * dirty now. No job may be running: a channel thread clears the bits of the slice it sends.
   */
  syncDirtyLog(): number {
    for (const s of this.#blocks) s.block.dirtyLog.syncAndClear(s.shared.bitmap);
    return this.#recount();
  }

  /** Mark pages dirty that a device (DMA log, IOMMU bitmap) or a pin reports. */
  markPages(blockIndex: number, first: number, count: number): void {
    const bitmap = this.#blocks[blockIndex]!.shared.bitmap;
    for (let p = first; p < first + count; p++) {
      const bit = 1 << (p & 31);
      if ((bitmap[p >>> 5]! & bit) === 0) {
        bitmap[p >>> 5]! |= bit;
        this.#dirty++;
      }
    }
  }

  /** Start a new pass at the first page. */
  rewind(): void {
    this.#blockIndex = 0;
    this.#cursor.word = 0;
    this.#cursor.end = this.#blocks[0]?.shared.bitmap.length ?? 0;
  }

  /** The next packet of this pass, or undefined when the pass has reached the end of RAM. */
  nextPacket(): RamPacket | undefined {
    while (this.#blockIndex < this.#blocks.length) {
      const packet = this.#blocks[this.#blockIndex]!.packets.next(this.#cursor);
      if (packet !== undefined) {
        this.#dirty -= packet.normalPages + packet.zeroPages;
        return packet;
      }
      this.#nextBlock();
    }
    return undefined;
  }

  /**
   * The next slice of this pass holding about `maxPages` dirty pages (whole bitmap words, within
   * one block), or undefined when the pass has reached the end of RAM. Its pages are the job's:
   * nothing else takes them, and whoever runs it clears their bits.
   */
  nextJob(maxPages: number): RamJob | undefined {
    while (this.#blockIndex < this.#blocks.length) {
      const bitmap = this.#blocks[this.#blockIndex]!.shared.bitmap;
      const cursor = this.#cursor;
      while (cursor.word < cursor.end && bitmap[cursor.word] === 0) cursor.word++;
      if (cursor.word < cursor.end) {
        const fromWord = cursor.word;
        let pages = 0;
        while (cursor.word < cursor.end && pages < maxPages) {
          pages += popcount32(bitmap[cursor.word]!);
          cursor.word++;
        }
        this.#dirty -= pages;
        return { block: this.#blockIndex, fromWord, toWord: cursor.word, pages };
      }
      this.#nextBlock();
    }
    return undefined;
  }

  #nextBlock(): void {
    this.#blockIndex++;
    this.#cursor.word = 0;
    this.#cursor.end = this.#blocks[this.#blockIndex]?.shared.bitmap.length ?? 0;
  }

  #recount(): number {
    this.#dirty = this.#blocks.reduce((n, s) => n + countDirtyPages(s.shared.bitmap), 0);
    return this.#dirty;
  }
}

function clearRange(bitmap: Uint32Array, first: number, count: number): void {
  for (let p = first; p < first + count; p++) bitmap[p >>> 5]! &= ~(1 << (p & 31));
}
