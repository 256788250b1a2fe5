import { Bench } from 'tinybench';
import type { MigrationDriver, ResumingSession, SavingSession } from '../src/kernel/vfio/migration-driver.js';
import { VfioDevice } from '../src/kernel/vfio/vfio-device.js';
import { MIG_FEATURE_ALL, MigState } from '../src/uapi/migration.js';
import type { BenchResult } from './report.js';

/** A driver whose arcs do no work, so the figure is the VFIO core's own cost per transition. */
function nullDriver(): MigrationDriver & { arcs: number } {
  const session: SavingSession & ResumingSession = {
    read: () => 0,
    precopyInfo: () => ({ initialBytes: 0n, dirtyBytes: 0n }),
    enterStopCopy: () => {},
    end: () => {},
    write: () => {},
    finish: () => {},
  };
  const driver = {
    deviceType: 'null',
    migrationFlags: MIG_FEATURE_ALL,
    dmaLogging: false,
    arcs: 0,
    stop: () => void driver.arcs++,
    start: () => void driver.arcs++,
    setP2pQuiesced: () => void driver.arcs++,
    startSaving: () => (driver.arcs++, session),
    startResuming: () => (driver.arcs++, session),
    stopCopyLength: () => 0n,
    reset: () => {},
  };
  return driver;
}

// The longest paths of a STOP_COPY|P2P|PRE_COPY device (spec 1.5), chained into a cycle:
// RUNNING→STOP_COPY (3 arcs), →RESUMING (2), →PRE_COPY (4), →RESUMING (4), →RUNNING (3).
const CYCLE = [MigState.STOP_COPY, MigState.RESUMING, MigState.PRE_COPY, MigState.RESUMING, MigState.RUNNING];
const ARCS_PER_CYCLE = 3 + 2 + 4 + 4 + 3;

export async function benchTransitions(): Promise<BenchResult> {
  const driver = nullDriver();
  const device = new VfioDevice({ name: 'bench0', driver });
  const bench = new Bench({ time: 1000, warmup: true });
  bench.add('longest-path cycle', () => {
    for (const target of CYCLE) device.setMigDeviceState(target);
  });
  driver.arcs = 0;
  await bench.run();
  const task = bench.tasks[0]!;
  const result = task.result as { throughput?: { mean: number } } | undefined;
  const cyclesPerSec = result?.throughput?.mean ?? 0;
  if (driver.arcs === 0 || device.state !== MigState.RUNNING)
    throw new Error('transition benchmark did not run');
  return {
    title: 'Migration state transitions (VFIO core, no-op driver)',
    rows: [
      { metric: 'SET calls per second (paths of 2-4 arcs)', value: fmt(cyclesPerSec * CYCLE.length) },
      { metric: 'single arcs per second', value: fmt(cyclesPerSec * ARCS_PER_CYCLE) },
    ],
    notes: [
      'Cycle RUNNING→STOP_COPY→RESUMING→PRE_COPY→RESUMING→RUNNING on a STOP_COPY|P2P|PRE_COPY device: the longest paths of the FSM, each SET opening or closing a data stream.',
    ],
  };
}

const fmt = (n: number) => Math.round(n).toLocaleString('en-US');
