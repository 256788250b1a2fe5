export * from './dma-logging.js';
export * from './dma-port.js';
export * from './mig-data-stream.js';
export * from './mig-fsm.js';
export * from './migration-driver.js';
export * from './vfio-device.js';
export * from './container.js';
export {
  findInfoCap,
  IommuProt,
  SOFT_IOMMU_PGSIZE_BITMAP,
  type VfioContainerApi,
  type VfioDmaMapArgs,
  type VfioDmaUnmapArgs,
  type VfioInfoCapDmaAvail,
  type VfioInfoCapIovaRange,
  type VfioInfoCapMigration,
  type VfioIommuInfo,
  type VfioIommuInfoCap,
  type VfioIovaRange,
} from './container-api.js';
export { PinnedPage, type BackingRun, type VfioDma, type VfioPfn } from './container-dma.js';
export * from './container-dma-space.js';
export * from './container-type1.js';
