import assert from 'node:assert/strict';
import { test } from 'node:test';
import { FIXED, MiB, RW, setup, throwsErrno } from './helpers.js';

const PAGE = 4096n;

test('cutIova: splits an area on the same pages; ends and gaps are no-ops; misaligned EINVAL', () => {
  const { ctx, ioas, p } = setup();
  const va = p.mmap({ lengthBytes: 1n * MiB });
  ctx.ioasMap({ flags: FIXED | RW, ioasId: ioas, userVa: va, length: 16n * PAGE, iova: 0x100000n });
  ctx.option({ optionId: 1, op: 0, objectId: ioas, val64: 0n });
  const iopt = ctx.ioas(ioas, 't').iopt;
  const spans = () => iopt.areas().map((a) => [iopt.areaIova(a), iopt.areaLast(a), iopt.areaOffset(a)]);
  iopt.cutIova([0x100000n, 0x10ffffn, 0x200000n]);
  assert.equal(iopt.areaCount, 1);
  throwsErrno(() => iopt.cutIova([0x100800n]), 'EINVAL');
  iopt.cutIova([0x103fffn, 0x107fffn]);
  assert.deepEqual(spans(), [
    [0x100000n, 0x103fffn, 0n],
    [0x104000n, 0x107fffn, 0x4000n],
    [0x108000n, 0x10ffffn, 0x8000n],
  ]);
  assert.equal(new Set(iopt.areas().map((a) => iopt.areaPages(a))).size, 1, 'one pages object');
});

test('cutIova with a domain: pins carry over, nothing charged twice; large pages on: EINVAL', () => {
  const { ctx, ioas, p } = setup();
  ctx.attachIoas({ devId: ctx.bindDevice({ name: 'd' }).outDevid, ptId: ioas });
  const va = p.mmap({ lengthBytes: 1n * MiB });
  ctx.ioasMap({ flags: FIXED | RW, ioasId: ioas, userVa: va, length: 16n * PAGE, iova: 0x100000n });
  const iopt = ctx.ioas(ioas, 't').iopt;
  throwsErrno(() => iopt.cutIova([0x103fffn]), 'EINVAL');
  assert.equal(iopt.areaCount, 1);
  // HUGE_PAGES=0 needs no areas while a domain is attached: unmap, disable, map again.
  ctx.ioasUnmap({ ioasId: ioas, iova: 0x100000n, length: 16n * PAGE });
  ctx.option({ optionId: 1, op: 0, objectId: ioas, val64: 0n });
  ctx.ioasMap({ flags: FIXED | RW, ioasId: ioas, userVa: va, length: 16n * PAGE, iova: 0x100000n });
  assert.equal(p.user.lockedVm, 16);
  iopt.cutIova([0x103fffn, 0x107fffn]);
  assert.equal(p.user.lockedVm, 16);
  assert.equal(p.mm.pinnedVm, 16);
  ctx.ioasUnmap({ ioasId: ioas, iova: 0x104000n, length: 4n * PAGE });
  assert.equal(p.user.lockedVm, 12);
  ctx.ioasUnmap({ ioasId: ioas, iova: 0n, length: (1n << 64n) - 1n });
  assert.equal(p.user.lockedVm, 0);
  assert.equal(p.mm.pinnedVm, 0);
});
