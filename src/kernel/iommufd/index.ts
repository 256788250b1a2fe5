export * from './context.js';
export * from './dma-space.js';
export * from './io-pagetable.js';
export * from './ordered-map.js';
export * from './pages.js';
export * from './vfio-compat.js';
