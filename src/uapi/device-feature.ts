import { PAGE_SIZE } from './arch.js';

/** VFIO_DEVICE_FEATURE numbers (include/uapi/linux/vfio.h). */

const VFIO_TYPE = 0x3b; // ';'
const VFIO_BASE = 100;
/** `_IO(VFIO_TYPE, VFIO_BASE + n)`: no size or direction bits. */
const vfioIo = (n: number) => (VFIO_TYPE << 8) | (VFIO_BASE + n);

export const VFIO_DEVICE_FEATURE = vfioIo(17); // 0x3b75
export const VFIO_MIG_GET_PRECOPY_INFO = vfioIo(21); // 0x3b79
export const VFIO_DEVICE_RESET = vfioIo(11); // 0x3b6f

/** `vfio_device_feature.flags` bits. */
export const FeatureFlag = {
  MASK: 0xffff,
  GET: 1 << 16,
  SET: 1 << 17,
  PROBE: 1 << 18,
} as const;

/** Feature ids, the low 16 bits of `flags`. */
export const FeatureId = {
  PCI_VF_TOKEN: 0,
  MIGRATION: 1,
  MIG_DEVICE_STATE: 2,
  LOW_POWER_ENTRY: 3,
  LOW_POWER_ENTRY_WITH_WAKEUP: 4,
  LOW_POWER_EXIT: 5,
  DMA_LOGGING_START: 6,
  DMA_LOGGING_STOP: 7,
  DMA_LOGGING_REPORT: 8,
  MIG_DATA_SIZE: 9,
  BUS_MASTER: 10,
  DMA_BUF: 11,
} as const;

/** `sizeof(struct vfio_device_feature)`: argsz and flags, before the payload. */
export const FEATURE_HEADER_BYTES = 8;

/** Payload sizes of the feature structs, checked against `argsz - 8`. */
export const FeaturePayloadBytes = {
  MIGRATION: 8, // u64 flags
  MIG_DEVICE_STATE: 8, // u32 device_state; s32 data_fd
  MIG_DATA_SIZE: 8, // u64 stop_copy_length
  DMA_LOGGING_CONTROL: 24, // u64 page_size; u32 num_ranges; u32 __reserved; u64 ranges
  DMA_LOGGING_REPORT: 32, // u64 iova; u64 length; u64 page_size; u64 bitmap
} as const;

/** `sizeof(struct vfio_precopy_info)`. */
export const PRECOPY_INFO_BYTES = 24;

/** DMA logging limit: PAGE_SIZE / sizeof(struct vfio_device_feature_dma_logging_range). */
export const LOG_MAX_RANGES = PAGE_SIZE / 16;
