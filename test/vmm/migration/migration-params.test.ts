// Migration parameters and capabilities: QEMU's names and defaults, range checks naming QEMU's
// parameter, the destination's queue cap, and the `name=value` settings of the CLI.
import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import {
  DEFAULT_INCOMING_PARAMETERS,
  DEFAULT_MIGRATION_PARAMETERS,
  INCOMING_PARAMETER_NAMES,
  MIGRATION_PARAMETER_NAMES,
  type MigrationParameters,
  parseMigrationSettings,
  QUEUED_BUFFERS_BYTES_RANGE,
  resolveIncomingParameters,
  resolveMigrationParameters,
} from '../../../src/vmm/migration/migration-params.js';

const MiB = 1024 * 1024;

function invalid(pattern: RegExp) {
  return (err: unknown) => {
    assert.equal((err as { code?: string }).code, 'ERR_INVALID_ARGUMENT');
    assert.match((err as Error).message, pattern);
    return true;
  };
}

describe('migration parameters', () => {
  test('defaults equal QEMU’s (migration/options.c), multifd and switchover-ack on', () => {
    assert.deepEqual(resolveMigrationParameters(), {
      downtimeLimitMs: 300,
      maxBandwidthBytesPerSec: 128 * MiB,
      availSwitchoverBandwidthBytesPerSec: 0,
      multifdChannels: 2,
      throttleTriggerThresholdPercent: 50,
      cpuThrottleInitialPercent: 20,
      cpuThrottleIncrementPercent: 10,
      maxCpuThrottlePercent: 99,
      autoConverge: false,
      switchoverAck: true,
      multifd: true,
    });
    assert.ok(Object.isFrozen(DEFAULT_MIGRATION_PARAMETERS));
    assert.notEqual(resolveMigrationParameters(), DEFAULT_MIGRATION_PARAMETERS, 'a copy');
  });

  test('QEMU’s names', () => {
    assert.deepEqual(MIGRATION_PARAMETER_NAMES, {
      downtimeLimitMs: 'downtime-limit',
      maxBandwidthBytesPerSec: 'max-bandwidth',
      availSwitchoverBandwidthBytesPerSec: 'avail-switchover-bandwidth',
      multifdChannels: 'multifd-channels',
      throttleTriggerThresholdPercent: 'throttle-trigger-threshold',
      cpuThrottleInitialPercent: 'cpu-throttle-initial',
      cpuThrottleIncrementPercent: 'cpu-throttle-increment',
      maxCpuThrottlePercent: 'max-cpu-throttle',
      autoConverge: 'auto-converge',
      switchoverAck: 'switchover-ack',
      multifd: 'multifd',
    });
    assert.deepEqual(INCOMING_PARAMETER_NAMES, {
      maxQueuedBuffersBytes: 'x-migration-max-queued-buffers-size',
    });
  });

  test('given values overlay the defaults; undefined keeps the default', () => {
    const p = resolveMigrationParameters({
      downtimeLimitMs: 0,
      autoConverge: true,
      multifdChannels: undefined,
    });
    assert.equal(p.downtimeLimitMs, 0);
    assert.equal(p.autoConverge, true);
    assert.equal(p.multifdChannels, 2);
    assert.equal(resolveMigrationParameters({ multifdChannels: 255 }).multifdChannels, 255);
    assert.equal(resolveMigrationParameters({ downtimeLimitMs: 2_000_000 }).downtimeLimitMs, 2_000_000);
    assert.equal(resolveMigrationParameters({ maxBandwidthBytesPerSec: 0 }).maxBandwidthBytesPerSec, 0);
  });

  test('range errors name the QEMU parameter and its range', () => {
    const cases: [Partial<Record<keyof MigrationParameters, unknown>>, RegExp][] = [
      [
        { downtimeLimitMs: 2_000_001 },
        /migration parameter downtime-limit must be an integer from 0 to 2000000, got 2000001/,
      ],
      [{ downtimeLimitMs: -1 }, /downtime-limit .* got -1/],
      [{ downtimeLimitMs: 1.5 }, /downtime-limit .* got 1\.5/],
      [{ downtimeLimitMs: '300' }, /downtime-limit .* got 300/],
      [
        { maxBandwidthBytesPerSec: Number.NaN },
        /max-bandwidth must be an integer from 0 to 9007199254740991, got NaN/,
      ],
      [{ maxBandwidthBytesPerSec: 2 ** 53 }, /max-bandwidth/],
      [{ availSwitchoverBandwidthBytesPerSec: -5 }, /avail-switchover-bandwidth/],
      [{ multifdChannels: 0 }, /multifd-channels must be an integer from 1 to 255, got 0/],
      [{ multifdChannels: 256 }, /multifd-channels .* got 256/],
      [{ throttleTriggerThresholdPercent: 0 }, /throttle-trigger-threshold must be an integer from 1 to 100/],
      [{ throttleTriggerThresholdPercent: 101 }, /throttle-trigger-threshold/],
      [{ cpuThrottleInitialPercent: 100 }, /cpu-throttle-initial must be an integer from 1 to 99/],
      [{ cpuThrottleIncrementPercent: 0 }, /cpu-throttle-increment must be an integer from 1 to 99/],
      [{ maxCpuThrottlePercent: 100 }, /max-cpu-throttle must be an integer from 1 to 99/],
      [{ autoConverge: 'on' }, /migration capability auto-converge must be true or false/],
      [{ switchoverAck: 1 }, /capability switchover-ack/],
      [{ multifd: null }, /capability multifd/],
    ];
    for (const [given, pattern] of cases) {
      assert.throws(
        () => resolveMigrationParameters(given as Partial<MigrationParameters>),
        invalid(pattern),
      );
    }
    assert.throws(
      () => resolveMigrationParameters({ bogus: 1 } as Partial<MigrationParameters>),
      invalid(/unknown migration parameter bogus/),
    );
  });

  test('cpu-throttle-initial may not exceed max-cpu-throttle', () => {
    assert.throws(
      () => resolveMigrationParameters({ cpuThrottleInitialPercent: 60, maxCpuThrottlePercent: 50 }),
      invalid(/cpu-throttle-initial 60 exceeds max-cpu-throttle 50/),
    );
    assert.throws(
      () => resolveMigrationParameters({ maxCpuThrottlePercent: 10 }),
      invalid(/cpu-throttle-initial 20 exceeds max-cpu-throttle 10/),
    );
    assert.equal(resolveMigrationParameters({ maxCpuThrottlePercent: 20 }).maxCpuThrottlePercent, 20);
  });
});

describe('incoming parameters', () => {
  test('the queue cap: 64 MiB by default, from one 1 MiB buffer (and a page) to 16 GiB', () => {
    assert.deepEqual(resolveIncomingParameters(), { maxQueuedBuffersBytes: 64 * MiB });
    assert.deepEqual(DEFAULT_INCOMING_PARAMETERS, { maxQueuedBuffersBytes: 64 * MiB });
    assert.deepEqual(QUEUED_BUFFERS_BYTES_RANGE, [MiB + 4096, 16 * 1024 * MiB]);
    assert.equal(
      resolveIncomingParameters({ maxQueuedBuffersBytes: MiB + 4096 }).maxQueuedBuffersBytes,
      MiB + 4096,
    );
    assert.equal(
      resolveIncomingParameters({ maxQueuedBuffersBytes: 16 * 1024 * MiB }).maxQueuedBuffersBytes,
      16 * 1024 * MiB,
    );
    assert.throws(
      () => resolveIncomingParameters({ maxQueuedBuffersBytes: MiB }),
      invalid(
        /x-migration-max-queued-buffers-size must be an integer from 1052672 to 17179869184, got 1048576/,
      ),
    );
    assert.throws(
      () => resolveIncomingParameters({ maxQueuedBuffersBytes: 16 * 1024 * MiB + 1 }),
      invalid(/x-migration-max-queued-buffers-size/),
    );
    assert.throws(
      () => resolveIncomingParameters({ maxQueuedBuffersBytes: Infinity }),
      invalid(/x-migration-max-queued-buffers-size .* got Infinity/),
    );
    assert.throws(
      () => resolveIncomingParameters({ maxQueuedBytes: 5 } as never),
      invalid(/unknown incoming migration parameter maxQueuedBytes/),
    );
  });
});

describe('parseMigrationSettings', () => {
  test('name=value with QEMU’s names', () => {
    assert.deepEqual(parseMigrationSettings(['downtime-limit=500']), { downtimeLimitMs: 500 });
    assert.deepEqual(parseMigrationSettings(['auto-converge=on']), { autoConverge: true });
    assert.deepEqual(
      parseMigrationSettings([
        'max-bandwidth=0',
        'multifd-channels=8',
        'switchover-ack=off',
        'multifd=false',
        'auto-converge=yes',
        'cpu-throttle-initial=5',
        'avail-switchover-bandwidth=1000000',
      ]),
      {
        maxBandwidthBytesPerSec: 0,
        multifdChannels: 8,
        switchoverAck: false,
        multifd: false,
        autoConverge: true,
        cpuThrottleInitialPercent: 5,
        availSwitchoverBandwidthBytesPerSec: 1_000_000,
      },
    );
    assert.deepEqual(parseMigrationSettings(['auto-converge=true', 'auto-converge=no']), {
      autoConverge: false,
    });
    assert.deepEqual(parseMigrationSettings([]), {});
  });

  test('bad names and values', () => {
    assert.throws(
      () => parseMigrationSettings(['downtime=500']),
      invalid(/unknown migration parameter "downtime" \(known: downtime-limit, max-bandwidth/),
    );
    assert.throws(
      () => parseMigrationSettings(['downtimeLimitMs=500']),
      invalid(/unknown migration parameter "downtimeLimitMs"/),
    );
    assert.throws(() => parseMigrationSettings(['=5']), invalid(/unknown migration parameter ""/));
    assert.throws(
      () => parseMigrationSettings(['auto-converge=maybe']),
      invalid(/capability auto-converge takes on or off, got "maybe"/),
    );
    assert.throws(
      () => parseMigrationSettings(['auto-converge']),
      invalid(/capability auto-converge takes on or off, got ""/),
    );
    assert.throws(() => parseMigrationSettings(['auto-converge=ON']), invalid(/takes on or off/));
    assert.throws(
      () => parseMigrationSettings(['downtime-limit']),
      invalid(/downtime-limit takes a decimal integer, got ""/),
    );
    assert.throws(
      () => parseMigrationSettings(['downtime-limit=-1']),
      invalid(/downtime-limit takes a decimal integer, got "-1"/),
    );
    assert.throws(
      () => parseMigrationSettings(['downtime-limit=0x10']),
      invalid(/takes a decimal integer, got "0x10"/),
    );
    assert.throws(() => parseMigrationSettings(['downtime-limit=1e3']), invalid(/takes a decimal integer/));
    assert.throws(() => parseMigrationSettings(['downtime-limit=5 ']), invalid(/takes a decimal integer/));
    assert.throws(
      () => parseMigrationSettings(['max-bandwidth=12345678901234567']),
      invalid(/takes a decimal integer/),
    );
    // well-formed but out of range: the range error, with QEMU's name
    assert.throws(
      () => parseMigrationSettings(['multifd-channels=0']),
      invalid(/multifd-channels must be an integer from 1 to 255, got 0/),
    );
    assert.throws(
      () => parseMigrationSettings(['downtime-limit=2000001']),
      invalid(/downtime-limit must be an integer/),
    );
    assert.throws(
      () => parseMigrationSettings(['max-bandwidth=9999999999999999']),
      invalid(/max-bandwidth must be an integer from 0 to 9007199254740991/),
    );
    assert.throws(
      () => parseMigrationSettings(['cpu-throttle-initial=60', 'max-cpu-throttle=50']),
      invalid(/cpu-throttle-initial 60 exceeds max-cpu-throttle 50/),
    );
  });
});
