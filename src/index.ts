export * from './kernel/vfio/index.js';
export * from './uapi/index.js';
