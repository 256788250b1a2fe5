import assert from 'node:assert/strict';
import { test } from 'node:test';
import { Host } from '../../../src/kernel/host/index.js';
import { IommuProt } from '../../../src/kernel/vfio/container-api.js';
import { VfioContainer, VfioGroup } from '../../../src/kernel/vfio/container.js';
import { VfioError } from '../../../src/uapi/error.js';
import {
  MiB,
  PAGE,
  pinningDevice,
  READ,
  RW,
  throwsErrno,
  TYPE1,
  TYPE1v2,
  WRITE,
} from './container-helpers.js';

/** A VMM with an mdev-only container (no IOMMU domain) and an open mdev that unpins on request. */
function mdevOnly(opts: { rlimitMemlockBytes?: bigint; v1?: boolean } = {}) {
  const host = new Host();
  const p = host.spawn({ rlimitMemlockBytes: opts.rlimitMemlockBytes ?? 64n * MiB });
  const c = VfioContainer.open(p);
  const group = new VfioGroup({ name: 'mdev', type: 'emulated' });
  c.attachGroup(group);
  c.setIommu(opts.v1 ? TYPE1 : TYPE1v2);
  const { dev, pin, unpin, unmapCalls } = pinningDevice(c, group);
  return { host, p, c, group, dev, pin, unpin, unmapCalls };
}

test('vfio_pin_pages without a domain: charged per page, never twice for the same page of a dma', () => {
  const { c, p, pin, unpin } = mdevOnly();
  const va = p.mmap({ lengthBytes: 1n * MiB });
  c.mapDma({ flags: RW, vaddr: va, iova: 0x100000n, size: 1n * MiB });
  assert.equal(p.mm.lockedVm, 0);
  const pages = pin(0x100000n, 4, RW);
  assert.equal(pages.length, 4);
  assert.equal(p.mm.lockedVm, 4);
  pin(0x101000n, 2, IommuProt.READ);
  assert.equal(p.mm.lockedVm, 4, 'already pinned pages are not charged again');
  unpin(0x101000n, 2);
  assert.equal(p.mm.lockedVm, 4, 'still pinned once');
  unpin(0x100000n, 4);
  assert.equal(p.mm.lockedVm, 0);
  unpin(0x100000n, 4); // nothing pinned: no-op
  assert.equal(p.mm.lockedVm, 0);
  // The same memory behind a second mapping is a second charge.
  c.mapDma({ flags: RW, vaddr: va, iova: 0x400000n, size: 1n * MiB });
  pin(0x100000n, 1, RW);
  pin(0x400000n, 1, RW);
  assert.equal(p.mm.lockedVm, 2);
  c.unmapDma({ flags: 2, iova: 0n, size: 0n });
  assert.equal(p.mm.lockedVm, 0);
});

test('pinned pages reach the memory the mapping had when pinned', () => {
  const { c, p, dev } = mdevOnly();
  const va = p.mmap({ lengthBytes: 64n * 1024n });
  c.mapDma({ flags: RW, vaddr: va, iova: 0n, size: 64n * 1024n });
  const [page] = dev.pinPages(PAGE, 1, RW);
  page!.write(10, Uint8Array.of(1, 2, 3));
  const got = new Uint8Array(3);
  p.read(va + PAGE + 10n, got);
  assert.deepEqual([...got], [1, 2, 3]);
  p.write(va + PAGE, Uint8Array.of(9));
  const back = new Uint8Array(1);
  page!.read(0, back);
  assert.equal(back[0], 9);
  throwsErrno(() => page!.read(4095, new Uint8Array(2)), 'EINVAL');
});

test('vfio_pin_pages errnos: EINVAL, E2BIG, EPERM, EFAULT, ENOMEM (call undone), ENODEV, EACCES on v1', () => {
  const { c, p, dev, group } = mdevOnly({ rlimitMemlockBytes: 3n * PAGE });
  const va = p.mmap({ lengthBytes: 1n * MiB });
  c.mapDma({ flags: READ, vaddr: va, iova: 0n, size: 8n * PAGE });
  c.mapDma({ flags: RW, vaddr: 0x1000n, iova: 0x100000n, size: PAGE }); // no memory behind it
  throwsErrno(() => dev.pinPages(0n, 0, READ), 'EINVAL');
  throwsErrno(() => dev.pinPages(0n, 513, READ), 'E2BIG');
  throwsErrno(() => dev.pinPages(0x800n, 1, READ), 'EINVAL');
  throwsErrno(() => dev.pinPages(0x200000n, 1, READ), 'EINVAL');
  throwsErrno(() => dev.pinPages(7n * PAGE, 2, READ), 'EINVAL'); // second page unmapped
  throwsErrno(() => dev.pinPages(0n, 1, WRITE), 'EPERM');
  throwsErrno(() => dev.pinPages(0x100000n, 1, READ), 'EFAULT');
  throwsErrno(() => dev.pinPages(0n, 4, READ), 'ENOMEM');
  assert.equal(p.mm.lockedVm, 0, 'the three pages pinned before the failure were released');
  dev.pinPages(0n, 3, READ);
  const plain = c.openDevice(group, { name: 'no-dma-unmap' });
  throwsErrno(() => plain.pinPages(0n, 1, READ), 'EINVAL');
  plain.unpinPages(0n, 1); // WARN in the kernel, no effect
  assert.equal(p.mm.lockedVm, 3);
  plain.close();
  dev.unpinPages(0n, 3);
  dev.close();
  throwsErrno(() => dev.pinPages(0n, 1, READ), 'EINVAL');
  // The owner's mm gone: ENODEV.
  const other = mdevOnly();
  const q = other.host.spawn();
  const qva = q.mmap({ lengthBytes: PAGE });
  other.c.as(q).mapDma({ flags: RW, vaddr: qva, iova: 0n, size: PAGE });
  q.exit();
  throwsErrno(() => other.dev.pinPages(0n, 1, READ), 'ENODEV');
  // TYPE1 (v1) containers cannot pin.
  const v1 = mdevOnly({ v1: true });
  v1.c.mapDma({ flags: RW, vaddr: v1.p.mmap({ lengthBytes: PAGE }), iova: 0n, size: PAGE });
  throwsErrno(() => v1.dev.pinPages(0n, 1, READ), 'EACCES');
  v1.dev.unpinPages(0n, 1);
});

test('unmapping pinned pages asks the mdev to unpin first (dma_unmap), then unmaps', () => {
  const { c, p, pin, unmapCalls } = mdevOnly();
  const va = p.mmap({ lengthBytes: 1n * MiB });
  c.mapDma({ flags: RW, vaddr: va, iova: 0n, size: 16n * PAGE });
  c.mapDma({ flags: RW, vaddr: va, iova: 0x100000n, size: 16n * PAGE });
  pin(2n * PAGE, 2, RW);
  pin(2n * PAGE, 1, RW);
  pin(0x100000n, 1, RW);
  assert.equal(p.mm.lockedVm, 3);
  assert.deepEqual(c.unmapDma({ flags: 2, iova: 0n, size: 0n }), { size: 32n * PAGE });
  assert.deepEqual(unmapCalls, [
    [0n, 16n * PAGE],
    [0x100000n, 16n * PAGE],
  ]);
  assert.equal(p.mm.lockedVm, 0);
});

test('an mdev that never unpins: type1 gives up after its retries (BUG_ON in the kernel)', () => {
  const host = new Host();
  const p = host.spawn();
  const c = VfioContainer.open(p);
  const group = new VfioGroup({ name: 'mdev', type: 'emulated' });
  c.attachGroup(group);
  c.setIommu(TYPE1v2);
  let calls = 0;
  const dev = c.openDevice(group, { name: 'stubborn', dmaUnmap: () => calls++ });
  c.mapDma({ flags: RW, vaddr: p.mmap({ lengthBytes: PAGE }), iova: 0n, size: PAGE });
  dev.pinPages(0n, 1, RW);
  assert.throws(
    () => c.unmapDma({ flags: 0, iova: 0n, size: PAGE }),
    (e: unknown) => e instanceof VfioError && e.code === 'ERR_INTERNAL',
  );
  assert.equal(calls, 11);
});

test('vfio_dma_rw: through the mapping process memory; EINVAL, EPERM, EFAULT', () => {
  const { c, p, dev } = mdevOnly();
  const a = p.mmap({ lengthBytes: 2n * PAGE });
  const b = p.mmap({ lengthBytes: 2n * PAGE });
  c.mapDma({ flags: RW, vaddr: a, iova: 0n, size: 2n * PAGE });
  c.mapDma({ flags: RW, vaddr: b, iova: 2n * PAGE, size: 2n * PAGE });
  const data = Uint8Array.from({ length: 16 }, (_, i) => i + 1);
  dev.dmaRw(2n * PAGE - 8n, data, true); // spans both mappings
  const got = new Uint8Array(8);
  p.read(b, got);
  assert.deepEqual([...got], [9, 10, 11, 12, 13, 14, 15, 16]);
  const back = new Uint8Array(16);
  dev.dmaRw(2n * PAGE - 8n, back, false);
  assert.deepEqual(back, data);
  throwsErrno(() => dev.dmaRw(0n, new Uint8Array(0), false), 'EINVAL');
  throwsErrno(() => dev.dmaRw(0x100000n, new Uint8Array(1), false), 'EINVAL');
  throwsErrno(() => dev.dmaRw(4n * PAGE - 1n, new Uint8Array(2), false), 'EINVAL');
  const ro = p.mmap({ lengthBytes: PAGE, writable: false });
  c.mapDma({ flags: READ, vaddr: ro, iova: 0x10000n, size: PAGE });
  throwsErrno(() => dev.dmaRw(0x10000n, new Uint8Array(1), true), 'EPERM');
  dev.dmaRw(0x10000n, new Uint8Array(1), false);
  // A device-write-only mapping cannot even be written by vfio_dma_rw: it needs READ too.
  c.mapDma({ flags: WRITE, vaddr: a, iova: 0x20000n, size: PAGE });
  throwsErrno(() => dev.dmaRw(0x20000n, new Uint8Array(1), true), 'EPERM');
  // A read-only VA behind a writable mapping: the copy faults.
  c.mapDma({ flags: RW, vaddr: ro, iova: 0x30000n, size: PAGE });
  throwsErrno(() => dev.dmaRw(0x30000n, new Uint8Array(1), true), 'EFAULT');
  p.munmap(b, 2n * PAGE);
  throwsErrno(() => dev.dmaRw(2n * PAGE, new Uint8Array(1), false), 'EFAULT');
  p.exit();
  throwsErrno(() => dev.dmaRw(0n, new Uint8Array(1), false), 'EPERM');
});

test('pins with a domain are not charged: the domain pinned and charged every page already', () => {
  const host = new Host();
  const p = host.spawn({ rlimitMemlockBytes: 1n * MiB });
  const c = VfioContainer.open(p);
  const vf = new VfioGroup({ name: 'vf' });
  c.attachGroup(vf);
  c.setIommu(TYPE1v2);
  const dev = c.openDevice(vf, {
    name: 'pinner',
    dmaUnmap: (iova, len) => dev.unpinPages(iova, Number(len / PAGE)),
  });
  const va = p.mmap({ lengthBytes: 1n * MiB });
  c.mapDma({ flags: RW, vaddr: va, iova: 0n, size: 1n * MiB });
  assert.equal(p.mm.lockedVm, 256);
  dev.pinPages(0n, 16, RW);
  assert.equal(p.mm.lockedVm, 256);
  dev.unpinPages(0n, 16);
  assert.equal(p.mm.lockedVm, 256);
  // vfio_dma_rw also works on devices of IOMMU groups.
  dev.dmaRw(0n, Uint8Array.of(7), true);
});
