import { accelDeviceFactory } from './accel-device.js';
import { basicDeviceFactory } from './basic-device.js';
import { nicDeviceFactory } from './nic-device.js';
import type { SampleDeviceFactory } from './sample-device.js';

/** The sample devices softvfio ships, by type name. */
export const sampleDeviceFactories: readonly SampleDeviceFactory[] = [
  nicDeviceFactory as SampleDeviceFactory,
  accelDeviceFactory as SampleDeviceFactory,
  basicDeviceFactory as SampleDeviceFactory,
];

export function sampleDeviceFactory(type: string): SampleDeviceFactory | undefined {
  return sampleDeviceFactories.find((f) => f.type === type);
}
