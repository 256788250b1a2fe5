import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import {
  eventJson,
  overallProgressText,
  renderMigrationSummary,
  transferredBytes,
} from '../../src/cli/migration-output.js';
import { completedInfo, failedInfo, fakeInfo } from './migration-fakes.js';

describe('migration output', () => {
  test('a completed migration: every headline number, each device and each channel', () => {
    const text = renderMigrationSummary(completedInfo());
    for (const part of [
      /^Migration of VM vm1 \(source\)/,
      /│ status\s+│ completed/,
      /│ total time\s+│ 2,468 ms/,
      /│ setup time\s+│ 37 ms/,
      /│ downtime\s+│ 123 ms/,
      /│ transferred\s+│ 1\.6 GiB \(RAM 1\.5 GiB, devices 80 MiB\)/,
      /│ iterations\s+│ 7/,
      /│ throughput\s+│ 5213\.4 Mbps/,
      /│ RAM\s+│ 1 GiB: 200,000 pages sent, 62,144 zero, 0 B remaining/,
      /│ RAM sent\s+│ 1\.5 GiB while running, 36 MiB while stopped/,
      /│ accel0\s+│ accel\s+│ STOP\s+│ 10 MiB\s+│ 30 MiB\s+│ 17/,
      /│ 0\s+│ main\s+│ 100 MiB/,
      /│ 1\s+│ multifd\s+│ 758 MiB/,
    ]) {
      assert.match(text, part);
    }
    assert.doesNotMatch(text, /error|throttle|queued/);
  });

  test('a failed migration on the destination: the error with phase, device and errno; queued buffers', () => {
    const info = {
      ...failedInfo(),
      role: 'destination' as const,
      queuedBuffers: { bytes: 0, peakBytes: 3 * 2 ** 20, capBytes: 64 * 2 ** 20 },
      cpuThrottlePercentage: 30,
    };
    const text = renderMigrationSummary(info);
    for (const part of [
      /\(destination\)/,
      /│ downtime\s+│ -/,
      /│ RAM received\s+│/,
      /│ vCPU throttle\s+│ 30%/,
      /│ queued buffers\s+│ 0 B now, 3 MiB at most, cap 64 MiB/,
      /│ error\s+│ ERR_MIGRATION_DEVICE/,
      /│ {3}phase\s+│ switchover/,
      /│ {3}device\s+│ accel0/,
      /│ {3}errno\s+│ EIO/,
      /│ {3}message\s+│ switchover: device accel0: MIG_DEVICE_STATE SET STOP_COPY: EIO/,
    ]) {
      assert.match(text, part);
    }
  });

  test('while active: the expected downtime, and the progress line', () => {
    const active = fakeInfo('active', { expectedDowntimeMs: 250 });
    assert.match(renderMigrationSummary(active), /│ downtime\s+│ 250 ms expected/);
    assert.equal(
      overallProgressText({
        ...active,
        ram: { ...active.ram, transferredBytes: 2 ** 29, dirtySyncCount: 2 },
      }),
      'active | iteration 2 | RAM 512 MiB of 1 GiB, 1 GiB dirty | 0.0 Mbps | downtime ~250 ms',
    );
  });

  test('events as JSON lines: the type as "event", the rest as it is, one line', () => {
    const line = eventJson({ type: 'end', info: completedInfo() });
    assert.ok(!line.includes('\n'));
    const parsed = JSON.parse(line) as { event: string; info: { status: string } };
    assert.deepEqual(Object.keys(parsed), ['event', 'info']);
    assert.equal(parsed.info.status, 'completed');
    assert.equal(eventJson({ type: 'throttle', percent: 40 }), '{"event":"throttle","percent":40}');
    assert.equal(transferredBytes(completedInfo()), 1616 * 2 ** 20);
  });
});
