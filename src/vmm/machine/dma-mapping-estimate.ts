import { findInfoCap, type VfioIommuInfo } from '../../kernel/vfio/container-api.js';
import { VfioIommuInfoCapId } from '../../uapi/vfio-type1.js';
import { type DmaMappingEstimate, DmaMappingLimitError } from './machine-errors.js';
import type { RamBlock } from './ram-block.js';

/** Memory slots QEMU assumes when it has no KVM to ask (`max_memslots`). */
export const DEFAULT_MAX_MEMSLOTS = 512;
/** The limit QEMU assumes when a type1 container reports no DMA_AVAIL capability. */
export const ASSUMED_DMA_MAX_MAPPINGS = 65535;

/**
 * QEMU's estimate of the DMA mappings a VM may need (vfio_ram_discard_register_listener): every
 * block of every discardable region may become one mapping, and every other memory slot one more:
 * `Σ(region size / block size) + maxMemslots − regions`. Undefined when the VM has no discardable
 * region: QEMU checks nothing then.
 */
export function estimateDmaMappings(
  blocks: readonly RamBlock[],
  maxMemslots = DEFAULT_MAX_MEMSLOTS,
): DmaMappingEstimate | undefined {
  let discardBlocks = 0;
  let discardSections = 0;
  for (const block of blocks) {
    if (block.discard === undefined) continue;
    discardSections++;
    discardBlocks += block.discard.blockCount;
  }
  if (discardSections === 0) return undefined;
  return {
    mappings: discardBlocks + maxMemslots - discardSections,
    discardBlocks,
    discardSections,
    maxMemslots,
  };
}

/**
 * `dma_max_mappings` of a type1 container, as QEMU reads it when it sets the container up: the
 * DMA_AVAIL capability of VFIO_IOMMU_GET_INFO, or 65535 when the kernel does not report it.
 */
export function type1DmaMaxMappings(info: VfioIommuInfo): { limit: number; reported: boolean } {
  const cap = findInfoCap(info, VfioIommuInfoCapId.DMA_AVAIL);
  return cap === undefined
    ? { limit: ASSUMED_DMA_MAX_MAPPINGS, reported: false }
    : { limit: cap.avail, reported: true };
}

/**
 * Refuses a VM whose estimate exceeds the backend's mapping limit (undefined = no count limit, as
 * iommufd): DmaMappingLimitError with the numbers and the remedy.
 */
export function checkDmaMappingLimit(
  vm: string,
  estimate: DmaMappingEstimate | undefined,
  limit: { limit: number; reported: boolean } | undefined,
): void {
  if (estimate === undefined || limit === undefined) return;
  if (estimate.mappings > limit.limit) {
    throw new DmaMappingLimitError(vm, estimate, limit.limit, limit.reported);
  }
}
