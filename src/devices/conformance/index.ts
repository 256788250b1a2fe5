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
