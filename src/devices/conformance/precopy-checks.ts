import type { SavingStream } from '../../kernel/vfio/mig-data-stream.js';
import type { PrecopyInfo } from '../../kernel/vfio/migration-driver.js';
import { MigFeature, MigState } from '../../uapi/migration.js';
import { type CheckSpec, check } from './check.js';
import type { Harness } from './harness.js';
import { attempt, describeOutcome, expect, expectErrno, violation } from './outcome.js';

/** Bounds the drain loops of these checks (reads of one precopy pause). */
const MAX_READS = 100_000;

export function precopyInfoOf(fd: SavingStream, why: string): PrecopyInfo {
  const got = attempt(() => fd.precopyInfo());
  if (!got.ok) violation(`${why}: VFIO_MIG_GET_PRECOPY_INFO failed: ${describeOutcome(got)}`);
  const info = got.value;
  expect(
    typeof info?.initialBytes === 'bigint' &&
      typeof info.dirtyBytes === 'bigint' &&
      info.initialBytes >= 0n &&
      info.dirtyBytes >= 0n,
    `${why}: precopy info is not two u64 bigints`,
  );
  return info;
}

const show = (i: PrecopyInfo) => `initial ${i.initialBytes}, dirty ${i.dirtyBytes}`;
const isEmpty = (i: PrecopyInfo) => i.initialBytes === 0n && i.dirtyBytes === 0n;

/**
 * Read in `size` chunks until ENOMSG, checking before every read that ENOMSG comes exactly when
 * precopy info says 0/0. Returns the number of bytes read.
 */
function drainChecked(fd: SavingStream, size: number, why: string): number {
  let total = 0;
  for (let reads = 0; reads < MAX_READS; reads++) {
    const info = precopyInfoOf(fd, why);
    const got = attempt(() => fd.read(size));
    if (isEmpty(info)) {
      expect(
        !got.ok && got.errno === 'ENOMSG',
        () =>
          `${why}: precopy info was 0/0 after ${total} bytes but read gave ` +
          (got.ok ? `${got.value.length} bytes` : describeOutcome(got)),
      );
      return total;
    }
    expect(
      got.ok,
      () => `${why}: read failed with ${describeOutcome(got)} while precopy info said ${show(info)}`,
    );
    expect(got.value.length > 0, `${why}: read returned 0 bytes in precopy while info said ${show(info)}`);
    total += got.value.length;
  }
  return violation(`${why}: precopy data did not pause after ${MAX_READS} reads`);
}

export function precopyChecks(kit: Harness): CheckSpec[] {
  const checks: CheckSpec[] = [];
  const pc = (kit.features & MigFeature.PRE_COPY) !== 0;
  const p2p = (kit.features & MigFeature.P2P) !== 0;
  const enterPrecopy = (k: Harness) => {
    const device = k.create('precopy');
    k.work(device);
    return { device, fd: k.setSaving(device, MigState.PRE_COPY, 'RUNNING -> PRE_COPY') };
  };
  if (pc) {
    checks.push(
      check('precopy', 'initial_bytes > 0 and dirty_bytes = 0 at PRE_COPY start', (k) => {
        const { fd } = enterPrecopy(k);
        const info = precopyInfoOf(fd, 'at PRE_COPY start');
        expect(info.initialBytes > 0n, `initial_bytes is 0 at the start (${show(info)})`);
        expect(info.dirtyBytes === 0n, `dirty_bytes is not 0 at the start (${show(info)})`);
        return show(info);
      }),
      check('precopy', 'initial_bytes shrinks as read', (k) => {
        const { fd } = enterPrecopy(k);
        let info = precopyInfoOf(fd, 'at PRE_COPY start');
        const start = info.initialBytes;
        const steps: string[] = [];
        // Odd-sized reads: initial_bytes may not grow at any of them and must have shrunk at the end.
        for (const size of [1, 7, 100, 4096]) {
          if (info.initialBytes === 0n) break;
          const got = attempt(() => fd.read(size));
          expect(got.ok && got.value.length > 0, () => `read(${size}) gave ${describeOutcome(got)}`);
          const next = precopyInfoOf(fd, `after reading ${got.value.length} bytes`);
          expect(
            next.initialBytes <= info.initialBytes,
            `initial_bytes grew from ${info.initialBytes} to ${next.initialBytes} on a read of ${got.value.length} bytes`,
          );
          steps.push(`-${info.initialBytes - next.initialBytes}/${got.value.length}`);
          info = next;
        }
        expect(
          info.initialBytes < start,
          `initial_bytes stayed ${start} over reads of ${steps.length} chunks`,
        );
        return `from ${start}: ${steps.join(' ')} (shrunk/read)`;
      }),
      check('precopy', 'ENOMSG exactly when initial_bytes and dirty_bytes are 0', (k) => {
        const { device, fd } = enterPrecopy(k);
        const first = drainChecked(fd, 4096, 'initial data');
        k.work(device);
        const second = drainChecked(fd, 333, 'after work()');
        const again = attempt(() => fd.read(4096));
        expectErrno(again, 'ENOMSG', 'a second read at the pause');
        return `${first} initial bytes, then ${second} after work()`;
      }),
      check('precopy', 'dirty_bytes grows with work()', (k) => {
        const { device, fd } = enterPrecopy(k);
        drainChecked(fd, 65536, 'initial data');
        const idle = precopyInfoOf(fd, 'after the initial data');
        k.work(device);
        const once = precopyInfoOf(fd, 'after work()');
        expect(once.dirtyBytes > idle.dirtyBytes, `dirty_bytes did not grow with work() (${show(once)})`);
        k.work(device, k.settings.workUnits * 4);
        const more = precopyInfoOf(fd, 'after more work()');
        expect(
          more.dirtyBytes >= once.dirtyBytes,
          `dirty_bytes shrank without reads (${show(once)} -> ${show(more)})`,
        );
        const read = drainChecked(fd, 65536, 'dirty data');
        expect(read > 0, 'no dirty data could be read');
        return `dirty ${once.dirtyBytes} then ${more.dirtyBytes}, ${read} bytes read`;
      }),
      check('precopy', 'precopy info EINVAL in STOP_COPY after PRE_COPY', (k) => {
        const { device, fd } = enterPrecopy(k);
        k.set(device, MigState.STOP_COPY, 'none', 'PRE_COPY -> STOP_COPY');
        expectErrno(
          attempt(() => fd.precopyInfo()),
          'EINVAL',
          'VFIO_MIG_GET_PRECOPY_INFO in STOP_COPY',
        );
        return undefined;
      }),
    );
    if (p2p) {
      checks.push(
        check('precopy', 'precopy info works in PRE_COPY_P2P', (k) => {
          const { device, fd } = enterPrecopy(k);
          k.set(device, MigState.PRE_COPY_P2P, 'none', 'PRE_COPY -> PRE_COPY_P2P');
          const info = precopyInfoOf(fd, 'in PRE_COPY_P2P');
          drainChecked(fd, 4096, 'in PRE_COPY_P2P');
          return show(info);
        }),
      );
    }
  }
  checks.push(
    check('precopy', 'precopy info EINVAL in STOP_COPY from STOP', (k) => {
      const device = k.create('stop-copy');
      k.driveTo(device, MigState.STOP);
      const fd = k.setSaving(device, MigState.STOP_COPY, 'STOP -> STOP_COPY');
      expectErrno(
        attempt(() => fd.precopyInfo()),
        'EINVAL',
        'VFIO_MIG_GET_PRECOPY_INFO in STOP_COPY',
      );
      return undefined;
    }),
  );
  return checks;
}
