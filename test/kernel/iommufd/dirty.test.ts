import assert from 'node:assert/strict';
import { test } from 'node:test';
import { IoasDmaSpace, type IommufdContext } from '../../../src/kernel/iommufd/index.js';
import { DmaFault } from '../../../src/kernel/vfio/dma-port.js';
import { HwptAllocFlag } from '../../../src/uapi/iommufd.js';
import { FIXED, GiB, MiB, RW, setup, throwsErrno, U64_MAX } from './helpers.js';

const ENABLE = 1;
const NO_CLEAR = 1;
const BASE = 0x100000n;

/** A dirty-capable device on a DIRTY_TRACKING HWPT over 1 MiB mapped at BASE. */
function rig(opts: { mapLength?: bigint } = {}) {
  const s = setup({ rlimitMemlockBytes: 8n * GiB });
  const { ctx, ioas, p } = s;
  const len = opts.mapLength ?? 1n * MiB;
  const va = p.mmap({ lengthBytes: len });
  ctx.ioasMap({ flags: FIXED | RW, ioasId: ioas, userVa: va, length: len, iova: BASE });
  const dev = ctx.bindDevice({ name: 'vf', dirtyTracking: true }).outDevid;
  const hwpt = ctx.hwptAlloc({ flags: HwptAllocFlag.DIRTY_TRACKING, devId: dev, ptId: ioas }).outHwptId;
  ctx.attachIoas({ devId: dev, ptId: hwpt });
  const dma = new IoasDmaSpace(ctx, dev);
  return { ...s, va, dev, hwpt, dma };
}

/** Set bits of a bitmap, ascending. */
function bits(data: Uint8Array): number[] {
  const out: number[] = [];
  for (let i = 0; i < data.length * 8; i++) if (data[i >> 3]! & (1 << (i & 7))) out.push(i);
  return out;
}

function read(
  ctx: IommufdContext,
  hwptId: number,
  o: { iova?: bigint; length?: bigint; pageSize?: bigint; flags?: number } = {},
): number[] {
  const length = o.length ?? 1n * MiB;
  const pageSize = o.pageSize ?? 4096n;
  const unit = pageSize & -pageSize; // iova_bitmap counts in units of the lowest set bit
  const data = new Uint8Array(Number(((length / unit + 63n) / 64n) * 8n));
  ctx.hwptGetDirtyBitmap({ hwptId, flags: o.flags ?? 0, iova: o.iova ?? BASE, length, pageSize, data });
  return bits(data);
}

test('HWPT_SET_DIRTY_TRACKING errnos: flags, not a paging HWPT, no dirty support', () => {
  const { ctx, ioas, hwpt, dev } = rig();
  const plain = ctx.hwptAlloc({ flags: 0, devId: dev, ptId: ioas }).outHwptId;
  throwsErrno(() => ctx.hwptSetDirtyTracking({ flags: 2, hwptId: 999 }), 'EOPNOTSUPP');
  throwsErrno(() => ctx.hwptSetDirtyTracking({ flags: ENABLE, hwptId: 999 }), 'ENOENT');
  throwsErrno(() => ctx.hwptSetDirtyTracking({ flags: ENABLE, hwptId: ioas }), 'ENOENT');
  throwsErrno(() => ctx.hwptSetDirtyTracking({ flags: ENABLE, hwptId: dev }), 'ENOENT');
  throwsErrno(() => ctx.hwptSetDirtyTracking({ flags: ENABLE, hwptId: plain }), 'EOPNOTSUPP');
  throwsErrno(() => ctx.hwptSetDirtyTracking({ flags: 0, hwptId: plain }), 'EOPNOTSUPP');
  ctx.hwptSetDirtyTracking({ flags: ENABLE, hwptId: hwpt });
  ctx.hwptSetDirtyTracking({ flags: ENABLE, hwptId: hwpt });
  ctx.hwptSetDirtyTracking({ flags: 0, hwptId: hwpt });
  ctx.hwptSetDirtyTracking({ flags: 0, hwptId: hwpt });
});

test('HWPT_GET_DIRTY_BITMAP errno order', () => {
  const { ctx, ioas, hwpt, dev } = rig();
  const plain = ctx.hwptAlloc({ flags: 0, devId: dev, ptId: ioas }).outHwptId;
  const data = new Uint8Array(64);
  const get = (a: Partial<Parameters<typeof ctx.hwptGetDirtyBitmap>[0]>) =>
    ctx.hwptGetDirtyBitmap({
      hwptId: hwpt,
      flags: 0,
      iova: BASE,
      length: 1n * MiB,
      pageSize: 4096n,
      data,
      ...a,
    });
  throwsErrno(() => get({ flags: 2, hwptId: 999 }), 'EOPNOTSUPP');
  throwsErrno(() => get({ reserved: 1, hwptId: 999 }), 'EOPNOTSUPP');
  throwsErrno(() => get({ hwptId: 999, iova: U64_MAX }), 'ENOENT');
  throwsErrno(() => get({ hwptId: ioas }), 'ENOENT');
  // Overflow before alignment, before dirty support.
  throwsErrno(() => get({ hwptId: plain, iova: U64_MAX - 4095n, length: 8192n }), 'EOVERFLOW');
  throwsErrno(() => get({ hwptId: plain, iova: 0x1000n, length: 0n }), 'EOVERFLOW');
  throwsErrno(() => get({ hwptId: plain, iova: BASE + 0x800n }), 'EINVAL');
  throwsErrno(() => get({ hwptId: plain, length: 0x1800n }), 'EINVAL');
  throwsErrno(() => get({ hwptId: plain, pageSize: 0n }), 'EINVAL');
  throwsErrno(() => get({ hwptId: plain, iova: BASE + 0x1000n, pageSize: 0x2000n }), 'EINVAL');
  throwsErrno(() => get({ hwptId: plain, length: 0x3000n, pageSize: 0x2000n }), 'EINVAL');
  throwsErrno(() => get({ hwptId: plain }), 'EOPNOTSUPP');
  // 256 pages need 4 u64 words = 32 bytes.
  throwsErrno(() => get({ data: new Uint8Array(31) }), 'EFAULT');
  get({ data: new Uint8Array(32) });
  // iova 0 + length 0 is the whole space: no overflow, but no bitmap is that big.
  throwsErrno(() => get({ iova: 0n, length: 0n }), 'EFAULT');
});

test('device DMA writes mark pages only while tracking is on; reads never; read and clear, NO_CLEAR', () => {
  const { ctx, hwpt, dma } = rig();
  dma.write(BASE + 5n, new Uint8Array([1]));
  assert.deepEqual(read(ctx, hwpt), [], 'tracking off: nothing marked');
  ctx.hwptSetDirtyTracking({ flags: ENABLE, hwptId: hwpt });
  dma.write(BASE + 5n, new Uint8Array([1]));
  dma.write(BASE + 0x3ff0n, new Uint8Array(32)); // pages 3 and 4
  dma.read(BASE + 0x9000n, new Uint8Array(4096));
  assert.throws(() => dma.write(BASE + 1n * MiB, new Uint8Array(1)), DmaFault);
  assert.deepEqual(read(ctx, hwpt, { flags: NO_CLEAR }), [0, 3, 4]);
  assert.deepEqual(read(ctx, hwpt, { flags: NO_CLEAR }), [0, 3, 4]);
  assert.deepEqual(read(ctx, hwpt), [0, 3, 4]);
  assert.deepEqual(read(ctx, hwpt), [], 'read cleared them');
  // A sub-range reads and clears only its part.
  dma.write(BASE + 0x10000n, new Uint8Array(0x3000));
  assert.deepEqual(read(ctx, hwpt, { iova: BASE + 0x11000n, length: 0x1000n }), [0]);
  assert.deepEqual(read(ctx, hwpt), [16, 18]);
  // Disabling keeps the bits but stops marking; enabling clears them.
  dma.write(BASE, new Uint8Array(1));
  ctx.hwptSetDirtyTracking({ flags: 0, hwptId: hwpt });
  dma.write(BASE + 0x1000n, new Uint8Array(1));
  assert.deepEqual(read(ctx, hwpt, { flags: NO_CLEAR }), [0]);
  ctx.hwptSetDirtyTracking({ flags: ENABLE, hwptId: hwpt });
  assert.deepEqual(read(ctx, hwpt), []);
});

test('bitmap layout: bit (a - iova) / page_size in little-endian u64 words; bits are only set', () => {
  const { ctx, hwpt, dma } = rig();
  ctx.hwptSetDirtyTracking({ flags: ENABLE, hwptId: hwpt });
  for (const page of [0n, 1n, 63n, 64n, 65n, 200n]) dma.write(BASE + page * 4096n, new Uint8Array(1));
  const data = new Uint8Array(32);
  data[31] = 0x80; // a bit the kernel has no reason to touch
  ctx.hwptGetDirtyBitmap({
    hwptId: hwpt,
    flags: NO_CLEAR,
    iova: BASE,
    length: 1n * MiB,
    pageSize: 4096n,
    data,
  });
  const words = new DataView(data.buffer);
  assert.equal(words.getBigUint64(0, true), (1n << 0n) | (1n << 1n) | (1n << 63n));
  assert.equal(words.getBigUint64(8, true), 0b11n);
  assert.equal(words.getBigUint64(24, true), (1n << 8n) | (1n << 63n));
  // The same as u64 words; a short array faults.
  const u64 = new BigUint64Array(4);
  ctx.hwptGetDirtyBitmap({
    hwptId: hwpt,
    flags: NO_CLEAR,
    iova: BASE,
    length: 1n * MiB,
    pageSize: 4096n,
    data: u64,
  });
  assert.deepEqual([...u64], [(1n << 0n) | (1n << 1n) | (1n << 63n), 0b11n, 0n, 1n << 8n]);
  throwsErrno(
    () =>
      ctx.hwptGetDirtyBitmap({
        hwptId: hwpt,
        flags: 0,
        iova: BASE,
        length: 1n * MiB,
        pageSize: 4096n,
        data: new BigUint64Array(3),
      }),
    'EFAULT',
  );
  // Larger page size: one bit per 8 KiB (pages 0,1 -> 0; 63 -> 31; 64,65 -> 32; 200 -> 100).
  assert.deepEqual(read(ctx, hwpt, { pageSize: 8192n, flags: NO_CLEAR }), [0, 31, 32, 100]);
  assert.deepEqual(read(ctx, hwpt, { pageSize: 1n * MiB, flags: NO_CLEAR }), [0]);
  // Smaller page size: each dirty 4 KiB page sets its two 2 KiB bits.
  assert.deepEqual(
    read(ctx, hwpt, { pageSize: 2048n, flags: NO_CLEAR }),
    [0, 1, 2, 3, 126, 127, 128, 129, 130, 131, 400, 401],
  );
  // A page size that is not a power of two counts in units of its lowest set bit, as
  // iova_bitmap does (__ffs): 12 KiB behaves like 4 KiB once the range passes its alignment check.
  assert.deepEqual(
    read(ctx, hwpt, { pageSize: 0x3000n, flags: NO_CLEAR, length: 0xc0000n }),
    [0, 1, 63, 64, 65],
  );
});

test('the walk covers back-to-back areas from iova and stops at the first hole (as the kernel does)', () => {
  const { ctx, ioas, hwpt, dma, va } = rig();
  ctx.ioasMap({ flags: FIXED | RW, ioasId: ioas, userVa: va, length: 1n * MiB, iova: BASE + 1n * MiB });
  ctx.ioasMap({ flags: FIXED | RW, ioasId: ioas, userVa: va, length: 1n * MiB, iova: BASE + 3n * MiB });
  ctx.hwptSetDirtyTracking({ flags: ENABLE, hwptId: hwpt });
  // One write across the boundary of two adjacent areas marks both.
  dma.write(BASE + 1n * MiB - 2n, new Uint8Array(4));
  dma.write(BASE + 3n * MiB, new Uint8Array(1));
  const all = { length: 4n * MiB, flags: NO_CLEAR };
  assert.deepEqual(read(ctx, hwpt, all), [255, 256]);
  assert.deepEqual(read(ctx, hwpt, { iova: BASE + 3n * MiB, length: 1n * MiB }), [0]);
  // Starting in the hole reports nothing.
  dma.write(BASE + 3n * MiB, new Uint8Array(1));
  assert.deepEqual(read(ctx, hwpt, { iova: BASE + 2n * MiB, length: 2n * MiB }), []);
  assert.deepEqual(read(ctx, hwpt, { iova: BASE + 3n * MiB, length: 1n * MiB, flags: NO_CLEAR }), [0]);
});

test('unmap drops the dirty bits of the range; a new mapping there starts clean', () => {
  const { ctx, ioas, hwpt, dma, va } = rig();
  ctx.hwptSetDirtyTracking({ flags: ENABLE, hwptId: hwpt });
  dma.write(BASE, new Uint8Array(4096 * 3));
  ctx.ioasUnmap({ ioasId: ioas, iova: BASE, length: 1n * MiB });
  ctx.ioasMap({ flags: FIXED | RW, ioasId: ioas, userVa: va, length: 1n * MiB, iova: BASE });
  assert.deepEqual(read(ctx, hwpt), []);
  dma.write(BASE + 0x2000n, new Uint8Array(1));
  assert.deepEqual(read(ctx, hwpt), [2]);
});

test('each HWPT has its own bits: a device marks the HWPT it is attached to, replace moves that', () => {
  const { ctx, ioas, hwpt, dma, dev } = rig();
  const other = ctx.bindDevice({ name: 'vf2', dirtyTracking: true }).outDevid;
  const h2 = ctx.hwptAlloc({ flags: HwptAllocFlag.DIRTY_TRACKING, devId: other, ptId: ioas }).outHwptId;
  ctx.attachIoas({ devId: other, ptId: h2 });
  const dma2 = new IoasDmaSpace(ctx, other);
  ctx.hwptSetDirtyTracking({ flags: ENABLE, hwptId: hwpt });
  ctx.hwptSetDirtyTracking({ flags: ENABLE, hwptId: h2 });
  dma.write(BASE, new Uint8Array(1));
  dma2.write(BASE + 0x1000n, new Uint8Array(1));
  assert.deepEqual(read(ctx, hwpt), [0]);
  assert.deepEqual(read(ctx, h2), [1]);
  ctx.attachIoas({ devId: dev, ptId: h2 });
  dma.write(BASE + 0x2000n, new Uint8Array(1));
  assert.deepEqual(read(ctx, hwpt), []);
  assert.deepEqual(read(ctx, h2), [2]);
});

test('a 4 GiB guest: scattered writes found and cleared quickly', () => {
  const { ctx, hwpt, dma } = rig({ mapLength: 4n * GiB });
  ctx.hwptSetDirtyTracking({ flags: ENABLE, hwptId: hwpt });
  // 64 clusters of 100 pages spread over the 4 GiB (each touched page costs real memory).
  const pages: number[] = [];
  for (let c = 0; c < 64; c++) for (let j = 0; j < 100; j++) pages.push(c * 16381 + j);
  const one = new Uint8Array(8);
  const t0 = performance.now();
  for (const pg of pages) dma.write(BASE + BigInt(pg) * 4096n, one);
  const t1 = performance.now();
  const got = read(ctx, hwpt, { length: 4n * GiB });
  const t2 = performance.now();
  assert.deepEqual(
    got,
    [...new Set(pages)].sort((a, b) => a - b),
  );
  assert.deepEqual(read(ctx, hwpt, { length: 4n * GiB }), []);
  assert.ok(t1 - t0 < 2000, `6400 marked writes took ${(t1 - t0).toFixed(0)} ms`);
  assert.ok(t2 - t1 < 2000, `a 4 GiB read took ${(t2 - t1).toFixed(0)} ms`);
  console.log(`writes ${(t1 - t0).toFixed(1)} ms, read ${(t2 - t1).toFixed(1)} ms`);
});
