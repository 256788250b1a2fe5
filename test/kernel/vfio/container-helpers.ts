import assert from 'node:assert/strict';
import { Host, type HostOptions, type Process, type SpawnOptions } from '../../../src/kernel/host/index.js';
import { VfioContainer, VfioGroup, type VfioGroupOptions } from '../../../src/kernel/vfio/container.js';
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
