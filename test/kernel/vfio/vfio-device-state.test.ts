import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import { ResumeStream, SavingStream } from '../../../src/kernel/vfio/mig-data-stream.js';
import { migrationPath } from '../../../src/kernel/vfio/mig-fsm.js';
import { ArcBrokeDevice } from '../../../src/kernel/vfio/migration-driver.js';
import type { MigStateData, VfioDevice } from '../../../src/kernel/vfio/vfio-device.js';
import { kernelError, VfioError } from '../../../src/uapi/error.js';
import { assertErrno, bytes, COMBOS, F_P2P, F_PC, F_SC, makeDevice, S } from './test-driver.js';

const MIG_DEVICE_STATE = 2;
const GET = 1 << 16;
const SET = 1 << 17;
const FULL = F_SC | F_P2P | F_PC;

const STATES_OF: Record<number, number[]> = {
  [F_SC]: [S.STOP, S.RUNNING, S.STOP_COPY, S.RESUMING],
  [F_SC | F_P2P]: [S.STOP, S.RUNNING, S.STOP_COPY, S.RESUMING, S.RUNNING_P2P],
  [F_SC | F_PC]: [S.STOP, S.RUNNING, S.STOP_COPY, S.RESUMING, S.PRE_COPY],
  [FULL]: [S.STOP, S.RUNNING, S.STOP_COPY, S.RESUMING, S.RUNNING_P2P, S.PRE_COPY, S.PRE_COPY_P2P],
};
const SAVING = [S.STOP_COPY, S.PRE_COPY, S.PRE_COPY_P2P] as number[];

/** The driver hooks of one arc, as migration-driver.ts maps them (spec 1.4 arcs). */
function arcHooks(from: number, to: number): string[] {
  const key = `${from}>${to}`;
  const table: Record<string, string[]> = {
    [`${S.RUNNING}>${S.STOP}`]: ['stop'],
    [`${S.RUNNING_P2P}>${S.STOP}`]: ['stop'],
    [`${S.STOP}>${S.RUNNING}`]: ['start(false)'],
    [`${S.STOP}>${S.RUNNING_P2P}`]: ['start(true)'],
    [`${S.RUNNING}>${S.RUNNING_P2P}`]: ['setP2pQuiesced(true)'],
    [`${S.PRE_COPY}>${S.PRE_COPY_P2P}`]: ['setP2pQuiesced(true)'],
    [`${S.RUNNING_P2P}>${S.RUNNING}`]: ['setP2pQuiesced(false)'],
    [`${S.PRE_COPY_P2P}>${S.PRE_COPY}`]: ['setP2pQuiesced(false)'],
    [`${S.RUNNING}>${S.PRE_COPY}`]: ['startSaving(precopy=true)'],
    [`${S.RUNNING_P2P}>${S.PRE_COPY_P2P}`]: ['startSaving(precopy=true)'],
    [`${S.STOP}>${S.STOP_COPY}`]: ['startSaving(precopy=false)'],
    [`${S.PRE_COPY}>${S.STOP_COPY}`]: ['enterStopCopy'],
    [`${S.PRE_COPY_P2P}>${S.STOP_COPY}`]: ['enterStopCopy'],
    [`${S.PRE_COPY}>${S.RUNNING}`]: ['end(saving)'],
    [`${S.PRE_COPY_P2P}>${S.RUNNING_P2P}`]: ['end(saving)'],
    [`${S.STOP_COPY}>${S.STOP}`]: ['end(saving)'],
    [`${S.STOP}>${S.RESUMING}`]: ['startResuming'],
    [`${S.RESUMING}>${S.STOP}`]: ['finish', 'end(resuming)'],
  };
  const hooks = table[key];
  assert.ok(hooks, `no arc ${key}`);
  return hooks;
}
const OPENS_FD = new Set([
  `${S.RUNNING}>${S.PRE_COPY}`,
  `${S.RUNNING_P2P}>${S.PRE_COPY_P2P}`,
  `${S.STOP}>${S.STOP_COPY}`,
  `${S.STOP}>${S.RESUMING}`,
]);

function setRaw(dev: VfioDevice, deviceState: number, dataFd: MigStateData['dataFd'] = -1): MigStateData {
  const data: MigStateData = { deviceState, dataFd };
  dev.deviceFeature({ flags: MIG_DEVICE_STATE | SET, data });
  return data;
}

/** SET that must fail with `errno`; returns what the kernel wrote back. */
function setFails(dev: VfioDevice, deviceState: number, errno: string): MigStateData {
  const data: MigStateData = { deviceState, dataFd: 42 as unknown as -1 };
  assertErrno(() => dev.deviceFeature({ flags: MIG_DEVICE_STATE | SET, data }), errno);
  return data;
}

const eio = () => kernelError('EIO', 'hook failed');

describe('MIG_DEVICE_STATE GET', () => {
  test('reports the state and data_fd -1', () => {
    const { dev } = makeDevice(FULL);
    for (const state of [S.RUNNING, S.PRE_COPY, S.STOP_COPY, S.STOP, S.RESUMING]) {
      dev.setMigDeviceState(state);
      const data = { deviceState: 99, dataFd: 5 };
      dev.deviceFeature({ flags: MIG_DEVICE_STATE | GET, data });
      assert.deepEqual(data, { deviceState: state, dataFd: -1 });
      assert.equal(dev.getMigDeviceState(), state);
    }
  });
});

describe('MIG_DEVICE_STATE SET', () => {
  test('target == current is a no-op success: no hooks, data_fd -1, the open stream goes on', () => {
    for (const flags of COMBOS) {
      for (const state of STATES_OF[flags]!) {
        const { dev, drv } = makeDevice(flags);
        const first = dev.setMigDeviceState(state);
        drv.takeCalls();
        const data = setRaw(dev, state, 9 as unknown as -1);
        assert.deepEqual(data, { deviceState: state, dataFd: -1 });
        assert.deepEqual(drv.calls, []);
        assert.equal(dev.state, state);
        if (first !== -1) assert.equal(first.live, true);
      }
    }
  });

  test('target ERROR, >= 8, negative or unsupported is EINVAL and changes nothing', () => {
    for (const flags of COMBOS) {
      const { dev, drv } = makeDevice(flags);
      const unsupported = [S.RUNNING_P2P, S.PRE_COPY, S.PRE_COPY_P2P].filter(
        (s) => !STATES_OF[flags]!.includes(s),
      );
      for (const target of [S.ERROR, 8, 9, 0xffffffff, -1, 2.5, ...unsupported]) {
        const back = setFails(dev, target, 'EINVAL');
        assert.deepEqual(back, { deviceState: target, dataFd: -1 });
        assert.equal(dev.state, S.RUNNING);
      }
      assert.deepEqual(drv.calls, []);
    }
  });

  test('STOP_COPY -> PRE_COPY(_P2P) is EINVAL, the device stays in STOP_COPY with its stream', () => {
    for (const flags of [F_SC | F_PC, FULL]) {
      const { dev, drv } = makeDevice(flags);
      const fd = dev.setMigDeviceState(S.STOP_COPY) as SavingStream;
      drv.takeCalls();
      for (const target of [S.PRE_COPY, S.PRE_COPY_P2P].filter((s) => STATES_OF[flags]!.includes(s))) {
        setFails(dev, target, 'EINVAL');
      }
      assert.equal(dev.state, S.STOP_COPY);
      assert.deepEqual(drv.calls, []);
      assert.equal(fd.live, true);
    }
  });

  test('every pair of every combo: the hooks of each arc in order, a fd exactly when the last arc opens one', () => {
    let pairs = 0;
    for (const flags of COMBOS) {
      const states = STATES_OF[flags]!;
      for (const from of states) {
        for (const to of states) {
          if (from === S.STOP_COPY && (to === S.PRE_COPY || to === S.PRE_COPY_P2P)) continue;
          const { dev, drv } = makeDevice(flags);
          const before = dev.setMigDeviceState(from);
          drv.takeCalls();
          const path = migrationPath(from, to, flags);
          const fd = dev.setMigDeviceState(to);
          const label = `flags ${flags} ${from}->${to}`;
          const steps = [from, ...path];
          const want = path.flatMap((s, i) => arcHooks(steps[i]!, s));
          assert.deepEqual(drv.calls, want, label);
          assert.equal(dev.state, to, label);
          const lastArc = path.length ? `${steps.at(-2)}>${to}` : '';
          if (OPENS_FD.has(lastArc)) {
            assert.ok(to === S.RESUMING ? fd instanceof ResumeStream : fd instanceof SavingStream, label);
            assert.equal((fd as SavingStream).live, true);
          } else {
            assert.equal(fd, -1, label);
          }
          // A stream from before lives on exactly while the path stayed in its session.
          if (before !== -1) {
            const stayed = from === to || (SAVING.includes(from) && SAVING.includes(to));
            assert.equal(before.live, stayed, label);
          }
          pairs++;
        }
      }
    }
    assert.equal(pairs, 16 + 25 + 24 + 47);
  });

  test('exact hook sequences of multi-step paths', () => {
    const cases: [number, number, number, string[]][] = [
      [F_SC | F_P2P, S.RUNNING, S.STOP_COPY, ['setP2pQuiesced(true)', 'stop', 'startSaving(precopy=false)']],
      [FULL, S.RUNNING, S.STOP_COPY, ['setP2pQuiesced(true)', 'stop', 'startSaving(precopy=false)']],
      [F_SC, S.RUNNING, S.STOP_COPY, ['stop', 'startSaving(precopy=false)']],
      [F_SC | F_PC, S.PRE_COPY, S.STOP_COPY, ['enterStopCopy']],
      [FULL, S.PRE_COPY, S.STOP_COPY, ['setP2pQuiesced(true)', 'enterStopCopy']],
      [FULL, S.STOP_COPY, S.RUNNING, ['end(saving)', 'start(true)', 'setP2pQuiesced(false)']],
      [F_SC, S.STOP_COPY, S.RUNNING, ['end(saving)', 'start(false)']],
      [
        FULL,
        S.RESUMING,
        S.PRE_COPY,
        ['finish', 'end(resuming)', 'start(true)', 'setP2pQuiesced(false)', 'startSaving(precopy=true)'],
      ],
      [FULL, S.PRE_COPY, S.RESUMING, ['end(saving)', 'setP2pQuiesced(true)', 'stop', 'startResuming']],
      [
        F_SC | F_PC,
        S.RESUMING,
        S.PRE_COPY,
        ['finish', 'end(resuming)', 'start(false)', 'startSaving(precopy=true)'],
      ],
      [FULL, S.PRE_COPY_P2P, S.RUNNING, ['end(saving)', 'setP2pQuiesced(false)']],
      [FULL, S.STOP, S.PRE_COPY_P2P, ['start(true)', 'startSaving(precopy=true)']],
    ];
    for (const [flags, from, to, hooks] of cases) {
      const { dev, drv } = makeDevice(flags);
      dev.setMigDeviceState(from);
      drv.takeCalls();
      dev.setMigDeviceState(to);
      assert.deepEqual(drv.takeCalls(), hooks, `flags ${flags} ${from}->${to}`);
    }
  });

  test('PRE_COPY -> STOP_COPY keeps the same stream and returns no new fd', () => {
    for (const flags of [F_SC | F_PC, FULL]) {
      const { dev } = makeDevice(flags);
      const fd = dev.setMigDeviceState(S.PRE_COPY) as SavingStream;
      assert.ok(fd instanceof SavingStream);
      assert.equal(dev.setMigDeviceState(S.STOP_COPY), -1);
      assert.equal(fd.live, true);
    }
  });
});

describe('MIG_DEVICE_STATE SET failures', () => {
  test('write-back on failure: data_fd -1 and the device_state the user passed', () => {
    const { dev, drv } = makeDevice(FULL);
    dev.setMigDeviceState(S.RESUMING);
    drv.failNext('finish', kernelError('EINVAL', 'bad stream'));
    const back = setFails(dev, S.RUNNING, 'EINVAL');
    assert.deepEqual(back, { deviceState: S.RUNNING, dataFd: -1 });
    assert.equal(dev.getMigDeviceState(), S.RESUMING);
  });

  test('a failing hook leaves the device in its arc from-state, an intermediate state of the path', () => {
    // RUNNING -> STOP_COPY on a P2P device: RUNNING -> RUNNING_P2P -> STOP -> STOP_COPY.
    const cases: [string, number][] = [
      ['setP2pQuiesced(true)', S.RUNNING],
      ['stop', S.RUNNING_P2P],
      ['startSaving(precopy=false)', S.STOP],
    ];
    for (const [hook, stuck] of cases) {
      const { dev, drv } = makeDevice(F_SC | F_P2P);
      drv.failNext(hook, eio());
      const back = setFails(dev, S.STOP_COPY, 'EIO');
      assert.deepEqual(back, { deviceState: S.STOP_COPY, dataFd: -1 });
      assert.equal(dev.state, stuck, hook);
      assert.equal(drv.calls.at(-1), hook);
      assert.equal(drv.saving, undefined);
      // GET tells the truth and the device goes on from there.
      assert.equal(dev.getMigDeviceState(), stuck);
      const fd = dev.setMigDeviceState(S.STOP_COPY);
      assert.ok(fd instanceof SavingStream);
    }
  });

  test('the error names the device and the failing arc', () => {
    const { dev, drv } = makeDevice(F_SC | F_P2P, { name: 'nic7' });
    drv.failNext('stop', eio());
    try {
      dev.setMigDeviceState(S.STOP);
      assert.fail('no error');
    } catch (e) {
      assert.ok(e instanceof VfioError);
      assert.equal(e.errno, 'EIO');
      assert.equal(e.code, 'VFIO_EIO');
      assert.equal(e.target, 'nic7');
      assert.match(e.message, /RUNNING_P2P->STOP/);
    }
  });

  test('ArcBrokeDevice puts the device in ERROR and kills every stream', () => {
    const { dev, drv } = makeDevice(FULL);
    const fd = dev.setMigDeviceState(S.PRE_COPY) as SavingStream;
    drv.failNext('setP2pQuiesced(true)', new ArcBrokeDevice('EIO', 'firmware hung'));
    setFails(dev, S.STOP_COPY, 'EIO');
    assert.equal(dev.state, S.ERROR);
    assert.equal(drv.saving!.ended, true);
    assertErrno(() => fd.read(), 'ENODEV');
  });

  test('a non-VfioError from a hook is a driver bug: ERROR, reported as ERR_INTERNAL', () => {
    const { dev, drv } = makeDevice(F_SC);
    assert.equal(dev.setMigDeviceState(S.STOP), -1);
    dev.setMigDeviceState(S.RESUMING);
    const resume = drv.resuming!;
    drv.failNext('finish', new TypeError('undefined is not a function'));
    assert.throws(
      () => dev.setMigDeviceState(S.STOP),
      (e: unknown) => e instanceof VfioError && e.code === 'ERR_INTERNAL' && e.errno === undefined,
    );
    assert.equal(dev.state, S.ERROR);
    assert.equal(resume.ended, true);
  });

  test('ERROR: every SET is EINVAL, GET says ERROR (0), only reset leaves it', () => {
    const { dev, drv } = makeDevice(FULL);
    dev.setMigDeviceState(S.RUNNING_P2P);
    drv.failNext('stop', new ArcBrokeDevice('EIO', 'gone'));
    setFails(dev, S.STOP, 'EIO');
    assert.equal(dev.getMigDeviceState(), S.ERROR);
    drv.takeCalls();
    for (const target of [S.ERROR, S.STOP, S.RUNNING, S.STOP_COPY, S.RESUMING, S.RUNNING_P2P, S.PRE_COPY]) {
      const back = setFails(dev, target, 'EINVAL');
      assert.deepEqual(back, { deviceState: target, dataFd: -1 });
      assert.equal(dev.state, S.ERROR);
    }
    assert.deepEqual(drv.calls, []);
    dev.reset();
    assert.deepEqual(drv.takeCalls(), ['reset']);
    assert.equal(dev.getMigDeviceState(), S.RUNNING);
    assert.ok(dev.setMigDeviceState(S.STOP_COPY) instanceof SavingStream);
  });

  test('RESUMING -> STOP with bad data fails, stays RESUMING with a live stream; a retry can succeed', () => {
    const { dev, drv } = makeDevice(F_SC);
    dev.setMigDeviceState(S.STOP);
    const fd = dev.setMigDeviceState(S.RESUMING) as ResumeStream;
    fd.write(bytes(1, 2));
    drv.failNext('finish', kernelError('EINVAL', 'incomplete'));
    setFails(dev, S.STOP, 'EINVAL');
    assert.equal(dev.state, S.RESUMING);
    assert.equal(fd.live, true);
    fd.write(bytes(3));
    dev.setMigDeviceState(S.STOP);
    assert.deepEqual(drv.loaded, bytes(1, 2, 3));
    assert.equal(fd.live, false);
    assertErrno(() => fd.write(bytes(4)), 'ENODEV');
  });

  test('a session end() that fails during an arc leaves the arc undone and the session open', () => {
    const { dev, drv } = makeDevice(F_SC | F_PC);
    const fd = dev.setMigDeviceState(S.PRE_COPY) as SavingStream;
    drv.failNext('end(saving)', eio());
    setFails(dev, S.RUNNING, 'EIO');
    assert.equal(dev.state, S.PRE_COPY);
    assert.equal(fd.live, true);
    assert.equal(drv.saving!.ended, false);
    assert.deepEqual(fd.read(4), bytes(1, 2, 3, 4));
    // the state machine still works: PRE_COPY -> STOP_COPY uses the same session
    dev.setMigDeviceState(S.STOP_COPY);
    assert.deepEqual(fd.read(), bytes(5, 6, 7, 8, 9, 10, 0xf0, 0xf1, 0xf2));
  });
});

describe('VFIO_DEVICE_RESET', () => {
  test('from every state: sessions end, streams die, state RUNNING', () => {
    for (const flags of COMBOS) {
      for (const state of STATES_OF[flags]!) {
        const { dev, drv } = makeDevice(flags);
        const fd = dev.setMigDeviceState(state);
        drv.takeCalls();
        dev.reset();
        const ends = fd === -1 ? [] : [fd instanceof ResumeStream ? 'end(resuming)' : 'end(saving)'];
        assert.deepEqual(drv.takeCalls(), [...ends, 'reset']);
        assert.equal(dev.state, S.RUNNING);
        if (fd !== -1) {
          assert.equal(fd.live, false);
          assert.equal(fd.closed, false);
        }
      }
    }
  });

  test('a reset that fails leaves the device in ERROR, a second reset recovers', () => {
    const { dev, drv } = makeDevice(F_SC);
    const fd = dev.setMigDeviceState(S.STOP_COPY) as SavingStream;
    drv.failNext('reset', eio());
    assertErrno(() => dev.reset(), 'EIO');
    assert.equal(dev.state, S.ERROR);
    assert.equal(fd.live, false);
    dev.reset();
    assert.equal(dev.state, S.RUNNING);
  });

  test('a session end() that throws during reset still completes the reset, then reports the bug', () => {
    const { dev, drv } = makeDevice(F_SC);
    const fd = dev.setMigDeviceState(S.STOP_COPY) as SavingStream;
    drv.failNext('end(saving)', new TypeError('bug'));
    assert.throws(
      () => dev.reset(),
      (e: unknown) => e instanceof VfioError && e.code === 'ERR_INTERNAL',
    );
    assert.equal(dev.state, S.RUNNING);
    assert.equal(fd.live, false);
    assert.ok(dev.setMigDeviceState(S.STOP_COPY) instanceof SavingStream);
  });
});

describe('close', () => {
  test('ends the sessions, kills the streams; later calls are EBADF; closing twice is fine', () => {
    const { dev, drv } = makeDevice(F_SC | F_PC);
    const fd = dev.setMigDeviceState(S.PRE_COPY) as SavingStream;
    dev.close();
    assert.equal(drv.saving!.ended, true);
    assertErrno(() => fd.read(), 'ENODEV');
    assertErrno(() => dev.getMigDeviceState(), 'EBADF');
    assertErrno(() => dev.setMigDeviceState(S.RUNNING), 'EBADF');
    dev.close();
  });
});
