export * from './access.js';
export * from './context.js';
export * from './dirty-bitmap.js';
export * from './dma-space.js';
export type {
  GetHwInfoArgs,
  HwptAllocArgs,
  HwptGetDirtyBitmapArgs,
  HwptSetDirtyTrackingArgs,
} from './hwpt.js';
export * from './io-pagetable.js';
export * from './ordered-map.js';
export * from './pages.js';
export * from './vfio-compat.js';
