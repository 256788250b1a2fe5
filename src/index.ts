export * from './devices/accel-device.js';
export * from './devices/basic-device.js';
export * from './devices/conformance/index.js';
export * from './devices/nic-device.js';
export * from './devices/registry.js';
export type * from './devices/sample-device.js';
export * from './kernel/mem/index.js';
export * from './kernel/vfio/index.js';
export * from './uapi/index.js';
