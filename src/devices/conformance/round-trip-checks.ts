import type { SavingStream } from '../../kernel/vfio/mig-data-stream.js';
import { MigFeature, MigState } from '../../uapi/migration.js';
import type { SampleDevice } from '../sample-device.js';
import { type CheckSpec, check } from './check.js';
import { concatBytes, readToEnd, readUntilEnomsg } from './data-fds.js';
import type { Harness } from './harness.js';
import { expect } from './outcome.js';

const PRECOPY_ROUNDS = 3;

/**
 * Save on one device, load on a fresh one, compare digests. The destination first does work of
 * its own so that equality means the load replaced its state.
 */
export function roundTripChecks(kit: Harness): CheckSpec[] {
  const pc = (kit.features & MigFeature.PRE_COPY) !== 0;
  const p2p = (kit.features & MigFeature.P2P) !== 0;
  const checks: CheckSpec[] = [
    check('round-trip', 'STOP -> STOP_COPY, no precopy', (k) => {
      const source = k.create('source');
      k.work(source);
      k.driveFromRunningTo(source, MigState.STOP, 'source to STOP');
      const fd = k.setSaving(source, MigState.STOP_COPY, 'source STOP -> STOP_COPY');
      return finish(k, source, fd, [], 'no precopy');
    }),
  ];
  if (p2p) {
    checks.push(
      check('round-trip', 'RUNNING -> RUNNING_P2P -> STOP -> STOP_COPY, one arc at a time', (k) => {
        const source = k.create('source');
        k.work(source);
        k.set(source, MigState.RUNNING_P2P, 'none', 'source RUNNING -> RUNNING_P2P');
        k.work(source);
        k.set(source, MigState.STOP, 'none', 'source RUNNING_P2P -> STOP');
        const fd = k.setSaving(source, MigState.STOP_COPY, 'source STOP -> STOP_COPY');
        return finish(k, source, fd, [], 'via RUNNING_P2P');
      }),
    );
  }
  if (pc) {
    checks.push(
      check('round-trip', 'PRE_COPY with work() between reads -> STOP_COPY', (k) => {
        const source = k.create('source');
        k.work(source);
        const fd = k.setSaving(source, MigState.PRE_COPY, 'source RUNNING -> PRE_COPY');
        const chunks = precopyRounds(k, source, fd);
        k.set(source, MigState.STOP_COPY, 'none', 'source PRE_COPY -> STOP_COPY');
        return finish(k, source, fd, chunks, `${PRECOPY_ROUNDS} precopy rounds`);
      }),
    );
  }
  if (pc && p2p) {
    checks.push(
      check('round-trip', 'PRE_COPY -> PRE_COPY_P2P -> STOP_COPY', (k) => {
        const source = k.create('source');
        k.work(source);
        const fd = k.setSaving(source, MigState.PRE_COPY, 'source RUNNING -> PRE_COPY');
        const chunks = precopyRounds(k, source, fd);
        k.set(source, MigState.PRE_COPY_P2P, 'none', 'source PRE_COPY -> PRE_COPY_P2P');
        readUntilEnomsg(fd, k.settings, chunks);
        k.set(source, MigState.STOP_COPY, 'none', 'source PRE_COPY_P2P -> STOP_COPY');
        return finish(k, source, fd, chunks, 'through PRE_COPY_P2P');
      }),
    );
  }
  checks.push(
    check('round-trip', 'source runs on after a completed save', (k) => {
      const source = k.create('source');
      k.save(source, 'save');
      k.set(source, MigState.RUNNING, 'none', 'source back to RUNNING');
      const before = k.digest(source, 'after resuming the source');
      k.work(source);
      expect(
        k.digest(source, 'after work') !== before,
        'the source does no work after going back to RUNNING',
      );
      return undefined;
    }),
    check('round-trip', 'destination runs after a load', (k) => {
      const loaded = k.load(k.golden().bytes, 'destination');
      k.set(loaded, MigState.RUNNING, 'none', 'destination STOP -> RUNNING');
      const before = k.digest(loaded, 'loaded destination');
      k.work(loaded);
      expect(k.digest(loaded, 'after work') !== before, 'the loaded destination does no work in RUNNING');
      return undefined;
    }),
  );
  return checks;
}

/** Read what precopy has, then let the device work, a few times; the reads it made. */
function precopyRounds(kit: Harness, source: SampleDevice, fd: SavingStream): Uint8Array[] {
  const chunks: Uint8Array[] = [];
  for (let round = 0; round < PRECOPY_ROUNDS; round++) {
    readUntilEnomsg(fd, kit.settings, chunks);
    kit.work(source);
  }
  return chunks;
}

/** Read the STOP_COPY rest, load on a fresh destination, compare; leave the source in STOP. */
function finish(
  kit: Harness,
  source: SampleDevice,
  fd: SavingStream,
  chunks: Uint8Array[],
  how: string,
): string {
  readToEnd(fd, kit.settings, chunks);
  const digest = kit.digest(source, 'source in STOP_COPY');
  const bytes = concatBytes(chunks);
  kit.set(source, MigState.STOP, 'none', 'source STOP_COPY -> STOP');
  const destination = kit.load(bytes, 'destination');
  const loaded = kit.digest(destination, 'destination after the load');
  expect(
    loaded === digest,
    `destination digest ${loaded.slice(0, 16)}… differs from source ${digest.slice(0, 16)}…`,
  );
  kit.set(destination, MigState.RUNNING, 'none', 'destination STOP -> RUNNING');
  expect(kit.digest(destination, 'destination RUNNING') === digest, 'the digest changed on STOP -> RUNNING');
  return `${bytes.length} bytes, ${how}`;
}
