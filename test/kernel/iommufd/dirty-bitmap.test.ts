import assert from 'node:assert/strict';
import { test } from 'node:test';
import fc from 'fast-check';
import { DirtyBitmap } from '../../../src/kernel/iommufd/dirty-bitmap.js';

test('DirtyBitmap agrees with a set of pages under random mark/clear/read-and-clear', () => {
  // Pages near chunk edges (32 Ki pages per chunk) and far apart in a 52-bit page space.
  const page = fc.oneof(
    fc.integer({ min: 0, max: 70_000 }),
    fc.integer({ min: 0, max: 3 }).map((c) => c * 32768 + 32760),
    fc.constantFrom(2 ** 52 - 1, 2 ** 40 + 5),
  );
  fc.assert(
    fc.property(
      fc.array(
        fc.tuple(
          fc.constantFrom('mark', 'clear', 'read', 'peek', 'all'),
          page,
          fc.integer({ min: 0, max: 40 }),
        ),
        {
          maxLength: 300,
          size: 'max',
        },
      ),
      (ops) => {
        const bm = new DirtyBitmap();
        const model = new Set<number>();
        for (const [op, p, n] of ops) {
          const last = p + n;
          if (op === 'mark') {
            bm.markPages(p, last);
            for (let i = p; i <= last; i++) model.add(i);
          } else if (op === 'clear') {
            bm.clearPages(p, last);
            for (let i = p; i <= last; i++) model.delete(i);
          } else if (op === 'all') {
            bm.clear();
            model.clear();
          } else {
            const got: number[] = [];
            bm.forEachDirty(p, last, op === 'read', (x) => got.push(x));
            const want = [...model].filter((x) => x >= p && x <= last).sort((a, b) => a - b);
            assert.deepEqual(got, want);
            if (op === 'read') for (const x of want) model.delete(x);
          }
        }
        assert.deepEqual(
          bm.pages(),
          [...model].sort((a, b) => a - b),
        );
        for (const x of model) assert.ok(bm.isDirty(x));
      },
    ),
    { numRuns: 150 },
  );
});

test('DirtyBitmap.mark: byte ranges to pages; chunks are freed when cleared', () => {
  const bm = new DirtyBitmap();
  bm.mark(0x1fffn, 2);
  bm.mark(0x5000n, 1);
  bm.mark(0x7000n, 0);
  assert.deepEqual(bm.pages(), [1, 2, 5]);
  bm.mark((1n << 63n) + 0x3000n, 4096);
  assert.equal(bm.chunkCount, 2);
  bm.clearPages(Number((1n << 63n) >> 12n), Number((1n << 63n) >> 12n) + 10);
  assert.equal(bm.chunkCount, 1);
  bm.forEachDirty(0, 100, true, () => {});
  assert.equal(bm.chunkCount, 0);
});
