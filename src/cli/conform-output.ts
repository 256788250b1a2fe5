import Table from 'cli-table3';
import {
  allChecks,
  type ConformanceReport,
  type ConformanceSuiteReport,
  failedChecks,
} from '../devices/conformance/index.js';

const PLAIN = { head: [] as string[], border: [] as string[] };
const DETAIL_WIDTH = 80;

/** One device: counts per category, then every failed check with what was seen. */
export function renderDeviceReport(report: ConformanceReport): string {
  const lines: string[] = [];
  const status = report.summary.ok ? 'PASS' : 'FAIL';
  lines.push(
    `${status} ${report.deviceType} (${report.migrationFeatures}) - ${report.description}`,
    `     foreign: ${report.foreignType ?? 'none'}, random runs: ${report.runs}, seed: ${report.seed}, ` +
      `${report.summary.durationMs} ms`,
  );
  const counts = new Table({
    head: ['category', 'passed', 'failed', 'skipped'],
    style: { ...PLAIN, compact: true },
  });
  for (const group of report.categories) {
    const s = group.summary;
    counts.push([group.category, s.passed, s.failed, s.skipped]);
  }
  const s = report.summary;
  counts.push(['total', s.passed, s.failed, s.skipped]);
  lines.push(counts.toString());

  const failed = failedChecks(report);
  if (failed.length > 0) {
    const table = new Table({
      head: ['failed check', 'detail'],
      colWidths: [40, DETAIL_WIDTH],
      wordWrap: true,
      style: PLAIN,
    });
    for (const c of failed) table.push([`${c.category}/${c.name}`, c.detail]);
    lines.push(table.toString());
  }
  const skipped = allChecks(report).filter((c) => c.skipped);
  for (const c of skipped) lines.push(`skipped ${c.category}/${c.name}: ${c.detail}`);
  return lines.join('\n');
}

export function renderSuiteSummary(suite: ConformanceSuiteReport): string {
  const { summary } = suite;
  if (summary.devices === 0) return 'conformance: no sample devices to check';
  const c = summary.checks;
  const verdict = summary.ok
    ? `all ${summary.devices} device(s) conform`
    : `${summary.failedDevices.length} of ${summary.devices} device(s) violate the uAPI: ${summary.failedDevices.join(', ')}`;
  return `conformance: ${verdict} (${c.passed} passed, ${c.failed} failed, ${c.skipped} skipped)`;
}
