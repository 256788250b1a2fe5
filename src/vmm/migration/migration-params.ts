import { invalidArgument } from '../../uapi/error.js';

/**
 * Migration parameters and capabilities, named and defaulted as QEMU's (migration/options.c),
 * settable per migration. The TypeScript names carry units; `MIGRATION_PARAMETER_NAMES` maps
 * them to QEMU's names, which the CLI (`-p downtime-limit=300`) and the control API accept.
 *
 * Where softvfio's default differs from QEMU's it says why: `multifd` and `switchover-ack` are
 * on, since the engine is built around multifd device-state transfer and the switchover-ack
 * handshake (in QEMU both are capabilities a management layer turns on).
 */
export interface MigrationParameters {
  /** downtime-limit: the longest acceptable VM stop, ms (300; 0..2 000 000). */
  downtimeLimitMs: number;
  /** max-bandwidth: bytes/s the migration may use; 0 = no limit (QEMU's RATE_LIMIT_DISABLED). Default 128 MiB/s. */
  maxBandwidthBytesPerSec: number;
  /** avail-switchover-bandwidth: bytes/s assumed at switchover instead of the measured rate; 0 = measured. */
  availSwitchoverBandwidthBytesPerSec: number;
  /** multifd-channels: parallel data channels beside the main channel (2; 1..255). */
  multifdChannels: number;
  /** throttle-trigger-threshold: dirtied bytes as a % of sent bytes that counts as "not converging" (50). */
  throttleTriggerThresholdPercent: number;
  /** cpu-throttle-initial: first vCPU throttle of auto-converge, % (20). */
  cpuThrottleInitialPercent: number;
  /** cpu-throttle-increment: added each time auto-converge throttles again, % (10). */
  cpuThrottleIncrementPercent: number;
  /** max-cpu-throttle: auto-converge never throttles beyond this, % (99). */
  maxCpuThrottlePercent: number;
  /** Capability auto-converge: throttle vCPUs when dirtying outpaces sending (off). */
  autoConverge: boolean;
  /** Capability switchover-ack: wait for the destination to ack devices' initial precopy data (on). */
  switchoverAck: boolean;
  /** Capability multifd: RAM pages and device state over the multifd channels (on). */
  multifd: boolean;
}

/** Destination-side limits (QEMU: per-device properties of the destination's vfio-pci devices). */
export interface IncomingParameters {
  /**
   * x-migration-max-queued-buffers-size: bytes of device state buffers received out of order and
   * not yet written to a device, summed over devices. QEMU's default is unlimited; ours is
   * 64 MiB, and channels that run ahead are paused before it is reached.
   */
  maxQueuedBuffersBytes: number;
}

const MiB = 1024 * 1024;

export const DEFAULT_MIGRATION_PARAMETERS: Readonly<MigrationParameters> = Object.freeze({
  downtimeLimitMs: 300,
  maxBandwidthBytesPerSec: 128 * MiB,
  availSwitchoverBandwidthBytesPerSec: 0,
  multifdChannels: 2,
  throttleTriggerThresholdPercent: 50,
  cpuThrottleInitialPercent: 20,
  cpuThrottleIncrementPercent: 10,
  maxCpuThrottlePercent: 99,
  autoConverge: false,
  switchoverAck: true,
  multifd: true,
});

export const DEFAULT_INCOMING_PARAMETERS: Readonly<IncomingParameters> = Object.freeze({
  maxQueuedBuffersBytes: 64 * MiB,
});

/** QEMU's name of each parameter and capability. */
export const MIGRATION_PARAMETER_NAMES: Readonly<Record<keyof MigrationParameters, string>> = Object.freeze({
  downtimeLimitMs: 'downtime-limit',
  maxBandwidthBytesPerSec: 'max-bandwidth',
  availSwitchoverBandwidthBytesPerSec: 'avail-switchover-bandwidth',
  multifdChannels: 'multifd-channels',
  throttleTriggerThresholdPercent: 'throttle-trigger-threshold',
  cpuThrottleInitialPercent: 'cpu-throttle-initial',
  cpuThrottleIncrementPercent: 'cpu-throttle-increment',
  maxCpuThrottlePercent: 'max-cpu-throttle',
  autoConverge: 'auto-converge',
  switchoverAck: 'switchover-ack',
  multifd: 'multifd',
});

export const INCOMING_PARAMETER_NAMES: Readonly<Record<keyof IncomingParameters, string>> = Object.freeze({
  maxQueuedBuffersBytes: 'x-migration-max-queued-buffers-size',
});

type Range = readonly [min: number, max: number];
const RANGES: Readonly<Partial<Record<keyof MigrationParameters, Range>>> = {
  downtimeLimitMs: [0, 2_000_000],
  maxBandwidthBytesPerSec: [0, Number.MAX_SAFE_INTEGER],
  availSwitchoverBandwidthBytesPerSec: [0, Number.MAX_SAFE_INTEGER],
  multifdChannels: [1, 255],
  throttleTriggerThresholdPercent: [1, 100],
  cpuThrottleInitialPercent: [1, 99],
  cpuThrottleIncrementPercent: [1, 99],
  maxCpuThrottlePercent: [1, 99],
};

/** Smallest and largest queue cap a destination accepts: one 1 MiB buffer .. 16 GiB. */
export const QUEUED_BUFFERS_BYTES_RANGE: Range = [MiB + 4096, 16 * 1024 * MiB];

function checkInteger(name: string, value: unknown, [min, max]: Range): number {
  if (typeof value !== 'number' || !Number.isSafeInteger(value) || value < min || value > max) {
    throw invalidArgument(
      `migration parameter ${name} must be an integer from ${min} to ${max}, got ${String(value)}`,
    );
  }
  return value;
}

/** Defaults overlaid with `given`, every value checked (ERR_INVALID_ARGUMENT naming QEMU's name). */
export function resolveMigrationParameters(given: Partial<MigrationParameters> = {}): MigrationParameters {
  const out: MigrationParameters = { ...DEFAULT_MIGRATION_PARAMETERS };
  for (const [key, value] of Object.entries(given) as [keyof MigrationParameters, unknown][]) {
    const name = MIGRATION_PARAMETER_NAMES[key];
    if (name === undefined) throw invalidArgument(`unknown migration parameter ${String(key)}`);
    if (value === undefined) continue;
    const range = RANGES[key];
    if (range === undefined) {
      if (typeof value !== 'boolean')
        throw invalidArgument(`migration capability ${name} must be true or false`);
      (out as unknown as Record<string, unknown>)[key] = value;
    } else {
      (out as unknown as Record<string, unknown>)[key] = checkInteger(name, value, range);
    }
  }
  if (out.cpuThrottleInitialPercent > out.maxCpuThrottlePercent) {
    throw invalidArgument(
      `cpu-throttle-initial ${out.cpuThrottleInitialPercent} exceeds max-cpu-throttle ${out.maxCpuThrottlePercent}`,
    );
  }
  return out;
}

export function resolveIncomingParameters(given: Partial<IncomingParameters> = {}): IncomingParameters {
  const out: IncomingParameters = { ...DEFAULT_INCOMING_PARAMETERS };
  for (const [key, value] of Object.entries(given) as [keyof IncomingParameters, unknown][]) {
    const name = INCOMING_PARAMETER_NAMES[key];
    if (name === undefined) throw invalidArgument(`unknown incoming migration parameter ${String(key)}`);
    if (value === undefined) continue;
    out[key] = checkInteger(name, value, QUEUED_BUFFERS_BYTES_RANGE);
  }
  return out;
}

/**
 * Parse `name=value` settings with QEMU's names (CLI `-p downtime-limit=300 -p auto-converge=on`)
 * into parameters: integers in decimal, capabilities as on/off/true/false.
 */
export function parseMigrationSettings(settings: readonly string[]): Partial<MigrationParameters> {
  const byName = new Map(
    (Object.entries(MIGRATION_PARAMETER_NAMES) as [keyof MigrationParameters, string][]).map(([k, n]) => [
      n,
      k,
    ]),
  );
  const out: Partial<MigrationParameters> = {};
  for (const setting of settings) {
    const eq = setting.indexOf('=');
    const name = eq < 0 ? setting : setting.slice(0, eq);
    const text = eq < 0 ? '' : setting.slice(eq + 1);
    const key = byName.get(name);
    if (key === undefined) {
      throw invalidArgument(
        `unknown migration parameter ${JSON.stringify(name)} (known: ${[...byName.keys()].join(', ')})`,
      );
    }
    if (RANGES[key] === undefined) {
      const on = ['on', 'true', 'yes'].includes(text);
      if (!on && !['off', 'false', 'no'].includes(text)) {
        throw invalidArgument(`capability ${name} takes on or off, got ${JSON.stringify(text)}`);
      }
      (out as Record<string, unknown>)[key] = on;
    } else {
      if (!/^\d{1,16}$/.test(text))
        throw invalidArgument(`${name} takes a decimal integer, got ${JSON.stringify(text)}`);
      (out as Record<string, unknown>)[key] = Number(text);
    }
  }
  resolveMigrationParameters(out); // every value checked, as given
  return out;
}
