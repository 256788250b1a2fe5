import { SEGMENT_BYTES } from '../../kernel/mem/phys-memory.js';

/** The guest page: the unit of dirty logging and of RAM migration (QEMU's TARGET_PAGE_SIZE on x86). */
export const GUEST_PAGE_BYTES = 4096;
/** Pages in one PhysMemory segment (1 GiB): a page never crosses a segment. */
export const PAGES_PER_SEGMENT = SEGMENT_BYTES / GUEST_PAGE_BYTES;
/** u32 words in one guest page. */
export const WORDS_PER_PAGE = GUEST_PAGE_BYTES / 4;

/** Guest pages covering `[offset, offset + length)`: `[first, first + count)`. */
export function pagesSpanned(offset: number, length: number): { first: number; count: number } {
  if (length === 0) return { first: Math.floor(offset / GUEST_PAGE_BYTES), count: 0 };
  const first = Math.floor(offset / GUEST_PAGE_BYTES);
  const last = Math.floor((offset + length - 1) / GUEST_PAGE_BYTES);
  return { first, count: last - first + 1 };
}
