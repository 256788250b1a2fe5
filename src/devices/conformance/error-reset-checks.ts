import { ArcBrokeDevice } from '../../kernel/vfio/migration-driver.js';
import { MigState, migStateName } from '../../uapi/migration.js';
import type { SampleDevice } from '../sample-device.js';
import { type CheckSpec, check } from './check.js';
import { concatBytes, probeFd, readToEnd, writeUntilError } from './data-fds.js';
import type { Harness } from './harness.js';
import { attempt, describeOutcome, expect, skip } from './outcome.js';
import { referenceStates } from './reference-fsm.js';
import { TRANSITION_TARGETS } from './transition-checks.js';

/** The driver hooks an injected fault replaces: the ones the RUNNING -> STOP path can call. */
const INJECTED_HOOKS = ['stop', 'setP2pQuiesced'] as const;

/**
 * Put a device into ERROR. First the honest way: loads of bad streams, which some drivers answer
 * with ERROR. If the driver never goes there, a fault is injected into this instance's driver
 * (its stop hooks throw ArcBrokeDevice, which the VFIO core turns into ERROR) and RUNNING -> STOP
 * is requested. Returns how ERROR was reached.
 */
function bringToError(kit: Harness, device: SampleDevice): string {
  const golden = kit.golden();
  for (const [what, bytes] of [
    ['a half stream', golden.bytes.subarray(0, Math.floor(golden.bytes.length / 2))],
    ['a corrupted stream', golden.bytes.map((b, i) => (i % 7 === 3 ? b ^ 0xff : b))],
  ] as const) {
    kit.driveFromRunningTo(device, MigState.STOP, 'to STOP');
    const fd = kit.setResuming(device, 'STOP -> RESUMING');
    writeUntilError(fd, bytes);
    attempt(() => device.vfio.setMigDeviceState(MigState.STOP));
    const state = kit.getState(device);
    if (state === MigState.ERROR) return `reached by loading ${what}`;
    const reset = attempt(() => device.vfio.reset());
    expect(reset.ok, () => `reset from ${migStateName(state)}: ${describeOutcome(reset)}`);
  }
  const driver = (device.vfio as { driver?: unknown }).driver;
  if (typeof driver !== 'object' || driver === null)
    skip('ERROR not reached, and the device has no driver to inject a fault into');
  const hooks = driver as Record<string, unknown>;
  const saved = INJECTED_HOOKS.map((name) => [name, Object.getOwnPropertyDescriptor(hooks, name)] as const);
  for (const name of INJECTED_HOOKS) {
    hooks[name] = () => {
      throw new ArcBrokeDevice('EIO', 'fault injected by the conformance kit');
    };
  }
  try {
    const route = attempt(() => device.vfio.setMigDeviceState(MigState.STOP));
    const state = kit.getState(device);
    if (state !== MigState.ERROR) {
      skip(`ERROR not reached: bad loads did not, and an injected arc fault gave ${describeOutcome(route)}`);
    }
  } finally {
    for (const [name, descriptor] of saved) {
      if (descriptor) Object.defineProperty(hooks, name, descriptor);
      else delete hooks[name];
    }
  }
  return 'reached by an injected ArcBrokeDevice on RUNNING -> STOP (bad loads did not)';
}

export function errorResetChecks(kit: Harness): CheckSpec[] {
  const checks: CheckSpec[] = referenceStates(kit.features).map((state) =>
    check('error-reset', `reset from ${migStateName(state)}`, (k) => {
      const device = k.create('reset');
      k.work(device);
      const fd = k.driveTo(device, state);
      const reset = attempt(() => device.vfio.reset());
      expect(reset.ok, () => `reset: ${describeOutcome(reset)}`);
      const after = k.getState(device, 'GET after reset');
      expect(after === MigState.RUNNING, `reset left the device in ${migStateName(after)}`);
      if (fd) {
        const live = probeFd(fd);
        expect(
          live === 'ENODEV',
          `the ${fd.direction} fd of the session answers ${live} after reset, not ENODEV`,
        );
      }
      const before = k.digest(device, 'after reset');
      k.work(device);
      expect(k.digest(device, 'work after reset') !== before, 'the device does no work after reset');
      return fd ? `fd ${fd.direction} dead` : undefined;
    }),
  );
  // One device goes through ERROR; the three checks share it, in order.
  let broken: { device: SampleDevice; how: string } | undefined;
  let unreachable: string | undefined;
  const inError = (): SampleDevice => {
    if (unreachable) skip(unreachable);
    expect(broken, 'no device in ERROR (an earlier check failed)');
    return broken.device;
  };
  checks.push(
    check('error-reset', 'a device can be brought to ERROR', (k) => {
      const device = k.createShared('error');
      k.work(device);
      try {
        broken = { device, how: bringToError(k, device) };
      } catch (error) {
        unreachable = 'ERROR could not be reached';
        throw error;
      }
      return broken.how;
    }),
    check('error-reset', 'ERROR refuses every SET with EINVAL', (k) => {
      const device = inError();
      for (const target of TRANSITION_TARGETS) {
        const got = attempt(() => device.vfio.setMigDeviceState(target));
        expect(
          !got.ok && got.errno === 'EINVAL',
          () => `SET ${migStateName(target)} in ERROR: expected EINVAL, got ${describeOutcome(got)}`,
        );
        const state = k.getState(device);
        expect(
          state === MigState.ERROR,
          `SET ${migStateName(target)} moved the device from ERROR to ${migStateName(state)}`,
        );
      }
      return `${TRANSITION_TARGETS.length} targets refused`;
    }),
    check('error-reset', 'reset leaves ERROR for RUNNING, and the device migrates again', (k) => {
      const device = inError();
      const reset = attempt(() => device.vfio.reset());
      expect(reset.ok, () => `reset in ERROR: ${describeOutcome(reset)}`);
      const state = k.getState(device, 'GET after reset');
      expect(state === MigState.RUNNING, `reset left the device in ${migStateName(state)}`);
      k.work(device);
      k.driveFromRunningTo(device, MigState.STOP, 'after reset, to STOP');
      const fd = k.setSaving(device, MigState.STOP_COPY, 'after reset, STOP -> STOP_COPY');
      const bytes = concatBytes(readToEnd(fd, k.settings));
      const digest = k.digest(device, 'after reset, in STOP_COPY');
      const loaded = k.load(bytes, 'destination of the reset device');
      expect(
        k.digest(loaded, 'destination') === digest,
        'the reset device saved a stream that loads differently',
      );
      return `${bytes.length} bytes round trip after reset`;
    }),
  );
  return checks;
}
