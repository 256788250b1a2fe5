import assert from 'node:assert/strict';
import { Host, type HostOptions, type Process, type SpawnOptions } from '../../../src/kernel/host/index.js';
import {
  VfioContainer,
  type VfioContainerDevice,
  VfioGroup,
  type VfioGroupOptions,
} from '../../../src/kernel/vfio/container.js';
import type { PinnedPage } from '../../../src/kernel/vfio/container-dma.js';
import type { ErrnoName } from '../../../src/uapi/errno.js';
import { isErrno } from '../../../src/uapi/error.js';

export const KiB = 1024n;
export const MiB = 1024n * KiB;
export const GiB = 1024n * MiB;
export const PAGE = 4096n;
export const U64_MAX = (1n << 64n) - 1n;

/** VFIO_DMA_MAP_FLAG_* / VFIO_DMA_UNMAP_FLAG_* / extensions, spelled out as the kernel numbers. */
export const READ = 1;
export const WRITE = 2;
export const RW = READ | WRITE;
export const MAP_VADDR = 4;
export const DIRTY = 1;
export const ALL = 2;
export const UNMAP_VADDR = 4;
export const TYPE1 = 1;
export const TYPE1v2 = 3;
export const DMA_CC = 4;
export const UNMAP_ALL = 9;
export const UPDATE_VADDR = 10;

export function throwsErrno(fn: () => unknown, errno: ErrnoName): void {
  assert.throws(fn, (e: unknown) => {
    if (!isErrno(e, errno)) throw e;
    return true;
  });
}

/** A host, a VMM process, a container with one group and the IOMMU set (v2 unless `v1`). */
export function type1(
  opts: {
    v1?: boolean;
    host?: HostOptions;
    spawn?: SpawnOptions;
    group?: Partial<VfioGroupOptions>;
  } = {},
): { host: Host; p: Process; c: VfioContainer; group: VfioGroup } {
  const host = new Host(opts.host);
  const p = host.spawn({ uid: 1000, rlimitMemlockBytes: 64n * MiB, ...opts.spawn });
  const c = VfioContainer.open(p);
  const group = new VfioGroup({ name: 'g0', ...opts.group });
  c.attachGroup(group);
  c.setIommu(opts.v1 ? TYPE1 : TYPE1v2);
  return { host, p, c, group };
}

/** The DMA_AVAIL capability's value. */
export function dmaAvail(c: { iommuGetInfo(): { caps: { id: number }[] } }): number {
  const cap = c.iommuGetInfo().caps.find((x) => x.id === 3) as { avail: number } | undefined;
  assert.ok(cap, 'DMA_AVAIL capability present');
  return cap.avail;
}

/**
 * An open device whose driver pins pages (an mdev driver): it remembers its pins and, when type1
 * calls its dma_unmap, drops every pin it holds in the range, as drivers must.
 */
export function pinningDevice(
  c: VfioContainer,
  group: VfioGroup,
  name = 'mdev0',
): {
  dev: VfioContainerDevice;
  pin(iova: bigint, npage: number, prot: number): PinnedPage[];
  unpin(iova: bigint, npage: number): void;
  unmapCalls: [bigint, bigint][];
} {
  const refs = new Map<bigint, number>();
  const unmapCalls: [bigint, bigint][] = [];
  const dev: VfioContainerDevice = c.openDevice(group, {
    name,
    dmaUnmap: (iova, length) => {
      unmapCalls.push([iova, length]);
      for (const [at, n] of [...refs]) {
        if (at < iova || at >= iova + length) continue;
        for (let i = 0; i < n; i++) dev.unpinPages(at, 1);
        refs.delete(at);
      }
    },
  });
  return {
    dev,
    unmapCalls,
    pin(iova, npage, prot) {
      const pages = dev.pinPages(iova, npage, prot);
      for (let i = 0n; i < BigInt(npage); i++)
        refs.set(iova + i * PAGE, (refs.get(iova + i * PAGE) ?? 0) + 1);
      return pages;
    },
    unpin(iova, npage) {
      dev.unpinPages(iova, npage);
      for (let i = 0n; i < BigInt(npage); i++) {
        const n = (refs.get(iova + i * PAGE) ?? 0) - 1;
        if (n > 0) refs.set(iova + i * PAGE, n);
        else refs.delete(iova + i * PAGE);
      }
    },
  };
}
