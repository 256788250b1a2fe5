/**
 * End-to-end failures before the hand-off: cancel, a destination that is gone or gives up, a
 * channel dropped mid-stream, a device that fails its transition on the source or refuses its
 * state on the destination, an incompatible destination. Every time the source VM runs on as if
 * nothing happened (devices RUNNING, no dirty logging, no throttle) and the destination VM is
 * 'created' again, ready for another migration.
 */
import assert from 'node:assert/strict';
import { after, describe, test, type TestContext } from 'node:test';
import { ArcBrokeDevice, type SavingSession } from '../../../src/kernel/vfio/migration-driver.js';
import { kernelError } from '../../../src/uapi/error.js';
import type { Machine } from '../../../src/vmm/machine/machine.js';
import { IncomingMigration } from '../../../src/vmm/migration/destination.js';
import { MigrationErrorCode } from '../../../src/vmm/migration/migration-error.js';
import type { MigrationEvent } from '../../../src/vmm/migration/migration-info.js';
import type { MigrationParameters } from '../../../src/vmm/migration/migration-params.js';
import { OutgoingMigration } from '../../../src/vmm/migration/source.js';
import {
  allIn,
  assertDiscarded,
  assertRolledBack,
  createVm,
  deadPort,
  destroyAll,
  deviceStates,
  DEVICES,
  MiB,
  neverLeftRunning,
  record,
  TcpProxy,
  type VmOptions,
  waitUntil,
  startMigration,
} from './e2e-helpers.js';

after(destroyAll);

/** A guest that dirties faster than 8 MiB/s can carry: the migration stays in precopy. */
const NEVER_CONVERGES: { vm: VmOptions; params: Partial<MigrationParameters> } = {
  vm: { dirtyRateMiBps: 64 },
  params: { maxBandwidthBytesPerSec: 8 * MiB },
};

async function pair(t: TestContext, vm: VmOptions = {}, dstVm: VmOptions = vm) {
  const src = createVm(t, vm);
  const dst = createVm(t, dstVm);
  await src.start();
  return { src, dst };
}

/** The source is in precopy, RAM and device data flowing. */
async function inPrecopy(out: OutgoingMigration): Promise<void> {
  await waitUntil('precopy traffic', () => {
    const info = out.query();
    return info.status === 'active' && info.ram.transferredBytes > 0 && info.vfio.transferredBytes > 0;
  });
}

/** After a failure: a second migration of the same VMs completes (the destination was reset). */
async function migrateAgain(src: Machine, dst: Machine): Promise<void> {
  const [a, b] = await (await startMigration(src, dst)).done;
  assert.equal(a.status, 'completed', a.error?.message);
  assert.equal(b.status, 'completed', b.error?.message);
  assert.equal(src.state, 'migrated');
  assert.equal(dst.state, 'stopped');
  assert.equal(dst.digest(), src.digest());
}

describe('cancel (migrate_cancel)', { timeout: 120_000 }, () => {
  for (const how of ['cancel()', 'AbortSignal'] as const) {
    test(`by ${how}: status cancelled, both sides roll back`, async (t) => {
      const { src, dst } = await pair(t, NEVER_CONVERGES.vm);
      const abort = new AbortController();
      const { out, srcRec, dstRec, done } = await startMigration(src, dst, {
        params: NEVER_CONVERGES.params,
        signal: abort.signal,
      });
      await inPrecopy(out);
      if (how === 'cancel()') out.cancel();
      else abort.abort();
      const [a, b] = await done;

      assert.equal(a.status, 'cancelled');
      assert.equal(a.error?.code, MigrationErrorCode.CANCELLED);
      assert.equal(a.error?.phase, 'precopy');
      assert.deepEqual(srcRec.statuses, ['setup', 'active', 'cancelling', 'cancelled']);
      assert.deepEqual(srcRec.devices.get('nic0'), ['RUNNING', 'PRE_COPY', 'RUNNING']);
      assert.deepEqual(srcRec.devices.get('accel0'), ['RUNNING', 'PRE_COPY', 'RUNNING']);
      assert.deepEqual(srcRec.devices.get('basic0'), ['RUNNING']);
      assert.ok(a.ram.transferredBytes > 0);
      await assertRolledBack(src);
      out.cancel(); // after the end: ignored
      assert.equal(out.status, 'cancelled');

      // The source told the destination why (ERROR frame): it is cancelled too, and reset.
      assert.equal(b.status, 'cancelled');
      assert.equal(b.error?.code, MigrationErrorCode.CANCELLED);
      assert.deepEqual(dstRec.statuses, ['setup', 'active', 'cancelled']);
      for (const name of DEVICES)
        assert.deepEqual(dstRec.devices.get(name), ['RUNNING', 'RESUMING', 'RUNNING']);
      assertDiscarded(dst);
      if (how === 'cancel()') await migrateAgain(src, dst);
    });
  }

  // When the switchover has begun: the VM is stopping (or stopped, devices in STOP_COPY), and the
  // rollback must wait for the stop, restart the VM and bring every device back to RUNNING.
  const switchoverCases = [
    {
      name: "as the switchover begins (status 'device', the VM stopping)",
      at: (e: MigrationEvent) => e.type === 'status' && e.status === 'device',
      src: {
        nic0: ['RUNNING', 'PRE_COPY', 'RUNNING'],
        accel0: ['RUNNING', 'PRE_COPY', 'RUNNING'],
        basic0: ['RUNNING'],
      },
      dstStatuses: ['setup', 'active', 'cancelled'],
      dstPhase: 'precopy',
    },
    {
      name: 'once every device is in STOP_COPY (SWITCHOVER sent)',
      at: (e: MigrationEvent) =>
        e.type === 'device-state' && e.device === 'basic0' && e.state === 'STOP_COPY',
      src: {
        nic0: ['RUNNING', 'PRE_COPY', 'PRE_COPY_P2P', 'STOP_COPY', 'RUNNING'],
        accel0: ['RUNNING', 'PRE_COPY', 'STOP_COPY', 'RUNNING'],
        basic0: ['RUNNING', 'STOP_COPY', 'RUNNING'],
      },
      dstStatuses: ['setup', 'active', 'device', 'cancelled'],
      dstPhase: 'stop-copy',
    },
  ];
  for (const c of switchoverCases) {
    test(`${c.name}: the VM runs again, devices RUNNING`, async (t) => {
      const { src, dst } = await pair(t);
      const { srcRec, dstRec, done } = await startMigration(src, dst, {
        onSourceEvent: (event, out) => {
          if (c.at(event)) out.cancel();
        },
      });
      const [a, b] = await done;

      assert.equal(a.status, 'cancelled');
      assert.equal(a.error?.code, MigrationErrorCode.CANCELLED);
      assert.equal(a.error?.phase, 'switchover');
      assert.deepEqual(srcRec.statuses, ['setup', 'active', 'device', 'cancelling', 'cancelled']);
      for (const name of DEVICES) assert.deepEqual(srcRec.devices.get(name), c.src[name], name);
      // Nothing happens after the end: the switchover that was under way stopped at its next step.
      const end = srcRec.events.findIndex((e) => e.type === 'end');
      assert.equal(end, srcRec.events.length - 1, 'the end is the last event');
      await assertRolledBack(src);

      assert.equal(b.status, 'cancelled');
      assert.equal(b.error?.code, MigrationErrorCode.CANCELLED);
      assert.equal(b.error?.phase, c.dstPhase);
      assert.deepEqual(dstRec.statuses, c.dstStatuses);
      assertDiscarded(dst);
    });
  }

  test('a signal aborted before start cancels at once: nothing moves', async (t) => {
    const { src, dst } = await pair(t);
    const incoming = await IncomingMigration.listen(dst, { autostart: false });
    const dstRec = record(incoming, dst);
    const out = OutgoingMigration.start(src, {
      uri: `tcp:127.0.0.1:${incoming.address.port}`,
      signal: AbortSignal.abort(),
    });
    const srcRec = record(out, src);
    const a = await out.done;
    assert.equal(a.status, 'cancelled');
    assert.equal(a.error?.code, MigrationErrorCode.CANCELLED);
    assert.equal(a.error?.phase, 'connect');
    assert.equal(a.ram.transferredBytes, 0);
    neverLeftRunning(srcRec);
    await assertRolledBack(src);
    // The connection under way when the cancel came is dropped before its HELLO: the destination
    // never saw a session (it is still listening: its own cancel ends it).
    incoming.cancel();
    const b = await incoming.done;
    assert.equal(b.status, 'cancelled');
    assert.deepEqual(dstRec.statuses, ['setup', 'cancelled']);
    assert.equal(b.ram.transferredBytes, 0);
    assertDiscarded(dst);
  });
});

describe('the destination is gone', { timeout: 120_000 }, () => {
  test('nobody listens: ERR_MIGRATION_CHANNEL in connect, the source never left RUNNING', async (t) => {
    const { src } = await pair(t);
    const out = OutgoingMigration.start(src, { uri: `tcp:127.0.0.1:${await deadPort()}` });
    const srcRec = record(out, src);
    const a = await out.done;
    assert.equal(a.status, 'failed');
    assert.equal(a.error?.code, MigrationErrorCode.CHANNEL);
    assert.equal(a.error?.phase, 'connect');
    assert.match(a.error!.message, /ECONNREFUSED/);
    assert.deepEqual(srcRec.statuses, ['setup', 'failed']);
    neverLeftRunning(srcRec);
    await assertRolledBack(src);
  });

  for (const how of ['cancel()', 'AbortSignal'] as const) {
    test(`the destination cancels during precopy by ${how}: the source fails with ERR_MIGRATION_PEER`, async (t) => {
      const { src, dst } = await pair(t, NEVER_CONVERGES.vm);
      const abort = new AbortController();
      const { incoming, out, srcRec, dstRec, done } = await startMigration(src, dst, {
        params: NEVER_CONVERGES.params,
        incoming: { signal: abort.signal },
      });
      await inPrecopy(out);
      if (how === 'cancel()') incoming.cancel();
      else abort.abort();
      const [a, b] = await done;

      assert.equal(b.status, 'cancelled');
      assert.equal(b.error?.code, MigrationErrorCode.CANCELLED);
      assert.equal(b.error?.phase, 'precopy');
      assert.deepEqual(dstRec.statuses, ['setup', 'active', 'cancelled']);
      assertDiscarded(dst);

      assert.equal(a.status, 'failed');
      assert.equal(a.error?.code, MigrationErrorCode.PEER);
      assert.equal(a.error?.phase, 'precopy');
      assert.match(a.error!.message, /the destination failed in precopy: .*incoming migration cancelled/);
      assert.deepEqual(srcRec.statuses, ['setup', 'active', 'failed']);
      assert.deepEqual(srcRec.devices.get('nic0'), ['RUNNING', 'PRE_COPY', 'RUNNING']);
      await assertRolledBack(src);
    });
  }

  test('a multifd channel reset on the source side mid-stream: ERR_MIGRATION_CHANNEL in precopy', async (t) => {
    const { src, dst } = await pair(t, NEVER_CONVERGES.vm);
    const incoming = await IncomingMigration.listen(dst, { autostart: false });
    const proxy = await TcpProxy.start(t, incoming.address.port);
    const out = OutgoingMigration.start(src, {
      uri: `tcp:127.0.0.1:${proxy.port}`,
      params: NEVER_CONVERGES.params,
    });
    const srcRec = record(out, src);
    await inPrecopy(out);
    await waitUntil(
      'multifd traffic',
      () => proxy.links.length === 3 && proxy.links[1]!.forwardedBytes > 64 * 1024,
    );
    // The source's multifd socket gets RST; the destination's end of it stays open and silent.
    proxy.cut(proxy.links[1]!, 'source');
    const [a, b] = await Promise.all([out.done, incoming.done]);

    assert.equal(a.status, 'failed');
    assert.equal(a.error?.code, MigrationErrorCode.CHANNEL);
    assert.equal(a.error?.phase, 'precopy');
    assert.match(a.error!.message, /multifd channel [12]: send: /);
    assert.deepEqual(srcRec.statuses, ['setup', 'active', 'failed']);
    await assertRolledBack(src);
    // The source told the destination on the main channel.
    assert.equal(b.status, 'failed');
    assert.equal(b.error?.code, MigrationErrorCode.PEER);
    assert.match(b.error!.message, /the source failed in precopy: .*multifd channel/);
    assertDiscarded(dst);
  });

  test('a multifd channel closed on the destination side mid-stream: the source fails with ERR_MIGRATION_PEER', async (t) => {
    const { src, dst } = await pair(t, NEVER_CONVERGES.vm);
    const incoming = await IncomingMigration.listen(dst, { autostart: false });
    const proxy = await TcpProxy.start(t, incoming.address.port);
    const out = OutgoingMigration.start(src, {
      uri: `tcp:127.0.0.1:${proxy.port}`,
      params: NEVER_CONVERGES.params,
    });
    const srcRec = record(out, src);
    await inPrecopy(out);
    await waitUntil(
      'multifd traffic',
      () => proxy.links.length === 3 && proxy.links[2]!.forwardedBytes > 64 * 1024,
    );
    // FIN on the destination's end of a multifd channel; the source's end stays open and silent.
    proxy.cut(proxy.links[2]!, 'destination', 'close');
    const [a, b] = await Promise.all([out.done, incoming.done]);

    // An EOF before CHANNEL_END: mid-frame ("stream truncated") or between frames. The destination
    // classifies both as ERR_MIGRATION_PROTOCOL (see the report: migration-error.ts documents "EOF
    // before the end" as ERR_MIGRATION_CHANNEL).
    assert.equal(b.status, 'failed');
    assert.equal(b.error?.code, MigrationErrorCode.PROTOCOL);
    assert.equal(b.error?.phase, 'precopy');
    assert.match(b.error!.message, /stream truncated|multifd channel [12] closed before CHANNEL_END/);
    assertDiscarded(dst);
    assert.equal(a.status, 'failed');
    assert.equal(a.error?.code, MigrationErrorCode.PEER);
    assert.equal(a.error?.phase, 'precopy');
    assert.deepEqual(srcRec.statuses, ['setup', 'active', 'failed']);
    await assertRolledBack(src);
  });
});

describe('a device fails its STOP_COPY transition on the source', { timeout: 120_000 }, () => {
  /**
   * Make accel0's PRE_COPY → STOP_COPY arc (its saving session's enterStopCopy) throw `error`, and
   * count the driver's resets. restore() puts the driver's own startSaving back.
   */
  function failStopCopy(src: Machine, error: () => Error): { resets: number; restore: () => void } {
    const driver = src.device('accel0').device.driver;
    const startSaving = driver.startSaving.bind(driver);
    driver.startSaving = (options): SavingSession => {
      const session = startSaving(options);
      session.enterStopCopy = () => {
        throw error();
      };
      return session;
    };
    const reset = driver.reset.bind(driver);
    const counter = {
      resets: 0,
      restore: () => void delete (driver as Partial<typeof driver>).startSaving,
    };
    driver.reset = () => {
      counter.resets++;
      reset();
    };
    return counter;
  }

  const cases = [
    {
      name: 'EIO, the device stays in PRE_COPY: back to RUNNING without a reset',
      error: () => kernelError('EIO', 'injected: accel0 cannot stop'),
      accel: ['RUNNING', 'PRE_COPY', 'RUNNING'],
      resets: 0,
    },
    {
      name: 'EIO with the device broken (ERROR): reset back to RUNNING (set_state_or_reset)',
      error: () => new ArcBrokeDevice('EIO', 'injected: accel0 broke'),
      accel: ['RUNNING', 'PRE_COPY', 'ERROR', 'RUNNING'],
      resets: 1,
    },
  ];
  for (const c of cases) {
    test(c.name, async (t) => {
      const { src, dst } = await pair(t);
      const counter = failStopCopy(src, c.error);
      const { srcRec, dstRec, done } = await startMigration(src, dst);
      const [a, b] = await done;

      assert.equal(a.status, 'failed');
      assert.equal(a.error?.code, MigrationErrorCode.DEVICE);
      assert.equal(a.error?.phase, 'switchover');
      assert.equal(a.error?.device, 'accel0');
      assert.equal(a.error?.errno, 'EIO');
      assert.deepEqual(srcRec.statuses, ['setup', 'active', 'device', 'failed']);
      // nic0 had reached STOP_COPY (devices go in order), basic0 had not moved.
      assert.deepEqual(srcRec.devices.get('nic0'), [
        'RUNNING',
        'PRE_COPY',
        'PRE_COPY_P2P',
        'STOP_COPY',
        'RUNNING',
      ]);
      assert.deepEqual(srcRec.devices.get('accel0'), c.accel);
      assert.deepEqual(srcRec.devices.get('basic0'), ['RUNNING']);
      assert.equal(counter.resets, c.resets);
      await assertRolledBack(src);

      assert.equal(b.status, 'failed');
      assert.equal(b.error?.code, MigrationErrorCode.PEER);
      assert.match(b.error!.message, /the source failed in switchover: .*accel0/);
      assert.deepEqual(dstRec.statuses, ['setup', 'active', 'failed']);
      assertDiscarded(dst);
      if (c.resets === 1) {
        // The reset device (and the reset destination) take a second, successful migration.
        counter.restore();
        await migrateAgain(src, dst);
      }
    });
  }
});

describe('a device refuses its state on the destination', { timeout: 120_000 }, () => {
  test('RESUMING → STOP fails (EIO): the destination fails in load, the source rolls back with its device and errno', async (t) => {
    const { src, dst } = await pair(t);
    const driver = dst.device('accel0').device.driver;
    const startResuming = driver.startResuming.bind(driver);
    driver.startResuming = () => {
      const session = startResuming();
      session.finish = () => {
        throw kernelError('EIO', 'injected: accel0 state does not load');
      };
      return session;
    };
    const { srcRec, dstRec, done } = await startMigration(src, dst);
    const [a, b] = await done;

    assert.equal(b.status, 'failed');
    assert.equal(b.error?.code, MigrationErrorCode.DEVICE);
    assert.equal(b.error?.phase, 'load');
    assert.equal(b.error?.device, 'accel0');
    assert.equal(b.error?.errno, 'EIO');
    assert.deepEqual(dstRec.statuses, ['setup', 'active', 'device', 'failed']);
    // Devices load in order: nic0 reached STOP, accel0 failed in RESUMING; all were reset.
    assert.deepEqual(dstRec.devices.get('nic0'), ['RUNNING', 'RESUMING', 'STOP', 'RUNNING']);
    assert.deepEqual(dstRec.devices.get('accel0'), ['RUNNING', 'RESUMING', 'RUNNING']);
    assertDiscarded(dst);

    // The destination had not said LOADED: the source rolls back, with the destination's reason.
    assert.equal(a.status, 'failed');
    assert.equal(a.error?.code, MigrationErrorCode.PEER);
    assert.equal(a.error?.phase, 'hand-off');
    assert.equal(a.error?.device, 'accel0');
    assert.equal(a.error?.errno, 'EIO');
    assert.deepEqual(srcRec.statuses, ['setup', 'active', 'device', 'failed']);
    assert.deepEqual(srcRec.devices.get('nic0'), [
      'RUNNING',
      'PRE_COPY',
      'PRE_COPY_P2P',
      'STOP_COPY',
      'RUNNING',
    ]);
    assert.deepEqual(srcRec.devices.get('accel0'), ['RUNNING', 'PRE_COPY', 'STOP_COPY', 'RUNNING']);
    assert.deepEqual(srcRec.devices.get('basic0'), ['RUNNING', 'STOP_COPY', 'RUNNING']);
    await assertRolledBack(src);
  });

  for (const multifd of [true, false]) {
    test(`a stop-copy write fails (EIO), multifd ${multifd ? 'on' : 'off'}: the destination fails in stop-copy`, async (t) => {
      const { src, dst } = await pair(t);
      const driver = dst.device('basic0').device.driver;
      const startResuming = driver.startResuming.bind(driver);
      driver.startResuming = () => {
        const session = startResuming();
        session.write = () => {
          throw kernelError('EIO', 'injected: basic0 refuses its state');
        };
        delete session.writeFrom;
        return session;
      };
      const { srcRec, done } = await startMigration(src, dst, { params: { multifd } });
      const [a, b] = await done;

      assert.equal(b.status, 'failed');
      assert.equal(b.error?.code, MigrationErrorCode.DEVICE);
      assert.equal(b.error?.phase, 'stop-copy');
      assert.equal(b.error?.device, 'basic0');
      assert.equal(b.error?.errno, 'EIO');
      assertDiscarded(dst);

      assert.equal(a.status, 'failed');
      assert.equal(a.error?.code, MigrationErrorCode.PEER);
      // The destination fails at basic0's first packet, which may come before the source has
      // flushed the rest of its stop-copy data ('stop-copy') or after ('hand-off').
      assert.ok(['stop-copy', 'hand-off'].includes(a.error!.phase), a.error!.phase);
      assert.equal(a.error?.device, 'basic0');
      assert.equal(a.error?.errno, 'EIO');
      assert.deepEqual(srcRec.statuses, ['setup', 'active', 'device', 'failed']);
      await assertRolledBack(src);
    });
  }
});

describe('an incompatible destination', { timeout: 120_000 }, () => {
  const cases: [string, VmOptions][] = [
    ['other RAM size', { ramBytes: 32 * MiB }],
    ['other accel memory size', { accelMemoryBytes: 2 * MiB }],
  ];
  for (const [name, dstVm] of cases) {
    test(`${name}: ERR_MIGRATION_INCOMPATIBLE in handshake on both sides, nothing moved`, async (t) => {
      const { src, dst } = await pair(t, {}, dstVm);
      const { srcRec, dstRec, done } = await startMigration(src, dst);
      const [a, b] = await done;

      assert.equal(b.status, 'failed');
      assert.equal(b.error?.code, MigrationErrorCode.INCOMPATIBLE);
      assert.equal(b.error?.phase, 'handshake');
      assert.match(b.error!.message, dstVm.ramBytes ? /RAM block 0: pc\.ram/ : /accel0/);
      assert.deepEqual(dstRec.statuses, ['setup', 'failed']);
      assert.deepEqual(dstRec.devices.get('accel0'), ['RUNNING'], 'never RESUMING');
      assert.equal(b.ram.transferredBytes, 0);
      assertDiscarded(dst);

      assert.equal(a.status, 'failed');
      assert.equal(a.error?.code, MigrationErrorCode.INCOMPATIBLE);
      assert.equal(a.error?.phase, 'handshake');
      assert.equal(a.ram.transferredBytes, 0);
      assert.equal(a.vfio.transferredBytes, 0);
      assert.deepEqual(srcRec.statuses, ['setup', 'failed']);
      neverLeftRunning(srcRec);
      assert.deepEqual(deviceStates(src), allIn('RUNNING'));
      await assertRolledBack(src);
    });
  }
});
