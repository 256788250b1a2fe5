import assert from 'node:assert/strict';
import { test } from 'node:test';
import { Host } from '../../../src/kernel/host/index.js';
import { VfioContainer, VfioGroup } from '../../../src/kernel/vfio/container.js';
import { dmaAvail, GiB, MiB, PAGE, READ, RW, throwsErrno, type1, TYPE1v2 } from './container-helpers.js';

test('a mapping with a domain charges mm->locked_vm page by page; pinned_vm and user->locked_vm stay 0', () => {
  const { c, p } = type1();
  const va = p.mmap({ lengthBytes: 16n * MiB });
  c.mapDma({ flags: RW, vaddr: va, iova: 0n, size: 16n * MiB });
  assert.equal(p.mm.lockedVm, 4096);
  assert.equal(p.mm.pinnedVm, 0);
  assert.equal(p.user.lockedVm, 0);
  assert.equal(c.type1!.dmas()[0]!.lockedVm, 4096);
  assert.equal(p.mm.regions[0]!.store.residentBytes, 0, 'pinning touched no byte');
  c.unmapDma({ flags: 0, iova: 0n, size: 16n * MiB });
  assert.equal(p.mm.lockedVm, 0);
});

test('RLIMIT_MEMLOCK is checked while pinning: ENOMEM, the map undone; exactly at the limit is fine', () => {
  const { c, p } = type1({ spawn: { rlimitMemlockBytes: 4n * MiB } });
  const va = p.mmap({ lengthBytes: 8n * MiB });
  c.mapDma({ flags: RW, vaddr: va, iova: 0n, size: 3n * MiB });
  throwsErrno(() => c.mapDma({ flags: RW, vaddr: va, iova: 4n * MiB, size: 2n * MiB }), 'ENOMEM');
  assert.equal(p.mm.lockedVm, 768);
  assert.equal(c.type1!.dmaCount, 1);
  assert.equal(dmaAvail(c), 65534);
  c.mapDma({ flags: RW, vaddr: va, iova: 4n * MiB, size: 1n * MiB });
  assert.equal(p.mm.lockedVm, 1024);
  throwsErrno(() => c.mapDma({ flags: READ, vaddr: va, iova: 8n * MiB, size: PAGE }), 'ENOMEM');
});

test('ENOMEM or EFAULT: whichever page comes first', () => {
  const { c, p } = type1({ spawn: { rlimitMemlockBytes: 8n * PAGE } });
  const va = p.mmap({ lengthBytes: 4n * PAGE });
  // Page 4 is unmapped, the limit would stop at page 8: EFAULT.
  throwsErrno(() => c.mapDma({ flags: RW, vaddr: va, iova: 0n, size: 16n * PAGE }), 'EFAULT');
  const big = p.mmap({ lengthBytes: 12n * PAGE });
  // Fully mapped beyond the limit: ENOMEM.
  throwsErrno(() => c.mapDma({ flags: RW, vaddr: big, iova: 0n, size: 12n * PAGE }), 'ENOMEM');
  assert.equal(p.mm.lockedVm, 0);
});

test('CAP_IPC_LOCK at map time: no limit, the pages are still counted in locked_vm', () => {
  const { c, p } = type1({ spawn: { rlimitMemlockBytes: 0n, caps: ['CAP_IPC_LOCK'] } });
  const va = p.mmap({ lengthBytes: 1n * GiB });
  c.mapDma({ flags: RW, vaddr: va, iova: 0n, size: 1n * GiB });
  assert.equal(p.mm.lockedVm, 1 << 18);
  c.unmapDma({ flags: 2, iova: 0n, size: 0n });
  assert.equal(p.mm.lockedVm, 0);
});

test('no dedup across mappings: the same memory mapped twice is charged twice', () => {
  const { c, p } = type1({ spawn: { rlimitMemlockBytes: 3n * MiB } });
  const va = p.mmap({ lengthBytes: 2n * MiB });
  c.mapDma({ flags: RW, vaddr: va, iova: 0n, size: 2n * MiB });
  throwsErrno(() => c.mapDma({ flags: RW, vaddr: va, iova: 2n * MiB, size: 2n * MiB }), 'ENOMEM');
  c.mapDma({ flags: RW, vaddr: va, iova: 2n * MiB, size: 1n * MiB });
  assert.equal(p.mm.lockedVm, 768);
});

test('mdev-only container: MAP pins nothing (not even a bad VA faults); the first real domain pins everything', () => {
  const host = new Host();
  const p = host.spawn({ rlimitMemlockBytes: 4n * MiB });
  const c = VfioContainer.open(p);
  const mdev = new VfioGroup({ name: 'mdev', type: 'emulated' });
  c.attachGroup(mdev);
  c.setIommu(TYPE1v2);
  const va = p.mmap({ lengthBytes: 8n * MiB });
  c.mapDma({ flags: RW, vaddr: va, iova: 0n, size: 2n * MiB });
  c.mapDma({ flags: RW, vaddr: va + 2n * MiB, iova: 2n * MiB, size: 3n * MiB });
  c.mapDma({ flags: RW, vaddr: 0x1000n, iova: 1n * GiB, size: PAGE });
  assert.equal(p.mm.lockedVm, 0);
  assert.equal(c.type1!.domainCount, 0);
  const vf = new VfioGroup({ name: 'vf' });
  // Replay in IOVA order: 2 + 3 MiB against a 4 MiB limit fails ENOMEM before the bad VA is reached;
  // nothing is left pinned (the first mapping's pins are undone), the group is not attached.
  throwsErrno(() => c.attachGroup(vf), 'ENOMEM');
  assert.equal(vf.container, undefined);
  assert.equal(p.mm.lockedVm, 0);
  assert.ok(c.type1!.dmas().every((d) => !d.iommuMapped));
  c.unmapDma({ flags: 0, iova: 2n * MiB, size: 3n * MiB });
  // Now the unmapped VA faults.
  throwsErrno(() => c.attachGroup(vf), 'EFAULT');
  assert.equal(p.mm.lockedVm, 0);
  c.unmapDma({ flags: 0, iova: 1n * GiB, size: PAGE });
  c.attachGroup(vf);
  assert.equal(p.mm.lockedVm, 512);
  assert.equal(c.type1!.domainCount, 1);
  // A second group of the same IOMMU joins the domain: no new pins.
  c.attachGroup(new VfioGroup({ name: 'vf2' }));
  // A group of another IOMMU gets a new domain, filled from the pinned pages: no new charge.
  c.attachGroup(new VfioGroup({ name: 'vf3', iommuOps: 'other' }));
  assert.equal(c.type1!.domainCount, 2);
  assert.equal(p.mm.lockedVm, 512);
});

test('replay pins from the attaching process and charges the mapping mm', () => {
  const host = new Host();
  const p = host.spawn({ rlimitMemlockBytes: 64n * MiB });
  const c = VfioContainer.open(p);
  c.attachGroup(new VfioGroup({ name: 'mdev', type: 'emulated' }));
  c.setIommu(TYPE1v2);
  const va = p.mmap({ lengthBytes: 1n * MiB });
  c.mapDma({ flags: RW, vaddr: va, iova: 0n, size: 1n * MiB });
  // Another process (sharing the fd) attaches: its address space has nothing at that VA.
  const q = host.spawn({ rlimitMemlockBytes: 64n * MiB });
  throwsErrno(() => c.as(q).attachGroup(new VfioGroup({ name: 'vf' })), 'EFAULT');
  c.attachGroup(new VfioGroup({ name: 'vf' }));
  assert.equal(p.mm.lockedVm, 256);
  assert.equal(q.mm.lockedVm, 0);
});

test('the last domain leaving: all mappings go, or with mdevs left only their pins stay charged', () => {
  const { c, p, group } = type1();
  const mdev = new VfioGroup({ name: 'mdev', type: 'emulated' });
  c.attachGroup(mdev);
  const va = p.mmap({ lengthBytes: 1n * MiB });
  c.mapDma({ flags: RW, vaddr: va, iova: 0n, size: 1n * MiB });
  assert.equal(p.mm.lockedVm, 256);
  const dev = c.openDevice(mdev, {
    name: 'mdev0',
    dmaUnmap: (iova, len) => dev.unpinPages(iova, Number(len / PAGE)),
  });
  dev.pinPages(0n, 3, RW);
  assert.equal(p.mm.lockedVm, 256, 'pins under a domain are already charged');
  c.detachGroup(group);
  assert.equal(c.type1!.domainCount, 0);
  assert.equal(c.type1!.dmaCount, 1, 'the mdev keeps the container and its mappings');
  assert.equal(p.mm.lockedVm, 3, 're-accounted: only the mdev pins');
  assert.deepEqual(c.type1!.dmas()[0], { ...c.type1!.dmas()[0]!, iommuMapped: false, lockedVm: 3 });
  // The domain comes back: replay charges the pages not pinned by the mdev.
  c.attachGroup(group);
  assert.equal(p.mm.lockedVm, 256);
  dev.unpinPages(0n, 3);
  assert.equal(p.mm.lockedVm, 256);
  dev.close();
  c.detachGroup(mdev);
  c.detachGroup(group);
  assert.equal(c.type1, undefined);
  assert.equal(p.mm.lockedVm, 0);
});

test('the last mdev group leaving a container without domain drops every mapping', () => {
  const host = new Host();
  const p = host.spawn();
  const c = VfioContainer.open(p);
  const a = new VfioGroup({ name: 'a', type: 'emulated' });
  const b = new VfioGroup({ name: 'b', type: 'emulated' });
  c.attachGroup(a);
  c.attachGroup(b);
  c.setIommu(TYPE1v2);
  c.mapDma({ flags: RW, vaddr: 0x10000n, iova: 0n, size: PAGE });
  throwsErrno(() => c.attachGroup(a), 'EINVAL');
  c.detachGroup(a);
  assert.equal(c.type1!.dmaCount, 1);
  // The driver drops everything when its last emulated group leaves (before the container
  // releases it, having no group left).
  const iommu = c.type1!;
  iommu.detachGroup(b);
  assert.equal(iommu.dmaCount, 0);
  assert.equal(iommu.dmaAvail, 65535);
});
