import assert from 'node:assert/strict';
import { test } from 'node:test';
import fc from 'fast-check';
import { OrderedU64Map } from '../../../src/kernel/iommufd/ordered-map.js';

test('OrderedU64Map agrees with a sorted model under random insert/delete/floor/ceil', () => {
  fc.assert(
    fc.property(
      fc.array(fc.tuple(fc.constantFrom('set', 'del', 'floor', 'ceil'), fc.bigInt({ min: 0n, max: 3000n })), {
        maxLength: 2000,
      }),
      (ops) => {
        const map = new OrderedU64Map();
        const model = new Map<bigint, number>();
        let v = 0;
        for (const [op, k] of ops) {
          const keys = [...model.keys()].sort((a, b) => (a < b ? -1 : a > b ? 1 : 0));
          if (op === 'set') {
            map.set(k, v);
            model.set(k, v++);
          } else if (op === 'del') assert.equal(map.delete(k), model.delete(k));
          else if (op === 'floor') {
            const f = keys.filter((x) => x <= k).pop();
            assert.equal(map.floor(k), f === undefined ? -1 : model.get(f));
          } else {
            const c = keys.find((x) => x >= k);
            assert.equal(map.ceil(k), c === undefined ? -1 : model.get(c));
          }
          assert.equal(map.size, model.size);
        }
        const seen: bigint[] = [];
        map.scan(0n, (key) => {
          seen.push(key);
          return true;
        });
        assert.deepEqual(
          seen,
          [...model.keys()].sort((a, b) => (a < b ? -1 : a > b ? 1 : 0)),
        );
      },
    ),
    { numRuns: 60 },
  );
});

test('OrderedU64Map handles ascending bulk insert and delete of 200k keys', () => {
  const map = new OrderedU64Map();
  const n = 200_000;
  for (let i = 0; i < n; i++) map.set(BigInt(i) * 4096n, i);
  assert.equal(map.size, n);
  assert.equal(map.floor(4096n * 1000n + 5n), 1000);
  for (let i = 0; i < n; i += 2) map.delete(BigInt(i) * 4096n);
  assert.equal(map.floor(4096n * 1000n), 999);
  for (let i = 1; i < n; i += 2) map.delete(BigInt(i) * 4096n);
  assert.equal(map.size, 0);
  assert.equal(map.floor(1n << 40n), -1);
});

test('OrderedU64Map weights: firstAtLeast agrees with a linear scan under random updates', () => {
  fc.assert(
    fc.property(
      fc.array(
        fc.tuple(
          fc.constantFrom('set', 'del', 'weight', 'first'),
          fc.bigInt({ min: 0n, max: 5000n }),
          fc.integer({ min: 0, max: 100 }),
        ),
        { maxLength: 3000, size: 'max' },
      ),
      (ops) => {
        const map = new OrderedU64Map();
        const model = new Map<bigint, { v: number; w: number }>();
        let v = 0;
        for (const [op, k, w] of ops) {
          if (op === 'set') {
            map.set(k, v, w);
            model.set(k, { v: v++, w });
          } else if (op === 'del') assert.equal(map.delete(k), model.delete(k));
          else if (op === 'weight') {
            assert.equal(map.setWeight(k, w), model.has(k));
            if (model.has(k)) model.get(k)!.w = w;
          } else {
            const keys = [...model.keys()].sort((a, b) => (a < b ? -1 : a > b ? 1 : 0));
            const hit = keys.find((x) => x >= k && model.get(x)!.w >= w);
            assert.equal(map.firstAtLeast(k, w), hit === undefined ? -1 : model.get(hit)!.v);
            if (hit !== undefined) assert.equal(map.weight(hit), model.get(hit)!.w);
          }
        }
      },
    ),
    { numRuns: 40 },
  );
});

test('OrderedU64Map weights stay right through splits and leaf removals of 100k keys', () => {
  const map = new OrderedU64Map();
  const n = 100_000;
  for (let i = 0; i < n; i++) map.set(BigInt(i) * 8n, i, i % 997 === 0 ? 50 : 1);
  assert.equal(map.firstAtLeast(0n, 50), 0);
  assert.equal(map.firstAtLeast(1n, 50), 997);
  assert.equal(map.firstAtLeast(BigInt(997 * 99) * 8n + 1n, 50), 997 * 100);
  assert.equal(map.firstAtLeast(0n, 51), -1);
  // Delete the heavy ones (whole leaves go as well): nothing at 50 remains.
  for (let i = 0; i < n; i += 997) map.delete(BigInt(i) * 8n);
  for (let i = 30_000; i < 60_000; i++) map.delete(BigInt(i) * 8n);
  assert.equal(map.firstAtLeast(0n, 2), -1);
  map.setWeight(BigInt(70_001) * 8n, 7);
  assert.equal(map.firstAtLeast(0n, 7), 70_001);
  map.setWeight(BigInt(70_001) * 8n, 1);
  assert.equal(map.firstAtLeast(0n, 2), -1);
  assert.equal(map.firstAtLeast(0n, 1), 1);
});
