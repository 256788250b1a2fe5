import { setTimeout as sleep } from 'node:timers/promises';
import { type Command, InvalidArgumentError, Option } from 'commander';
import Table from 'cli-table3';
import { VfioError } from '../uapi/error.js';
import { GUEST_PAGE_BYTES } from '../vmm/machine/guest-page.js';
import { MAX_RAM_BLOCK_BYTES } from '../vmm/machine/ram-block.js';
import { toJson } from '../vmm/host/control-protocol.js';
import { formatBytes, parseByteValue } from '../vmm/host/sizes.js';
import { parseVmDefinition, VM_DEFINITION_LIMITS } from '../vmm/host/vm-definition.js';
import type { MigrationInfo } from '../vmm/migration/migration-info.js';
import { type MigrationParameters, resolveMigrationParameters } from '../vmm/migration/migration-params.js';
import { Exit, reportError } from './cli-common.js';
import { type DemoHost, spawnDemoHost } from './demo-hosts.js';
import { followMigration, type MigrationIo, watchSignals } from './migrate-command.js';
import { progressView, renderMigrationSummary, silentView, transferredBytes } from './migration-output.js';

export interface DemoOptions {
  json?: boolean;
  /** Guest RAM, bytes. */
  ram: number;
  /** What each vCPU dirties, MiB/s. */
  dirtyRate: number;
  channels: number;
  downtimeLimit: number;
  /** Bytes per second; 0 = unlimited. */
  maxBandwidth: number;
  /** Keep the hosts (and the migrated VM running) until SIGINT/SIGTERM. */
  keep?: boolean;
}

const DEMO_VM = 'demo-vm';
const MIN_RAM_BYTES = 64 * 2 ** 20;

// Option values, checked as the command line is read (commander reports them, exit 2).

export function ramOption(value: string): number {
  const n = parseByteValue(value);
  if (
    n === undefined ||
    n < MIN_RAM_BYTES ||
    n > MAX_RAM_BLOCK_BYTES ||
    n % BigInt(GUEST_PAGE_BYTES) !== 0n
  ) {
    throw new InvalidArgumentError(
      `expected a size such as 1GiB or 512MiB, a multiple of 4 KiB from ${formatBytes(MIN_RAM_BYTES)} to ` +
        formatBytes(MAX_RAM_BLOCK_BYTES),
    );
  }
  return Number(n);
}

export function dirtyRateOption(value: string): number {
  const n = Number(value);
  if (!/^\d+(\.\d+)?$/.test(value) || !(n > 0) || n > VM_DEFINITION_LIMITS.dirtyRateMiBps) {
    throw new InvalidArgumentError(
      `expected MiB/s per vCPU, more than 0 and at most ${VM_DEFINITION_LIMITS.dirtyRateMiBps}`,
    );
  }
  return n;
}

function integerOption(min: number, max: number): (value: string) => number {
  return (value) => {
    const n = Number(value);
    if (!/^\d{1,16}$/.test(value) || n < min || n > max) {
      throw new InvalidArgumentError(`expected an integer from ${min} to ${max}`);
    }
    return n;
  };
}

/** `--max-bandwidth`: bytes per second as a size (`512MiB`, `512MiB/s`), 0 for no limit. */
export function bandwidthOption(value: string): number {
  const n = parseByteValue(value.replace(/\/s$/, ''));
  if (n === undefined || n > BigInt(Number.MAX_SAFE_INTEGER)) {
    throw new InvalidArgumentError('expected bytes per second such as 512MiB or 104857600, 0 for no limit');
  }
  return Number(n);
}

/** The migration parameters the demo's options set (the rest are the engine's defaults). */
export function demoParameters(options: DemoOptions): Partial<MigrationParameters> {
  const params: Partial<MigrationParameters> = {
    downtimeLimitMs: options.downtimeLimit,
    maxBandwidthBytesPerSec: options.maxBandwidth,
    multifdChannels: options.channels,
  };
  resolveMigrationParameters(params);
  return params;
}

/**
 * The demo VM: guest RAM dirtied by two vCPUs, a nic, an accelerator with device memory and a
 * basic device, on iommufd with per-user pin accounting (the shape of examples/vm-1g.json).
 * Checked here, so a bad combination of options is reported before any host starts.
 */
export function demoVmDefinition(options: DemoOptions): unknown {
  const workload = (seed: number) => ({
    dirtyRateMiBps: options.dirtyRate,
    pattern: { kind: 'random' },
    seed,
  });
  const definition = {
    name: DEMO_VM,
    iommu: 'iommufd',
    accounting: 'user',
    uid: 107,
    memlockLimitBytes: 2 * options.ram,
    ram: [{ name: 'pc.ram', sizeBytes: options.ram }],
    vcpus: { count: 2, workload: [workload(7), workload(8)] },
    devices: [
      { type: 'nic', name: 'nic0', seed: 3 },
      { type: 'accel', name: 'accel0', seed: 4, memoryBytes: 64 * 2 ** 20 },
      { type: 'basic', name: 'basic0', seed: 5 },
    ],
    guestDriverIntervalMs: 10,
  };
  parseVmDefinition(definition, 'the demo VM');
  return definition;
}

export interface DemoCheck {
  check: string;
  ok: boolean;
  detail: string;
}

/** What `softvfio demo --json` prints: the verdict, the headline numbers, both final reports. */
export interface DemoReport {
  verified: boolean;
  downtimeMs: number | null;
  totalTimeMs: number;
  setupTimeMs: number;
  /** RAM and device bytes the source sent. */
  transferredBytes: number;
  iterations: number;
  mbps: number;
  digest: { source: string | null; destination: string | null };
  checks: DemoCheck[];
  source: MigrationInfo;
  destination: MigrationInfo | null;
  parameters: Partial<MigrationParameters>;
  vm: { name: string; ramBytes: number; vcpus: number; dirtyRateMiBpsPerVcpu: number; devices: string[] };
}

export interface DemoDeps {
  /** Start a software host named `name`. */
  startHost: (name: string) => Promise<DemoHost>;
  io: MigrationIo;
  /** How long the VM runs before it migrates (1 s). */
  warmupMs?: number;
  /** How long the destination may take to end once the source has (10 s). */
  destinationTimeoutMs?: number;
}

const migrationOutcome = (info: MigrationInfo | null) =>
  info === null ? 'unknown' : info.error ? `${info.status}: ${info.error.message}` : info.status;

/**
 * The demo with its hosts up: create the VM on both, run it on the source, migrate it, check the
 * outcome. Errors of the hosts propagate; a migration that fails is a report with checks failed.
 */
async function migrateAndVerify(
  [source, destination]: readonly [DemoHost, DemoHost],
  plan: { options: DemoOptions; definition: unknown; parameters: Partial<MigrationParameters> },
  deps: DemoDeps,
  signals: ReturnType<typeof watchSignals>,
  say: (line: string) => void,
): Promise<DemoReport> {
  const { io } = deps;
  const { options, definition, parameters } = plan;
  const interrupted = () => {
    if (signals.cancel.aborted)
      throw new VfioError('ERR_ABORTED', 'interrupted before the migration started');
  };
  await source.api.createVm(definition);
  await destination.api.createVm(definition);
  await source.api.startVm(DEMO_VM);
  say(
    `VM ${DEMO_VM} running on the source: ${formatBytes(options.ram)} RAM, 2 vCPUs dirtying ` +
      `${options.dirtyRate} MiB/s each, nic0 accel0 basic0`,
  );
  await sleep(deps.warmupMs ?? 1000, undefined, { signal: signals.cancel }).catch(() => {});
  interrupted();

  // Paused after the hand-off (QEMU -S): the digests are compared before the destination runs.
  const { uri } = await destination.api.incoming(DEMO_VM, {
    uri: 'tcp:127.0.0.1:0',
    autostart: false,
    prealloc: true,
  });
  // Followed from before the migration starts, so that no event is missed; stopped (then asked
  // once) if it has not ended a while after the source.
  const stopDestination = new AbortController();
  const destinationEnd = followMigration(
    destination.api,
    DEMO_VM,
    silentView,
    { stop: stopDestination.signal },
    io,
  ).catch(() => destination.api.queryMigration(DEMO_VM).catch(() => null));
  let sourceInfo: MigrationInfo;
  let destinationInfo: MigrationInfo | null;
  try {
    interrupted();
    say(`migrating to ${uri} (destination host ${destination.address})`);
    await source.api.migrate(DEMO_VM, { uri, params: parameters });
    const view = !options.json && io.isTTY ? progressView(io.progressStream) : silentView;
    sourceInfo = await followMigration(source.api, DEMO_VM, view, signals, io);
    const timer = setTimeout(() => stopDestination.abort(), deps.destinationTimeoutMs ?? 10_000);
    destinationInfo = await destinationEnd;
    clearTimeout(timer);
  } finally {
    stopDestination.abort();
  }

  const checks: DemoCheck[] = [];
  const check = (name: string, ok: boolean, detail: string) => checks.push({ check: name, ok, detail });
  check('source migration completed', sourceInfo.status === 'completed', migrationOutcome(sourceInfo));
  check(
    'destination migration completed',
    destinationInfo?.status === 'completed',
    migrationOutcome(destinationInfo),
  );
  const digest: DemoReport['digest'] = { source: null, destination: null };
  if (checks.every((c) => c.ok)) {
    const [onSource, onDestination] = await Promise.all([
      source.api.vmStatus(DEMO_VM),
      destination.api.vmStatus(DEMO_VM),
    ]);
    check('source VM migrated (stopped for good)', onSource.state === 'migrated', onSource.state);
    check('destination VM loaded and stopped', onDestination.state === 'stopped', onDestination.state);
    // Both hold still: the destination's RAM and devices must equal the source's.
    const [a, b] = await Promise.all([source.api.vmDigest(DEMO_VM), destination.api.vmDigest(DEMO_VM)]);
    digest.source = a.digest;
    digest.destination = b.digest;
    check(
      'guest RAM and device state identical',
      a.digest === b.digest,
      a.digest === b.digest ? a.digest : `${a.digest} on the source, ${b.digest} on the destination`,
    );
    const started = await destination.api.startVm(DEMO_VM);
    check('destination VM runs', started.state === 'running', started.state);
  }
  return {
    verified: checks.every((c) => c.ok),
    downtimeMs: sourceInfo.downtimeMs ?? null,
    totalTimeMs: sourceInfo.totalTimeMs,
    setupTimeMs: sourceInfo.setupTimeMs,
    transferredBytes: transferredBytes(sourceInfo),
    iterations: sourceInfo.ram.dirtySyncCount,
    mbps: sourceInfo.ram.mbps,
    digest,
    checks,
    source: sourceInfo,
    destination: destinationInfo,
    parameters,
    vm: {
      name: DEMO_VM,
      ramBytes: options.ram,
      vcpus: 2,
      dirtyRateMiBpsPerVcpu: options.dirtyRate,
      devices: ['nic0', 'accel0', 'basic0'],
    },
  };
}

const PLAIN = { head: [] as string[], border: [] as string[], compact: true };

/** The demo's outcome for people: the verdict, the checks, the numbers, both sides' summaries. */
export function renderDemoReport(report: DemoReport): string {
  const verdict = report.verified
    ? `verified: VM ${report.vm.name} arrived with identical guest RAM and device state`
    : `NOT verified: ${report.checks
        .filter((c) => !c.ok)
        .map((c) => c.check)
        .join(', ')} failed`;
  const checks = new Table({ head: ['check', 'result', 'detail'], style: PLAIN });
  for (const c of report.checks) checks.push([c.check, c.ok ? 'ok' : 'FAILED', c.detail]);
  const p = report.parameters;
  const numbers = new Table({ style: PLAIN });
  for (const [k, v] of [
    ['downtime', report.downtimeMs === null ? '-' : `${report.downtimeMs} ms`],
    ['total time', `${report.totalTimeMs} ms (setup ${report.setupTimeMs} ms)`],
    ['transferred', formatBytes(report.transferredBytes)],
    ['iterations', String(report.iterations)],
    ['throughput', `${report.mbps.toFixed(1)} Mbps`],
    [
      'parameters',
      `downtime-limit ${p.downtimeLimitMs} ms, max-bandwidth ` +
        `${p.maxBandwidthBytesPerSec ? `${formatBytes(p.maxBandwidthBytesPerSec)}/s` : 'unlimited'}, ` +
        `multifd-channels ${p.multifdChannels}`,
    ],
  ]) {
    numbers.push({ [k!]: v! });
  }
  const out = [`softvfio demo: ${verdict}`, checks.toString(), numbers.toString(), '', 'Source'];
  out.push(renderMigrationSummary(report.source));
  if (report.destination !== null) out.push('', 'Destination', renderMigrationSummary(report.destination));
  return out.join('\n');
}

/**
 * `softvfio demo`: two hosts, one VM migrated live from the first to the second, checked.
 * The hosts are shut down whatever happens (after SIGINT/SIGTERM with --keep). Exit 0 only when
 * verified, 1 otherwise.
 */
export async function demoCommand(options: DemoOptions, deps: DemoDeps): Promise<number> {
  const { io } = deps;
  const json = options.json ?? false;
  const say = (line: string) => {
    if (!json) io.err(`[demo] ${line}`);
  };
  let plan: Parameters<typeof migrateAndVerify>[1];
  try {
    plan = { options, definition: demoVmDefinition(options), parameters: demoParameters(options) };
  } catch (err) {
    return reportError(io, 'demo', json, err);
  }
  let migrated = false;
  const signals = watchSignals(io, () =>
    migrated ? 'shutting the hosts down' : 'stopping the demo, cancelling a migration under way',
  );
  const hosts: DemoHost[] = [];
  try {
    const names = [`demo-src-${process.pid}`, `demo-dst-${process.pid}`] as const;
    const started = await Promise.allSettled(names.map((name) => deps.startHost(name)));
    for (const s of started) if (s.status === 'fulfilled') hosts.push(s.value);
    for (const s of started) if (s.status === 'rejected') throw s.reason;
    const pair = hosts as [DemoHost, DemoHost];
    say(`hosts ${names[0]} on ${pair[0].address} and ${names[1]} on ${pair[1].address}`);

    const report = await migrateAndVerify(pair, plan, deps, signals, say);
    migrated = true;
    io.out(json ? toJson(report, 2) : renderDemoReport(report));
    if (options.keep && !signals.cancel.aborted) {
      const where = pair.map((h) => h.address.replace(/^tcp:/, ''));
      say(`hosts kept: --connect ${where[0]} (source), --connect ${where[1]} (destination); Ctrl-C ends`);
      await new Promise((resolve) => signals.cancel.addEventListener('abort', resolve, { once: true }));
    }
    return report.verified ? Exit.OK : Exit.FAILED;
  } catch (err) {
    // The input was checked above: whatever fails now is a failure of the run, not bad input.
    reportError(io, 'demo', json, err);
    return Exit.FAILED;
  } finally {
    migrated = true;
    if (hosts.length > 0) say('shutting the hosts down');
    await Promise.all(hosts.map((h) => h.shutdown()));
    // Signals stay caught until here: a second Ctrl-C must not leave the hosts behind.
    signals.dispose();
  }
}

export function registerDemoCommand(
  program: Command,
  io: MigrationIo,
  setExit: (code: number) => void,
): void {
  const option = <T>(
    flags: string,
    description: string,
    parse: (value: string) => T,
    value: T,
    shown: string,
  ) => new Option(flags, description).argParser(parse).default(value, shown);
  program
    .command('demo')
    .description(
      'start two software hosts, live-migrate a VM with assigned devices from one to the other and ' +
        'check that guest RAM and device state arrived exactly',
    )
    .option('--json', 'print one JSON report instead of progress bars and tables')
    .addOption(option('--ram <size>', 'guest RAM', ramOption, 2 ** 30, '1GiB'))
    .addOption(
      option('--dirty-rate <MiB/s>', 'RAM each of the 2 vCPUs dirties per second', dirtyRateOption, 64, '64'),
    )
    .addOption(option('--channels <n>', 'multifd channels', integerOption(1, 255), 2, '2'))
    .addOption(
      option('--downtime-limit <ms>', 'longest acceptable VM stop', integerOption(0, 2_000_000), 300, '300'),
    )
    .addOption(
      option('--max-bandwidth <size/s>', 'migration bandwidth cap, 0 = unlimited', bandwidthOption, 0, '0'),
    )
    .option('--keep', 'keep the hosts and the migrated VM running until Ctrl-C')
    .action(async (options: DemoOptions) =>
      setExit(await demoCommand(options, { startHost: (name) => spawnDemoHost(name), io })),
    );
}
