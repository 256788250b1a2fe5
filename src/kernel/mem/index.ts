export * from './phys-memory.js';
export * from './simd-checksum.js';
export * from './checksum-worker.js';
