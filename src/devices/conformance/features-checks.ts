import { MigState, migStateName } from '../../uapi/migration.js';
import { type CheckSpec, check } from './check.js';
import type { Harness } from './harness.js';
import { attempt, describeOutcome, expect } from './outcome.js';
import { referenceStates } from './reference-fsm.js';

/** The SampleDevice contract the other checks rely on, and MIG_DATA_SIZE. */
export function featureChecks(_kit: Harness): CheckSpec[] {
  const checks: CheckSpec[] = [
    check('features', 'a fresh device is RUNNING', (k) => {
      const device = k.create('fresh');
      const state = k.getState(device);
      expect(state === MigState.RUNNING, `GET reports ${migStateName(state)}`);
      return undefined;
    }),
    check('features', 'digest() is stable', (k) => {
      const device = k.create('digest');
      const a = k.digest(device, 'first digest');
      const b = k.digest(device, 'second digest');
      expect(a === b, `two digests of an idle device differ (${a} / ${b})`);
      return undefined;
    }),
    check('features', 'work() changes state while RUNNING', (k) => {
      const device = k.create('work');
      const before = k.digest(device, 'before work');
      k.work(device);
      expect(
        k.digest(device, 'after work') !== before,
        `digest unchanged after work(${k.settings.workUnits})`,
      );
      return undefined;
    }),
  ];
  for (const state of [MigState.STOP, MigState.STOP_COPY, MigState.RESUMING]) {
    checks.push(
      check('features', `work() does nothing in ${migStateName(state)}`, (k) => {
        const device = k.create('idle-work');
        k.work(device);
        k.driveTo(device, state);
        const before = k.digest(device, `in ${migStateName(state)}`);
        k.work(device);
        const after = k.digest(device, `after work() in ${migStateName(state)}`);
        expect(
          after === before,
          `work(${k.settings.workUnits}) changed the digest in ${migStateName(state)}`,
        );
        return undefined;
      }),
    );
  }
  checks.push(
    check('features', 'MIG_DATA_SIZE GET in every state', (k) => {
      const seen: string[] = [];
      for (const state of referenceStates(k.features)) {
        const device = k.create('data-size');
        k.work(device);
        k.driveTo(device, state);
        const size = attempt(() => device.vfio.getMigDataSize());
        expect(size.ok, () => `MIG_DATA_SIZE GET in ${migStateName(state)}: ${describeOutcome(size)}`);
        expect(
          typeof size.value === 'bigint' && size.value >= 0n,
          `MIG_DATA_SIZE in ${migStateName(state)} returned ${String(size.value)}, not a u64 bigint`,
        );
        seen.push(`${migStateName(state)}=${size.value}`);
      }
      return seen.join(' ');
    }),
  );
  return checks;
}
