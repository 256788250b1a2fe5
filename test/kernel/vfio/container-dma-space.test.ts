import assert from 'node:assert/strict';
import { test } from 'node:test';
import { Host } from '../../../src/kernel/host/index.js';
import { VfioContainer, VfioGroup } from '../../../src/kernel/vfio/container.js';
import { ContainerDmaSpace } from '../../../src/kernel/vfio/container-dma-space.js';
import { DmaFault, DmaPort } from '../../../src/kernel/vfio/dma-port.js';
import { MiB, PAGE, READ, RW, type1, TYPE1v2, WRITE } from './container-helpers.js';

const fault = (iova: bigint, access: 'read' | 'write') => (e: unknown) =>
  e instanceof DmaFault && e.iova === iova && e.access === access;

test('device DMA: IOVA -> vfio_dma -> the process bytes, across mappings and regions', () => {
  const { c, p, group } = type1();
  const a = p.mmap({ lengthBytes: 2n * PAGE });
  const b = p.mmap({ lengthBytes: 2n * PAGE });
  c.mapDma({ flags: RW, vaddr: a, iova: 0x10000n, size: 2n * PAGE });
  c.mapDma({ flags: RW, vaddr: b, iova: 0x12000n, size: 2n * PAGE });
  const port = new DmaPort(c.openDevice(group, { name: 'vf0' }).dmaSpace());
  const data = Uint8Array.from({ length: 32 }, (_, i) => 100 + i);
  port.write(0x12000n - 16n, data);
  const got = new Uint8Array(16);
  p.read(a + 2n * PAGE - 16n, got);
  assert.deepEqual(got, data.subarray(0, 16));
  p.read(b, got);
  assert.deepEqual(got, data.subarray(16));
  p.write(b + 100n, Uint8Array.of(42));
  const back = new Uint8Array(1);
  port.read(0x12000n + 100n, back);
  assert.equal(back[0], 42);
  // One mapping over two back-to-back regions.
  const lo = p.mmap({ lengthBytes: PAGE, at: 0x5000_0000n });
  p.mmap({ lengthBytes: PAGE, at: 0x5000_1000n });
  c.mapDma({ flags: RW, vaddr: lo, iova: 0x40000n, size: 2n * PAGE });
  port.write(0x41000n - 2n, Uint8Array.of(1, 2, 3, 4));
  const span = new Uint8Array(4);
  p.read(0x5000_0ffen, span);
  assert.deepEqual([...span], [1, 2, 3, 4]);
});

test('DmaFault: unmapped IOVA, a write to a read-only mapping, a read of a write-only one', () => {
  const { c, p, group } = type1();
  const va = p.mmap({ lengthBytes: 4n * PAGE });
  c.mapDma({ flags: READ, vaddr: va, iova: 0n, size: PAGE });
  c.mapDma({ flags: WRITE, vaddr: va + PAGE, iova: PAGE, size: PAGE });
  const space = c.openDevice(group, { name: 'vf0' }).dmaSpace();
  space.read(0n, new Uint8Array(8));
  assert.throws(() => space.write(8n, Uint8Array.of(1)), fault(8n, 'write'));
  space.write(PAGE, Uint8Array.of(1));
  assert.throws(() => space.read(PAGE, new Uint8Array(1)), fault(PAGE, 'read'));
  assert.throws(() => space.read(2n * PAGE, new Uint8Array(1)), fault(2n * PAGE, 'read'));
  assert.throws(() => space.read(PAGE - 1n, new Uint8Array(2)), fault(PAGE, 'read'));
  c.unmapDma({ flags: 0, iova: 0n, size: PAGE });
  assert.throws(() => space.read(0n, new Uint8Array(1)), fault(0n, 'read'));
});

test('DmaFault without an IOMMU domain: mdev groups, unpinned mappings, a released container', () => {
  const host = new Host();
  const p = host.spawn({ rlimitMemlockBytes: 64n * MiB });
  const c = VfioContainer.open(p);
  const mdev = new VfioGroup({ name: 'mdev', type: 'emulated' });
  c.attachGroup(mdev);
  c.setIommu(TYPE1v2);
  const va = p.mmap({ lengthBytes: PAGE });
  c.mapDma({ flags: RW, vaddr: va, iova: 0n, size: PAGE });
  assert.throws(() => new ContainerDmaSpace(c, mdev).read(0n, new Uint8Array(1)), fault(0n, 'read'));
  const vf = new VfioGroup({ name: 'vf' });
  const early = new ContainerDmaSpace(c, vf);
  assert.throws(() => early.read(0n, new Uint8Array(1)), fault(0n, 'read'));
  c.attachGroup(vf);
  early.write(0n, Uint8Array.of(5));
  c.detachGroup(vf);
  assert.throws(() => early.read(0n, new Uint8Array(1)), fault(0n, 'read'));
});

test('DMA lands in the pages pinned at map time, whatever the process does to its mappings later', () => {
  const { c, p, group } = type1();
  const va = p.mmap({ lengthBytes: PAGE });
  c.mapDma({ flags: RW, vaddr: va, iova: 0n, size: PAGE });
  const space = c.openDevice(group, { name: 'vf0' }).dmaSpace();
  const old = p.mm.regions[0]!.store;
  p.munmap(va, PAGE);
  p.mmap({ lengthBytes: PAGE, at: va }); // new memory at the same VA
  space.write(0n, Uint8Array.of(9));
  const seen = new Uint8Array(1);
  p.read(va, seen);
  assert.equal(seen[0], 0, 'the new memory is not what the IOMMU maps');
  old.read(0, seen);
  assert.equal(seen[0], 9, 'the pinned page got the write');
});

test('a DMA write that faults part-way moves no byte (read-only mapping or hole after a writable one)', () => {
  const { c, p, group } = type1();
  const va = p.mmap({ lengthBytes: 4n * PAGE });
  c.mapDma({ flags: RW, vaddr: va, iova: 0x10000n, size: PAGE });
  c.mapDma({ flags: READ, vaddr: va + PAGE, iova: 0x11000n, size: PAGE });
  c.mapDma({ flags: RW, vaddr: va + 2n * PAGE, iova: 0x20000n, size: PAGE });
  const space = c.openDevice(group, { name: 'vf0' }).dmaSpace();
  const data = new Uint8Array(64).fill(0xee);
  assert.throws(() => space.write(0x11000n - 32n, data), fault(0x11000n, 'write'));
  assert.throws(() => space.write(0x21000n - 32n, data), fault(0x21000n, 'write'));
  const mem = new Uint8Array(Number(4n * PAGE));
  p.read(va, mem);
  assert.ok(
    mem.every((b) => b === 0),
    'guest memory untouched',
  );
  space.write(0x10000n, data);
  p.read(va, mem);
  assert.equal(mem[63], 0xee);
});
