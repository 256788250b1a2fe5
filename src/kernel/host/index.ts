export * from './cgroup.js';
export * from './host.js';
export * from './lazy-bytes.js';
export * from './memfd.js';
export * from './mm.js';
