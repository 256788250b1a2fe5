import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import fc from 'fast-check';
import { DirtyPageLog } from '../../../src/kernel/vfio/dma-logging.js';
import { DmaPort, MemoryDmaSpace } from '../../../src/kernel/vfio/dma-port.js';
import type { VfioDevice } from '../../../src/kernel/vfio/vfio-device.js';
import { VfioError } from '../../../src/uapi/error.js';
import { assertErrno, F_SC, makeDevice } from './test-driver.js';

const START = 6;
const REPORT = 8;
const GET = 1 << 16;
const SET = 1 << 17;
const K4 = 4096n;
const U64_MAX = (1n << 64n) - 1n;

const loggingDevice = (dmaBytes = 1 << 20) => makeDevice(F_SC, { dmaLogging: true, dmaBytes });

/** DMA_LOGGING_START as the raw ioctl, returning the struct as the kernel wrote it back. */
function startRaw(
  dev: VfioDevice,
  pageSize: bigint,
  ranges: { iova: bigint; length: bigint }[],
  numRanges = ranges.length,
) {
  const data = { pageSize, numRanges, ranges };
  dev.deviceFeature({ flags: START | SET, data });
  return data;
}

function report(dev: VfioDevice, iova: bigint, length: bigint, pageSize = K4): number[] {
  return bitsOf(dev.dmaLoggingReport({ iova, length, pageSize }));
}

/** Indices of the set bits, reading bit k as byte k/8, bit k%8. */
function bitsOf(bitmap: Uint8Array): number[] {
  const out: number[] = [];
  for (let k = 0; k < bitmap.length * 8; k++) if (bitmap[k >> 3]! & (1 << (k & 7))) out.push(k);
  return out;
}

const one = new Uint8Array([0xaa]);

describe('DMA_LOGGING_START checks (spec 2)', () => {
  test('num_ranges 0 is EINVAL; above 256 is E2BIG before any range is read; 256 is fine', () => {
    const { dev } = loggingDevice();
    assertErrno(() => startRaw(dev, K4, []), 'EINVAL');
    assertErrno(() => startRaw(dev, K4, [], 257), 'E2BIG'); // the ranges are never looked at
    assertErrno(() => startRaw(dev, K4, [{ iova: 1n, length: 1n }], 1000), 'E2BIG');
    const ranges = Array.from({ length: 256 }, (_, i) => ({ iova: BigInt(i) * 0x2000n, length: K4 }));
    assert.equal(startRaw(dev, K4, ranges).pageSize, K4);
  });

  test('a range whose iova or length is not aligned to page_size is EINVAL', () => {
    for (const [pageSize, range] of [
      [K4, { iova: 0x800n, length: K4 }],
      [K4, { iova: 0n, length: 0x1800n }],
      [0x10000n, { iova: 0x1000n, length: 0x10000n }],
      [0x10000n, { iova: 0n, length: 0x11000n }],
    ] as const) {
      const { dev } = loggingDevice();
      assertErrno(() => startRaw(dev, pageSize, [{ iova: 0x100000n, length: pageSize }, range]), 'EINVAL');
      assertErrno(() => report(dev, 0n, K4), 'EINVAL'); // nothing started
    }
  });

  test('iova + length beyond 2^64 - 1 is EOVERFLOW; alignment is checked first', () => {
    const { dev } = loggingDevice();
    assertErrno(() => startRaw(dev, K4, [{ iova: U64_MAX - K4 + 1n, length: 2n * K4 }]), 'EOVERFLOW');
    assertErrno(() => startRaw(dev, K4, [{ iova: (1n << 64n) - K4, length: K4 }]), 'EOVERFLOW'); // end == 2^64
    assertErrno(() => startRaw(dev, K4, [{ iova: U64_MAX - 0x7ffn, length: K4 }]), 'EINVAL'); // misaligned
    startRaw(dev, K4, [{ iova: (1n << 64n) - 2n * K4, length: K4 }]);
  });

  test('overlapping ranges are EINVAL (with any earlier range); touching ranges are fine', () => {
    const { dev } = loggingDevice();
    assertErrno(
      () =>
        startRaw(dev, K4, [
          { iova: 0n, length: 0x4000n },
          { iova: 0x10000n, length: K4 },
          { iova: 0x3000n, length: 0x2000n },
        ]),
      'EINVAL',
    );
    assertErrno(
      () =>
        startRaw(dev, K4, [
          { iova: 0x5000n, length: K4 },
          { iova: 0x5000n, length: K4 },
        ]),
      'EINVAL',
    );
    startRaw(dev, K4, [
      { iova: 0x1000n, length: 0x1000n },
      { iova: 0n, length: 0x1000n },
      { iova: 0x2000n, length: 0x1000n },
    ]);
  });

  test('a zero-length range at IOVA 0 spans the whole u64 space (kernel u64 arithmetic) and overlaps anything', () => {
    const { dev } = loggingDevice();
    assertErrno(
      () =>
        startRaw(dev, K4, [
          { iova: 0n, length: 0n },
          { iova: 0x1000n, length: K4 },
        ]),
      'EINVAL',
    );
    // elsewhere a zero-length range overlaps nothing and tracks nothing
    startRaw(dev, K4, [
      { iova: 0x8000n, length: 0n },
      { iova: 0x1000n, length: K4 },
    ]);
  });

  test('a ranges array shorter than num_ranges is EFAULT, after the ranges before it were checked', () => {
    const { dev } = loggingDevice();
    assertErrno(() => startRaw(dev, K4, [{ iova: 0n, length: K4 }], 2), 'EFAULT');
    assertErrno(() => startRaw(dev, K4, [{ iova: 0x800n, length: K4 }], 2), 'EINVAL');
    assertErrno(() => report(dev, 0n, K4), 'EINVAL');
    // only num_ranges entries count: extra entries are ignored
    startRaw(
      dev,
      K4,
      [
        { iova: 0n, length: K4 },
        { iova: 0x800n, length: 1n },
      ],
      1,
    );
  });

  test('the chosen page size is written back; page_size is a hint', () => {
    const cases: [bigint, bigint, bigint][] = [
      // hint, a range length aligned to it (IS_ALIGNED with hint - 1 as mask), chosen granule
      [4096n, 4096n, 4096n],
      [8192n, 8192n, 8192n],
      [1n << 21n, 1n << 21n, 1n << 21n],
      [1n, 4096n, 4096n],
      [512n, 512n, 4096n],
      [0x3000n, 0xc000n, 0x4000n],
      [1n << 31n, 1n << 31n, 1n << 30n],
    ];
    for (const [hint, length, chosen] of cases) {
      const { dev } = loggingDevice();
      assert.equal(startRaw(dev, hint, [{ iova: 0n, length }]).pageSize, chosen, `hint ${hint}`);
      dev.dmaLoggingStop();
      assert.equal(dev.dmaLoggingStart({ pageSize: hint, ranges: [{ iova: 0n, length }] }), chosen);
    }
  });

  test('a second START before STOP is EINVAL and keeps the first log; after STOP it works again', () => {
    const { dev, port } = loggingDevice();
    dev.dmaLoggingStart({ pageSize: K4, ranges: [{ iova: 0n, length: 0x10000n }] });
    port.write(0x2000n, one);
    assertErrno(
      () => dev.dmaLoggingStart({ pageSize: K4, ranges: [{ iova: 0n, length: 0x20000n }] }),
      'EINVAL',
    );
    assert.deepEqual(report(dev, 0n, 0x10000n), [2]);
    dev.dmaLoggingStop();
    dev.dmaLoggingStart({ pageSize: K4, ranges: [{ iova: 0n, length: 0x20000n }] });
  });

  test('logging is independent of the migration state', () => {
    const { dev, port } = loggingDevice();
    dev.dmaLoggingStart({ pageSize: K4, ranges: [{ iova: 0n, length: 0x10000n }] });
    dev.setMigDeviceState(3);
    port.write(0x1000n, one);
    dev.setMigDeviceState(1);
    port.write(0x3000n, one);
    assert.deepEqual(report(dev, 0n, 0x10000n), [1, 3]);
  });
});

describe('DMA_LOGGING_STOP', () => {
  test('stops tracking and forgets the log; REPORT is then EINVAL; STOP without START is fine', () => {
    const { dev, port } = loggingDevice();
    dev.dmaLoggingStop();
    dev.dmaLoggingStart({ pageSize: K4, ranges: [{ iova: 0n, length: 0x10000n }] });
    port.write(0x1000n, one);
    dev.dmaLoggingStop();
    assertErrno(() => report(dev, 0n, 0x10000n), 'EINVAL');
    port.write(0x2000n, one);
    dev.dmaLoggingStart({ pageSize: K4, ranges: [{ iova: 0n, length: 0x10000n }] });
    assert.deepEqual(report(dev, 0n, 0x10000n), []);
  });

  test('closing the device stops logging', () => {
    const { dev, port } = loggingDevice();
    dev.dmaLoggingStart({ pageSize: K4, ranges: [{ iova: 0n, length: 0x10000n }] });
    dev.close();
    port.write(0x1000n, one); // no observer left to call into a closed device
    assertErrno(() => report(dev, 0n, 0x10000n), 'EBADF');
  });
});

describe('DMA_LOGGING_REPORT checks (spec 2)', () => {
  test('page_size below 4096 or not a power of two is EINVAL, even before START', () => {
    const { dev } = loggingDevice();
    dev.dmaLoggingStart({ pageSize: K4, ranges: [{ iova: 0n, length: 0x10000n }] });
    for (const pageSize of [0n, 1n, 2048n, 4095n, 4097n, 12288n, (1n << 40n) + 4096n]) {
      assertErrno(() => report(dev, 0n, 0x10000n, pageSize), 'EINVAL', `page_size ${pageSize}`);
    }
    for (const pageSize of [4096n, 8192n, 1n << 30n, 1n << 40n]) report(dev, 0n, 0x10000n, pageSize);
  });

  test('iova + length beyond 2^64 - 1 is EOVERFLOW, checked after page_size and before "not started"', () => {
    const { dev } = loggingDevice();
    assertErrno(() => report(dev, U64_MAX, 2n), 'EOVERFLOW');
    assertErrno(() => report(dev, 1n << 63n, 1n << 63n), 'EOVERFLOW');
    assertErrno(() => report(dev, U64_MAX, 2n, 100n), 'EINVAL');
    // the helper never allocates a bitmap for an invalid report
    assertErrno(() => report(dev, 0n, U64_MAX + 1n), 'EOVERFLOW');
    assertErrno(() => report(dev, 0n, 1n << 60n, 1n), 'EINVAL');
    assertErrno(() => report(dev, 0n, K4), 'EINVAL'); // valid, but not started
  });

  test('a bitmap smaller than the range needs (in whole u64 words) is EFAULT', () => {
    const { dev } = loggingDevice();
    dev.dmaLoggingStart({ pageSize: K4, ranges: [{ iova: 0n, length: 0x100000n }] });
    const call = (length: bigint, bitmapBytes: number) =>
      dev.deviceFeature({
        flags: REPORT | GET,
        data: { iova: 0n, length, pageSize: K4, bitmap: new Uint8Array(bitmapBytes) },
      });
    assertErrno(() => call(64n * K4, 7), 'EFAULT');
    call(64n * K4, 8);
    assertErrno(() => call(65n * K4, 8), 'EFAULT');
    call(65n * K4, 16);
    assertErrno(() => call(1n, 0), 'EFAULT'); // a partial page is a page
    call(1n, 8);
    call(0n, 0);
  });

  test('a valid report too large for the helper to allocate fails without allocating', () => {
    const { dev } = loggingDevice();
    dev.dmaLoggingStart({ pageSize: K4, ranges: [{ iova: 0n, length: 0x100000n }] });
    assert.throws(
      () => dev.dmaLoggingReport({ iova: 0n, length: 1n << 60n, pageSize: K4 }),
      (e: unknown) => e instanceof VfioError && e.code === 'ERR_BITMAP_TOO_LARGE',
    );
  });
});

describe('what the log records', () => {
  test('only DMA writes through the device port inside tracked ranges set bits', () => {
    const { dev, port, memory } = loggingDevice();
    dev.dmaLoggingStart({
      pageSize: K4,
      ranges: [
        { iova: 0x10000n, length: 0x4000n },
        { iova: 0x20000n, length: 0x2000n },
      ],
    });
    port.write(0x10000n, one); // tracked, page 0 of range 1
    port.write(0x13fffn, one); // tracked, last byte of range 1
    port.write(0x14000n, one); // just after range 1
    port.write(0x0n, one); // untracked
    port.write(0x21000n, new Uint8Array(0x2000)); // straddles the end of range 2: only 0x21000 counts
    port.read(0x11000n, new Uint8Array(16)); // reads are not logged
    new DmaPort(new MemoryDmaSpace(memory)).write(0x12000n, one); // another device's port
    memory[0x12000] = 1; // the CPU, not DMA
    assert.throws(() => port.write(0x200000n, one)); // faults: outside the space
    port.write(0x20000n, new Uint8Array(0)); // empty write
    assert.deepEqual(report(dev, 0x10000n, 0x4000n), [0, 3]);
    assert.deepEqual(report(dev, 0x20000n, 0x2000n), [1]);
    assert.deepEqual(report(dev, 0n, 0x30000n), []);
  });

  test('read-and-clear: a report clears what it covers, and nothing else', () => {
    const { dev, port } = loggingDevice();
    dev.dmaLoggingStart({ pageSize: K4, ranges: [{ iova: 0n, length: 0x40000n }] });
    for (const a of [0x1000n, 0x5000n, 0x9000n, 0x31000n]) port.write(a, one);
    assert.deepEqual(report(dev, 0x4000n, 0x8000n), [1, 5]);
    assert.deepEqual(report(dev, 0x4000n, 0x8000n), []);
    assert.deepEqual(report(dev, 0n, 0x40000n), [1, 0x31]);
    assert.deepEqual(report(dev, 0n, 0x40000n), []);
    port.write(0x5000n, one);
    assert.deepEqual(report(dev, 0n, 0x40000n), [5]);
  });

  test('exact bit layout: bit k is byte k/8, bit k%8 (u64 words, little-endian)', () => {
    const { dev, port } = loggingDevice();
    dev.dmaLoggingStart({ pageSize: K4, ranges: [{ iova: 0n, length: 0x100000n }] });
    for (const page of [0, 7, 8, 63, 64, 65, 130]) port.write(BigInt(page) * K4, one);
    const bitmap = dev.dmaLoggingReport({ iova: 0n, length: 131n * K4, pageSize: K4 });
    const want = new Uint8Array(24);
    want[0] = 0b1000_0001; // pages 0, 7
    want[1] = 0b0000_0001; // page 8
    want[7] = 0b1000_0000; // page 63: top bit of u64 word 0
    want[8] = 0b0000_0011; // pages 64, 65: word 1
    want[16] = 0b0000_0100; // page 130: word 2, bit 2
    assert.deepEqual(bitmap, want);
  });

  test('bits are only ever set: a report ORs into the bitmap the user gave', () => {
    const { dev, port } = loggingDevice();
    dev.dmaLoggingStart({ pageSize: K4, ranges: [{ iova: 0n, length: 0x10000n }] });
    port.write(0x2000n, one);
    const bitmap = new Uint8Array(8).fill(0b0001_0001);
    dev.deviceFeature({ flags: REPORT | GET, data: { iova: 0n, length: 0x10000n, pageSize: K4, bitmap } });
    assert.deepEqual([...bitmap], [0b0001_0101, 0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x11]);
  });

  test('report page size smaller than the tracking granule: every covered page bit is set', () => {
    const { dev, port } = loggingDevice();
    assert.equal(
      dev.dmaLoggingStart({ pageSize: 0x4000n, ranges: [{ iova: 0n, length: 0x40000n }] }),
      0x4000n,
    );
    port.write(0x4001n, one); // granule 1 = [0x4000, 0x8000)
    port.write(0x13fffn, one); // granule 4 = [0x10000, 0x14000)
    assert.deepEqual(report(dev, 0n, 0x40000n), [4, 5, 6, 7, 16, 17, 18, 19]);
    assert.deepEqual(report(dev, 0n, 0x40000n), []);
    // a report range cutting a granule sets only the bits inside the range
    port.write(0x8000n, one); // granule 2 = [0x8000, 0xc000)
    assert.deepEqual(report(dev, 0x9000n, 0x1000n), [0]);
  });

  test('report page size larger than the tracking granule: a page is dirty when any granule in it is', () => {
    const { dev, port } = loggingDevice();
    dev.dmaLoggingStart({ pageSize: K4, ranges: [{ iova: 0n, length: 0x100000n }] });
    port.write(0x3000n, one); // page 0 at 16 KiB
    port.write(0x5000n, one); // page 1
    port.write(0x7fffn, one); // page 1 again
    port.write(0x40000n, one); // page 16
    assert.deepEqual(report(dev, 0n, 0x100000n, 0x4000n), [0, 1, 16]);
    assert.deepEqual(report(dev, 0n, 0x100000n, 0x4000n), []);
  });

  test('an unaligned report iova: bit k covers [iova + k*page_size, +page_size)', () => {
    const { dev, port } = loggingDevice();
    dev.dmaLoggingStart({ pageSize: K4, ranges: [{ iova: 0n, length: 0x10000n }] });
    port.write(0x2000n, one); // granule [0x2000, 0x3000) meets report pages 0 and 1
    assert.deepEqual(report(dev, 0x1800n, 0x2000n), [0, 1]);
  });

  test('a granule straddling the report edge keeps its dirty bit while tracked bytes outside are unreported', () => {
    const { dev, port } = loggingDevice();
    dev.dmaLoggingStart({ pageSize: K4, ranges: [{ iova: 0n, length: 0x4000n }] });
    port.write(0x1c00n, one); // granule 1 = [0x1000, 0x2000), written in its upper half
    assert.deepEqual(report(dev, 0n, 0x1800n), [1]); // lower half reported...
    assert.deepEqual(report(dev, 0x1800n, 0x2800n), [0]); // ...and the write is not lost for the upper half
    assert.deepEqual(report(dev, 0n, 0x4000n), [1]); // a report covering the whole granule clears it
    assert.deepEqual(report(dev, 0n, 0x4000n), []);
  });

  test('a granule sticking out of the tracked range is cleared by a report of the tracked part', () => {
    const { dev, port } = loggingDevice();
    // hint 2 KiB: ranges aligned to 2 KiB, the device tracks 4 KiB granules
    assert.equal(dev.dmaLoggingStart({ pageSize: 0x800n, ranges: [{ iova: 0x800n, length: 0x1000n }] }), K4);
    port.write(0x1000n, one); // granule 1 = [0x1000, 0x2000); only [0x1000, 0x1800) is tracked
    assert.deepEqual(report(dev, 0x800n, 0x1000n), [0]);
    assert.deepEqual(report(dev, 0x800n, 0x1000n), []);
  });
});

describe('DirtyPageLog', () => {
  test('cost follows the dirty data, not the size of the report range', () => {
    const log = new DirtyPageLog([{ iova: 0n, length: 1n << 40n }], K4);
    log.markWritten(0x1234_5000n, 1);
    log.markWritten((1n << 39n) + 0x1000n, 0x3000);
    log.markWritten((1n << 40n) - 1n, 1);
    assert.equal(log.dirtyGranules, 5);
    assert.equal(log.chunkCount, 3);
    const t0 = performance.now();
    const bitmap = new Uint8Array(1024 / 8); // 1 TiB at 1 GiB pages
    log.readAndClear(0n, 1n << 40n, 1n << 30n, bitmap);
    const ms = performance.now() - t0;
    assert.deepEqual(bitsOf(bitmap), [0, 512, 1023]);
    assert.equal(log.dirtyGranules, 0);
    assert.equal(log.chunkCount, 0, 'emptied chunks are released');
    assert.ok(ms < 250, `readAndClear over 2^28 granules took ${ms} ms`);
  });

  test('a large write marks every granule; one write across many ranges marks only inside them', () => {
    const log = new DirtyPageLog(
      Array.from({ length: 200 }, (_, i) => ({ iova: BigInt(i) * 0x10000n, length: 0x2000n })),
      K4,
    );
    log.markWritten(0n, 200 * 0x10000);
    assert.equal(log.dirtyGranules, 400);
    const log2 = new DirtyPageLog([{ iova: 0n, length: 1n << 30n }], K4);
    log2.markWritten(0x7000n, 70 * 4096 + 1);
    assert.equal(log2.dirtyGranules, 71);
    const bitmap = new Uint8Array(16);
    log2.readAndClear(0x7000n, 128n * K4, K4, bitmap);
    assert.deepEqual(
      bitsOf(bitmap),
      Array.from({ length: 71 }, (_, i) => i),
    );
  });

  test('matches a reference model on random ranges, writes and reports', () => {
    const G = 1n << 12n;
    const rangeArb = fc.record({
      page: fc.integer({ min: 0, max: 300 }),
      pages: fc.integer({ min: 1, max: 40 }),
    });
    const opArb = fc.oneof(
      fc.record({
        kind: fc.constant('write' as const),
        at: fc.integer({ min: 0, max: 400 * 4096 }),
        len: fc.integer({ min: 1, max: 20 * 4096 }),
      }),
      fc.record({
        kind: fc.constant('report' as const),
        at: fc.integer({ min: 0, max: 400 * 4096 }),
        len: fc.integer({ min: 1, max: 200 * 4096 }),
        shift: fc.integer({ min: 12, max: 17 }),
      }),
    );
    fc.assert(
      fc.property(
        fc.array(rangeArb, { minLength: 1, maxLength: 8 }),
        fc.constantFrom(4096n, 8192n, 32768n),
        fc.array(opArb, { maxLength: 40 }),
        (rawRanges, hint, ops) => {
          // disjoint ranges, aligned to the hint
          const ranges: { iova: bigint; length: bigint }[] = [];
          for (const r of rawRanges) {
            const iova = BigInt(r.page) * hint;
            const length = BigInt(r.pages) * hint;
            if (ranges.every((o) => iova + length <= o.iova || o.iova + o.length <= iova)) {
              ranges.push({ iova, length });
            }
          }
          const log = new DirtyPageLog(ranges, hint);
          const g = hint > G ? hint : G;
          assert.equal(log.granuleBytes, g);
          const tracked = (a: bigint, b: bigint) => ranges.some((r) => r.iova < b && a < r.iova + r.length);
          const dirty = new Set<bigint>();
          for (const op of ops) {
            const start = BigInt(op.at);
            const end = start + BigInt(op.len);
            if (op.kind === 'write') {
              log.markWritten(start, op.len);
              for (const r of ranges) {
                const lo = start > r.iova ? start : r.iova;
                const hi = end < r.iova + r.length ? end : r.iova + r.length;
                for (let gr = lo / g; lo < hi && gr * g < hi; gr++) dirty.add(gr);
              }
            } else {
              const ps = 1n << BigInt(op.shift);
              const pages = Number((BigInt(op.len) + ps - 1n) / ps);
              const got = new Uint8Array(Math.ceil(pages / 64) * 8);
              log.readAndClear(start, BigInt(op.len), ps, got);
              const want = new Uint8Array(got.length);
              for (const gr of [...dirty]) {
                const gs = gr * g;
                const ge = gs + g;
                if (ge <= start || gs >= end) continue;
                const lo = gs > start ? gs : start;
                const hi = ge < end ? ge : end;
                for (let k = Number((lo - start) / ps); k <= Number((hi - 1n - start) / ps); k++) {
                  want[k >> 3]! |= 1 << (k & 7);
                }
                const outsideTracked = (gs < start && tracked(gs, start)) || (ge > end && tracked(end, ge));
                if (!outsideTracked) dirty.delete(gr);
              }
              assert.deepEqual(got, want);
            }
            assert.equal(log.dirtyGranules, dirty.size);
          }
        },
      ),
      { numRuns: 200 },
    );
  });
});
