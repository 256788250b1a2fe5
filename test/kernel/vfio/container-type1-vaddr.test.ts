import assert from 'node:assert/strict';
import { test } from 'node:test';
import { VfioGroup } from '../../../src/kernel/vfio/container.js';
import {
  ALL,
  MAP_VADDR,
  MiB,
  PAGE,
  pinningDevice,
  READ,
  RW,
  throwsErrno,
  type1,
  UNMAP_VADDR,
  UPDATE_VADDR,
} from './container-helpers.js';

function mapped() {
  const t = type1();
  const va = t.p.mmap({ lengthBytes: 4n * MiB });
  t.c.mapDma({ flags: RW, vaddr: va, iova: 0n, size: 1n * MiB });
  t.c.mapDma({ flags: RW, vaddr: va + 1n * MiB, iova: 1n * MiB, size: 1n * MiB });
  t.c.mapDma({ flags: READ, vaddr: va + 2n * MiB, iova: 4n * MiB, size: 2n * MiB });
  return { ...t, va };
}

const invalid = (t: ReturnType<typeof mapped>) => t.c.type1!.dmas().map((d) => d.vaddrInvalid);

test('UNMAP_DMA + VADDR invalidates without unmapping; size = total; an already invalid one is EINVAL, rolled back', () => {
  const t = mapped();
  const { c, p } = t;
  assert.equal(c.checkExtension(UPDATE_VADDR), 1);
  assert.deepEqual(c.unmapDma({ flags: UNMAP_VADDR, iova: 1n * MiB, size: 1n * MiB }), { size: 1n * MiB });
  assert.deepEqual(invalid(t), [false, true, false]);
  assert.equal(c.type1!.vaddrInvalidCount, 1);
  assert.equal(p.mm.lockedVm, 1024, 'nothing unpinned');
  // The range starts with a valid mapping (marked), then meets the invalid one: EINVAL, undone.
  throwsErrno(() => c.unmapDma({ flags: UNMAP_VADDR, iova: 0n, size: 6n * MiB }), 'EINVAL');
  assert.deepEqual(invalid(t), [false, true, false]);
  assert.equal(c.type1!.vaddrInvalidCount, 1);
  // v2 rules still apply: a bisected mapping is EINVAL.
  throwsErrno(() => c.unmapDma({ flags: UNMAP_VADDR, iova: 4n * MiB, size: 1n * MiB }), 'EINVAL');
  assert.deepEqual(c.unmapDma({ flags: UNMAP_VADDR, iova: 4n * MiB, size: 2n * MiB }), { size: 2n * MiB });
  assert.deepEqual(c.unmapDma({ flags: UNMAP_VADDR, iova: 8n * MiB, size: 2n * MiB }), { size: 0n });
  throwsErrno(() => c.unmapDma({ flags: ALL | UNMAP_VADDR, iova: 0n, size: 0n }), 'EINVAL');
  c.unmapDma({ flags: 0, iova: 1n * MiB, size: 1n * MiB });
  c.unmapDma({ flags: 0, iova: 4n * MiB, size: 2n * MiB });
  assert.equal(c.type1!.vaddrInvalidCount, 0, 'unmapping an invalid mapping drops it from the count');
  assert.deepEqual(c.unmapDma({ flags: ALL | UNMAP_VADDR, iova: 0n, size: 0n }), { size: 1n * MiB });
});

test('MAP_DMA + VADDR: R/W flags EINVAL, no mapping ENOENT, a valid or mismatching one EINVAL', () => {
  const t = mapped();
  const { c, va } = t;
  const remap = (a: Partial<{ flags: number; vaddr: bigint; iova: bigint; size: bigint }>) =>
    c.mapDma({ flags: MAP_VADDR, vaddr: va, iova: 0n, size: 1n * MiB, ...a });
  throwsErrno(() => remap({ flags: MAP_VADDR | READ }), 'EINVAL');
  throwsErrno(() => remap({ iova: 16n * MiB }), 'ENOENT');
  throwsErrno(() => remap({}), 'EINVAL'); // valid vaddr
  c.unmapDma({ flags: UNMAP_VADDR, iova: 0n, size: 2n * MiB });
  throwsErrno(() => remap({ size: 2n * MiB }), 'EINVAL'); // covers two mappings
  throwsErrno(() => remap({ size: PAGE }), 'EINVAL'); // part of one
  throwsErrno(() => remap({ iova: PAGE, size: 1n * MiB - PAGE }), 'EINVAL');
  throwsErrno(() => remap({ vaddr: va + 8n }), 'EINVAL'); // alignment checks still apply
  remap({ vaddr: va + 3n * MiB });
  assert.deepEqual(invalid(t), [false, true, false]);
  assert.equal(c.type1!.dmas()[0]!.vaddr, va + 3n * MiB);
  assert.equal(c.type1!.vaddrInvalidCount, 1);
  throwsErrno(() => remap({ vaddr: va }), 'EINVAL'); // valid again
});

test('while a vaddr is invalid: group attach EBUSY, pins and vfio_dma_rw EBUSY at once (no wait)', () => {
  const t = mapped();
  const { c, group, va } = t;
  const { dev, pin } = pinningDevice(c, group, 'pinner');
  pin(0n, 1, RW);
  c.unmapDma({ flags: UNMAP_VADDR, iova: 1n * MiB, size: 1n * MiB });
  throwsErrno(() => c.attachGroup(new VfioGroup({ name: 'vf1' })), 'EBUSY');
  throwsErrno(() => c.attachGroup(new VfioGroup({ name: 'mdev', type: 'emulated' })), 'EBUSY');
  // Any pin, even of a page whose vaddr is valid, and any rw: EBUSY, returned, never blocked on.
  throwsErrno(() => dev.pinPages(0n, 1, RW), 'EBUSY');
  throwsErrno(() => dev.dmaRw(0n, new Uint8Array(1), false), 'EBUSY');
  // The device can still be closed (the seed 003 deadlock needs a pin that waits).
  dev.unpinPages(0n, 1);
  dev.close();
  c.mapDma({ flags: MAP_VADDR, vaddr: va + 1n * MiB, iova: 1n * MiB, size: 1n * MiB });
  c.attachGroup(new VfioGroup({ name: 'vf1' }));
});

test('mdevs present: CHECK_EXTENSION(VFIO_UPDATE_VADDR) = 0 and UNMAP_DMA + VADDR is EBUSY', () => {
  const t = mapped();
  const { c } = t;
  const mdev = new VfioGroup({ name: 'mdev', type: 'emulated' });
  c.attachGroup(mdev);
  assert.equal(c.checkExtension(UPDATE_VADDR), 0);
  throwsErrno(() => c.unmapDma({ flags: UNMAP_VADDR, iova: 0n, size: 1n * MiB }), 'EBUSY');
  throwsErrno(() => c.unmapDma({ flags: UNMAP_VADDR | ALL, iova: 0n, size: 0n }), 'EBUSY');
  assert.deepEqual(invalid(t), [false, false, false]);
  c.detachGroup(mdev);
  assert.equal(c.checkExtension(UPDATE_VADDR), 1);
});

test('the charge moves to the mm re-supplying the vaddr; ENOMEM keeps the mapping invalid and the charge put', () => {
  const t = mapped();
  const { c, p, host } = t;
  c.unmapDma({ flags: UNMAP_VADDR | ALL, iova: 0n, size: 0n });
  // A new process (as after fork + exec) with too small a limit.
  const small = host.spawn({ rlimitMemlockBytes: 512n * 1024n });
  const sva = small.mmap({ lengthBytes: 1n * MiB });
  throwsErrno(() => c.as(small).mapDma({ flags: MAP_VADDR, vaddr: sva, iova: 0n, size: 1n * MiB }), 'ENOMEM');
  assert.equal(c.type1!.dmas()[0]!.vaddrInvalid, true);
  assert.equal(p.mm.lockedVm, 1024);
  assert.equal(small.mm.lockedVm, 0);
  const next = host.spawn({ rlimitMemlockBytes: 2n * MiB });
  const nva = next.mmap({ lengthBytes: 4n * MiB });
  c.as(next).mapDma({ flags: MAP_VADDR, vaddr: nva, iova: 0n, size: 1n * MiB });
  assert.equal(p.mm.lockedVm, 768, 'the old mm is released');
  assert.equal(next.mm.lockedVm, 256);
  assert.equal(c.type1!.dmas()[0]!.owner, next);
  // The new owner's limit applies to the next move: 256 + 256 + 512 > 512 pages.
  c.as(next).mapDma({ flags: MAP_VADDR, vaddr: nva + 1n * MiB, iova: 1n * MiB, size: 1n * MiB });
  throwsErrno(
    () => c.as(next).mapDma({ flags: MAP_VADDR, vaddr: nva + 2n * MiB, iova: 4n * MiB, size: 2n * MiB }),
    'ENOMEM',
  );
  // CAP_IPC_LOCK: no limit for the mover.
  const capped = host.spawn({ rlimitMemlockBytes: 0n, caps: ['CAP_IPC_LOCK'] });
  const cva = capped.mmap({ lengthBytes: 2n * MiB });
  c.as(capped).mapDma({ flags: MAP_VADDR, vaddr: cva, iova: 4n * MiB, size: 2n * MiB });
  assert.equal(capped.mm.lockedVm, 512);
  assert.equal(p.mm.lockedVm, 0);
  // The same mm re-supplying: nothing moves.
  c.as(capped).unmapDma({ flags: UNMAP_VADDR, iova: 4n * MiB, size: 2n * MiB });
  c.as(capped).mapDma({ flags: MAP_VADDR, vaddr: cva, iova: 4n * MiB, size: 2n * MiB });
  assert.equal(capped.mm.lockedVm, 512);
  // Unmapping releases the owner's charge.
  c.unmapDma({ flags: ALL, iova: 0n, size: 0n });
  assert.deepEqual([p.mm.lockedVm, next.mm.lockedVm, capped.mm.lockedVm], [0, 0, 0]);
});
