import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import {
  allChecks,
  CONFORMANCE_CATEGORIES,
  type ConformanceReport,
  failedChecks,
  findCheck,
  runConformance,
  runConformanceSuite,
} from '../../../src/devices/conformance/index.js';
import type { SampleDevice, SampleDeviceFactory } from '../../../src/devices/sample-device.js';
import type { SavingSession } from '../../../src/kernel/vfio/migration-driver.js';
import { type DataFdValue, VfioDevice } from '../../../src/kernel/vfio/vfio-device.js';
import { MIG_FEATURE_COMBOS, MigFeature, MigState, migFeatureNames } from '../../../src/uapi/migration.js';
import { brokenDevices } from './broken-devices.js';
import { createLedger, ledgerFactory, ledgerReference } from './ledger-device.js';

const foreign = ledgerFactory('ledger-other', 'a second ledger type', { pageCount: 16, pageBytes: 48 });
const RUNS = 30;

const failedNames = (report: ConformanceReport) => failedChecks(report).map((c) => `${c.category}/${c.name}`);

function explain(report: ConformanceReport): string {
  return failedChecks(report)
    .map((c) => `${c.category}/${c.name}: ${c.detail}`)
    .join('\n');
}

describe('runConformance on correct drivers', () => {
  test('the reference ledger (every feature) passes every check, none skipped', () => {
    const report = runConformance(ledgerReference, { foreign, runs: RUNS });
    assert.equal(report.summary.failed, 0, explain(report));
    assert.equal(report.summary.skipped, 0);
    assert.equal(report.migrationFeatures, 'STOP_COPY|P2P|PRE_COPY');
    assert.equal(report.foreignType, 'ledger-other');
    assert.deepEqual(
      report.categories.map((c) => c.category),
      [...CONFORMANCE_CATEGORIES],
    );
    // 7 states x (8 states + 2 invalid numbers).
    assert.equal(report.categories.find((c) => c.category === 'transitions')!.checks.length, 70);
    const model = findCheck(report, 'model', 'random sequences against the reference model');
    assert.match(model!.detail, new RegExp(`^${RUNS} runs, \\d+ commands, seed 1`));
    const totals = report.categories.reduce((n, c) => n + c.summary.total, 0);
    assert.equal(report.summary.total, totals);
  });

  for (const flags of MIG_FEATURE_COMBOS) {
    test(`a ledger with ${migFeatureNames(flags)} passes, with the checks its features call for`, () => {
      const factory = ledgerFactory(`ledger-${flags}`, 'reduced features', { migrationFlags: flags });
      const report = runConformance(factory, { foreign, runs: RUNS });
      assert.equal(report.summary.failed, 0, explain(report));
      const states = 4 + (flags & MigFeature.P2P ? 1 : 0) + (flags & MigFeature.PRE_COPY ? 1 : 0);
      const both = flags & MigFeature.P2P && flags & MigFeature.PRE_COPY ? 1 : 0;
      const transitions = report.categories.find((c) => c.category === 'transitions')!;
      assert.equal(transitions.checks.length, (states + both) * 10);
      const hasPrecopyChecks = findCheck(report, 'precopy', 'dirty_bytes grows with work()') !== undefined;
      assert.equal(hasPrecopyChecks, (flags & MigFeature.PRE_COPY) !== 0);
    });
  }

  test('a driver that breaks to ERROR on a bad load reaches ERROR without fault injection', () => {
    const factory = ledgerFactory('ledger-strict', 'bad loads break the device', { badLoad: 'error' });
    const report = runConformance(factory, { foreign, runs: RUNS });
    assert.equal(report.summary.failed, 0, explain(report));
    assert.match(
      findCheck(report, 'error-reset', 'a device can be brought to ERROR')!.detail,
      /loading a half stream/,
    );
    assert.match(findCheck(report, 'loading', 'truncated stream: half')!.detail, /now ERROR/);
    // The reference ledger stays in RESUMING, so the kit injects the fault instead.
    const plain = runConformance(ledgerReference, { categories: ['error-reset'] });
    assert.match(findCheck(plain, 'error-reset', 'a device can be brought to ERROR')!.detail, /injected/);
  });

  test('without a foreign factory the cross-type load is skipped, not failed', () => {
    const report = runConformance(ledgerReference, { runs: 0 });
    const check = findCheck(report, 'loading', 'stream of another device type')!;
    assert.equal(check.skipped, true);
    assert.equal(check.passed, true);
    assert.equal(report.summary.skipped, 1);
    assert.equal(report.summary.ok, true);
    assert.equal(findCheck(report, 'model', 'random sequences against the reference model'), undefined);
  });

  test('same seed, same verdicts and notes', () => {
    const strip = (r: ConformanceReport) => allChecks(r).map(({ durationMs: _d, ...rest }) => rest);
    const a = runConformance(ledgerReference, { foreign, runs: 20, seed: 7 });
    const b = runConformance(ledgerReference, { foreign, runs: 20, seed: 7 });
    assert.deepEqual(strip(a), strip(b));
  });

  test('deviceOptions made per instance reach every device, with the kit name and seed', () => {
    const seen: { name: string; seed: number }[] = [];
    const report = runConformance(ledgerReference, {
      foreign,
      runs: 5,
      deviceOptions: (instance) => {
        seen.push(instance);
        return { pageCount: 8, name: 'overridden', seed: 0 } as never;
      },
    });
    assert.equal(report.summary.failed, 0, explain(report));
    assert.ok(seen.length > 100);
    assert.equal(new Set(seen.map((s) => s.name)).size, seen.length, 'one name per instance');
    assert.ok(seen.some((s) => s.name.startsWith('ledger-other-foreign-source-')));
    // 8 pages of 64 bytes: header 21 + 8 page records of 71 + REGS 47 + END 11.
    assert.match(findCheck(report, 'round-trip', 'STOP -> STOP_COPY, no precopy')!.detail, /^647 bytes/);
  });

  test('categories select what runs', () => {
    const report = runConformance(ledgerReference, { categories: ['streams'] });
    // The feature probe always runs: it decides which checks exist.
    assert.deepEqual(
      report.categories.map((c) => c.category),
      ['features', 'streams'],
    );
    assert.equal(report.categories[0]!.checks.length, 1);
  });
});

describe('runConformance catches broken drivers', () => {
  for (const broken of brokenDevices) {
    test(`${broken.factory.type}: ${broken.factory.description}`, () => {
      const report = runConformance(broken.factory, { foreign, runs: RUNS });
      assert.equal(report.summary.ok, false);
      const failed = failedNames(report);
      for (const name of broken.caughtBy)
        assert.ok(failed.includes(name), `${name} should fail; failed: ${failed}`);
    });
  }

  test('the random sequences alone find the FSM and load bugs, with a shrunk replayable sequence', () => {
    const expectations: Record<string, RegExp> = {
      'ledger-accepts-truncated': /the load succeeded with \d+ of \d+ bytes/,
      'ledger-fd-on-stop-copy-arc': /-> STOP_COPY: expected no fd, got a save fd/,
      'ledger-stop-copy-to-pre-copy': /STOP_COPY -> PRE_COPY: expected EINVAL/,
      'ledger-works-while-stopped': /work\(\d+\) changed the device in (STOP|STOP_COPY|RESUMING)/,
    };
    for (const [type, pattern] of Object.entries(expectations)) {
      const broken = brokenDevices.find((b) => b.factory.type === type)!;
      const report = runConformance(broken.factory, { categories: ['model'], runs: 100 });
      const check = findCheck(report, 'model', 'random sequences against the reference model')!;
      assert.equal(check.passed, false, type);
      assert.match(check.detail, pattern);
      assert.match(check.detail, /sequence: .*set\(/);
      assert.match(check.detail, /replay: seed 1, path "/);
    }
  });

  test('the STOP_COPY ENOMSG bug is reported where it is, not as a flood of golden-stream failures', () => {
    const broken = brokenDevices.find((b) => b.factory.type === 'ledger-stop-copy-enomsg')!;
    const report = runConformance(broken.factory, { foreign, runs: RUNS });
    const detail = findCheck(report, 'streams', 'STOP_COPY reads 0 forever at the end')!.detail;
    assert.match(detail, /returned ENOMSG after \d+ bytes/);
    // Loads of the (leniently captured) golden stream still work, so unrelated checks pass.
    assert.equal(findCheck(report, 'loading', 'truncated stream: half')!.passed, true);
    assert.equal(findCheck(report, 'transitions', 'RESUMING -> RUNNING')!.passed, true);
  });
});

/** A factory around the ledger whose devices are tampered with after creation. */
function tampered(
  type: string,
  tamper: (device: SampleDevice) => SampleDevice | undefined,
): SampleDeviceFactory {
  return {
    type,
    description: 'tampered ledger',
    create: (options = {}) => {
      const device = createLedger(type, options);
      return tamper(device) ?? device;
    },
  };
}

class ReturnsGarbageFd extends VfioDevice {
  override setMigDeviceState(state: number): DataFdValue {
    const fd = super.setMigDeviceState(state);
    return state === MigState.STOP_COPY ? (42 as unknown as DataFdValue) : fd;
  }
}

describe('runConformance never throws for a misbehaving device', () => {
  const cases: [string, SampleDeviceFactory, RegExp][] = [
    [
      'create() throws',
      {
        type: 'no-hardware',
        description: 'x',
        create: () => {
          throw new Error('no hardware');
        },
      },
      /create\(\) failed: threw Error: no hardware/,
    ],
    [
      'create() returns nothing',
      { type: 'nothing', description: 'x', create: () => undefined as unknown as SampleDevice },
      /MIGRATION GET failed: threw TypeError/,
    ],
    [
      'no migration support',
      ledgerFactory('no-migration', 'flags 0', { migrationFlags: 0 }),
      /MIGRATION GET failed: ENOTTY/,
    ],
    [
      'a driver hook throws a TypeError',
      tampered('hook-type-error', (d) => {
        (d.vfio.driver as { startSaving: unknown }).startSaving = () => {
          throw new TypeError('undefined is not a function');
        };
        return undefined;
      }),
      /ERR_INTERNAL: .*undefined is not a function/,
    ],
    [
      'a session read throws a TypeError',
      tampered('read-type-error', (d) => {
        const driver = d.vfio.driver as { startSaving: (o: never) => SavingSession };
        const start = driver.startSaving.bind(driver);
        driver.startSaving = (o) => {
          const session = start(o);
          session.read = () => {
            throw new TypeError('cannot read properties of null');
          };
          return session;
        };
        return undefined;
      }),
      /ERR_INTERNAL: .*cannot read properties of null/,
    ],
    [
      'digest() throws',
      tampered('digest-throws', (d) => ({
        vfio: d.vfio,
        work: d.work,
        digest: () => {
          throw new RangeError('digest overflow');
        },
      })),
      /digest\(\) failed: threw RangeError: digest overflow/,
    ],
    [
      'SET returns a number that is no fd',
      ledgerFactory('garbage-fd', 'x', { vfioClass: ReturnsGarbageFd }),
      /returned an invalid data_fd value \(42\)/,
    ],
  ];
  for (const [what, factory, pattern] of cases) {
    test(what, () => {
      let report: ConformanceReport | undefined;
      assert.doesNotThrow(() => {
        report = runConformance(factory, { foreign, runs: 10 });
      });
      assert.equal(report!.summary.ok, false);
      assert.ok(
        failedChecks(report!).some((c) => pattern.test(c.detail)),
        `no failure matches ${pattern}:\n${explain(report!)}`,
      );
    });
  }
});

describe('runConformanceSuite', () => {
  test('runs every device, picks a foreign type for each, and fails when one device fails', () => {
    const broken = brokenDevices[0]!.factory;
    const suite = runConformanceSuite([ledgerReference, foreign, broken], { runs: 5 });
    assert.deepEqual(
      suite.devices.map((d) => [d.deviceType, d.foreignType]),
      [
        ['ledger', 'ledger-other'],
        ['ledger-other', broken.type],
        [broken.type, 'ledger'],
      ],
    );
    assert.equal(suite.summary.ok, false);
    assert.deepEqual(suite.summary.failedDevices, [broken.type]);
    const total = suite.devices.reduce((n, d) => n + d.summary.total, 0);
    assert.equal(suite.summary.checks.total, total);
  });

  test('an empty list is an empty, passing suite', () => {
    const suite = runConformanceSuite([]);
    assert.equal(suite.summary.devices, 0);
    assert.equal(suite.summary.ok, true);
  });
});
