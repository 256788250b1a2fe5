/**
 * End-to-end live migration between two software hosts in one process, over loopback TCP:
 * successful migrations (iommufd and type1; multifd 1, 2, 4 channels or none; switchover-ack on
 * and off; autostart on and off) and failures after the hand-off, where the source must never
 * resume. Failures before the hand-off are in migration-e2e-failures.test.ts, convergence and
 * statistics in migration-e2e-convergence.test.ts.
 */
import assert from 'node:assert/strict';
import { after, describe, test, type TestContext } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import type { Machine } from '../../../src/vmm/machine/machine.js';
import { IncomingMigration } from '../../../src/vmm/migration/destination.js';
import { MigrationErrorCode } from '../../../src/vmm/migration/migration-error.js';
import type { MigrationInfo } from '../../../src/vmm/migration/migration-info.js';
import type { MigrationParameters } from '../../../src/vmm/migration/migration-params.js';
import { OutgoingMigration } from '../../../src/vmm/migration/source.js';
import {
  allIn,
  createVm,
  destroyAll,
  deviceStates,
  DEVICES,
  MiB,
  record,
  type Recorder,
  spyDeviceSets,
  TcpProxy,
  type VmOptions,
  startMigration,
} from './e2e-helpers.js';

after(destroyAll);

/** QEMU's sequences on the source: P2P devices stop DMA first, STOP_COPY → STOP is the deferred cleanup. */
const SOURCE_STATES = {
  nic0: ['RUNNING', 'PRE_COPY', 'PRE_COPY_P2P', 'STOP_COPY', 'STOP'],
  accel0: ['RUNNING', 'PRE_COPY', 'STOP_COPY', 'STOP'],
  basic0: ['RUNNING', 'STOP_COPY', 'STOP'],
};
const SOURCE_STATUSES = ['setup', 'active', 'device', 'completed'];

interface Migrated {
  src: Machine;
  dst: Machine;
  out: OutgoingMigration;
  incoming: IncomingMigration;
  srcRec: Recorder;
  dstRec: Recorder;
  a: MigrationInfo;
  b: MigrationInfo;
  /** The destination's digest when the source handed the VM off (before it could run). */
  dstDigestAtHandOff: string | undefined;
}

async function migrate(
  t: TestContext,
  options: { vm?: VmOptions; params?: Partial<MigrationParameters>; autostart?: boolean } = {},
): Promise<Migrated> {
  const src = createVm(t, options.vm);
  const dst = createVm(t, options.vm);
  await src.start();
  let dstDigestAtHandOff: string | undefined;
  const finishIncoming = dst.finishIncoming.bind(dst);
  dst.finishIncoming = (o) => {
    dstDigestAtHandOff = dst.digest();
    return finishIncoming(o);
  };
  const { out, incoming, srcRec, dstRec, done } = await startMigration(src, dst, {
    incoming: { autostart: options.autostart ?? false },
    ...(options.params === undefined ? {} : { params: options.params }),
  });
  const [a, b] = await done;
  return { src, dst, out, incoming, srcRec, dstRec, a, b, dstDigestAtHandOff };
}

/** What every completed migration shows, whatever the options. */
async function assertCompleted(m: Migrated, channels: number): Promise<void> {
  const { src, a, b, srcRec, dstRec } = m;
  assert.equal(a.status, 'completed', a.error?.message);
  assert.equal(b.status, 'completed', b.error?.message);
  assert.equal(a.error, undefined);
  assert.equal(b.error, undefined);
  assert.deepEqual(srcRec.statuses, SOURCE_STATUSES);
  assert.deepEqual(dstRec.statuses, SOURCE_STATUSES);
  for (const name of DEVICES) {
    assert.deepEqual(srcRec.devices.get(name), SOURCE_STATES[name], `source ${name}`);
  }
  assert.ok(a.downtimeMs !== undefined && a.downtimeMs >= 0);

  // The source is done for good: stopped, devices STOP, and it cannot run or migrate again.
  assert.equal(src.state, 'migrated');
  assert.deepEqual(deviceStates(src), allIn('STOP'));
  assert.equal(src.ram.dirtyLogActive, false);
  await assert.rejects(src.start(), { code: 'ERR_INVALID_ARGUMENT' });
  assert.throws(() => OutgoingMigration.start(src, { uri: 'tcp:127.0.0.1:1' }), {
    code: MigrationErrorCode.VM_STATE,
  });
  assert.equal(src.state, 'migrated');

  // The same state arrived: the destination's digest at the hand-off is the source's final one.
  assert.equal(m.dstDigestAtHandOff, src.digest());

  // Both sides count the same bytes; vfio.transferred is the devices' precopy + stop-copy bytes.
  assert.equal(a.channels.length, channels + 1);
  assert.deepEqual(
    a.channels.map((c) => [c.index, c.kind]),
    Array.from({ length: channels + 1 }, (_, i) => [i, i === 0 ? 'main' : 'multifd']),
  );
  assert.deepEqual(b.channels, a.channels, 'bytes written = bytes read, per channel');
  assert.ok(a.channels.every((c) => c.bytes > 0));
  const deviceBytes = a.devices.reduce((n, d) => n + d.precopyBytes + d.stopCopyBytes, 0);
  assert.equal(a.vfio.transferredBytes, deviceBytes);
  assert.equal(b.vfio.transferredBytes, deviceBytes);
  assert.equal(b.ram.transferredBytes, a.ram.transferredBytes);
  assert.equal(b.ram.multifdBytes, a.ram.multifdBytes);
  assert.equal(a.ram.normalPages + a.ram.duplicatePages, b.ram.normalPages + b.ram.duplicatePages);
  assert.ok(
    a.ram.normalPages + a.ram.duplicatePages >= a.ram.totalBytes / a.ram.pageSizeBytes,
    'all RAM went',
  );
  assert.equal(a.ram.multifdBytes > 0, channels > 0);
  for (const d of a.devices) {
    assert.equal(d.state, 'STOP');
    assert.ok(d.stopCopyBytes > 0, `${d.name} sent its stop-copy state`);
    assert.equal(d.precopyBytes > 0, d.name !== 'basic0', `${d.name}: precopy data iff PRE_COPY`);
  }
  assert.deepEqual(
    b.devices.map((d) => [d.name, d.precopyBytes, d.stopCopyBytes]),
    a.devices.map((d) => [d.name, d.precopyBytes, d.stopCopyBytes]),
  );
  assert.ok(a.ram.dirtySyncCount >= 1);
}

/** The destination left stopped (autostart off): loaded, then started by hand. */
async function assertStartsByHand(m: Migrated): Promise<void> {
  const { dst, dstRec, src } = m;
  for (const name of DEVICES) {
    assert.deepEqual(dstRec.devices.get(name), ['RUNNING', 'RESUMING', 'STOP'], `destination ${name}`);
  }
  assert.equal(dst.state, 'stopped');
  assert.equal(dst.digest(), src.digest(), 'nothing ran on the destination yet');
  const sets = spyDeviceSets(dst);
  await dst.start();
  assert.equal(dst.state, 'running');
  // QEMU's VM start: every P2P device to RUNNING_P2P first, then all to RUNNING.
  assert.deepEqual(sets, [
    ['nic0', 'RUNNING_P2P', 'RUNNING_P2P'],
    ['nic0', 'RUNNING', 'RUNNING'],
    ['accel0', 'RUNNING', 'RUNNING'],
    ['basic0', 'RUNNING', 'RUNNING'],
  ]);
  const running = dst.digest();
  await sleep(100);
  assert.notEqual(dst.digest(), running, 'the guest runs on the destination');
}

describe('a successful migration', { timeout: 120_000 }, () => {
  for (const iommu of ['iommufd', 'type1'] as const) {
    test(`on ${iommu}: setup → active → device → completed, QEMU's device sequences, equal digests`, async (t) => {
      const m = await migrate(t, {
        vm: { iommu },
        // type1 has no dirty tracking for every device ('all': every page dirty at every sync), so
        // the whole RAM must fit the downtime limit: give it room.
        params: iommu === 'type1' ? { downtimeLimitMs: 2000 } : {},
      });
      await assertCompleted(m, 2);
      const passes = m.srcRec.events.flatMap((e) => (e.type === 'pass' ? [e.dirtyBytes] : []));
      assert.ok(passes.length >= 1);
      if (iommu === 'type1') {
        // accel0 has no DMA logging and type1 no dirty bitmap: mode 'all', every sync reports all RAM.
        assert.ok(
          passes.every((bytes) => bytes === 64 * MiB),
          `every sync: all of RAM (${passes.join(', ')})`,
        );
      } else {
        // iommufd HWPT dirty tracking: a sync reports only what vCPUs and devices wrote.
        assert.ok(
          passes.some((bytes) => bytes < 64 * MiB),
          `a sync below all of RAM (${passes.join(', ')})`,
        );
      }
      await assertStartsByHand(m);
    });
  }

  test('autostart: the destination runs at the end (devices RUNNING, nic via RUNNING_P2P)', async (t) => {
    const src = createVm(t);
    const dst = createVm(t);
    await src.start();
    let sets: [string, string, string][] = [];
    let digestAtHandOff: string | undefined;
    const finishIncoming = dst.finishIncoming.bind(dst);
    dst.finishIncoming = (o) => {
      digestAtHandOff = dst.digest();
      sets = spyDeviceSets(dst);
      return finishIncoming(o);
    };
    const { srcRec, dstRec, done } = await startMigration(src, dst, { incoming: { autostart: true } });
    const [a, b] = await done;
    assert.equal(a.status, 'completed', a.error?.message);
    assert.equal(b.status, 'completed', b.error?.message);
    assert.deepEqual(srcRec.statuses, SOURCE_STATUSES);
    assert.equal(src.state, 'migrated');
    assert.equal(dst.state, 'running');
    assert.equal(digestAtHandOff, src.digest());
    for (const name of DEVICES) {
      assert.deepEqual(dstRec.devices.get(name), ['RUNNING', 'RESUMING', 'STOP', 'RUNNING'], name);
    }
    // spyDeviceSets is installed after the hand-off, so these are the VM start's sets only.
    assert.deepEqual(sets, [
      ['nic0', 'RUNNING_P2P', 'RUNNING_P2P'],
      ['nic0', 'RUNNING', 'RUNNING'],
      ['accel0', 'RUNNING', 'RUNNING'],
      ['basic0', 'RUNNING', 'RUNNING'],
    ]);
    assert.deepEqual(deviceStates(dst), allIn('RUNNING'));
    const running = dst.digest();
    await sleep(100);
    assert.notEqual(dst.digest(), running, 'the guest runs on the destination');
    // The source is RUNNING nowhere: 'migrated', devices STOP.
    assert.deepEqual(deviceStates(src), allIn('STOP'));
  });

  const variants: [string, Partial<MigrationParameters>, number][] = [
    ['multifd with 1 channel', { multifdChannels: 1 }, 1],
    ['multifd with 4 channels', { multifdChannels: 4 }, 4],
    ['multifd off: everything on the main channel', { multifd: false }, 0],
    ['switchover-ack off', { switchoverAck: false }, 2],
    ['switchover-ack off, multifd off', { switchoverAck: false, multifd: false }, 0],
  ];
  for (const [name, params, channels] of variants) {
    test(name, async (t) => {
      const m = await migrate(t, { params });
      await assertCompleted(m, channels);
      assert.equal(m.a.switchoverAcked, params.switchoverAck ?? true);
      assert.equal(m.b.switchoverAcked, params.switchoverAck ?? true);
      if (channels === 0) assert.equal(m.a.ram.multifdBytes, 0);
      await assertStartsByHand(m);
    });
  }
});

describe('after the hand-off the source never resumes', { timeout: 120_000 }, () => {
  test('the destination fails to run the VM after HANDOFF: the source fails in hand-off, stays migrated', async (t) => {
    const src = createVm(t);
    const dst = createVm(t);
    await src.start();
    let digestAtHandOff: string | undefined;
    dst.finishIncoming = async () => {
      digestAtHandOff = dst.digest();
      throw new Error('injected: the destination VM cannot run');
    };
    const { srcRec, dstRec, done } = await startMigration(src, dst, { incoming: { autostart: true } });
    const [a, b] = await done;

    // The source had committed (LOADED came back, HANDOFF went out): it fails, it does not roll
    // back. It learns at once: the destination closes the connection (not a 30 s peer timeout).
    assert.equal(a.status, 'failed');
    assert.equal(a.error?.code, MigrationErrorCode.CHANNEL);
    assert.equal(a.error?.phase, 'hand-off');
    assert.deepEqual(srcRec.statuses, ['setup', 'active', 'device', 'failed']);
    for (const name of DEVICES) assert.deepEqual(srcRec.devices.get(name), SOURCE_STATES[name], name);
    assert.equal(src.state, 'migrated');
    assert.deepEqual(deviceStates(src), allIn('STOP'));
    assert.equal(src.ram.dirtyLogActive, false);
    await assert.rejects(src.start(), { code: 'ERR_INVALID_ARGUMENT' });
    const stopped = src.digest();
    await sleep(100);
    assert.equal(src.digest(), stopped, 'the source guest does not run');

    // The destination holds the whole state: loaded, stopped, 'incoming'.
    assert.equal(b.status, 'failed');
    assert.equal(b.error?.phase, 'hand-off');
    assert.match(b.error!.message, /injected: the destination VM cannot run/);
    assert.deepEqual(dstRec.statuses, ['setup', 'active', 'device', 'failed']);
    assert.equal(dst.state, 'incoming');
    assert.deepEqual(deviceStates(dst), allIn('STOP'));
    assert.equal(digestAtHandOff, src.digest());
    assert.equal(dst.digest(), src.digest());
  });

  test('the connection dies as the source commits (HANDOFF lost): nobody runs the VM, the destination keeps it', async (t) => {
    const src = createVm(t);
    const dst = createVm(t);
    await src.start();
    const incoming = await IncomingMigration.listen(dst, { autostart: true });
    const dstRec = record(incoming, dst);
    const proxy = await TcpProxy.start(t, incoming.address.port);
    // The source commits (VM 'migrated') right before it writes HANDOFF: cut every connection
    // then, so HANDOFF never reaches the destination.
    src.onStateChange((state) => {
      if (state === 'migrated') proxy.cutAll();
    });
    const out = OutgoingMigration.start(src, {
      uri: `tcp:127.0.0.1:${proxy.port}`,
      params: { maxBandwidthBytesPerSec: 0 },
    });
    const srcRec = record(out, src);
    const [a, b] = await Promise.all([out.done, incoming.done]);

    // The source: failed in hand-off, never resumed.
    assert.equal(a.status, 'failed');
    assert.equal(a.error?.code, MigrationErrorCode.CHANNEL);
    assert.equal(a.error?.phase, 'hand-off');
    assert.deepEqual(srcRec.statuses, ['setup', 'active', 'device', 'failed']);
    for (const name of DEVICES) assert.deepEqual(srcRec.devices.get(name), SOURCE_STATES[name], name);
    assert.equal(src.state, 'migrated');
    assert.deepEqual(deviceStates(src), allIn('STOP'));
    await assert.rejects(src.start(), { code: 'ERR_INVALID_ARGUMENT' });

    // The destination had said LOADED: it cannot know whether the source committed, so it keeps
    // the loaded VM ('incoming', devices STOP) and does not run it.
    assert.equal(b.status, 'failed');
    assert.equal(b.error?.code, MigrationErrorCode.CHANNEL);
    assert.equal(b.error?.phase, 'hand-off');
    assert.deepEqual(dstRec.statuses, ['setup', 'active', 'device', 'failed']);
    for (const name of DEVICES)
      assert.deepEqual(dstRec.devices.get(name), ['RUNNING', 'RESUMING', 'STOP'], name);
    assert.equal(dst.state, 'incoming');
    assert.deepEqual(deviceStates(dst), allIn('STOP'));
    // The state is not lost: it is all on the destination, and the operator can run it there.
    assert.equal(dst.digest(), src.digest());
    await dst.finishIncoming({ autostart: true });
    assert.equal(dst.state, 'running');
    assert.deepEqual(deviceStates(dst), allIn('RUNNING'));
  });
});
