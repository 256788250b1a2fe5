import assert from 'node:assert/strict';
import { test } from 'node:test';
import { HwptAllocFlag, HwptDataType, IOMMU_HW_CAP_DIRTY_TRACKING } from '../../../src/uapi/iommufd.js';
import { FIXED, MiB, RW, setup, throwsErrno, U64_MAX } from './helpers.js';

const { NEST_PARENT, DIRTY_TRACKING, FAULT_ID_VALID, PASID } = HwptAllocFlag;

test('HWPT_ALLOC errno order: reserved, data, device, pt_id, flags, dirty capability, driver data, fault', () => {
  const { ctx, ioas } = setup();
  const dev = ctx.bindDevice({ name: 'plain' }).outDevid;
  const dirtyDev = ctx.bindDevice({ name: 'dirty', dirtyTracking: true }).outDevid;
  const alloc = (a: Partial<Parameters<typeof ctx.hwptAlloc>[0]>) =>
    ctx.hwptAlloc({ flags: 0, devId: dev, ptId: ioas, ...a });
  throwsErrno(() => alloc({ reserved: 1, devId: 999 }), 'EOPNOTSUPP');
  throwsErrno(() => alloc({ dataType: HwptDataType.NONE, data: new Uint8Array(4), devId: 999 }), 'EINVAL');
  throwsErrno(() => alloc({ dataType: HwptDataType.VTD_S1, devId: 999 }), 'EINVAL');
  // dev_id checked before pt_id: an IOAS id as device -> ENOENT (selftest alloc_hwpt_nested).
  throwsErrno(() => alloc({ devId: ioas, ptId: dev }), 'ENOENT');
  throwsErrno(() => alloc({ devId: 999 }), 'ENOENT');
  // pt_id missing or of another kind -> EINVAL (not ENOENT).
  throwsErrno(() => alloc({ ptId: 999 }), 'EINVAL');
  throwsErrno(() => alloc({ ptId: dev }), 'EINVAL');
  throwsErrno(() => alloc({ flags: 16 }), 'EOPNOTSUPP');
  throwsErrno(() => alloc({ flags: ~NEST_PARENT }), 'EOPNOTSUPP');
  throwsErrno(() => alloc({ flags: DIRTY_TRACKING }), 'EOPNOTSUPP');
  throwsErrno(() => alloc({ dataType: HwptDataType.VTD_S1, data: new Uint8Array(8) }), 'EOPNOTSUPP');
  throwsErrno(() => alloc({ flags: FAULT_ID_VALID, faultId: 7 }), 'ENOENT');
  assert.equal(ctx.pagesTable.count, 0);
  // Nothing was left behind: the next object gets the next id.
  const h1 = alloc({}).outHwptId;
  assert.equal(h1, 4);
  const h2 = alloc({ flags: NEST_PARENT | PASID }).outHwptId;
  const h3 = alloc({ devId: dirtyDev, flags: DIRTY_TRACKING }).outHwptId;
  assert.deepEqual([h2, h3], [5, 6]);
  // A nested HWPT on a paging one: the modeled IOMMU has none.
  throwsErrno(() => alloc({ ptId: h2 }), 'EOPNOTSUPP');
  throwsErrno(
    () => alloc({ ptId: h2, dataType: HwptDataType.VTD_S1, data: new Uint8Array(8) }),
    'EOPNOTSUPP',
  );
  throwsErrno(() => ctx.destroy({ id: ioas }), 'EBUSY');
  for (const h of [h1, h2, h3]) ctx.destroy({ id: h });
  throwsErrno(() => ctx.destroy({ id: h1 }), 'ENOENT');
  ctx.destroy({ id: ioas });
});

test('HWPT_ALLOC fills the domain: pins and charges now, EFAULT/ENOMEM undone, alignment raised', () => {
  const { ctx, ioas, p } = setup({ rlimitMemlockBytes: 1n * MiB });
  const dev = ctx.bindDevice({ name: 'd' }).outDevid;
  const va = p.mmap({ lengthBytes: 2n * MiB });
  ctx.ioasMap({ flags: FIXED | RW, ioasId: ioas, userVa: va, length: 2n * MiB, iova: 0x100000n });
  throwsErrno(() => ctx.hwptAlloc({ flags: 0, devId: dev, ptId: ioas }), 'ENOMEM');
  assert.equal(p.user.lockedVm, 0);
  assert.equal(ctx.ioasIovaRanges({ ioasId: ioas, numIovas: 1 }).outIovaAlignment, 1n);
  ctx.ioasUnmap({ ioasId: ioas, iova: 0n, length: U64_MAX });
  ctx.ioasMap({ flags: FIXED | RW, ioasId: ioas, userVa: va, length: 1n * MiB, iova: 0x100000n });
  const hwpt = ctx.hwptAlloc({ flags: 0, devId: dev, ptId: ioas }).outHwptId;
  assert.equal(p.user.lockedVm, 256);
  assert.equal(ctx.ioasIovaRanges({ ioasId: ioas, numIovas: 1 }).outIovaAlignment, 4096n);
  // A second HWPT on the same IOAS shares the pins.
  const hwpt2 = ctx.hwptAlloc({ flags: 0, devId: dev, ptId: ioas }).outHwptId;
  assert.equal(p.user.lockedVm, 256);
  ctx.destroy({ id: hwpt });
  assert.equal(p.user.lockedVm, 256);
  ctx.destroy({ id: hwpt2 });
  assert.equal(p.user.lockedVm, 0);
  assert.equal(ctx.ioasIovaRanges({ ioasId: ioas, numIovas: 1 }).outIovaAlignment, 1n);
  // Misaligned area -> EADDRINUSE; unbacked VA -> EFAULT.
  ctx.ioasMap({ flags: FIXED | RW, ioasId: ioas, userVa: va, length: 100n, iova: 0x300000n });
  throwsErrno(() => ctx.hwptAlloc({ flags: 0, devId: dev, ptId: ioas }), 'EADDRINUSE');
  ctx.ioasUnmap({ ioasId: ioas, iova: 0x300000n, length: 100n });
  ctx.ioasMap({ flags: FIXED | RW, ioasId: ioas, userVa: 0x1000n, length: 4096n, iova: 0x300000n });
  throwsErrno(() => ctx.hwptAlloc({ flags: 0, devId: dev, ptId: ioas }), 'EFAULT');
  assert.equal(p.user.lockedVm, 0);
});

test('attach to an explicit HWPT, replace between HWPTs and IOASes, destroy rules', () => {
  const { ctx, ioas } = setup();
  const ioas2 = ctx.ioasAlloc().outIoasId;
  const dev = ctx.bindDevice({ name: 'd' }).outDevid;
  const h1 = ctx.hwptAlloc({ flags: 0, devId: dev, ptId: ioas }).outHwptId;
  const h2 = ctx.hwptAlloc({ flags: NEST_PARENT, devId: dev, ptId: ioas }).outHwptId;
  // Attach errnos: missing -> ENOENT, wrong kind -> EINVAL, bad device -> ENOENT.
  throwsErrno(() => ctx.attachIoas({ devId: dev, ptId: 99 }), 'ENOENT');
  throwsErrno(() => ctx.attachIoas({ devId: dev, ptId: dev }), 'EINVAL');
  throwsErrno(() => ctx.attachIoas({ devId: 99, ptId: h1 }), 'ENOENT');
  assert.equal(ctx.attachIoas({ devId: dev, ptId: h1 }).ptId, h1);
  throwsErrno(() => ctx.destroy({ id: h1 }), 'EBUSY');
  // Replace h1 -> h2: h1 is free again, explicit HWPTs are not destroyed by detach.
  assert.equal(ctx.attachIoas({ devId: dev, ptId: h2 }).ptId, h2);
  throwsErrno(() => ctx.destroy({ id: h2 }), 'EBUSY');
  ctx.destroy({ id: h1 });
  // Replace to the IOAS: an automatic HWPT is made (not the explicit one).
  const auto = ctx.attachIoas({ devId: dev, ptId: ioas }).ptId;
  assert.equal(auto, h1, 'lowest free id');
  assert.equal(ctx.deviceHwpt(dev)!.auto, true);
  // Same IOAS again: the same automatic HWPT, no-op.
  assert.equal(ctx.attachIoas({ devId: dev, ptId: ioas }).ptId, auto);
  // Replace to another IOAS: the new automatic HWPT takes an id before the old one is freed.
  const auto2 = ctx.attachIoas({ devId: dev, ptId: ioas2 }).ptId;
  assert.equal(auto2, 6);
  throwsErrno(() => ctx.destroy({ id: auto }), 'ENOENT');
  assert.equal(ctx.deviceIoas(dev)!.id, ioas2);
  // Back to the explicit HWPT, then detach: the automatic one went with its last device.
  ctx.attachIoas({ devId: dev, ptId: h2 });
  throwsErrno(() => ctx.destroy({ id: auto2 }), 'ENOENT');
  ctx.detach({ devId: dev });
  assert.equal(ctx.deviceHwpt(dev), undefined);
  ctx.destroy({ id: h2 });
  ctx.destroy({ id: ioas });
  ctx.destroy({ id: ioas2 });
});

test('two devices share one automatic HWPT; it lives until the last one leaves', () => {
  const { ctx, ioas } = setup();
  const a = ctx.bindDevice({ name: 'a' }).outDevid;
  const b = ctx.bindDevice({ name: 'b' }).outDevid;
  const h = ctx.attachIoas({ devId: a, ptId: ioas }).ptId;
  assert.equal(ctx.attachIoas({ devId: b, ptId: ioas }).ptId, h);
  throwsErrno(() => ctx.destroy({ id: h }), 'EBUSY');
  ctx.detach({ devId: a });
  throwsErrno(() => ctx.destroy({ id: h }), 'EBUSY');
  ctx.unbindDevice(b);
  throwsErrno(() => ctx.destroy({ id: h }), 'ENOENT');
  throwsErrno(() => ctx.destroy({ id: a }), 'EBUSY');
});

test('device reserved regions follow the attachment: per IOAS, moved by replace, EADDRINUSE leaves no change', () => {
  const { ctx, ioas, p } = setup();
  const ioas2 = ctx.ioasAlloc().outIoasId;
  const msi = { start: 0xfee00000n, last: 0xfeefffffn };
  const dev = ctx.bindDevice({ name: 'd', reservedIovaRanges: [msi] }).outDevid;
  const ranges = (id: number) => ctx.ioasIovaRanges({ ioasId: id, numIovas: 4 }).allowedIovas!;
  const h1 = ctx.hwptAlloc({ flags: 0, devId: dev, ptId: ioas }).outHwptId;
  assert.equal(ranges(ioas).length, 1, 'HWPT_ALLOC reserves nothing');
  ctx.attachIoas({ devId: dev, ptId: h1 });
  assert.equal(ranges(ioas).length, 2);
  // IOAS 2 has an area in the device's MSI window: replace fails, nothing changes.
  const va = p.mmap({ lengthBytes: 1n * MiB });
  ctx.ioasMap({ flags: FIXED | RW, ioasId: ioas2, userVa: va, length: 4096n, iova: 0xfee00000n });
  throwsErrno(() => ctx.attachIoas({ devId: dev, ptId: ioas2 }), 'EADDRINUSE');
  assert.equal(ctx.deviceHwpt(dev)!.id, h1);
  assert.equal(ranges(ioas).length, 2);
  assert.equal(ranges(ioas2).length, 1);
  ctx.ioasUnmap({ ioasId: ioas2, iova: 0n, length: U64_MAX });
  ctx.attachIoas({ devId: dev, ptId: ioas2 });
  assert.equal(ranges(ioas).length, 1);
  assert.equal(ranges(ioas2).length, 2);
  // Mapping into the window is refused now (FIXED hits reserved -> EINVAL).
  throwsErrno(
    () => ctx.ioasMap({ flags: FIXED | RW, ioasId: ioas2, userVa: va, length: 4096n, iova: 0xfee00000n }),
    'EINVAL',
  );
  ctx.detach({ devId: dev });
  assert.equal(ranges(ioas2).length, 1);
});

test('dirty-tracking HWPT: non-capable device cannot attach (EINVAL); auto domains never track', () => {
  const { ctx, ioas } = setup();
  const capable = ctx.bindDevice({ name: 'vf-ssads', dirtyTracking: true }).outDevid;
  const plain = ctx.bindDevice({ name: 'vf-old' }).outDevid;
  const dirty = ctx.hwptAlloc({ flags: DIRTY_TRACKING, devId: capable, ptId: ioas }).outHwptId;
  throwsErrno(() => ctx.attachIoas({ devId: plain, ptId: dirty }), 'EINVAL');
  assert.equal(ctx.deviceHwpt(plain), undefined);
  assert.equal(ctx.ioasIovaRanges({ ioasId: ioas, numIovas: 1 }).numIovas, 1);
  // Replace of an attached non-capable device: EINVAL, still on its old HWPT.
  const auto = ctx.attachIoas({ devId: plain, ptId: ioas }).ptId;
  throwsErrno(() => ctx.attachIoas({ devId: plain, ptId: dirty }), 'EINVAL');
  assert.equal(ctx.deviceHwpt(plain)!.id, auto);
  // The capable device attaches to both kinds.
  ctx.attachIoas({ devId: capable, ptId: dirty });
  ctx.attachIoas({ devId: capable, ptId: ioas });
  assert.equal(ctx.deviceHwpt(capable)!.id, auto);
  throwsErrno(() => ctx.hwptSetDirtyTracking({ flags: 1, hwptId: auto }), 'EOPNOTSUPP');
  ctx.destroy({ id: dirty });
});

test('GET_HW_INFO: EOPNOTSUPP, ENOENT, capability bit, no type data (buffer zeroed)', () => {
  const { ctx, ioas } = setup();
  const dev = ctx.bindDevice({ name: 'd' }).outDevid;
  const dirtyDev = ctx.bindDevice({ name: 'e', dirtyTracking: true }).outDevid;
  throwsErrno(() => ctx.getHwInfo({ devId: dev, flags: 1 }), 'EOPNOTSUPP');
  throwsErrno(() => ctx.getHwInfo({ devId: dev, reserved: 1 }), 'EOPNOTSUPP');
  throwsErrno(() => ctx.getHwInfo({ devId: ioas }), 'ENOENT');
  throwsErrno(() => ctx.getHwInfo({ devId: 42 }), 'ENOENT');
  assert.equal(ctx.getHwInfo({ devId: dev }).outCapabilities, 0n);
  const buf = new Uint8Array(16).fill(0xaa);
  const args = { devId: dirtyDev, data: buf };
  const info = ctx.getHwInfo(args);
  assert.equal(info.outCapabilities & BigInt(IOMMU_HW_CAP_DIRTY_TRACKING), 1n);
  assert.equal(info.outDataType, 0);
  assert.equal(info.dataLen, 0);
  assert.deepEqual(buf, new Uint8Array(16));
});

test('close destroys explicit HWPTs and releases their pins', () => {
  const { ctx, ioas, p } = setup();
  const dev = ctx.bindDevice({ name: 'd', dirtyTracking: true }).outDevid;
  const va = p.mmap({ lengthBytes: 1n * MiB });
  ctx.ioasMap({ flags: RW, ioasId: ioas, userVa: va, length: 1n * MiB });
  const h = ctx.hwptAlloc({ flags: DIRTY_TRACKING, devId: dev, ptId: ioas }).outHwptId;
  ctx.attachIoas({ devId: dev, ptId: h });
  ctx.hwptAlloc({ flags: 0, devId: dev, ptId: ioas });
  assert.equal(p.user.lockedVm, 256);
  ctx.close();
  assert.equal(p.user.lockedVm, 0);
  assert.equal(p.mm.pinnedVm, 0);
  throwsErrno(() => ctx.hwptAlloc({ flags: 0, devId: dev, ptId: ioas }), 'EBADF');
});

test('a second device joining an existing automatic HWPT: its reserved ranges are enforced like on first attach', () => {
  const { ctx, ioas, p } = setup();
  const ioas2 = ctx.ioasAlloc().outIoasId;
  const msi = { start: 0xfee00000n, last: 0xfeefffffn };
  const first = ctx.bindDevice({ name: 'first' }).outDevid;
  const second = ctx.bindDevice({ name: 'second', reservedIovaRanges: [msi] }).outDevid;
  const ranges = (id: number) => ctx.ioasIovaRanges({ ioasId: id, numIovas: 4 }).allowedIovas!;
  const auto = ctx.attachIoas({ devId: first, ptId: ioas }).ptId;
  // An area in the window: EADDRINUSE, the second device stays unattached, nothing reserved.
  const va = p.mmap({ lengthBytes: 1n * MiB });
  ctx.ioasMap({ flags: FIXED | RW, ioasId: ioas, userVa: va, length: 4096n, iova: 0xfee10000n });
  throwsErrno(() => ctx.attachIoas({ devId: second, ptId: ioas }), 'EADDRINUSE');
  assert.equal(ctx.deviceHwpt(second), undefined);
  assert.equal(ctx.deviceHwpt(first)!.devices.size, 1);
  assert.equal(ranges(ioas).length, 1);
  ctx.ioasUnmap({ ioasId: ioas, iova: 0xfee10000n, length: 4096n });
  // An allowed range over the window: EADDRINUSE too.
  ctx.ioasAllowIovas({ ioasId: ioas, allowedIovas: [{ start: 0xfe000000n, last: 0xfeffffffn }] });
  throwsErrno(() => ctx.attachIoas({ devId: second, ptId: ioas }), 'EADDRINUSE');
  assert.equal(ranges(ioas).length, 1);
  ctx.ioasAllowIovas({ ioasId: ioas, allowedIovas: [] });
  // No clash: it joins the same HWPT and its window is reserved (FIXED maps there are EINVAL).
  assert.equal(ctx.attachIoas({ devId: second, ptId: ioas }).ptId, auto);
  assert.deepEqual(ranges(ioas), [
    { start: 0n, last: msi.start - 1n },
    { start: msi.last + 1n, last: U64_MAX },
  ]);
  throwsErrno(
    () => ctx.ioasMap({ flags: FIXED | RW, ioasId: ioas, userVa: va, length: 4096n, iova: msi.start }),
    'EINVAL',
  );
  throwsErrno(
    () => ctx.ioasAllowIovas({ ioasId: ioas, allowedIovas: [{ start: 0xfe000000n, last: 0xfeffffffn }] }),
    'EADDRINUSE',
  );
  // Replace into another IOAS whose automatic HWPT already exists: checked there as well.
  const third = ctx.bindDevice({ name: 'third' }).outDevid;
  const auto2 = ctx.attachIoas({ devId: third, ptId: ioas2 }).ptId;
  ctx.ioasMap({ flags: FIXED | RW, ioasId: ioas2, userVa: va, length: 4096n, iova: msi.start });
  throwsErrno(() => ctx.attachIoas({ devId: second, ptId: ioas2 }), 'EADDRINUSE');
  assert.equal(ctx.deviceHwpt(second)!.id, auto);
  ctx.ioasUnmap({ ioasId: ioas2, iova: msi.start, length: 4096n });
  assert.equal(ctx.attachIoas({ devId: second, ptId: ioas2 }).ptId, auto2);
  assert.equal(ranges(ioas).length, 1, 'released in the IOAS it left');
  assert.equal(ranges(ioas2).length, 2);
  // Only its own ranges go when it leaves.
  ctx.detach({ devId: second });
  assert.equal(ranges(ioas2).length, 1);
  assert.equal(ctx.deviceHwpt(third)!.id, auto2);
});
