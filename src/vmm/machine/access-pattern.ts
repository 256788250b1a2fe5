import { invalidArgument } from '../../uapi/error.js';
import type { Prng } from './prng.js';

/**
 * Which pages of its working set a vCPU writes next.
 * - sequential: page after page, wrapping; vCPU i of n starts at i/n of the working set.
 * - random: uniform over the working set.
 * - hot: the first `hotFraction` of the working set is hot and gets `hotProbability` (default 0.9)
 *   of the writes, uniform inside; the rest get the others, uniform over the cold pages.
 */
export type AccessPattern =
  { kind: 'sequential' } | { kind: 'random' } | { kind: 'hot'; hotFraction: number; hotProbability?: number };

export const DEFAULT_HOT_PROBABILITY = 0.9;

/** Check a pattern; throws ERR_INVALID_ARGUMENT. */
export function validateAccessPattern(pattern: AccessPattern): void {
  switch (pattern?.kind) {
    case 'sequential':
    case 'random':
      return;
    case 'hot': {
      const { hotFraction, hotProbability = DEFAULT_HOT_PROBABILITY } = pattern;
      if (!(typeof hotFraction === 'number' && hotFraction > 0 && hotFraction <= 1)) {
        throw invalidArgument(`hot set fraction ${hotFraction} is not in (0, 1]`);
      }
      if (!(typeof hotProbability === 'number' && hotProbability >= 0 && hotProbability <= 1)) {
        throw invalidArgument(`hot set probability ${hotProbability} is not in [0, 1]`);
      }
      return;
    }
    default:
      throw invalidArgument(`unknown access pattern ${JSON.stringify(pattern)}`);
  }
}

/** Pages of a working set of `pages` pages that are hot under a hot pattern. */
export function hotPages(pattern: { hotFraction: number }, pages: number): number {
  return Math.min(pages, Math.max(1, Math.round(pages * pattern.hotFraction)));
}

/** A function returning the next page (index in the working set) vCPU `vcpu` of `vcpus` writes. */
export function createPagePicker(
  pattern: AccessPattern,
  pages: number,
  rng: Prng,
  vcpu = 0,
  vcpus = 1,
): () => number {
  if (!Number.isSafeInteger(pages) || pages < 1) throw invalidArgument(`working set of ${pages} pages`);
  validateAccessPattern(pattern);
  switch (pattern.kind) {
    case 'sequential': {
      let next = Math.floor((pages * vcpu) / vcpus);
      return () => {
        const page = next;
        next = next + 1 === pages ? 0 : next + 1;
        return page;
      };
    }
    case 'random':
      return () => rng.below(pages);
    case 'hot': {
      const hot = hotPages(pattern, pages);
      const cold = pages - hot;
      const p = pattern.hotProbability ?? DEFAULT_HOT_PROBABILITY;
      if (cold === 0) return () => rng.below(pages);
      return () => (rng.nextFloat() < p ? rng.below(hot) : hot + rng.below(cold));
    }
  }
}
