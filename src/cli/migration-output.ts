import { MultiBar, type SingleBar } from 'cli-progress';
import Table from 'cli-table3';
import { toJson } from '../vmm/host/control-protocol.js';
import { formatBytes } from '../vmm/host/sizes.js';
import type { MigrationEvent, MigrationInfo } from '../vmm/migration/migration-info.js';
import type { CommandIo } from './conform-command.js';

const PLAIN = { head: [] as string[], border: [] as string[], compact: true };
const int = (n: number) => n.toLocaleString('en-US');
const ms = (n: number) => `${int(Math.round(n))} ms`;
const mbps = (n: number) => `${n.toFixed(1)} Mbps`;

/** RAM and device bytes together: what the source sent, or the destination received. */
export function transferredBytes(info: MigrationInfo): number {
  return info.ram.transferredBytes + info.vfio.transferredBytes;
}

/** One JSON line of an event: `{"event":"progress","info":{…}}`. */
export function eventJson(event: MigrationEvent): string {
  const { type, ...rest } = event;
  return toJson({ event: type, ...rest });
}

function keyValueTable(rows: readonly (readonly [string, string])[]): string {
  const table = new Table({ style: PLAIN });
  for (const [k, v] of rows) table.push({ [k]: v });
  return table.toString();
}

function errorRows(info: MigrationInfo): [string, string][] {
  const e = info.error;
  if (e === undefined) return [];
  return [
    ['error', e.code],
    ['  phase', e.phase],
    ['  device', e.device ?? '-'],
    ['  errno', e.errno ?? '-'],
    ['  message', e.message],
  ];
}

/** The final (or current) state of a migration: numbers, then devices, channels and the error. */
export function renderMigrationSummary(info: MigrationInfo): string {
  const ram = info.ram;
  const moved = info.role === 'source' ? 'sent' : 'received';
  const rows: [string, string][] = [
    ['status', info.status],
    ['total time', ms(info.totalTimeMs)],
    ['setup time', ms(info.setupTimeMs)],
    [
      'downtime',
      info.downtimeMs !== undefined
        ? ms(info.downtimeMs)
        : info.expectedDowntimeMs !== undefined
          ? `${ms(info.expectedDowntimeMs)} expected`
          : '-',
    ],
    [
      'transferred',
      `${formatBytes(transferredBytes(info))} (RAM ${formatBytes(ram.transferredBytes)}, ` +
        `devices ${formatBytes(info.vfio.transferredBytes)})`,
    ],
    ['iterations', int(ram.dirtySyncCount)],
    ['throughput', mbps(ram.mbps)],
    [
      'RAM',
      `${formatBytes(ram.totalBytes)}: ${int(ram.normalPages)} pages ${moved}, ${int(ram.duplicatePages)} zero, ` +
        `${formatBytes(ram.remainingBytes)} remaining`,
    ],
    [
      `RAM ${moved}`,
      `${formatBytes(ram.precopyBytes)} while running, ${formatBytes(ram.downtimeBytes)} while stopped`,
    ],
  ];
  if (info.cpuThrottlePercentage > 0) rows.push(['vCPU throttle', `${info.cpuThrottlePercentage}%`]);
  if (info.queuedBuffers !== undefined) {
    const q = info.queuedBuffers;
    rows.push([
      'queued buffers',
      `${formatBytes(q.bytes)} now, ${formatBytes(q.peakBytes)} at most, cap ${formatBytes(q.capBytes)}`,
    ]);
  }
  rows.push(...errorRows(info));

  const out = [`Migration of VM ${info.vm} (${info.role})`, keyValueTable(rows)];
  if (info.devices.length > 0) {
    const devices = new Table({
      head: ['device', 'type', 'state', 'precopy', 'stop-copy', 'packets'],
      style: PLAIN,
    });
    for (const d of info.devices) {
      devices.push([
        d.name,
        d.type,
        d.state,
        formatBytes(d.precopyBytes),
        formatBytes(d.stopCopyBytes),
        int(d.packets),
      ]);
    }
    out.push(devices.toString());
  }
  if (info.channels.length > 0) {
    const channels = new Table({ head: ['channel', 'kind', 'bytes'], style: PLAIN });
    for (const c of info.channels) channels.push([c.index, c.kind, formatBytes(c.bytes)]);
    out.push(channels.toString());
  }
  return out.join('\n');
}

/** The text beside the overall bar: status, iteration, RAM, throughput, expected downtime. */
export function overallProgressText(info: MigrationInfo): string {
  const ram = info.ram;
  const parts = [
    info.status,
    `iteration ${ram.dirtySyncCount}`,
    `RAM ${formatBytes(ram.transferredBytes)} of ${formatBytes(ram.totalBytes)}, ${formatBytes(ram.remainingBytes)} dirty`,
    mbps(ram.mbps),
  ];
  if (info.expectedDowntimeMs !== undefined) parts.push(`downtime ~${ms(info.expectedDowntimeMs)}`);
  return parts.join(' | ');
}

/** How the events of a migration are shown while it runs. */
export interface MigrationView {
  event(event: MigrationEvent): void;
  /** Following has ended (normally or not): leave the terminal clean. */
  close(): void;
}

/** Nothing while it runs (the demo's --json prints one document at the end). */
export const silentView: MigrationView = { event: () => {}, close: () => {} };

/** One JSON line per event on stdout. */
export function jsonLinesView(io: CommandIo): MigrationView {
  return { event: (e) => io.out(eventJson(e)), close: () => {} };
}

/**
 * Progress bars on a terminal: one for the migration as a whole (RAM sent against guest RAM)
 * and one per channel (its share of all bytes sent, so an unbalanced channel stands out).
 * Status changes and device states are logged above the bars.
 */
export function progressView(stream: NodeJS.WritableStream): MigrationView {
  const bars = new MultiBar({
    stream,
    format: '{label} [{bar}] {percentage}% | {text}',
    barsize: 30,
    hideCursor: true,
    clearOnComplete: false,
    emptyOnZero: true,
    autopadding: true,
  });
  let overall: SingleBar | undefined;
  const channels = new Map<number, SingleBar>();

  const update = (info: MigrationInfo) => {
    const ram = info.ram;
    const payload = { label: 'migration'.padEnd(10), text: overallProgressText(info) };
    if (overall === undefined) overall = bars.create(ram.totalBytes, 0, payload);
    overall.setTotal(ram.totalBytes);
    overall.update(Math.min(ram.transferredBytes, ram.totalBytes), payload);
    const allBytes = info.channels.reduce((n, c) => n + c.bytes, 0);
    for (const c of info.channels) {
      const text = { label: `channel ${c.index}`.padEnd(10), text: `${c.kind} ${formatBytes(c.bytes)}` };
      let bar = channels.get(c.index);
      if (bar === undefined) {
        bar = bars.create(allBytes, 0, text);
        channels.set(c.index, bar);
      }
      bar.setTotal(allBytes);
      bar.update(c.bytes, text);
    }
  };
  const log = (line: string) => bars.log(`${line}\n`);

  return {
    event(e) {
      switch (e.type) {
        case 'status':
          log(`${e.info.vm}: ${e.status}`);
          update(e.info);
          return;
        case 'progress':
        case 'end':
          update(e.info);
          return;
        case 'pass':
          log(`iteration ${e.iteration}: ${formatBytes(e.dirtyBytes)} dirty`);
          return;
        case 'device-state':
          log(`device ${e.device}: ${e.state}`);
          return;
        case 'throttle':
          log(`vCPU throttle ${e.percent}%`);
          return;
      }
    },
    close() {
      // stop() draws the bars a last time but drops log lines not yet written: flush them first.
      if (bars.isActive) bars.update();
      bars.stop();
    },
  };
}
