import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import { setImmediate as tick } from 'node:timers/promises';
import { InvalidArgumentError } from 'commander';
import {
  incomingCommand,
  listenOption,
  migrateCommand,
  migrationUriOption,
  parseIncomingSettings,
} from '../../src/cli/migrate-command.js';
import type { MigrationEvent, MigrationInfo } from '../../src/vmm/migration/migration-info.js';
import { completedInfo, failedInfo, FakeHost, fakeInfo, fakeIo, jsonLines } from './migration-fakes.js';

const TO = 'tcp:127.0.0.1:4444';

/** What a migration that goes well sends: setup, active with progress, a pass, a device, the end. */
function runThrough(end: MigrationInfo): MigrationEvent[] {
  const active = fakeInfo('active');
  return [
    { type: 'status', status: 'active', info: active },
    { type: 'progress', info: { ...active, ram: { ...active.ram, transferredBytes: 2 ** 29 } } },
    { type: 'pass', iteration: 1, dirtyBytes: 2 ** 24 },
    { type: 'device-state', device: 'accel0', state: 'PRE_COPY' },
    { type: 'throttle', percent: 20 },
    { type: 'status', status: end.status, info: end },
    { type: 'end', info: end },
  ];
}

function hostEnding(end: MigrationInfo): FakeHost {
  const host = new FakeHost();
  host.onMigrate = () => host.events.push(...runThrough(end));
  return host;
}

/** Wait until the command follows the events (it has called migrationEvents). */
async function following(host: FakeHost): Promise<void> {
  while (!host.calls.includes('events vm1')) await tick();
  await tick();
}

describe('softvfio migrate', () => {
  test('completed: exit 0, one JSON line per event, the start first and the final report last', async () => {
    const host = hostEnding(completedInfo());
    const io = fakeIo();
    const code = await migrateCommand(host, { vm: 'vm1', to: TO, param: ['downtime-limit=500'] }, io);
    assert.equal(code, 0, io.stderr.join('\n'));
    assert.deepEqual(host.migrateBody, { uri: TO, params: { downtimeLimitMs: 500 } });
    const lines = jsonLines(io);
    assert.deepEqual(
      lines.map((l) => l.event),
      ['migrate', 'status', 'progress', 'pass', 'device-state', 'throttle', 'status', 'end'],
    );
    assert.deepEqual(Object.keys(lines[0]!), ['event', 'vm', 'uri', 'params', 'info']);
    assert.equal(lines[0]!.uri, TO);
    assert.deepEqual(lines[3], { event: 'pass', iteration: 1, dirtyBytes: 2 ** 24 });
    assert.deepEqual(lines[4], { event: 'device-state', device: 'accel0', state: 'PRE_COPY' });
    const end = lines.at(-1)!.info as MigrationInfo;
    assert.equal(end.status, 'completed');
    assert.equal(end.downtimeMs, 123);
    assert.equal(io.listening(), 0, 'the signal handler is removed');
  });

  test('failed: exit 1; the report names the phase, the device and the errno', async () => {
    const io = fakeIo();
    assert.equal(await migrateCommand(hostEnding(failedInfo()), { vm: 'vm1', to: TO }, io), 1);
    const end = jsonLines(io).at(-1)!;
    assert.equal(end.event, 'end');
    assert.deepEqual((end.info as MigrationInfo).error, failedInfo().error);

    const tty = fakeIo(true);
    assert.equal(await migrateCommand(hostEnding(failedInfo()), { vm: 'vm1', to: TO }, tty), 1);
    const summary = tty.stdout.join('\n');
    for (const part of [/status\s+│ failed/, /phase\s+│ switchover/, /device\s+│ accel0/, /errno\s+│ EIO/]) {
      assert.match(summary, part);
    }
    assert.match(
      tty.stderr.join('\n'),
      /softvfio migrate: the migration of VM vm1 failed: switchover: device accel0/,
    );
  });

  test('cancelled by the host: exit 1', async () => {
    const io = fakeIo();
    assert.equal(await migrateCommand(hostEnding(fakeInfo('cancelled')), { vm: 'vm1', to: TO }, io), 1);
    assert.equal((jsonLines(io).at(-1)!.info as MigrationInfo).status, 'cancelled');
  });

  test('a TTY: progress bars on the terminal stream, then the summary with the numbers on stdout', async () => {
    const io = fakeIo(true);
    assert.equal(await migrateCommand(hostEnding(completedInfo()), { vm: 'vm1', to: TO }, io), 0);
    assert.equal(io.stdout.length, 1, 'no JSON lines, only the summary');
    const summary = io.stdout[0]!;
    for (const part of [
      /Migration of VM vm1 \(source\)/,
      /status\s+│ completed/,
      /total time\s+│ 2,468 ms/,
      /setup time\s+│ 37 ms/,
      /downtime\s+│ 123 ms/,
      /transferred\s+│ 1\.6 GiB \(RAM 1\.5 GiB, devices 80 MiB\)/,
      /iterations\s+│ 7/,
      /throughput\s+│ 5213\.4 Mbps/,
      /│ nic0\s+│ nic\s+│ STOP\s+│ 20 MiB\s+│ 60 MiB\s+│ 18/,
      /│ 2\s+│ multifd\s+│ 759 MiB/,
    ]) {
      assert.match(summary, part);
    }
    const terminal = io.terminal();
    assert.match(terminal, /migration +\[/);
    assert.match(terminal, /channel 2 +\[/);
    assert.match(terminal, /device accel0: PRE_COPY/);
    assert.match(terminal, /iteration 1: 16 MiB dirty/);
  });

  test('bad -p values are exit 2 with the message, before the host is asked anything', async () => {
    for (const [param, message] of [
      ['downtime-limits=1', /unknown migration parameter "downtime-limits" \(known: downtime-limit,/],
      ['downtime-limit=fast', /downtime-limit takes a decimal integer, got "fast"/],
      ['multifd-channels=0', /multifd-channels must be an integer from 1 to 255, got 0/],
      ['auto-converge=maybe', /capability auto-converge takes on or off/],
    ] as const) {
      const host = new FakeHost();
      const io = fakeIo();
      assert.equal(await migrateCommand(host, { vm: 'vm1', to: TO, param: [param] }, io), 2, param);
      assert.match(io.stderr.join('\n'), message);
      assert.deepEqual(host.calls, []);
    }
    const json = fakeIo();
    const code = await migrateCommand(
      new FakeHost(),
      { vm: 'vm1', to: TO, json: true, param: ['cpu-throttle-initial=50', 'max-cpu-throttle=40'] },
      json,
    );
    assert.equal(code, 2);
    const { error } = JSON.parse(json.stdout.join('\n')) as { error: { code: string; message: string } };
    assert.equal(error.code, 'ERR_INVALID_ARGUMENT');
    assert.match(error.message, /cpu-throttle-initial 50 exceeds max-cpu-throttle 40/);
  });

  test('an unknown VM is exit 2 with the host’s message', async () => {
    const io = fakeIo(true);
    assert.equal(await migrateCommand(new FakeHost(), { vm: 'nope', to: TO }, io), 2);
    assert.match(io.stderr.join('\n'), /softvfio migrate: no VM named nope on host fake/);
    assert.deepEqual(io.stdout, []);
  });

  test('SIGINT: cancelMigration exactly once, then the migration is followed to its end; exit 1', async () => {
    const host = new FakeHost();
    host.onMigrate = () => host.events.push({ type: 'status', status: 'active', info: fakeInfo('active') });
    host.onCancel = () =>
      host.events.push(
        { type: 'status', status: 'cancelling', info: fakeInfo('cancelling') },
        { type: 'end', info: fakeInfo('cancelled') },
      );
    const io = fakeIo();
    const run = migrateCommand(host, { vm: 'vm1', to: TO }, io);
    await following(host);
    io.signal('SIGINT');
    assert.equal(await run, 1);
    assert.deepEqual(
      host.calls.filter((c) => c.startsWith('cancel')),
      ['cancel vm1'],
    );
    assert.deepEqual(
      jsonLines(io).map((l) => l.event),
      ['migrate', 'status', 'status', 'end'],
    );
    assert.match(io.stderr.join('\n'), /SIGINT: cancelling the migration \(SIGINT again to stop waiting\)/);
    assert.equal(io.listening(), 0);
  });

  test('a second SIGINT stops waiting: still one cancel call, exit 1', async () => {
    const host = new FakeHost();
    const io = fakeIo();
    const run = migrateCommand(host, { vm: 'vm1', to: TO }, io);
    await following(host);
    io.signal('SIGINT');
    io.signal('SIGINT');
    io.signal('SIGTERM');
    assert.equal(await run, 1);
    assert.equal(host.calls.filter((c) => c.startsWith('cancel')).length, 1);
    assert.match(io.stderr.join('\n'), /stopped following the migration of VM vm1 before it ended/);
  });

  test('events that stop before the end: the host is asked once, its final report ends the output', async () => {
    const host = new FakeHost();
    host.onMigrate = () => {
      host.events.push({ type: 'status', status: 'active', info: fakeInfo('active') });
      host.events.close();
      host.info = completedInfo();
    };
    const io = fakeIo();
    assert.equal(await migrateCommand(host, { vm: 'vm1', to: TO }, io), 0);
    assert.deepEqual(host.calls.slice(-1), ['query vm1']);
    assert.deepEqual(
      jsonLines(io).map((l) => l.event),
      ['migrate', 'status', 'end'],
    );

    const stuck = new FakeHost();
    stuck.onMigrate = () => {
      stuck.events.close();
      stuck.info = fakeInfo('active');
    };
    const io2 = fakeIo();
    assert.equal(await migrateCommand(stuck, { vm: 'vm1', to: TO }, io2), 1);
    assert.match(
      io2.stderr.join('\n'),
      /the events of VM vm1 ended before its migration did \(status active\)/,
    );
  });

  test('--detach: starts the migration and exits 0 without following it', async () => {
    const host = hostEnding(completedInfo());
    const io = fakeIo(true);
    assert.equal(await migrateCommand(host, { vm: 'vm1', to: TO, detach: true }, io), 0);
    assert.deepEqual(io.stdout, [`migrating VM vm1 to ${TO} (status setup)`]);
    assert.ok(!host.calls.includes('events vm1'));
    assert.equal(io.listening(), 0, 'no signal handler: Ctrl-C just ends the command');
  });
});

describe('softvfio incoming', () => {
  test('prints the URI to migrate to; --json prints one line with the info', async () => {
    const host = new FakeHost();
    const io = fakeIo(true);
    assert.equal(await incomingCommand(host, { vm: 'vm1' }, io), 0);
    assert.deepEqual(io.stdout, ['tcp:127.0.0.1:4444']);
    assert.deepEqual(host.incomingBody, { uri: 'tcp:127.0.0.1:0', params: {} });

    const json = fakeIo();
    const code = await incomingCommand(
      host,
      {
        vm: 'vm1',
        json: true,
        listen: '127.0.0.1:7000',
        param: ['x-migration-max-queued-buffers-size=128MiB'],
      },
      json,
    );
    assert.equal(code, 0);
    assert.deepEqual(host.incomingBody, {
      uri: 'tcp:127.0.0.1:7000',
      params: { maxQueuedBuffersBytes: 128 * 2 ** 20 },
    });
    const [line] = jsonLines(json);
    assert.deepEqual(Object.keys(line!), ['event', 'vm', 'uri', 'info']);
    assert.equal(line!.event, 'incoming');
    assert.equal(line!.uri, 'tcp:127.0.0.1:4444');
    assert.equal((line!.info as MigrationInfo).role, 'destination');
  });

  test('--wait follows the migration: exit 0 completed, 1 failed', async () => {
    const ok = hostEnding(completedInfo({ role: 'destination' }));
    ok.onMigrate();
    const io = fakeIo();
    assert.equal(await incomingCommand(ok, { vm: 'vm1', wait: true }, io), 0);
    const events = jsonLines(io).map((l) => l.event);
    assert.equal(events[0], 'incoming', 'not a TTY: the URI line is JSON too');
    assert.equal(events.at(-1), 'end');

    const bad = hostEnding(failedInfo());
    bad.onMigrate();
    const tty = fakeIo(true);
    assert.equal(await incomingCommand(bad, { vm: 'vm1', wait: true }, tty), 1);
    assert.equal(tty.stdout[0], 'tcp:127.0.0.1:4444');
    assert.match(tty.stdout[1]!, /errno\s+│ EIO/);
  });

  test('bad -p settings and unknown VMs are exit 2', async () => {
    for (const [param, message] of [
      ['x-migration-max-queued-buffers-size=lots', /takes a size such as 67108864 or 64MiB, got/],
      [
        'x-migration-max-queued-buffers-size=4KiB',
        /must be an integer from 1052672 to 17179869184, got 4096/,
      ],
      ['max-queued=1', /unknown incoming migration parameter "max-queued" \(known: x-migration-max-queued/],
    ] as const) {
      const host = new FakeHost();
      const io = fakeIo();
      assert.equal(await incomingCommand(host, { vm: 'vm1', param: [param] }, io), 2, param);
      assert.match(io.stderr.join('\n'), message);
      assert.deepEqual(host.calls, []);
    }
    const io = fakeIo();
    assert.equal(await incomingCommand(new FakeHost(), { vm: 'nope' }, io), 2);
    assert.match(io.stderr.join('\n'), /softvfio incoming: no VM named nope/);
  });
});

describe('option values', () => {
  test('--to takes tcp:HOST:PORT, --listen HOST:PORT', () => {
    assert.equal(migrationUriOption('tcp:127.0.0.1:4444'), 'tcp:127.0.0.1:4444');
    assert.equal(migrationUriOption('tcp:dst.example:65535'), 'tcp:dst.example:65535');
    for (const bad of [
      '127.0.0.1:4444',
      'tcp:127.0.0.1',
      'tcp:127.0.0.1:0',
      'tcp:h:65536',
      'unix:/x',
      'tcp::1',
    ]) {
      assert.throws(() => migrationUriOption(bad), InvalidArgumentError, bad);
    }
    assert.equal(listenOption('127.0.0.1:0'), '127.0.0.1:0');
    for (const bad of ['', '127.0.0.1', 'tcp:127.0.0.1:0', ':80', 'h:99999']) {
      assert.throws(() => listenOption(bad), InvalidArgumentError, bad);
    }
  });

  test('incoming settings: QEMU names, sizes with units, the range checked', () => {
    assert.deepEqual(parseIncomingSettings([]), {});
    assert.deepEqual(parseIncomingSettings(['x-migration-max-queued-buffers-size=16777216']), {
      maxQueuedBuffersBytes: 16 * 2 ** 20,
    });
    assert.throws(() => parseIncomingSettings(['x-migration-max-queued-buffers-size']), /takes a size/);
  });
});
