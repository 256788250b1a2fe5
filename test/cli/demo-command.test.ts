import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import { setImmediate as tick } from 'node:timers/promises';
import { InvalidArgumentError } from 'commander';
import {
  bandwidthOption,
  type DemoOptions,
  type DemoReport,
  demoCommand,
  dirtyRateOption,
  ramOption,
} from '../../src/cli/demo-command.js';
import type { DemoHost } from '../../src/cli/demo-hosts.js';
import { ControlError } from '../../src/vmm/host/control-client.js';
import type { MigrationInfo } from '../../src/vmm/migration/migration-info.js';
import { completedInfo, failedInfo, FakeHost, fakeInfo, type FakeIo, fakeIo } from './migration-fakes.js';

const GiB = 2 ** 30;
const OPTIONS: DemoOptions = { ram: GiB, dirtyRate: 64, channels: 2, downtimeLimit: 300, maxBandwidth: 0 };
const VM = 'demo-vm';

interface Scenario {
  /** How the source's migration ends (completed). */
  end?: MigrationInfo;
  /** The destination's digest differs from the source's. */
  mismatch?: boolean;
  /** migrate itself fails. */
  migrateThrows?: boolean;
  /** The destination host does not start. */
  destinationFails?: boolean;
  /** The source's events stop after 'active' until the test says. */
  hold?: boolean;
}

/** Two fake hosts that migrate the demo VM as the scenario says; records starts and shutdowns. */
function world(scenario: Scenario = {}) {
  const source = new FakeHost();
  const destination = new FakeHost();
  const shutdowns: string[] = [];
  const end = scenario.end ?? completedInfo({ vm: VM });
  const finish = (info: MigrationInfo) => {
    const ok = info.status === 'completed';
    source.vms.get(VM)!.state = ok ? 'migrated' : 'running';
    destination.vms.get(VM)!.state = ok ? 'stopped' : 'created';
    source.vms.get(VM)!.digest = 'c'.repeat(64);
    destination.vms.get(VM)!.digest = (scenario.mismatch ? 'd' : 'c').repeat(64);
    source.events.push({ type: 'status', status: info.status, info }, { type: 'end', info });
    destination.events.push({ type: 'end', info: { ...info, role: 'destination' } });
  };
  source.onMigrate = () => {
    if (scenario.migrateThrows) {
      throw new ControlError(409, {
        code: 'ERR_MIGRATION_VM_STATE',
        message: 'VM demo-vm is already migrating',
      });
    }
    source.events.push({ type: 'status', status: 'active', info: fakeInfo('active', { vm: VM }) });
    if (!scenario.hold) finish(end);
  };
  source.onCancel = () => finish(fakeInfo('cancelled', { vm: VM }));
  const startHost = async (name: string): Promise<DemoHost> => {
    const isSource = name.startsWith('demo-src-');
    if (!isSource && scenario.destinationFails)
      throw new ControlError(0, { code: 'ERR_DEMO_HOST', message: 'no' });
    return {
      address: `tcp:127.0.0.1:${isSource ? 1111 : 2222}`,
      api: isSource ? source : destination,
      shutdown: async () => {
        shutdowns.push(isSource ? 'source' : 'destination');
      },
    };
  };
  return { source, destination, shutdowns, startHost };
}

async function runDemo(w: ReturnType<typeof world>, io: FakeIo, options: Partial<DemoOptions> = {}) {
  return demoCommand({ ...OPTIONS, json: true, ...options }, { startHost: w.startHost, io, warmupMs: 0 });
}

const report = (io: FakeIo) => JSON.parse(io.stdout.join('\n')) as DemoReport;

describe('softvfio demo, with fake hosts', () => {
  test('digests equal: verified, exit 0, one JSON document with the numbers; both hosts shut down', async () => {
    const w = world();
    const io = fakeIo();
    assert.equal(await runDemo(w, io), 0, io.stderr.join('\n'));
    assert.equal(io.stdout.length, 1, 'exactly one JSON document');
    const r = report(io);
    assert.equal(r.verified, true);
    assert.deepEqual(Object.keys(r).slice(0, 9), [
      'verified',
      'downtimeMs',
      'totalTimeMs',
      'setupTimeMs',
      'transferredBytes',
      'iterations',
      'mbps',
      'digest',
      'checks',
    ]);
    assert.equal(r.downtimeMs, 123);
    assert.equal(r.totalTimeMs, 2468);
    assert.equal(r.setupTimeMs, 37);
    assert.equal(r.transferredBytes, 1616 * 2 ** 20, 'RAM + device bytes of the source');
    assert.equal(r.iterations, 7);
    assert.equal(r.mbps, 5213.4);
    assert.deepEqual(r.digest, { source: 'c'.repeat(64), destination: 'c'.repeat(64) });
    assert.deepEqual(r.parameters, { downtimeLimitMs: 300, maxBandwidthBytesPerSec: 0, multifdChannels: 2 });
    assert.equal(r.source.role, 'source');
    assert.equal(r.destination?.role, 'destination');
    assert.ok(r.checks.every((c) => c.ok));
    assert.deepEqual(w.shutdowns.sort(), ['destination', 'source']);

    assert.deepEqual(w.source.calls.slice(0, 4), [
      `create ${VM}`,
      `start ${VM}`,
      `migrate ${VM} tcp:127.0.0.1:4444`,
      `events ${VM}`,
    ]);
    assert.deepEqual(w.destination.calls.slice(0, 3), [`create ${VM}`, `incoming ${VM}`, `events ${VM}`]);
    assert.deepEqual(
      (w.destination.incomingBody as { autostart?: boolean }).autostart,
      false,
      'the destination stays stopped after the hand-off, so its digest is taken before it runs',
    );
    const calls = w.destination.calls;
    assert.ok(calls.indexOf(`digest ${VM}`) < calls.indexOf(`start ${VM}`), 'digest first, then start');
    assert.ok(!calls.includes(`stop ${VM}`));
    assert.deepEqual(w.source.migrateBody, {
      uri: 'tcp:127.0.0.1:4444',
      params: { downtimeLimitMs: 300, maxBandwidthBytesPerSec: 0, multifdChannels: 2 },
    });
    assert.equal(io.listening(), 0);
  });

  test('digests differ: verified false, exit 1, hosts shut down', async () => {
    const w = world({ mismatch: true });
    const io = fakeIo();
    assert.equal(await runDemo(w, io), 1);
    const r = report(io);
    assert.equal(r.verified, false);
    assert.deepEqual(
      r.checks.filter((c) => !c.ok).map((c) => c.check),
      ['guest RAM and device state identical'],
    );
    assert.notEqual(r.digest.source, r.digest.destination);
    assert.deepEqual(w.shutdowns.sort(), ['destination', 'source']);
  });

  test('the migration fails: verified false with the error, no digests, exit 1, hosts shut down', async () => {
    const w = world({ end: { ...failedInfo(), vm: VM } });
    const io = fakeIo();
    assert.equal(await runDemo(w, io), 1);
    const r = report(io);
    assert.equal(r.verified, false);
    assert.equal(r.source.error?.errno, 'EIO');
    assert.deepEqual(r.digest, { source: null, destination: null });
    assert.match(r.checks[0]!.detail, /^failed: switchover: device accel0/);
    assert.deepEqual(w.shutdowns.sort(), ['destination', 'source']);
  });

  test('migrate throws: the error is reported, exit 1, hosts shut down', async () => {
    const w = world({ migrateThrows: true });
    const io = fakeIo();
    assert.equal(await runDemo(w, io, { json: false }), 1);
    assert.match(io.stderr.join('\n'), /softvfio demo: VM demo-vm is already migrating/);
    assert.deepEqual(w.shutdowns.sort(), ['destination', 'source']);
  });

  test('a host that does not start: the other one is shut down, exit 1', async () => {
    const w = world({ destinationFails: true });
    const io = fakeIo();
    assert.equal(await runDemo(w, io), 1);
    assert.deepEqual(w.shutdowns, ['source']);
    assert.deepEqual(w.source.calls, [], 'nothing was created');
  });

  test('SIGINT while migrating: one cancel on the source, the run ends unverified, hosts shut down', async () => {
    const w = world({ hold: true });
    const io = fakeIo();
    const run = runDemo(w, io);
    while (!w.source.calls.includes(`events ${VM}`)) await tick();
    io.signal('SIGINT');
    assert.equal(await run, 1);
    assert.deepEqual(
      w.source.calls.filter((c) => c.startsWith('cancel')),
      [`cancel ${VM}`],
    );
    assert.ok(!w.destination.calls.some((c) => c.startsWith('cancel')));
    assert.equal(report(io).source.status, 'cancelled');
    assert.deepEqual(w.shutdowns.sort(), ['destination', 'source']);
  });

  test('without --json: steps on stderr, the verdict, checks and both summaries on stdout', async () => {
    const io = fakeIo();
    assert.equal(await runDemo(world(), io, { json: false }), 0);
    const text = io.stdout.join('\n');
    assert.match(
      text,
      /^softvfio demo: verified: VM demo-vm arrived with identical guest RAM and device state/,
    );
    assert.match(text, /│ guest RAM and device state identical\s+│ ok\s+│ c{64}/);
    assert.match(text, /│ downtime\s+│ 123 ms/);
    assert.match(text, /│ parameters\s+│ downtime-limit 300 ms, max-bandwidth unlimited, multifd-channels 2/);
    assert.match(text, /Migration of VM demo-vm \(source\)/);
    assert.match(text, /Migration of VM demo-vm \(destination\)/);
    const log = io.stderr.join('\n');
    assert.match(
      log,
      /\[demo\] hosts demo-src-\d+ on tcp:127\.0\.0\.1:1111 and demo-dst-\d+ on tcp:127\.0\.0\.1:2222/,
    );
    assert.match(log, /\[demo\] migrating to tcp:127\.0\.0\.1:4444/);
    assert.match(log, /\[demo\] shutting the hosts down/);
  });

  test('options the VM cannot take are exit 2 before any host starts', async () => {
    const w = world();
    const io = fakeIo();
    assert.equal(await runDemo(w, io, { json: false, channels: 300 }), 2);
    assert.match(io.stderr.join('\n'), /multifd-channels must be an integer from 1 to 255/);
    assert.deepEqual(w.shutdowns, []);
  });

  test('option values: sizes, rates and bandwidths are checked with a clear message', () => {
    assert.equal(ramOption('1GiB'), GiB);
    assert.equal(ramOption('64MiB'), 64 * 2 ** 20);
    for (const bad of ['1GB', '1000', '32MiB', '2TiB', '-1'])
      assert.throws(() => ramOption(bad), InvalidArgumentError);
    assert.equal(dirtyRateOption('12.5'), 12.5);
    for (const bad of ['0', 'fast', '-3', '1e3'])
      assert.throws(() => dirtyRateOption(bad), InvalidArgumentError);
    assert.equal(bandwidthOption('0'), 0);
    assert.equal(bandwidthOption('512MiB/s'), 512 * 2 ** 20);
    for (const bad of ['lots', '1 Gbps', '-1'])
      assert.throws(() => bandwidthOption(bad), InvalidArgumentError);
  });
});
