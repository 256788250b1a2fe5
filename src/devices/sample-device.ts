import type { DmaPort } from '../kernel/vfio/dma-port.js';
import type { VfioDevice } from '../kernel/vfio/vfio-device.js';

/**
 * A device instance with its VFIO face and the handles tests, the conformance kit and the VMM need:
 * running work that changes its state, and a digest that proves two instances hold the same state.
 */
export interface SampleDevice {
  /** The VFIO device: migration features, data streams, DMA logging, reset. */
  readonly vfio: VfioDevice;
  /**
   * Do `units` slices of the device's own running work (jobs, packets, flow updates…), changing
   * its state. Does nothing while the device is not running (STOP, STOP_COPY, RESUMING, ERROR).
   */
  work(units?: number): void;
  /** A hex digest of all migratable device state; equal digests mean equal state. */
  digest(): string;
}

/** Options every sample device accepts; each device adds its own sizes. */
export interface SampleDeviceOptions {
  /** Device instance name, used in errors (`accel0`). */
  name?: string;
  /** Where the device's DMA goes; devices that do no DMA ignore it. */
  dma?: DmaPort;
  /** Seed for the device's own pseudo-random work, so runs are reproducible. */
  seed?: number;
  /** Override the migration feature flags (e.g. add P2P to accel). */
  migrationFlags?: number;
}

export interface SampleDeviceFactory<O extends SampleDeviceOptions = SampleDeviceOptions> {
  /** Device type name (`nic`, `accel`, `basic`). */
  readonly type: string;
  readonly description: string;
  create(options?: O): SampleDevice;
}
