import assert from 'node:assert/strict';
import { test } from 'node:test';
import fc from 'fast-check';
import { IoasDmaSpace } from '../../../src/kernel/iommufd/index.js';
import { DmaFault } from '../../../src/kernel/vfio/dma-port.js';
import { HwptAllocFlag } from '../../../src/uapi/iommufd.js';
import { FIXED, MiB, RW, setup } from './helpers.js';

const PAGE = 4096n;
const R = 4;

const fault = (iova: bigint, access: 'read' | 'write') => (e: unknown) =>
  e instanceof DmaFault && e.iova === iova && e.access === access;

function bytes(n: number, seed: number): Uint8Array {
  return Uint8Array.from({ length: n }, (_, i) => (i * 7 + seed) & 0xff);
}

/** A device attached to an IOAS over two 1 MiB regions of the process. */
function rig() {
  const s = setup();
  const { ctx, ioas, p } = s;
  const a = p.mmap({ lengthBytes: 1n * MiB });
  const b = p.mmap({ lengthBytes: 1n * MiB });
  const dev = ctx.bindDevice({ name: 'vf', dirtyTracking: true }).outDevid;
  ctx.attachIoas({ devId: dev, ptId: ioas });
  return { ...s, a, b, dev, space: new IoasDmaSpace(ctx, dev) };
}

function peek(p: { read(va: bigint, t: Uint8Array): void }, va: bigint, n: number): Uint8Array {
  const out = new Uint8Array(n);
  p.read(va, out);
  return out;
}

test('DMA inside one area and across areas, pages objects and memory regions lands at the right VA', () => {
  const { ctx, ioas, p, a, b, space } = rig();
  // Two back-to-back areas over different regions: a DMA across the join takes both.
  ctx.ioasMap({ flags: FIXED | RW, ioasId: ioas, userVa: a + 0x10000n, length: 4n * PAGE, iova: 0x100000n });
  ctx.ioasMap({ flags: FIXED | RW, ioasId: ioas, userVa: b, length: 4n * PAGE, iova: 0x104000n });
  const data = bytes(300, 1);
  space.write(0x100000n + 5n, data.subarray(0, 10));
  assert.deepEqual(peek(p, a + 0x10005n, 10), data.subarray(0, 10));
  // Across a page boundary inside one area (one linear run of the page table).
  space.write(0x101000n - 100n, data);
  assert.deepEqual(peek(p, a + 0x11000n - 100n, 300), data);
  // Across the area join: the first part at the end of region a, the rest at the start of b.
  space.write(0x104000n - 100n, data);
  assert.deepEqual(peek(p, a + 0x14000n - 100n, 100), data.subarray(0, 100));
  assert.deepEqual(peek(p, b, 200), data.subarray(100));
  const back = new Uint8Array(300);
  space.read(0x104000n - 100n, back);
  assert.deepEqual(back, data);
  // translate(): the VA of the byte.
  assert.equal(space.translate(0x104000n + 17n), Number(b + 17n));
  assert.equal(space.translate(0x100fffn, 'write'), Number(a + 0x10fffn));
});

test('a faulting DMA moves no byte: read-only area, hole, unmapped IOVA; the fault names the IOVA', () => {
  const { ctx, ioas, p, a, space } = rig();
  ctx.ioasMap({ flags: FIXED | RW, ioasId: ioas, userVa: a, length: 2n * PAGE, iova: 0x200000n });
  ctx.ioasMap({ flags: FIXED | R, ioasId: ioas, userVa: a + 2n * PAGE, length: 2n * PAGE, iova: 0x202000n });
  ctx.ioasMap({ flags: FIXED | RW, ioasId: ioas, userVa: a + 8n * PAGE, length: PAGE, iova: 0x300000n });
  const before = peek(p, a, 16 * 4096);
  const data = bytes(64, 9);
  assert.throws(() => space.write(0x202000n - 32n, data), fault(0x202000n, 'write'));
  assert.throws(() => space.write(0x202010n, data), fault(0x202010n, 'write'));
  assert.throws(() => space.write(0x301000n - 32n, data), fault(0x301000n, 'write'));
  assert.throws(() => space.write(0x400000n, data), fault(0x400000n, 'write'));
  assert.deepEqual(peek(p, a, 16 * 4096), before, 'guest memory untouched');
  assert.throws(() => space.translate(0x202000n, 'write'), fault(0x202000n, 'write'));
  assert.throws(() => space.translate(0x1000n), fault(0x1000n, 'read'));
  // Reads of the read-only area are fine.
  const got = new Uint8Array(8);
  space.read(0x202000n, got);
  assert.equal(space.translate(0x202001n), Number(a + 2n * PAGE + 1n));
});

test('the page table follows unmap, remap, split, detach/re-attach and IOVAs above 2^53', () => {
  const { ctx, ioas, p, a, b, dev, space } = rig();
  const one = Uint8Array.of(0x5a);
  ctx.ioasMap({ flags: FIXED | RW, ioasId: ioas, userVa: a, length: 16n * PAGE, iova: 0x100000n });
  space.write(0x100010n, one);
  ctx.ioasUnmap({ ioasId: ioas, iova: 0x100000n, length: 16n * PAGE });
  assert.throws(() => space.write(0x100010n, one), fault(0x100010n, 'write'));
  // The same IOVA over other memory now.
  ctx.ioasMap({ flags: FIXED | RW, ioasId: ioas, userVa: b, length: 16n * PAGE, iova: 0x100000n });
  space.write(0x100011n, one);
  assert.equal(peek(p, b + 0x11n, 1)[0], 0x5a);
  assert.equal(peek(p, a + 0x11n, 1)[0], 0);
  // Detach: no domain, no DMA; attach again: the table is rebuilt from the areas.
  ctx.detach({ devId: dev });
  assert.throws(() => space.read(0x100000n, new Uint8Array(1)), fault(0x100000n, 'read'));
  ctx.attachIoas({ devId: dev, ptId: ioas });
  assert.equal(space.translate(0x100011n), Number(b + 0x11n));
  // A split (HUGE_PAGES=0 needs no areas under a domain): both halves still translate.
  ctx.ioasUnmap({ ioasId: ioas, iova: 0n, length: (1n << 64n) - 1n });
  ctx.option({ optionId: 1, op: 0, objectId: ioas, val64: 0n });
  ctx.ioasMap({ flags: FIXED | RW, ioasId: ioas, userVa: a, length: 16n * PAGE, iova: 0x100000n });
  ctx.ioas(ioas, 't').iopt.cutIova([0x103fffn]);
  assert.equal(space.translate(0x103fffn), Number(a + 0x3fffn));
  assert.equal(space.translate(0x104000n), Number(a + 0x4000n));
  ctx.ioasUnmap({ ioasId: ioas, iova: 0x104000n, length: 12n * PAGE });
  assert.throws(() => space.translate(0x104000n), fault(0x104000n, 'read'));
  assert.equal(space.translate(0x100000n), Number(a));
  // Far above 2^53 (the number fast path's limit): the tree walk serves it.
  const high = 1n << 60n;
  ctx.ioasMap({ flags: FIXED | RW, ioasId: ioas, userVa: b + 0x20000n, length: 2n * PAGE, iova: high });
  const data = bytes(100, 3);
  space.write(high + PAGE - 50n, data);
  assert.deepEqual(peek(p, b + 0x21000n - 50n, 100), data);
  assert.equal(space.translate(high + 5n), Number(b + 0x20005n));
  assert.throws(() => space.write(high + 2n * PAGE - 1n, data), fault(high + 2n * PAGE, 'write'));
});

test('memory gone from behind a mapping: the DMA faults; memory mapped there again is used', () => {
  const { ctx, ioas, p, space } = rig();
  const va = p.mmap({ lengthBytes: 4n * PAGE, at: 0x4000_0000n });
  ctx.ioasMap({ flags: FIXED | RW, ioasId: ioas, userVa: va, length: 4n * PAGE, iova: 0x100000n });
  space.write(0x100000n, Uint8Array.of(1));
  p.munmap(va, 4n * PAGE);
  assert.throws(() => space.write(0x100000n, Uint8Array.of(2)), fault(0x100000n, 'write'));
  p.mmap({ lengthBytes: 4n * PAGE, at: 0x4000_0000n });
  space.write(0x100001n, Uint8Array.of(3));
  assert.deepEqual([...peek(p, va, 2)], [0, 3]);
});

test('MAP_FILE areas: DMA and translate reach the memfd by offset', () => {
  const { ctx, ioas, p, space } = rig();
  const fd = p.memfdCreate(1n * MiB);
  const file = p.file(fd)!.file;
  ctx.ioasMapFile({
    flags: FIXED | RW,
    ioasId: ioas,
    fd,
    start: 0x10000n,
    length: 4n * PAGE,
    iova: 0x500000n,
  });
  const data = bytes(5000, 4);
  space.write(0x500000n + 100n, data);
  const got = new Uint8Array(5000);
  file.read(0x10000n + 100n, got);
  assert.deepEqual(got, data);
  assert.equal(space.translate(0x500000n + 100n), 0x10000 + 100);
});

test('more memory providers than a PTE can name: those areas go through the tree, same result', () => {
  const { ctx, ioas, p, space } = rig();
  const files: number[] = [];
  for (let i = 0; i < 1030; i++) {
    const fd = p.memfdCreate(PAGE);
    files.push(fd);
    ctx.ioasMapFile({
      flags: FIXED | RW,
      ioasId: ioas,
      fd,
      start: 0n,
      length: PAGE,
      iova: 0x1000000n + BigInt(i) * PAGE,
    });
  }
  for (const i of [0, 1023, 1024, 1029]) {
    space.write(0x1000000n + BigInt(i) * PAGE + 9n, Uint8Array.of(i & 0xff));
    const got = new Uint8Array(1);
    p.file(files[i]!)!.file.read(9n, got);
    assert.equal(got[0], i & 0xff);
  }
});

test('device writes set HWPT dirty bits for every page they touch, fast path or not', () => {
  const { ctx, ioas, a, b } = rig();
  const dev = ctx.bindDevice({ name: 'vf2', dirtyTracking: true }).outDevid;
  const hwpt = ctx.hwptAlloc({ flags: HwptAllocFlag.DIRTY_TRACKING, devId: dev, ptId: ioas }).outHwptId;
  ctx.attachIoas({ devId: dev, ptId: hwpt });
  ctx.ioasMap({ flags: FIXED | RW, ioasId: ioas, userVa: a, length: 4n * PAGE, iova: 0x100000n });
  ctx.ioasMap({ flags: FIXED | RW, ioasId: ioas, userVa: b, length: 4n * PAGE, iova: 0x104000n });
  ctx.hwptSetDirtyTracking({ flags: 1, hwptId: hwpt });
  const space = new IoasDmaSpace(ctx, dev);
  space.write(0x101ffen, bytes(4, 0)); // pages 1 and 2, one area
  space.write(0x103fffn, bytes(2, 0)); // pages 3 and 4, two areas
  space.read(0x106000n, new Uint8Array(8)); // reads never dirty
  assert.throws(() => space.write(0x107fffn, bytes(2, 0)), DmaFault); // faulted: nothing
  const data = new Uint8Array(8);
  ctx.hwptGetDirtyBitmap({
    hwptId: hwpt,
    flags: 0,
    iova: 0x100000n,
    length: 8n * PAGE,
    pageSize: PAGE,
    data,
  });
  assert.equal(data[0], 0b0001_1110);
});

test('translate() through the IO page table agrees with the area tree over random map/unmap/copy/cut/attach', () => {
  const WINDOW = 512n; // pages of IOVA space exercised
  const op = fc.oneof(
    fc.record({
      kind: fc.constant('map' as const),
      page: fc.nat(Number(WINDOW) - 1),
      pages: fc.integer({ min: 1, max: 40 }),
      src: fc.nat(200),
      file: fc.boolean(),
      ro: fc.boolean(),
    }),
    fc.record({ kind: fc.constant('unmap' as const), pick: fc.nat() }),
    fc.record({ kind: fc.constant('copy' as const), pick: fc.nat(), page: fc.nat(Number(WINDOW) - 1) }),
    fc.record({ kind: fc.constant('cut' as const), pick: fc.nat(), at: fc.nat() }),
    fc.record({ kind: fc.constant('attach' as const), on: fc.boolean() }),
  );
  fc.assert(
    fc.property(
      fc.array(op, { maxLength: 25 }),
      fc.array(fc.nat(Number(WINDOW) * 4096 - 1), { maxLength: 8 }),
      (ops, extra) => {
        const { ctx, ioas, p, a, dev, space } = rig();
        const fd = p.memfdCreate(1n * MiB);
        ctx.detach({ devId: dev });
        ctx.option({ optionId: 1, op: 0, objectId: ioas, val64: 0n }); // cuts allowed under a domain
        ctx.attachIoas({ devId: dev, ptId: ioas });
        const iopt = ctx.ioas(ioas, 't').iopt;
        let attached = true;
        const tryIt = (fn: () => void) => {
          try {
            fn();
          } catch (err) {
            if (!(err as { errno?: string }).errno) throw err;
          }
        };
        for (const o of ops) {
          const areas = iopt.areas();
          const pick = (n: number) => areas[n % areas.length]!;
          if (o.kind === 'map') {
            const length = BigInt(o.pages) * PAGE;
            const iova = BigInt(o.page) * PAGE;
            const flags = FIXED | (o.ro ? R : RW);
            const start = BigInt(o.src) * PAGE;
            tryIt(() =>
              o.file
                ? ctx.ioasMapFile({ flags, ioasId: ioas, fd, start, length, iova })
                : ctx.ioasMap({ flags, ioasId: ioas, userVa: a + start, length, iova }),
            );
          } else if (areas.length === 0) continue;
          else if (o.kind === 'unmap') {
            const x = pick(o.pick);
            const iova = iopt.areaIova(x);
            tryIt(() => ctx.ioasUnmap({ ioasId: ioas, iova, length: iopt.areaLast(x) - iova + 1n }));
          } else if (o.kind === 'copy') {
            const x = pick(o.pick);
            const srcIova = iopt.areaIova(x);
            const length = iopt.areaLast(x) - srcIova + 1n;
            tryIt(() =>
              ctx.ioasCopy({
                flags: FIXED | R,
                dstIoasId: ioas,
                srcIoasId: ioas,
                length,
                srcIova,
                dstIova: BigInt(o.page) * PAGE,
              }),
            );
          } else if (o.kind === 'cut') {
            const x = pick(o.pick);
            const pages = (iopt.areaLast(x) - iopt.areaIova(x) + 1n) / PAGE;
            tryIt(() => iopt.cutIova([iopt.areaIova(x) + BigInt(o.at % Number(pages)) * PAGE - 1n]));
          } else if (o.on !== attached) {
            if (o.on) ctx.attachIoas({ devId: dev, ptId: ioas });
            else ctx.detach({ devId: dev });
            attached = o.on;
          }
          const probes = new Set<bigint>(extra.map(BigInt));
          for (const x of iopt.areas()) {
            for (const d of [-1n, 0n, 1n]) probes.add(iopt.areaIova(x) + d);
            for (const d of [-1n, 0n, 1n]) probes.add(iopt.areaLast(x) + d);
          }
          for (const iova of probes) {
            if (iova < 0n) continue;
            for (const access of ['read', 'write'] as const) {
              const x = iopt.areaAt(iova);
              const ok = attached && x >= 0 && (iopt.areaProt(x) & (access === 'write' ? 1 : 2)) !== 0;
              if (!ok) {
                assert.throws(
                  () => space.translate(iova, access),
                  DmaFault,
                  `0x${iova.toString(16)} ${access}`,
                );
                continue;
              }
              assert.notEqual(
                iopt.dmaPte(Number(iova / PAGE)),
                0,
                'the page table describes every area here',
              );
              const want =
                iopt.pages.start(iopt.areaPages(x)) + iopt.areaOffset(x) + (iova - iopt.areaIova(x));
              assert.equal(space.translate(iova, access), Number(want), `0x${iova.toString(16)} ${access}`);
            }
          }
        }
        ctx.close();
      },
    ),
    { numRuns: 60, seed: 5 },
  );
});
