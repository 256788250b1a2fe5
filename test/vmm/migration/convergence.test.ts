// The source's convergence numbers (QEMU's migration_update_counters, migration_rate_limit and
// migration_trigger_throttle) with time passed in: 100 ms slots, the max-bandwidth budget, the
// switchover threshold, expected downtime, the dirty-pages rate and auto-converge.
import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import { ConvergenceMeter, DIRTY_RATE_PERIOD_MS, SLOT_MS } from '../../../src/vmm/migration/convergence.js';
import {
  type MigrationParameters,
  resolveMigrationParameters,
} from '../../../src/vmm/migration/migration-params.js';

const PAGE = 4096;
const MiB = 1024 * 1024;

function meter(params: Partial<MigrationParameters> = {}, start = 0): ConvergenceMeter {
  return new ConvergenceMeter(resolveMigrationParameters(params), start);
}

describe('ConvergenceMeter: 100 ms slots', () => {
  test('the constants are QEMU’s', () => {
    assert.equal(SLOT_MS, 100);
    assert.equal(DIRTY_RATE_PERIOD_MS, 1000);
  });

  test('bandwidth, mbps, pages/s and the threshold are computed when a slot of ≥ 100 ms ends', () => {
    const m = meter({ maxBandwidthBytesPerSec: 0 }, 1000);
    assert.equal(m.bandwidthBytesPerMs, 0);
    assert.equal(m.thresholdBytes, 0, 'nothing measured yet: switch over only with nothing pending');
    m.sent(1_000_000, 200);
    m.budgetLeft(1099);
    assert.equal(m.bandwidthBytesPerMs, 0, 'the slot has not ended at 99 ms');
    m.budgetLeft(1100);
    assert.equal(m.bandwidthBytesPerMs, 10_000);
    assert.equal(m.mbps, 80);
    assert.equal(m.pagesPerSecond, 2000);
    assert.equal(m.thresholdBytes, 10_000 * 300, 'bandwidth × downtime-limit');
    assert.equal(m.slotEndMs(), 1200);

    // a longer slot divides by its real length
    m.sent(500_000, 10);
    m.budgetLeft(1350);
    assert.equal(m.bandwidthBytesPerMs, 2000);
    assert.equal(m.mbps, 16);
    assert.equal(m.pagesPerSecond, 40);
    assert.equal(m.slotEndMs(), 1450);

    // an idle slot measures zero
    m.budgetLeft(1500);
    assert.equal(m.bandwidthBytesPerMs, 0);
    assert.equal(m.thresholdBytes, 0);
  });

  test('the threshold follows downtime-limit', () => {
    const m = meter({ maxBandwidthBytesPerSec: 0, downtimeLimitMs: 50 });
    m.sent(100_000);
    m.budgetLeft(100);
    assert.equal(m.thresholdBytes, 1000 * 50);
  });

  test('max-bandwidth: a budget of max-bandwidth / 10 per slot, renewed when the slot ends', () => {
    const m = meter({ maxBandwidthBytesPerSec: 10 * MiB });
    assert.equal(m.budgetLeft(0), MiB);
    m.sent(MiB / 4);
    assert.equal(m.budgetLeft(50), (3 * MiB) / 4);
    m.sent(MiB);
    assert.equal(m.budgetLeft(99), -MiB / 4, 'over budget: the sender sleeps until slotEndMs()');
    assert.equal(m.slotEndMs(), 100);
    assert.equal(m.budgetLeft(100), MiB, 'a new slot, a new budget');
    // the default is QEMU's MAX_THROTTLE, 128 MiB/s
    assert.equal(meter().budgetLeft(0), (128 * MiB) / 10);
  });

  test('max-bandwidth 0 is unlimited', () => {
    const m = meter({ maxBandwidthBytesPerSec: 0 });
    m.sent(10 * 1024 * MiB);
    assert.equal(m.budgetLeft(10), Infinity);
  });

  test('avail-switchover-bandwidth replaces the measured bandwidth in the threshold', () => {
    const m = meter({ maxBandwidthBytesPerSec: 0, availSwitchoverBandwidthBytesPerSec: 2_000_000 });
    assert.equal(m.thresholdBytes, 2000 * 300, 'before anything is measured');
    m.sent(50_000_000);
    m.budgetLeft(100);
    assert.equal(m.bandwidthBytesPerMs, 500_000, 'still measured and reported');
    assert.equal(m.thresholdBytes, 2000 * 300);
  });

  test('expected downtime = dirty bytes at the last sync / bandwidth, once > 10 000 bytes went in a slot', () => {
    const m = meter({ maxBandwidthBytesPerSec: 0 });
    assert.equal(m.expectedDowntimeMs, undefined);
    assert.equal(m.synced(10, 1000, PAGE), undefined);
    m.sent(10_000);
    m.budgetLeft(100);
    assert.equal(m.expectedDowntimeMs, undefined, 'exactly 10 000 bytes in the slot: not updated');
    m.sent(1_000_000);
    m.budgetLeft(200);
    assert.equal(m.bandwidthBytesPerMs, 10_000);
    assert.equal(m.expectedDowntimeMs, Math.round((1000 * PAGE) / 10_000));
    m.synced(250, 50, PAGE);
    m.sent(2_000_000);
    m.budgetLeft(300);
    assert.equal(m.expectedDowntimeMs, Math.round((50 * PAGE) / 20_000));
    // an idle slot keeps the last estimate
    m.budgetLeft(400);
    assert.equal(m.expectedDowntimeMs, Math.round((50 * PAGE) / 20_000));
  });

  test('a sync also ends a slot that is due', () => {
    const m = meter({ maxBandwidthBytesPerSec: 0 });
    m.sent(200_000);
    m.synced(100, 0, PAGE);
    assert.equal(m.bandwidthBytesPerMs, 2000);
  });
});

describe('ConvergenceMeter: dirty-pages rate and auto-converge', () => {
  test('the dirty-pages rate is computed only over periods of ≥ 1 s', () => {
    const m = meter();
    m.synced(300, 100, PAGE);
    m.synced(600, 100, PAGE);
    assert.equal(m.dirtyPagesRate, 0);
    m.synced(999, 100, PAGE);
    assert.equal(m.dirtyPagesRate, 0, 'a period of 999 ms is not one');
    m.synced(1000, 100, PAGE);
    assert.equal(m.dirtyPagesRate, 400, '400 pages over exactly 1 s');
    m.synced(2500, 300, PAGE);
    assert.equal(m.dirtyPagesRate, 200, '300 pages over 1.5 s');
  });

  /** One ≥ 1 s period: `sent` bytes sent, then a sync finding `dirtyBytes` dirty. */
  function period(m: ConvergenceMeter, at: number, sent: number, dirtyBytes: number): number | undefined {
    m.sent(sent);
    return m.synced(at, dirtyBytes / PAGE, PAGE);
  }

  const over = 1000 * PAGE; // dirtied bytes in an "over" period
  const sentBytes = over; // dirtied = 100 % of sent > 50 %

  test('auto-converge throttles at every second period over the threshold, in a row or not (QEMU)', () => {
    const m = meter({ autoConverge: true });
    assert.equal(period(m, 1000, sentBytes, over), undefined, 'one period over');
    assert.equal(period(m, 2000, sentBytes, 0), undefined, 'under: the count stays (dirty_rate_high_cnt)');
    assert.equal(m.throttlePercent, 0);
    assert.equal(period(m, 3000, sentBytes, over), 20, 'the second over: cpu-throttle-initial');
    assert.equal(m.throttlePercent, 20);
    assert.equal(period(m, 4000, sentBytes, over), undefined, 'the count restarts after a throttle');
    assert.equal(period(m, 5000, sentBytes, 0), undefined);
    assert.equal(period(m, 6000, sentBytes, 0), undefined);
    assert.equal(period(m, 7000, sentBytes, over), 30, '+ cpu-throttle-increment');
    assert.equal(m.throttlePercent, 30);
  });

  test('the check is dirtied > threshold % of sent, over the whole period', () => {
    const m = meter({ autoConverge: true, throttleTriggerThresholdPercent: 50 });
    // exactly 50 %: not over
    assert.equal(period(m, 1000, 2 * over, over), undefined);
    assert.equal(period(m, 2000, 2 * over, over), undefined);
    assert.equal(m.throttlePercent, 0);
    // bytes and pages of short periods add up: two half-second syncs make one period
    m.sent(over);
    assert.equal(m.synced(2500, over / 2 / PAGE, PAGE), undefined);
    assert.equal(m.synced(3000, over / 2 / PAGE + 1, PAGE), undefined, 'first period over');
    assert.equal(period(m, 4000, over, over), 20);
  });

  test('throttle steps: initial, + increment, capped at max-cpu-throttle, then no change', () => {
    const m = meter({
      autoConverge: true,
      cpuThrottleInitialPercent: 30,
      cpuThrottleIncrementPercent: 25,
      maxCpuThrottlePercent: 70,
    });
    const steps: (number | undefined)[] = [];
    for (let i = 1; i <= 10; i++) steps.push(period(m, i * 1000, sentBytes, over));
    assert.deepEqual(steps, [
      undefined,
      30,
      undefined,
      55,
      undefined,
      70,
      undefined,
      undefined,
      undefined,
      undefined,
    ]);
    assert.equal(m.throttlePercent, 70);
  });

  test('the defaults climb 20, 30, … 90, 99', () => {
    const m = meter({ autoConverge: true });
    const steps: number[] = [];
    for (let i = 1; i <= 30; i++) {
      const t = period(m, i * 1000, sentBytes, over);
      if (t !== undefined) steps.push(t);
    }
    assert.deepEqual(steps, [20, 30, 40, 50, 60, 70, 80, 90, 99]);
  });

  test('never a throttle with the auto-converge capability off, but the dirty rate is still measured', () => {
    const m = meter();
    for (let i = 1; i <= 10; i++) assert.equal(period(m, i * 1000, 1, over), undefined);
    assert.equal(m.throttlePercent, 0);
    assert.equal(m.dirtyPagesRate, 1000);
  });
});
