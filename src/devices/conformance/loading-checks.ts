import { MigState, migStateName } from '../../uapi/migration.js';
import { type CheckSpec, check } from './check.js';
import { writeUntilError } from './data-fds.js';
import type { Harness } from './harness.js';
import { attempt, describeOutcome, expect, skip, violation } from './outcome.js';

/** What a destination did with a stream it should refuse. */
interface RejectionResult {
  readonly note: string;
  /** The state GET reported after the failed RESUMING -> STOP. */
  readonly state: number;
}

/**
 * Write `bytes` to a fresh destination (a write may refuse bad data early) and request
 * RESUMING -> STOP, which must fail. The destination must not be left holding a state that claims
 * to be the source's: after a failure it should still be RESUMING or be in ERROR; in any other
 * state its digest must differ from the source's.
 */
function expectRejected(
  kit: Harness,
  bytes: Uint8Array,
  sourceDigest: string,
  what: string,
): RejectionResult {
  const destination = kit.create('bad-load');
  kit.work(destination, kit.settings.workUnits * 2 + 1);
  kit.driveFromRunningTo(destination, MigState.STOP, 'destination to STOP');
  const fd = kit.setResuming(destination, 'destination STOP -> RESUMING');
  const wrote = writeUntilError(fd, bytes);
  const load = attempt(() => destination.vfio.setMigDeviceState(MigState.STOP));
  const state = kit.getState(destination, 'GET after the load');
  const writeNote = wrote.error
    ? `write refused at byte ${wrote.written}/${bytes.length} (${wrote.error.split(' ')[0]})`
    : `${bytes.length} byte(s) written`;
  if (load.ok) {
    const digest = kit.digest(destination, 'after the accepted load');
    violation(
      `RESUMING -> STOP accepted ${what} (${writeNote}); the destination is ${migStateName(state)} and its ` +
        `digest ${digest === sourceDigest ? 'claims to equal' : 'differs from'} the source's`,
    );
  }
  expect(load.errno !== undefined, `RESUMING -> STOP failed without an errno: ${describeOutcome(load)}`);
  if (state !== MigState.RESUMING && state !== MigState.ERROR) {
    const digest = kit.digest(destination, `after the failed load (${migStateName(state)})`);
    expect(
      digest !== sourceDigest,
      `the load failed (${load.errno}) but the destination is ${migStateName(state)} with the source's digest`,
    );
  }
  return { note: `${writeNote}; SET ${load.errno}; now ${migStateName(state)}`, state };
}

export function loadingChecks(_kit: Harness): CheckSpec[] {
  const seenStates = new Map<string, number>();
  const rejects = (name: string, make: (k: Harness) => { bytes: Uint8Array; digest: string; what: string }) =>
    check('loading', name, (k) => {
      const { bytes, digest, what } = make(k);
      const result = expectRejected(k, bytes, digest, what);
      seenStates.set(name, result.state);
      return result.note;
    });
  const truncated = (name: string, keep: (length: number) => number) =>
    rejects(`truncated stream: ${name}`, (k) => {
      const golden = k.golden();
      const n = keep(golden.bytes.length);
      return {
        bytes: golden.bytes.subarray(0, n),
        digest: golden.digest,
        what: `a stream cut to ${n} of ${golden.bytes.length} bytes`,
      };
    });
  const flipped = (name: string, at: (length: number) => number) =>
    rejects(`flipped byte: ${name}`, (k) => {
      const golden = k.golden();
      const bytes = golden.bytes.slice();
      const offset = at(bytes.length);
      bytes[offset]! ^= 0x5a;
      return {
        bytes,
        digest: golden.digest,
        what: `a stream with byte ${offset} of ${bytes.length} flipped`,
      };
    });
  return [
    truncated('0 bytes', () => 0),
    truncated('1 byte', (n) => Math.min(1, n - 1)),
    truncated('half', (n) => Math.floor(n / 2)),
    truncated('all but the last byte', (n) => n - 1),
    flipped('first byte', () => 0),
    flipped('middle byte', (n) => Math.floor(n / 2)),
    flipped('last byte', (n) => n - 1),
    rejects('random bytes of a valid length', (k) => {
      const golden = k.golden();
      const bytes = new Uint8Array(golden.bytes.length);
      let x = (k.settings.seed ^ 0x2545f491) >>> 0 || 1;
      for (let i = 0; i < bytes.length; i++) {
        x ^= x << 13;
        x ^= x >>> 17;
        x ^= x << 5;
        bytes[i] = x & 0xff;
      }
      return { bytes, digest: golden.digest, what: 'random bytes' };
    }),
    rejects('stream of another device type', (k) => {
      const foreign = k.foreignStream();
      if (!foreign) skip('no foreign device factory given');
      if (foreign.deviceType === k.factory.type) skip('the foreign factory has the same device type');
      return { bytes: foreign.bytes, digest: foreign.digest, what: `a ${foreign.deviceType} stream` };
    }),
    check('loading', 'trailing bytes after a complete stream never load a wrong state', (k) => {
      const golden = k.golden();
      const bytes = new Uint8Array(golden.bytes.length + 16).fill(0xa5);
      bytes.set(golden.bytes);
      const destination = k.create('trailing');
      k.driveFromRunningTo(destination, MigState.STOP, 'destination to STOP');
      const fd = k.setResuming(destination, 'destination STOP -> RESUMING');
      const wrote = writeUntilError(fd, bytes);
      const load = attempt(() => destination.vfio.setMigDeviceState(MigState.STOP));
      if (!load.ok) return `refused (${load.errno})${wrote.error ? ' at write' : ''}`;
      const digest = k.digest(destination, 'after the load');
      expect(
        digest === golden.digest,
        'a stream with 16 trailing bytes loaded a state that differs from the source',
      );
      return 'accepted, state equal to the source';
    }),
    check('loading', 'a failed load leaves the destination RESUMING or ERROR', () => {
      if (seenStates.size === 0) skip('no bad-stream check ran');
      const other = [...seenStates].filter(([, s]) => s !== MigState.RESUMING && s !== MigState.ERROR);
      expect(
        other.length === 0,
        () =>
          `after a failed RESUMING -> STOP the state must be RESUMING or ERROR (uAPI 1.3), but: ` +
          other.map(([name, s]) => `${name} -> ${migStateName(s)}`).join('; '),
      );
      const states = new Set([...seenStates.values()].map(migStateName));
      return `${seenStates.size} failed loads left ${[...states].join('/')}`;
    }),
    check('loading', 'a destination recovers after a failed load (reset, load again)', (k) => {
      const golden = k.golden();
      const destination = k.create('recover');
      k.driveFromRunningTo(destination, MigState.STOP, 'destination to STOP');
      const fd = k.setResuming(destination, 'destination STOP -> RESUMING');
      writeUntilError(fd, golden.bytes.subarray(0, Math.floor(golden.bytes.length / 2)));
      const load = attempt(() => destination.vfio.setMigDeviceState(MigState.STOP));
      expect(!load.ok, 'a half stream loaded');
      const reset = attempt(() => destination.vfio.reset());
      expect(reset.ok, () => `reset after the failed load: ${describeOutcome(reset)}`);
      const state = k.getState(destination, 'GET after reset');
      expect(state === MigState.RUNNING, `reset left the device in ${migStateName(state)}`);
      k.driveFromRunningTo(destination, MigState.STOP, 'destination to STOP again');
      const again = k.setResuming(destination, 'STOP -> RESUMING again');
      const wrote = writeUntilError(again, golden.bytes);
      expect(!wrote.error, `writing the valid stream after recovery failed: ${wrote.error}`);
      k.set(destination, MigState.STOP, 'none', 'load after recovery');
      expect(k.digest(destination, 'after the second load') === golden.digest, 'the second load differs');
      return undefined;
    }),
  ];
}
