import type { Harness } from './harness.js';
import type { ConformanceCategory } from './report.js';

/**
 * One named check. `run` returns a short note on success, throws a violation (outcome.ts) on a
 * failure or a skip when it does not apply. Anything else it throws is reported as a failure too.
 */
export interface CheckSpec {
  readonly category: ConformanceCategory;
  readonly name: string;
  run(kit: Harness): string | undefined;
}

export function check(
  category: ConformanceCategory,
  name: string,
  run: (kit: Harness) => string | undefined,
): CheckSpec {
  return { category, name, run };
}
