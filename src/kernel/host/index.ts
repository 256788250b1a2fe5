export * from './byte-store.js';
export * from './cgroup.js';
export * from './host.js';
export * from './lazy-bytes.js';
export * from './memfd.js';
export * from './mm.js';
export * from './phys-memory-store.js';
