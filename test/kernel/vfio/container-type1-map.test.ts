import assert from 'node:assert/strict';
import { test } from 'node:test';
import { VfioContainer, VfioGroup } from '../../../src/kernel/vfio/container.js';
import {
  ALL,
  DIRTY,
  dmaAvail,
  KiB,
  MAP_VADDR,
  MiB,
  PAGE,
  READ,
  RW,
  throwsErrno,
  type1,
  TYPE1v2,
  U64_MAX,
  UNMAP_VADDR,
  WRITE,
} from './container-helpers.js';

const iovas = (c: VfioContainer) => c.type1!.dmas().map((d) => [d.iova, d.size]);

test('MAP_DMA argument checks: flags, R/W vs VADDR, alignment, wrap, u64', () => {
  const { c, p } = type1();
  const va = p.mmap({ lengthBytes: 1n * MiB });
  const map = (a: Partial<{ flags: number; vaddr: bigint; iova: bigint; size: bigint }>) =>
    c.mapDma({ flags: RW, vaddr: va, iova: 0x100000n, size: PAGE, ...a });
  throwsErrno(() => map({ flags: RW | 8 }), 'EINVAL');
  throwsErrno(() => map({ flags: 0 }), 'EINVAL');
  throwsErrno(() => map({ flags: READ | MAP_VADDR }), 'EINVAL');
  throwsErrno(() => map({ flags: WRITE | MAP_VADDR }), 'EINVAL');
  throwsErrno(() => map({ size: 0n }), 'EINVAL');
  throwsErrno(() => map({ size: PAGE + 1n }), 'EINVAL');
  throwsErrno(() => map({ iova: 0x100200n }), 'EINVAL');
  throwsErrno(() => map({ vaddr: va + 8n }), 'EINVAL');
  throwsErrno(() => map({ iova: U64_MAX - PAGE + 1n, size: 2n * PAGE }), 'EINVAL');
  throwsErrno(() => map({ vaddr: U64_MAX - PAGE + 1n, size: 2n * PAGE }), 'EINVAL');
  throwsErrno(() => map({ iova: -PAGE }), 'EINVAL');
  throwsErrno(() => map({ size: 1n << 64n }), 'EINVAL');
  assert.equal(c.type1!.dmaCount, 0);
  assert.equal(dmaAvail(c), 65535);
  // The last page of the IOVA space is fine.
  map({ iova: U64_MAX - PAGE + 1n });
  assert.deepEqual(iovas(c), [[U64_MAX - PAGE + 1n, PAGE]]);
});

test('MAP_DMA: overlap EEXIST (never replaces), outside the valid IOVA ranges EINVAL', () => {
  const { c, p } = type1({
    group: {
      aperture: { start: 0n, end: (1n << 39n) - 1n },
      reservedIovaRanges: [{ start: 0xfee00000n, last: 0xfeefffffn }],
    },
  });
  const va = p.mmap({ lengthBytes: 1n * MiB });
  c.mapDma({ flags: RW, vaddr: va, iova: 0x10000n, size: 64n * KiB });
  for (const [iova, size] of [
    [0x10000n, PAGE],
    [0x1f000n, 2n * PAGE],
    [0xf000n, 2n * PAGE],
    [0x8000n, 256n * KiB],
  ] as const) {
    throwsErrno(() => c.mapDma({ flags: RW, vaddr: va, iova, size }), 'EEXIST');
  }
  throwsErrno(() => c.mapDma({ flags: RW, vaddr: va, iova: 0xfee00000n, size: PAGE }), 'EINVAL');
  throwsErrno(() => c.mapDma({ flags: RW, vaddr: va, iova: 0xfedff000n, size: 2n * PAGE }), 'EINVAL');
  throwsErrno(() => c.mapDma({ flags: RW, vaddr: va, iova: 1n << 39n, size: PAGE }), 'EINVAL');
  c.mapDma({ flags: RW, vaddr: va, iova: 0xfef00000n, size: PAGE });
  assert.deepEqual(iovas(c), [
    [0x10000n, 64n * KiB],
    [0xfef00000n, PAGE],
  ]);
  assert.equal(dmaAvail(c), 65533);
});

test('MAP_DMA with a domain pins at once: EFAULT for an unmapped VA or a writable map of read-only memory, map undone', () => {
  const { c, p } = type1();
  throwsErrno(() => c.mapDma({ flags: RW, vaddr: 0x1000n, iova: 0n, size: PAGE }), 'EFAULT');
  const va = p.mmap({ lengthBytes: 2n * PAGE });
  throwsErrno(() => c.mapDma({ flags: RW, vaddr: va, iova: 0n, size: 3n * PAGE }), 'EFAULT');
  const ro = p.mmap({ lengthBytes: PAGE, writable: false });
  throwsErrno(() => c.mapDma({ flags: RW, vaddr: ro, iova: 0n, size: PAGE }), 'EFAULT');
  throwsErrno(() => c.mapDma({ flags: WRITE, vaddr: ro, iova: 0n, size: PAGE }), 'EFAULT');
  assert.equal(c.type1!.dmaCount, 0);
  assert.equal(dmaAvail(c), 65535);
  assert.equal(p.mm.lockedVm, 0);
  c.mapDma({ flags: READ, vaddr: ro, iova: 0n, size: PAGE });
  assert.equal(p.mm.lockedVm, 1);
});

test('UNMAP_DMA argument checks', () => {
  const { c } = type1();
  const un = (a: Partial<{ flags: number; iova: bigint; size: bigint }>) =>
    c.unmapDma({ flags: 0, iova: 0n, size: PAGE, ...a });
  throwsErrno(() => un({ flags: 8 }), 'EINVAL');
  throwsErrno(() => un({ flags: DIRTY | ALL, size: 0n }), 'EINVAL');
  throwsErrno(() => un({ flags: DIRTY | UNMAP_VADDR }), 'EINVAL');
  // Dirty page tracking (VFIO_IOMMU_DIRTY_PAGES) is never started here: GET_DIRTY_BITMAP is EINVAL.
  throwsErrno(() => un({ flags: DIRTY }), 'EINVAL');
  throwsErrno(() => un({ iova: 0x800n }), 'EINVAL');
  throwsErrno(() => un({ size: 0n }), 'EINVAL');
  throwsErrno(() => un({ size: PAGE + 512n }), 'EINVAL');
  throwsErrno(() => un({ iova: U64_MAX - PAGE + 1n, size: 2n * PAGE }), 'EINVAL');
  throwsErrno(() => un({ flags: ALL, iova: PAGE, size: 0n }), 'EINVAL');
  throwsErrno(() => un({ flags: ALL, iova: 0n, size: PAGE }), 'EINVAL');
  throwsErrno(() => un({ size: -PAGE }), 'EINVAL');
  assert.deepEqual(un({ flags: ALL, size: 0n }), { size: 0n });
});

function threeMappings(v1: boolean) {
  const t = type1({ v1 });
  const va = t.p.mmap({ lengthBytes: 1n * MiB });
  // A: [0x10000, 0x14000)  B: [0x14000, 0x18000)  C: [0x20000, 0x30000)
  t.c.mapDma({ flags: RW, vaddr: va, iova: 0x10000n, size: 4n * PAGE });
  t.c.mapDma({ flags: RW, vaddr: va, iova: 0x14000n, size: 4n * PAGE });
  t.c.mapDma({ flags: RW, vaddr: va, iova: 0x20000n, size: 16n * PAGE });
  return t;
}

test('UNMAP_DMA v2: a range bisecting a mapping is EINVAL, nothing in range is size 0, whole mappings plus gaps', () => {
  const { c, p } = threeMappings(false);
  throwsErrno(() => c.unmapDma({ flags: 0, iova: 0x11000n, size: PAGE }), 'EINVAL');
  throwsErrno(() => c.unmapDma({ flags: 0, iova: 0x10000n, size: PAGE }), 'EINVAL');
  throwsErrno(() => c.unmapDma({ flags: 0, iova: 0x12000n, size: 0x10000n }), 'EINVAL');
  throwsErrno(() => c.unmapDma({ flags: 0, iova: 0x8000n, size: 0x19000n }), 'EINVAL');
  assert.equal(c.type1!.dmaCount, 3);
  assert.deepEqual(c.unmapDma({ flags: 0, iova: 0x40000n, size: 0x10000n }), { size: 0n });
  assert.deepEqual(c.unmapDma({ flags: 0, iova: 0x18000n, size: 0x8000n }), { size: 0n });
  const args = { flags: 0, iova: 0x0n, size: 0x18000n };
  assert.deepEqual(c.unmapDma(args), { size: 0x8000n });
  assert.equal(args.size, 0x8000n, 'size written back');
  assert.deepEqual(iovas(c), [[0x20000n, 0x10000n]]);
  assert.equal(p.mm.lockedVm, 16);
  assert.deepEqual(c.unmapDma({ flags: ALL, iova: 0n, size: 0n }), { size: 0x10000n });
  assert.equal(p.mm.lockedVm, 0);
  assert.equal(dmaAvail(c), 65535);
});

test('UNMAP_DMA v1 (TYPE1): starting inside a mapping is ok with size 0; covering its first byte unmaps all of it', () => {
  const { c, p } = threeMappings(true);
  // Starts inside A: nothing at all is unmapped, not even B which the range covers whole.
  assert.deepEqual(c.unmapDma({ flags: 0, iova: 0x11000n, size: 0x10000n }), { size: 0n });
  assert.equal(c.type1!.dmaCount, 3);
  // Covers only A's first page: all of A goes, and the reported size says so.
  assert.deepEqual(c.unmapDma({ flags: 0, iova: 0x10000n, size: PAGE }), { size: 4n * PAGE });
  // Covers B whole and C's first page: both go whole.
  assert.deepEqual(c.unmapDma({ flags: 0, iova: 0x14000n, size: 0xd000n }), { size: 0x14000n });
  assert.equal(c.type1!.dmaCount, 0);
  assert.equal(p.mm.lockedVm, 0);
});

test('dma_entry_limit: DMA_AVAIL counts down and up, ENOSPC at 0; the limit is read at VFIO_SET_IOMMU', () => {
  const { host, c, p, group } = type1({ host: { modules: { vfioIommuType1: { dmaEntryLimit: 3 } } } });
  const va = p.mmap({ lengthBytes: 1n * MiB });
  assert.equal(dmaAvail(c), 3);
  for (let i = 0n; i < 3n; i++) {
    c.mapDma({ flags: RW, vaddr: va, iova: i * PAGE, size: PAGE });
    assert.equal(dmaAvail(c), Number(2n - i));
  }
  throwsErrno(() => c.mapDma({ flags: RW, vaddr: va, iova: 0x100000n, size: PAGE }), 'ENOSPC');
  // EEXIST is checked before ENOSPC, ENOSPC before the IOVA range check.
  throwsErrno(() => c.mapDma({ flags: RW, vaddr: va, iova: 0n, size: PAGE }), 'EEXIST');
  c.unmapDma({ flags: 0, iova: PAGE, size: PAGE });
  assert.equal(dmaAvail(c), 1);
  c.mapDma({ flags: RW, vaddr: va, iova: 0x100000n, size: PAGE });
  assert.equal(dmaAvail(c), 0);
  // Raising the module parameter does not touch an existing container ...
  host.modules.vfioIommuType1.dmaEntryLimit = 10;
  assert.equal(dmaAvail(c), 0);
  // ... but a container whose IOMMU is set afterwards gets it.
  c.unmapDma({ flags: ALL, iova: 0n, size: 0n });
  c.openDevice(group, { name: 'x' }).close();
  c.detachGroup(group);
  c.attachGroup(group);
  c.setIommu(TYPE1v2);
  assert.equal(dmaAvail(c), 10);
  // Limit 0: no mapping at all.
  host.modules.vfioIommuType1.dmaEntryLimit = 0;
  const c2 = VfioContainer.open(p);
  c2.attachGroup(new VfioGroup({ name: 'g2' }));
  c2.setIommu(TYPE1v2);
  throwsErrno(() => c2.mapDma({ flags: RW, vaddr: va, iova: 0n, size: PAGE }), 'ENOSPC');
});

test('the type1 tree: adjacent mappings stay separate, lookups at every boundary', () => {
  const { c, p } = type1();
  const va = p.mmap({ lengthBytes: 4n * MiB });
  for (let i = 0n; i < 64n; i++)
    c.mapDma({ flags: RW, vaddr: va + i * PAGE, iova: 0x100000n + i * PAGE, size: PAGE });
  assert.equal(c.type1!.dmaCount, 64);
  throwsErrno(() => c.mapDma({ flags: RW, vaddr: va, iova: 0x100000n + 63n * PAGE, size: PAGE }), 'EEXIST');
  throwsErrno(() => c.mapDma({ flags: RW, vaddr: va, iova: 0xff000n, size: 2n * PAGE }), 'EEXIST');
  c.mapDma({ flags: RW, vaddr: va, iova: 0xff000n, size: PAGE });
  assert.deepEqual(c.unmapDma({ flags: 0, iova: 0x100000n + 10n * PAGE, size: 20n * PAGE }), {
    size: 20n * PAGE,
  });
  assert.equal(c.type1!.dmaCount, 45);
  // Single-page mappings are never bisected: any page-aligned range goes, gaps included.
  assert.deepEqual(c.unmapDma({ flags: 0, iova: 0xff000n, size: 0xc000n }), { size: 11n * PAGE });
  assert.deepEqual(c.unmapDma({ flags: 0, iova: 0n, size: 1n << 40n }), { size: 34n * PAGE });
});
