import assert from 'node:assert/strict';
import { test } from 'node:test';
import { Host } from '../../../src/kernel/host/index.js';
import { IommufdVfioCompat } from '../../../src/kernel/iommufd/vfio-compat.js';
import { findInfoCap, type VfioContainerApi } from '../../../src/kernel/vfio/container-api.js';
import { VfioContainer, VfioGroup } from '../../../src/kernel/vfio/container.js';
import { isErrno } from '../../../src/uapi/error.js';
import {
  ALL,
  DIRTY,
  MAP_VADDR,
  MiB,
  PAGE,
  RW,
  TYPE1,
  TYPE1v2,
  U64_MAX,
  UNMAP_VADDR,
  UPDATE_VADDR,
} from './container-helpers.js';

/**
 * The same calls on the real type1 driver and on iommufd's VFIO compat layer, side by side: where
 * userspace written for one sees something else on the other.
 */

type Outcome = string | bigint | number;

function both(type: number) {
  const host = new Host();
  const mk = (kind: 'type1' | 'compat') => {
    const p = host.spawn({ uid: 1000, rlimitMemlockBytes: 64n * MiB });
    let c: VfioContainerApi;
    if (kind === 'type1') {
      const t = VfioContainer.open(p);
      t.attachGroup(new VfioGroup({ name: 'g' }));
      t.setIommu(type);
      c = t;
    } else {
      const k = IommufdVfioCompat.open(p);
      k.attachDevice({ name: 'vf' });
      k.setIommu(type);
      c = k;
    }
    const va = p.mmap({ lengthBytes: 4n * MiB });
    // A: [1 MiB, +64 KiB)  B: [2 MiB, +64 KiB)
    c.mapDma({ flags: RW, vaddr: va, iova: 1n * MiB, size: 0x10000n });
    c.mapDma({ flags: RW, vaddr: va + 1n * MiB, iova: 2n * MiB, size: 0x10000n });
    return { p, c, va };
  };
  return { type1: mk('type1'), compat: mk('compat') };
}

/** An errno name, or what the call returned. */
function outcome(fn: () => Outcome | void): Outcome {
  try {
    return fn() ?? 'ok';
  } catch (e) {
    if (e && typeof e === 'object' && 'errno' in e && typeof e.errno === 'string') return e.errno;
    throw e;
  }
}

interface Case {
  what: string;
  type: number;
  call: (t: { c: VfioContainerApi; va: bigint }) => Outcome | void;
  type1: Outcome;
  compat: Outcome;
}

const cases: Case[] = [
  {
    what: 'CHECK_EXTENSION(VFIO_UPDATE_VADDR)',
    type: TYPE1v2,
    call: ({ c }) => c.checkExtension(UPDATE_VADDR),
    type1: 1,
    compat: 0,
  },
  {
    what: 'MAP_DMA with VADDR (no invalidated mapping there)',
    type: TYPE1v2,
    call: ({ c, va }) => c.mapDma({ flags: MAP_VADDR, vaddr: va, iova: 1n * MiB, size: 0x10000n }),
    type1: 'EINVAL',
    compat: 'EINVAL',
  },
  {
    what: 'MAP_DMA with VADDR where nothing is mapped',
    type: TYPE1v2,
    call: ({ c, va }) => c.mapDma({ flags: MAP_VADDR, vaddr: va, iova: 8n * MiB, size: PAGE }),
    type1: 'ENOENT',
    compat: 'EINVAL',
  },
  {
    what: 'MAP_DMA with neither READ nor WRITE',
    type: TYPE1v2,
    call: ({ c, va }) => c.mapDma({ flags: 0, vaddr: va, iova: 8n * MiB, size: PAGE }),
    type1: 'EINVAL',
    compat: 'ok',
  },
  {
    what: 'MAP_DMA whose IOVA range wraps',
    type: TYPE1v2,
    call: ({ c, va }) => c.mapDma({ flags: RW, vaddr: va, iova: U64_MAX - PAGE + 1n, size: 2n * PAGE }),
    type1: 'EINVAL',
    compat: 'EOVERFLOW',
  },
  {
    what: 'MAP_DMA overlapping a mapping',
    type: TYPE1v2,
    call: ({ c, va }) => c.mapDma({ flags: RW, vaddr: va, iova: 1n * MiB + PAGE, size: PAGE }),
    type1: 'EEXIST',
    compat: 'EEXIST',
  },
  {
    what: 'UNMAP_DMA v2 bisecting a mapping',
    type: TYPE1v2,
    call: ({ c }) => c.unmapDma({ flags: 0, iova: 1n * MiB, size: PAGE }).size,
    type1: 'EINVAL',
    compat: 'ENOENT',
  },
  {
    what: 'UNMAP_DMA v2 of a range with nothing mapped',
    type: TYPE1v2,
    call: ({ c }) => c.unmapDma({ flags: 0, iova: 8n * MiB, size: 1n * MiB }).size,
    type1: 0n,
    compat: 'ENOENT',
  },
  {
    what: 'UNMAP_DMA v2 of whole mappings and the gap between them',
    type: TYPE1v2,
    call: ({ c }) => c.unmapDma({ flags: 0, iova: 1n * MiB, size: 2n * MiB }).size,
    type1: 0x20000n,
    compat: 0x20000n,
  },
  {
    what: 'UNMAP_DMA with VADDR (invalidate)',
    type: TYPE1v2,
    call: ({ c }) => c.unmapDma({ flags: UNMAP_VADDR, iova: 1n * MiB, size: 0x10000n }).size,
    type1: 0x10000n,
    compat: 'EINVAL',
  },
  {
    what: 'UNMAP_DMA with GET_DIRTY_BITMAP',
    type: TYPE1v2,
    call: ({ c }) => c.unmapDma({ flags: DIRTY, iova: 1n * MiB, size: 0x10000n }).size,
    type1: 'EINVAL',
    compat: 'EINVAL',
  },
  {
    what: 'UNMAP_DMA ALL',
    type: TYPE1v2,
    call: ({ c }) => c.unmapDma({ flags: ALL, iova: 0n, size: 0n }).size,
    type1: 0x20000n,
    compat: 0x20000n,
  },
  {
    what: 'UNMAP_DMA v1 starting inside a mapping',
    type: TYPE1,
    call: ({ c }) => c.unmapDma({ flags: 0, iova: 1n * MiB + PAGE, size: PAGE }).size,
    type1: 0n,
    compat: PAGE,
  },
  {
    what: 'UNMAP_DMA v1 covering the first page of a mapping',
    type: TYPE1,
    call: ({ c }) => c.unmapDma({ flags: 0, iova: 1n * MiB, size: PAGE }).size,
    type1: 0x10000n,
    compat: PAGE,
  },
  {
    what: 'DMA_AVAIL after two mappings',
    type: TYPE1v2,
    call: ({ c }) => findInfoCap(c.iommuGetInfo(), 3)!.avail,
    type1: 65533,
    compat: 0xffffffff,
  },
  {
    what: 'GET_INFO capability chain',
    type: TYPE1v2,
    call: ({ c }) =>
      c
        .iommuGetInfo()
        .caps.map((x) => x.id)
        .join(','),
    type1: '2,3,1',
    compat: '3,1',
  },
];

for (const k of cases) {
  test(`type1 vs compat: ${k.what}: ${String(k.type1)} / ${String(k.compat)}`, () => {
    const { type1, compat } = both(k.type);
    assert.equal(
      outcome(() => k.call(type1)),
      k.type1,
      'type1',
    );
    assert.equal(
      outcome(() => k.call(compat)),
      k.compat,
      'iommufd compat',
    );
  });
}

test('type1 vs compat: accounting: both per mm; only iommufd also counts pinned_vm', () => {
  const { type1, compat } = both(TYPE1v2);
  assert.equal(type1.p.mm.lockedVm, 32);
  assert.equal(compat.p.mm.lockedVm, 32);
  assert.equal(type1.p.mm.pinnedVm, 0);
  assert.equal(compat.p.mm.pinnedVm, 32);
  assert.equal(type1.p.user.lockedVm + compat.p.user.lockedVm, 0);
});

test('type1 vs compat: before any group: SET_IOMMU is EINVAL on type1, ENODEV on compat', () => {
  const host = new Host();
  const t = VfioContainer.open(host.spawn());
  const k = IommufdVfioCompat.open(host.spawn());
  assert.ok(outcome(() => t.setIommu(TYPE1v2)) === 'EINVAL');
  assert.ok(outcome(() => k.setIommu(TYPE1v2)) === 'ENODEV');
  assert.ok(
    isErrno(
      captured(() => t.iommuGetInfo()),
      'EINVAL',
    ),
  );
  assert.ok(
    isErrno(
      captured(() => k.iommuGetInfo()),
      'ENODEV',
    ),
  );
});

function captured(fn: () => unknown): unknown {
  try {
    fn();
  } catch (e) {
    return e;
  }
  return undefined;
}
