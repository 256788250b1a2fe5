import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { describe, test } from 'node:test';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import type { ConformanceSuiteReport } from '../../src/devices/conformance/index.js';
import { brokenDevices } from '../devices/conformance/broken-devices.js';

/** The built CLI, run as `softvfio` would be: a child process, judged by exit code and output. */
const MAIN = fileURLToPath(new URL('../../src/cli/main.js', import.meta.url));
const FIXTURES = fileURLToPath(new URL('../devices/conformance/fixtures.js', import.meta.url));

interface Run {
  code: number;
  stdout: string;
  stderr: string;
}

async function softvfio(...args: string[]): Promise<Run> {
  try {
    const { stdout, stderr } = await promisify(execFile)(process.execPath, [MAIN, ...args], {
      maxBuffer: 64 << 20,
    });
    return { code: 0, stdout, stderr };
  } catch (error) {
    const e = error as { code?: unknown; stdout?: string; stderr?: string };
    assert.equal(typeof e.code, 'number', `softvfio did not run: ${String(error)}`);
    return { code: e.code as number, stdout: e.stdout ?? '', stderr: e.stderr ?? '' };
  }
}

describe('softvfio conform', () => {
  test('--json on a registered sample device: one passing device report, exit 0', async () => {
    const run = await softvfio('conform', '--device', 'basic', '--runs', '5', '--json');
    assert.equal(run.code, 0, run.stderr);
    const suite = JSON.parse(run.stdout) as ConformanceSuiteReport;
    assert.deepEqual(
      suite.devices.map((d) => d.deviceType),
      ['basic'],
    );
    assert.equal(suite.summary.ok, true);
    assert.ok(suite.devices[0]!.summary.passed > 50);
  });

  test('an unknown device name is bad input: exit 2 and a clear error', async () => {
    const run = await softvfio('conform', '--device', 'nope');
    assert.equal(run.code, 2);
    assert.match(run.stderr, /unknown device "nope"/);
    assert.equal(run.stdout, '');
    const known = await softvfio('conform', '--module', FIXTURES, '--device', 'nope');
    assert.equal(known.code, 2);
    assert.match(
      known.stderr,
      /unknown device "nope" \(known: ledger, ledger-small, ledger-accepts-truncated/,
    );
  });

  test('bad option values and bad modules are exit 2', async () => {
    for (const args of [
      ['conform', '--runs', 'many'],
      ['conform', '--runs', '-1'],
      ['conform', '--seed', '1.5'],
      ['conform', '--module', 'does/not/exist.js'],
      ['conform', '--no-such-option'],
      ['frobnicate'],
    ]) {
      const run = await softvfio(...args);
      assert.equal(run.code, 2, `${args.join(' ')}: ${run.stderr}`);
      assert.notEqual(run.stderr, '');
    }
  });

  test('a conforming device: tables on stdout, exit 0', async () => {
    const run = await softvfio('conform', '--module', FIXTURES, '--device', 'ledger', '--runs', '10');
    assert.equal(run.code, 0, run.stdout + run.stderr);
    assert.match(run.stdout, /^PASS ledger \(STOP_COPY\|P2P\|PRE_COPY\)/);
    assert.match(run.stdout, /foreign: ledger-small, random runs: 10, seed: 1/);
    assert.match(run.stdout, /│ transitions\s+│ 70\s+│ 0\s+│ 0\s+│/);
    assert.match(run.stdout, /conformance: all 1 device\(s\) conform \(125 passed, 0 failed, 0 skipped\)/);
    assert.doesNotMatch(run.stdout, /failed check/);
  });

  test('a broken device: its failed checks are listed, exit 1', async () => {
    const run = await softvfio(
      'conform',
      '--module',
      FIXTURES,
      '--device',
      'ledger-accepts-truncated',
      '--runs',
      '10',
    );
    assert.equal(run.code, 1, run.stderr);
    assert.match(run.stdout, /^FAIL ledger-accepts-truncated/);
    assert.match(run.stdout, /│ failed check\s+│ detail/);
    assert.match(run.stdout, /loading\/truncated stream: half\s+│ RESUMING -> STOP accepted a stream cut to/);
    assert.match(run.stdout, /1 of 1 device\(s\) violate the uAPI: ledger-accepts-truncated/);
  });

  test('--json over a module: one document, every device, exit 1 when any fails', async () => {
    const run = await softvfio('conform', '--module', FIXTURES, '--json', '--runs', '5', '--seed', '3');
    assert.equal(run.code, 1, run.stderr);
    const suite = JSON.parse(run.stdout) as ConformanceSuiteReport;
    assert.deepEqual(
      suite.devices.map((d) => [d.deviceType, d.summary.ok, d.seed, d.runs]),
      [
        ['ledger', true, 3, 5],
        ['ledger-small', true, 3, 5],
        ...brokenDevices.map((b) => [b.factory.type, false, 3, 5]),
      ],
    );
    assert.deepEqual(
      suite.summary.failedDevices,
      brokenDevices.map((b) => b.factory.type),
    );
    const ledger = suite.devices[0]!;
    const check = ledger.categories.flatMap((c) => c.checks).find((c) => c.name === 'STOP_COPY -> PRE_COPY');
    assert.deepEqual(
      { category: check?.category, passed: check?.passed, detail: check?.detail },
      { category: 'transitions', passed: true, detail: 'EINVAL: STOP_COPY -> PRE_COPY(_P2P) is forbidden' },
    );
  });
});
