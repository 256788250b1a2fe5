import assert from 'node:assert/strict';
import { test } from 'node:test';
import { Host } from '../../../src/kernel/host/index.js';
import { IommufdVfioCompat } from '../../../src/kernel/iommufd/index.js';
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

test('cutIova refuses an area an access has pinned (EINVAL, after the alignment check); earlier cuts stay', () => {
  const { ctx, ioas, p } = setup();
  const va = p.mmap({ lengthBytes: 1n * MiB });
  ctx.option({ optionId: 1, op: 0, objectId: ioas, val64: 0n });
  ctx.ioasMap({ flags: FIXED | RW, ioasId: ioas, userVa: va, length: 16n * PAGE, iova: 0x100000n });
  ctx.ioasMap({ flags: FIXED | RW, ioasId: ioas, userVa: va, length: 16n * PAGE, iova: 0x200000n });
  const iopt = ctx.ioas(ioas, 't').iopt;
  const acc = ctx.accessCreate(ioas, { unmap() {} });
  const pinned = acc.accessPin(0x10c000n, PAGE, { write: true });
  // The pinned page is far from the cut: the whole area is refused, as iopt_area_split does.
  throwsErrno(() => iopt.cutIova([0x103fffn]), 'EINVAL');
  // The cut of the other area happens; the one after it fails; nothing is rolled back.
  throwsErrno(() => iopt.cutIova([0x207fffn, 0x103fffn]), 'EINVAL');
  assert.deepEqual(
    iopt.areas().map((a) => [iopt.areaIova(a), iopt.areaLast(a)]),
    [
      [0x100000n, 0x10ffffn],
      [0x200000n, 0x207fffn],
      [0x208000n, 0x20ffffn],
    ],
  );
  // Cuts at the ends of the pinned area are no-ops, not splits: allowed.
  iopt.cutIova([0x100000n, 0x10ffffn]);
  // The pin still works in place.
  pinned.write(0, Uint8Array.of(7));
  const got = new Uint8Array(1);
  p.read(va + 0xc000n, got);
  assert.equal(got[0], 7);
  // An internal access counts too (num_accesses includes its pins).
  acc.accessUnpin(0x10c000n, PAGE);
  const queue = ctx.accessCreateInternal(ioas);
  queue.accessPin(0x100000n, PAGE);
  throwsErrno(() => iopt.cutIova([0x107fffn]), 'EINVAL');
  queue.accessUnpin(0x100000n, PAGE);
  // Unpinned: the split goes through.
  iopt.cutIova([0x107fffn]);
  assert.equal(iopt.areaCount, 4);
  queue.accessDestroy();
  acc.accessDestroy();
});

test('cutIova of an area being unmapped (an access kept its pin through the notices): EBUSY, before alignment', () => {
  const { ctx, ioas, p } = setup();
  const va = p.mmap({ lengthBytes: 1n * MiB });
  ctx.option({ optionId: 1, op: 0, objectId: ioas, val64: 0n });
  ctx.ioasMap({ flags: FIXED | RW, ioasId: ioas, userVa: va, length: 16n * PAGE, iova: 0x100000n });
  const iopt = ctx.ioas(ioas, 't').iopt;
  const stuck = ctx.accessCreate(ioas, { unmap() {} });
  stuck.accessPin(0x100000n, PAGE);
  throwsErrno(() => ctx.ioasUnmap({ ioasId: ioas, iova: 0x100000n, length: 16n * PAGE }), 'EDEADLOCK');
  throwsErrno(() => iopt.cutIova([0x103fffn]), 'EBUSY');
  throwsErrno(() => iopt.cutIova([0x100800n]), 'EBUSY');
  // prevent_access stays set until the area goes, even once the pin is dropped.
  stuck.accessUnpin(0x100000n, PAGE);
  throwsErrno(() => iopt.cutIova([0x103fffn]), 'EBUSY');
  assert.equal(ctx.ioasUnmap({ ioasId: ioas, iova: 0x100000n, length: 16n * PAGE }).length, 16n * PAGE);
  stuck.accessDestroy();
});

test('VFIO compat TYPE1 split unmap of a mapping an access has pinned: EINVAL, nothing unmapped', () => {
  const host = new Host();
  const p = host.spawn({ uid: 1000, rlimitMemlockBytes: 64n * MiB });
  const c = IommufdVfioCompat.open(p);
  c.attachDevice({ name: 'vf0' });
  c.setIommu(1); // VFIO_TYPE1_IOMMU: large pages off, unmaps may split
  const va = p.mmap({ lengthBytes: 1n * MiB });
  c.mapDma({ flags: 3, vaddr: va, iova: 0x100000n, size: 16n * PAGE });
  const ioasId = c.iommufd.vfioIoas({ op: 0, ioasId: 0 }).ioasId;
  const acc = c.iommufd.accessCreate(ioasId, { unmap() {} });
  acc.accessPin(0x10f000n, PAGE);
  throwsErrno(() => c.unmapDma({ flags: 0, iova: 0x104000n, size: 4n * PAGE }), 'EINVAL');
  assert.equal(p.mm.lockedVm, 16);
  const iopt = c.iommufd.compatIoas('t').iopt;
  assert.equal(iopt.areaCount, 1);
  // Once the access has unpinned, the same split unmap works.
  acc.accessUnpin(0x10f000n, PAGE);
  assert.deepEqual(c.unmapDma({ flags: 0, iova: 0x104000n, size: 4n * PAGE }), { size: 4n * PAGE });
  assert.equal(p.mm.lockedVm, 12);
  acc.accessDestroy();
});
