export * from './dma-logging.js';
export * from './dma-port.js';
export * from './mig-data-stream.js';
export * from './mig-fsm.js';
export * from './migration-driver.js';
export * from './vfio-device.js';
