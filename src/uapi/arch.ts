/** Machine constants of the modeled kernel: x86-64 (arm64 with 4K pages is the same). */

/** u64 all-ones: ULONG_MAX on a 64-bit kernel. */
export const U64_MAX = (1n << 64n) - 1n;
export const U32_MAX = 0xffff_ffff;
/** The kernel's PAGE_SIZE. */
export const PAGE_SIZE = 4096;
export const PAGE_SIZE_N = 4096n;
/** Transparent huge page size (x86-64 PMD). */
export const HPAGE_SIZE_N = 2n * 1024n * 1024n;
