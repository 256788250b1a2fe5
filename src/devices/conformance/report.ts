/** The groups a conformance report is made of, in the order they run. */
export const CONFORMANCE_CATEGORIES = [
  'features',
  'transitions',
  'round-trip',
  'precopy',
  'streams',
  'loading',
  'error-reset',
  'model',
] as const;
export type ConformanceCategory = (typeof CONFORMANCE_CATEGORIES)[number];

export const CATEGORY_TITLES: Readonly<Record<ConformanceCategory, string>> = {
  features: 'features and device contract',
  transitions: 'MIG_DEVICE_STATE transitions against the reference FSM',
  'round-trip': 'save -> load round trips',
  precopy: 'VFIO_MIG_GET_PRECOPY_INFO behaviour',
  streams: 'data fd misuse',
  loading: 'loading validation (bad streams must not load)',
  'error-reset': 'ERROR state and VFIO_DEVICE_RESET',
  model: 'model-based random sequences',
};

/** One verdict. A skipped check did not apply (e.g. no foreign factory given); it is not a failure. */
export interface ConformanceCheck {
  readonly category: ConformanceCategory;
  /** Short and stable, unique within its category (`PRE_COPY -> STOP_COPY`). */
  readonly name: string;
  /** False only for a violation; a skipped check is `passed: true, skipped: true`. */
  readonly passed: boolean;
  readonly skipped: boolean;
  /** What was seen: on failure the violation, on success a short note. */
  readonly detail: string;
  readonly durationMs: number;
}

export interface ConformanceSummary {
  readonly total: number;
  readonly passed: number;
  readonly failed: number;
  readonly skipped: number;
  /** True when no check failed. */
  readonly ok: boolean;
}

export interface ConformanceCategoryReport {
  readonly category: ConformanceCategory;
  readonly title: string;
  readonly checks: readonly ConformanceCheck[];
  readonly summary: ConformanceSummary;
}

/** The result of runConformance on one device type. */
export interface ConformanceReport {
  readonly deviceType: string;
  readonly description: string;
  /** VFIO_MIGRATION_* flags the device reported, undefined if MIGRATION GET failed. */
  readonly migrationFlags: number | undefined;
  /** `STOP_COPY|PRE_COPY`, or `unknown`. */
  readonly migrationFeatures: string;
  /** The foreign device type used for cross-type loads, if any. */
  readonly foreignType: string | undefined;
  readonly runs: number;
  readonly seed: number;
  readonly categories: readonly ConformanceCategoryReport[];
  readonly summary: ConformanceSummary & { readonly durationMs: number };
}

/** Several devices, as `softvfio conform` runs them. */
export interface ConformanceSuiteReport {
  readonly devices: readonly ConformanceReport[];
  readonly summary: {
    readonly devices: number;
    readonly failedDevices: readonly string[];
    readonly checks: ConformanceSummary;
    readonly ok: boolean;
  };
}

export function summarize(checks: readonly ConformanceCheck[]): ConformanceSummary {
  const failed = checks.filter((c) => !c.passed).length;
  const skipped = checks.filter((c) => c.skipped).length;
  return {
    total: checks.length,
    passed: checks.length - failed - skipped,
    failed,
    skipped,
    ok: failed === 0,
  };
}

export function groupChecks(checks: readonly ConformanceCheck[]): ConformanceCategoryReport[] {
  return CONFORMANCE_CATEGORIES.map((category) => {
    const mine = checks.filter((c) => c.category === category);
    return { category, title: CATEGORY_TITLES[category], checks: mine, summary: summarize(mine) };
  }).filter((group) => group.checks.length > 0);
}

/** Every check of a report, in run order. */
export function allChecks(report: ConformanceReport): ConformanceCheck[] {
  return report.categories.flatMap((group) => group.checks);
}

/** The checks that failed. */
export function failedChecks(report: ConformanceReport): ConformanceCheck[] {
  return allChecks(report).filter((c) => !c.passed);
}

/** The check `category/name`, e.g. `findCheck(report, 'transitions', 'STOP_COPY -> PRE_COPY')`. */
export function findCheck(
  report: ConformanceReport,
  category: ConformanceCategory,
  name: string,
): ConformanceCheck | undefined {
  return allChecks(report).find((c) => c.category === category && c.name === name);
}

export function isConformanceCategory(name: string): name is ConformanceCategory {
  return (CONFORMANCE_CATEGORIES as readonly string[]).includes(name);
}
