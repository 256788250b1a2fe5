import { PAGE_SIZE_N, U64_MAX } from '../../uapi/arch.js';
import { kernelError } from '../../uapi/error.js';
import type { VfioIommuInfoCapId } from '../../uapi/vfio-type1.js';
import type { Process } from '../host/host.js';

/**
 * The legacy VFIO container API (/dev/vfio/vfio), served either by the type1 IOMMU driver
 * (VfioContainer) or by iommufd's VFIO compatibility layer (IommufdVfioCompat). One method per
 * container ioctl; argsz and struct sizes are left out (see DESIGN.md).
 */

/** `struct vfio_iommu_type1_dma_map`: `flags` READ 1 | WRITE 2 | VADDR 4. */
export interface VfioDmaMapArgs {
  flags: number;
  vaddr: bigint;
  iova: bigint;
  size: bigint;
}

/** `struct vfio_iommu_type1_dma_unmap`: `flags` GET_DIRTY_BITMAP 1 | ALL 2 | VADDR 4; `size` is written back. */
export interface VfioDmaUnmapArgs {
  flags: number;
  iova: bigint;
  size: bigint;
}

/** `struct vfio_iova_range`: inclusive bounds. */
export interface VfioIovaRange {
  start: bigint;
  end: bigint;
}

export interface VfioInfoCapIovaRange {
  id: typeof VfioIommuInfoCapId.IOVA_RANGE;
  version: 1;
  iovaRanges: VfioIovaRange[];
}
export interface VfioInfoCapMigration {
  id: typeof VfioIommuInfoCapId.MIGRATION;
  version: 1;
  flags: number;
  pgsizeBitmap: bigint;
  maxDirtyBitmapSize: bigint;
}
export interface VfioInfoCapDmaAvail {
  id: typeof VfioIommuInfoCapId.DMA_AVAIL;
  version: 1;
  /** u32: how many more vfio_dma mappings the container accepts. */
  avail: number;
}
export type VfioIommuInfoCap = VfioInfoCapIovaRange | VfioInfoCapMigration | VfioInfoCapDmaAvail;

/** `struct vfio_iommu_type1_info` with its capability chain, in chain order. */
export interface VfioIommuInfo {
  flags: number;
  iovaPgsizes: bigint;
  caps: VfioIommuInfoCap[];
}

/** The capability with `id` from a GET_INFO answer, if the chain has one. */
export function findInfoCap<I extends VfioIommuInfoCap['id']>(
  info: VfioIommuInfo,
  id: I,
): Extract<VfioIommuInfoCap, { id: I }> | undefined {
  return info.caps.find((c) => c.id === id) as Extract<VfioIommuInfoCap, { id: I }> | undefined;
}

/** What a container fd answers, whichever kernel code serves it. */
export interface VfioContainerApi {
  /** `current` for each call. */
  readonly caller: Process;
  /** VFIO_GET_API_VERSION. */
  getApiVersion(): number;
  /** VFIO_CHECK_EXTENSION: 0 = unsupported, > 0 = supported. */
  checkExtension(ext: number): number;
  /** VFIO_SET_IOMMU. */
  setIommu(type: number): void;
  /** VFIO_IOMMU_GET_INFO. */
  iommuGetInfo(): VfioIommuInfo;
  /** VFIO_IOMMU_MAP_DMA. */
  mapDma(args: VfioDmaMapArgs): void;
  /** VFIO_IOMMU_UNMAP_DMA: bytes unmapped (also written back to `args.size`). */
  unmapDma(args: VfioDmaUnmapArgs): { size: bigint };
}

/** Kernel-internal IOMMU_READ / IOMMU_WRITE, as vfio_pin_pages() takes them. */
export const IommuProt = { READ: 1, WRITE: 2 } as const;

/** Page sizes of softvfio's IOMMU domains: 4 KiB, 2 MiB and 1 GiB. */
export const SOFT_IOMMU_PGSIZE_BITMAP = (1n << 12n) | (1n << 21n) | (1n << 30n);

/** PAGE_MASK as a u64 (all bits from PAGE_SIZE up). */
export const PAGE_MASK = U64_MAX & ~(PAGE_SIZE_N - 1n);

/** The lowest set bit of a non-zero bitmap (`1 << __ffs(x)`). */
export function lowestBit(x: bigint): bigint {
  return x & -x;
}

/**
 * A u64 argument as copy_from_user() would see it. Values outside [0, 2^64) cannot come from C,
 * so they are refused as EINVAL rather than truncated.
 */
export function checkU64(value: bigint, name: string, op: string): void {
  if (value < 0n || value > U64_MAX) throw kernelError('EINVAL', `${name} is not a u64`, { op });
}
