import type { ResumeStream } from '../../kernel/vfio/mig-data-stream.js';
import { PRECOPY_INFO_BYTES, VFIO_DEVICE_FEATURE } from '../../uapi/device-feature.js';
import { MigFeature, MigState, migStateName } from '../../uapi/migration.js';
import { type CheckSpec, check } from './check.js';
import { probeFd, readToEnd } from './data-fds.js';
import type { Harness } from './harness.js';
import { attempt, describeOutcome, expect, expectErrno } from './outcome.js';

const SEEK_SET = 0;
const END_READS = 4;

/** Data fds used the wrong way: positions, dead sessions, closed fds, the end of data. */
export function streamChecks(kit: Harness): CheckSpec[] {
  const pc = (kit.features & MigFeature.PRE_COPY) !== 0;
  const stopCopyFd = (k: Harness) => {
    const device = k.create('stream');
    k.work(device);
    k.driveTo(device, MigState.STOP);
    return { device, fd: k.setSaving(device, MigState.STOP_COPY, 'STOP -> STOP_COPY') };
  };
  const resumeFd = (k: Harness) => {
    const device = k.create('resume');
    k.driveTo(device, MigState.STOP);
    return { device, fd: k.setResuming(device, 'STOP -> RESUMING') };
  };
  const checks: CheckSpec[] = [
    check('streams', 'saving fd: lseek and pread are ESPIPE', (k) => {
      const { fd } = stopCopyFd(k);
      expectErrno(
        attempt(() => fd.lseek(0, SEEK_SET)),
        'ESPIPE',
        'lseek',
      );
      expectErrno(
        attempt(() => fd.pread(new Uint8Array(16), 0)),
        'ESPIPE',
        'pread',
      );
      return undefined;
    }),
    check('streams', 'resume fd: lseek and pwrite are ESPIPE', (k) => {
      const { fd } = resumeFd(k);
      expectErrno(
        attempt(() => fd.lseek(0, SEEK_SET)),
        'ESPIPE',
        'lseek',
      );
      expectErrno(
        attempt(() => fd.pwrite(new Uint8Array(16), 0)),
        'ESPIPE',
        'pwrite',
      );
      return undefined;
    }),
    check('streams', 'saving fd: unknown ioctl is ENOTTY', (k) => {
      const { fd } = stopCopyFd(k);
      expectErrno(
        attempt(() => fd.ioctl(VFIO_DEVICE_FEATURE)),
        'ENOTTY',
        'ioctl(VFIO_DEVICE_FEATURE) on the saving fd',
      );
      return undefined;
    }),
    check('streams', 'resume fd: ioctl is ENOTTY', (k) => {
      const { fd } = resumeFd(k);
      expectErrno(
        attempt(() => fd.ioctl(VFIO_DEVICE_FEATURE)),
        'ENOTTY',
        'ioctl on the resume fd',
      );
      return undefined;
    }),
    check('streams', 'STOP_COPY reads 0 forever at the end', (k) => {
      const { device, fd } = stopCopyFd(k);
      const chunks = readToEnd(fd, k.settings);
      for (let i = 0; i < END_READS; i++) {
        const got = attempt(() => fd.read(4096));
        expect(got.ok, () => `read ${i + 2} at the end of data: ${describeOutcome(got)} (expected 0 bytes)`);
        expect(got.value.length === 0, `read ${i + 2} at the end of data returned ${got.value.length} bytes`);
      }
      const state = k.getState(device);
      expect(state === MigState.STOP_COPY, `reading the end moved the device to ${migStateName(state)}`);
      return `${chunks.reduce((n, c) => n + c.length, 0)} bytes, then 0 x ${END_READS + 1}`;
    }),
    check('streams', 'saving fd is dead (ENODEV) after STOP_COPY -> STOP', (k) => {
      const { device, fd } = stopCopyFd(k);
      k.set(device, MigState.STOP, 'none', 'STOP_COPY -> STOP');
      expectErrno(
        attempt(() => fd.read(4096)),
        'ENODEV',
        'read after the session ended',
      );
      return undefined;
    }),
    check('streams', 'resume fd is dead (ENODEV) after RESUMING -> STOP', (k) => {
      const device = k.create('resume');
      const fd = k.driveTo(device, MigState.RESUMING) as ResumeStream;
      k.set(device, MigState.STOP, 'none', 'RESUMING -> STOP');
      expectErrno(
        attempt(() => fd.write(new Uint8Array(8))),
        'ENODEV',
        'write after the session ended',
      );
      return undefined;
    }),
    check('streams', 'closed saving fd: read is EBADF, the device stays in STOP_COPY', (k) => {
      const { device, fd } = stopCopyFd(k);
      fd.close();
      expectErrno(
        attempt(() => fd.read(4096)),
        'EBADF',
        'read after close',
      );
      const state = k.getState(device);
      expect(state === MigState.STOP_COPY, `closing the fd moved the device to ${migStateName(state)}`);
      k.set(device, MigState.STOP, 'none', 'STOP_COPY -> STOP after close');
      expectErrno(
        attempt(() => fd.read(4096)),
        'EBADF',
        'read on the closed fd after the session ended',
      );
      return undefined;
    }),
    check('streams', 'closed resume fd: write is EBADF', (k) => {
      const { device, fd } = resumeFd(k);
      fd.close();
      expectErrno(
        attempt(() => fd.write(new Uint8Array(8))),
        'EBADF',
        'write after close',
      );
      const state = k.getState(device);
      expect(state === MigState.RESUMING, `closing the fd moved the device to ${migStateName(state)}`);
      return undefined;
    }),
  ];
  if (pc) {
    checks.push(
      check('streams', 'saving fd is dead (ENODEV) after PRE_COPY -> RUNNING', (k) => {
        const device = k.create('precopy');
        const fd = k.setSaving(device, MigState.PRE_COPY, 'RUNNING -> PRE_COPY');
        k.set(device, MigState.RUNNING, 'none', 'PRE_COPY -> RUNNING');
        expectErrno(
          attempt(() => fd.read(4096)),
          'ENODEV',
          'read after the session ended',
        );
        return undefined;
      }),
      check('streams', `precopy info with argsz < ${PRECOPY_INFO_BYTES} is EINVAL`, (k) => {
        const device = k.create('precopy');
        const fd = k.setSaving(device, MigState.PRE_COPY, 'RUNNING -> PRE_COPY');
        expectErrno(
          attempt(() => fd.precopyInfo({ argsz: PRECOPY_INFO_BYTES - 1 })),
          'EINVAL',
          `VFIO_MIG_GET_PRECOPY_INFO argsz ${PRECOPY_INFO_BYTES - 1}`,
        );
        const live = probeFd(fd);
        expect(live === 'live', `the saving fd is ${live} after a refused ioctl`);
        return undefined;
      }),
    );
  }
  return checks;
}
