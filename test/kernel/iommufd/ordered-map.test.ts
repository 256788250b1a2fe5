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
