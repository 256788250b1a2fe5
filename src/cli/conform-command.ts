import { resolve } from 'node:path';
import { pathToFileURL } from 'node:url';
import { DEFAULT_MODEL_RUNS, runConformanceSuite } from '../devices/conformance/index.js';
import { sampleDeviceFactories } from '../devices/registry.js';
import type { SampleDeviceFactory } from '../devices/sample-device.js';
import { VfioError } from '../uapi/error.js';
import { renderDeviceReport, renderSuiteSummary } from './conform-output.js';

/** Exit codes of `softvfio conform`. */
export const ConformExit = {
  /** Every check of every device passed. */
  OK: 0,
  /** At least one check failed. */
  VIOLATIONS: 1,
  /** Bad input: unknown device, bad option value, a --module without factories. */
  USAGE: 2,
} as const;

export interface ConformCommandOptions {
  device?: string;
  json?: boolean;
  runs?: number;
  seed?: number;
  /** An ES module whose exports are device factories (or arrays of them), instead of the registry. */
  module?: string;
}

export interface CommandIo {
  out: (text: string) => void;
  err: (text: string) => void;
  cwd: string;
}

/** Bad command-line input; reported on stderr with exit code 2. */
export function usageError(message: string): VfioError {
  return new VfioError('ERR_USAGE', message);
}

function isFactory(value: unknown): value is SampleDeviceFactory {
  return (
    typeof value === 'object' &&
    value !== null &&
    typeof (value as SampleDeviceFactory).type === 'string' &&
    typeof (value as SampleDeviceFactory).create === 'function'
  );
}

/** Every factory a module exports, alone or in arrays, in export order, each once. */
export async function loadFactoryModule(path: string, cwd: string): Promise<SampleDeviceFactory[]> {
  let exports: Record<string, unknown>;
  try {
    exports = await import(pathToFileURL(resolve(cwd, path)).href);
  } catch (error) {
    throw usageError(`cannot load device module ${path}: ${(error as Error).message}`);
  }
  const found: SampleDeviceFactory[] = [];
  for (const value of Object.values(exports)) {
    for (const candidate of Array.isArray(value) ? value : [value]) {
      if (isFactory(candidate) && !found.includes(candidate)) found.push(candidate);
    }
  }
  if (found.length === 0) throw usageError(`device module ${path} exports no device factory`);
  return found;
}

function selectFactories(
  pool: readonly SampleDeviceFactory[],
  device: string | undefined,
): SampleDeviceFactory[] {
  if (device === undefined) return [...pool];
  const chosen = pool.filter((f) => f.type === device);
  if (chosen.length === 0) {
    const known = pool.map((f) => f.type).join(', ') || 'none registered';
    throw usageError(`unknown device "${device}" (known: ${known})`);
  }
  return chosen;
}

/** `softvfio conform`: runs the kit, prints the report, returns the exit code. */
export async function conformCommand(options: ConformCommandOptions, io: CommandIo): Promise<number> {
  let pool: SampleDeviceFactory[];
  let factories: SampleDeviceFactory[];
  try {
    pool = options.module ? await loadFactoryModule(options.module, io.cwd) : [...sampleDeviceFactories];
    factories = selectFactories(pool, options.device);
  } catch (error) {
    if (error instanceof VfioError && error.code === 'ERR_USAGE') {
      io.err(`softvfio conform: ${error.message}`);
      return ConformExit.USAGE;
    }
    throw error;
  }
  // Foreign streams come from any other known device type, also when --device picks one.
  const suite = runConformanceSuite(factories, {
    runs: options.runs ?? DEFAULT_MODEL_RUNS,
    seed: options.seed ?? 1,
    foreignFor: (factory) => pool.find((other) => other.type !== factory.type),
  });
  if (options.json) {
    io.out(JSON.stringify(suite, null, 2));
  } else {
    for (const report of suite.devices) io.out(`${renderDeviceReport(report)}\n`);
    io.out(renderSuiteSummary(suite));
  }
  if (factories.length === 0)
    io.err('softvfio conform: no sample devices are registered; nothing was checked');
  return suite.summary.ok ? ConformExit.OK : ConformExit.VIOLATIONS;
}
