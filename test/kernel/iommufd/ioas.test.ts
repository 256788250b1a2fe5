import assert from 'node:assert/strict';
import { test } from 'node:test';
import { IoasDmaSpace } from '../../../src/kernel/iommufd/index.js';
import { DmaFault } from '../../../src/kernel/vfio/dma-port.js';
import { FIXED, MiB, RW, setup, throwsErrno, U64_MAX } from './helpers.js';

test('object ids start at 1, lowest free reused; destroy ENOENT/EBUSY', () => {
  const { ctx, ioas } = setup();
  assert.equal(ioas, 1);
  assert.equal(ctx.ioasAlloc().outIoasId, 2);
  throwsErrno(() => ctx.ioasAlloc({ flags: 1 }), 'EOPNOTSUPP');
  ctx.destroy({ id: 1 });
  throwsErrno(() => ctx.destroy({ id: 1 }), 'ENOENT');
  assert.equal(ctx.ioasAlloc().outIoasId, 1);
  const dev = ctx.bindDevice({ name: 'nic' }).outDevid;
  const hwpt = ctx.attachIoas({ devId: dev, ptId: 1 }).ptId;
  throwsErrno(() => ctx.destroy({ id: 1 }), 'EBUSY');
  throwsErrno(() => ctx.destroy({ id: hwpt }), 'EBUSY');
  ctx.detach({ devId: dev });
  throwsErrno(() => ctx.destroy({ id: hwpt }), 'ENOENT');
  ctx.destroy({ id: 1 });
});

test('IOAS_MAP validation order and errnos', () => {
  const { ctx, ioas, p } = setup();
  const va = p.mmap({ lengthBytes: 1n * MiB });
  throwsErrno(() => ctx.ioasMap({ flags: 8 | RW, ioasId: ioas, userVa: va, length: 4096n }), 'EOPNOTSUPP');
  throwsErrno(
    () => ctx.ioasMap({ flags: RW, ioasId: ioas, reserved: 1, userVa: va, length: 4096n }),
    'EOPNOTSUPP',
  );
  throwsErrno(() => ctx.ioasMap({ flags: RW, ioasId: 99, userVa: va, length: U64_MAX }), 'EOVERFLOW');
  throwsErrno(
    () => ctx.ioasMap({ flags: FIXED | RW, ioasId: ioas, userVa: va, length: 4096n, iova: U64_MAX }),
    'EOVERFLOW',
  );
  throwsErrno(() => ctx.ioasMap({ flags: FIXED, ioasId: 99, userVa: va, length: 4096n }), 'EINVAL');
  throwsErrno(() => ctx.ioasMap({ flags: RW, ioasId: 99, userVa: va, length: 4096n }), 'ENOENT');
  throwsErrno(() => ctx.ioasMap({ flags: RW, ioasId: ioas, userVa: va, length: 0n }), 'EINVAL');
  throwsErrno(
    () => ctx.ioasMap({ flags: FIXED | RW, ioasId: ioas, userVa: va, length: 8192n, iova: U64_MAX - 4096n }),
    'EOVERFLOW',
  );
  ctx.ioasMap({ flags: FIXED | RW, ioasId: ioas, userVa: va, length: 8192n, iova: 0x10000n });
  throwsErrno(
    () => ctx.ioasMap({ flags: FIXED | RW, ioasId: ioas, userVa: va, length: 4096n, iova: 0x11000n }),
    'EEXIST',
  );
  throwsErrno(
    () => ctx.ioasMap({ flags: FIXED | RW, ioasId: ioas, userVa: va, length: 0x10000n, iova: 0x8000n }),
    'EEXIST',
  );
  // No domain: alignment 1, so odd sizes are fine; with a domain: PAGE_SIZE.
  ctx.ioasMap({ flags: FIXED | RW, ioasId: ioas, userVa: va, length: 3n, iova: 0x20001n });
  const dev = ctx.bindDevice({ name: 'd' }).outDevid;
  throwsErrno(() => ctx.attachIoas({ devId: dev, ptId: ioas }), 'EADDRINUSE');
  ctx.ioasUnmap({ ioasId: ioas, iova: 0x20001n, length: 3n });
  ctx.attachIoas({ devId: dev, ptId: ioas });
  throwsErrno(() => ctx.ioasMap({ flags: RW, ioasId: ioas, userVa: va, length: 100n }), 'EINVAL');
  throwsErrno(
    () => ctx.ioasMap({ flags: FIXED | RW, ioasId: ioas, userVa: va, length: 4096n, iova: 0x30800n }),
    'EINVAL',
  );
  const r = ctx.ioasIovaRanges({ ioasId: ioas, numIovas: 1 });
  assert.equal(r.outIovaAlignment, 4096n);
});

test('automatic IOVA: alignment from VA and length, sub-page offset kept, never 0, allowed steers, ENOSPC', () => {
  const { ctx, ioas, p } = setup();
  const va = p.mmap({ lengthBytes: 64n * MiB, at: 0x40000000n });
  // length 8 KiB, addr 1 GiB aligned -> align 8 KiB; first hole starts at PAGE_SIZE -> 0x2000.
  assert.equal(ctx.ioasMap({ flags: RW, ioasId: ioas, userVa: va, length: 8192n }).iova, 0x2000n);
  // 4 MiB from a 1 GiB aligned VA: align capped at 2 MiB (THP).
  assert.equal(ctx.ioasMap({ flags: RW, ioasId: ioas, userVa: va, length: 4n * MiB }).iova, 0x200000n);
  // VA with sub-page offset 0x10: alignment 16, offset kept.
  assert.equal(ctx.ioasMap({ flags: RW, ioasId: ioas, userVa: va + 0x10n, length: 16n }).iova, 0x1010n);
  // Allowed ranges steer allocation.
  ctx.ioasAllowIovas({ ioasId: ioas, allowedIovas: [{ start: 0x1_0000_0000n, last: 0x1_0000_ffffn }] });
  assert.equal(ctx.ioasMap({ flags: RW, ioasId: ioas, userVa: va, length: 0x10000n }).iova, 0x1_0000_0000n);
  throwsErrno(() => ctx.ioasMap({ flags: RW, ioasId: ioas, userVa: va, length: 4096n }), 'ENOSPC');
  // FIXED maps are not checked against allowed.
  ctx.ioasMap({ flags: FIXED | RW, ioasId: ioas, userVa: va, length: 4096n, iova: 0x9000_0000n });
});

test('IOAS_UNMAP: whole areas only, ENOENT for a cut (non-atomic), gaps ok, unmap-all', () => {
  const { ctx, ioas, p } = setup();
  const va = p.mmap({ lengthBytes: 1n * MiB });
  for (const iova of [0x10000n, 0x20000n, 0x30000n]) {
    ctx.ioasMap({ flags: FIXED | RW, ioasId: ioas, userVa: va, length: 0x2000n, iova });
  }
  throwsErrno(() => ctx.ioasUnmap({ ioasId: 99, iova: 0n, length: U64_MAX }), 'ENOENT');
  throwsErrno(() => ctx.ioasUnmap({ ioasId: ioas, iova: U64_MAX, length: 1n }), 'EOVERFLOW');
  throwsErrno(() => ctx.ioasUnmap({ ioasId: ioas, iova: 0x10000n, length: 0n }), 'EINVAL');
  throwsErrno(() => ctx.ioasUnmap({ ioasId: ioas, iova: 3n, length: U64_MAX - 1n }), 'EOVERFLOW');
  throwsErrno(() => ctx.ioasUnmap({ ioasId: ioas, iova: 0x40000n, length: 0x1000n }), 'ENOENT');
  throwsErrno(() => ctx.ioasUnmap({ ioasId: ioas, iova: 0x11000n, length: 0x1000n }), 'ENOENT');
  // Covers the first area whole and cuts the second: first already gone on ENOENT.
  throwsErrno(() => ctx.ioasUnmap({ ioasId: ioas, iova: 0x10000n, length: 0x11000n }), 'ENOENT');
  throwsErrno(() => ctx.ioasUnmap({ ioasId: ioas, iova: 0x10000n, length: 0x2000n }), 'ENOENT');
  assert.equal(ctx.ioasUnmap({ ioasId: ioas, iova: 0x18000n, length: 0x20000n }).length, 0x4000n);
  assert.equal(ctx.ioasUnmap({ ioasId: ioas, iova: 0n, length: U64_MAX }).length, 0n);
});

test('IOAS_IOVA_RANGES EMSGSIZE protocol and ALLOW_IOVAS errnos with device reserved ranges', () => {
  const { ctx, ioas, p } = setup();
  const fresh = ctx.ioasIovaRanges({ ioasId: ioas, numIovas: 4 });
  assert.deepEqual(fresh.allowedIovas, [{ start: 0n, last: U64_MAX }]);
  assert.equal(fresh.outIovaAlignment, 1n);
  throwsErrno(() => ctx.ioasIovaRanges({ ioasId: 42, numIovas: 4 }), 'ENOENT');
  const dev = ctx.bindDevice({ name: 'd', reservedIovaRanges: [{ start: 0xfee00000n, last: 0xfeefffffn }] });
  ctx.attachIoas({ devId: dev.outDevid, ptId: ioas });
  const args = { ioasId: ioas, numIovas: 1 };
  throwsErrno(() => ctx.ioasIovaRanges(args), 'EMSGSIZE');
  assert.equal(args.numIovas, 2);
  const full = ctx.ioasIovaRanges({ ioasId: ioas, numIovas: 2 });
  assert.deepEqual(full.allowedIovas, [
    { start: 0n, last: 0xfedfffffn },
    { start: 0xfef00000n, last: U64_MAX },
  ]);
  throwsErrno(() => ctx.ioasAllowIovas({ ioasId: ioas, allowedIovas: [{ start: 5n, last: 5n }] }), 'EINVAL');
  throwsErrno(
    () =>
      ctx.ioasAllowIovas({
        ioasId: ioas,
        allowedIovas: [
          { start: 0n, last: 0x2000n },
          { start: 0x1000n, last: 0x3000n },
        ],
      }),
    'EINVAL',
  );
  throwsErrno(
    () => ctx.ioasAllowIovas({ ioasId: ioas, allowedIovas: [{ start: 0xfe000000n, last: 0xffffffffn }] }),
    'EADDRINUSE',
  );
  ctx.ioasAllowIovas({ ioasId: ioas, allowedIovas: [] });
  // Auto allocation skips the reserved window.
  const va = p.mmap({ lengthBytes: 1n * MiB });
  ctx.ioasAllowIovas({ ioasId: ioas, allowedIovas: [{ start: 0xfef00000n, last: 0xffffffffn }] });
  const got = ctx.ioasMap({ flags: RW, ioasId: ioas, userVa: va, length: 0x100000n }).iova;
  assert.equal(got, 0xfef00000n);
});

test('IOAS_COPY: sub-ranges, ENOENT on holes, EPERM writeable over read-only, shares pins', () => {
  const { ctx, ioas, p } = setup();
  const dst = ctx.ioasAlloc().outIoasId;
  const va = p.mmap({ lengthBytes: 1n * MiB });
  ctx.ioasMap({ flags: FIXED | RW, ioasId: ioas, userVa: va, length: 0x4000n, iova: 0x10000n });
  ctx.ioasMap({ flags: FIXED | RW, ioasId: ioas, userVa: va + 0x4000n, length: 0x4000n, iova: 0x14000n });
  ctx.ioasMap({ flags: FIXED | 4, ioasId: ioas, userVa: va, length: 0x1000n, iova: 0x30000n });
  const dev = ctx.bindDevice({ name: 'd' }).outDevid;
  ctx.attachIoas({ devId: dev, ptId: ioas });
  const lockedAfterAttach = p.user.lockedVm;
  assert.equal(lockedAfterAttach, 9);
  throwsErrno(
    () => ctx.ioasCopy({ flags: RW, dstIoasId: dst, srcIoasId: ioas, length: U64_MAX, srcIova: 0x10000n }),
    'EOVERFLOW',
  );
  throwsErrno(
    () => ctx.ioasCopy({ flags: 16 | RW, dstIoasId: dst, srcIoasId: ioas, length: 1n, srcIova: 0x10000n }),
    'EOPNOTSUPP',
  );
  throwsErrno(
    () => ctx.ioasCopy({ flags: 0, dstIoasId: dst, srcIoasId: ioas, length: 1n, srcIova: 0n }),
    'EINVAL',
  );
  throwsErrno(
    () => ctx.ioasCopy({ flags: RW, dstIoasId: dst, srcIoasId: ioas, length: 0n, srcIova: 0x10000n }),
    'EINVAL',
  );
  throwsErrno(
    () => ctx.ioasCopy({ flags: RW, dstIoasId: dst, srcIoasId: ioas, length: 0x10000n, srcIova: 0x10000n }),
    'ENOENT',
  );
  throwsErrno(
    () => ctx.ioasCopy({ flags: RW, dstIoasId: 77, srcIoasId: ioas, length: 0x1000n, srcIova: 0x10000n }),
    'ENOENT',
  );
  throwsErrno(
    () => ctx.ioasCopy({ flags: RW, dstIoasId: dst, srcIoasId: ioas, length: 0x1000n, srcIova: 0x30000n }),
    'EPERM',
  );
  // A sub-range spanning both areas: two areas in dst.
  const dev2 = ctx.bindDevice({ name: 'd2' }).outDevid;
  ctx.attachIoas({ devId: dev2, ptId: dst });
  const { dstIova } = ctx.ioasCopy({
    flags: FIXED | RW,
    dstIoasId: dst,
    srcIoasId: ioas,
    length: 0x4000n,
    srcIova: 0x12000n,
    dstIova: 0x100000n,
  });
  assert.equal(dstIova, 0x100000n);
  assert.equal(p.user.lockedVm, lockedAfterAttach, 'copy of pinned pages is not charged again');
  throwsErrno(() => ctx.ioasUnmap({ ioasId: dst, iova: 0x100000n, length: 0x1000n }), 'ENOENT');
  assert.equal(ctx.ioasUnmap({ ioasId: dst, iova: 0x100000n, length: 0x4000n }).length, 0x4000n);
  // DMA sees the same bytes through both IOASes.
  p.write(va + 0x2000n, new Uint8Array([42]));
  const space = new IoasDmaSpace(ctx, dev);
  const b = new Uint8Array(1);
  space.read(0x12000n, b);
  assert.equal(b[0], 42);
  space.write(0x14000n, new Uint8Array([7]));
  p.read(va + 0x4000n, b);
  assert.equal(b[0], 7);
  assert.throws(() => space.write(0x30000n, b), DmaFault);
  assert.throws(() => space.read(0x50000n, b), DmaFault);
  ctx.detach({ devId: dev });
  assert.throws(() => space.read(0x12000n, b), DmaFault);
});

test('MAP_FILE: EBADF, EPERM for a read-only fd, DMA reaches the memfd', () => {
  const { ctx, ioas, p } = setup();
  throwsErrno(() => ctx.ioasMapFile({ flags: RW, ioasId: ioas, fd: 3, start: 0n, length: 4096n }), 'EBADF');
  const fd = p.memfdCreate(1n * MiB);
  const ro = p.installFd({ file: p.file(fd)!.file, writable: false });
  throwsErrno(() => ctx.ioasMapFile({ flags: RW, ioasId: ioas, fd: ro, start: 0n, length: 4096n }), 'EPERM');
  ctx.ioasMapFile({ flags: 4, ioasId: ioas, fd: ro, start: 0n, length: 4096n, iova: 0x1000n });
  const iova = ctx.ioasMapFile({ flags: RW, ioasId: ioas, fd, start: 0x10000n, length: 0x10000n }).iova;
  const dev = ctx.bindDevice({ name: 'd' }).outDevid;
  ctx.attachIoas({ devId: dev, ptId: ioas });
  new IoasDmaSpace(ctx, dev).write(iova + 1n, new Uint8Array([3]));
  const b = new Uint8Array(1);
  p.file(fd)!.file.read(0x10001n, b);
  assert.equal(b[0], 3);
});

test('OPTION: RLIMIT_MODE and HUGE_PAGES errnos', () => {
  const { ctx, ioas, p, host } = setup();
  const opt = (
    o: Partial<{ optionId: number; op: number; objectId: number; val64: bigint; reserved: number }>,
  ) => ctx.option({ optionId: 0, op: 1, objectId: 0, val64: 0n, ...o });
  assert.equal(opt({}).val64, 0n);
  throwsErrno(() => opt({ reserved: 1 }), 'EOPNOTSUPP');
  throwsErrno(() => opt({ objectId: 1 }), 'EOPNOTSUPP');
  throwsErrno(() => opt({ op: 0, val64: 1n }), 'EPERM');
  throwsErrno(() => opt({ op: 7 }), 'EOPNOTSUPP');
  throwsErrno(() => opt({ optionId: 9 }), 'EOPNOTSUPP');
  const admin = host.spawn({ caps: ['CAP_SYS_RESOURCE'] });
  throwsErrno(() => ctx.as(admin).option({ optionId: 0, op: 0, objectId: 0, val64: 1n }), 'EBUSY');
  ctx.destroy({ id: ioas });
  throwsErrno(() => ctx.as(admin).option({ optionId: 0, op: 0, objectId: 0, val64: 2n }), 'EINVAL');
  ctx.as(admin).option({ optionId: 0, op: 0, objectId: 0, val64: 1n });
  assert.equal(opt({}).val64, 1n);
  // HUGE_PAGES
  const id = ctx.ioasAlloc().outIoasId;
  throwsErrno(() => opt({ optionId: 1, objectId: 0 }), 'ENOENT');
  assert.equal(opt({ optionId: 1, objectId: id }).val64, 1n);
  throwsErrno(() => opt({ optionId: 1, objectId: id, op: 0, val64: 3n }), 'EINVAL');
  const va = p.mmap({ lengthBytes: 1n * MiB });
  ctx.ioasMap({ flags: FIXED | RW, ioasId: id, userVa: va, length: 100n, iova: 0x1000n });
  throwsErrno(() => opt({ optionId: 1, objectId: id, op: 0, val64: 0n }), 'EADDRINUSE');
  ctx.ioasUnmap({ ioasId: id, iova: 0n, length: U64_MAX });
  opt({ optionId: 1, objectId: id, op: 0, val64: 0n });
  assert.equal(opt({ optionId: 1, objectId: id }).val64, 0n);
  assert.equal(ctx.ioasIovaRanges({ ioasId: id, numIovas: 1 }).outIovaAlignment, 4096n);
  const dev = ctx.bindDevice({ name: 'd' }).outDevid;
  ctx.attachIoas({ devId: dev, ptId: id });
  opt({ optionId: 1, objectId: id, op: 0, val64: 1n });
  ctx.ioasMap({ flags: FIXED | RW, ioasId: id, userVa: va, length: 4096n, iova: 0x1000n });
  throwsErrno(() => opt({ optionId: 1, objectId: id, op: 0, val64: 0n }), 'EINVAL');
});

test('close releases all pins and objects', () => {
  const { ctx, ioas, p } = setup();
  const va = p.mmap({ lengthBytes: 1n * MiB });
  ctx.ioasMap({ flags: RW, ioasId: ioas, userVa: va, length: 1n * MiB });
  ctx.attachIoas({ devId: ctx.bindDevice({ name: 'd' }).outDevid, ptId: ioas });
  assert.equal(p.user.lockedVm, 256);
  assert.equal(p.mm.pinnedVm, 256);
  ctx.close();
  assert.equal(p.user.lockedVm, 0);
  assert.equal(p.mm.pinnedVm, 0);
  assert.equal(ctx.pagesTable.count, 0);
  throwsErrno(() => ctx.ioasAlloc(), 'EBADF');
});
