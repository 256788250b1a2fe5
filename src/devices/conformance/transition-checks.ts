import type { ResumeStream, SavingStream } from '../../kernel/vfio/mig-data-stream.js';
import { MIG_STATE_COUNT, migStateName } from '../../uapi/migration.js';
import { type CheckSpec, check } from './check.js';
import { describeFd, fdKind, probeFd } from './data-fds.js';
import type { Harness } from './harness.js';
import { attempt, describeOutcome, expect } from './outcome.js';
import { referenceSetState, referenceStates } from './reference-fsm.js';

/** Targets tried from every state: all eight states (ERROR included) and two numbers that are none. */
export const TRANSITION_TARGETS: readonly number[] = [
  ...Array.from({ length: MIG_STATE_COUNT }, (_, i) => i),
  MIG_STATE_COUNT,
  0xffffffff,
];

/**
 * Every (current, target) pair: a fresh device is driven into `current` one legal arc at a time,
 * SET `target` is requested, and state, data_fd and errno are compared with the reference FSM,
 * along with what happened to the fd of the session open in `current`.
 */
export function transitionChecks(kit: Harness): CheckSpec[] {
  return referenceStates(kit.features).flatMap((current) =>
    TRANSITION_TARGETS.map((target) =>
      check('transitions', `${migStateName(current)} -> ${migStateName(target)}`, (k) =>
        checkTransition(k, current, target),
      ),
    ),
  );
}

function checkTransition(kit: Harness, current: number, target: number): string {
  const device = kit.create('transition');
  kit.work(device);
  const sessionFd = kit.driveTo(device, current);
  const expected = referenceSetState(current, target, kit.features);
  const got = attempt(() => device.vfio.setMigDeviceState(target));
  const after = kit.getState(device, 'GET after the SET');
  const sessionNow = sessionFd ? probeFd(sessionFd) : undefined;

  if (!expected.ok) {
    expect(
      !got.ok,
      () =>
        `expected EINVAL (${expected.reason}), but SET succeeded, returned ${describeFd(got.ok ? got.value : -1)}` +
        ` and the device is now ${migStateName(after)}`,
    );
    expect(got.errno === 'EINVAL', () => `expected EINVAL (${expected.reason}), got ${describeOutcome(got)}`);
    expect(after === current, `a refused SET moved the device to ${migStateName(after)}`);
    expect(
      sessionNow === undefined || sessionNow === 'live',
      `a refused SET killed the open session's fd (${sessionNow})`,
    );
    return `EINVAL: ${expected.reason}`;
  }

  const path = [current, ...expected.arcs.map((a) => a.to)].map(migStateName).join(',');
  expect(
    got.ok,
    () => `expected success (path ${path}), got ${describeOutcome(got)}; GET says ${migStateName(after)}`,
  );
  const fd = got.value;
  const kind = fdKind(fd);
  expect(
    kind === expected.fd,
    `expected ${expected.fd === 'none' ? 'no fd' : `a new ${expected.fd} fd`} (path ${path}), got ${describeFd(fd)}`,
  );
  expect(after === target, `SET succeeded but GET says ${migStateName(after)}`);
  if (kind === 'save' || kind === 'resume') {
    const opened = fd as SavingStream | ResumeStream;
    expect(opened !== sessionFd, 'the "new" fd is the fd of the session that was already open');
    const live = probeFd(opened);
    expect(live === 'live', `the returned fd is not usable (${live})`);
  }
  if (sessionFd) {
    if (expected.session === 'kept') {
      expect(
        sessionNow === 'live',
        `the open session's fd should go on (path ${path}) but it is ${sessionNow}`,
      );
    } else {
      expect(
        sessionNow === 'ENODEV',
        `the session ended (path ${path}) but its fd answers ${sessionNow}, not ENODEV`,
      );
    }
  }
  if (expected.loads) {
    const loaded = kit.digest(device, 'after the load');
    expect(
      loaded === kit.golden().digest,
      'the load succeeded but the device digest differs from the source',
    );
  }
  return `path ${path}, ${describeFd(fd)}`;
}
