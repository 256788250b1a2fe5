import assert from 'node:assert/strict';
import { test } from 'node:test';
import fc from 'fast-check';
import {
  IovaPageIndex,
  makePte,
  pteProt,
  pteProvider,
  pteSource,
} from '../../../src/kernel/iommufd/iova-page-index.js';

const PAGE = 4096;
const LEAF = 512;
const MID = 512 * 512;
const UPPER = 512 * 512 * 512;

/** The reference: disjoint linear runs of pages. */
interface Run {
  first: number;
  last: number;
  pte: number;
}

function modelLookup(runs: Run[], page: number): number {
  for (const r of runs) if (r.first <= page && page <= r.last) return r.pte + (page - r.first) * PAGE;
  return 0;
}

/** Pages worth probing: run edges, their neighbours, table boundaries inside, random pages. */
function probes(runs: Run[], extra: number[]): number[] {
  const out = new Set<number>(extra);
  for (const r of runs) {
    for (const p of [r.first - 1, r.first, r.first + 1, r.last - 1, r.last, r.last + 1])
      if (p >= 0) out.add(p);
    for (const span of [LEAF, MID, UPPER]) {
      const b = Math.ceil(r.first / span) * span;
      if (b <= r.last) for (const p of [b - 1, b, b + 1]) out.add(p);
      const e = Math.floor(r.last / span) * span;
      if (e >= r.first) for (const p of [e - 1, e]) out.add(p);
    }
  }
  return [...out];
}

test('PTE: source, provider and prot in one number', () => {
  const pte = makePte(0x7f00_1234_5000, 1023, 3);
  assert.equal(pteSource(pte), 0x7f00_1234_5000);
  assert.equal(pteProvider(pte), 1023);
  assert.equal(pteProt(pte), 3);
  assert.equal(pteSource(makePte(2 ** 53 - 2 * PAGE, 7, 2)), 2 ** 53 - 2 * PAGE);
});

test('IO page table: small, huge and whole-directory entries, push-down on splits, tables freed', () => {
  const index = new IovaPageIndex();
  const pte = makePte(0x10_0000_0000, 1, 2);
  // One page; a run over leaf boundaries; a 1 GiB aligned run (one huge entry).
  index.set(5, 5, pte);
  index.set(LEAF - 3, 2 * LEAF + 3, pte + PAGE);
  index.set(4 * MID, 5 * MID - 1, pte + 2 * PAGE);
  assert.equal(index.lookup(5), pte);
  assert.equal(index.lookup(4), 0);
  assert.equal(index.lookup(LEAF - 3), pte + PAGE);
  assert.equal(index.lookup(2 * LEAF + 3), pte + PAGE + (LEAF + 6) * PAGE);
  assert.equal(index.lookup(2 * LEAF + 4), 0);
  assert.equal(index.lookup(4 * MID + 12345), pte + 2 * PAGE + 12345 * PAGE);
  // Split the huge run: the upper half gets another PTE, the lower keeps its own.
  index.set(4 * MID + 1000, 5 * MID - 1, pte + 9 * PAGE);
  assert.equal(index.lookup(4 * MID + 999), pte + 2 * PAGE + 999 * PAGE);
  assert.equal(index.lookup(4 * MID + 1000), pte + 9 * PAGE);
  assert.equal(index.lookup(5 * MID - 1), pte + 9 * PAGE + (MID - 1001) * PAGE);
  // A whole 512 GiB directory, far up (page numbers up to 2^52), then a hole punched in it.
  const far = 2 ** 52 - UPPER;
  index.set(far, 2 ** 52 - 1, pte);
  assert.equal(index.lookup(2 ** 52 - 1), pte + (UPPER - 1) * PAGE);
  index.clear(far + MID + 7, far + MID + 7);
  assert.equal(index.lookup(far + MID + 7), 0);
  assert.equal(index.lookup(far + MID + 8), pte + (MID + 8) * PAGE);
  assert.equal(index.directoryCount, 2);
  index.clear(far, 2 ** 52 - 1);
  index.clear(0, 6 * MID);
  assert.equal(index.directoryCount, 0);
  assert.equal(index.lookup(5), 0);
});

test('IO page table against a list of runs: random set / split / clear sequences', () => {
  const op = fc.oneof(
    fc.record({
      kind: fc.constant('set' as const),
      first: fc.oneof(
        fc.integer({ min: 0, max: 4 * MID }),
        fc.integer({ min: 0, max: 8 }).map((k) => k * MID),
        fc.integer({ min: 0, max: 3 }).map((k) => UPPER - MID + k * LEAF),
        fc.integer({ min: 2 ** 40, max: 2 ** 40 + 2 * UPPER }),
      ),
      pages: fc.oneof(
        fc.integer({ min: 1, max: 3 }),
        fc.integer({ min: 1, max: 3 * LEAF }),
        fc.integer({ min: MID - 2, max: MID + 2 }),
        fc.integer({ min: 1, max: 3 * MID }),
        fc.constant(UPPER),
      ),
      source: fc.integer({ min: 0, max: 2 ** 30 }),
      provider: fc.integer({ min: 0, max: 1023 }),
      prot: fc.integer({ min: 1, max: 3 }),
    }),
    fc.record({ kind: fc.constant('clear' as const), pick: fc.nat(), part: fc.boolean() }),
    fc.record({ kind: fc.constant('split' as const), pick: fc.nat(), at: fc.nat(), bump: fc.nat(50) }),
  );
  fc.assert(
    fc.property(
      fc.array(op, { maxLength: 30 }),
      fc.array(fc.nat(2 ** 41), { maxLength: 20 }),
      (ops, extra) => {
        const index = new IovaPageIndex();
        let runs: Run[] = [];
        for (const o of ops) {
          if (o.kind === 'set') {
            const last = o.first + o.pages - 1;
            if (runs.some((r) => r.first <= last && o.first <= r.last)) continue;
            const pte = makePte(o.source * PAGE, o.provider, o.prot);
            index.set(o.first, last, pte);
            runs.push({ first: o.first, last, pte });
          } else if (runs.length > 0) {
            const r = runs[o.pick % runs.length]!;
            if (o.kind === 'clear') {
              index.clear(r.first, r.last);
              runs = runs.filter((x) => x !== r);
            } else if (r.last > r.first) {
              // An area split: the upper part becomes its own run (here with another PTE).
              const mid = r.first + (o.at % (r.last - r.first));
              const pte = r.pte + (mid + 1 - r.first) * PAGE + o.bump * PAGE;
              index.set(mid + 1, r.last, pte);
              runs.push({ first: mid + 1, last: r.last, pte });
              r.last = mid;
            }
          }
          for (const p of probes(runs, extra))
            assert.equal(index.lookup(p), modelLookup(runs, p), `page ${p}`);
        }
        for (const r of runs) index.clear(r.first, r.last);
        assert.equal(index.directoryCount, 0, 'every table freed');
      },
    ),
    { numRuns: 150, seed: 11 },
  );
});
