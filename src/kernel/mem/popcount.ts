/** Bits set in a 32-bit word (SWAR: no loop over the bits). */
export function popcount32(word: number): number {
  let v = word >>> 0;
  if (v === 0) return 0;
  v = v - ((v >>> 1) & 0x55555555);
  v = (v & 0x33333333) + ((v >>> 2) & 0x33333333);
  return Math.imul((v + (v >>> 4)) & 0x0f0f0f0f, 0x01010101) >>> 24;
}
