/**
 * End-to-end convergence and statistics: auto-converge throttling the vCPUs (and not without the
 * capability), max-bandwidth holding a migration to its rate, switchover-ack holding the
 * switchover until the destination has the devices' initial data, and query() during a
 * migration. Only lower bounds on time are asserted: a slow machine makes things longer, never
 * shorter.
 */
import assert from 'node:assert/strict';
import { randomFillSync } from 'node:crypto';
import { after, describe, test, type TestContext } from 'node:test';
import type { Machine } from '../../../src/vmm/machine/machine.js';
import { IncomingMigration } from '../../../src/vmm/migration/destination.js';
import { MigrationErrorCode } from '../../../src/vmm/migration/migration-error.js';
import type { MigrationInfo } from '../../../src/vmm/migration/migration-info.js';
import { OutgoingMigration } from '../../../src/vmm/migration/source.js';
import {
  assertDiscarded,
  assertRolledBack,
  createVm,
  destroyAll,
  MiB,
  record,
  type VmOptions,
  waitUntil,
} from './e2e-helpers.js';

after(destroyAll);

/**
 * A guest that cannot converge at 32 MiB/s: 4 vCPUs dirtying a 16 MiB working set as fast as they
 * can (every pass finds it all dirty again). Device ticks every 50 ms keep the devices' precopy
 * data small beside the RAM, so dirtied RAM stays above half of what is sent: auto-converge's
 * trigger (throttle-trigger-threshold 50 %).
 */
const HOT_GUEST: VmOptions = {
  vcpus: 4,
  dirtyRateMiBps: 0,
  workingSetBytes: 16 * MiB,
  guestDriverIntervalMs: 50,
};
const HOT_BANDWIDTH = 32 * MiB;

/**
 * query() samples of one migration, in order: every counter only grows, the channels (main and
 * `multifd` multifd channels) are listed with bytes that only grow.
 */
function assertMonotonic(samples: readonly MigrationInfo[], multifd: number): void {
  const channels = Array.from({ length: multifd + 1 }, (_, i) => [i, i === 0 ? 'main' : 'multifd']);
  for (let i = 1; i < samples.length; i++) {
    const [p, s] = [samples[i - 1]!, samples[i]!];
    assert.ok(s.totalTimeMs >= p.totalTimeMs);
    assert.ok(s.ram.transferredBytes >= p.ram.transferredBytes, 'ram.transferred grows');
    assert.ok(s.ram.normalPages >= p.ram.normalPages);
    assert.ok(s.ram.dirtySyncCount >= p.ram.dirtySyncCount, 'dirty-sync-count grows');
    assert.ok(s.vfio.transferredBytes >= p.vfio.transferredBytes, 'vfio.transferred grows');
    assert.deepEqual(
      s.channels.map((c) => [c.index, c.kind]),
      channels,
    );
    s.channels.forEach((c, k) => assert.ok(c.bytes >= p.channels[k]!.bytes, `channel ${k} bytes grow`));
  }
  for (const s of samples) {
    assert.ok(s.ram.remainingBytes >= 0 && s.ram.remainingBytes <= s.ram.totalBytes);
    assert.ok(
      s.channels.reduce((n, c) => n + c.bytes, 0) >= s.ram.transferredBytes + s.vfio.transferredBytes,
      'the channels carried all RAM and device bytes',
    );
  }
}

async function hotPair(t: TestContext): Promise<{ src: Machine; dst: Machine; incoming: IncomingMigration }> {
  const src = createVm(t, HOT_GUEST);
  const dst = createVm(t, HOT_GUEST);
  await src.start();
  const incoming = await IncomingMigration.listen(dst, { autostart: false });
  return { src, dst, incoming };
}

describe('auto-converge', { timeout: 120_000 }, () => {
  test('throttles the vCPUs to cpu-throttle-initial (20), then +increment (30); cancel lifts it', async (t) => {
    const { src, dst, incoming } = await hotPair(t);
    const out = OutgoingMigration.start(src, {
      uri: `tcp:127.0.0.1:${incoming.address.port}`,
      params: { autoConverge: true, maxBandwidthBytesPerSec: HOT_BANDWIDTH },
    });
    const seen: { percent: number; reported: number; vcpus: number; syncs: number }[] = [];
    const rec = record(out, src, (event) => {
      if (event.type !== 'throttle') return;
      const info = out.query();
      seen.push({
        percent: event.percent,
        reported: info.cpuThrottlePercentage,
        vcpus: src.vcpus!.throttlePercent,
        syncs: info.ram.dirtySyncCount,
      });
      if (event.percent >= 30) out.cancel();
    });
    const [a, b] = await Promise.all([out.done, incoming.done]);

    assert.deepEqual(rec.throttles, [20, 30]);
    for (const s of seen) {
      assert.equal(s.reported, s.percent, 'query().cpuThrottlePercentage');
      assert.equal(s.vcpus, s.percent, "the vCPUs' throttle");
    }
    // Two over-threshold checks per step, each at a sync ≥ 1 s after the previous check: 20 at the
    // second check (≥ 2 s), 30 at the fourth (≥ 4 s).
    assert.ok(seen[0]!.syncs >= 2 && seen[1]!.syncs >= seen[0]!.syncs + 2, JSON.stringify(seen));
    assert.ok(a.totalTimeMs >= 4000, `${a.totalTimeMs} ms`);
    assert.ok(src.status().vcpus.throttledMs > 0, 'the vCPUs slept in the throttle');

    assert.equal(a.status, 'cancelled');
    assert.equal(a.error?.code, MigrationErrorCode.CANCELLED);
    assert.equal(a.cpuThrottlePercentage, 0, 'the rollback lifts the throttle');
    await assertRolledBack(src);
    assert.equal(b.status, 'cancelled');
    assertDiscarded(dst);
  });

  test('without auto-converge the same guest is never throttled', async (t) => {
    const { src, dst, incoming } = await hotPair(t);
    const out = OutgoingMigration.start(src, {
      uri: `tcp:127.0.0.1:${incoming.address.port}`,
      params: { maxBandwidthBytesPerSec: HOT_BANDWIDTH },
    });
    const throttleSeen: number[] = [];
    const samples: MigrationInfo[] = [];
    const rec = record(out, src, (event) => {
      if (event.type === 'progress') throttleSeen.push(event.info.cpuThrottlePercentage);
      if (event.type === 'pass') throttleSeen.push(src.vcpus!.throttlePercent);
    });
    // Long enough for four dirty-rate checks (auto-converge throttled after two above).
    await waitUntil('four dirty-rate periods', () => {
      const info = out.query();
      if (info.status === 'active') samples.push(info);
      return info.totalTimeMs >= 4500 && info.ram.dirtySyncCount >= 8;
    });
    const info = out.query();
    assert.equal(info.status, 'active', 'it does not converge');
    assert.ok(info.ram.dirtyPagesRate > 0, 'the dirty rate is measured all the same');
    assert.ok(info.expectedDowntimeMs !== undefined && info.expectedDowntimeMs > 0);
    // query() while active: sane and monotonic, and the iteration count really grows.
    // The multifd channels are listed once connected (their threads start during setup).
    assertMonotonic(
      samples.filter((x) => x.status !== 'setup'),
      2,
    );
    assert.ok(samples.length >= 10);
    assert.ok(samples.at(-1)!.ram.dirtySyncCount >= samples[0]!.ram.dirtySyncCount + 4);
    assert.ok(samples.at(-1)!.ram.transferredBytes > samples[0]!.ram.transferredBytes);
    out.cancel();
    const [a, b] = await Promise.all([out.done, incoming.done]);
    assert.deepEqual(rec.throttles, []);
    assert.ok(throttleSeen.length > 0 && throttleSeen.every((p) => p === 0));
    assert.equal(src.status().vcpus.throttledMs, 0);
    assert.equal(a.status, 'cancelled');
    await assertRolledBack(src);
    assert.equal(b.status, 'cancelled');
    assertDiscarded(dst);
  });
});

describe('max-bandwidth', { timeout: 120_000 }, () => {
  test('32 MiB/s: a 64 MiB guest full of random data takes at least ~1.5 s, no slot over its budget', async (t) => {
    const idle: VmOptions = { pageWriteLimit: 0 };
    const src = createVm(t, idle);
    const dst = createVm(t, idle);
    // Random bytes in every page: nothing travels as a zero page.
    const block = src.ram.blocks[0]!;
    const chunk = new Uint8Array(MiB);
    for (let offset = 0; offset < block.sizeBytes; offset += MiB)
      block.memory.write(offset, randomFillSync(chunk));
    await src.start();
    const incoming = await IncomingMigration.listen(dst, { autostart: false });
    const rate = 32 * MiB;
    const out = OutgoingMigration.start(src, {
      uri: `tcp:127.0.0.1:${incoming.address.port}`,
      params: { maxBandwidthBytesPerSec: rate },
    });
    const samples: MigrationInfo[] = [];
    const rec = record(out, src, (event) => {
      if (event.type === 'progress') samples.push(event.info);
    });
    const poll = setInterval(() => samples.push(out.query()), 20);
    const [a, b] = await Promise.all([out.done, incoming.done]).finally(() => clearInterval(poll));

    assert.equal(a.status, 'completed', a.error?.message);
    assert.equal(b.status, 'completed', b.error?.message);
    assert.equal(dst.digest(), src.digest());
    assert.ok(a.ram.normalPages >= 16384, 'every page went with its data');
    const precopy = a.ram.precopyBytes + a.devices.reduce((n, d) => n + d.precopyBytes, 0);
    assert.ok(precopy >= 64 * MiB, 'all of RAM went while the VM ran');
    // Lower bounds only. Each ≥ 100 ms slot carries at most its budget (rate / 10) plus the one
    // packet that crossed it (≤ 1 MiB of device data or 512 KiB of pages, with headers): 64 MiB
    // at 32 MiB/s is 2 s, and the devices' precopy data (their work keeps dirtying it) adds more.
    const slotMax = rate / 10 + MiB + 64 * 1024;
    assert.ok(a.totalTimeMs >= 1500, `took ${a.totalTimeMs} ms`);
    const slots = Math.ceil(precopy / slotMax);
    assert.ok(a.totalTimeMs >= (slots - 1) * 100, `${a.totalTimeMs} ms for ${precopy} bytes in precopy`);

    // query() while active: numbers only grow, channels are listed with their bytes, and no
    // 100 ms slot carried more than its budget plus one packet.
    const active = samples.filter((s) => s.status === 'active');
    assert.ok(active.length >= 10, `${active.length} samples while active`);
    // The multifd channels are listed once connected (their threads start during setup).
    assertMonotonic(
      samples.filter((x) => x.status !== 'setup'),
      2,
    );
    for (const s of active) {
      assert.ok(s.bandwidthBytesPerMs * 100 <= slotMax, `bandwidth ${s.bandwidthBytesPerMs} bytes/ms`);
      assert.equal(s.cpuThrottlePercentage, 0);
      assert.equal(s.downtimeMs, undefined);
    }
    const first = active[0]!;
    const last = active.at(-1)!;
    assert.ok(last.ram.transferredBytes > first.ram.transferredBytes);
    assert.ok(last.channels.every((c) => c.bytes > 0));
    assert.ok(a.ram.dirtySyncCount >= 1);
    assert.deepEqual(rec.statuses, ['setup', 'active', 'device', 'completed']);

    // The final report: vfio.transferred = every device's precopy + stop-copy bytes, on both sides.
    const deviceBytes = a.devices.reduce((n, d) => n + d.precopyBytes + d.stopCopyBytes, 0);
    assert.equal(a.vfio.transferredBytes, deviceBytes);
    assert.equal(b.vfio.transferredBytes, deviceBytes);
    assert.ok(a.downtimeMs !== undefined && a.downtimeMs >= 0);
    assert.ok(a.totalTimeMs >= last.totalTimeMs);
  });
});

describe('switchover-ack', { timeout: 120_000 }, () => {
  test('the source switches over only after SWITCHOVER_ACK: every PRE_COPY device sent its initial data first', async (t) => {
    // A large accel (16 MiB of initial precopy data) on an idle guest at 32 MiB/s with a 2 s
    // downtime limit: the threshold (32 MiB/s × 2 s) holds all of RAM and every device's data from
    // the first sync on, so only the missing ACK can hold the switchover.
    const vm: VmOptions = { accelMemoryBytes: 16 * MiB, pageWriteLimit: 0 };
    const src = createVm(t, vm);
    const dst = createVm(t, vm);
    await src.start();
    const incoming = await IncomingMigration.listen(dst, { autostart: false });
    let dstAckedAtDevice: boolean | undefined;
    incoming.onEvent((event) => {
      if (event.type === 'status' && event.status === 'device')
        dstAckedAtDevice = incoming.query().switchoverAcked;
    });
    const out = OutgoingMigration.start(src, {
      uri: `tcp:127.0.0.1:${incoming.address.port}`,
      params: { maxBandwidthBytesPerSec: 32 * MiB, downtimeLimitMs: 2000, switchoverAck: true },
    });
    let initial: Map<string, number> | undefined;
    let ackedAtDevice: boolean | undefined;
    record(out, src, (event) => {
      if (event.type !== 'status') return;
      if (event.status === 'active')
        initial = new Map(event.info.devices.map((d) => [d.name, d.initialBytes]));
      if (event.status === 'device') ackedAtDevice = event.info.switchoverAcked;
    });
    const [a, b] = await Promise.all([out.done, incoming.done]);

    assert.equal(a.status, 'completed', a.error?.message);
    assert.equal(b.status, 'completed', b.error?.message);
    assert.equal(ackedAtDevice, true, 'the ACK had come when the switchover began');
    assert.equal(dstAckedAtDevice, true, 'the destination had sent it before SWITCHOVER');
    assert.equal(a.switchoverAcked, true);
    assert.equal(b.switchoverAcked, true);
    assert.ok(initial !== undefined);
    assert.equal(initial.get('basic0'), 0, 'no PRE_COPY, no initial data');
    assert.ok(initial.get('accel0')! >= 16 * MiB, `accel0 initial ${initial.get('accel0')}`);
    assert.ok(initial.get('nic0')! > 0);
    for (const d of a.devices) {
      assert.ok(
        d.precopyBytes >= initial.get(d.name)!,
        `${d.name}: ${d.precopyBytes} ≥ ${initial.get(d.name)}`,
      );
    }
    assert.equal(dst.digest(), src.digest());
  });
});
