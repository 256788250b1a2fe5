import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import { createPagePicker, hotPages } from '../../../src/vmm/machine/access-pattern.js';
import { Prng } from '../../../src/vmm/machine/prng.js';
import { resolveWorkload } from '../../../src/vmm/machine/vcpu-workload.js';

const bad = { code: 'ERR_INVALID_ARGUMENT' };
const MiB = 1 << 20;

describe('PRNG', () => {
  test('is reproducible from seed and stream, and streams differ', () => {
    const take = (seed: number, stream: number) => {
      const r = new Prng(seed, stream);
      return Array.from({ length: 8 }, () => r.nextU32());
    };
    assert.deepEqual(take(42, 0), take(42, 0));
    assert.notDeepEqual(take(42, 0), take(42, 1));
    assert.notDeepEqual(take(42, 0), take(43, 0));
    assert.ok(take(0, 0).some((v) => v !== 0));
  });

  test('below(n) stays in range and spreads evenly', () => {
    const r = new Prng(7);
    const counts = new Array(10).fill(0);
    for (let i = 0; i < 100_000; i++) {
      const v = r.below(10);
      assert.ok(Number.isInteger(v) && v >= 0 && v < 10);
      counts[v]++;
    }
    for (const c of counts) assert.ok(c > 9_000 && c < 11_000, `bucket of ${c}`);
  });
});

describe('access patterns', () => {
  test('sequential covers the working set in order; vCPUs start at their share', () => {
    const pick = createPagePicker({ kind: 'sequential' }, 10, new Prng(1));
    assert.deepEqual(Array.from({ length: 12 }, pick), [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]);
    const second = createPagePicker({ kind: 'sequential' }, 10, new Prng(1), 1, 2);
    assert.deepEqual(Array.from({ length: 6 }, second), [5, 6, 7, 8, 9, 0]);
  });

  test('random reaches the whole working set', () => {
    const pick = createPagePicker({ kind: 'random' }, 64, new Prng(3));
    const seen = new Set(Array.from({ length: 5000 }, pick));
    assert.equal(seen.size, 64);
    assert.ok([...seen].every((p) => p >= 0 && p < 64));
  });

  test('hot set gets its share of writes', () => {
    const pages = 1000;
    const pattern = { kind: 'hot' as const, hotFraction: 0.1, hotProbability: 0.8 };
    assert.equal(hotPages(pattern, pages), 100);
    const pick = createPagePicker(pattern, pages, new Prng(5));
    let hot = 0;
    const n = 100_000;
    for (let i = 0; i < n; i++) {
      const p = pick();
      assert.ok(p >= 0 && p < pages);
      if (p < 100) hot++;
    }
    assert.ok(Math.abs(hot / n - 0.8) < 0.01, `hot share ${hot / n}`);
    // All hot: uniform over everything.
    const all = createPagePicker({ kind: 'hot', hotFraction: 1 }, 10, new Prng(5));
    assert.equal(new Set(Array.from({ length: 500 }, all)).size, 10);
  });

  test('bad patterns are refused', () => {
    const r = new Prng(1);
    for (const pattern of [
      { kind: 'hot', hotFraction: 0 },
      { kind: 'hot', hotFraction: 1.5 },
      { kind: 'hot', hotFraction: 0.5, hotProbability: -0.1 },
      { kind: 'zigzag' },
      undefined,
    ]) {
      assert.throws(() => createPagePicker(pattern as never, 10, r), bad, JSON.stringify(pattern));
    }
    assert.throws(() => createPagePicker({ kind: 'random' }, 0, r), bad);
  });
});

describe('workload resolution', () => {
  test('defaults: the whole RAM, random, whole pages, no rate limit', () => {
    assert.deepEqual(resolveWorkload({}, 4 * MiB), {
      dirtyRateBytesPerMs: 0,
      firstPage: 0,
      pages: 1024,
      pattern: { kind: 'random' },
      seed: 1,
      writeBytes: 4096,
      pageWriteLimit: Infinity,
    });
    const w = resolveWorkload(
      { dirtyRateMiBps: 1000, workingSetOffsetBytes: MiB, workingSetBytes: MiB },
      4 * MiB,
    );
    assert.equal(w.dirtyRateBytesPerMs, 1048576);
    assert.equal(w.firstPage, 256);
    assert.equal(w.pages, 256);
  });

  test('bad workloads are refused', () => {
    for (const w of [
      { dirtyRateMiBps: -1 },
      { dirtyRateMiBps: Number.NaN },
      { workingSetOffsetBytes: 100 },
      { workingSetOffsetBytes: 4 * MiB },
      { workingSetBytes: 0 },
      { workingSetBytes: 4097 },
      { workingSetOffsetBytes: MiB, workingSetBytes: 4 * MiB },
      { seed: -1 },
      { seed: 2 ** 32 },
      { seed: 1.5 },
      { writeBytesPerPage: 3 },
      { writeBytesPerPage: 24 },
      { writeBytesPerPage: 8192 },
      { pageWriteLimit: -1 },
      { pageWriteLimit: 0.5 },
      { pattern: { kind: 'hot', hotFraction: 2 } },
    ]) {
      assert.throws(() => resolveWorkload(w as never, 4 * MiB), bad, JSON.stringify(w));
    }
  });
});
