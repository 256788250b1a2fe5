/** iommufd uAPI numbers (include/uapi/linux/iommufd.h). */

/** ioctl numbers: `_IO(';', nr)`. */
export const IommufdCmd = {
  DESTROY: 0x80,
  IOAS_ALLOC: 0x81,
  IOAS_ALLOW_IOVAS: 0x82,
  IOAS_COPY: 0x83,
  IOAS_IOVA_RANGES: 0x84,
  IOAS_MAP: 0x85,
  IOAS_UNMAP: 0x86,
  OPTION: 0x87,
  VFIO_IOAS: 0x88,
  HWPT_ALLOC: 0x89,
  GET_HW_INFO: 0x8a,
  HWPT_SET_DIRTY_TRACKING: 0x8b,
  HWPT_GET_DIRTY_BITMAP: 0x8c,
  HWPT_INVALIDATE: 0x8d,
  FAULT_QUEUE_ALLOC: 0x8e,
  IOAS_MAP_FILE: 0x8f,
  VIOMMU_ALLOC: 0x90,
  VDEVICE_ALLOC: 0x91,
  IOAS_CHANGE_PROCESS: 0x92,
  VEVENTQ_ALLOC: 0x93,
  HW_QUEUE_ALLOC: 0x94,
} as const;

/** `enum iommufd_ioas_map_flags`. */
export const IoasMapFlag = {
  FIXED_IOVA: 1,
  WRITEABLE: 2,
  READABLE: 4,
} as const;
export const IOAS_MAP_FLAGS_ALL = IoasMapFlag.FIXED_IOVA | IoasMapFlag.WRITEABLE | IoasMapFlag.READABLE;

/** `enum iommufd_option`. */
export const IommuOption = {
  RLIMIT_MODE: 0,
  HUGE_PAGES: 1,
} as const;

/**
 * **softvfio extensions, not in Linux**: IOMMU_OPTION ids of their own, far above the kernel's
 * (bit 31 set) so they can never collide with a future `enum iommufd_option` value. Both are
 * global to the fd (object_id must be 0, else EOPNOTSUPP).
 *
 * - `CONTEXT_LIMIT`: val64 = the most bytes (rounded down to whole pages) this iommufd context may
 *   have pinned at once, whichever process maps through it; U64_MAX = no limit (the default). It is
 *   checked *in addition to* the RLIMIT_MODE accounting (per-user or per-mm RLIMIT_MEMLOCK, or none
 *   with CAP_IPC_LOCK, which does not bypass it), and counts each page once per pages object like
 *   the kernel's charge. Over it, a pin fails ENOMEM with everything just pinned undone. SET needs
 *   CAP_SYS_RESOURCE (EPERM) and an fd with no objects (EBUSY), as RLIMIT_MODE: an admin sets it
 *   before handing the fd to the VMM. IOAS_CHANGE_PROCESS does not move it: the charge stays with
 *   the context. This is the per-fd accounting proposed in the seed-003 thread.
 * - `CONTEXT_PINNED`: GET only (SET -> EOPNOTSUPP): val64 = bytes currently charged to the
 *   context's limit.
 */
export const SoftvfioIommuOption = {
  CONTEXT_LIMIT: 0x8000_0001,
  CONTEXT_PINNED: 0x8000_0002,
} as const;
export const IOMMU_OPTION_SOFTVFIO_CONTEXT_LIMIT = SoftvfioIommuOption.CONTEXT_LIMIT;
export const IOMMU_OPTION_SOFTVFIO_CONTEXT_PINNED = SoftvfioIommuOption.CONTEXT_PINNED;

/** `enum iommufd_option_ops`. */
export const IommuOptionOp = {
  SET: 0,
  GET: 1,
} as const;

/** `enum iommufd_vfio_ioas_op`: IOMMU_VFIO_IOAS operations on the VFIO compat IOAS. */
export const IommuVfioIoasOp = {
  GET: 0,
  SET: 1,
  CLEAR: 2,
} as const;

/** `enum iommufd_hwpt_alloc_flags`. */
export const HwptAllocFlag = {
  NEST_PARENT: 1,
  DIRTY_TRACKING: 2,
  FAULT_ID_VALID: 4,
  PASID: 8,
} as const;
export const HWPT_ALLOC_FLAGS_ALL =
  HwptAllocFlag.NEST_PARENT |
  HwptAllocFlag.DIRTY_TRACKING |
  HwptAllocFlag.FAULT_ID_VALID |
  HwptAllocFlag.PASID;

/** `enum iommu_hwpt_data_type` (driver data for HWPT_ALLOC). */
export const HwptDataType = {
  NONE: 0,
  VTD_S1: 1,
  ARM_SMMUV3: 2,
} as const;

/** `enum iommu_hw_info_type` (GET_HW_INFO out_data_type). */
export const HwInfoType = {
  NONE: 0,
  INTEL_VTD: 1,
  ARM_SMMUV3: 2,
} as const;

/** `enum iommufd_hwpt_set_dirty_tracking_flags`. */
export const HWPT_DIRTY_TRACKING_ENABLE = 1;
/** `enum iommufd_hwpt_get_dirty_bitmap_flags`. */
export const HWPT_GET_DIRTY_BITMAP_NO_CLEAR = 1;
/** `enum iommu_hw_capabilities`. */
export const IOMMU_HW_CAP_DIRTY_TRACKING = 1;

/** `struct iommu_iova_range`: inclusive bounds. */
export interface IovaRange {
  start: bigint;
  last: bigint;
}
