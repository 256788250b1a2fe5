export * from './arch.js';
export * from './device-feature.js';
export * from './errno.js';
export * from './error.js';
export * from './iommufd.js';
export * from './migration.js';
export * from './vfio-type1.js';
