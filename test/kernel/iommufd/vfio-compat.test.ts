import assert from 'node:assert/strict';
import { test } from 'node:test';
import { Host } from '../../../src/kernel/host/index.js';
import { IommufdContext, IommufdVfioCompat } from '../../../src/kernel/iommufd/index.js';
import { findInfoCap, SOFT_IOMMU_PGSIZE_BITMAP } from '../../../src/kernel/vfio/container-api.js';
import { DmaFault } from '../../../src/kernel/vfio/dma-port.js';
import { MiB, throwsErrno, U64_MAX } from './helpers.js';

const PAGE = 4096n;
const READ = 1;
const WRITE = 2;
const RW = 3;
const VADDR = 4;
const ALL = 2;
const DIRTY = 1;
const TYPE1 = 1;
const TYPE1v2 = 3;

function compat(opts: { rlimitMemlockBytes?: bigint; device?: boolean } = {}) {
  const host = new Host();
  const p = host.spawn({ uid: 1000, rlimitMemlockBytes: opts.rlimitMemlockBytes ?? 64n * MiB });
  const c = IommufdVfioCompat.open(p);
  let devId = 0;
  if (opts.device ?? true) devId = c.attachDevice({ name: 'vf0' }).devId;
  return { host, p, c, devId };
}

test('opened through /dev/vfio/vfio: RLIMIT_MODE 1, API version 0, the compat extensions', () => {
  const { c } = compat({ device: false });
  assert.equal(c.iommufd.option({ optionId: 0, op: 1, objectId: 0, val64: 0n }).val64, 1n);
  assert.equal(c.getApiVersion(), 0);
  assert.equal(c.checkExtension(TYPE1), 1);
  assert.equal(c.checkExtension(TYPE1v2), 1);
  assert.equal(c.checkExtension(9), 1);
  assert.equal(c.checkExtension(10), 0, 'VFIO_UPDATE_VADDR is never offered');
  assert.equal(c.checkExtension(6), 0);
  assert.equal(c.checkExtension(99), 0);
  throwsErrno(() => c.checkExtension(4), 'ENODEV'); // DMA_CC asks the compat IOAS
  c.attachDevice({ name: 'vf0' });
  assert.equal(c.checkExtension(4), 1);
  assert.equal(c.checkExtension(10), 0);
});

test('no compat IOAS: ENODEV for SET_IOMMU, GET_INFO, MAP and UNMAP (a bad IOMMU type is EINVAL first)', () => {
  const { c, p } = compat({ device: false });
  const va = p.mmap({ lengthBytes: PAGE });
  throwsErrno(() => c.setIommu(2), 'EINVAL');
  throwsErrno(() => c.setIommu(TYPE1v2), 'ENODEV');
  throwsErrno(() => c.iommuGetInfo(), 'ENODEV');
  throwsErrno(() => c.mapDma({ flags: RW, vaddr: va, iova: 0n, size: PAGE }), 'ENODEV');
  throwsErrno(() => c.unmapDma({ flags: ALL, iova: 0n, size: 0n }), 'ENODEV');
  // Unsupported flags are refused before the IOAS is looked up.
  throwsErrno(() => c.mapDma({ flags: RW | VADDR, vaddr: va, iova: 0n, size: PAGE }), 'EINVAL');
  throwsErrno(() => c.unmapDma({ flags: VADDR, iova: 0n, size: PAGE }), 'EINVAL');
});

test('IOMMU_VFIO_IOAS: GET (none ENODEV), SET (bad id ENOENT), CLEAR, reserved/unknown op EOPNOTSUPP', () => {
  const host = new Host();
  const ctx = IommufdContext.open(host.spawn());
  throwsErrno(() => ctx.vfioIoas({ op: 0, ioasId: 0 }), 'ENODEV');
  throwsErrno(() => ctx.vfioIoas({ op: 0, ioasId: 0, reserved: 1 }), 'EOPNOTSUPP');
  throwsErrno(() => ctx.vfioIoas({ op: 3, ioasId: 0 }), 'EOPNOTSUPP');
  throwsErrno(() => ctx.vfioIoas({ op: 1, ioasId: 5 }), 'ENOENT');
  const ioas = ctx.ioasAlloc().outIoasId;
  const dev = ctx.bindDevice({ name: 'd' }).outDevid;
  throwsErrno(() => ctx.vfioIoas({ op: 1, ioasId: dev }), 'ENOENT');
  ctx.vfioIoas({ op: 1, ioasId: ioas });
  assert.equal(ctx.vfioIoas({ op: 0, ioasId: 0 }).ioasId, ioas);
  ctx.vfioIoas({ op: 2, ioasId: 0 });
  throwsErrno(() => ctx.vfioIoas({ op: 0, ioasId: 0 }), 'ENODEV');
  // The container ioctls work on a /dev/iommu fd too, once a compat IOAS is set.
  const c = IommufdVfioCompat.of(ctx);
  throwsErrno(() => c.iommuGetInfo(), 'ENODEV');
  ctx.vfioIoas({ op: 1, ioasId: ioas });
  c.iommuGetInfo();
  // Destroying the compat IOAS unsets it.
  ctx.destroy({ id: ioas });
  throwsErrno(() => ctx.vfioIoas({ op: 0, ioasId: 0 }), 'ENODEV');
});

test('attaching a device creates the compat IOAS (a user object), later devices reuse it', () => {
  const { c } = compat({ device: false });
  const a = c.attachDevice({ name: 'a' });
  const b = c.attachDevice({ name: 'b' });
  assert.equal(a.ioasId, b.ioasId);
  assert.equal(c.iommufd.vfioIoas({ op: 0, ioasId: 0 }).ioasId, a.ioasId);
  // An attach that fails (reserved range over a mapping) leaves no device behind.
  const other = compat({ device: false });
  const ctx = other.c.iommufd;
  ctx.vfioIoas({ op: 1, ioasId: ctx.ioasAlloc().outIoasId });
  const va = other.p.mmap({ lengthBytes: PAGE });
  other.c.mapDma({ flags: RW, vaddr: va, iova: 0x100000n, size: PAGE });
  throwsErrno(
    () => other.c.attachDevice({ name: 'x', reservedIovaRanges: [{ start: 0x100000n, last: 0x1fffffn }] }),
    'EADDRINUSE',
  );
  throwsErrno(() => ctx.unbindDevice(2), 'ENOENT');
  c.detachDevice(b.devId);
  c.detachDevice(a.devId);
});

test('MAP_DMA: only READ|WRITE; pins per mm (locked_vm and pinned_vm); EEXIST, EOVERFLOW, ENOMEM', () => {
  const { c, p } = compat({ rlimitMemlockBytes: 4n * MiB });
  const va = p.mmap({ lengthBytes: 8n * MiB });
  throwsErrno(() => c.mapDma({ flags: RW | 8, vaddr: va, iova: 0n, size: PAGE }), 'EINVAL');
  throwsErrno(() => c.mapDma({ flags: VADDR, vaddr: va, iova: 0n, size: PAGE }), 'EINVAL');
  c.mapDma({ flags: RW, vaddr: va, iova: 0n, size: 2n * MiB });
  assert.equal(p.mm.lockedVm, 512);
  assert.equal(p.mm.pinnedVm, 512);
  assert.equal(p.user.lockedVm, 0);
  throwsErrno(() => c.mapDma({ flags: RW, vaddr: va, iova: 1n * MiB, size: 2n * MiB }), 'EEXIST');
  throwsErrno(
    () => c.mapDma({ flags: RW, vaddr: va, iova: U64_MAX - PAGE + 1n, size: 2n * PAGE }),
    'EOVERFLOW',
  );
  throwsErrno(() => c.mapDma({ flags: RW, vaddr: va, iova: 4n * MiB, size: 3n * MiB }), 'ENOMEM');
  throwsErrno(() => c.mapDma({ flags: RW, vaddr: 0x1000n, iova: 4n * MiB, size: PAGE }), 'EFAULT');
  throwsErrno(() => c.mapDma({ flags: RW, vaddr: va, iova: 4n * MiB, size: 0n }), 'EINVAL');
  throwsErrno(() => c.mapDma({ flags: RW, vaddr: va, iova: 4n * MiB + 8n, size: PAGE }), 'EINVAL');
  assert.equal(p.mm.lockedVm, 512);
});

test('MAP_DMA with flags 0: accepted, a mapping the device can neither read nor write', () => {
  const { c, p, devId } = compat();
  const va = p.mmap({ lengthBytes: PAGE });
  c.mapDma({ flags: 0, vaddr: va, iova: 0n, size: PAGE });
  const space = c.dmaSpace(devId);
  assert.throws(() => space.read(0n, new Uint8Array(1)), DmaFault);
  assert.throws(() => space.write(0n, Uint8Array.of(1)), DmaFault);
  c.mapDma({ flags: READ, vaddr: va, iova: PAGE, size: PAGE });
  c.mapDma({ flags: WRITE, vaddr: va, iova: 2n * PAGE, size: PAGE });
  space.write(2n * PAGE, Uint8Array.of(5));
  const got = new Uint8Array(1);
  space.read(PAGE, got);
  assert.equal(got[0], 5);
});

test('UNMAP_DMA: FLAG_ALL only; iommufd rules: a cut or nothing in range is ENOENT, not atomic', () => {
  const { c, p } = compat();
  const va = p.mmap({ lengthBytes: 1n * MiB });
  c.mapDma({ flags: RW, vaddr: va, iova: 0x10000n, size: 4n * PAGE });
  c.mapDma({ flags: RW, vaddr: va, iova: 0x14000n, size: 4n * PAGE });
  c.mapDma({ flags: RW, vaddr: va, iova: 0x20000n, size: 16n * PAGE });
  throwsErrno(() => c.unmapDma({ flags: DIRTY, iova: 0x10000n, size: PAGE }), 'EINVAL');
  throwsErrno(() => c.unmapDma({ flags: VADDR, iova: 0x10000n, size: PAGE }), 'EINVAL');
  throwsErrno(() => c.unmapDma({ flags: ALL, iova: 0x10000n, size: 0n }), 'EINVAL');
  throwsErrno(() => c.unmapDma({ flags: ALL, iova: 0n, size: PAGE }), 'EINVAL');
  throwsErrno(() => c.unmapDma({ flags: 0, iova: 0x10000n, size: 0n }), 'EINVAL');
  throwsErrno(() => c.unmapDma({ flags: 0, iova: 0x40000n, size: PAGE }), 'ENOENT');
  throwsErrno(() => c.unmapDma({ flags: 0, iova: 0x11000n, size: PAGE }), 'ENOENT');
  throwsErrno(() => c.unmapDma({ flags: 0, iova: U64_MAX - PAGE + 1n, size: 2n * PAGE }), 'EOVERFLOW');
  // Covers A and B whole, then cuts C: ENOENT, but A and B are already gone.
  throwsErrno(() => c.unmapDma({ flags: 0, iova: 0x10000n, size: 0x11000n }), 'ENOENT');
  assert.deepEqual(c.iommufd.compatIoas('t').iopt.areas().length, 1);
  assert.equal(p.mm.lockedVm, 16);
  assert.deepEqual(c.unmapDma({ flags: 0, iova: 0n, size: 1n * MiB }), { size: 16n * PAGE });
  assert.deepEqual(c.unmapDma({ flags: ALL, iova: 0n, size: 0n }), { size: 0n });
  assert.equal(p.mm.lockedVm, 0);
  assert.equal(p.mm.pinnedVm, 0);
});

test('SET_IOMMU(TYPE1) turns large pages off so unmaps split mappings; refused with a domain and mappings', () => {
  const { c, p, devId } = compat();
  const hugePages = () => {
    const ioasId = c.iommufd.vfioIoas({ op: 0, ioasId: 0 }).ioasId;
    return c.iommufd.option({ optionId: 1, op: 1, objectId: ioasId, val64: 0n }).val64;
  };
  assert.equal(hugePages(), 1n);
  c.setIommu(TYPE1v2);
  assert.equal(hugePages(), 1n);
  const va = p.mmap({ lengthBytes: 1n * MiB });
  c.mapDma({ flags: RW, vaddr: va, iova: 0x100000n, size: 16n * PAGE });
  throwsErrno(() => c.setIommu(TYPE1), 'EINVAL');
  c.unmapDma({ flags: ALL, iova: 0n, size: 0n });
  c.setIommu(TYPE1);
  assert.equal(hugePages(), 0n);
  c.mapDma({ flags: RW, vaddr: va, iova: 0x100000n, size: 16n * PAGE });
  assert.equal(p.mm.lockedVm, 16);
  // A hole in the middle: exactly the range goes, the two halves stay (pins carried over).
  assert.deepEqual(c.unmapDma({ flags: 0, iova: 0x104000n, size: 4n * PAGE }), { size: 4n * PAGE });
  assert.equal(p.mm.lockedVm, 12);
  const iopt = c.iommufd.compatIoas('t').iopt;
  assert.deepEqual(
    iopt.areas().map((a) => [iopt.areaIova(a), iopt.areaLast(a)]),
    [
      [0x100000n, 0x103fffn],
      [0x108000n, 0x10ffffn],
    ],
  );
  // Starting inside a mapping (type1 v1: size 0) unmaps the requested tail here.
  assert.deepEqual(c.unmapDma({ flags: 0, iova: 0x10c000n, size: 0x10000n }), { size: 4n * PAGE });
  assert.equal(p.mm.lockedVm, 8);
  // The device still reaches what is left.
  const space = c.dmaSpace(devId);
  space.write(0x103000n, Uint8Array.of(3));
  space.write(0x108000n, Uint8Array.of(4));
  const got = new Uint8Array(1);
  p.read(va + 0x3000n, got);
  assert.equal(got[0], 3);
  p.read(va + 0x8000n, got);
  assert.equal(got[0], 4);
  // Sub-page cuts are EINVAL.
  throwsErrno(() => c.unmapDma({ flags: 0, iova: 0x100800n, size: PAGE }), 'EINVAL');
  c.unmapDma({ flags: ALL, iova: 0n, size: 0n });
  assert.equal(p.mm.lockedVm, 0);
  assert.equal(p.mm.pinnedVm, 0);
});

test('GET_INFO: page sizes, DMA_AVAIL = U32_MAX, IOVA ranges from the devices reserved regions, no MIGRATION cap', () => {
  const { c } = compat({ device: false });
  c.iommufd.compatIoasCreate();
  assert.equal(c.iommuGetInfo().iovaPgsizes, U64_MAX & ~(PAGE - 1n));
  c.attachDevice({ name: 'vf', reservedIovaRanges: [{ start: 0xfee00000n, last: 0xfeefffffn }] });
  const info = c.iommuGetInfo();
  assert.equal(info.flags, 3);
  assert.equal(info.iovaPgsizes, SOFT_IOMMU_PGSIZE_BITMAP);
  assert.deepEqual(
    info.caps.map((x) => x.id),
    [3, 1],
  );
  assert.equal(findInfoCap(info, 3)?.avail, 0xffffffff);
  assert.deepEqual(findInfoCap(info, 1)?.iovaRanges, [
    { start: 0n, end: 0xfedfffffn },
    { start: 0xfef00000n, end: U64_MAX },
  ]);
  assert.equal(findInfoCap(info, 2), undefined);
});
