/** VFIO container and type1 IOMMU uAPI numbers (include/uapi/linux/vfio.h). */

/** VFIO_GET_API_VERSION's answer. */
export const VFIO_API_VERSION = 0;

/** VFIO_CHECK_EXTENSION / VFIO_SET_IOMMU arguments. */
export const VfioExtension = {
  TYPE1_IOMMU: 1,
  SPAPR_TCE_IOMMU: 2,
  TYPE1v2_IOMMU: 3,
  DMA_CC_IOMMU: 4,
  EEH: 5,
  TYPE1_NESTING_IOMMU: 6,
  SPAPR_TCE_v2_IOMMU: 7,
  NOIOMMU_IOMMU: 8,
  UNMAP_ALL: 9,
  UPDATE_VADDR: 10,
} as const;

/** `struct vfio_iommu_type1_dma_map` flags. */
export const VfioDmaMapFlag = {
  READ: 1,
  WRITE: 2,
  VADDR: 4,
} as const;

/** `struct vfio_iommu_type1_dma_unmap` flags. */
export const VfioDmaUnmapFlag = {
  GET_DIRTY_BITMAP: 1,
  ALL: 2,
  VADDR: 4,
} as const;

/** `struct vfio_iommu_type1_info` flags. */
export const VfioIommuInfoFlag = {
  PGSIZES: 1,
  CAPS: 2,
} as const;

/** Capability ids of VFIO_IOMMU_GET_INFO's chain (`VFIO_IOMMU_TYPE1_INFO_*`). */
export const VfioIommuInfoCapId = {
  IOVA_RANGE: 1,
  MIGRATION: 2,
  DMA_AVAIL: 3,
} as const;

/** `dma_entry_limit` default of vfio_iommu_type1 (U16_MAX): vfio_dma objects per container. */
export const DMA_ENTRY_LIMIT_DEFAULT = 65535;

/** Largest dirty bitmap type1 reports in its MIGRATION capability: INT_MAX bits, rounded to u64s. */
export const DIRTY_BITMAP_SIZE_MAX = 1n << 28n;

/** Most pages one vfio_pin_pages() call may pin (PAGE_SIZE / sizeof(unsigned long)). */
export const VFIO_PIN_PAGES_MAX_ENTRIES = 512;
