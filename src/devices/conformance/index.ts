/**
 * The VFIO migration conformance kit: run it on your own driver.
 *
 *   import { runConformance, failedChecks } from 'softvfio/…/devices/conformance/index.js';
 *   const report = runConformance(myFactory, { foreign: otherFactory, runs: 100 });
 *   if (!report.summary.ok) for (const c of failedChecks(report)) log(`${c.category}/${c.name}: ${c.detail}`);
 *
 * `myFactory` is a SampleDeviceFactory: `create(options)` returns `{ vfio, work(units), digest() }`.
 * The kit reads the migration flags with MIGRATION GET and checks, on fresh instances, every
 * (current, target) pair against its own reference FSM (reference-fsm.ts), save/load round
 * trips, precopy info, data fd misuse, refusal of bad streams, ERROR and reset, and random
 * sequences (fast-check) against a reference model. It drives devices only through VfioDevice's
 * typed helpers (getMigration, getMigDeviceState, setMigDeviceState, getMigDataSize, reset,
 * close) and the data fds' methods. It never throws because of the device; on the command line:
 * `softvfio conform [--device NAME] [--json] [--runs N] [--seed N] [--module PATH]`.
 */
export type { CheckSpec } from './check.js';
export { type FdKind, fdKind, probeFd } from './data-fds.js';
export { type DeviceOptionsSource, Harness, type HarnessSettings, type SavedStream } from './harness.js';
export {
  type ArcEffect,
  hasSession,
  isSavingGroup,
  type ReferenceArc,
  type ReferenceOutcome,
  referenceArcs,
  referenceHasState,
  referenceRouteFromRunning,
  referenceSetState,
  referenceStates,
} from './reference-fsm.js';
export {
  allChecks,
  CATEGORY_TITLES,
  CONFORMANCE_CATEGORIES,
  type ConformanceCategory,
  type ConformanceCategoryReport,
  type ConformanceCheck,
  type ConformanceReport,
  type ConformanceSuiteReport,
  type ConformanceSummary,
  failedChecks,
  findCheck,
  isConformanceCategory,
} from './report.js';
export {
  type ConformanceOptions,
  DEFAULT_MODEL_RUNS,
  runConformance,
  runConformanceSuite,
} from './run-conformance.js';
