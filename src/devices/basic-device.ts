import { MigFeature } from '../uapi/migration.js';
import type { SampleDevice, SampleDeviceFactory, SampleDeviceOptions } from './sample-device.js';
import { StateDriver, StateSampleDevice, xorshift32 } from './state/state-driver.js';
import { DeviceStateImage } from './state/state-region.js';

/** Register file of the basic device: a few KiB of registers and counters. */
export const BASIC_REGISTER_BYTES = 4096;
const REG = { PRNG: 0, TICKS: 8, SCRATCH: 64 } as const;

export interface BasicDeviceOptions extends SampleDeviceOptions {
  /** Size of the register file (default 4 KiB). */
  registerBytes?: number;
}

/** The minimum a driver must do: STOP_COPY only, a small register file changed by work(). */
export function createBasicDevice(options: BasicDeviceOptions = {}): SampleDevice & { driver: StateDriver } {
  const registerBytes = options.registerBytes ?? BASIC_REGISTER_BYTES;
  const image = new DeviceStateImage('basic', 1, [
    { name: 'registers', sizeBytes: registerBytes, precopy: false },
  ]);
  const regs = image.region('registers');
  const seed = options.seed ?? 1;
  const driver = new StateDriver(image, options.migrationFlags ?? MigFeature.STOP_COPY, (fresh) => {
    if (!fresh) regs.clear();
    regs.setU32(REG.PRNG, seed >>> 0 || 1);
  });
  const slots = (registerBytes - REG.SCRATCH) >> 2;
  return new StateSampleDevice(options.name ?? 'basic0', driver, options.dma, () => {
    let x = regs.u32(REG.PRNG);
    for (let i = 0; i < 4; i++) {
      x = xorshift32(x);
      regs.setU32(REG.SCRATCH + (x % slots) * 4, x);
    }
    regs.setU32(REG.PRNG, x);
    regs.setU64(REG.TICKS, regs.u64(REG.TICKS) + 1n);
  });
}

export const basicDeviceFactory: SampleDeviceFactory<BasicDeviceOptions> = {
  type: 'basic',
  description: 'STOP_COPY-only device with a 4 KiB register file',
  create: createBasicDevice,
};
