import { createHash } from 'node:crypto';
import type { RamBlock } from './ram-block.js';

/**
 * A hex digest of guest RAM: SHA-256 over each block's name, guest-physical base, size and
 * PhysMemory digest, blocks in GPA order (so it does not depend on the order they were added).
 * Unplugged parts of discardable blocks are zero and count as such. Equal digests on source and
 * destination mean equal RAM; it becomes part of the VM digest.
 */
export function guestRamDigest(blocks: readonly RamBlock[]): string {
  const hash = createHash('sha256');
  const sorted = [...blocks].sort((a, b) => (a.gpa < b.gpa ? -1 : a.gpa > b.gpa ? 1 : 0));
  for (const block of sorted) {
    hash.update(`${block.name}\0${block.gpa}\0${block.sizeBytes}\0`);
    hash.update(block.memory.digest());
  }
  return hash.digest('hex');
}
