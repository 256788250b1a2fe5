import { performance } from 'node:perf_hooks';
import { MIG_FEATURE_ALL, MigFeature, migFeatureNames } from '../../uapi/migration.js';
import type { SampleDeviceFactory } from '../sample-device.js';
import type { CheckSpec } from './check.js';
import { errorResetChecks } from './error-reset-checks.js';
import { featureChecks } from './features-checks.js';
import { type DeviceOptionsSource, Harness, instanceOptions } from './harness.js';
import { loadingChecks } from './loading-checks.js';
import { modelChecks } from './model-checks.js';
import { attempt, describeOutcome, errorMessage, isVerdict, SKIP_CODE, VIOLATION_CODE } from './outcome.js';
import { precopyChecks } from './precopy-checks.js';
import {
  type ConformanceCategory,
  type ConformanceCheck,
  type ConformanceReport,
  type ConformanceSuiteReport,
  groupChecks,
  summarize,
} from './report.js';
import { roundTripChecks } from './round-trip-checks.js';
import { streamChecks } from './stream-checks.js';
import { transitionChecks } from './transition-checks.js';

export interface ConformanceOptions {
  /** A factory of another device type, whose streams the device under test must refuse. */
  foreign?: SampleDeviceFactory;
  /** Model-based random sequences (fast-check runs); 0 turns them off. Default 100. */
  runs?: number;
  /** Commands per random sequence, at most. Default 30. */
  maxCommands?: number;
  /** Stops the random sequences (not failing) after this long. Default 5000 ms. */
  modelTimeLimitMs?: number;
  /** Seed for device instances and the random sequences, for reproducible runs. Default 1. */
  seed?: number;
  /** work() units the checks use between steps. Default 8. */
  workUnits?: number;
  /** A stream longer than this is a violation (guards against streams that never end). Default 256 MiB. */
  maxStreamBytes?: number;
  /**
   * Options for every device the kit creates, foreign ones included; a function makes them per
   * instance (a DMA port of its own, …). The kit sets `name` and `seed`.
   */
  deviceOptions?: DeviceOptionsSource;
  /** Run only these categories (default: all). */
  categories?: readonly ConformanceCategory[];
  /** Called after each check, e.g. for progress output. */
  onCheck?: (check: ConformanceCheck) => void;
}

export const DEFAULT_MODEL_RUNS = 100;

const SOURCES: readonly {
  category: ConformanceCategory;
  make: (
    kit: Harness,
    options: Required<Pick<ConformanceOptions, 'runs' | 'maxCommands' | 'modelTimeLimitMs'>>,
  ) => CheckSpec[];
}[] = [
  { category: 'features', make: featureChecks },
  { category: 'transitions', make: transitionChecks },
  { category: 'round-trip', make: roundTripChecks },
  { category: 'precopy', make: precopyChecks },
  { category: 'streams', make: streamChecks },
  { category: 'loading', make: loadingChecks },
  { category: 'error-reset', make: errorResetChecks },
  {
    category: 'model',
    make: (kit, o) =>
      modelChecks(kit, { runs: o.runs, maxCommands: o.maxCommands, timeLimitMs: o.modelTimeLimitMs }),
  },
];

/**
 * Run the conformance kit on a device type: every check on fresh instances from `factory`,
 * against the kit's own reference model of the VFIO migration uAPI. Never throws because of the
 * device: anything the device does wrong, including throwing where it should not, is a failed
 * check in the report.
 */
export function runConformance(
  factory: SampleDeviceFactory,
  options: ConformanceOptions = {},
): ConformanceReport {
  const started = performance.now();
  const seed = options.seed ?? 1;
  const runs = options.runs ?? DEFAULT_MODEL_RUNS;
  const checks: ConformanceCheck[] = [];
  const record = (entry: Omit<ConformanceCheck, 'durationMs'>, since: number) => {
    const done: ConformanceCheck = {
      ...entry,
      durationMs: Math.round((performance.now() - since) * 10) / 10,
    };
    checks.push(done);
    options.onCheck?.(done);
  };
  const settings = {
    seed,
    workUnits: options.workUnits ?? 8,
    maxStreamBytes: options.maxStreamBytes ?? 256 << 20,
    deviceOptions: options.deviceOptions ?? {},
  };

  // The feature set decides which checks exist, so it is read first, from a device of its own.
  const probeStart = performance.now();
  const probe = readFeatures(factory, settings.deviceOptions, seed);
  record(
    {
      category: 'features',
      name: 'MIGRATION GET reports a valid flag combination',
      passed: probe.ok,
      skipped: false,
      detail: probe.ok ? migFeatureNames(probe.flags) : probe.problem,
    },
    probeStart,
  );
  const report = (flags: number | undefined): ConformanceReport => {
    const summary = summarize(checks);
    return {
      deviceType: factory.type,
      description: factory.description,
      migrationFlags: flags,
      migrationFeatures: flags === undefined ? 'unknown' : migFeatureNames(flags),
      foreignType: options.foreign?.type,
      runs,
      seed,
      categories: groupChecks(checks),
      summary: { ...summary, durationMs: Math.round(performance.now() - started) },
    };
  };
  if (!probe.ok) return report(undefined);

  const kit = new Harness({ factory, foreign: options.foreign, features: probe.flags, settings });
  const wanted = new Set(options.categories ?? SOURCES.map((s) => s.category));
  const modelOptions = {
    runs,
    maxCommands: options.maxCommands ?? 30,
    modelTimeLimitMs: options.modelTimeLimitMs ?? 5000,
  };
  try {
    for (const source of SOURCES) {
      if (!wanted.has(source.category)) continue;
      for (const spec of source.make(kit, modelOptions)) {
        const since = performance.now();
        record(runCheck(kit, spec), since);
      }
    }
  } finally {
    kit.dispose();
  }
  return report(probe.flags);
}

function runCheck(kit: Harness, spec: CheckSpec): Omit<ConformanceCheck, 'durationMs'> {
  const base = { category: spec.category, name: spec.name };
  try {
    const note = spec.run(kit);
    return { ...base, passed: true, skipped: false, detail: note ?? 'ok' };
  } catch (error) {
    if (isVerdict(error, SKIP_CODE)) return { ...base, passed: true, skipped: true, detail: error.message };
    if (isVerdict(error, VIOLATION_CODE))
      return { ...base, passed: false, skipped: false, detail: error.message };
    // A throw the kit did not expect: the device threw something odd through a path the check
    // did not guard, or the kit has a bug. Either way it must not pass.
    return { ...base, passed: false, skipped: false, detail: `unexpected exception: ${errorMessage(error)}` };
  } finally {
    kit.cleanup();
  }
}

type FeatureProbe = { ok: true; flags: number } | { ok: false; problem: string };

function readFeatures(
  factory: SampleDeviceFactory,
  deviceOptions: DeviceOptionsSource,
  seed: number,
): FeatureProbe {
  const created = attempt(() =>
    factory.create(instanceOptions(deviceOptions, `${factory.type}-probe`, seed)),
  );
  if (!created.ok)
    return { ok: false, problem: `${factory.type}.create() failed: ${describeOutcome(created)}` };
  try {
    const got = attempt(() => created.value.vfio.getMigration());
    if (!got.ok) return { ok: false, problem: `MIGRATION GET failed: ${describeOutcome(got)}` };
    const raw = got.value?.flags;
    if (typeof raw !== 'bigint')
      return { ok: false, problem: `MIGRATION GET returned flags ${String(raw)}, not a u64` };
    if ((raw & ~BigInt(MIG_FEATURE_ALL)) !== 0n) {
      return { ok: false, problem: `unknown VFIO_MIGRATION_* bits in 0x${raw.toString(16)}` };
    }
    const flags = Number(raw);
    if ((flags & MigFeature.STOP_COPY) === 0) {
      return { ok: false, problem: `flags ${migFeatureNames(flags)} lack the mandatory STOP_COPY` };
    }
    return { ok: true, flags };
  } finally {
    attempt(() => created.value.vfio.close());
  }
}

/**
 * Run the kit on several device types, as `softvfio conform` does. The foreign factory of each
 * device is `options.foreign`, else `foreignFor(factory)`, else the next factory of another type.
 */
export function runConformanceSuite(
  factories: readonly SampleDeviceFactory[],
  options: ConformanceOptions & {
    foreignFor?: (factory: SampleDeviceFactory) => SampleDeviceFactory | undefined;
    onDevice?: (report: ConformanceReport) => void;
  } = {},
): ConformanceSuiteReport {
  const { foreignFor, onDevice, ...common } = options;
  const devices = factories.map((factory, i) => {
    const foreign =
      options.foreign ??
      (foreignFor
        ? foreignFor(factory)
        : [...factories.slice(i + 1), ...factories.slice(0, i)].find((other) => other.type !== factory.type));
    const report = runConformance(factory, { ...common, ...(foreign ? { foreign } : {}) });
    onDevice?.(report);
    return report;
  });
  const checks = summarize(devices.flatMap((d) => d.categories.flatMap((c) => c.checks)));
  const failedDevices = devices.filter((d) => !d.summary.ok).map((d) => d.deviceType);
  return {
    devices,
    summary: { devices: devices.length, failedDevices, checks, ok: failedDevices.length === 0 },
  };
}
