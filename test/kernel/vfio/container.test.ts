import assert from 'node:assert/strict';
import { test } from 'node:test';
import { Host } from '../../../src/kernel/host/index.js';
import { findInfoCap, SOFT_IOMMU_PGSIZE_BITMAP } from '../../../src/kernel/vfio/container-api.js';
import { VfioContainer, VfioGroup } from '../../../src/kernel/vfio/container.js';
import type { Type1Iommu } from '../../../src/kernel/vfio/container-type1.js';
import {
  DMA_CC,
  MiB,
  PAGE,
  RW,
  throwsErrno,
  type1,
  TYPE1,
  TYPE1v2,
  U64_MAX,
  UNMAP_ALL,
  UPDATE_VADDR,
} from './container-helpers.js';

const PAGE_MASK = U64_MAX & ~(PAGE - 1n);

test('a fresh container: API version 0; extensions asked of type1 with no IOMMU yet', () => {
  const host = new Host();
  const c = VfioContainer.open(host.spawn());
  assert.equal(c.getApiVersion(), 0);
  assert.equal(c.checkExtension(TYPE1), 1);
  assert.equal(c.checkExtension(TYPE1v2), 1);
  assert.equal(c.checkExtension(UNMAP_ALL), 1);
  // Before VFIO_SET_IOMMU the driver answers with no iommu: UPDATE_VADDR and DMA_CC are 0.
  assert.equal(c.checkExtension(UPDATE_VADDR), 0);
  assert.equal(c.checkExtension(DMA_CC), 0);
  for (const other of [0, 2, 5, 6, 7, 8, 11, 99]) assert.equal(c.checkExtension(other), 0, `ext ${other}`);
});

test('container ioctls before VFIO_SET_IOMMU fail EINVAL', () => {
  const host = new Host();
  const p = host.spawn();
  const c = VfioContainer.open(p);
  throwsErrno(() => c.iommuGetInfo(), 'EINVAL');
  throwsErrno(() => c.mapDma({ flags: RW, vaddr: 0n, iova: 0n, size: PAGE }), 'EINVAL');
  throwsErrno(() => c.unmapDma({ flags: 0, iova: 0n, size: PAGE }), 'EINVAL');
});

test('VFIO_SET_IOMMU: EINVAL without a group or once set, ENODEV for unsupported types, EINVAL for UNMAP_ALL', () => {
  const host = new Host();
  const c = VfioContainer.open(host.spawn());
  throwsErrno(() => c.setIommu(TYPE1v2), 'EINVAL');
  c.attachGroup(new VfioGroup({ name: 'g' }));
  for (const t of [2, DMA_CC, 6, 7, 8, UPDATE_VADDR, 99]) throwsErrno(() => c.setIommu(t), 'ENODEV');
  throwsErrno(() => c.setIommu(UNMAP_ALL), 'EINVAL');
  c.setIommu(TYPE1v2);
  assert.equal(c.type1?.v2, true);
  throwsErrno(() => c.setIommu(TYPE1v2), 'EINVAL');
  throwsErrno(() => c.setIommu(TYPE1), 'EINVAL');
  assert.equal(c.checkExtension(UPDATE_VADDR), 1);
  assert.equal(c.checkExtension(DMA_CC), 1);
});

test('groups: one container at a time; unset needs no open device; the last group out unsets the IOMMU', () => {
  const { host, p, c, group } = type1();
  const other = VfioContainer.open(host.spawn());
  throwsErrno(() => other.attachGroup(group), 'EINVAL');
  throwsErrno(() => c.attachGroup(group), 'EINVAL');
  throwsErrno(() => other.detachGroup(group), 'EINVAL');
  const va = p.mmap({ lengthBytes: 1n * MiB });
  c.mapDma({ flags: RW, vaddr: va, iova: 0n, size: 1n * MiB });
  assert.equal(p.mm.lockedVm, 256);
  const dev = c.openDevice(group, { name: 'vf0' });
  throwsErrno(() => c.detachGroup(group), 'EBUSY');
  dev.close();
  dev.close();
  c.detachGroup(group);
  assert.equal(c.type1, undefined, 'IOMMU released');
  assert.equal(p.mm.lockedVm, 0, 'every pin dropped');
  throwsErrno(() => c.iommuGetInfo(), 'EINVAL');
  throwsErrno(() => c.openDevice(group, { name: 'vf0' }), 'EINVAL');
  // Unset again: the container takes groups and a new IOMMU type.
  c.attachGroup(group);
  throwsErrno(() => c.openDevice(group, { name: 'vf0' }), 'EINVAL');
  c.setIommu(TYPE1);
  const again = c.type1 as Type1Iommu | undefined; // (assert.equal narrowed c.type1 to undefined)
  assert.equal(again?.v2, false);
  assert.equal(again?.dmaCount, 0);
});

test('a group attached after VFIO_SET_IOMMU is attached by the driver at once', () => {
  const { c, p } = type1();
  const va = p.mmap({ lengthBytes: 64n * 1024n });
  c.mapDma({ flags: RW, vaddr: va, iova: 0x10000n, size: 64n * 1024n });
  // A group whose reserved region overlaps a mapping is refused by type1: EINVAL, nothing changed.
  const bad = new VfioGroup({ name: 'bad', reservedIovaRanges: [{ start: 0x18000n, last: 0x18fffn }] });
  throwsErrno(() => c.attachGroup(bad), 'EINVAL');
  assert.equal(bad.container, undefined);
  assert.equal(c.groups.length, 1);
  // An aperture that leaves the mapping outside: EINVAL.
  const narrow = new VfioGroup({ name: 'narrow', aperture: { start: 0x100000n, end: 0xffffffffn } });
  throwsErrno(() => c.attachGroup(narrow), 'EINVAL');
  // A reserved region that swallows the whole aperture: no usable IOVA left.
  const full = new VfioGroup({
    name: 'full',
    aperture: { start: 0n, end: 0xfffffn },
    reservedIovaRanges: [{ start: 0x20000n, last: 0xfffffn }],
  });
  c.unmapDma({ flags: 2, iova: 0n, size: 0n });
  const full2 = new VfioGroup({
    name: 'full2',
    aperture: { start: 0x20000n, end: 0xfffffn },
    reservedIovaRanges: [{ start: 0n, last: 0xfffffn }],
  });
  throwsErrno(() => c.attachGroup(full2), 'EINVAL');
  c.attachGroup(full);
  assert.equal(c.groups.length, 2);
  assert.deepEqual(c.type1?.iovaRanges, [{ start: 0n, end: 0x1ffffn }]);
});

test('VFIO_IOMMU_GET_INFO: flags, page sizes and the capability chain MIGRATION, DMA_AVAIL, IOVA_RANGE', () => {
  const { c } = type1({
    group: {
      reservedIovaRanges: [{ start: 0xfee00000n, last: 0xfeefffffn }],
      aperture: { start: 0n, end: (1n << 48n) - 1n },
    },
  });
  const info = c.iommuGetInfo();
  assert.equal(info.flags, 1 | 2);
  assert.equal(info.iovaPgsizes, SOFT_IOMMU_PGSIZE_BITMAP);
  assert.deepEqual(
    info.caps.map((x) => x.id),
    [2, 3, 1],
  );
  assert.deepEqual(findInfoCap(info, 2), {
    id: 2,
    version: 1,
    flags: 0,
    pgsizeBitmap: 4096n,
    maxDirtyBitmapSize: 1n << 28n,
  });
  assert.deepEqual(findInfoCap(info, 3), { id: 3, version: 1, avail: 65535 });
  assert.deepEqual(findInfoCap(info, 1)?.iovaRanges, [
    { start: 0n, end: 0xfedfffffn },
    { start: 0xfef00000n, end: (1n << 48n) - 1n },
  ]);
});

test('GET_INFO of an mdev-only container: PAGE_MASK page sizes and no IOVA_RANGE capability', () => {
  const { c } = type1({ group: { type: 'emulated' } });
  const info = c.iommuGetInfo();
  assert.equal(info.iovaPgsizes, PAGE_MASK);
  assert.deepEqual(
    info.caps.map((x) => x.id),
    [2, 3],
  );
  assert.equal(findInfoCap(info, 1), undefined);
});

test('two IOMMU drivers: two domains, the page sizes they share, apertures intersected', () => {
  const { c } = type1({
    group: { pgsizeBitmap: (1n << 12n) | (1n << 21n), aperture: { start: 0n, end: 1n << 40n } },
  });
  c.attachGroup(
    new VfioGroup({
      name: 'g1',
      iommuOps: 'other-iommu',
      pgsizeBitmap: (1n << 12n) | (1n << 30n),
      aperture: { start: 0x1000n, end: 1n << 39n },
    }),
  );
  assert.equal(c.type1?.domainCount, 2);
  assert.equal(c.iommuGetInfo().iovaPgsizes, 1n << 12n);
  assert.deepEqual(c.type1?.iovaRanges, [{ start: 0x1000n, end: 1n << 39n }]);
  c.detachGroup(c.groups[1]!);
  assert.equal(c.type1?.domainCount, 1);
  assert.equal(c.iommuGetInfo().iovaPgsizes, (1n << 12n) | (1n << 21n));
  assert.deepEqual(c.type1?.iovaRanges, [{ start: 0n, end: 1n << 40n }]);
});

test('close(): devices close, groups leave, pins are dropped; the fd is then EBADF', () => {
  const { c, p, group } = type1();
  const va = p.mmap({ lengthBytes: 1n * MiB });
  c.mapDma({ flags: RW, vaddr: va, iova: 0n, size: 1n * MiB });
  c.openDevice(group, { name: 'vf0' });
  c.close();
  c.close();
  assert.equal(p.mm.lockedVm, 0);
  assert.equal(group.container, undefined);
  throwsErrno(() => c.getApiVersion(), 'EBADF');
  throwsErrno(() => c.checkExtension(TYPE1), 'EBADF');
});
